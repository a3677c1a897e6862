"""Multi-scale deformable attention in the compiled CPU kernel (``csrc/ms_deform_attn.cpp``; building and loading:
``heads/ops/native.py``): work items of one image and one head, spread over threads.

The same function as ``ms_deform_attn.ms_deform_attn_core`` for float32 CPU tensors, with gradients for the values,
the sampling locations and the attention weights. Per sample the kernel reads its four corners' value rows once in
the forward and once in the backward (a dot product with the output gradient gives the weight and location
gradients, a multiply-add the value gradient), with no index tensors, sorts or gathers in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native

_COMMON = (native.POINTER,) * 5
_SIZES = (native.INT,) * 8  # spatial, heads, dim, queries, levels, points; the range of work items
_FORWARD = _COMMON + _SIZES + (native.POINTER,)
_BACKWARD = _COMMON + (native.POINTER,) + _SIZES + (native.POINTER,) * 3


def kernels(flags: tuple[str, ...] = ()):
    """``(forward, backward)`` C functions, or ``None`` where compiled kernels are unavailable."""
    forward = native.kernel("ms_deform_attn", "ms_deform_attn_forward", _FORWARD, flags)
    backward = native.kernel("ms_deform_attn", "ms_deform_attn_backward", _BACKWARD, flags)
    return None if forward is None or backward is None else (forward, backward)


def usable(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> bool:
    """Whether the kernel takes these inputs: float32 on a CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in (value, sampling_locations, attention_weights))


class CompiledMSDeformAttn(torch.autograd.Function):
    """``(value (B, S, M, D), shapes (L, 2), starts (L,), locations (B, Q, M, L, P, 2), weights (B, Q, M, L, P))``
    -> ``(B, Q, M * D)``; ``kernels`` is the pair from ``kernels()``."""

    @staticmethod
    def forward(ctx, value, shapes, starts, sampling_locations, attention_weights, kernels):
        b, s, m, d = value.shape
        value = value.transpose(1, 2).contiguous()  # (B, M, S, D): each head's values together
        locations, weights = sampling_locations.contiguous(), attention_weights.contiguous()
        q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        out = value.new_empty(b, q, m, d)
        sizes = (s, m, d, q, levels, points)
        inputs = [t.data_ptr() for t in (value, shapes, starts, locations, weights)]
        items = b * m
        native.run_parts(lambda part, first, last: kernels[0](*inputs, *sizes, first, last, out.data_ptr()),
                         items, "ms_deform_attn_forward")
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        ctx.kernels, ctx.sizes = kernels, sizes
        return out.view(b, q, m * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_value = torch.zeros_like(value)
        grad_locations = torch.empty_like(locations) if ctx.needs_input_grad[3] else None
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[4] else None
        inputs = [t.data_ptr() for t in (value, shapes, starts, locations, weights, grad_out)]
        outputs = [grad_value.data_ptr()] + [0 if t is None else t.data_ptr() for t in (grad_locations, grad_weights)]
        items = value.shape[0] * value.shape[1]
        native.run_parts(lambda part, first, last: ctx.kernels[1](*inputs, *ctx.sizes, first, last, *outputs),
                         items, "ms_deform_attn_backward")
        return grad_value.transpose(1, 2), None, None, grad_locations, grad_weights, None
