"""Output folders of export.py and predict.py: never write into (or delete from) a folder another program filled.

A folder a tool writes holds ``OUTPUT_MARKER``, a small JSON file naming the tool and the files it wrote. A
tool writes into a folder that is new, empty, or marked by itself; any other non-empty folder is refused unless
``overwrite=True`` (files of the same names are then replaced; nothing else is touched). A tool deletes only
files its marker lists.
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT_MARKER = ".dinov3_heads_output.json"


class OutputFolderError(FileExistsError):
    """The output folder holds files this tool did not write."""


def _marker(folder: Path) -> dict:
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def claim_output_folder(folder: str | Path, tool: str, overwrite: bool = False) -> Path:
    """Create ``folder`` or check that ``tool`` may write into it, and mark it as ``tool``'s.

    Raises:
        OutputFolderError: ``folder`` is a file, or a non-empty folder not marked by ``tool`` (without ``overwrite``).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output {folder} is a file, not a folder")
    marker = _marker(folder) if folder.is_dir() else {}
    if folder.is_dir() and any(folder.iterdir()) and marker.get("tool") != tool and not overwrite:
        owner = f"it was written by {marker['tool']}.py" if marker.get("tool") else f"it has no {OUTPUT_MARKER}"
        raise OutputFolderError(f"output folder {folder} is not empty and {tool}.py did not write it ({owner}); "
                                "choose a new or empty folder, or pass overwrite=true (files of the same names are "
                                "replaced, no other file is touched)")
    folder.mkdir(parents=True, exist_ok=True)
    files = marker.get("files", []) if marker.get("tool") == tool else []
    (folder / OUTPUT_MARKER).write_text(json.dumps({"tool": tool, "files": files}, indent=1) + "\n")
    return folder


def written_files(folder: str | Path, tool: str) -> set[str]:
    """Names of the files ``tool`` recorded in ``folder``'s marker."""
    marker = _marker(Path(folder))
    return set(marker.get("files", [])) if marker.get("tool") == tool else set()


def record_files(folder: str | Path, tool: str, names: list[str]) -> None:
    """Set the files ``tool`` wrote into ``folder`` (relative names)."""
    folder = Path(folder)
    (folder / OUTPUT_MARKER).write_text(json.dumps({"tool": tool, "files": sorted(set(names))}, indent=1) + "\n")
