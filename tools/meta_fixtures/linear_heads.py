"""Fixtures from Meta's code for the linear heads, the sliding window and the TTA averaging.

Runs Meta's own modules (facebookresearch/dinov3, commit 6876159) on seeded weights and writes
``tests/fixtures/meta/linear/``. No weight file is committed: each head is filled with the seeded values of a
manifest (``tests/seeded_weights.py``: key, shape, dtype and a seed), and the tests rebuild the same state dict from
it and ``torch.save`` it into a temporary file in the layout of Meta's released file before converting it.

- ``classifier_head.manifest.json``: Meta's classifier head file (``nn.Linear(2 * 384, 10)`` state dict, saved flat
  as ``classifier_head.pth``), and in ``linear.npz`` a 64x64 image, the ``x_norm_clstoken`` /
  ``x_norm_patchtokens`` of a random ViT-S/16 (``dinov3_vits16(pretrained=False)``) and the logits of Meta's hub
  wrapper (``_LinearClassifierWrapper``).
- ``model_final.manifest.json``: what Meta's linear segmentation training saves as ``model_final.pth`` (``{"model":
  segmentation_model.1.* of a ``FeatureDecoder``, "optimizer"}``; the manifest's ``file`` entry names the
  ``"model"`` wrapper and holds the optimizer's state dict) for a ``LinearHead`` over 64 channels, 6 classes,
  seeded BatchNorm statistics. The ``FeatureDecoder``'s backbone is a toy (``toy_backbone.manifest.json``): a
  stride-4 4x4 conv plus the mean of its output over the window, so a window's output depends on the whole window
  as a ViT's does.
- Meta's ``LinearHead.predict`` on toy features; Meta's ``slide_inference`` (window 64, stride 43) on a 52x76 image
  (window shrunk to 52x52), a 52x150 image (window cut to 52x64) and a 90x130 image (larger than the window);
  Meta's TTA (``make_segmentation_eval_transforms`` views: short side 64 x 0.9..1.1, sides below 64 rounded up to
  32, + flips; ``make_inference`` slide 72 / 48 with softmax; averaged as in ``evaluate_segmentation_model``) on a
  40x60 image: the views and the averaged probabilities. Meta's mirrored views are its plain views flipped
  (checked here, exactly), so only the plain ones are stored.

Rerun (about 10 s on a CPU)::

    # fetch github:facebookresearch/dinov3 at commit 6876159, e.g. git clone + git checkout 6876159
    pip install pandas omegaconf termcolor   # imported by Meta's modules
    OMP_NUM_THREADS=1 DINOV3_REPO=/path/to/dinov3 python tools/meta_fixtures/linear_heads.py [--out tests/fixtures/meta/linear]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # seeded_weights, reference_arrays
from reference_arrays import save_arrays  # noqa: E402
SEED = 0
CHANNELS, CLASSES = 64, 6
SLIDE_CASES = {"small": ((52, 76), 64, 43), "one_side": ((52, 150), 64, 43), "large": ((90, 130), 64, 43)}
TTA_IMAGE, TTA_SHORT, TTA_RATIOS, TTA_CROP, TTA_STRIDE = (40, 60), 64, [0.9, 0.95, 1.0, 1.05, 1.1], 72, 48


class ToyBackbone(torch.nn.Module):
    """Stands in for ``ModelWithIntermediateLayers``: one ``(B, 64, H/4, W/4)`` map per image, in a tuple."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, CHANNELS, 4, stride=4)

    def forward(self, x):
        y = self.proj(x)
        return (y + y.mean((2, 3), keepdim=True),)


def smooth_image(generator: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
    """A random ``(3, H, W)`` image with some spatial structure (upsampled noise), values about N(0, 1)."""
    coarse = torch.randn(1, 3, size[0] // 8 + 2, size[1] // 8 + 2, generator=generator)
    return F.interpolate(coarse, size, mode="bilinear", align_corners=False)[0] + 0.2 * torch.randn(
        3, *size, generator=generator)


def seed_weights(module: torch.nn.Module, seed: int, path: Path, prefix: str = "", file: dict | None = None) -> None:
    """Fill ``module`` with seeded values and write their manifest (keys under ``prefix``, the file's layout)."""
    from seeded_weights import seeded_state_dict, write_manifest

    values, manifest = seeded_state_dict({prefix + k: v for k, v in module.state_dict().items()}, seed)
    module.load_state_dict({k.removeprefix(prefix): v for k, v in values.items()}, strict=True)
    if file is not None:
        manifest["file"] = file
    write_manifest(manifest, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-repo", default=os.environ.get("DINOV3_REPO"),
                        help="checkout of facebookresearch/dinov3")
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/meta/linear"))
    args = parser.parse_args()
    if not args.meta_repo or not (Path(args.meta_repo) / "dinov3").is_dir():
        sys.exit("pass --meta-repo PATH (or DINOV3_REPO) pointing at a checkout of facebookresearch/dinov3")
    sys.path.insert(0, str(Path(args.meta_repo).resolve()))
    from dinov3.eval.segmentation.inference import make_inference, slide_inference
    from dinov3.eval.segmentation.models import FeatureDecoder
    from dinov3.eval.segmentation.models.heads.linear_head import LinearHead
    from dinov3.eval.segmentation.transforms import make_segmentation_eval_transforms
    from dinov3.hub.backbones import dinov3_vits16
    from dinov3.hub.classifiers import _LinearClassifierWrapper

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"seed": SEED, "meta_commit": "6876159"}

    # ---------------------------------------------------------------- hub classifier on a random ViT-S/16
    backbone = dinov3_vits16(pretrained=False)
    backbone.init_weights()
    backbone.eval()
    head = torch.nn.Linear(2 * backbone.embed_dim, 10)
    seed_weights(head, 1, out / "classifier_head.manifest.json")
    classifier = _LinearClassifierWrapper(backbone=backbone, linear_head=head).eval()
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        tokens = backbone.forward_features(image)
        logits = classifier(image)
    tensors.update({"cls_image": image, "cls_token": tokens["x_norm_clstoken"].clone(),
                    "patch_tokens": tokens["x_norm_patchtokens"].clone(), "cls_logits": logits.clone()})

    # ----------------------------------------------------- linear segmentation head, saved as train.py does
    toy = ToyBackbone()
    linear = LinearHead(in_channels=[CHANNELS], n_output_channels=CLASSES, dropout=0.1)
    linear.batchnorm_layer = torch.nn.BatchNorm2d(CHANNELS)  # SyncBatchNorm needs a process group; same keys
    model = FeatureDecoder(torch.nn.ModuleList([toy, linear]), autocast_ctx=partial(torch.autocast, "cpu",
                                                                                     enabled=False)).eval()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-3)
    seed_weights(linear, 2, out / "model_final.manifest.json", prefix="segmentation_model.1.",
                 file={"state_under": "model", "with": {"optimizer": optimizer.state_dict()}})
    seed_weights(toy, 3, out / "toy_backbone.manifest.json")

    features = torch.randn(2, CHANNELS, 5, 7, generator=generator)
    with torch.inference_mode():
        tensors["seg_features"] = features
        tensors["seg_predict"] = linear.predict([features], rescale_to=(20, 28)).clone()

    # -------------------------------------------------------------------------------- sliding window
    info["slide"] = {}
    for name, (size, crop, stride) in SLIDE_CASES.items():
        image = smooth_image(generator, size)[None]
        with torch.inference_mode():
            logits = slide_inference(image, model, "linear", n_output_channels=CLASSES, crop_size=(crop, crop),
                                     stride=(stride, stride))
        tensors[f"slide_{name}_image"], tensors[f"slide_{name}_logits"] = image[0], logits[0].clone()
        info["slide"][name] = {"size": list(size), "crop": crop, "stride": stride}

    # ------------------------------------------------------------------------------------------ TTA
    array = (torch.rand(*TTA_IMAGE, 3, generator=generator) * 255).round().to(torch.uint8).numpy()
    picture, label = Image.fromarray(array), Image.fromarray(np.zeros(TTA_IMAGE, dtype=np.uint8))
    transform = make_segmentation_eval_transforms(img_size=TTA_SHORT, inference_mode="slide", use_tta=True,
                                                  tta_ratios=TTA_RATIOS)
    views, _ = transform(picture, label)
    total = torch.zeros(1, CLASSES, *TTA_IMAGE)
    with torch.inference_mode():
        for index, view in enumerate(views):  # evaluate_segmentation_model's loop
            total += make_inference(view[None].float(), model, inference_mode="slide", decoder_head_type="linear",
                                    rescale_to=TTA_IMAGE, n_output_channels=CLASSES,
                                    crop_size=(TTA_CROP, TTA_CROP), stride=(TTA_STRIDE, TTA_STRIDE),
                                    apply_horizontal_flip=(index and index >= len(views) / 2),
                                    output_activation=partial(F.softmax, dim=1))
    tensors["tta_image"] = torch.from_numpy(array.copy())
    tensors["tta_probs"] = (total / len(views))[0]
    plain = len(TTA_RATIOS)
    for index, view in enumerate(views[:plain]):
        if not torch.equal(views[index + plain], view.flip(-1)):
            sys.exit(f"Meta's view {index + plain} is not view {index} mirrored: store every view")
        tensors[f"tta_view{index}"] = view.float()
    info["tta"] = {"image_size": list(TTA_IMAGE), "short_side": TTA_SHORT, "ratios": TTA_RATIOS, "crop": TTA_CROP,
                   "stride": TTA_STRIDE, "view_sizes": [list(v.shape[-2:]) for v in views],
                   "view_order": "all ratios, then their mirrors (stored: the plain views)"}

    save_arrays(tensors, out / "linear.npz")
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in sorted(out.iterdir())))


if __name__ == "__main__":
    main()
