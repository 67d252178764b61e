"""Fused ``q_posterior``: mean ``coef1_t x_0 + coef2_t x_t`` with the gathered variance and clipped
log-variance of ``q(x_{t-1} | x_t, x_0)``, all in one launch; backward of the mean in one pass.
Reference: ``ddpm_kernels.reference.q_posterior_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    like_dense,
    ROW,
    as_rows,
    gather_coefficient,
    launch_per_sample,
    linear_combination_backward,
    linear_combination_backward_fake,
    load_tile,
    posterior_outputs,
    register_linear_combination_autograd,
    sample_tile,
    store_posterior_variance,
    store_tile,
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
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads before the t -> coefficient chain (see pair_kernel).
    x_start = load_tile(x_start_ptr, offs, mask, cd)
    x_t = load_tile(x_t_ptr, offs, mask, cd)
    t = tl.load(t_ptr + sample)
    posterior_mean_coef1 = gather_coefficient(table_ptr, ROW_COEF1, t, T)
    posterior_mean_coef2 = gather_coefficient(table_ptr, ROW_COEF2, t, T)
    mean = posterior_mean_coef1 * x_start + posterior_mean_coef2 * x_t
    store_tile(mean_ptr, offs, mean, mask)
    store_posterior_variance(table_ptr, var_ptr, log_var_ptr, sample, t, T, ROW_VAR, ROW_LOG_VAR)


@torch.library.custom_op("ddpm_kernels_triton::q_posterior", mutates_args=())
def q_posterior_op(
    x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_t, batch, n = as_rows(x_t)
    x_start = like_dense(x_t, x_start)
    mean, var, log_var = posterior_outputs(x_t, t, table)
    if x_t.numel() == 0:
        return mean, var, log_var
    launch_per_sample(
        q_posterior_kernel, x_t, n, batch, x_start, x_t, t, table, mean, var, log_var, n, table.shape[1],
        ROW_COEF1=ROW["posterior_mean_coef1"], ROW_COEF2=ROW["posterior_mean_coef2"],
        ROW_VAR=ROW["posterior_variance"], ROW_LOG_VAR=ROW["posterior_log_variance_clipped"],
    )
    return mean, var, log_var


@q_posterior_op.register_fake
def _(x_start, x_t, t, table):
    return posterior_outputs(x_t, t, table, fake=True)


@torch.library.custom_op("ddpm_kernels_triton::q_posterior_backward", mutates_args=())
def q_posterior_backward_op(
    grad_mean: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_combination_backward(grad_mean, t, table, "posterior_mean_coef1", "posterior_mean_coef2", 1.0)


q_posterior_backward_op.register_fake(linear_combination_backward_fake)
# x_start (0) and x_t (1) get gradients of the mean; var and log_var are table gathers, independent of both.
register_linear_combination_autograd(q_posterior_op, q_posterior_backward_op, a=0, b=1, t=2, table=3)


def q_posterior(x_start, x_t, t, schedule):
    """Backend entry with ``reference.q_posterior_ref``'s signature."""
    return q_posterior_op(x_start, x_t, t, schedule.table(x_t.dtype))
