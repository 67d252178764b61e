"""Fused ``p_sample``: one ancestral step ``x_{t-1} = mean + [t > 0] exp(0.5 log_var_t) z`` in exactly one
kernel launch, reading ``x_t`` and ``model_output`` once (and ``noise`` when given) and writing ``x_{t-1}``
once. Reference: ``ddpm_kernels.reference.p_sample_ref``.

Noise. With ``noise=None`` the kernel draws ``z`` itself with Philox (see ``utils.philox_normal``) keyed by a
64-bit seed that lives in a one-element device tensor drawn with ``torch.randint(generator=...)``:

* reproducible: the same generator state gives the same seed, hence the same ``z``;
* independent between calls: each call advances the generator and gets a fresh key;
* CUDA-graph safe: the kernel reads the seed from memory, and the ``randint`` that fills that memory is
  captured too, so torch's graph-safe Philox bookkeeping gives a fresh seed on every replay. A seed passed as
  a Python int would be a kernel argument frozen into the graph, replaying the same noise forever.

The ``randint`` is a second, one-element launch before the fused kernel (the fused kernel itself is the one
launch that touches the image). Avoiding it needs torch's generator to hand its Philox seed/offset to an
extension kernel the way ``at::cuda::philox::unpack`` does in C++, which Python does not expose.

No autograd: sampling is not differentiated (see ``p_mean_variance``). Without ``out`` a backward through the
result raises; with ``out`` the result simply carries no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (
    PARAMETERIZATION_ID,
    ROW,
    as_rows,
    batch_chunks,
    device_of,
    draw_seed,
    gather_coefficient,
    launch_config,
    philox_normal,
    posterior_mean_from_model_output,
)

__all__ = ["p_sample_kernel", "p_sample"]


@triton.jit
def p_sample_kernel(
    x_t_ptr,
    model_output_ptr,
    noise_ptr,
    seed_ptr,
    t_ptr,
    table_ptr,
    out_ptr,
    N,
    T,
    batch_start,
    PARAMETERIZATION: tl.constexpr,
    CLIP_DENOISED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ROW_LOG_VAR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample = tl.program_id(1) + batch_start
    tile_start = tl.program_id(0).to(tl.int64) * BLOCK
    offs_in_sample = tile_start + tl.arange(0, BLOCK)
    mask = offs_in_sample < N
    offs = sample.to(tl.int64) * N + offs_in_sample
    t = tl.load(t_ptr + sample)
    posterior_log_variance = gather_coefficient(table_ptr, ROW_LOG_VAR, t, T)
    cd = posterior_log_variance.dtype
    x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(cd)
    model_output = tl.load(model_output_ptr + offs, mask=mask, other=0.0).to(cd)
    mean = posterior_mean_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION, CLIP_DENOISED)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cd)
    else:
        z = philox_normal(tl.load(seed_ptr), sample, tile_start, N, BLOCK).to(cd)
    # The seed's nonzero_mask: no noise is added at the last step (t == 0). Out-of-range t keeps the mask at
    # 1 so its NaN log-variance reaches the output.
    nonzero_mask = (t != 0).to(cd)
    x_prev = mean + nonzero_mask * tl.exp(0.5 * posterior_log_variance) * z
    tl.store(out_ptr + offs, x_prev.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, out):
    x_t, batch, n = as_rows(x_t)
    model_output = model_output.contiguous()
    if x_t.numel() == 0:
        return
    has_noise = noise is not None
    noise = noise.contiguous() if has_noise else x_t  # unread placeholder when drawing in-kernel
    seed = t if seed is None else seed  # unread placeholder when noise is given
    block, warps = launch_config(n, batch)
    with device_of(x_t):
        for b0, nb in batch_chunks(batch):
            p_sample_kernel[(triton.cdiv(n, block), nb)](
                x_t, model_output, noise, seed, t, table, out, n, table.shape[1], b0,
                PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised, HAS_NOISE=has_noise,
                ROW_LOG_VAR=ROW["posterior_log_variance_clipped"], BLOCK=block, num_warps=warps,
            )


@torch.library.custom_op("ddpm_kernels_triton::p_sample", mutates_args=())
def p_sample_op(
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    parameterization: int,
    clip_denoised: bool,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
) -> torch.Tensor:
    out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, out)
    return out


@p_sample_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.custom_op("ddpm_kernels_triton::p_sample_out", mutates_args=("out",))
def p_sample_out_op(
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    parameterization: int,
    clip_denoised: bool,
    noise: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    out: torch.Tensor,
) -> None:
    if out.is_contiguous():
        # Each element is read and written by the same thread, so out may be x_t itself (in-place step).
        _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, out)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, tmp)
        out.copy_(tmp)


@p_sample_out_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, out):
    return None


def p_sample(
    x_t,
    t,
    model_output,
    schedule,
    parameterization="eps",
    clip_denoised=True,
    noise=None,
    generator=None,
    out=None,
):
    """Backend entry with ``reference.p_sample_ref``'s signature; ``noise=None`` draws z in-kernel."""
    table = schedule.table(x_t.dtype)
    seed = draw_seed(generator, x_t.device) if noise is None else None
    args = (x_t, t, model_output, table, PARAMETERIZATION_ID[parameterization], clip_denoised, noise, seed)
    if out is None:
        return p_sample_op(*args)
    p_sample_out_op(*args, out)
    return out
