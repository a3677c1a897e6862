"""Head-only export of a training checkpoint: ``head.safetensors`` + the resolved ``config.yaml`` (+ ONNX).

The folder rebuilds the model without training code through ``tasks.load_predictor(folder)``:
``build_backbone(**config["backbone"])`` (weights re-read from ``backbone.weights``), the head from
``config["head"]`` (``_target_`` + arguments) and the tensors loaded strictly. A backbone that training
changed (``freeze`` other than ``frozen``) or that has no weights source (random init) also gets
``backbone.safetensors``: only the trained tensors, or all of them for a random-init backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from .loading import load_predictor
from .outputs import claim_output_folder, record_files, written_files
from .predictor import BACKBONE_FILE, CONFIG_FILE, EXPORT_FORMAT, HEAD_FILE, DenseModel, Predictor

ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-3
# Sides of the ONNX export's example input, in multiples of the backbone's ``pad_to`` (x ``windows``): every map
# of stride up to 4 pad_to (Plain-DETR's 64-px proposals) has at least 2 x 3 cells. torch.export fixes a size that
# is 1 in the example to 1, so a 1-cell map in the example breaks (or silently changes) the graph at other sizes.
EXAMPLE_BLOCKS = (8, 12)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def backbone_tensors(predictor: Predictor) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone tensors an export must carry, and why: all of a random-init backbone, the trained
    ones of a fine-tuned backbone with a weights source, none of a frozen backbone with a weights source."""
    backbone = predictor.model.backbone
    cfg = predictor.config["backbone"]
    if not cfg.get("weights"):
        return _tensors(backbone.state_dict()), "all: random-init backbone (weights: null), nothing to re-read"
    if cfg.get("freeze", "frozen") == "frozen":
        return {}, "none: frozen backbone, re-read from backbone.weights"
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    state = {k: v for k, v in backbone.state_dict().items() if k in trained}
    return _tensors(state), f"trained: the {len(state)} tensors freeze={cfg['freeze']} trained; the rest from backbone.weights"


def _weights_source(weights):
    """A local weights path made absolute so the export folder can move; tags / hub ids unchanged."""
    if weights and Path(str(weights)).expanduser().exists():
        return str(Path(str(weights)).expanduser().resolve())
    return weights


def export_predictor(predictor: Predictor, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``head.safetensors``, maybe ``backbone.safetensors``, and ``config.yaml`` into ``out``; returns the config.

    ``out`` must be new, empty or an earlier export (``overwrite=True``: any folder; see ``tasks.outputs``). Files
    of an earlier export that would no longer fit (its ``backbone.safetensors``, its ONNX model) are removed; no
    other file is.
    """
    out = claim_output_folder(out, "export", overwrite)
    earlier = written_files(out, "export")
    for stale in earlier & {ONNX_FILE, f"{ONNX_FILE}.data"}:
        (out / stale).unlink(missing_ok=True)
    cfg = predictor.config
    save_file(_tensors(predictor.model.head.state_dict()), str(out / HEAD_FILE), metadata={"format": "pt"})
    backbone_state, reason = backbone_tensors(predictor)
    if backbone_state:
        save_file(backbone_state, str(out / BACKBONE_FILE), metadata={"format": "pt"})
    elif BACKBONE_FILE in earlier:
        (out / BACKBONE_FILE).unlink(missing_ok=True)
    config = {
        "format": EXPORT_FORMAT,
        "task": dict(cfg["task"]),
        "backbone": dict(cfg["backbone"], weights=_weights_source(cfg["backbone"].get("weights"))),
        "head": dict(cfg["head"]),
        "num_classes": cfg.get("num_classes"),
        "class_names": list(cfg["class_names"]) if cfg.get("class_names") else None,
        "normalize": {"mean": list(predictor.mean), "std": list(predictor.std)},
        "eval": dict(predictor.eval_settings),
        "features": dict(cfg["features"]),
        "files": {"head": HEAD_FILE, "backbone": BACKBONE_FILE if backbone_state else None},
        "backbone_tensors": reason,
    }
    text = ("# Written by export.py: rebuild with `tasks.load_predictor(this folder)`.\n"
            "# backbone: build_backbone(**backbone); head: instantiate(head) (in_channels/strides/num_classes included).\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    (out / CONFIG_FILE).write_text(text)
    record_files(out, "export", [HEAD_FILE, CONFIG_FILE, *([BACKBONE_FILE] if backbone_state else [])])
    return config


def max_abs_diff(a, b) -> float:
    """Largest difference between two predictions (tensors, or lists of detection dicts)."""
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return max((max_abs_diff(x[k], y[k]) for x, y in zip(a, b) for k in x), default=0.0)


def verify_export(predictor: Predictor, folder: str | Path, size: tuple[int, int] = (80, 112)) -> float:
    """Rebuild from ``folder`` and compare the raw outputs with ``predictor`` on a random image; the max abs diff."""
    rebuilt = load_predictor(folder)
    torch.manual_seed(0)
    images = torch.randn(1, 3, *size)
    with torch.inference_mode():
        return max_abs_diff(predictor.model.cpu()(images), rebuilt.model(images))


DETECTION_OUTPUTS = ["boxes", "scores", "labels", "logits", "pred_boxes"]
ONNX_OUTPUTS = {  # described in config.yaml
    "segmentation": "dense (B, K, H, W) class scores (logits, or Mask2Former's non-negative scores)",
    "depth": "dense (B, 1, H, W) depth in metres",
    "classification": "dense (B, K) logits",
    "detection": "boxes (B, k, 4) xyxy input pixels, scores (B, k), labels (B, k) (top-k); logits (B, Q, K) and "
                 "pred_boxes (B, Q, 4) normalised cxcywh (raw, before the top-k)",
}


class _DetectionOutputs(nn.Module):
    """Detection as batch tensors for ONNX.

    ``boxes (B, k, 4)`` xyxy input pixels clipped to the input, ``scores (B, k)``, ``labels (B, k)`` (the head's
    top-k), and the raw ``logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` (normalised cxcywh) they come from; a
    head whose ``pred_boxes`` are input pixels (``pixel_boxes = True``: Plain-DETR) has them divided by the padded
    input size. The steps of ``DenseModel.forward`` (pad, backbone, head, predict, clip) without its per-image
    list: a Python loop over the batch and ``torch.tensor`` of the input size would freeze both in the exported
    graph. Heads without ``predict_batched`` fall back to stacking ``predict``'s list (batch size then fixed; the
    check says so).
    """

    def __init__(self, model: DenseModel):
        super().__init__()
        self.model = model

    def forward(self, images):
        model = self.model
        height, width = images.shape[-2:]
        features = model.backbone(images)  # pads bottom/right to the backbone stride
        outputs = model.head(features, features.padded_size)
        if hasattr(model.head, "predict_batched"):
            boxes, scores, labels = model.head.predict_batched(outputs, features.padded_size)
        else:
            predictions = model.head.predict(outputs, features.padded_size)
            boxes, scores, labels = (torch.stack([p[key] for p in predictions]) for key in ("boxes", "scores", "labels"))
        limit = torch.stack([torch.scalar_tensor(v, dtype=boxes.dtype, device=boxes.device)
                             for v in (width, height, width, height)])
        raw = outputs["pred_boxes"].float()
        if getattr(model.head, "pixel_boxes", False):
            padded_h, padded_w = features.padded_size
            raw = raw / torch.stack([torch.scalar_tensor(v, dtype=raw.dtype, device=raw.device)
                                     for v in (padded_w, padded_h, padded_w, padded_h)])
        return torch.minimum(boxes.clamp(min=0), limit), scores, labels, outputs["pred_logits"].float(), raw


def _detection_diff(outputs: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float, size: int) -> float:
    """Max abs diff of ``DETECTION_OUTPUTS``, boxes divided by ``size`` (the input's longer side).

    Top-k entries whose scores tie within ``tolerance`` may legitimately come in another order, and at the cut-off
    another of the tied entries may be kept. When the entries differ by position, every ONNX detection must then
    equal (label, and box and score within ``tolerance``) a PyTorch detection of the same image, or score within
    ``tolerance`` of PyTorch's last kept score (at most as many such as PyTorch keeps there), and the diff is that
    of the scores and the raw outputs (``logits``, ``pred_boxes``: normalised), which the top-k is taken from.
    """
    boxes, scores, labels, logits, raw = outputs
    ref_boxes, ref_scores, ref_labels, ref_logits, ref_raw = reference
    boxes, ref_boxes = boxes / size, ref_boxes / size
    dense = max(max_abs_diff(scores, ref_scores), max_abs_diff(logits, ref_logits), max_abs_diff(raw, ref_raw))
    positional = max(dense, max_abs_diff(boxes, ref_boxes), max_abs_diff(labels, ref_labels))
    if positional <= tolerance or dense > tolerance or not scores.shape[-1]:
        return positional
    for b in range(boxes.shape[0]):
        same = ((labels[b][:, None] == ref_labels[b][None]) & ((scores[b][:, None] - ref_scores[b][None]).abs() <= tolerance)
                & ((boxes[b][:, None] - ref_boxes[b][None]).abs().amax(-1) <= tolerance))
        unmatched = ~same.any(1)
        last = ref_scores[b][-1]
        at_cut = int(((ref_scores[b] - last).abs() <= tolerance).sum())
        if not bool(((scores[b][unmatched] - last).abs() <= tolerance).all()) or int(unmatched.sum()) > at_cut:
            return positional
    return dense


def export_onnx(predictor: Predictor, path: str | Path, example_size: tuple[int, int] | None = None,
                check_size: tuple[int, int] | None = None, tolerance: float = ONNX_TOLERANCE) -> float:
    """Export backbone + head (the dense output, or boxes/scores/labels + raw outputs for detection) to ONNX and check it.

    Batch, height and width are dynamic; height and width must be multiples of the backbone's ``pad_to``
    (16 for ViTs, 32 for ConvNeXt: pad bottom/right, as ``Predictor`` does). The ONNX model is run with
    onnxruntime at another batch size and another size than the one exported and compared with PyTorch (the
    example is ``EXAMPLE_BLOCKS`` x ``pad_to`` x ``windows`` per side: no map of one cell). Detection outputs:
    ``boxes (B, k, 4)`` xyxy pixels, ``scores (B, k)``, ``labels (B, k)``, ``logits (B, Q, K)``,
    ``pred_boxes (B, Q, 4)`` normalised cxcywh; boxes are compared in units of the image size, and top-k entries
    whose scores tie within ``tolerance`` may come in another order or be swapped at the top-k cut-off (see
    ``_detection_diff``).

    Returns:
        the max abs difference; raises ``RuntimeError`` when it exceeds ``tolerance`` or the export fails.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeError("ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[onnx]'") from err

    model = predictor.model.cpu().eval()
    multiple = int(model.backbone.pad_to)
    detection = predictor.kind == "detection"
    module = (_DetectionOutputs(model) if detection else model).eval()
    names = DETECTION_OUTPUTS if detection else ["dense"]
    grid = max(1, int(getattr(model.backbone, "windows", 0)))  # windowed features: whole patches in every window
    example_size = example_size or tuple(n * grid * multiple for n in EXAMPLE_BLOCKS)
    check_size = check_size or (7 * multiple, 5 * multiple)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = multiple * torch.export.Dim("height_blocks", min=1, max=8192 // multiple)
    width = multiple * torch.export.Dim("width_blocks", min=1, max=8192 // multiple)
    torch.manual_seed(0)
    example = torch.randn(2, 3, *example_size)
    path = Path(path)
    head = type(model.head).__name__
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")  # one harmless warning per Split
    level = folding_log.level
    try:
        folding_log.setLevel(logging.ERROR)
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["images"],
                              output_names=names, dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
                              verbose=False)
    except Exception as err:
        raise RuntimeError(f"ONNX export of {predictor.kind} head {head} failed "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "the PyTorch export folder is still usable") from err
    finally:
        folding_log.setLevel(level)
    images = torch.randn(3, 3, *check_size)
    with torch.inference_mode():
        reference = module(images)
    reference = list(reference) if isinstance(reference, tuple) else [reference]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"images": images.numpy()})
    except Exception as err:
        raise RuntimeError(f"the ONNX model of {head} ({path}) was exported but does not run on input "
                           f"{tuple(images.shape)} (other than the example {tuple(example.shape)}): "
                           f"{' '.join(str(err).split())[:300]}") from err
    for name, output, expected in zip(names, outputs, reference):
        if tuple(output.shape) != tuple(expected.shape):
            raise RuntimeError(f"the ONNX model of {head} ({path}) gives '{name}' of shape {tuple(output.shape)} "
                               f"instead of {tuple(expected.shape)} on input {tuple(images.shape)}: the export "
                               f"fixed a size of the example {tuple(example.shape)}; not usable with dynamic shapes")
    outputs = [torch.from_numpy(o) for o in outputs]
    if detection:
        diff = _detection_diff(outputs, reference, tolerance, max(check_size))
    else:
        diff = max(max_abs_diff(o, r) for o, r in zip(outputs, reference))
    if diff > tolerance:
        raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} > {tolerance:g} ({path})")
    return diff


def export_checkpoint(ckpt: str | Path, out: str | Path, onnx: bool = False, verify: bool = True,
                      backbone: str | None = None, backbone_weights: str | None = None, overwrite: bool = False) -> dict:
    """Export a ``train.py`` checkpoint (or a Meta head file on ``backbone``) to ``out``; returns
    ``{"config", "verify_diff", "onnx_diff"}``. ``out``: see ``export_predictor``."""
    predictor = load_predictor(ckpt, backbone=backbone, backbone_weights=backbone_weights)
    config = export_predictor(predictor, out, overwrite)
    report = {"config": config, "verify_diff": None, "onnx_diff": None}
    if verify:
        report["verify_diff"] = verify_export(predictor, out)
    if onnx:
        try:
            record_files(out, "export", [*written_files(out, "export"), ONNX_FILE, f"{ONNX_FILE}.data"])
            report["onnx_diff"] = export_onnx(predictor, Path(out) / ONNX_FILE)
        except RuntimeError:
            for stale in (Path(out) / ONNX_FILE, Path(out) / f"{ONNX_FILE}.data"):
                stale.unlink(missing_ok=True)  # never leave an ONNX file that failed its check
            raise
        config["onnx"] = {"file": ONNX_FILE, "input": "images (B, 3, H, W) normalized, H and W multiples of "
                          f"{config['features']['pad_to']}", "outputs": ONNX_OUTPUTS.get(config["task"]["kind"], "dense"),
                          "max_abs_diff_vs_pytorch": report["onnx_diff"]}
        text = (Path(out) / CONFIG_FILE).read_text()
        (Path(out) / CONFIG_FILE).write_text(text + yaml.safe_dump({"onnx": config["onnx"]}, sort_keys=False))
    return report
