"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in PyTorch, and in a compiled CPU kernel.

Every query looks at ``num_points`` sampled locations per head and per level around its reference
point; the locations are offsets predicted from the query, the values are read by bilinear
interpolation and mixed with softmax attention weights also predicted from the query. No CUDA
extension: this runs on CPU and GPU alike.

Coordinates are normalised to ``[0, 1]`` with ``(x, y)`` order and ``align_corners=False``
semantics: ``(j + 0.5) / W`` is the centre of pixel column ``j``; a corner outside the map reads 0
(``grid_sample``'s ``padding_mode="zeros"``).

Three implementations of the same function:

- compiled (``ms_deform_attn_native``; float32 on a CPU, where a C++ compiler is found): one pass per
  image and head over its queries, reading each sample's four value rows once forward and once backward.
  About 3.5x faster than the PyTorch gather-sum below on a Mask2Former pixel decoder's layer.
- ``ms_deform_attn_core``'s PyTorch way (other dtypes and devices, or ``DINOV3_HEADS_CPU_KERNELS=0``): the
  attention weight of each point is folded into its 4 bilinear corner weights, and one weighted gather-sum
  (``F.embedding_bag``) over the ``(B * S * M, D)`` value table reads all levels, points and corners at
  once; out-of-map corners get weight 0. Its backward (``_GatherSum``) scatters the value gradient with one
  counting sort of the corner indices and one more ``embedding_bag``, instead of ``embedding_bag``'s own
  sorting backward.
- ``ms_deform_attn_grid_sample``: one ``grid_sample`` per level, then the weighted sum (the algorithm
  of Deformable DETR's and Hugging Face's pure-PyTorch path). Used while exporting (``torch.export`` /
  ONNX): the ONNX exporter lowers ``embedding_bag`` to a ``Loop`` with one iteration per bag (per query
  and head), where ``GridSample`` is one ONNX op. Also the reference of the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ms_deform_attn_native


def as_size(value) -> int:
    """A size as an ``int``; a ``torch.SymInt`` (shape while tracing, e.g. ONNX export) stays symbolic.

    ``int()`` of a traced size would bake the example's value into the exported graph.
    """
    return value if isinstance(value, (int, torch.SymInt)) else int(value)


def ms_deform_attn_grid_sample(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """``ms_deform_attn_core`` with one ``grid_sample`` per level (same arguments, same result)."""
    b, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    value_levels = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, M, D) -> (B*M, D, h, w)
        v = value_levels[lvl].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, lq, num_points, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Lq, L*P)
    sampled = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, num_levels * num_points)
    out = (sampled * weights).sum(-1)  # (B*M, D, Lq)
    return out.view(b, m * d, lq).transpose(1, 2).contiguous()


def _row_dots(table: Tensor, rows: Tensor, vectors: Tensor, block_elements: int = 2**18) -> Tensor:
    """``out[n, k] = table[rows[n, k]] . vectors[n]``: ``(R, D)``, ``(N, K)``, ``(N, D)`` -> ``(N, K)``.

    In blocks of bags whose gathered rows hold about ``block_elements`` values (cache-sized), one gather and one
    ``vecdot`` each: on CPU about twice as fast as ``embedding_bag``'s per-sample-weight backward, which forms
    one scalar dot product at a time.
    """
    n, k = rows.shape
    out = torch.empty(n, k, dtype=vectors.dtype, device=vectors.device)
    step = max(1, block_elements // (k * table.shape[1]))
    for start in range(0, n, step):
        block = slice(start, start + step)
        torch.linalg.vecdot(F.embedding(rows[block], table), vectors[block, None, :], out=out[block])
    return out


def _pair_dots(table: Tensor, rows: Tensor, vectors: Tensor) -> Tensor:
    """``_row_dots`` as one ``embedding_bag`` per-sample-weight backward kernel (the accelerator path)."""
    n, k = rows.shape
    flat = rows.reshape(-1).long()
    offsets = torch.arange(0, n * k, k, device=flat.device)
    bags = torch.arange(n, device=flat.device).repeat_interleave(k)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(vectors, table, flat, offsets, bags, 0).view(n, k)


class _GatherSum(torch.autograd.Function):
    """``out[n] = sum_k weights[n, k] * table[rows[n, k]]``: ``table (R, D)``, ``rows``, ``weights (N, K)`` -> ``(N, D)``.

    Gradients for ``table`` and ``weights``. The table gradient is the transposed gather-sum: the
    ``(n, k)`` pairs are grouped by row with one stable sort of the (integer) row indices, then one
    ``embedding_bag`` sums ``weights * grad[n]`` per row. The weight gradient is a dot product per pair
    (``_row_dots`` on CPU, ``_pair_dots`` elsewhere).
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(table, rows, weights)
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        table, rows, weights = ctx.saved_tensors
        k = rows.shape[1]
        flat = rows.reshape(-1)
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            # int32 keys sort several times faster than int64 ones (radix passes); any table of practical size fits
            order = (flat.int() if table.shape[0] < 2**31 else flat).argsort(stable=True)
            starts = torch.zeros(table.shape[0], dtype=flat.dtype, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=table.shape[0])[:-1], 0, out=starts[1:])
            grad_table = F.embedding_bag(torch.div(order, k, rounding_mode="floor"), grad.to(table.dtype), starts.long(),
                                         per_sample_weights=weights.reshape(-1).index_select(0, order), mode="sum")
        if ctx.needs_input_grad[2]:
            dots = _row_dots if table.device.type == "cpu" else _pair_dots
            grad_weights = dots(table, rows, grad.to(table.dtype))
        return grad_table, None, grad_weights


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinearly sample every level and mix the samples with the attention weights.

    Args:
        value: ``(B, S, M, D)`` per-head values of all levels flattened, ``S = sum(h_l * w_l)``.
        spatial_shapes: ``[(h_l, w_l)]`` for the ``L`` levels, in the order they are flattened.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` normalised ``(x, y)`` in ``[0, 1]``.
        attention_weights: ``(B, Lq, M, L, P)``, summing to 1 over ``(L, P)``.

    Returns:
        ``(B, Lq, M * D)``.
    """
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)
    compiled = ms_deform_attn_native.kernels() if ms_deform_attn_native.usable(
        value, sampling_locations, attention_weights) else None
    if compiled is not None:
        shapes = torch.tensor([[as_size(h), as_size(w)] for h, w in spatial_shapes], dtype=torch.int64)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        return ms_deform_attn_native.CompiledMSDeformAttn.apply(value, shapes, starts, sampling_locations,
                                                                attention_weights, compiled)
    b, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    device, dtype = value.device, sampling_locations.dtype
    num_rows = b * s * m
    index = torch.int32 if 3 * num_rows < 2**31 else torch.int64  # corner rows stay below 2 * num_rows
    wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)  # (L, 2)
    pixel = sampling_locations * wh[:, None, :] - 0.5  # (B, Lq, M, L, P, 2) in pixels of each level
    with torch.no_grad():
        floor = pixel.floor()
        # beyond one pixel outside the map nothing is read: clamping there keeps the integers small
        corner = torch.minimum(floor.clamp(min=-2.0), wh[:, None, :]).to(index)  # top-left corner (x0, y0)
        # x0 and x0 + 1 inside [0, w): (..., 2) for x and y each
        inside0 = (corner >= 0) & (corner < wh[:, None, :].to(index))
        inside1 = (corner >= -1) & (corner < wh[:, None, :].to(index) - 1)
        level_start = torch.tensor([0] + [h * w for h, w in spatial_shapes][:-1], device=device).cumsum(0).to(index)
        width = wh[:, 0].to(index)
        top_left = level_start[:, None] + corner[..., 1] * width[:, None] + corner[..., 0]  # (B, Lq, M, L, P)
        top_left = (top_left + torch.arange(b, device=device, dtype=index)[:, None, None, None, None] * s) * m
        top_left = top_left + torch.arange(m, device=device, dtype=index)[:, None, None]
        corner_step = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1], -1) * m  # (L, 4)
        rows = (top_left[..., None] + corner_step[:, None, :]).clamp_(0, num_rows - 1)  # (B, Lq, M, L, P, 4)
    frac = pixel - floor
    fx, fy = frac.unbind(-1)
    wx = torch.stack([(1 - fx) * inside0[..., 0], fx * inside1[..., 0]], -1)  # (B, Lq, M, L, P, 2)
    wy = torch.stack([(1 - fy) * inside0[..., 1], fy * inside1[..., 1]], -1) * attention_weights[..., None]
    weights = (wy[..., :, None] * wx[..., None, :]).reshape(b * lq * m, -1).to(value.dtype)  # corners (y, x) row-major
    rows = rows.view(b * lq * m, -1)
    table = value.reshape(num_rows, d)
    if torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad):
        out = _GatherSum.apply(table, rows, weights)
    else:
        out = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    return out.view(b, lq, m * d)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        embed_dim: channel width ``C`` of queries and values (divisible by ``num_heads``).
        num_heads: attention heads ``M``.
        num_levels: feature levels ``L``.
        num_points: sampling points ``P`` per head and level.
        value_ratio: width of the values as a fraction of ``embed_dim`` (``value_proj`` maps ``C`` to
            ``int(C * value_ratio)``, ``output_proj`` maps it back); ViT-Adapter uses 0.5.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(embed_dim * value_ratio)
        if value_dim <= 0 or value_dim % num_heads != 0:
            raise ValueError(f"value width int(embed_dim * value_ratio) = int({embed_dim} * {value_ratio}) = {value_dim} "
                             f"must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, value_dim)
        self.output_proj = nn.Linear(value_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions (one per head), points at growing radii."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)  # (M, L, P, 2)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to its sampled points.

        Args:
            query: ``(B, Lq, C)`` queries (position embedding already added if wanted).
            reference_points: ``(B, Lq, L, 2)`` normalised ``(x, y)`` points, or ``(B, Lq, L, 4)``
                boxes ``(cx, cy, w, h)`` (offsets are then scaled by half the box size / ``P``);
                ``(B, Lq, 2|4)`` is broadcast to every level.
            value_input: ``(B, S, C)`` the flattened levels, ``S = sum(h_l * w_l)``.
            spatial_shapes: ``[(h_l, w_l)]`` of the ``L`` levels in ``value_input`` order.
            value_padding_mask: optional ``(B, S)`` bool, True where the value is padding.

        Returns:
            ``(B, Lq, C)``.
        """
        b, lq, _ = query.shape
        s = value_input.shape[1]
        spatial_shapes = [(as_size(h), as_size(w)) for h, w in spatial_shapes]
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(spatial_shapes)}")
        if sum(h * w for h, w in spatial_shapes) != s:
            raise ValueError(f"spatial_shapes {spatial_shapes} do not cover the {s} values")
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.value_dim // m)

        offsets = self.sampling_offsets(query).view(b, lq, m, num_levels, num_points, 2)
        weights = self.attention_weights(query).view(b, lq, m, num_levels * num_points)
        weights = weights.softmax(-1).view(b, lq, m, num_levels, num_points)

        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None, :].expand(-1, -1, num_levels, -1)
        ref = reference_points[:, :, None, :, None, :]  # (B, Lq, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (w_l, h_l)
            # (L, 2) of (w_l, h_l); scalar_tensor keeps traced sizes symbolic where torch.tensor would freeze them
            normalizer = torch.stack([
                torch.stack([torch.scalar_tensor(v, dtype=query.dtype, device=query.device) for v in (w, h)])
                for h, w in spatial_shapes
            ])
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / num_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")

        out = ms_deform_attn_core(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
