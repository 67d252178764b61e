"""The threshold family: ``dynamic_threshold`` (Imagen's dynamic thresholding, diffusers' ``_threshold_sample``)
and the per-sample scale the sampler steps use for ``threshold_ratio``.
Reference: ``ddpm_kernels.reference.dynamic_threshold_ref``.

Two passes. The scale ``s`` (the ``ratio`` quantile of ``|x0|`` over each sample, clamped to ``[1, max_value]``)
is an order statistic of the whole sample: ``threshold_scale`` selects it with a sort along each sample, a
gather and a lerp (device-side, no host synchronization, ``torch.quantile``'s numbers without its input-size
limit). Only ``clamp(x0, -s, s) / s`` is a Triton kernel here (one read, one write); in the sampler and solver
steps it is fused into the step kernel itself, which reads ``s`` per sample (``bound_pred_x0``, which clips x0
instead when the step is not thresholded). A selection kernel (radix select over the float bits) would save
the sort; it is not written yet.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .utils import (
    as_rows, clamp_symmetric, compute_dtype, div_rn, empty_dense, launch_per_sample, load_tile, sample_tile,
    split_scalar, store_tile,
)

__all__ = [
    "dynamic_threshold_kernel", "dynamic_threshold", "threshold_scale", "apply_threshold", "bound_pred_x0",
]


def _quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation; a row holding a NaN gives NaN) by sort and
    gather: no input-size limit and no host synchronization."""
    n = rows.shape[1]
    ordered = rows.sort(dim=1).values
    # torch.quantile forms the rank q * (n - 1) in the data's dtype; so does this, to pick the same neighbours
    rank = float(q) * (n - 1) if rows.dtype == torch.float64 else float(np.float32(q) * np.float32(n - 1))
    lo = int(math.floor(rank))
    hi = min(int(math.ceil(rank)), n - 1)
    value = torch.lerp(ordered[:, lo], ordered[:, hi], rank - lo)
    return torch.where(rows.isnan().any(dim=1), torch.full_like(value, float("nan")), value)


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample ``s``, shape (B,), in ``x0``'s dtype (the compute dtype: pass float32 or float64 values;
    at least one element per sample)."""
    rows = x0.reshape(x0.shape[0], -1)
    return _quantile(rows.abs(), ratio).clamp(min=1.0, max=max_value)


@triton.jit
def apply_threshold(x0, s):
    """Dynamic thresholding with the per-sample scale ``s``: ``clamp(x0, -s, s) / s``."""
    return div_rn(clamp_symmetric(x0, s), s)


@triton.jit
def bound_pred_x0(x0, scale_ptr, sample, clip_range_hi, clip_range_lo, THRESHOLD: tl.constexpr,
                  CLIP: tl.constexpr):
    """A step's x0 prediction (in the compute dtype), thresholded with the sample's scale ``scale[sample]``
    (``THRESHOLD``: dynamic thresholding replaces clipping; ``s >= 1``) or clipped to ``[-clip_range,
    clip_range]`` (``CLIP``; ``clip_range`` as ``split_float``'s hi + lo float32s)."""
    if THRESHOLD:
        x0 = apply_threshold(x0, tl.load(scale_ptr + sample))
    elif CLIP:
        x0 = clamp_symmetric(x0, split_scalar(clip_range_hi, clip_range_lo, x0.dtype))
    return x0


@triton.jit
def dynamic_threshold_kernel(x0_ptr, scale_ptr, out_ptr, N, batch_start, COMPUTE_FP64: tl.constexpr,
                             BLOCK: tl.constexpr):
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    x0 = load_tile(x0_ptr, offs, mask, cd)
    store_tile(out_ptr, offs, apply_threshold(x0, tl.load(scale_ptr + sample)), mask)


@torch.library.custom_op("ddpm_kernels_triton::dynamic_threshold_apply", mutates_args=())
def dynamic_threshold_apply_op(x0: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x0, -s, s) / s`` with ``s = scale[b]`` per sample (``scale`` in the compute dtype)."""
    out = empty_dense(x0)
    x0, batch, n = as_rows(x0)
    if x0.numel() == 0:
        return out
    launch_per_sample(dynamic_threshold_kernel, x0, n, batch, x0, scale, out, n,
                      COMPUTE_FP64=x0.dtype == torch.float64)
    return out


@dynamic_threshold_apply_op.register_fake
def _(x0, scale):
    return empty_dense(x0)


def dynamic_threshold(x0, ratio=0.995, max_value=1.0):
    """Backend entry with ``reference.dynamic_threshold_ref``'s signature."""
    if x0.numel() == 0:
        return empty_dense(x0)
    scale = threshold_scale(x0.to(compute_dtype(x0.dtype)), ratio, max_value)
    return dynamic_threshold_apply_op(x0, scale)
