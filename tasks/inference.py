"""Dense inference over whole images or a batched sliding window.

``fn`` is any callable mapping a batch ``(N, 3, h, w)`` to dense outputs ``(N, C, h, w)`` (class scores
or depth). The sliding window follows mmseg's grid: windows of ``crop`` every ``stride``, the last one
shifted back inside the image, outputs summed and divided by the per-pixel window count. Unlike mmseg's
and Meta's loops, crops of all windows and all images are stacked and run ``batch_size`` at a time.

Images smaller than the crop (``small_image``): ``pad`` (ours) zero-pads them bottom/right up to the crop and
cuts the padding from the output; ``shrink`` (Meta's and mmseg's) never pads: a window side longer than the
image side is cut to it, and when both sides are smaller the window becomes the square of the shorter side
(which then slides along the longer side).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

DenseFn = Callable[[torch.Tensor], torch.Tensor]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis: ``ceil((L - crop) / stride) + 1`` windows, the last ending at ``L``."""
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


SMALL_IMAGE = ("pad", "shrink")


def window_size(height: int, width: int, crop: tuple[int, int], small_image: str = "pad") -> tuple[int, int]:
    """The ``(h, w)`` window used on an ``height x width`` image for a nominal ``crop``.

    ``pad``: always ``crop`` (the image is padded up to it). ``shrink`` (Meta's ``slide_inference``): when both
    sides are smaller than the crop, the square of the shorter side; otherwise each side cut to the image's.
    """
    if small_image not in SMALL_IMAGE:
        raise ValueError(f"small_image must be one of {', '.join(SMALL_IMAGE)}, got {small_image!r}")
    crop_h, crop_w = crop
    if small_image == "pad":
        return crop_h, crop_w
    if crop_h > height and crop_w > width:
        side = min(height, width)
        return side, side
    return min(crop_h, height), min(crop_w, width)


def slide_inference(fn: DenseFn, images: list[torch.Tensor], crop: int | tuple[int, int],
                    stride: int | tuple[int, int], batch_size: int = 8, out_device: torch.device | str | None = None
                    ) -> list[torch.Tensor]:
    """Run ``fn`` over sliding windows of each image and stitch the averaged outputs.

    Args:
        images: ``(3, H_i, W_i)`` tensors, sizes may differ. An image smaller than the crop is padded
            bottom/right with zeros up to the crop and the padding is cut from its output.
        crop, stride: window size and step, an int or ``(h, w)``.
        batch_size: crops per call of ``fn``.
        out_device: where the sums and counts live (``"cpu"`` keeps accelerator memory bounded on huge
            images); default: the device of ``fn``'s outputs.

    Returns:
        One ``(C, H_i, W_i)`` tensor per image: the mean of the overlapping window outputs.
    """
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else tuple(stride)
    padded, windows = [], []
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        padded.append(F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image)
        windows += [(index, y, x) for y in window_starts(height + pad_h, crop_h, stride_h)
                    for x in window_starts(width + pad_w, crop_w, stride_w)]

    sums: list[torch.Tensor | None] = [None] * len(images)
    counts: list[torch.Tensor | None] = [None] * len(images)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = torch.stack([padded[i][:, y:y + crop_h, x:x + crop_w] for i, y, x in chunk])
        outputs = fn(crops)
        device = out_device or outputs.device
        outputs = outputs.to(device)
        for (i, y, x), output in zip(chunk, outputs):
            if sums[i] is None:
                size = padded[i].shape[-2:]
                sums[i] = torch.zeros(output.shape[0], *size, dtype=output.dtype, device=device)
                counts[i] = torch.zeros(1, *size, dtype=output.dtype, device=device)
            sums[i][:, y:y + crop_h, x:x + crop_w] += output
            counts[i][:, y:y + crop_h, x:x + crop_w] += 1
    return [(total / count)[:, :image.shape[-2], :image.shape[-1]]
            for total, count, image in zip(sums, counts, images)]


def dense_inference(fn: DenseFn, images: list[torch.Tensor], mode: str, crop: int | tuple[int, int] = 512,
                    stride: int | tuple[int, int] = 341, batch_size: int = 8,
                    out_device: torch.device | str | None = None, small_image: str = "pad") -> list[torch.Tensor]:
    """``mode="slide"``: :func:`slide_inference`; ``mode="whole"``: :func:`whole_inference`.

    ``small_image`` (slide): ``pad`` or ``shrink`` images smaller than the crop (see :func:`window_size`); with
    ``shrink``, images are grouped by their window size and each group is slid with its own window.
    """
    if mode == "slide":
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(window_size(*image.shape[-2:], crop, small_image), []).append(index)
        results: list[torch.Tensor | None] = [None] * len(images)
        for window, indices in groups.items():
            outputs = slide_inference(fn, [images[i] for i in indices], window, stride, batch_size, out_device)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results
    if mode == "whole":
        return whole_inference(fn, images, batch_size)
    raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")


def whole_inference(fn: DenseFn, images: list[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Run ``fn`` on each whole image (same-size images batched together); one ``(C, H_i, W_i)`` per image."""
    results: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            outputs = fn(torch.stack([images[i] for i in chunk]))
            for i, output in zip(chunk, outputs):
                results[i] = output
    return results
