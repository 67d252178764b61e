"""Fused ``predict_start_from_noise``: ``x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps``, with its backward
(both input gradients in one pass). Reference: ``ddpm_kernels.reference.predict_start_from_noise_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    ROW,
    as_rows,
    batch_chunks,
    device_of,
    gather_coefficient,
    launch_config,
    linear_combination_backward,
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
    sample = tl.program_id(1) + batch_start
    offs_in_sample = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_in_sample < N
    offs = sample.to(tl.int64) * N + offs_in_sample
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads before the t -> coefficient chain (see q_sample_kernel).
    x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(cd)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cd)
    t = tl.load(t_ptr + sample)
    sqrt_recip_alphas_cumprod = gather_coefficient(table_ptr, ROW_SQRT_RECIP_AB, t, T)
    sqrt_recipm1_alphas_cumprod = gather_coefficient(table_ptr, ROW_SQRT_RECIPM1_AB, t, T)
    x_start = sqrt_recip_alphas_cumprod * x_t - sqrt_recipm1_alphas_cumprod * noise
    tl.store(out_ptr + offs, x_start.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("ddpm_kernels_triton::predict_start_from_noise", mutates_args=())
def predict_start_from_noise_op(
    x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    x_t, batch, n = as_rows(x_t)
    noise = noise.contiguous()
    out = torch.empty_like(x_t)
    if x_t.numel() == 0:
        return out
    block, warps = launch_config(n, batch)
    with device_of(x_t):
        for b0, nb in batch_chunks(batch):
            predict_start_from_noise_kernel[(triton.cdiv(n, block), nb)](
                x_t, noise, t, table, out, n, table.shape[1], b0,
                ROW_SQRT_RECIP_AB=ROW["sqrt_recip_alphas_cumprod"],
                ROW_SQRT_RECIPM1_AB=ROW["sqrt_recipm1_alphas_cumprod"],
                BLOCK=block, num_warps=warps,
            )
    return out


@predict_start_from_noise_op.register_fake
def _(x_t, t, noise, table):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.custom_op("ddpm_kernels_triton::predict_start_from_noise_backward", mutates_args=())
def predict_start_from_noise_backward_op(
    grad: torch.Tensor, t: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_combination_backward(
        grad, t, table, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", -1.0
    )


@predict_start_from_noise_backward_op.register_fake
def _(grad, t, table):
    like = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def _setup_context(ctx, inputs, output):
    _, t, _, table = inputs
    ctx.save_for_backward(t, table)


def _backward(ctx, grad):
    t, table = ctx.saved_tensors
    grad_x_t, grad_noise = predict_start_from_noise_backward_op(grad, t, table)
    return grad_x_t, None, grad_noise, None


predict_start_from_noise_op.register_autograd(_backward, setup_context=_setup_context)


def predict_start_from_noise(x_t, t, noise, schedule):
    """Backend entry with ``reference.predict_start_from_noise_ref``'s signature."""
    return predict_start_from_noise_op(x_t, t, noise, schedule.table(x_t.dtype))
