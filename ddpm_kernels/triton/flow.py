"""The flow-matching family (rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, the model predicts
``v = eps - x0``): ``flow_interpolate`` and its backward, the Euler step ``flow_step`` with fused
classifier-free guidance, and ``flow_loss`` with its backward. The step kernel also serves the Euler steps on a
Karras sigma table (``x = x0 + sigma eps``; ``euler_step``, ``euler_ancestral_step``): every one of these steps
is, per element, an affine combination of the sample, the (guided) model output and the noise with per-sample
coefficients, so one kernel takes them all, a constexpr ``SAMPLER`` selecting the coefficient function
(``step_coefficients``) and the x0 conversion. References: ``ddpm_kernels.reference``'s
``flow_interpolate_ref``, ``flow_step_ref`` (``guided_output``), ``euler_step_ref`` and ``flow_loss_ref``.

Sigmas. A sigma reaches a kernel as a ``SigmaOperand``'s flat form (``ddpm_kernels._spec``): the element at
offset ``i`` of sample ``b``'s dense block reads ``flat[b * period + (i // repeat) % period]``, in the compute
dtype. ``period == 1`` (one sigma per sample, the common case) is a constexpr branch that loads one scalar per
program; per-token sigmas (``SIGMA_PER_TOKEN``) cost one integer division and one cached load per element.
The step's table form gathers ``sigmas[i]`` and ``sigmas[i + 1]`` by ``step_index[b]`` inside the kernel;
an index outside ``[0, len(sigmas) - 1)`` gives NaN for that sample and reads nothing.

Kernels, one launch each unless said:

    flow_interpolate_kernel      out = (1 - s) x0 + s noise;  BACKWARD: (1 - s) g and s g in one pass
    flow_step_kernel             v = c, or u + w[b] (c - u) (GUIDED), times factor[b] (RESCALE); by SAMPLER:
                                 flow             x' = x + (s_next - s) v
                                 flow_stochastic  x' = (1 - s_next) (x - s v) + s_next z
                                 euler            x += s_noise c_churn z (churn); x0, d = (x - x0) / s_hat from
                                                  v (eps / x0 / v at s); x' = x + (s_next - s_hat) d
                                 euler_ancestral  x0, d at s; x' = x + (s_down - s) d + s_up z
                                 (and x0 with RETURN_X0); per-sample coefficients from ``step_coefficients``
    guidance_stats_kernel        RESCALE's first pass (``guidance.py``, shared with the DDIM/DDPM step): per-sample
                                 mean and sum of squared deviations of c and of g = u + w (c - u), in partials
    flow_loss_kernel             one partial sum of weight(s) * err^2 (or |err|) per (sample, tile)
    flow_loss_reduce_kernel      one program: each sample's mean, then the batch mean (fixed order, no atomics)
    flow_loss_backward_kernel    grad * weight(s) * d loss / d err / (B N) for model_output (and +/- for x0 and
                                 noise when they need it), one pass

Guidance rescale (Lin et al. 2023, diffusers' ``rescale_noise_cfg``) needs the per-sample standard deviations
of ``c`` and ``g`` over the whole sample: ``guidance.py``'s statistics pass writes per-sample partials (mean and
sum of squared deviations, merged exactly), and the step kernel merges its sample's partials into
``factor = phi std(c) / std(g) + (1 - phi)`` (``guidance.rescale_factor``) and multiplies ``g`` by it. Two
launches, no host sync.

In-kernel noise (stochastic flow step, ancestral step, Euler step with churn; ``noise=None``) is keyed as
``utils`` describes, with the same counter layout as ``p_sample``: one stream per (key, sample, element),
independent of the launch configuration. A step without a noise term reads and draws none.

The Euler steps' float options (``gamma = min(s_churn / steps, sqrt(2) - 1)``, ``s_tmin``, ``s_tmax``,
``s_noise``) are passed as ``split_float3`` parts: float64 data compares its sigmas with the bounds exactly, as
the float64 reference does; float32 compares them with the bounds rounded to float32, as torch compares a
float32 tensor with a Python scalar.

Autograd: ``flow_interpolate`` w.r.t. ``x0`` and ``noise``; ``flow_loss`` w.r.t. ``model_output``, ``x0`` and
``noise`` (the target ``noise - x0`` is linear, so their gradients are the model output's, negated for noise).
Sigma gradients are left to the reference (the dispatcher sends such calls there). The steps are sampling
only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._layout import dense_format, in_format
from .guidance import block_split, guidance_stats, guided_prediction, stats_layout
from .utils import (
    sample_partial_sums,
    as_rows,
    call_op,
    custom_op_with_out,
    device_of,
    div_rn,
    empty_dense,
    exact_scalar,
    launch_config,
    launch_per_sample,
    like_dense,
    load_or_draw_noise,
    load_tile,
    loss_term_grad,
    loss_terms,
    noise_operands,
    PARAMETERIZATION_ID,
    register_loss_backward_autograd,
    result_dtype,
    sample_index,
    sample_tile,
    split_float,
    split_float3,
    sqrt_rn,
    step_noise,
    store_partial_sum,
    store_tile,
    zero_key,
)

__all__ = [
    "WEIGHTING_ID",
    "flow_interpolate_kernel",
    "flow_step_kernel",
    "flow_loss_kernel",
    "flow_loss_reduce_kernel",
    "flow_loss_backward_kernel",
    "flow_interpolate",
    "flow_step",
    "euler_step",
    "flow_loss",
]

WEIGHTING_ID = {"none": 0, "sigma_sqrt": 1, "cosmap": 2}
# cosmap's 2 / pi as two float32s (``split_float``) so float64 data keeps float64 accuracy
_TWO_OVER_PI = split_float(2.0 / math.pi)


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, PER_TOKEN: tl.constexpr):
    """The tile's sigma (module docstring, "Sigmas"): one scalar per sample, or one value per element."""
    if PER_TOKEN:
        index = sample.to(tl.int64) * period + (offs_in_sample // repeat) % period
        s = tl.load(sigma_ptr + index, mask=mask, other=0.0)
    else:
        s = tl.load(sigma_ptr + sample)
    return s


@triton.jit
def gather_sigma_pair(sigmas_ptr, step_index_ptr, sample, n_sigmas):
    """``(sigmas[i], sigmas[i + 1])`` with ``i = step_index[sample]``; NaN (and no memory access) for ``i``
    outside ``[0, n_sigmas - 1)``."""
    _, in_range, i_safe = sample_index(step_index_ptr, sample, n_sigmas - 1)
    s = tl.load(sigmas_ptr + i_safe, mask=in_range, other=float("nan"))
    s_next = tl.load(sigmas_ptr + i_safe + 1, mask=in_range, other=float("nan"))
    return s, s_next


@triton.jit
def flow_weight(s, two_over_pi_hi, two_over_pi_lo, WEIGHTING: tl.constexpr):
    """SD3's loss weighting of sigma ``s``: ``sigma_sqrt`` s^-2, ``cosmap`` 2 / (pi (1 - 2 s + 2 s^2))
    (``WEIGHTING`` 0, ``none``, is not called)."""
    if WEIGHTING == 1:
        w = div_rn(1.0, s * s)
    else:
        two_over_pi = tl.cast(two_over_pi_hi, s.dtype) + tl.cast(two_over_pi_lo, s.dtype)
        w = div_rn(two_over_pi, 1.0 - 2.0 * s + 2.0 * s * s)
    return w


# -------------------------------------------------------------------------------------------------- kernels
@triton.jit
def flow_interpolate_kernel(
    x0_ptr,
    noise_ptr,
    sigma_ptr,
    out_ptr,
    out_b_ptr,
    N,
    period,
    repeat,
    batch_start,
    SIGMA_PER_TOKEN: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward: ``out = (1 - s) x0 + s noise``. ``BACKWARD``: ``x0`` is the incoming gradient ``g``, ``out =
    (1 - s) g`` and ``out_b = s g`` (``noise`` is not read)."""
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    # math in the sigma's dtype (the compute dtype: float32, float64 for float64 data); one rounding at the store
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    x = load_tile(x0_ptr, offs, mask, cd)
    if not BACKWARD:
        y = load_tile(noise_ptr, offs, mask, cd)
    s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
    if BACKWARD:
        store_tile(out_ptr, offs, (1.0 - s) * x, mask)
        store_tile(out_b_ptr, offs, s * x, mask)
    else:
        store_tile(out_ptr, offs, (1.0 - s) * x + s * y, mask)


# The samplers of the step kernel (``SAMPLER``): the flow-matching Euler step, deterministic or re-noised, and
# the Euler steps on a Karras sigma table (``x = x0 + sigma eps``), with churn or ancestral.
SAMPLER_ID = {"flow": 0, "flow_stochastic": 1, "euler": 2, "euler_ancestral": 3}
FLOW = tl.constexpr(SAMPLER_ID["flow"])
FLOW_STOCHASTIC = tl.constexpr(SAMPLER_ID["flow_stochastic"])
EULER = tl.constexpr(SAMPLER_ID["euler"])
EULER_ANCESTRAL = tl.constexpr(SAMPLER_ID["euler_ancestral"])


@triton.jit
def step_coefficients(s, s_next, churn, s_tmin, s_tmax, SAMPLER: tl.constexpr):
    """One sample's ``(sigma_hat, c_churn, c_derivative, c_noise)`` from its ``(sigma, sigma_next)``, in their
    dtype (the compute dtype): the step is ``x += s_noise c_churn z`` (Euler with churn), then
    ``x' = x + c_derivative d + c_noise z`` with ``d`` the derivative at ``sigma_hat`` (``v`` for flow
    matching; the stochastic flow step instead re-noises ``x0`` to ``sigma_next``).

        flow              sigma_hat = sigma, c_derivative = sigma_next - sigma, c_noise = sigma_next
        euler             gamma = churn where s_tmin <= sigma <= s_tmax (else 0), sigma_hat = sigma (gamma + 1),
                          c_churn = sqrt(sigma_hat^2 - sigma^2), c_derivative = sigma_next - sigma_hat
        euler_ancestral   sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
                          c_derivative = sqrt(sigma_next^2 - sigma_up^2) - sigma, c_noise = sigma_up

    Each in the reference's order of operations (``reference.euler_step_ref``), correctly rounded; a NaN sigma
    (a bad step index) gives NaN coefficients."""
    s_hat = s
    c_churn = s * 0.0
    c_noise = s * 0.0
    if SAMPLER == EULER:
        gamma = tl.where((s_tmin <= s) & (s <= s_tmax), churn, 0.0)
        s_hat = s * (gamma + 1.0)
        c_churn = sqrt_rn(s_hat * s_hat - s * s)
        c_derivative = s_next - s_hat
    elif SAMPLER == EULER_ANCESTRAL:
        s_up = sqrt_rn(div_rn(s_next * s_next * (s * s - s_next * s_next), s * s))
        c_derivative = sqrt_rn(s_next * s_next - s_up * s_up) - s
        c_noise = s_up
    else:
        c_derivative = s_next - s
        c_noise = s_next
    return s_hat, c_churn, c_derivative, c_noise


@triton.jit
def sigma_space_x0(x, v, s, s_hat, PARAMETERIZATION: tl.constexpr):
    """``(x0, (x - x0) / sigma_hat)`` of the Euler steps (``reference._euler_x0``): epsilon ``x - sigma_hat v``
    (the derivative is ``v`` itself), sample ``v``, v-prediction ``v c_out + x c_skip`` at ``sigma`` (diffusers'
    ``-sigma / sqrt(sigma^2 + 1)`` and ``1 / (sigma^2 + 1)``)."""
    if PARAMETERIZATION == 0:
        x0 = x - s_hat * v
        derivative = v
    else:
        if PARAMETERIZATION == 1:
            x0 = v
        else:
            s2_plus_1 = s * s + 1.0
            x0 = v * div_rn(-s, sqrt_rn(s2_plus_1)) + div_rn(x, s2_plus_1)
        derivative = div_rn(x - x0, s_hat)
    return x0, derivative


# The Philox key and offset are int64 whatever their value (see posterior_kernel).
@triton.jit(do_not_specialize=["philox_seed", "philox_offset", "sample_offset"])
def flow_step_kernel(
    sample_ptr,
    model_output_ptr,
    uncond_ptr,
    guidance_ptr,
    stats_ptr,
    noise_ptr,
    seed_ptr,
    philox_seed: tl.int64,
    philox_offset: tl.int64,
    sample_offset: tl.int64,
    sigma_ptr,
    sigma_next_ptr,
    step_index_ptr,
    n_sigmas,
    period,
    repeat,
    period_next,
    repeat_next,
    rescale_hi,
    rescale_lo,
    n_splits,
    chunk,
    churn_hi,
    churn_mid,
    churn_lo,
    s_tmin_hi,
    s_tmin_mid,
    s_tmin_lo,
    s_tmax_hi,
    s_tmax_mid,
    s_tmax_lo,
    s_noise_hi,
    s_noise_mid,
    s_noise_lo,
    out_ptr,
    x0_ptr,
    N,
    batch_start,
    SAMPLER: tl.constexpr,
    PARAMETERIZATION: tl.constexpr,
    TABLE: tl.constexpr,
    SIGMA_PER_TOKEN: tl.constexpr,
    SIGMA_NEXT_PER_TOKEN: tl.constexpr,
    GUIDED: tl.constexpr,
    RESCALE: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RETURN_X0: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    sample, tile_start, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    # data loads and noise first: none depends on the sigma gather, so their latency overlaps it
    x = load_tile(sample_ptr, offs, mask, cd)
    v = load_tile(model_output_ptr, offs, mask, cd)
    if GUIDED:
        u = load_tile(uncond_ptr, offs, mask, cd)
    if ADD_NOISE:
        z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample_offset, sample, tile_start,
                               offs, mask, N, cd, HAS_NOISE, BLOCK)
    if TABLE:
        s, s_next = gather_sigma_pair(sigma_ptr, step_index_ptr, sample, n_sigmas)
    else:
        s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
        s_next = sigma_at(sigma_next_ptr, sample, offs_in_sample, mask, period_next, repeat_next,
                          SIGMA_NEXT_PER_TOKEN)
    if GUIDED:
        v = guided_prediction(v, u, guidance_ptr, stats_ptr, sample, n_splits, chunk, N, rescale_hi, rescale_lo, cd,
                              RESCALE, BLOCK_SPLIT)
    s_hat, c_churn, c_derivative, c_noise = step_coefficients(
        s, s_next, exact_scalar(churn_hi, churn_mid, churn_lo, cd), exact_scalar(s_tmin_hi, s_tmin_mid, s_tmin_lo, cd),
        exact_scalar(s_tmax_hi, s_tmax_mid, s_tmax_lo, cd), SAMPLER,
    )
    if SAMPLER == FLOW or SAMPLER == FLOW_STOCHASTIC:
        x0 = x - s * v
        derivative = v
    else:
        if SAMPLER == EULER and ADD_NOISE:
            x = x + z * exact_scalar(s_noise_hi, s_noise_mid, s_noise_lo, cd) * c_churn
        x0, derivative = sigma_space_x0(x, v, s, s_hat, PARAMETERIZATION)
    if SAMPLER == FLOW_STOCHASTIC:
        result = (1.0 - s_next) * x0 + c_noise * z
    elif SAMPLER == EULER_ANCESTRAL:
        result = x + derivative * c_derivative + z * c_noise
    else:
        result = x + derivative * c_derivative
    store_tile(out_ptr, offs, result, mask)
    if RETURN_X0:
        store_tile(x0_ptr, offs, x0, mask)


@triton.jit
def flow_loss_kernel(
    model_output_ptr,
    x0_ptr,
    noise_ptr,
    sigma_ptr,
    partial_ptr,
    period,
    repeat,
    two_over_pi_hi,
    two_over_pi_lo,
    N,
    n_tiles,
    batch_start,
    WEIGHTING: tl.constexpr,
    SIGMA_PER_TOKEN: tl.constexpr,
    LOSS_L1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    noise = load_tile(noise_ptr, offs, mask, cd)
    x0 = load_tile(x0_ptr, offs, mask, cd)
    per_element = loss_terms(model_output - (noise - x0), LOSS_L1)
    if WEIGHTING != 0:
        s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
        per_element = flow_weight(s, two_over_pi_hi, two_over_pi_lo, WEIGHTING) * per_element
    store_partial_sum(partial_ptr, per_element, mask, sample, n_tiles)


@triton.jit
def flow_loss_reduce_kernel(
    partial_ptr,
    loss_ptr,
    B,
    N,
    n_tiles,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cd: tl.constexpr = partial_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_B,), dtype=cd)
    b0 = 0
    while b0 < B:
        samples = b0 + tl.arange(0, BLOCK_B)
        in_batch = samples < B
        sample_sum = sample_partial_sums(partial_ptr, samples, in_batch, n_tiles, cd, BLOCK_B, BLOCK_P)
        acc += tl.where(in_batch, div_rn(sample_sum, tl.cast(N, cd)), 0.0)
        b0 += BLOCK_B
    tl.store(loss_ptr, div_rn(tl.sum(acc, axis=0), tl.cast(B, cd)).to(loss_ptr.dtype.element_ty))


@triton.jit
def flow_loss_backward_kernel(
    model_output_ptr,
    x0_ptr,
    noise_ptr,
    sigma_ptr,
    grad_loss_ptr,
    grad_model_output_ptr,
    grad_x0_ptr,
    grad_noise_ptr,
    period,
    repeat,
    two_over_pi_hi,
    two_over_pi_lo,
    B,
    N,
    batch_start,
    WEIGHTING: tl.constexpr,
    SIGMA_PER_TOKEN: tl.constexpr,
    LOSS_L1: tl.constexpr,
    GRAD_X0: tl.constexpr,
    GRAD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    noise = load_tile(noise_ptr, offs, mask, cd)
    x0 = load_tile(x0_ptr, offs, mask, cd)
    # the two means' 1 / (B N), with the incoming gradient read from device memory (no host sync)
    grad_scale = div_rn(tl.load(grad_loss_ptr).to(cd), tl.cast(B, cd) * tl.cast(N, cd))
    d_err = loss_term_grad(model_output - (noise - x0), cd, LOSS_L1)
    if WEIGHTING != 0:
        s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
        grad_scale = grad_scale * flow_weight(s, two_over_pi_hi, two_over_pi_lo, WEIGHTING)
    grad = grad_scale * d_err
    store_tile(grad_model_output_ptr, offs, grad, mask)
    # err = model_output - noise + x0
    if GRAD_X0:
        store_tile(grad_x0_ptr, offs, grad, mask)
    if GRAD_NOISE:
        store_tile(grad_noise_ptr, offs, -grad, mask)


# ------------------------------------------------------------------------------------------ flow_interpolate
def _interpolate_launch(x0, noise, sigma, period, repeat, out, out_b=None):
    """Forward (``out_b`` None) into ``out``, or backward of the gradient ``x0`` into ``out`` and ``out_b``."""
    x0, batch, n = as_rows(x0)
    if x0.numel() == 0:
        return
    backward = out_b is not None
    launch_per_sample(
        flow_interpolate_kernel, x0, n, batch, x0, x0 if backward else like_dense(x0, noise), sigma, out,
        out_b if backward else out, n, period, repeat, SIGMA_PER_TOKEN=period > 1, BACKWARD=backward,
    )


def _flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, period: int,
                      repeat: int) -> torch.Tensor:
    """``(1 - s) x0 + s noise`` with ``sigma`` a ``SigmaOperand``'s flat form of ``x0``'s layout, in the
    promoted dtype of ``x0`` and ``noise`` (each read in its own)."""
    out = empty_dense(x0, result_dtype(x0, noise))
    _interpolate_launch(x0, noise, sigma, period, repeat, out)
    return out


def _flow_interpolate_fake(x0, noise, sigma, period, repeat):
    return empty_dense(x0, result_dtype(x0, noise))


# flow_interpolate_out writes into out, which may alias x0 or noise.
flow_interpolate_op, flow_interpolate_out_op = custom_op_with_out(
    "ddpm_kernels_triton::flow_interpolate", _flow_interpolate, _flow_interpolate_fake,
    lambda x0, noise, sigma, period, repeat, out: _interpolate_launch(x0, noise, sigma, period, repeat, out),
)


@torch.library.custom_op("ddpm_kernels_triton::flow_interpolate_backward", mutates_args=())
def flow_interpolate_backward_op(
    grad: torch.Tensor, sigma: torch.Tensor, period: int, repeat: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - s) grad, s grad)`` in one pass, in ``grad``'s dense format (which must be the forward's)."""
    grad_x0, grad_noise = empty_dense(grad), empty_dense(grad)
    _interpolate_launch(grad, None, sigma, period, repeat, grad_x0, grad_noise)
    return grad_x0, grad_noise


@flow_interpolate_backward_op.register_fake
def _(grad, sigma, period, repeat):
    return empty_dense(grad), empty_dense(grad)


def _interpolate_setup_context(ctx, inputs, output):
    x0, _, sigma, period, repeat = inputs
    ctx.save_for_backward(sigma)
    ctx.period, ctx.repeat = period, repeat
    # a per-element sigma is laid out in the forward's storage order: the gradient must be read in it
    ctx.memory_format = dense_format(x0)


def _interpolate_backward(ctx, grad):
    (sigma,) = ctx.saved_tensors
    grad_x0, grad_noise = flow_interpolate_backward_op(in_format(grad, ctx.memory_format), sigma, ctx.period,
                                                       ctx.repeat)
    return (grad_x0 if ctx.needs_input_grad[0] else None, grad_noise if ctx.needs_input_grad[1] else None,
            None, None, None)


flow_interpolate_op.register_autograd(_interpolate_backward, setup_context=_interpolate_setup_context)


def _interpolate_backward_setup_context(ctx, inputs, output):
    grad, sigma, period, repeat = inputs
    ctx.save_for_backward(sigma)
    ctx.period, ctx.repeat, ctx.memory_format = period, repeat, dense_format(grad)


def _interpolate_backward_backward(ctx, gg_x0, gg_noise):
    """The backward is linear in ``grad``: its adjoint ``(1 - s) gg_x0 + s gg_noise`` is the forward, read in
    the layout the per-element sigma was laid out in."""
    if not ctx.needs_input_grad[0] or (gg_x0 is None and gg_noise is None):
        return None, None, None, None
    (sigma,) = ctx.saved_tensors
    like = gg_noise if gg_x0 is None else gg_x0
    gg_x0 = torch.zeros_like(like) if gg_x0 is None else gg_x0
    gg_noise = torch.zeros_like(like) if gg_noise is None else gg_noise
    grad = flow_interpolate_op(in_format(gg_x0, ctx.memory_format), in_format(gg_noise, ctx.memory_format), sigma,
                               ctx.period, ctx.repeat)
    return grad, None, None, None


flow_interpolate_backward_op.register_autograd(_interpolate_backward_backward,
                                              setup_context=_interpolate_backward_setup_context)


def flow_interpolate(x0, noise, sigma, out=None):
    """Backend entry with ``reference.flow_interpolate_ref``'s signature (``sigma`` a ``SigmaOperand``)."""
    args = (x0, noise, sigma.flat.detach(), sigma.period, sigma.repeat)
    return call_op(flow_interpolate_op, flow_interpolate_out_op, args, out, differentiable=(x0, noise))


# ------------------------------------------------------------------------------------------------ flow_step
_NO_OPTIONS = (0.0,) * 12  # churn, s_tmin, s_tmax, s_noise as split_float3 parts: read by the Euler samplers only


def _launch_step(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, sampler, parameterization, options, guidance_rescale, noise, seed, philox_seed,
                 philox_offset, sample_offset, out, x0=None):
    """One launch of ``flow_step_kernel`` (after the rescale statistics pass when guided with rescale): writes the
    step into ``out`` and, when ``x0`` is given, the x0 prediction into it. ``options``: ``_NO_OPTIONS`` or the
    Euler step's (``_euler_options``). Only a step with a noise term (flow_stochastic, euler_ancestral, euler with
    churn) reads ``noise``, or draws with ``seed`` / ``philox_seed`` / ``philox_offset`` (``noise_key``), rows
    ``sample_offset ..`` of the noise stream, when it is None."""
    x, batch, n = as_rows(sample)
    if x.numel() == 0:
        return
    guided = guidance is not None
    rescale = guided and guidance_rescale > 0
    cond = like_dense(x, model_output)
    uncond = like_dense(x, uncond) if guided else cond
    stats, n_splits, chunk = sigma, 1, n  # stand-ins, not read without RESCALE
    if rescale:
        stats = guidance_stats(cond, uncond, guidance, n, n, batch)
        n_splits, chunk, _ = stats_layout(n, batch)
    key_standin = zero_key(x.device)
    add_noise = sampler in (SAMPLER_ID["flow_stochastic"], SAMPLER_ID["euler_ancestral"]) or (
        sampler == SAMPLER_ID["euler"] and options[0] > 0)  # churn > 0
    noise, seed, has_noise = noise_operands(noise if add_noise else None, seed, x, key_standin)
    table = step_index is not None
    rescale_hi, rescale_lo = split_float(guidance_rescale)
    launch_per_sample(
        flow_step_kernel, x, n, batch,
        sample_ptr=x, model_output_ptr=cond, uncond_ptr=uncond, guidance_ptr=guidance if guided else sigma,
        stats_ptr=stats, noise_ptr=noise, seed_ptr=seed, philox_seed=philox_seed, philox_offset=philox_offset,
        sample_offset=sample_offset,
        sigma_ptr=sigma, sigma_next_ptr=sigma_next, step_index_ptr=step_index if table else key_standin,
        n_sigmas=sigma.shape[0], period=period, repeat=repeat, period_next=period_next, repeat_next=repeat_next,
        rescale_hi=rescale_hi, rescale_lo=rescale_lo, n_splits=n_splits, chunk=chunk,
        **dict(zip(_OPTION_ARGS, options)), out_ptr=out, x0_ptr=out if x0 is None else x0, N=n,
        SAMPLER=sampler, PARAMETERIZATION=parameterization, TABLE=table,
        SIGMA_PER_TOKEN=not table and period > 1, SIGMA_NEXT_PER_TOKEN=not table and period_next > 1,
        GUIDED=guided, RESCALE=rescale, ADD_NOISE=add_noise, HAS_NOISE=has_noise, RETURN_X0=x0 is not None,
        BLOCK_SPLIT=block_split(n_splits),
    )


_OPTION_ARGS = tuple(f"{name}_{part}" for name in ("churn", "s_tmin", "s_tmax", "s_noise")
                     for part in ("hi", "mid", "lo"))


def _step_launch(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, stochastic, guidance_rescale, noise, seed, philox_seed, philox_offset, sample_offset,
                 out):
    """``flow_step_op``'s arguments and ``out``."""
    sampler = SAMPLER_ID["flow_stochastic" if stochastic else "flow"]
    _launch_step(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, sampler, 0, _NO_OPTIONS, guidance_rescale, noise, seed, philox_seed, philox_offset,
                 sample_offset, out)


def _flow_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    uncond: Optional[torch.Tensor],
    guidance: Optional[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    step_index: Optional[torch.Tensor],
    period: int,
    repeat: int,
    period_next: int,
    repeat_next: int,
    stochastic: bool,
    guidance_rescale: float,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    philox_seed: int,
    philox_offset: int,
    sample_offset: int,
) -> torch.Tensor:
    """One Euler step. ``step_index`` given: ``sigma`` is the sigma table (``sigma_next`` too, unread) and each
    sample gathers its pair; else ``sigma`` / ``sigma_next`` are ``SigmaOperand`` flat forms with their
    ``period`` and ``repeat``. ``guidance`` (B,) given: ``model_output`` is the conditional output and
    ``uncond`` the unconditional one. Noise keyed as in ``p_sample`` (``utils``, "Noise"). The result has the
    promoted dtype of the float operands, each read in its own (``sigma``: the compute dtype)."""
    out = empty_dense(sample, result_dtype(sample, model_output, uncond, noise))
    _step_launch(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, stochastic, guidance_rescale, noise, seed, philox_seed, philox_offset, sample_offset, out)
    return out


def _flow_step_fake(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat,
                    period_next, repeat_next, stochastic, guidance_rescale, noise, *_):
    return empty_dense(sample, result_dtype(sample, model_output, uncond, noise))


# flow_step_out writes into out, which may be sample itself (an in-place step).
flow_step_op, flow_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::flow_step", _flow_step, _flow_step_fake, _step_launch
)


def flow_step(sample, model_output, uncond, guidance, sigmas, step_index, sigma, sigma_next, opts, noise=None,
              generator=None, out=None, sample_offset=0):
    """Backend entry with ``reference.flow_step_ref``'s signature (``opts`` a ``FlowStepOptions``)."""
    if sigmas is not None:
        sigma_args = (sigmas, sigmas, step_index, 1, 1, 1, 1)
    else:
        sigma_args = (sigma.flat.detach(), sigma_next.flat.detach(), None, sigma.period, sigma.repeat,
                      sigma_next.period, sigma_next.repeat)
    noise_args = step_noise(opts.stochastic, generator, sample, noise)
    guided = opts.guided
    args = (
        sample, model_output, uncond if guided else None, guidance if guided else None, *sigma_args,
        opts.stochastic, float(opts.guidance_rescale) if guided else 0.0, *noise_args, sample_offset,
    )
    return call_op(flow_step_op, flow_step_out_op, args, out)


# ----------------------------------------------------------------------------------- euler_step (sigma table)
def _euler_options(churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple:
    """The Euler step's float options as the kernel reads them: ``split_float3`` parts, exact in float64."""
    return sum((split_float3(value) for value in (churn, s_tmin, s_tmax, s_noise)), ())


def _pred_x0_output(sample: torch.Tensor, return_pred_x0: bool, dtype: torch.dtype) -> torch.Tensor:
    """The step's x0 output in ``dtype`` (the result's): in ``sample``'s dense format with ``return_pred_x0``,
    else zero elements."""
    return empty_dense(sample, dtype) if return_pred_x0 else sample.new_empty(0, dtype=dtype)


def _euler_launch(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                  s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, seed, philox_seed, philox_offset,
                  sample_offset, out):
    """``euler_step_op``'s arguments and ``out``: writes the step into ``out`` and returns x0 (zero elements
    unless ``return_pred_x0``)."""
    x0 = _pred_x0_output(sample, return_pred_x0, result_dtype(sample, model_output, uncond, noise))
    _launch_step(sample, model_output, uncond, guidance, sigmas, sigmas, step_index, 1, 1, 1, 1, sampler,
                 parameterization, _euler_options(churn, s_tmin, s_tmax, s_noise), guidance_rescale, noise, seed,
                 philox_seed, philox_offset, sample_offset, out, x0 if return_pred_x0 else None)
    return x0


def _euler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    uncond: Optional[torch.Tensor],
    guidance: Optional[torch.Tensor],
    sigmas: torch.Tensor,
    step_index: torch.Tensor,
    sampler: int,
    parameterization: int,
    churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    guidance_rescale: float,
    return_pred_x0: bool,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    philox_seed: int,
    philox_offset: int,
    sample_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler (``sampler`` ``SAMPLER_ID["euler"]``) or ancestral Euler step on the sigma table ``sigmas``
    (the compute dtype), each sample at ``step_index[b]``: ``(x', x0)``, ``x0`` a zero-element tensor unless
    ``return_pred_x0``. ``churn`` is ``min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)`` (0: no churn, no noise);
    ``parameterization`` a ``PARAMETERIZATION_ID``; guidance as in ``flow_step``; noise keyed as in ``p_sample``
    (``utils``, "Noise"). Results in the promoted dtype of the float operands, each read in its own."""
    out = empty_dense(sample, result_dtype(sample, model_output, uncond, noise))
    x0 = _euler_launch(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                       s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, seed, philox_seed,
                       philox_offset, sample_offset, out)
    return out, x0


def _euler_step_fake(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                     s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, *_):
    dtype = result_dtype(sample, model_output, uncond, noise)
    return empty_dense(sample, dtype), _pred_x0_output(sample, return_pred_x0, dtype)


# euler_step_out writes x' into out (which may be sample itself) and returns x0.
euler_step_op, euler_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::euler_step", _euler_step, _euler_step_fake, _euler_launch, out_returns=torch.Tensor
)


def euler_step(sample, model_output, uncond, guidance, sigmas, step_index, opts, noise=None, generator=None,
               out=None, sample_offset=0):
    """Backend entry of ``euler_step`` and ``euler_ancestral_step`` with ``reference.euler_step_ref``'s signature
    (``opts`` an ``EulerStepOptions``): ``x'``, or ``(x', x0)`` with ``opts.return_pred_x0``. ``noise=None``
    draws z in-kernel when the step has noise (ancestral; Euler with ``s_churn > 0``), else nothing is read or
    drawn."""
    churn = 0.0
    if opts.sampler == "euler":
        churn = min(opts.s_churn / (sigmas.shape[0] - 1), 2 ** 0.5 - 1)
    guided = opts.guided
    args = (
        sample, model_output, uncond if guided else None, guidance if guided else None, sigmas, step_index,
        SAMPLER_ID[opts.sampler], PARAMETERIZATION_ID[opts.parameterization], float(churn), float(opts.s_tmin),
        float(opts.s_tmax), float(opts.s_noise), float(opts.guidance_rescale) if guided else 0.0,
        bool(opts.return_pred_x0), *step_noise(opts.adds_noise, generator, sample, noise), sample_offset,
    )
    result, x0 = call_op(euler_step_op, euler_step_out_op, args, out)
    return (result, x0) if opts.return_pred_x0 else result


# ------------------------------------------------------------------------------------------------ flow_loss
REDUCE_BLOCK_B = 32
REDUCE_BLOCK_P = 128


@torch.library.custom_op("ddpm_kernels_triton::flow_loss", mutates_args=())
def flow_loss_op(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    period: int,
    repeat: int,
    weighting: int,
    loss_l1: bool,
) -> torch.Tensor:
    """The 0-d loss in the sigma's dtype (the compute dtype)."""
    model_output, batch, n = as_rows(model_output)
    x0, noise = like_dense(model_output, x0), like_dense(model_output, noise)
    device = model_output.device
    if model_output.numel() == 0:
        # a mean over nothing: NaN, as torch's mean gives
        return torch.full((), float("nan"), dtype=sigma.dtype, device=device)
    loss = torch.empty((), dtype=sigma.dtype, device=device)
    config = launch_config(n, batch)
    n_tiles = triton.cdiv(n, config[0])
    partial = torch.empty((batch, n_tiles), dtype=sigma.dtype, device=device)
    launch_per_sample(
        flow_loss_kernel, model_output, n, batch, model_output, x0, noise, sigma, partial, period, repeat,
        *_TWO_OVER_PI, n, n_tiles, WEIGHTING=weighting, SIGMA_PER_TOKEN=period > 1, LOSS_L1=loss_l1, config=config,
    )
    with device_of(model_output):
        flow_loss_reduce_kernel[(1,)](
            partial, loss, batch, n, n_tiles, BLOCK_B=min(REDUCE_BLOCK_B, triton.next_power_of_2(batch)),
            BLOCK_P=min(REDUCE_BLOCK_P, triton.next_power_of_2(n_tiles)), num_warps=4,
        )
    return loss


@flow_loss_op.register_fake
def _(model_output, x0, noise, sigma, period, repeat, weighting, loss_l1):
    return sigma.new_empty(())


def _loss_gradients(model_output, x0, noise, grad_x0_needed: bool, grad_noise_needed: bool) -> tuple:
    """The loss backward's outputs: each gradient in its input's dtype (a mixed call's bf16 model output gets a
    bf16 gradient, stored once), in ``model_output``'s dense format; one not needed has zero elements."""
    def grad(y, needed):
        return empty_dense(model_output, y.dtype) if needed else model_output.new_empty(0, dtype=y.dtype)

    return empty_dense(model_output), grad(x0, grad_x0_needed), grad(noise, grad_noise_needed)


@torch.library.custom_op("ddpm_kernels_triton::flow_loss_backward", mutates_args=())
def flow_loss_backward_op(
    grad_loss: torch.Tensor,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    period: int,
    repeat: int,
    weighting: int,
    loss_l1: bool,
    grad_x0_needed: bool,
    grad_noise_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_model_output, grad_x0, grad_noise), in ``model_output``'s dense format, each in its input's dtype;
    a gradient not needed comes back as an empty tensor."""
    model_output, batch, n = as_rows(model_output)
    x0, noise = like_dense(model_output, x0), like_dense(model_output, noise)
    grad_model_output, grad_x0, grad_noise = _loss_gradients(model_output, x0, noise, grad_x0_needed,
                                                             grad_noise_needed)
    if model_output.numel() == 0:
        return grad_model_output, grad_x0, grad_noise
    launch_per_sample(
        flow_loss_backward_kernel, model_output, n, batch, model_output, x0, noise, sigma, grad_loss.contiguous(),
        grad_model_output, grad_x0 if grad_x0_needed else grad_model_output,
        grad_noise if grad_noise_needed else grad_model_output, period, repeat, *_TWO_OVER_PI, batch, n,
        WEIGHTING=weighting, SIGMA_PER_TOKEN=period > 1, LOSS_L1=loss_l1, GRAD_X0=grad_x0_needed,
        GRAD_NOISE=grad_noise_needed,
    )
    return grad_model_output, grad_x0, grad_noise


@flow_loss_backward_op.register_fake
def _(grad_loss, model_output, x0, noise, sigma, period, repeat, weighting, loss_l1, grad_x0_needed,
      grad_noise_needed):
    return _loss_gradients(model_output, x0, noise, grad_x0_needed, grad_noise_needed)


def _loss_setup_context(ctx, inputs, output):
    model_output, x0, noise, sigma, period, repeat, weighting, loss_l1 = inputs
    ctx.save_for_backward(model_output, x0, noise, sigma)
    ctx.config = (period, repeat, weighting, loss_l1)


def _loss_backward(ctx, grad_loss):
    model_output, x0, noise, sigma = ctx.saved_tensors
    need_x0, need_noise = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_model_output, grad_x0, grad_noise = flow_loss_backward_op(
        grad_loss, model_output, x0, noise, sigma, *ctx.config, need_x0, need_noise
    )
    return (grad_model_output if ctx.needs_input_grad[0] else None, grad_x0 if need_x0 else None,
            grad_noise if need_noise else None, None, None, None, None, None)


flow_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
# gradients of the gradients (argument 8 is loss_l1)
register_loss_backward_autograd(flow_loss_backward_op, n_grads=1, loss_l1=8)


def flow_loss(model_output, x0, noise, sigma, weighting="none", loss_type="l2"):
    """Backend entry with ``reference.flow_loss_ref``'s signature (``sigma`` a ``SigmaOperand``)."""
    return flow_loss_op(model_output, x0, noise, sigma.flat.detach(), sigma.period, sigma.repeat,
                        WEIGHTING_ID[weighting], loss_type == "l1")
