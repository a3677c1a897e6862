"""Box re-parameterisation of Plain-DETR: boxes in absolute pixels, predictions as deltas to a reference box.

A prediction ``(dx, dy, dw, dh)`` moves the reference centre by ``(dx w, dy h)`` and scales its size by
``exp(dw), exp(dh)`` (Faster R-CNN's parameterisation, as in mmdet's ``delta2bbox``); the L1 loss and the L1
matching cost compare deltas, not coordinates. Boxes are ``cxcywh`` in input pixels unless named ``xyxy``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# |log| of the smallest width/height ratio a delta may apply (mmdet's wh_ratio_clip = 16 / 1000)
MAX_LOG_SCALE = abs(math.log(16 / 1000))


def size_tensor(values, like: Tensor) -> Tensor:
    """``(len(values),)`` float tensor of sizes on ``like``'s device; sizes traced as ``SymInt`` (ONNX export) stay
    symbolic instead of being fixed to the example's value."""
    return torch.stack([torch.scalar_tensor(v, dtype=torch.float32, device=like.device) for v in values])


def apply_deltas(reference: Tensor, deltas: Tensor, max_size: tuple[float, float] | Tensor | None = None) -> Tensor:
    """Boxes from reference boxes and deltas.

    Args:
        reference: ``(..., 4)`` cxcywh pixels.
        deltas: ``(..., 4)`` ``(dx, dy, dw, dh)``; ``dw, dh`` are clamped to ``+-MAX_LOG_SCALE``.
        max_size: ``(H, W)``: clip the result to the image; or a tensor of ``(W, H, W, H)`` limits broadcast to the
            boxes (one image size per image of a padded batch: ``(B, 1, 4)``); ``None``: no clipping.

    Returns:
        ``(..., 4)`` xyxy pixels.
    """
    centre = reference[..., :2] + reference[..., 2:] * deltas[..., :2]
    size = reference[..., 2:] * deltas[..., 2:].clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp()
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    if max_size is None:
        return boxes
    if isinstance(max_size, Tensor):
        limit = max_size
    else:
        limit = size_tensor((max_size[1], max_size[0], max_size[1], max_size[0]), boxes)
    return torch.minimum(boxes.clamp(min=0), limit)


def box_deltas(reference: Tensor, targets: Tensor, all_pairs: bool = False, eps: float = 0.1) -> Tensor:
    """Deltas that move ``reference`` onto ``targets`` (the inverse of :func:`apply_deltas` up to ``eps``).

    ``dx = (tx - rx) / (rw + eps)``, ``dw = log(tw / (rw + eps))``; ``eps`` (pixels) keeps degenerate references
    finite, as in Plain-DETR.

    Args:
        reference, targets: cxcywh pixels, ``(N, 4)`` each (pairs), or ``(Q, 4)`` and ``(N, 4)`` with ``all_pairs``.

    Returns:
        ``(N, 4)``, or ``(Q, N, 4)`` with ``all_pairs``.
    """
    if all_pairs:
        reference, targets = reference[:, None], targets[None]
    reference, targets = reference.float(), targets.float()
    ref_size = reference[..., 2:] + eps
    return torch.cat([(targets[..., :2] - reference[..., :2]) / ref_size, torch.log(targets[..., 2:] / ref_size)], -1)
