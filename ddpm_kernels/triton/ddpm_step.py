"""Fused ``ddpm_step``: one ancestral step ``x_t -> x_{t_prev}`` on a possibly respaced chain (diffusers'
``DDPMScheduler.step``) in one kernel launch, reading ``x_t`` and ``model_output`` once (with learned
variances, both halves of ``model_output``: the prediction and the variance channels) and ``noise`` when
given, writing ``x_{t_prev}`` once (and the predicted ``x0`` with ``return_pred_x0``). Reference:
``ddpm_kernels.reference.ddpm_step_ref``.

Coefficients are derived per sample inside the kernel as in ``ddim_step.py``: the differences that cancel
(``1 - ab_t``, ``1 - ab_prev`` and ``ab_prev - ab_t``, so ``beta = (ab_prev - ab_t) / ab_prev``, which is ~1e-4
near ``t = 0``) are taken in float64 from the float64 table (``utils.gather_step_alphas``), everything after
them is products, quotients, square roots and logarithms in the compute dtype. The elementwise math, including
the ``exp`` of a learned variance, runs in float32 registers (float64 for float64 data).

Learned variances. ``model_output`` is ``(B, 2C, ...)`` for ``x_t`` of ``(B, C, ...)``; made contiguous, sample
``b``'s prediction is the ``N = C * prod(rest)`` elements at ``b * 2N`` and its variance channels the ``N``
elements after them, so the kernel reads both halves with the sample stride ``2N`` (no split copy).

Noise. ``noise=None`` draws ``z`` in-kernel with Philox exactly as ``p_sample`` does (same key and counters):
with ``t_prev = t - 1`` and ``fixed_small`` a step equals ``p_sample`` from the same generator state. The values
differ from the reference's ``torch.randn`` draw; the distribution and the generator bookkeeping do not.

Thresholding. ``threshold_ratio`` runs as in ``ddim_step.py``: ``ddpm_step_x0`` writes the raw x0, a
device-side sort selects each sample's scale, and the step kernel applies it in registers. Zero-element inputs
run the reference.

No autograd: sampling is not differentiated.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from .._layout import CONTIGUOUS, dense_format
from ..schedule import TABLE_ROW
from .threshold import threshold_scale
from .utils import (
    PARAMETERIZATION_ID,
    bound_pred_x0,
    custom_op_with_out,
    empty_dense,
    gather_step_alphas,
    launch_per_sample,
    load_or_draw_noise,
    load_tile,
    pred_x0_output,
    run_step,
    sample_tile,
    noise_key,
    step_operands,
    store_tile,
    to_compute,
)

__all__ = ["ddpm_step_kernel", "ddpm_step"]

# fixed_*_log give the same standard deviation as fixed_* (the reference says why); learned reads exp(v / 2);
# learned_range interpolates log-variances.
VARIANCE_ID = {
    "fixed_small": 0, "fixed_small_log": 0, "fixed_large": 1, "fixed_large_log": 1, "learned": 2,
    "learned_range": 3,
}


@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def ddpm_step_kernel(
    x_t_ptr,
    model_output_ptr,
    noise_ptr,
    seed_ptr,
    philox_seed: tl.int64,
    philox_offset: tl.int64,
    t_ptr,
    t_prev_ptr,
    alphas_cumprod_ptr,
    out_ptr,
    x0_ptr,
    scale_ptr,
    clip_range_hi,
    clip_range_lo,
    N,
    model_output_stride,
    T,
    batch_start,
    PARAMETERIZATION: tl.constexpr,
    VARIANCE: tl.constexpr,
    CLIP_DENOISED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RETURN_X0: tl.constexpr,
    THRESHOLD: tl.constexpr,
    X0_ONLY: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, tile_start, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    # model_output_stride: N, or 2N with learned-variance channels after the prediction
    model_offs = sample.to(tl.int64) * model_output_stride + offs_in_sample
    # Data loads and noise first: none depends on t, so their latency overlaps the t -> coefficient chain.
    x = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, model_offs, mask, cd)
    if VARIANCE >= 2:
        model_var = load_tile(model_output_ptr, model_offs + N, mask, cd)
    z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample, tile_start, offs, mask, N, cd,
                           HAS_NOISE, BLOCK)
    t = tl.load(t_ptr + sample)
    t_prev = tl.load(t_prev_ptr + sample)
    ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff = gather_step_alphas(
        alphas_cumprod_ptr, t, t_prev, T, True, COMPUTE_FP64
    )

    # Per-sample coefficients in the compute dtype: only products, quotients and square roots of the
    # gathered values (the differences that cancel were taken in float64 by gather_step_alphas).
    alpha = ab_t / ab_prev
    beta = ab_diff / ab_prev  # 1 - ab_t / ab_prev without the cancellation
    sqrt_ab_t = tl.sqrt(ab_t)
    coef_x0 = tl.sqrt(ab_prev) * beta / one_minus_ab_t
    coef_xt = tl.sqrt(alpha) * one_minus_ab_prev / one_minus_ab_t
    variance = one_minus_ab_prev / one_minus_ab_t * beta
    # diffusers clamps before any log; where, not maximum, so a NaN (out-of-range step) stays NaN
    variance = tl.where(variance < 1e-20, 1e-20, variance)

    if PARAMETERIZATION == 0:  # eps
        recip_a_t = 1.0 / sqrt_ab_t
        recipm1_a_t = tl.sqrt(one_minus_ab_t / ab_t)
        x0 = recip_a_t * x - recipm1_a_t * model_output
    elif PARAMETERIZATION == 1:  # x0
        x0 = model_output
    else:  # v
        x0 = sqrt_ab_t * x - tl.sqrt(one_minus_ab_t) * model_output
    if X0_ONLY:
        # first pass of a thresholded step: the raw x0 (compute dtype) the per-sample scale is selected from
        store_tile(x0_ptr, offs, x0, mask)
        return
    x0 = bound_pred_x0(x0, scale_ptr, sample, clip_range_hi, clip_range_lo, THRESHOLD, CLIP_DENOISED, COMPUTE_FP64)
    mean = coef_x0 * x0 + coef_xt * x

    if VARIANCE == 0:  # fixed_small(_log)
        std = tl.sqrt(variance)
    elif VARIANCE == 1:  # fixed_large(_log)
        std = tl.sqrt(beta)
    elif VARIANCE == 2:  # learned: the extra channels are the log-variance
        std = tl.exp(0.5 * model_var)
    else:  # learned_range: interpolate log(var) .. log(beta) by (v + 1) / 2
        min_log = tl.log(variance)
        max_log = tl.log(beta)
        frac = (model_var + 1.0) / 2.0
        std = tl.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
    # no noise at the last step (t == 0); an out-of-range t keeps the mask at 1 or has a NaN mean already
    nonzero_mask = to_compute(t > 0, COMPUTE_FP64)
    x_prev = mean + nonzero_mask * std * z
    store_tile(out_ptr, offs, x_prev, mask)
    if RETURN_X0:
        store_tile(x0_ptr, offs, x0, mask)


def _data(x_t: torch.Tensor, variance: int) -> torch.Tensor:
    """``x_t`` as the kernel reads it: learned variances index ``model_output``'s channel halves as contiguous
    data, so ``x_t`` (and with it every operand and output) is contiguous then; otherwise any dense format."""
    return x_t.contiguous() if variance >= 2 else x_t


def _data_format(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, *_):
    return CONTIGUOUS if variance >= 2 else dense_format(x_t)


def _launch(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, clip_denoised, clip_range,
            noise, seed, philox_seed, philox_offset, return_pred_x0, scale, out, x0_only=False):
    """``ddpm_step_op``'s arguments and ``out``: writes ``x_{t_prev}`` into ``out`` and returns x0 (zero
    elements unless ``return_pred_x0``). ``x0_only`` (with ``return_pred_x0``) writes only the raw x0, into
    ``out``."""
    x_t = _data(x_t, variance)
    x0 = out if x0_only else pred_x0_output(x_t, return_pred_x0)
    operands = step_operands(x_t, t, t_prev, model_output, alphas_cumprod, clip_range, noise, seed, philox_seed,
                             philox_offset, out, x0 if return_pred_x0 else None, scale)
    if operands is None:
        return x0
    batch, n, operands = operands
    launch_per_sample(
        ddpm_step_kernel, x_t, n, batch, **operands, model_output_stride=2 * n if variance >= 2 else n,
        PARAMETERIZATION=parameterization, VARIANCE=variance, CLIP_DENOISED=clip_denoised, X0_ONLY=x0_only,
    )
    return x0


def _ddpm_step(
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    parameterization: int,
    variance: int,
    clip_denoised: bool,
    clip_range: float,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    philox_seed: int,
    philox_offset: int,
    return_pred_x0: bool,
    scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_{t_prev}, x0)``; ``x0`` is a zero-element tensor unless ``return_pred_x0``. Noise keyed as in
    ``p_sample_op``; ``alphas_cumprod`` is the schedule's float64 row; ``scale`` (per-sample, compute dtype),
    when given, thresholds x0 instead of clipping."""
    out = empty_dense(_data(x_t, variance))
    x0 = _launch(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, clip_denoised,
                 clip_range, noise, seed, philox_seed, philox_offset, return_pred_x0, scale, out)
    return out, x0


def _ddpm_step_fake(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, clip_denoised,
                    clip_range, noise, seed, philox_seed, philox_offset, return_pred_x0, scale):
    x_t = _data(x_t, variance)
    return empty_dense(x_t), pred_x0_output(x_t, return_pred_x0)


# ddpm_step_out writes x_{t_prev} into out (which may be x_t) and returns x0.
ddpm_step_op, ddpm_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::ddpm_step", _ddpm_step, _ddpm_step_fake, _launch, out_returns=torch.Tensor,
    data_format=_data_format,
)


@torch.library.custom_op("ddpm_kernels_triton::ddpm_step_x0", mutates_args=())
def ddpm_step_x0_op(
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    parameterization: int,
    variance: int,
) -> torch.Tensor:
    """The step's unclipped x0 prediction in the compute dtype (float32; float64 for float64 data): the first
    pass of a thresholded step. ``variance`` only sets how ``model_output`` is laid out (learned channels)."""
    x0 = empty_dense(_data(x_t, variance), reference.compute_dtype(x_t.dtype))
    # noise: x_t as an unused stand-in (the X0_ONLY kernel returns before reading it; the compiler drops the load)
    _launch(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, False, 1.0, x_t, None, 0, 0,
            True, None, x0, x0_only=True)
    return x0


@ddpm_step_x0_op.register_fake
def _(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance):
    return empty_dense(_data(x_t, variance), reference.compute_dtype(x_t.dtype))


def ddpm_step(
    x_t,
    t,
    t_prev,
    model_output,
    schedule,
    parameterization="eps",
    variance_type="fixed_small",
    clip_denoised=True,
    noise=None,
    generator=None,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    """Backend entry with ``reference.ddpm_step_ref``'s signature; ``noise=None`` draws z in-kernel (Philox).
    ``threshold_ratio`` adds a first pass and a per-sample selection (module docstring)."""
    if threshold_ratio is not None and x_t.numel() == 0:
        return reference.ddpm_step_ref(
            x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip_denoised, noise,
            generator, clip_range=clip_range, threshold_ratio=threshold_ratio, threshold_max=threshold_max,
            out=out, return_pred_x0=return_pred_x0,
        )
    alphas_cumprod = schedule.coefficients64[TABLE_ROW["alphas_cumprod"]]
    parameterization, variance = PARAMETERIZATION_ID[parameterization], VARIANCE_ID[variance_type]
    scale = None
    if threshold_ratio is not None:
        x0 = ddpm_step_x0_op(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance)
        scale = threshold_scale(x0, threshold_ratio, threshold_max)
    seed, philox_seed, philox_offset = noise_key(generator, x_t, noise)
    args = (
        x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, clip_denoised,
        float(clip_range), noise, seed, philox_seed, philox_offset, return_pred_x0, scale,
    )
    return run_step(ddpm_step_op, ddpm_step_out_op, args, out, return_pred_x0)
