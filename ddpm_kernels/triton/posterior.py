"""The posterior family: ``q_posterior``, ``p_mean_variance`` and ``p_sample`` as one kernel
(``posterior_kernel``), each in one launch that reads ``x_t`` and one more tensor once (and ``noise`` when given)
and writes its result once:

    x_0      = the second tensor itself (q_posterior; PARAMETERIZATION x0), or from the model output (eps, x0 or v),
               clipped to [-1, 1] with CLIP_DENOISED
    mean     = coef1_t x_0 + coef2_t x_t
    x_{t-1}  = mean + [t > 0] exp(0.5 log_var_t) z                              (p_sample: ADD_NOISE)
    var_t, log_var_t (B, 1, ..., 1), written by each sample's first program      (WRITE_VARIANCE)

References: ``ddpm_kernels.reference.q_posterior_ref``, ``p_mean_variance_ref``, ``p_sample_ref``. In-kernel
noise is keyed as ``noise.py`` describes.

Autograd: ``q_posterior``'s mean w.r.t. ``x_start`` and ``x_t`` (a pair combination: the pair kernel's
backward). ``p_mean_variance`` and ``p_sample`` are sampling only: calling backward through them raises
torch's "autograd kernel was not registered" error (the dispatcher detaches their inputs; use
``backend="reference"`` to differentiate them); with ``out`` the result simply carries no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .pair import (
    POSTERIOR_MEAN, PREDICT_START_FROM_NOISE, PREDICT_START_FROM_Z_AND_V, pair_backward, pair_backward_fake,
    pair_coefficients,
)
from .noise import NOISE_PARAMETERS, NOISE_SCALARS, load_or_draw_noise, noise_key, noise_kwargs
from .utils import (
    PARAMETERIZATION_ID, ROW, ROW_POSTERIOR_MEAN_COEF1, ROW_POSTERIOR_MEAN_COEF2, as_rows, call_op, clamp_symmetric,
    custom_op_with_out, empty_dense, extract_rows, gather_coefficient, launch_per_sample, like_dense, load_tile,
    parameters_of, register_linear_combination_autograd, result_dtype, sample_tile, store_tile, with_signature,
)

__all__ = ["posterior_kernel", "q_posterior", "p_mean_variance", "p_sample"]

ROW_POSTERIOR_VARIANCE = tl.constexpr(ROW["posterior_variance"])
ROW_POSTERIOR_LOG_VARIANCE = tl.constexpr(ROW["posterior_log_variance_clipped"])
_X0 = PARAMETERIZATION_ID["x0"]


@triton.jit
def x0_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION: tl.constexpr):
    """The model's x_0 prediction from its output (eps, x0 or v): for eps and v a pair op of x_t and the
    output (predict_start_from_noise, predict_start_from_z_and_v)."""
    if PARAMETERIZATION == 1:  # x0
        x_start = model_output
    else:
        if PARAMETERIZATION == 0:  # eps
            coef_x_t, coef_output = pair_coefficients(table_ptr, t, T, PREDICT_START_FROM_NOISE)
        else:  # v
            coef_x_t, coef_output = pair_coefficients(table_ptr, t, T, PREDICT_START_FROM_Z_AND_V)
        x_start = coef_x_t * x_t + coef_output * model_output
    return x_start


# The Philox key and offset are int64 whatever their value (``noise.NOISE_SCALARS``).
@triton.jit(do_not_specialize=NOISE_SCALARS)
def posterior_kernel(
    x_t_ptr, model_output_ptr, noise_ptr, seed_ptr, philox_seed: tl.int64, philox_offset: tl.int64,
    sample_offset: tl.int64, t_ptr, table_ptr, out_ptr, var_ptr, log_var_ptr, N, T, batch_start,
    PARAMETERIZATION: tl.constexpr, CLIP_DENOISED: tl.constexpr, ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr,
    WRITE_VARIANCE: tl.constexpr, BLOCK: tl.constexpr
):
    sample, tile_start, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    # Math in the table's dtype: float32 for 16/32-bit data, float64 for float64; one rounding at the store.
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Loads and noise first: none depends on t, so their latency (and the Philox integer work) overlaps the
    # t -> coefficient load chain.
    x_t = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    if ADD_NOISE:
        z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample_offset, sample, tile_start,
                               offs, mask, N, cd, HAS_NOISE, BLOCK)
    t = tl.load(t_ptr + sample)
    x_start = x0_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION)
    if CLIP_DENOISED:
        x_start = clamp_symmetric(x_start, 1.0)
    posterior_mean_coef1 = gather_coefficient(table_ptr, ROW_POSTERIOR_MEAN_COEF1, t, T)
    posterior_mean_coef2 = gather_coefficient(table_ptr, ROW_POSTERIOR_MEAN_COEF2, t, T)
    result = posterior_mean_coef1 * x_start + posterior_mean_coef2 * x_t
    if ADD_NOISE:
        posterior_log_variance = gather_coefficient(table_ptr, ROW_POSTERIOR_LOG_VARIANCE, t, T)
        # The seed's nonzero_mask: no noise is added at the last step (t == 0). Out-of-range t keeps the mask
        # at 1 so its NaN log-variance reaches the output.
        nonzero_mask = (t != 0).to(cd)
        result = result + nonzero_mask * tl.exp(0.5 * posterior_log_variance) * z
    store_tile(out_ptr, offs, result, mask)
    if WRITE_VARIANCE:
        # the per-sample variances ride along in the launch that writes the mean
        first = tl.program_id(0) == 0
        tl.store(var_ptr + sample, gather_coefficient(table_ptr, ROW_POSTERIOR_VARIANCE, t, T), mask=first)
        tl.store(log_var_ptr + sample, gather_coefficient(table_ptr, ROW_POSTERIOR_LOG_VARIANCE, t, T), mask=first)


def _launch(x_t, t, model_output, table, parameterization, clip_denoised, out, var=None, log_var=None,
            noise=None, seed=None, philox_seed=0, philox_offset=0, sample_offset=0, add_noise=False):
    """One ``posterior_kernel`` launch writing ``out`` (and ``var`` / ``log_var`` when given)."""
    x_t, batch, n = as_rows(x_t)
    if x_t.numel() == 0:
        return
    write_variance = var is not None
    launch_per_sample(
        posterior_kernel, x_t, n, batch, x_t_ptr=x_t, model_output_ptr=like_dense(x_t, model_output),
        **noise_kwargs(noise, seed, philox_seed, philox_offset, sample_offset, x_t, t), t_ptr=t, table_ptr=table,
        out_ptr=out, var_ptr=var if write_variance else out, log_var_ptr=log_var if write_variance else out, N=n,
        T=table.shape[1], PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised, ADD_NOISE=add_noise,
        WRITE_VARIANCE=write_variance,
    )


def _mean_and_variances(x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor, fake: bool = False,
                        other: Optional[torch.Tensor] = None):
    """``(mean, var, log_var)`` outputs: ``mean`` like ``x_t`` (its dense format) in the promoted dtype of
    ``x_t`` and ``other`` (the model output or x_start), the variances in the table's dtype shaped ``(B, 1, ...,
    1)``. With zero elements no program runs to write the variances, so they are gathered here (not for a
    ``fake`` op, whose outputs only need their metadata)."""
    if x_t.numel() == 0 and not fake:
        var, log_var = extract_rows(table, ("posterior_variance", "posterior_log_variance_clipped"), t, x_t.ndim)
    else:
        var = torch.empty((x_t.shape[0],) + (1,) * (x_t.ndim - 1), dtype=table.dtype, device=x_t.device)
        log_var = torch.empty_like(var)
    return empty_dense(x_t, result_dtype(x_t, other)), var, log_var


# ------------------------------------------------------------------------------------- q_posterior
@torch.library.custom_op("ddpm_kernels_triton::q_posterior", mutates_args=())
def q_posterior_op(
    x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the posterior of a given x_0 is that of a model predicting x_0, unclipped
    return _p_mean_variance(x_t, t, x_start, table, _X0, False)


@q_posterior_op.register_fake
def _(x_start, x_t, t, table):
    return _mean_and_variances(x_t, t, table, fake=True, other=x_start)


@torch.library.custom_op("ddpm_kernels_triton::q_posterior_backward", mutates_args=())
def q_posterior_backward_op(
    grad_mean: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return pair_backward(grad_mean, t, table, POSTERIOR_MEAN)


q_posterior_backward_op.register_fake(pair_backward_fake)
# x_start (0) and x_t (1) get gradients of the mean; var and log_var are table gathers, independent of both.
register_linear_combination_autograd(q_posterior_op, q_posterior_backward_op, a=0, b=1, t=2, table=3)


def q_posterior(x_start, x_t, t, schedule):
    """Backend entry with ``reference.q_posterior_ref``'s signature."""
    return q_posterior_op(x_start, x_t, t, schedule.table(result_dtype(x_start, x_t)))


# --------------------------------------------------------------------------------- p_mean_variance
def _p_mean_variance(
    x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor, parameterization: int,
    clip_denoised: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var, log_var = _mean_and_variances(x_t, t, table, other=model_output)
    _launch(x_t, t, model_output, table, parameterization, clip_denoised, mean, var, log_var)
    return mean, var, log_var


p_mean_variance_op = torch.library.custom_op("ddpm_kernels_triton::p_mean_variance", _p_mean_variance,
                                             mutates_args=())


@p_mean_variance_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised):
    return _mean_and_variances(x_t, t, table, fake=True, other=model_output)


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    """Backend entry with ``reference.p_mean_variance_ref``'s signature."""
    return p_mean_variance_op(
        x_t, t, model_output, schedule.table(result_dtype(x_t, model_output)), PARAMETERIZATION_ID[parameterization],
        clip_denoised,
    )


# ---------------------------------------------------------------------------------------- p_sample
def _p_sample_launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed,
                     philox_offset, sample_offset, out):
    _launch(x_t, t, model_output, table, parameterization, clip_denoised, out, noise=noise, seed=seed,
            philox_seed=philox_seed, philox_offset=philox_offset, sample_offset=sample_offset, add_noise=True)


def _p_sample(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset,
              sample_offset):
    """``noise`` when given; else Philox noise keyed by ``seed[0]`` (a device tensor) when given, else by
    ``(philox_seed, philox_offset)``, a generator's Philox state (``noise.py``)."""
    out = _p_sample_fake(x_t, t, model_output, table, parameterization, clip_denoised, noise)
    _p_sample_launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed,
                     philox_offset, sample_offset, out)
    return out


# p_sample takes p_mean_variance's arguments and the noise operands
with_signature(_p_sample, parameters_of(_p_mean_variance) + list(NOISE_PARAMETERS), torch.Tensor)


def _p_sample_fake(x_t, t, model_output, table, parameterization, clip_denoised, noise, *_):
    return empty_dense(x_t, result_dtype(x_t, model_output, noise))


# p_sample_out writes into out, which may be x_t itself (an in-place step).
p_sample_op, p_sample_out_op = custom_op_with_out(
    "ddpm_kernels_triton::p_sample", _p_sample, _p_sample_fake, _p_sample_launch
)


def p_sample(x_t, t, model_output, schedule, parameterization, clip_denoised, noise=None, generator=None, out=None,
             sample_offset=0):
    """Backend entry (the reference's arguments, validated); ``noise=None`` draws z in-kernel."""
    table = schedule.table(result_dtype(x_t, model_output, noise))
    seed, philox_seed, philox_offset = noise_key(generator, x_t, noise)
    args = (
        x_t, t, model_output, table, PARAMETERIZATION_ID[parameterization], clip_denoised,
        noise, seed, philox_seed, philox_offset, sample_offset,
    )
    return call_op(p_sample_op, p_sample_out_op, args, out)
