"""Dense inference over whole images or a batched sliding window.

``fn`` is any callable mapping a batch ``(N, 3, h, w)`` to dense outputs ``(N, C, h, w)`` (class scores
or depth). The sliding window follows mmseg's grid: windows of ``crop`` every ``stride``, the last one
shifted back inside the image, outputs averaged per pixel. Unlike mmseg's and Meta's loops, crops of all
windows and all images are stacked and run ``batch_size`` at a time, and the average is built without a count
map or a final division (see :class:`WindowMean`). A head whose output is coarser than the image can be stitched
at its own resolution and upsampled once (``output_stride``), or have each window upsampled while it is stitched
at full resolution (``upsample``: the same values as stitching upsampled windows, without them in memory).

Images smaller than the crop (``small_image``): ``pad`` (ours) zero-pads them bottom/right up to the crop and
cuts the padding from the output; ``shrink`` (Meta's and mmseg's) never pads: a window side longer than the
image side is cut to it, and when both sides are smaller the window becomes the square of the shorter side
(which then slides along the longer side).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from heads.ops.upsampled_ce import bilinear_weights

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
                    output_stride: int = 1, upsample: bool = False, labels: bool = False) -> list[torch.Tensor]:
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
        upsample: with ``output_stride`` ``s > 1``: ``fn`` gives ``(N, C, g_h, g_w)`` outputs whose grid upsampled
            ``s`` times covers the crop from its top-left corner (a head's native output on the input padded
            bottom/right); each is upsampled bilinearly to the crop as it is stitched at full resolution. The
            result is that of ``output_stride=1`` with a ``fn`` that upsampled its outputs itself (``F.interpolate``,
            ``align_corners=False``, cut to the crop: a linear head's ``predict``), up to float rounding, without the
            upsampled windows in memory (see :class:`WindowMean`).
        labels: return only the argmax over channels of each mean, ``(H_i, W_i)`` long; with ``upsample`` the
            mean is built in bands of rows and never whole (:meth:`WindowMean.labels`).

    Returns:
        One ``(C, H_i, W_i)`` tensor per image: the mean of the overlapping window outputs (``labels``: its argmax).
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
                canvases[i] = WindowMean(tuple(padded[i].shape[-2:]), (crop_h, crop_w), ys, xs, output_stride,
                                         upsample)
            canvases[i].add(y, x, output.to(out_device or output.device))
    if labels:
        return [canvas.labels()[:image.shape[-2], :image.shape[-1]] for canvas, image in zip(canvases, images)]
    return [canvas.result()[:, :image.shape[-2], :image.shape[-1]] for canvas, image in zip(canvases, images)]


class WindowMean:
    """The per-pixel mean of window outputs on a ``size`` image, windows at every ``(y, x)`` of ``ys x xs``.

    The window edges cut each axis into segments of constant coverage, so a pixel's window count is the product
    of its row's and its column's counts and is known before any output arrives. Each output is split along those
    segments: the first window to reach a cell writes ``output / count`` into it, later ones add theirs. Every
    value is written once per covering window, with no zero fill, no count map and no final division.

    With ``output_stride`` ``s > 1`` the mean is kept on the ``s``-times coarser grid (windows placed at their
    start rounded to the grid, the last one ending at the grid's end) and :meth:`result` upsamples it once.
    With ``upsample`` as well, the mean is at full resolution: the coarse outputs are kept (they are small) and
    upsampled bilinearly (``align_corners=False``) while the mean is built, separably: a window's rows along the
    height for each row segment (a small ``(C, rows, g_w)``), then its columns by one batched matrix product per
    cell written or added straight into the cell. The values are those of ``F.interpolate`` to the padded window
    cut to the window (as a head's ``predict`` gives them) up to float rounding, no upsampled window is ever in
    memory, and :meth:`labels` builds the mean a band of rows at a time, never whole.
    """

    def __init__(self, size: tuple[int, int], crop: tuple[int, int], ys: list[int], xs: list[int],
                 output_stride: int = 1, upsample: bool = False):
        self.size, self.window, self.stride = size, crop, output_stride
        self.upsample = upsample and output_stride > 1
        scale = 1 if self.upsample else output_stride  # pixels per cell of the mean
        self.grid = tuple(-(-n // scale) for n in size)
        self.crop = tuple(-(-c // scale) for c in crop)
        self.rows = {y: self._snap(y, crop[0], size[0], 0, scale) for y in ys}
        self.cols = {x: self._snap(x, crop[1], size[1], 1, scale) for x in xs}
        self.row_segments = _segments(sorted(self.rows.values()), self.crop[0], self.grid[0])
        self.col_segments = _segments(sorted(self.cols.values()), self.crop[1], self.grid[1])
        self.written: set[tuple[int, int]] = set()
        self.total: torch.Tensor | None = None
        self._upsamplers: dict[tuple[int, int], SeparableBilinear] = {}
        self._pending: list[tuple[int, int, torch.Tensor, SeparableBilinear]] = []

    def _snap(self, start: int, crop: int, length: int, axis: int, scale: int) -> int:
        """A window start on the mean's grid: the nearest grid line, or the grid's end for the last window."""
        if start + crop >= length:
            return self.grid[axis] - self.crop[axis]
        return (2 * start + scale) // (2 * scale)

    def add(self, y: int, x: int, output: torch.Tensor) -> None:
        """Add one window's output, its window starting at pixel ``(y, x)``: ``(C, crop_h / s, crop_w / s)`` (rounded
        up), or with ``upsample`` ``(C, g_h, g_w)`` whose grid upsampled ``s`` times covers the crop."""
        if self.upsample:
            if output.shape[-2] * self.stride < self.window[0] or output.shape[-1] * self.stride < self.window[1]:
                raise ValueError(f"the dense function gave a {tuple(output.shape[-2:])} output: upsampled "
                                 f"{self.stride} times it does not cover the {self.window} window")
        elif tuple(output.shape[-2:]) != self.crop:
            raise ValueError(f"the dense function gave a {tuple(output.shape[-2:])} output for a window whose output "
                             f"grid is {self.crop} (crop / output_stride {self.stride}, rounded up)")
        top, left = self.rows[y], self.cols[x]
        if self.upsample:  # stitched when the mean is asked for, in row bands if only its argmax is
            grid = tuple(output.shape[-2:])
            if grid not in self._upsamplers:
                self._upsamplers[grid] = SeparableBilinear(grid, self.stride, self.window, output)
            self._pending.append((top, left, output, self._upsamplers[grid]))
            return
        if self.total is None:
            self.total = torch.empty(output.shape[0], *self.grid, dtype=output.dtype, device=output.device)
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

    def _stitch_rows(self, out: torch.Tensor, begin: int, end: int) -> None:
        """Upsample mode: the mean's rows ``[begin, end)`` into ``out (C, end - begin, W)``, cell by cell: each
        window's rows upsampled along the height (small), then its columns written or added straight into the cell."""
        written: set[tuple[int, int]] = set()
        for top, left, output, upsampler in self._pending:
            for r, (y0, y1, count_y) in enumerate(self.row_segments):
                y0, y1 = max(y0, begin), min(y1, end)
                if y1 <= y0 or y0 < top or y1 > top + self.crop[0]:
                    continue
                rows = upsampler.height(output, y0 - top, y1 - top)  # (C, y1 - y0, g_w)
                for c, (x0, x1, count_x) in enumerate(self.col_segments):
                    if x0 < left or x1 > left + self.crop[1]:
                        continue
                    upsampler.width_into(out[:, y0 - begin:y1 - begin, x0:x1], rows, x0 - left, x1 - left,
                                         1.0 / (count_y * count_x), accumulate=(r, c) in written)
                    written.add((r, c))

    def result(self) -> torch.Tensor:
        """The mean ``(C, H, W)`` (upsampled from the coarse grid when ``output_stride > 1``)."""
        if self.upsample:
            out = self._pending[0][2]
            total = torch.empty(out.shape[0], *self.grid, dtype=out.dtype, device=out.device)
            self._stitch_rows(total, 0, self.grid[0])
            return total
        if self.stride == 1:
            return self.total
        size = (self.grid[0] * self.stride, self.grid[1] * self.stride)
        return SeparableBilinear(self.grid, self.stride, size, self.total)(self.total)

    def labels(self, band: int = 64) -> torch.Tensor:
        """The argmax over channels of the mean, ``(H, W)`` long. In upsample mode the mean is built ``band`` rows
        at a time in one reused buffer, never whole."""
        if not self.upsample:
            return self.result().argmax(0)
        out = self._pending[0][2]
        labels = torch.empty(self.grid, dtype=torch.long, device=out.device)
        buffer = torch.empty(out.shape[0], min(band, self.grid[0]), self.grid[1], dtype=out.dtype, device=out.device)
        for begin in range(0, self.grid[0], band):
            end = min(begin + band, self.grid[0])
            rows = buffer[:, :end - begin]
            self._stitch_rows(rows, begin, end)
            torch.argmax(rows, 0, out=labels[begin:end])
        return labels


class SeparableBilinear:
    """Bilinear upsampling ``s`` times (``align_corners=False``, as ``F.interpolate``) of a ``(C, g_h, g_w)`` grid,
    cut to its top-left ``size``, as two matrix products: ``A_h @ x @ A_w^T`` with ``A`` the 1-D weights.

    Each block of output rows or columns reads only the few input rows or columns its weights touch, so the
    products cost about ``(block / s + 2)`` multiply-adds per output value and write it once, straight into the
    destination (BLAS, no ``(C, H, W)`` temporary). Equal to ``F.interpolate`` up to float rounding.
    """

    def __init__(self, grid: tuple[int, int], stride: int, size: tuple[int, int], like: torch.Tensor):
        self.size = size
        self._host = (bilinear_weights(grid[0], grid[0] * stride)[:size[0]],
                      bilinear_weights(grid[1], grid[1] * stride)[:size[1]])  # (h, g_h), (w, g_w)
        self.rows = self._host[0].to(like.device, like.dtype)
        self.cols_t = self._host[1].t().contiguous().to(like.device, like.dtype)  # (g_w, w)
        self._bands: dict[tuple[int, int, int], tuple[int, int]] = {}

    def _band(self, axis: int, begin: int, end: int) -> tuple[int, int]:
        """The input lines ``[a, b)`` that output lines ``[begin, end)`` of ``axis`` read (from the host copy)."""
        key = (axis, begin, end)
        if key not in self._bands:
            used = self._host[axis][begin:end].ne(0).any(0).nonzero()[:, 0]
            self._bands[key] = (int(used[0]), int(used[-1]) + 1)
        return self._bands[key]

    def height(self, x: torch.Tensor, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Output rows ``[begin, end)`` upsampled along the height only: ``(C, end - begin, g_w)``."""
        end = self.size[0] if end is None else end
        a, b = self._band(0, begin, end)
        return self.rows[begin:end, a:b] @ x[:, a:b]

    def width_into(self, out: torch.Tensor, part: torch.Tensor, begin: int, end: int, alpha: float = 1.0,
                   accumulate: bool = False) -> None:
        """``out (C, h, end - begin) [+]= alpha * part (C, h, g_w) @ A_w^T[:, begin:end]``: output columns
        ``[begin, end)`` of height-upsampled rows ``part``, written or added in place."""
        a, b = self._band(1, begin, end)
        blend = self.cols_t[a:b, begin:end]
        if accumulate:
            out.baddbmm_(part[..., a:b], blend.expand(part.shape[0], -1, -1), alpha=alpha)
        else:
            torch.bmm(part[..., a:b], (blend if alpha == 1.0 else blend * alpha).expand(part.shape[0], -1, -1),
                      out=out)

    def __call__(self, x: torch.Tensor, block: int = 256) -> torch.Tensor:
        """The whole upsampled ``(C, *size)``, in blocks of ``block`` rows and columns."""
        out = torch.empty(x.shape[0], *self.size, dtype=x.dtype, device=x.device)
        for top in range(0, self.size[0], block):
            bottom = min(top + block, self.size[0])
            rows = self.height(x, top, bottom)
            for left in range(0, self.size[1], block):
                right = min(left + block, self.size[1])
                self.width_into(out[:, top:bottom, left:right], rows, left, right)
        return out


def _segments(starts: list[int], crop: int, length: int) -> list[tuple[int, int, int]]:
    """``(begin, end, windows covering it)`` for each stretch of ``[0, length)`` between window edges."""
    edges = sorted({0, length, *starts, *(s + crop for s in starts)})
    return [(a, b, sum(s <= a and b <= s + crop for s in starts)) for a, b in zip(edges, edges[1:]) if b <= length]


def dense_inference(fn: DenseFn, images: list[torch.Tensor], mode: str, crop: int | tuple[int, int] = 512,
                    stride: int | tuple[int, int] = 341, batch_size: int = 8,
                    out_device: torch.device | str | None = None, small_image: str = "pad",
                    output_stride: int = 1, upsample: bool = False, labels: bool = False) -> list[torch.Tensor]:
    """``mode="slide"``: :func:`slide_inference`; ``mode="whole"``: :func:`whole_inference` (``output_stride`` 1);
    ``labels``: the argmax over channels of each output instead.

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
                                      output_stride, upsample, labels)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results
    if mode == "whole":
        outputs = whole_inference(fn, images, batch_size)
        return [output.argmax(0) for output in outputs] if labels else outputs
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
