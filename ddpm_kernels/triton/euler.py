"""The Euler step on sigmas: one kernel (``flow_step_kernel``) for flow matching's Euler step (``flow_step``,
``x_sigma = (1 - sigma) x0 + sigma eps``, the model predicting ``v = eps - x0``; op and entry in ``flow.py``) and
the Euler steps on a Karras sigma table (``x = x0 + sigma eps``; ``euler_step``, ``euler_ancestral_step``, op
and entry here). Every one of these steps is, per element, an affine combination of the sample, the (guided)
model output and the noise with per-sample coefficients, so one kernel takes them all, a constexpr ``SAMPLER``
selecting the coefficient function (``step_coefficients``) and the x0 conversion. References:
``ddpm_kernels.reference``'s ``flow_step_ref`` (``guided_output``) and ``euler_step_ref``.

    flow_step_kernel    v = c, or u + w[b] (c - u) (GUIDED), times factor[b] (RESCALE); by SAMPLER:
                        flow             x' = x + (s_next - s) v
                        flow_stochastic  x' = (1 - s_next) (x - s v) + s_next z
                        euler            x += s_noise c_churn z (churn); x0, d = (x - x0) / s_hat from
                                         v (eps / x0 / v at s); x' = x + (s_next - s_hat) d
                        euler_ancestral  x0, d at s; x' = x + (s_down - s) d + s_up z
                        (and x0 with RETURN_X0); per-sample coefficients from ``step_coefficients``

Sigmas are read as ``flow.py`` describes ("Sigmas"; ``utils.sigma_at``), or, in the table form (``TABLE``),
gathered as ``sigmas[i]`` and ``sigmas[i + 1]`` by ``step_index[b]`` inside the kernel; an index outside
``[0, len(sigmas) - 1)`` gives NaN for that sample and reads nothing.

Guidance rescale (Lin et al. 2023, diffusers' ``rescale_noise_cfg``) needs the per-sample standard deviations
of ``c`` and ``g`` over the whole sample: ``guidance.py``'s statistics pass writes per-sample partials (mean and
sum of squared deviations, merged exactly), and the step kernel merges its sample's partials into
``factor = phi std(c) / std(g) + (1 - phi)`` (``guidance.rescale_factor``) and multiplies ``g`` by it. Two
launches, no host sync.

In-kernel noise (stochastic flow step, ancestral step, Euler step with churn; ``noise=None``) is keyed as
``noise.py`` describes, with the same counter layout as ``p_sample``: one stream per (key, sample, element),
independent of the launch configuration. A step without a noise term reads and draws none.

The Euler steps' float options (``gamma = min(s_churn / steps, sqrt(2) - 1)``, ``s_tmin``, ``s_tmax``,
``s_noise``) are passed as ``split_float3`` parts: float64 data compares its sigmas with the bounds exactly, as
the float64 reference does; float32 compares them with the bounds rounded to float32, as torch compares a
float32 tensor with a Python scalar.

Sampling only: no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .guidance import guidance_kwargs, guidance_stats, guided_prediction, guided_step
from .noise import NOISE_SCALARS, load_or_draw_noise, noise_kwargs, step_noise, takes_noise, zero_key
from .utils import (
    as_rows, call_op, custom_op_with_out, div_rn, empty_dense, empty_dense_if, exact_scalar, launch_per_sample,
    like_dense, load_tile, PARAMETERIZATION_ID, result_dtype, sample_index, sample_tile, sigma_at, split_float3,
    sqrt_rn, store_tile,
)

__all__ = ["SAMPLER_ID", "NO_OPTIONS", "flow_step_kernel", "launch_step", "euler_step"]


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def gather_sigma_pair(sigmas_ptr, step_index_ptr, sample, n_sigmas):
    """``(sigmas[i], sigmas[i + 1])`` with ``i = step_index[sample]``; NaN (and no memory access) for ``i``
    outside ``[0, n_sigmas - 1)``."""
    _, in_range, i_safe = sample_index(step_index_ptr, sample, n_sigmas - 1)
    s = tl.load(sigmas_ptr + i_safe, mask=in_range, other=float("nan"))
    s_next = tl.load(sigmas_ptr + i_safe + 1, mask=in_range, other=float("nan"))
    return s, s_next



# The samplers of the step kernel (``SAMPLER``): the flow-matching Euler step, deterministic or re-noised, and
# the Euler steps on a Karras sigma table (``x = x0 + sigma eps``), with churn or ancestral.
SAMPLER_ID = {"flow": 0, "flow_stochastic": 1, "euler": 2, "euler_ancestral": 3}
FLOW, FLOW_STOCHASTIC, EULER, EULER_ANCESTRAL = map(tl.constexpr, SAMPLER_ID.values())


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


@triton.jit(do_not_specialize=NOISE_SCALARS)
def flow_step_kernel(
    sample_ptr, model_output_ptr, uncond_ptr, guidance_ptr, stats_ptr, noise_ptr, seed_ptr, philox_seed: tl.int64,
    philox_offset: tl.int64, sample_offset: tl.int64, sigma_ptr, sigma_next_ptr, step_index_ptr, n_sigmas, period,
    repeat, period_next, repeat_next, rescale_hi, rescale_lo, n_splits, chunk, churn_hi, churn_mid, churn_lo, s_tmin_hi,
    s_tmin_mid, s_tmin_lo, s_tmax_hi, s_tmax_mid, s_tmax_lo, s_noise_hi, s_noise_mid, s_noise_lo, out_ptr, x0_ptr, N,
    batch_start, SAMPLER: tl.constexpr, PARAMETERIZATION: tl.constexpr, TABLE: tl.constexpr,
    SIGMA_PER_TOKEN: tl.constexpr, SIGMA_NEXT_PER_TOKEN: tl.constexpr, GUIDED: tl.constexpr, RESCALE: tl.constexpr,
    ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr, RETURN_X0: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr
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


# ---------------------------------------------------------------------------------------------- the launch
NO_OPTIONS = (0.0,) * 12  # churn, s_tmin, s_tmax, s_noise as split_float3 parts: read by the Euler samplers only


def launch_step(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, sampler, parameterization, options, guidance_rescale, noise, seed, philox_seed,
                 philox_offset, sample_offset, out, x0=None):
    """One launch of ``flow_step_kernel`` (after the rescale statistics pass when guided with rescale): writes the
    step into ``out`` and, when ``x0`` is given, the x0 prediction into it. ``options``: ``NO_OPTIONS`` or the
    Euler step's (``_euler_options``). Only a step with a noise term (flow_stochastic, euler_ancestral, euler with
    churn) reads ``noise``, or draws with ``seed`` / ``philox_seed`` / ``philox_offset`` (``noise_key``), rows
    ``sample_offset ..`` of the noise stream, when it is None."""
    x, batch, n = as_rows(sample)
    if x.numel() == 0:
        return
    cond = like_dense(x, model_output)
    stats = None
    if guidance is not None and guidance_rescale > 0:
        uncond = like_dense(x, uncond)
        stats = guidance_stats(cond, uncond, guidance, n, n, batch)
    key_standin = zero_key(x.device)
    add_noise = sampler in (SAMPLER_ID["flow_stochastic"], SAMPLER_ID["euler_ancestral"]) or (
        sampler == SAMPLER_ID["euler"] and options[0] > 0)  # churn > 0
    table = step_index is not None
    launch_per_sample(
        flow_step_kernel, x, n, batch, sample_ptr=x,
        **guidance_kwargs(x, cond, uncond, guidance, stats, guidance_rescale, n, batch, sigma),
        **noise_kwargs(noise if add_noise else None, seed, philox_seed, philox_offset, sample_offset, x, key_standin),
        sigma_ptr=sigma, sigma_next_ptr=sigma_next, step_index_ptr=step_index if table else key_standin,
        n_sigmas=sigma.shape[0], period=period, repeat=repeat, period_next=period_next, repeat_next=repeat_next,
        **dict(zip(_OPTION_ARGS, options)), out_ptr=out, x0_ptr=out if x0 is None else x0, N=n,
        SAMPLER=sampler, PARAMETERIZATION=parameterization, TABLE=table,
        SIGMA_PER_TOKEN=not table and period > 1, SIGMA_NEXT_PER_TOKEN=not table and period_next > 1,
        ADD_NOISE=add_noise, RETURN_X0=x0 is not None,
    )


_OPTION_ARGS = tuple(f"{name}_{part}" for name in ("churn", "s_tmin", "s_tmax", "s_noise")
                     for part in ("hi", "mid", "lo"))


# ----------------------------------------------------------------------------------- euler_step (sigma table)
def _euler_options(churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple:
    """The Euler step's float options as the kernel reads them: ``split_float3`` parts, exact in float64."""
    return sum((split_float3(value) for value in (churn, s_tmin, s_tmax, s_noise)), ())


def _euler_launch(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                  s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, seed, philox_seed, philox_offset,
                  sample_offset, out):
    """``euler_step_op``'s arguments and ``out``: writes the step into ``out`` and returns x0 (zero elements
    unless ``return_pred_x0``)."""
    x0 = empty_dense_if(return_pred_x0, sample, result_dtype(sample, model_output, uncond, noise))
    launch_step(sample, model_output, uncond, guidance, sigmas, sigmas, step_index, 1, 1, 1, 1, sampler,
                 parameterization, _euler_options(churn, s_tmin, s_tmax, s_noise), guidance_rescale, noise, seed,
                 philox_seed, philox_offset, sample_offset, out, x0 if return_pred_x0 else None)
    return x0


@takes_noise
@guided_step
def _euler_step(
    sample, model_output, uncond, guidance, sigmas: torch.Tensor, step_index: torch.Tensor, sampler: int,
    parameterization: int, churn: float, s_tmin: float, s_tmax: float, s_noise: float, guidance_rescale: float,
    return_pred_x0: bool, noise, seed, philox_seed, philox_offset, sample_offset
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler (``sampler`` ``SAMPLER_ID["euler"]``) or ancestral Euler step on the sigma table ``sigmas``
    (the compute dtype), each sample at ``step_index[b]``: ``(x', x0)``, ``x0`` a zero-element tensor unless
    ``return_pred_x0``. ``churn`` is ``min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)`` (0: no churn, no noise);
    ``parameterization`` a ``PARAMETERIZATION_ID``; guidance as in ``flow_step``; noise keyed as in ``p_sample``
    (``noise.py``). Results in the promoted dtype of the float operands, each read in its own."""
    out = empty_dense(sample, result_dtype(sample, model_output, uncond, noise))
    x0 = _euler_launch(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                       s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, seed, philox_seed,
                       philox_offset, sample_offset, out)
    return out, x0


def _euler_step_fake(sample, model_output, uncond, guidance, sigmas, step_index, sampler, parameterization, churn,
                     s_tmin, s_tmax, s_noise, guidance_rescale, return_pred_x0, noise, *_):
    dtype = result_dtype(sample, model_output, uncond, noise)
    return empty_dense(sample, dtype), empty_dense_if(return_pred_x0, sample, dtype)


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

