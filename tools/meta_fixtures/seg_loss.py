"""Write the linear-segmentation loss fixtures of ``tests/test_seg_losses.py`` from Meta's dinov3 code (fixed seed).

What is written to ``tests/fixtures/meta/seg_loss/seg_loss.npz``: random logits ``(2, 6, 24, 32)`` at
a quarter of the label size and labels ``(2, 96, 128)`` with about 40 % of the pixels ignored (255; one image
entirely ignored in its bottom half), and the loss of Meta's segmentation training step on them: logits resized
bilinearly to the labels, then ``MultiSegmentationLoss(celoss_weight=1.0)`` (its ``CrossEntropyLoss`` with
``avg_non_ignore=False``: labelled-pixel sum / all pixels) as ``loss_meta``, and the same ``CrossEntropyLoss`` with
``avg_non_ignore=True`` as ``loss_meta_non_ignore``; plus ``loss_meta_all_ignored`` on labels that are all 255.

Rerun (needs Meta's repository; fetch github:facebookresearch/dinov3 at commit 6876159)::

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3 && git -C /tmp/dinov3 checkout 6876159
    OMP_NUM_THREADS=1 python tools/meta_fixtures/seg_loss.py --meta-repo /tmp/dinov3

(``DINOV3_REPO`` sets the default of ``--meta-repo``.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference_arrays import save_arrays  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "meta" / "seg_loss"


def load_meta_loss_module(repo: Path):
    """Meta's ``dinov3/eval/segmentation/loss.py`` by path (it needs only torch and numpy)."""
    path = repo / "dinov3" / "eval" / "segmentation" / "loss.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --meta-repo (a checkout of facebookresearch/dinov3)")
    spec = importlib.util.spec_from_file_location("meta_seg_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-repo", type=Path, default=os.environ.get("DINOV3_REPO"), required="DINOV3_REPO" not in os.environ)
    args = parser.parse_args()
    meta = load_meta_loss_module(args.meta_repo)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 24, 32, generator=gen) * 2.0
    labels = torch.randint(0, 6, (2, 96, 128), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.25] = 255
    labels[1, 48:] = 255
    resized = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)  # Meta's train_step

    out = {
        "logits": logits,
        "labels": labels.to(torch.uint8),  # 0..5 and 255; read back with .long()
        "loss_meta": meta.MultiSegmentationLoss(diceloss_weight=0.0, celoss_weight=1.0)(resized, labels).reshape(1),
        "loss_meta_non_ignore": meta.CrossEntropyLoss(avg_non_ignore=True)(resized, labels).reshape(1),
        "loss_meta_all_ignored": meta.CrossEntropyLoss()(resized, torch.full_like(labels, 255)).reshape(1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_arrays(out, OUT / "seg_loss.npz")
    print({k: float(v) for k, v in out.items() if k.startswith("loss")}, "->", OUT)


if __name__ == "__main__":
    main()
