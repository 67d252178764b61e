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
    PARAMETERIZATION_ID,
    ROW,
    as_rows,
    batch_chunks,
    device_of,
    extract_rows,
    gather_coefficient,
    launch_config,
    posterior_mean_from_model_output,
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
    sample = tl.program_id(1) + batch_start
    offs_in_sample = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_in_sample < N
    offs = sample.to(tl.int64) * N + offs_in_sample
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads before the t -> coefficient chain (see q_sample_kernel).
    x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(cd)
    model_output = tl.load(model_output_ptr + offs, mask=mask, other=0.0).to(cd)
    t = tl.load(t_ptr + sample)
    posterior_variance = gather_coefficient(table_ptr, ROW_VAR, t, T)
    mean = posterior_mean_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION, CLIP_DENOISED)
    tl.store(mean_ptr + offs, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    first = tl.program_id(0) == 0
    tl.store(var_ptr + sample, posterior_variance, mask=first)
    tl.store(log_var_ptr + sample, gather_coefficient(table_ptr, ROW_LOG_VAR, t, T), mask=first)


def _variance_shape(x):
    return (x.shape[0],) + (1,) * (x.ndim - 1)


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
    model_output = model_output.contiguous()
    mean = torch.empty_like(x_t)
    if x_t.numel() == 0:
        var, log_var = extract_rows(table, ("posterior_variance", "posterior_log_variance_clipped"), t, x_t.ndim)
        return mean, var, log_var
    var = torch.empty(_variance_shape(x_t), dtype=table.dtype, device=x_t.device)
    log_var = torch.empty_like(var)
    block, warps = launch_config(n, batch)
    with device_of(x_t):
        for b0, nb in batch_chunks(batch):
            p_mean_variance_kernel[(triton.cdiv(n, block), nb)](
                x_t, model_output, t, table, mean, var, log_var, n, table.shape[1], b0,
                PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised,
                ROW_VAR=ROW["posterior_variance"], ROW_LOG_VAR=ROW["posterior_log_variance_clipped"],
                BLOCK=block, num_warps=warps,
            )
    return mean, var, log_var


@p_mean_variance_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised):
    mean = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    var = x_t.new_empty(_variance_shape(x_t), dtype=table.dtype)
    return mean, var, torch.empty_like(var)


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    """Backend entry with ``reference.p_mean_variance_ref``'s signature."""
    return p_mean_variance_op(
        x_t, t, model_output, schedule.table(x_t.dtype), PARAMETERIZATION_ID[parameterization], clip_denoised
    )
