"""Fused ``ddim_step``: one DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12) in one kernel launch,
reading ``x_t`` and ``model_output`` once (and ``noise`` when given and ``eta > 0``), writing ``x_{t_prev}``
once (and the predicted ``x0`` with ``return_pred_x0``). Reference: ``ddpm_kernels.reference.ddim_step_ref``.

Coefficients. The step's coefficients are not table rows: they are derived per sample from
``alphas_cumprod[t]`` and ``alphas_cumprod[t_prev]``, inside the kernel, once per program (scalars, nothing per
element). ``utils.gather_step_alphas`` gathers both from the schedule's float64 table and takes the three
differences that cancel (``1 - ab_t``, ``1 - ab_prev``, ``ab_prev - ab_t``) in float64 before rounding to the
compute dtype; every coefficient is then a product, quotient or square root of those, so float32 keeps it to a
few ulps. ``sqrt(1 - ab_prev - sigma^2)`` is rewritten as ``sqrt((1 - ab_prev) ((1 - eta^2) + eta^2 y))`` with
``y = ab_t (1 - ab_prev) / ((1 - ab_t) ab_prev)``, the same number without its cancellation (in float32 the
subtraction form is off by ~1e-7 (1 - ab_prev) absolute, a large relative error in the small direction term
that eta near 1 leaves at the end of a chain). The elementwise math runs in
float32 registers (float64 for float64 data) and rounds once at the store.

Noise. ``eta == 0`` reads and draws no noise (and leaves the generator untouched, as the reference does). With
``eta > 0`` and ``noise=None`` the kernel draws ``z`` with Philox exactly as ``p_sample`` does (same key and
counter scheme, ``utils``, "Noise"); the values differ from the reference's ``torch.randn`` draw, the
distribution and the generator bookkeeping do not.

Thresholding. ``threshold_ratio`` (dynamic thresholding) needs a per-sample quantile of ``|x0|`` over the
whole sample, which one elementwise pass cannot see. Such a step is three stages: ``ddim_step_x0`` (this kernel
with ``X0_ONLY``) writes the raw x0 in the compute dtype, ``threshold.threshold_scale`` selects each
sample's scale with a device-side sort (no host synchronization), and the step kernel runs with ``THRESHOLD``,
recomputing x0 and applying ``clamp(x0, -s, s) / s`` in registers. Zero-element inputs run the reference.

No autograd: sampling is not differentiated.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
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
    split_float,
    noise_key,
    step_operands,
    store_tile,
    to_compute,
)

__all__ = ["ddim_step_kernel", "ddim_step"]


@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def ddim_step_kernel(
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
    eta_hi,
    eta_lo,
    clip_range_hi,
    clip_range_lo,
    N,
    T,
    batch_start,
    PARAMETERIZATION: tl.constexpr,
    CLIP_DENOISED: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    SET_ALPHA_TO_ONE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RETURN_X0: tl.constexpr,
    THRESHOLD: tl.constexpr,
    X0_ONLY: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, tile_start, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    # Data loads and noise first: none depends on t, so their latency overlaps the t -> coefficient chain.
    x = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    if ADD_NOISE:
        z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample, tile_start, offs, mask, N,
                               cd, HAS_NOISE, BLOCK)
    t = tl.load(t_ptr + sample)
    t_prev = tl.load(t_prev_ptr + sample)
    ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff = gather_step_alphas(
        alphas_cumprod_ptr, t, t_prev, T, SET_ALPHA_TO_ONE, COMPUTE_FP64
    )

    # Per-sample coefficients in the compute dtype: only products, quotients and square roots of the
    # gathered values (the differences that cancel were taken in float64 by gather_step_alphas).
    sqrt_ab_t = tl.sqrt(ab_t)
    s_t = tl.sqrt(one_minus_ab_t)
    a_t = sqrt_ab_t
    a_prev = tl.sqrt(ab_prev)
    # eta^2 and 1 - eta^2 in float64 (a few scalar adds and multiplies) so eta near 1 keeps its digits
    eta64 = tl.cast(eta_hi, tl.float64) + tl.cast(eta_lo, tl.float64)
    eta_sq = to_compute(eta64 * eta64, COMPUTE_FP64)
    one_minus_eta_sq = to_compute(1.0 - eta64 * eta64, COMPUTE_FP64)
    # sigma^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev), and 1 - ab_t / ab_prev = diff / ab_prev
    variance = one_minus_ab_prev / one_minus_ab_t * (ab_diff / ab_prev)
    sigma = to_compute(eta64, COMPUTE_FP64) * tl.sqrt(variance)
    # 1 - ab_prev - sigma^2 = (1 - ab_prev) ((1 - eta^2) + eta^2 y) with y = ab_t (1 - ab_prev) / ((1 - ab_t)
    # ab_prev): the same number without the cancellation (both terms are >= 0 for eta <= 1). Clamped at 0 so
    # eta > 1 degrades to no direction term, as the reference; a NaN (out-of-range step) stays NaN.
    y = ab_t * one_minus_ab_prev / (one_minus_ab_t * ab_prev)
    dir_sq = one_minus_ab_prev * (one_minus_eta_sq + eta_sq * y)
    dir_coef = tl.sqrt(tl.where(dir_sq < 0.0, 0.0, dir_sq))

    if PARAMETERIZATION == 0:  # eps
        recip_a_t = 1.0 / sqrt_ab_t
        recip_s_t = s_t / sqrt_ab_t
        x0 = recip_a_t * x - recip_s_t * model_output
        eps = model_output
    elif PARAMETERIZATION == 1:  # x0
        x0 = model_output
        eps = (x - a_t * model_output) / s_t
    else:  # v
        x0 = a_t * x - s_t * model_output
        eps = a_t * model_output + s_t * x
    if X0_ONLY:
        # first pass of a thresholded step: the raw x0 (compute dtype) the per-sample scale is selected from
        store_tile(x0_ptr, offs, x0, mask)
        return
    x0 = bound_pred_x0(x0, scale_ptr, sample, clip_range_hi, clip_range_lo, THRESHOLD, CLIP_DENOISED, COMPUTE_FP64)
    if USE_CLIPPED_MODEL_OUTPUT:
        eps = (x - a_t * x0) / s_t
    x_prev = a_prev * x0 + dir_coef * eps
    if ADD_NOISE:
        x_prev = x_prev + sigma * z
    store_tile(out_ptr, offs, x_prev, mask)
    if RETURN_X0:
        store_tile(x0_ptr, offs, x0, mask)


def _launch(x_t, t, t_prev, model_output, alphas_cumprod, eta, parameterization, clip_denoised,
            use_clipped_model_output, set_alpha_to_one, clip_range, noise, seed, philox_seed, philox_offset,
            return_pred_x0, scale, out, x0_only=False):
    """``ddim_step_op``'s arguments and ``out``: writes ``x_{t_prev}`` into ``out`` and returns x0 (zero
    elements unless ``return_pred_x0``). ``x0_only`` (with ``return_pred_x0``) writes only the raw x0, into
    ``out``."""
    x0 = out if x0_only else pred_x0_output(x_t, return_pred_x0)
    operands = step_operands(x_t, t, t_prev, model_output, alphas_cumprod, clip_range, noise, seed, philox_seed,
                             philox_offset, out, x0 if return_pred_x0 else None, scale)
    if operands is None:
        return x0
    batch, n, operands = operands
    eta_hi, eta_lo = split_float(eta)
    launch_per_sample(
        ddim_step_kernel, x_t, n, batch, **operands, eta_hi=eta_hi, eta_lo=eta_lo,
        PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised,
        USE_CLIPPED_MODEL_OUTPUT=use_clipped_model_output, SET_ALPHA_TO_ONE=set_alpha_to_one,
        ADD_NOISE=eta > 0 and not x0_only, X0_ONLY=x0_only,
    )
    return x0


def _ddim_step(
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    parameterization: int,
    clip_denoised: bool,
    use_clipped_model_output: bool,
    set_alpha_to_one: bool,
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
    out = empty_dense(x_t)
    x0 = _launch(x_t, t, t_prev, model_output, alphas_cumprod, eta, parameterization, clip_denoised,
                 use_clipped_model_output, set_alpha_to_one, clip_range, noise, seed, philox_seed, philox_offset,
                 return_pred_x0, scale, out)
    return out, x0


def _ddim_step_fake(x_t, t, t_prev, model_output, alphas_cumprod, eta, parameterization, clip_denoised,
                    use_clipped_model_output, set_alpha_to_one, clip_range, noise, seed, philox_seed, philox_offset,
                    return_pred_x0, scale):
    return empty_dense(x_t), pred_x0_output(x_t, return_pred_x0)


# ddim_step_out writes x_{t_prev} into out (which may be x_t) and returns x0.
ddim_step_op, ddim_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::ddim_step", _ddim_step, _ddim_step_fake, _launch, out_returns=torch.Tensor
)


@torch.library.custom_op("ddpm_kernels_triton::ddim_step_x0", mutates_args=())
def ddim_step_x0_op(
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    model_output: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    parameterization: int,
) -> torch.Tensor:
    """The step's unclipped x0 prediction in the compute dtype (float32; float64 for float64 data): the first
    pass of a thresholded step."""
    x0 = empty_dense(x_t, reference.compute_dtype(x_t.dtype))
    _launch(x_t, t, t_prev, model_output, alphas_cumprod, 0.0, parameterization, False, False, True, 1.0,
            None, None, 0, 0, True, None, x0, x0_only=True)
    return x0


@ddim_step_x0_op.register_fake
def _(x_t, t, t_prev, model_output, alphas_cumprod, parameterization):
    return empty_dense(x_t, reference.compute_dtype(x_t.dtype))


def ddim_step(
    x_t,
    t,
    t_prev,
    model_output,
    schedule,
    eta=0.0,
    parameterization="eps",
    clip_denoised=False,
    noise=None,
    generator=None,
    set_alpha_to_one=True,
    use_clipped_model_output=False,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    """Backend entry with ``reference.ddim_step_ref``'s signature; ``noise=None`` with ``eta > 0`` draws z
    in-kernel (Philox). ``threshold_ratio`` adds a first pass and a per-sample selection (module docstring)."""
    if threshold_ratio is not None and x_t.numel() == 0:
        return reference.ddim_step_ref(
            x_t, t, t_prev, model_output, schedule, eta, parameterization, clip_denoised, noise, generator,
            set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped_model_output,
            clip_range=clip_range, threshold_ratio=threshold_ratio, threshold_max=threshold_max, out=out,
            return_pred_x0=return_pred_x0,
        )
    alphas_cumprod = schedule.coefficients64[TABLE_ROW["alphas_cumprod"]]
    parameterization = PARAMETERIZATION_ID[parameterization]
    scale = None
    if threshold_ratio is not None:
        x0 = ddim_step_x0_op(x_t, t, t_prev, model_output, alphas_cumprod, parameterization)
        scale = threshold_scale(x0, threshold_ratio, threshold_max)
    eta = float(eta)
    seed, philox_seed, philox_offset = None, 0, 0
    if eta <= 0:
        noise = None  # eta == 0: no noise term, nothing read or drawn
    else:
        seed, philox_seed, philox_offset = noise_key(generator, x_t, noise)
    args = (
        x_t, t, t_prev, model_output, alphas_cumprod, eta, parameterization, clip_denoised,
        use_clipped_model_output, set_alpha_to_one, float(clip_range), noise, seed, philox_seed, philox_offset,
        return_pred_x0, scale,
    )
    return run_step(ddim_step_op, ddim_step_out_op, args, out, return_pred_x0)
