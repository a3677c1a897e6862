"""Export a trained head: ``python export.py ckpt=PATH out=DIR [onnx=true] [verify=true] [overwrite=false]``.

Writes into ``out``: ``head.safetensors`` (the head weights), ``config.yaml`` (task kind, backbone name,
weights source, out_indices, freeze, head ``_target_`` and arguments, classes, mean/std, eval settings) and,
only when the backbone is random-init or was trained, ``backbone.safetensors``. ``onnx=true`` adds
``model.onnx`` (backbone + head, dynamic batch / height / width, checked against PyTorch with onnxruntime).
Rebuild with ``tasks.load_predictor(out)``. ``ckpt`` may also be one of Meta's released head files, with
``backbone=NAME backbone_weights=SOURCE`` naming the backbone it runs on. ``out`` must be new, empty or an
earlier export; ``overwrite=true`` writes into any folder (same-named files replaced, no other file deleted).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from predict import parse_key_values

DEFAULTS = {"ckpt": None, "out": None, "onnx": False, "verify": True, "overwrite": False,
            "backbone": None, "backbone_weights": None}  # backbone: only for Meta's released head files


def main(argv: list[str]) -> int:
    args = parse_key_values(argv, DEFAULTS, ("ckpt", "out"), __doc__.split("\n\n")[0])
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from tasks.export import export_checkpoint
    from tasks.outputs import written_files

    try:
        report = export_checkpoint(args["ckpt"], args["out"], onnx=bool(args["onnx"]), verify=bool(args["verify"]),
                                   backbone=args["backbone"], backbone_weights=args["backbone_weights"],
                                   overwrite=bool(args["overwrite"]))
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config, out = report["config"], Path(args["out"])
    print(f"exported {config['task']['kind']} head {config['head']['_target_']} on {config['backbone']['name']} to {out}")
    for name in sorted(written_files(out, "export")):
        print(f"  {name} ({(out / name).stat().st_size / 1e6:.2f} MB)")
    print(f"backbone tensors: {config['backbone_tensors']}")
    if report["verify_diff"] is not None:
        print(f"rebuilt from the folder: max abs diff vs checkpoint {report['verify_diff']:.3g}")
    if report["onnx_diff"] is not None:
        print(f"onnx vs pytorch max abs diff: {report['onnx_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
