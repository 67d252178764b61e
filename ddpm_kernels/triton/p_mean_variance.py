"""Fused ``p_mean_variance``: the model's x_0 prediction (eps, x0 or v parameterization, optionally clipped to
[-1, 1]) and the posterior mean, variance and clipped log-variance of ``p(x_{t-1} | x_t)``, in one launch.
Reference: ``ddpm_kernels.reference.p_mean_variance_ref``.

No autograd: sampling does not differentiate through this op (the seed's training path differentiates
``q_sample`` and the loss). Calling backward through it raises torch's "autograd kernel was not registered"
error; use ``backend="reference"`` to differentiate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    like_dense,
    PARAMETERIZATION_ID,
    ROW,
    as_rows,
    launch_per_sample,
    load_tile,
    posterior_mean_from_model_output,
    posterior_outputs,
    sample_tile,
    store_posterior_variance,
    store_tile,
)

__all__ = ["p_mean_variance_kernel", "p_mean_variance"]


@triton.jit
def p_mean_variance_kernel(
    x_t_ptr,
    model_output_ptr,
    t_ptr,
    table_ptr,
    mean_ptr,
    var_ptr,
    log_var_ptr,
    N,
    T,
    batch_start,
    PARAMETERIZATION: tl.constexpr,
    CLIP_DENOISED: tl.constexpr,
    ROW_VAR: tl.constexpr,
    ROW_LOG_VAR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads before the t -> coefficient chain (see pair_kernel).
    x_t = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    t = tl.load(t_ptr + sample)
    mean = posterior_mean_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION, CLIP_DENOISED)
    store_tile(mean_ptr, offs, mean, mask)
    store_posterior_variance(table_ptr, var_ptr, log_var_ptr, sample, t, T, ROW_VAR, ROW_LOG_VAR)


@torch.library.custom_op("ddpm_kernels_triton::p_mean_variance", mutates_args=())
def p_mean_variance_op(
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    parameterization: int,
    clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_t, batch, n = as_rows(x_t)
    model_output = like_dense(x_t, model_output)
    mean, var, log_var = posterior_outputs(x_t, t, table)
    if x_t.numel() == 0:
        return mean, var, log_var
    launch_per_sample(
        p_mean_variance_kernel, x_t, n, batch, x_t, model_output, t, table, mean, var, log_var, n, table.shape[1],
        PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised,
        ROW_VAR=ROW["posterior_variance"], ROW_LOG_VAR=ROW["posterior_log_variance_clipped"],
    )
    return mean, var, log_var


@p_mean_variance_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised):
    return posterior_outputs(x_t, t, table, fake=True)


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    """Backend entry with ``reference.p_mean_variance_ref``'s signature."""
    return p_mean_variance_op(
        x_t, t, model_output, schedule.table(x_t.dtype), PARAMETERIZATION_ID[parameterization], clip_denoised
    )
