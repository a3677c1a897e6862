"""Dense inference over whole images or a batched sliding window.

``fn`` is any callable mapping a batch ``(N, 3, h, w)`` to dense outputs ``(N, C, h, w)`` (class scores
or depth). The sliding window follows mmseg's grid: windows of ``crop`` every ``stride``, the last one
shifted back inside the image, outputs averaged per pixel. Unlike mmseg's and Meta's loops, crops of all
windows and all images are stacked and run ``batch_size`` at a time, and the average is built without a count
map or a final division (see :class:`WindowMean`). A head whose output is coarser than the image can be stitched
at its own resolution and upsampled once (``output_stride``).

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


def _leaves_gaps(length: int, crop: int, stride: int) -> bool:
    starts = window_starts(length, crop, stride)
    return any(b - a > crop for a, b in zip(starts, starts[1:]))


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
                    stride: int | tuple[int, int], batch_size: int = 8, out_device: torch.device | str | None = None,
                    output_stride: int = 1) -> list[torch.Tensor]:
    """Run ``fn`` over sliding windows of each image and stitch the averaged outputs.

    Args:
        images: ``(3, H_i, W_i)`` tensors, sizes may differ. An image smaller than the crop is padded
            bottom/right with zeros up to the crop and the padding is cut from its output.
        crop, stride: window size and step, an int or ``(h, w)``; a stride longer than the crop is refused where it
            would leave pixels that no window covers (two windows, the last shifted back to the end, leave none).
        batch_size: crops per call of ``fn``.
        out_device: where the sums live (``"cpu"`` keeps accelerator memory bounded on huge images);
            default: the device of ``fn``'s outputs.
        output_stride: ``1``: ``fn`` gives outputs at the crop's resolution, stitched at full resolution
            (mmseg's and Meta's way). ``s > 1``: ``fn`` gives outputs on a grid ``s`` times coarser
            (``(N, C, ceil(h/s), ceil(w/s))``, a head's native resolution); each window is stitched on that grid
            at its start rounded to a multiple of ``s`` (the last window of a row or column at the image's
            end), and the averaged grid is upsampled once, bilinearly, to the image size.

    Returns:
        One ``(C, H_i, W_i)`` tensor per image: the mean of the overlapping window outputs.
    """
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else tuple(stride)
    gaps = [tuple(image.shape[-2:]) for image in images
            if _leaves_gaps(image.shape[-2], crop_h, stride_h) or _leaves_gaps(image.shape[-1], crop_w, stride_w)]
    if gaps:
        raise ValueError(f"slide stride {(stride_h, stride_w)} exceeds the crop {(crop_h, crop_w)}: windows would leave "
                         f"gaps in images of size {gaps[0]}")
    padded, windows = [], []
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        padded.append(F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image)
        windows += [(index, y, x) for y in window_starts(height + pad_h, crop_h, stride_h)
                    for x in window_starts(width + pad_w, crop_w, stride_w)]

    canvases: list[WindowMean | None] = [None] * len(images)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = torch.stack([padded[i][:, y:y + crop_h, x:x + crop_w] for i, y, x in chunk])
        outputs = fn(crops)
        for (i, y, x), output in zip(chunk, outputs):
            if canvases[i] is None:
                ys = sorted({top for j, top, _ in windows if j == i})
                xs = sorted({left for j, _, left in windows if j == i})
                canvases[i] = WindowMean(tuple(padded[i].shape[-2:]), (crop_h, crop_w), ys, xs, output_stride)
            canvases[i].add(y, x, output.to(out_device or output.device))
    return [canvas.result()[:, :image.shape[-2], :image.shape[-1]] for canvas, image in zip(canvases, images)]


class WindowMean:
    """The per-pixel mean of window outputs on a ``size`` image, windows at every ``(y, x)`` of ``ys x xs``.

    The window edges cut each axis into segments of constant coverage, so a pixel's window count is the product
    of its row's and its column's counts and is known before any output arrives. Each output is split along those
    segments: the first window to reach a cell writes ``output / count`` into it, later ones add theirs. Every
    value is written once per covering window, with no zero fill, no count map and no final division.

    With ``output_stride`` ``s > 1`` the mean is kept on the ``s``-times coarser grid (windows placed at their
    start rounded to the grid, the last one ending at the grid's end) and :meth:`result` upsamples it once.
    """

    def __init__(self, size: tuple[int, int], crop: tuple[int, int], ys: list[int], xs: list[int],
                 output_stride: int = 1):
        self.size, self.stride = size, output_stride
        self.grid = tuple(-(-n // output_stride) for n in size)
        self.crop = tuple(-(-c // output_stride) for c in crop)
        self.rows = {y: self._snap(y, crop[0], size[0], 0) for y in ys}
        self.cols = {x: self._snap(x, crop[1], size[1], 1) for x in xs}
        self.row_segments = _segments(sorted(self.rows.values()), self.crop[0], self.grid[0])
        self.col_segments = _segments(sorted(self.cols.values()), self.crop[1], self.grid[1])
        self.written: set[tuple[int, int]] = set()
        self.total: torch.Tensor | None = None

    def _snap(self, start: int, crop: int, length: int, axis: int) -> int:
        """A window start on the output grid: the nearest grid line, or the grid's end for the last window."""
        if start + crop >= length:
            return self.grid[axis] - self.crop[axis]
        return (2 * start + self.stride) // (2 * self.stride)

    def add(self, y: int, x: int, output: torch.Tensor) -> None:
        """Add one window's ``(C, crop_h / s, crop_w / s)`` output, its window starting at pixel ``(y, x)``."""
        if tuple(output.shape[-2:]) != self.crop:
            raise ValueError(f"the dense function gave a {tuple(output.shape[-2:])} output for a window whose output "
                             f"grid is {self.crop} (crop / output_stride {self.stride}, rounded up)")
        if self.total is None:
            self.total = torch.empty(output.shape[0], *self.grid, dtype=output.dtype, device=output.device)
        top, left = self.rows[y], self.cols[x]
        for r, (y0, y1, count_y) in enumerate(self.row_segments):
            if y0 < top or y1 > top + self.crop[0]:
                continue
            for c, (x0, x1, count_x) in enumerate(self.col_segments):
                if x0 < left or x1 > left + self.crop[1]:
                    continue
                part = output[:, y0 - top:y1 - top, x0 - left:x1 - left]
                cell = self.total[:, y0:y1, x0:x1]
                weight = 1.0 / (count_y * count_x)
                if (r, c) in self.written:
                    cell.add_(part, alpha=weight)
                elif weight == 1.0:
                    cell.copy_(part)
                else:
                    torch.mul(part, weight, out=cell)
                self.written.add((r, c))

    def result(self) -> torch.Tensor:
        """The mean ``(C, H, W)`` (upsampled from the coarse grid when ``output_stride > 1``)."""
        if self.stride == 1:
            return self.total
        size = (self.grid[0] * self.stride, self.grid[1] * self.stride)
        return F.interpolate(self.total[None], size=size, mode="bilinear", align_corners=False)[0]


def _segments(starts: list[int], crop: int, length: int) -> list[tuple[int, int, int]]:
    """``(begin, end, windows covering it)`` for each stretch of ``[0, length)`` between window edges."""
    edges = sorted({0, length, *starts, *(s + crop for s in starts)})
    return [(a, b, sum(s <= a and b <= s + crop for s in starts)) for a, b in zip(edges, edges[1:]) if b <= length]


def dense_inference(fn: DenseFn, images: list[torch.Tensor], mode: str, crop: int | tuple[int, int] = 512,
                    stride: int | tuple[int, int] = 341, batch_size: int = 8,
                    out_device: torch.device | str | None = None, small_image: str = "pad",
                    output_stride: int = 1) -> list[torch.Tensor]:
    """``mode="slide"``: :func:`slide_inference`; ``mode="whole"``: :func:`whole_inference` (``output_stride`` 1).

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
            outputs = slide_inference(fn, [images[i] for i in indices], window, stride, batch_size, out_device,
                                      output_stride)
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
