"""The sampler-step family: one step ``x_t -> x_{t_prev}`` of any sampler as one kernel
(``sampler_step_kernel``), reading ``x_t`` and ``model_output`` once (with learned variances, both halves of
``model_output``) and ``noise`` when given, writing ``x_{t_prev}`` once (and the predicted ``x0`` with
``return_pred_x0``). Per element, every step is

    x0, eps  from model_output (eps, x0 or v); x0 clipped or dynamically thresholded; eps re-derived from the
             bounded x0 with use_clipped_model_output
    x_prev = c_x0 x0 + c_eps eps + c_x x_t + c_noise z

(the model output guided first when the step is: see "Guidance" below)

with per-sample coefficients that the sampler's coefficient function derives inside the kernel from
``alphas_cumprod[t]`` and ``alphas_cumprod[t_prev]`` (``SAMPLER`` selects the function at compile time):
``ddim_coefficients`` (Song et al. 2021, eq. 12; diffusers' ``DDIMScheduler.step``) and
``ddpm_coefficients`` (the ancestral step on a possibly respaced chain; diffusers' ``DDPMScheduler.step``).
References: ``ddpm_kernels.reference.ddim_step_ref`` and ``ddpm_step_ref``.

Adding a sampler (DPM-Solver++, UniPC, Euler, flow-matching Euler, ...):

1. Write ``<name>_coefficients`` (``@triton.jit``): the step's ``(c_x0, c_eps, c_x, c_noise)`` from the
   gathered values of ``t`` and ``t_prev``, scalars (``c_noise`` may be a tile, as learned variances make it).
   Take every difference that cancels in float64 (as ``gather_step_alphas`` does), and divide and take
   square roots with ``div_rn`` / ``sqrt_rn``, so the GPU rounds as the interpreter and the reference do.
2. Give it the next ``SAMPLER`` number: a branch in ``step_coefficients`` and a row in ``SAMPLERS`` (its
   number and which of the terms in ``eps`` and ``x_t`` its step has: the kernel leaves the others out rather
   than multiplying them by zero).
3. Map its ``StepOptions`` (``ddpm_kernels._spec``) to the op's arguments in ``_step_options``. The backend
   serves the samplers ``SAMPLERS`` names and declines the others.

Samplers on sigma tables (Euler, flow matching) gather their values through a table pointer in place of
``alphas_cumprod``; multistep samplers (DPM-Solver++ 2M, UniPC) add history buffers as pointer arguments behind
a constexpr (read with the sample's tile, updated in the same pass) and their terms in step 1's combination.

Coefficients. ``gather_step_alphas`` gathers both alphas from the schedule's float64 row and takes the three
differences that cancel (``1 - ab_t``, ``1 - ab_prev``, ``ab_prev - ab_t``) in float64 before rounding to the
compute dtype; every coefficient is then a product, quotient or square root of those, so float32 keeps it to a
few ulps (DDIM's ``sqrt(1 - ab_prev - sigma^2)`` is rewritten without its cancellation, see
``ddim_coefficients``). The elementwise math runs in float32 registers (float64 for float64 data) and rounds
once at the store.

Noise. DDIM with ``eta == 0`` reads and draws no noise (and leaves the generator untouched, as the reference
does). Otherwise ``noise=None`` draws ``z`` in-kernel with Philox exactly as ``p_sample`` does (same key and
counters, ``noise.py``): with ``t_prev = t - 1`` and ``fixed_small`` a DDPM step equals ``p_sample`` from the same
generator state. The values differ from the reference's ``torch.randn`` draw; the distribution and the
generator bookkeeping do not.

Learned variances. ``model_output`` is ``(B, 2C, ...)`` for ``x_t`` of ``(B, C, ...)``; made contiguous, sample
``b``'s prediction is the ``N = C * prod(rest)`` elements at ``b * 2N`` and its variance channels the ``N``
elements after them, so the kernel reads both halves with the sample stride ``2N`` (no split copy).

Thresholding. ``threshold_ratio`` (dynamic thresholding) needs a per-sample quantile of ``|x0|`` over the
whole sample, which one elementwise pass cannot see. Such a step is three stages: ``sampler_step_x0`` (this
kernel with ``X0_ONLY``) writes the raw x0 in the compute dtype, ``threshold.threshold_scale`` selects each
sample's scale with a device-side sort (no host synchronization), and the step kernel runs with ``THRESHOLD``,
recomputing x0 and applying ``clamp(x0, -s, s) / s`` in registers.

Guidance. A guided step (``StepOptions.guided``) reads the conditional output (``model_output``), the
unconditional one (``uncond``, same layout) and the per-sample scale ``guidance[b]`` and forms
``g = u + w (c - u)`` in registers before the x0/eps conversion; with learned variances only the prediction
channels are guided and the variance channels are read from the conditional output. ``guidance_rescale > 0``
runs ``guidance.py``'s statistics pass first (``sampler_step_guidance_stats``) and the step multiplies ``g`` by
its sample's factor ``phi std(c) / std(g) + (1 - phi)``: two launches, one without rescale, no host sync. A
thresholded guided step computes the statistics once and passes them to the x0 pass and to the step.

No autograd: sampling is not differentiated.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import CONTIGUOUS, dense_format
from .._spec import StepOptions
from .guidance import guidance_kwargs, guidance_stats, guided_prediction, stats_layout
from .noise import NOISE_SCALARS, load_or_draw_noise, noise_kwargs, step_noise, takes_noise
from .threshold import bound_pred_x0, threshold_scale
from .utils import (
    PARAMETERIZATION_ID, ROW, as_rows, call_op, checked_index, compute_dtype, custom_op_with_out, div_rn, empty_dense,
    empty_dense_if, result_dtype, launch_per_sample, like_dense, load_tile, sample_tile, split_float, split_scalar,
    sqrt_rn, store_tile,
)

__all__ = ["SAMPLERS", "sampler_step_kernel", "sampler_step"]

# sampler -> (SAMPLER, EPS_TERM, X_TERM): its number in the kernel, and whether its step has a term in eps and
# one in x_t.
SAMPLERS = {
    "ddim": (0, True, False),
    "ddpm": (1, False, True),
}
DDIM = tl.constexpr(SAMPLERS["ddim"][0])
_TERMS = {number: (eps_term, x_term) for number, eps_term, x_term in SAMPLERS.values()}

# fixed_*_log give the same standard deviation as fixed_* (the reference says why); learned reads exp(v / 2);
# learned_range interpolates log-variances. Values >= 2 mean variance channels in model_output.
VARIANCE_ID = {
    "fixed_small": 0, "fixed_small_log": 0, "fixed_large": 1, "fixed_large_log": 1, "learned": 2,
    "learned_range": 3,
}


@triton.jit
def to_compute(value, COMPUTE_FP64: tl.constexpr):
    """``value`` in the compute dtype: float64 for float64 data, float32 otherwise."""
    if COMPUTE_FP64:
        return tl.cast(value, tl.float64)
    else:
        return tl.cast(value, tl.float32)


@triton.jit
def gather_step_alphas(alphas_cumprod_ptr, t, t_prev, T, SET_ALPHA_TO_ONE: tl.constexpr,
                       COMPUTE_FP64: tl.constexpr):
    """``(ab_t, ab_prev, 1 - ab_t, 1 - ab_prev, ab_prev - ab_t)`` of a step ``t -> t_prev``, in the compute
    dtype, from the float64 ``alphas_cumprod`` row.

    ``t_prev == -1`` gives ``ab_prev`` = 1 (``SET_ALPHA_TO_ONE``) or ``alphas_cumprod[0]``, as the reference;
    ``t`` outside [0, T) or ``t_prev`` outside [-1, T) gives NaN, with no memory access outside the row.

    Why float64 and these five: a step's coefficients are products and quotients of them (well conditioned in
    float32: a few ulps each), except that the three differences cancel. ``ab_prev - ab_t`` is ~1e-4 of
    ``ab_prev`` near t = 0, and the float32 table's ``alphas_cumprod`` carries a relative rounding error of
    ~6e-8, so the difference of float32 values is off by ~1e-3 relative there (DDPM's ``sqrt(ab_prev) beta /
    (1 - ab_t)`` at t = 1 -> 0 comes out 8e-5 off, several times the 1e-5 tolerance). Subtracted in float64
    from the float64 table and rounded once, each is within half a float32 ulp; the remaining math needs no
    float64 division, square root or logarithm (which run at 1/64 rate on many GPUs)."""
    t_in_range, t_safe = checked_index(t, T)
    ab_t = tl.load(alphas_cumprod_ptr + t_safe, mask=t_in_range, other=float("nan"))
    prev_in_range, prev_safe = checked_index(t_prev, T)
    ab_prev = tl.load(alphas_cumprod_ptr + prev_safe, mask=prev_in_range, other=float("nan"))
    if SET_ALPHA_TO_ONE:
        final = tl.full((), 1.0, tl.float64)
    else:
        final = tl.load(alphas_cumprod_ptr)
    ab_prev = tl.where(t_prev == -1, final, ab_prev)
    return (
        to_compute(ab_t, COMPUTE_FP64),
        to_compute(ab_prev, COMPUTE_FP64),
        to_compute(1.0 - ab_t, COMPUTE_FP64),
        to_compute(1.0 - ab_prev, COMPUTE_FP64),
        to_compute(ab_prev - ab_t, COMPUTE_FP64),
    )


@triton.jit
def ddim_coefficients(ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff, eta_hi, eta_lo,
                      COMPUTE_FP64: tl.constexpr):
    """DDIM: ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev))``. No term in x_t."""
    # eta^2 and 1 - eta^2 in float64 (a few scalar adds and multiplies) so eta near 1 keeps its digits
    eta64 = split_scalar(eta_hi, eta_lo, tl.float64)
    eta_sq = to_compute(eta64 * eta64, COMPUTE_FP64)
    one_minus_eta_sq = to_compute(1.0 - eta64 * eta64, COMPUTE_FP64)
    # 1 - ab_t / ab_prev = diff / ab_prev
    variance = div_rn(one_minus_ab_prev, one_minus_ab_t) * div_rn(ab_diff, ab_prev)
    sigma = to_compute(eta64, COMPUTE_FP64) * sqrt_rn(variance)
    # 1 - ab_prev - sigma^2 = (1 - ab_prev) ((1 - eta^2) + eta^2 y) with y = ab_t (1 - ab_prev) / ((1 - ab_t)
    # ab_prev): the same number without the cancellation (in float32 the subtraction form is off by ~1e-7
    # (1 - ab_prev) absolute, a large relative error in the small direction term that eta near 1 leaves at the
    # end of a chain; both terms are >= 0 for eta <= 1). Clamped at 0 so eta > 1 degrades to no direction
    # term, as the reference; a NaN (out-of-range step) stays NaN.
    y = div_rn(ab_t * one_minus_ab_prev, one_minus_ab_t * ab_prev)
    dir_sq = one_minus_ab_prev * (one_minus_eta_sq + eta_sq * y)
    dir_coef = sqrt_rn(tl.where(dir_sq < 0.0, 0.0, dir_sq))
    return sqrt_rn(ab_prev), dir_coef, tl.zeros_like(ab_t), sigma


@triton.jit
def ddpm_coefficients(t, ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff, model_var,
                      VARIANCE: tl.constexpr):
    """DDPM: ``x_prev = sqrt(ab_prev) beta / (1 - ab_t) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t
    + [t > 0] std z`` with ``alpha = ab_t / ab_prev``, ``beta = 1 - alpha`` and ``std`` by ``VARIANCE``
    (a tile for the learned variances ``model_var``). No term in eps."""
    alpha = div_rn(ab_t, ab_prev)
    beta = div_rn(ab_diff, ab_prev)  # 1 - ab_t / ab_prev without the cancellation
    coef_x0 = div_rn(sqrt_rn(ab_prev) * beta, one_minus_ab_t)
    coef_xt = div_rn(sqrt_rn(alpha) * one_minus_ab_prev, one_minus_ab_t)
    variance = div_rn(one_minus_ab_prev, one_minus_ab_t) * beta
    # diffusers clamps before any log; where, not maximum, so a NaN (out-of-range step) stays NaN
    variance = tl.where(variance < 1e-20, 1e-20, variance)
    if VARIANCE == 0:  # fixed_small(_log)
        std = sqrt_rn(variance)
    elif VARIANCE == 1:  # fixed_large(_log)
        std = sqrt_rn(beta)
    elif VARIANCE == 2:  # learned: the extra channels are the log-variance
        std = tl.exp(0.5 * model_var)
    else:  # learned_range: interpolate log(var) .. log(beta) by (v + 1) / 2
        min_log = tl.log(variance)
        max_log = tl.log(beta)
        frac = (model_var + 1.0) * 0.5
        std = tl.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
    # no noise at the last step (t == 0); an out-of-range t keeps the mask at 1 or has a NaN mean already
    nonzero_mask = (t > 0).to(ab_t.dtype)
    return coef_x0, tl.zeros_like(ab_t), coef_xt, nonzero_mask * std


@triton.jit
def step_coefficients(t, ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff, eta_hi, eta_lo, model_var,
                      SAMPLER: tl.constexpr, VARIANCE: tl.constexpr, COMPUTE_FP64: tl.constexpr):
    """``(c_x0, c_eps, c_x, c_noise)`` of sampler ``SAMPLER``'s step (module docstring)."""
    if SAMPLER == DDIM:
        c_x0, c_eps, c_x, c_noise = ddim_coefficients(ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff,
                                                      eta_hi, eta_lo, COMPUTE_FP64)
    else:  # DDPM
        c_x0, c_eps, c_x, c_noise = ddpm_coefficients(t, ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev,
                                                      ab_diff, model_var, VARIANCE)
    return c_x0, c_eps, c_x, c_noise


@triton.jit
def prediction_to_x0_eps(x, model_output, a_t, s_t, PARAMETERIZATION: tl.constexpr):
    """``(x0, eps)`` from the model's prediction, with ``a_t = sqrt(ab_t)`` and ``s_t = sqrt(1 - ab_t)``
    (whichever of the two a step does not use, the compiler drops)."""
    if PARAMETERIZATION == 0:  # eps
        x0 = div_rn(1.0, a_t) * x - div_rn(s_t, a_t) * model_output
        eps = model_output
    elif PARAMETERIZATION == 1:  # x0
        x0 = model_output
        eps = div_rn(x - a_t * model_output, s_t)
    else:  # v
        x0 = a_t * x - s_t * model_output
        eps = a_t * model_output + s_t * x
    return x0, eps


@triton.jit(do_not_specialize=NOISE_SCALARS)
def sampler_step_kernel(
    x_t_ptr, model_output_ptr, uncond_ptr, guidance_ptr, stats_ptr, noise_ptr, seed_ptr, philox_seed: tl.int64,
    philox_offset: tl.int64, sample_offset: tl.int64, t_ptr, t_prev_ptr, alphas_cumprod_ptr, out_ptr, x0_ptr, scale_ptr,
    eta_hi, eta_lo, clip_range_hi, clip_range_lo, rescale_hi, rescale_lo, n_splits, chunk, N, T, model_output_stride,
    batch_start, SAMPLER: tl.constexpr, EPS_TERM: tl.constexpr, X_TERM: tl.constexpr, PARAMETERIZATION: tl.constexpr,
    VARIANCE: tl.constexpr, CLIP_DENOISED: tl.constexpr, USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    SET_ALPHA_TO_ONE: tl.constexpr, ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr, RETURN_X0: tl.constexpr,
    THRESHOLD: tl.constexpr, X0_ONLY: tl.constexpr, GUIDED: tl.constexpr, RESCALE: tl.constexpr,
    COMPUTE_FP64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr
):
    sample, tile_start, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    # model_output_stride: N, or 2N with learned-variance channels after the prediction
    model_offs = sample.to(tl.int64) * model_output_stride + offs_in_sample
    # Data loads and noise first: none depends on t, so their latency overlaps the t -> coefficient chain.
    x = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, model_offs, mask, cd)
    if GUIDED:
        # the unconditional prediction (its variance channels, if any, are not read)
        uncond = load_tile(uncond_ptr, model_offs, mask, cd)
    if VARIANCE >= 2:
        model_var = load_tile(model_output_ptr, model_offs + N, mask, cd)
    else:
        model_var = model_output  # not read by fixed variances
    if ADD_NOISE:
        z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample_offset, sample, tile_start,
                               offs, mask, N, cd, HAS_NOISE, BLOCK)
    if GUIDED:
        model_output = guided_prediction(model_output, uncond, guidance_ptr, stats_ptr, sample, n_splits, chunk, N,
                                         rescale_hi, rescale_lo, cd, RESCALE, BLOCK_SPLIT)
    t = tl.load(t_ptr + sample)
    t_prev = tl.load(t_prev_ptr + sample)
    ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff = gather_step_alphas(
        alphas_cumprod_ptr, t, t_prev, T, SET_ALPHA_TO_ONE, COMPUTE_FP64
    )
    a_t = sqrt_rn(ab_t)
    s_t = sqrt_rn(one_minus_ab_t)
    x0, eps = prediction_to_x0_eps(x, model_output, a_t, s_t, PARAMETERIZATION)
    if X0_ONLY:
        # first pass of a thresholded step: the raw x0 (compute dtype) the per-sample scale is selected from
        store_tile(x0_ptr, offs, x0, mask)
        return
    x0 = bound_pred_x0(x0, scale_ptr, sample, clip_range_hi, clip_range_lo, THRESHOLD, CLIP_DENOISED)
    if USE_CLIPPED_MODEL_OUTPUT:
        eps = div_rn(x - a_t * x0, s_t)
    c_x0, c_eps, c_x, c_noise = step_coefficients(t, ab_t, ab_prev, one_minus_ab_t, one_minus_ab_prev, ab_diff,
                                                  eta_hi, eta_lo, model_var, SAMPLER, VARIANCE, COMPUTE_FP64)
    x_prev = c_x0 * x0
    if EPS_TERM:
        x_prev = x_prev + c_eps * eps
    if X_TERM:
        x_prev = x_prev + c_x * x
    if ADD_NOISE:
        x_prev = x_prev + c_noise * z
    store_tile(out_ptr, offs, x_prev, mask)
    if RETURN_X0:
        store_tile(x0_ptr, offs, x0, mask)


def _data(x_t: torch.Tensor, variance: int) -> torch.Tensor:
    """``x_t`` as the kernel reads it: learned variances index ``model_output``'s channel halves as contiguous
    data, so ``x_t`` (and with it every operand and output) is contiguous then; otherwise any dense format."""
    return x_t.contiguous() if variance >= 2 else x_t


def _data_format(x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, *_):
    return CONTIGUOUS if variance >= 2 else dense_format(x_t)


def _launch(x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, eta, clip_denoised,
            clip_range, set_alpha_to_one, use_clipped_model_output, add_noise, noise, seed, philox_seed,
            philox_offset, sample_offset, return_pred_x0, scale, uncond, guidance, stats, guidance_rescale, out,
            x0_only=False):
    """``sampler_step_op``'s arguments and ``out``: writes ``x_{t_prev}`` into ``out`` and returns x0 (zero
    elements unless ``return_pred_x0``). ``x0_only`` (with ``return_pred_x0``) writes only the raw x0, into
    ``out``."""
    x_t = _data(x_t, variance)
    x0 = out if x0_only else empty_dense_if(return_pred_x0, x_t, result_dtype(x_t, model_output, noise))
    x_t, batch, n = as_rows(x_t)
    if x_t.numel() == 0:
        return x0
    # the kernel reads t[b] at t_ptr + b: a strided view (t = steps[:, 0]) must be packed first
    t, t_prev = t.contiguous(), t_prev.contiguous()
    eps_term, x_term = _TERMS[sampler]
    eta_hi, eta_lo = split_float(eta)
    clip_range_hi, clip_range_lo = split_float(clip_range)
    if stats is not None:
        n_splits, _, _ = stats_layout(n, batch)
        if guidance is None or tuple(stats.shape) != (batch, n_splits, 4):
            raise ValueError(f"stats: expected the guidance statistics of shape ({batch}, {n_splits}, 4) of a "
                             f"guided step, got {tuple(stats.shape)}")
    launch_per_sample(
        sampler_step_kernel, x_t, n, batch, x_t_ptr=x_t,
        **guidance_kwargs(x_t, model_output, uncond, guidance, stats, guidance_rescale, n, batch, alphas_cumprod),
        **noise_kwargs(noise, seed, philox_seed, philox_offset, sample_offset, x_t, t),
        t_ptr=t, t_prev_ptr=t_prev, alphas_cumprod_ptr=alphas_cumprod, out_ptr=out,
        x0_ptr=x0 if return_pred_x0 else out, scale_ptr=alphas_cumprod if scale is None else scale, eta_hi=eta_hi,
        eta_lo=eta_lo, clip_range_hi=clip_range_hi, clip_range_lo=clip_range_lo, N=n, T=alphas_cumprod.shape[0],
        model_output_stride=2 * n if variance >= 2 else n, SAMPLER=sampler, EPS_TERM=eps_term, X_TERM=x_term,
        PARAMETERIZATION=parameterization, VARIANCE=variance, CLIP_DENOISED=clip_denoised,
        USE_CLIPPED_MODEL_OUTPUT=use_clipped_model_output, SET_ALPHA_TO_ONE=set_alpha_to_one,
        ADD_NOISE=add_noise and not x0_only, RETURN_X0=return_pred_x0, THRESHOLD=scale is not None,
        X0_ONLY=x0_only, COMPUTE_FP64=result_dtype(x_t, model_output, noise) == torch.float64,
    )
    return x0


@takes_noise
def _sampler_step(
    x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor,
    sampler: int, parameterization: int, variance: int, eta: float, clip_denoised: bool, clip_range: float,
    set_alpha_to_one: bool, use_clipped_model_output: bool, add_noise: bool,
    noise, seed, philox_seed, philox_offset, sample_offset, return_pred_x0: bool, scale: Optional[torch.Tensor],
    uncond: Optional[torch.Tensor], guidance: Optional[torch.Tensor], stats: Optional[torch.Tensor],
    guidance_rescale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_{t_prev}, x0)``; ``x0`` is a zero-element tensor unless ``return_pred_x0``. Noise keyed as in
    ``p_sample``; ``alphas_cumprod`` is the schedule's float64 row; ``scale`` (per-sample, compute dtype),
    when given, thresholds x0 instead of clipping. ``guidance`` (B,) given: ``model_output`` is the conditional
    output and ``uncond`` the unconditional one, combined as ``u + w (c - u)``; ``stats`` (from
    ``sampler_step_guidance_stats``) given: rescaled by ``guidance_rescale``."""
    out = empty_dense(_data(x_t, variance), result_dtype(x_t, model_output, noise))
    x0 = _launch(x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, eta,
                 clip_denoised, clip_range, set_alpha_to_one, use_clipped_model_output, add_noise, noise, seed,
                 philox_seed, philox_offset, sample_offset, return_pred_x0, scale, uncond, guidance, stats,
                 guidance_rescale, out)
    return out, x0


def _sampler_step_fake(x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, eta,
                       clip_denoised, clip_range, set_alpha_to_one, use_clipped_model_output, add_noise, noise, seed,
                       philox_seed, philox_offset, sample_offset, return_pred_x0, scale, uncond, guidance, stats,
                       guidance_rescale):
    x_t = _data(x_t, variance)
    dtype = result_dtype(x_t, model_output, noise)
    return empty_dense(x_t, dtype), empty_dense_if(return_pred_x0, x_t, dtype)


# sampler_step_out writes x_{t_prev} into out (which may be x_t) and returns x0.
sampler_step_op, sampler_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::sampler_step", _sampler_step, _sampler_step_fake, _launch, out_returns=torch.Tensor,
    data_format=_data_format,
)


@torch.library.custom_op("ddpm_kernels_triton::sampler_step_x0", mutates_args=())
def sampler_step_x0_op(
    x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor,
    parameterization: int, variance: int, uncond: Optional[torch.Tensor], guidance: Optional[torch.Tensor],
    stats: Optional[torch.Tensor], guidance_rescale: float
) -> torch.Tensor:
    """A step's unclipped x0 prediction in the compute dtype (float32; float64 for float64 data): the first
    pass of a thresholded step. It depends on ``t`` alone (``t_prev`` is read, not used); ``variance`` only
    sets how ``model_output`` is laid out (learned channels); guidance as in the step."""
    x0 = empty_dense(_data(x_t, variance), compute_dtype(result_dtype(x_t, model_output)))
    _launch(x_t, t, t_prev, model_output, alphas_cumprod, SAMPLERS["ddim"][0], parameterization, variance, 0.0,
            False, 1.0, True, False, False, None, None, 0, 0, 0, True, None, uncond, guidance, stats, guidance_rescale,
            x0, x0_only=True)
    return x0


@sampler_step_x0_op.register_fake
def _(x_t, t, t_prev, model_output, alphas_cumprod, parameterization, variance, uncond, guidance, stats,
      guidance_rescale):
    return empty_dense(_data(x_t, variance), compute_dtype(result_dtype(x_t, model_output)))


def _stats_rows(x_t: torch.Tensor) -> Tuple[int, int]:
    """``(batch, N)`` of the guided elements: ``x_t``'s samples (the prediction channels of the model output)."""
    batch = x_t.shape[0]
    return batch, (x_t.numel() // batch if batch else 0)


@torch.library.custom_op("ddpm_kernels_triton::sampler_step_guidance_stats", mutates_args=())
def guidance_stats_op(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    uncond: torch.Tensor,
    guidance: torch.Tensor,
    variance: int,
) -> torch.Tensor:
    """The first pass of a rescaled guided step (``guidance.py``): per-sample partial statistics of the
    conditional output and the guided one, ``(B, n_splits, 4)`` in ``guidance``'s dtype (the compute dtype),
    over the prediction channels (with learned variances, the first half of ``model_output``'s). ``x_t`` sets
    the layout the step reads them in; it must have elements."""
    x_t, batch, n = as_rows(_data(x_t, variance))
    return guidance_stats(like_dense(x_t, model_output), like_dense(x_t, uncond), guidance, n,
                          2 * n if variance >= 2 else n, batch)


@guidance_stats_op.register_fake
def _(x_t, model_output, uncond, guidance, variance):
    batch, n = _stats_rows(x_t)
    n_splits, _, _ = stats_layout(n, batch)
    return guidance.new_empty((batch, n_splits, 4))


def _step_options(opts: StepOptions):
    """``(sampler, parameterization, variance, eta, set_alpha_to_one, use_clipped_model_output)`` as the op
    takes them; each sampler's options, the others at values its coefficient function ignores."""
    sampler = SAMPLERS[opts.sampler][0]
    parameterization = PARAMETERIZATION_ID[opts.parameterization]
    if opts.sampler == "ddim":
        return sampler, parameterization, 0, float(opts.eta), opts.set_alpha_to_one, opts.use_clipped_model_output
    # DDPM's chain ends at alpha 1
    return sampler, parameterization, VARIANCE_ID[opts.variance_type], 0.0, True, False


def sampler_step(x_t, t, t_prev, model_output, schedule, opts, noise=None, generator=None, out=None, uncond=None,
                 guidance=None, sample_offset=0):
    """Backend entry of ``ddim_step`` and ``ddpm_step``: one step of sampler ``opts.sampler``. Returns
    ``x_{t_prev}``, or ``(x_{t_prev}, x0)`` with ``opts.return_pred_x0``. ``noise=None`` draws z in-kernel
    (Philox) when the step has noise; ``threshold_ratio`` adds a first pass and a per-sample selection
    (module docstring). ``opts.guided``: ``model_output`` is the conditional output, ``uncond`` the
    unconditional one and ``guidance`` the per-sample scale (B,), combined in the kernels; ``guidance_rescale``
    adds the statistics pass first."""
    sampler, parameterization, variance, eta, set_alpha_to_one, use_clipped_model_output = _step_options(opts)
    alphas_cumprod = schedule.coefficients64[ROW["alphas_cumprod"]]
    stats, rescale = None, 0.0
    # the operands may differ in dtype (each read in its own): the step computes in the promoted one's
    cd = compute_dtype(result_dtype(x_t, model_output, noise))
    if opts.guided:
        guidance = guidance.to(cd).contiguous()
        if opts.rescaled and x_t.numel() > 0:
            rescale = float(opts.guidance_rescale)
            stats = guidance_stats_op(x_t, model_output, uncond, guidance, variance)
    else:
        uncond = guidance = None
    guide = (uncond, guidance, stats, rescale)
    scale = None
    if opts.thresholded and x_t.numel() > 0:
        # the x0 pass computes in the step's dtype; only float64 noise with narrower data widens the step alone
        x_in = x_t if compute_dtype(result_dtype(x_t, model_output)) == cd else x_t.to(cd)
        x0 = sampler_step_x0_op(x_in, t, t_prev, model_output, alphas_cumprod, parameterization, variance, *guide)
        scale = threshold_scale(x0, opts.threshold_ratio, opts.threshold_max)
    args = (
        x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, eta, opts.clip_denoised,
        float(opts.clip_range), set_alpha_to_one, use_clipped_model_output, opts.adds_noise,
        *step_noise(opts.adds_noise, generator, x_t, noise), sample_offset, opts.return_pred_x0, scale, *guide,
    )
    x_prev, x0 = call_op(sampler_step_op, sampler_step_out_op, args, out)
    return (x_prev, x0) if opts.return_pred_x0 else x_prev
