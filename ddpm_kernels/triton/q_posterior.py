"""Fused ``q_posterior``: mean ``coef1_t x_0 + coef2_t x_t`` with the gathered variance and clipped
log-variance of ``q(x_{t-1} | x_t, x_0)``, all in one launch; backward of the mean in one pass.
Reference: ``ddpm_kernels.reference.q_posterior_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    ROW,
    as_rows,
    batch_chunks,
    device_of,
    extract_rows,
    gather_coefficient,
    launch_config,
    linear_combination_backward,
)

__all__ = ["q_posterior_kernel", "q_posterior"]


@triton.jit
def q_posterior_kernel(
    x_start_ptr,
    x_t_ptr,
    t_ptr,
    table_ptr,
    mean_ptr,
    var_ptr,
    log_var_ptr,
    N,
    T,
    batch_start,
    ROW_COEF1: tl.constexpr,
    ROW_COEF2: tl.constexpr,
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
    x_start = tl.load(x_start_ptr + offs, mask=mask, other=0.0).to(cd)
    x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(cd)
    t = tl.load(t_ptr + sample)
    posterior_mean_coef1 = gather_coefficient(table_ptr, ROW_COEF1, t, T)
    posterior_mean_coef2 = gather_coefficient(table_ptr, ROW_COEF2, t, T)
    mean = posterior_mean_coef1 * x_start + posterior_mean_coef2 * x_t
    tl.store(mean_ptr + offs, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    # The per-sample variance rides along in the same launch: the first program of each sample writes it.
    first = tl.program_id(0) == 0
    tl.store(var_ptr + sample, gather_coefficient(table_ptr, ROW_VAR, t, T), mask=first)
    tl.store(log_var_ptr + sample, gather_coefficient(table_ptr, ROW_LOG_VAR, t, T), mask=first)


def _variance_shape(x):
    return (x.shape[0],) + (1,) * (x.ndim - 1)


@torch.library.custom_op("ddpm_kernels_triton::q_posterior", mutates_args=())
def q_posterior_op(
    x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_t, batch, n = as_rows(x_t)
    x_start = x_start.contiguous()
    mean = torch.empty_like(x_t)
    var = torch.empty(_variance_shape(x_t), dtype=table.dtype, device=x_t.device)
    log_var = torch.empty_like(var)
    if x_t.numel() == 0:
        # No program would run to fill the variances (zero elements per sample): gather them here.
        v, lv = extract_rows(table, ("posterior_variance", "posterior_log_variance_clipped"), t, x_t.ndim)
        return mean, v.clone(), lv.clone()
    block, warps = launch_config(n, batch)
    with device_of(x_t):
        for b0, nb in batch_chunks(batch):
            q_posterior_kernel[(triton.cdiv(n, block), nb)](
                x_start, x_t, t, table, mean, var, log_var, n, table.shape[1], b0,
                ROW_COEF1=ROW["posterior_mean_coef1"], ROW_COEF2=ROW["posterior_mean_coef2"],
                ROW_VAR=ROW["posterior_variance"], ROW_LOG_VAR=ROW["posterior_log_variance_clipped"],
                BLOCK=block, num_warps=warps,
            )
    return mean, var, log_var


@q_posterior_op.register_fake
def _(x_start, x_t, t, table):
    mean = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    var = x_t.new_empty(_variance_shape(x_t), dtype=table.dtype)
    return mean, var, torch.empty_like(var)


@torch.library.custom_op("ddpm_kernels_triton::q_posterior_backward", mutates_args=())
def q_posterior_backward_op(
    grad_mean: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_combination_backward(grad_mean, t, table, "posterior_mean_coef1", "posterior_mean_coef2", 1.0)


@q_posterior_backward_op.register_fake
def _(grad_mean, t, table):
    like = torch.empty_like(grad_mean, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def _setup_context(ctx, inputs, output):
    _, _, t, table = inputs
    ctx.save_for_backward(t, table)


def _backward(ctx, grad_mean, grad_var, grad_log_var):
    # var and log_var are table gathers: they do not depend on x_start or x_t.
    t, table = ctx.saved_tensors
    grad_x_start, grad_x_t = q_posterior_backward_op(grad_mean, t, table)
    return grad_x_start, grad_x_t, None, None


q_posterior_op.register_autograd(_backward, setup_context=_setup_context)


def q_posterior(x_start, x_t, t, schedule):
    """Backend entry with ``reference.q_posterior_ref``'s signature."""
    return q_posterior_op(x_start, x_t, t, schedule.table(x_t.dtype))
