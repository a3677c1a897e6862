"""Write the depth fixtures of ``tests/test_dpt_meta.py`` from Meta's dinov3 code (seeded weights, fixed seeds).

No weight file is committed: every head below is filled with the seeded values of a manifest
(``tests/seeded_weights.py``: key, shape, dtype and a seed per file), and the manifest is committed instead; the
tests rebuild the same state dict from it and ``torch.save`` it into a temporary ``.pth`` in the layout of Meta's
released file, which then goes through our converters. What is written to ``tests/fixtures/meta/depth/``:

- ``dpt_vits16.manifest.json``: a DPT decoder state dict in the layout of Meta's released depther file
  (``dinov3_vit7b16_dd``: flat ``DPTHead`` keys, BatchNorm, bias-free residual convs, post-fusion conv), built by
  Meta's ``build_depther`` on a random ViT-S/16 (layers 2, 5, 8, 11, backbone norm on), small widths (channels 32,
  post [24, 48, 96, 96]), 256 bins over [0.001, 100] m; BatchNorm statistics and affine parameters seeded.
- ``dpt_vits16.npz``: per input size (64x64 batch 2, 48x80, and 40x72 which Meta centre-pads to 48x80):
  the image, Meta's centre-padded image, the encoder output (4 patch maps + class tokens), every 32nd of the decoder's
  logits (not at 40x72) and Meta's depth (``FeaturesToDepth``), all in float32 without autocast.
- ``chmv2.manifest.json`` / ``chmv2.npz``: the CHMv2 head layout (readout ``project``, biased residual
  convs, hidden 128, no post-fusion conv, mixlog bins over [0.001, 96]) on random 64-channel features.
- ``linear.manifest.json`` / ``linear.npz``: Meta's linear depth head (``LinearHead``: BatchNorm + 1x1 conv
  to 256 bins, no class token; its state dict keys) and its depth over [0.001, 10] m on a random 384-channel 3x5 map.
- ``losses_metrics.npz``: Meta's ``SigLoss`` (warm-up of 3 calls) over 5 calls; Meta's depth metrics per
  image (``calculate_depth_metrics`` with the NYU Eigen mask at 60x80, ground truth >= max dropped, with and
  without least-squares alignment); Meta's ``WarmupOneCycleLR`` learning rate and beta1 over 60 steps.

Rerun (about 10 s; needs Meta's repository, github:facebookresearch/dinov3 at commit 6876159)::

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3 && git -C /tmp/dinov3 checkout 6876159
    pip install omegaconf termcolor   # imported by Meta's modules
    OMP_NUM_THREADS=1 python tools/meta_fixtures/depth.py --meta-repo /tmp/dinov3

(``DINOV3_REPO`` sets the default of ``--meta-repo``.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # seeded_weights, reference_arrays
from reference_arrays import save_arrays  # noqa: E402
OUT = ROOT / "tests" / "fixtures" / "meta" / "depth"
SIZES = {"64x64": (2, 64, 64), "48x80": (1, 48, 80), "40x72": (1, 40, 72)}


def seed_weights(module: torch.nn.Module, seed: int, path: Path) -> None:
    """Fill ``module`` with the seeded values of its state dict and write their manifest to ``path``."""
    from seeded_weights import seeded_state_dict, write_manifest

    values, manifest = seeded_state_dict(module.state_dict(), seed)
    module.load_state_dict(values, strict=True)
    write_manifest(manifest, path)


def as_plain_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Meta builds ``SyncBatchNorm``; in eval mode on one process it computes what ``BatchNorm2d`` does."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            as_plain_batchnorm(child)
    return module


def dpt_fixture(out: Path) -> None:
    from dinov3.eval.depth.models import build_depther
    from dinov3.eval.depth.models.embed import CenterPadding
    from dinov3.hub.backbones import dinov3_vits16

    torch.manual_seed(0)
    backbone = dinov3_vits16(pretrained=False).eval()
    depther = build_depther(backbone, backbone_out_layers=[2, 5, 8, 11], n_output_channels=256,
                            use_backbone_norm=True, use_batchnorm=True, use_cls_token=False, head_type="dpt",
                            min_depth=0.001, max_depth=100.0, channels=32, post_process_channels=[24, 48, 96, 96])
    g = torch.Generator().manual_seed(1)
    decoder = as_plain_batchnorm(depther.decoder).eval()
    seed_weights(decoder, 1, out / "dpt_vits16.manifest.json")
    tensors = {}
    with torch.no_grad():
        for name, (b, h, w) in SIZES.items():
            image = torch.randn(b, 3, h, w, generator=g)
            outputs = depther.encoder(image)  # centre padding + get_intermediate_layers, float32 (no autocast)
            logits = decoder(outputs)
            depth = depther.features_to_depth(logits)
            tensors[f"{name}.image"] = image
            tensors[f"{name}.padded"] = CenterPadding(16)(image)
            for i, (patches, cls) in enumerate(outputs):
                tensors[f"{name}.map{i}"] = patches.contiguous()
                tensors[f"{name}.cls{i}"] = cls.contiguous()
            if name != "40x72":  # its test compares the depth only
                tensors[f"{name}.logits"] = logits[:, ::32].contiguous()  # every 32nd bin: keeps the file small
            tensors[f"{name}.depth"] = depth
    save_arrays(tensors, out / "dpt_vits16.npz")


def chmv2_fixture(out: Path) -> None:
    from dinov3.eval.depth.models import FeaturesToDepth
    from dinov3.eval.depth.models.dpt_head import DPTHead

    torch.manual_seed(2)
    head = DPTHead(in_channels=[64] * 4, channels=32, post_process_channels=[16, 32, 64, 64], readout_type="project",
                   n_output_channels=64, n_hidden_channels=128, use_batchnorm=False, use_bias=True,
                   projection_after_fusion=False).eval()
    to_depth = FeaturesToDepth(0.001, 96.0, bins_strategy="chmv2_mixlog", norm_strategy="chmv2_mixlog")
    seed_weights(head, 2, out / "chmv2.manifest.json")
    g = torch.Generator().manual_seed(3)
    tensors = {}
    with torch.no_grad():
        inputs = [(torch.randn(1, 64, 3, 5, generator=g), torch.randn(1, 64, generator=g)) for _ in range(4)]
        logits = head(inputs)
        for i, (patches, cls) in enumerate(inputs):
            tensors[f"map{i}"], tensors[f"cls{i}"] = patches, cls
        tensors["logits"], tensors["depth"] = logits[:, ::8].contiguous(), to_depth(logits)
    save_arrays(tensors, out / "chmv2.npz")


def linear_fixture(out: Path) -> None:
    from dinov3.eval.depth.models import FeaturesToDepth
    from dinov3.eval.depth.models.linear_head import LinearHead

    torch.manual_seed(5)
    head = as_plain_batchnorm(LinearHead(in_channels=[384], n_output_channels=256, use_batchnorm=True,
                                         use_cls_token=False)).eval()
    g = torch.Generator().manual_seed(6)
    seed_weights(head, 5, out / "linear.manifest.json")
    with torch.no_grad():
        patches, cls = torch.randn(2, 384, 3, 5, generator=g), torch.randn(2, 384, generator=g)
        logits = head([(patches, cls)])
    to_depth = FeaturesToDepth(0.001, 10.0)
    tensors = {"map": patches, "cls": cls, "logits": logits, "depth": to_depth(logits)}
    save_arrays(tensors, out / "linear.npz")


def losses_metrics_fixture(out: Path) -> None:
    from dinov3.eval.depth.datasets.datasets_utils import _EvalCropType, make_valid_mask
    from dinov3.eval.depth.loss import SigLoss
    from dinov3.eval.depth.metrics import DEPTH_METRICS, calculate_depth_metrics
    from dinov3.eval.depth.schedulers import WarmupOneCycleLR
    from dinov3.eval.depth.utils import align_depth_least_square

    g = torch.Generator().manual_seed(4)
    tensors = {}
    # SiLog: 5 calls on one batch, warm-up of 3 calls (Meta's default is 100)
    pred = torch.rand(2, 1, 12, 16, generator=g) * 5 + 0.2
    gt = torch.rand(2, 1, 12, 16, generator=g) * 5 + 0.2
    mask = torch.rand(2, 1, 12, 16, generator=g) > 0.3
    loss = SigLoss(warm_up=True, warm_iter=3)
    tensors.update({"silog.pred": pred, "silog.gt": gt, "silog.mask": mask.to(torch.uint8),
                    "silog.values": torch.stack([loss(pred, gt, mask) for _ in range(5)])})
    # Metrics: 3 images at 60x80 in metres; some pixels invalid (0), some exactly at / above max depth (10)
    lo, hi = 0.001, 10.0
    gt = torch.rand(3, 1, 60, 80, generator=g) * 11
    gt[gt < 0.5] = 0.0
    gt[:, :, ::7, ::5] = hi
    pred = (gt + torch.randn(3, 1, 60, 80, generator=g) * 0.5).abs() + 0.05
    tensors.update({"metrics.gt": gt.clone(), "metrics.pred": pred})
    names = [m.name for m in DEPTH_METRICS]
    for align in (False, True):
        rows = []
        for p, t in zip(pred, gt):
            p, t = p[None], t[None]
            t = torch.where((t >= hi) | (t <= lo), torch.zeros_like(t), t)
            valid = make_valid_mask(t, eval_crop=_EvalCropType.NYU_EIGEN, ignored_value=0.0)
            if align:
                p = align_depth_least_square(t, p, valid)[0]
            p = p.clamp(lo, hi)
            values = calculate_depth_metrics(t, p, valid)
            rows.append(torch.tensor([float(getattr(values, n)) for n in names], dtype=torch.float64))
        tensors[f"metrics.{'least_squares' if align else 'none'}"] = torch.stack(rows)
    tensors["metrics.names"] = torch.tensor([ord(c) for c in ",".join(names)], dtype=torch.int32)
    # Meta's one-cycle schedule of config-nyu.yaml, shortened: 60 steps with 20 warm-up steps
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 3e-4, "betas": (0.9, 0.99), "weight_decay": 1e-4}])
    scheduler = WarmupOneCycleLR(optimizer, total_steps=60, warmup_iters=20, final_div_factor=1000.0,
                                 base_momentum=0.85, max_momentum=0.95, max_lr=3e-4)
    lrs, betas = [], []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    tensors["schedule.lr"] = torch.tensor(lrs, dtype=torch.float64)
    tensors["schedule.beta1"] = torch.tensor(betas, dtype=torch.float64)
    save_arrays(tensors, out / "losses_metrics.npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta-repo", default=os.environ.get("DINOV3_REPO"), help="Meta's dinov3 checkout")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if not args.meta_repo or not Path(args.meta_repo, "dinov3").is_dir():
        sys.exit(f"--meta-repo must point at a dinov3 checkout (got {args.meta_repo!r})")
    sys.path.insert(0, str(Path(args.meta_repo).resolve()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dpt_fixture(out)
    chmv2_fixture(out)
    linear_fixture(out)
    losses_metrics_fixture(out)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
