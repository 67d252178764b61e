"""Fused ``predict_start_from_noise``: ``x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps``, with its backward
(both input gradients in one pass). Reference: ``ddpm_kernels.reference.predict_start_from_noise_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    like_dense,
    ROW,
    as_rows,
    empty_dense,
    gather_coefficient,
    launch_per_sample,
    linear_combination_backward,
    linear_combination_backward_fake,
    load_tile,
    register_linear_combination_autograd,
    sample_tile,
    store_tile,
)

__all__ = ["predict_start_from_noise_kernel", "predict_start_from_noise"]


@triton.jit
def predict_start_from_noise_kernel(
    x_t_ptr,
    noise_ptr,
    t_ptr,
    table_ptr,
    out_ptr,
    N,
    T,
    batch_start,
    ROW_SQRT_RECIP_AB: tl.constexpr,
    ROW_SQRT_RECIPM1_AB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads before the t -> coefficient chain (see q_sample_kernel).
    x_t = load_tile(x_t_ptr, offs, mask, cd)
    noise = load_tile(noise_ptr, offs, mask, cd)
    t = tl.load(t_ptr + sample)
    sqrt_recip_alphas_cumprod = gather_coefficient(table_ptr, ROW_SQRT_RECIP_AB, t, T)
    sqrt_recipm1_alphas_cumprod = gather_coefficient(table_ptr, ROW_SQRT_RECIPM1_AB, t, T)
    x_start = sqrt_recip_alphas_cumprod * x_t - sqrt_recipm1_alphas_cumprod * noise
    store_tile(out_ptr, offs, x_start, mask)


@torch.library.custom_op("ddpm_kernels_triton::predict_start_from_noise", mutates_args=())
def predict_start_from_noise_op(
    x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    x_t, batch, n = as_rows(x_t)
    noise = like_dense(x_t, noise)
    out = empty_dense(x_t)
    if x_t.numel() == 0:
        return out
    launch_per_sample(
        predict_start_from_noise_kernel, x_t, n, batch, x_t, noise, t, table, out, n, table.shape[1],
        ROW_SQRT_RECIP_AB=ROW["sqrt_recip_alphas_cumprod"], ROW_SQRT_RECIPM1_AB=ROW["sqrt_recipm1_alphas_cumprod"],
    )
    return out


@predict_start_from_noise_op.register_fake
def _(x_t, t, noise, table):
    return empty_dense(x_t)


@torch.library.custom_op("ddpm_kernels_triton::predict_start_from_noise_backward", mutates_args=())
def predict_start_from_noise_backward_op(
    grad: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_combination_backward(
        grad, t, table, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", -1.0
    )


predict_start_from_noise_backward_op.register_fake(linear_combination_backward_fake)
# x_t (0) and noise (2) get gradients; t (1) and table (3) none.
register_linear_combination_autograd(
    predict_start_from_noise_op, predict_start_from_noise_backward_op, a=0, b=2, t=1, table=3
)


def predict_start_from_noise(x_t, t, noise, schedule):
    """Backend entry with ``reference.predict_start_from_noise_ref``'s signature."""
    return predict_start_from_noise_op(x_t, t, noise, schedule.table(x_t.dtype))
