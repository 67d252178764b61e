"""Fused ``p_sample``: one ancestral step ``x_{t-1} = mean + [t > 0] exp(0.5 log_var_t) z`` in exactly one
kernel launch, reading ``x_t`` and ``model_output`` once (and ``noise`` when given) and writing ``x_{t-1}``
once. Reference: ``ddpm_kernels.reference.p_sample_ref``.

Noise. With ``noise=None`` the kernel draws ``z`` itself with Philox (``utils.philox_normal``: four normals
per Philox call, each value a function of (key, counter) only). Where the key and counter come from:

* Eager CUDA (the common case): from the generator's own Philox state, read and advanced on the host (no
  device work, no sync) and passed as kernel arguments, the way torch's RNG kernels take ``(seed, offset)``.
  The step is exactly one kernel launch; the same generator state gives the same noise; the generator's
  offset advances past the counters used, so every call (and every later torch draw) gets fresh counters.
* While a CUDA graph is being captured, or torch.compile is tracing: host ints would be frozen into the
  graph, replaying the same noise forever. The key is instead a one-element int64 device tensor drawn with
  ``torch.randint(generator=...)`` and read by the kernel from memory; the captured ``randint`` follows
  torch's graph-safe Philox bookkeeping, so every replay gets a fresh key. This costs a second, one-element
  launch, which a graph replays for free.
* CPU tensors (Triton's interpreter): the key tensor as well, drawn from the CPU generator.

Both sources run the same compiled kernel (key = key tensor XOR key argument, with a cached zero tensor or a
zero argument standing in for the unused one), so a kernel warmed up eagerly is the one a later CUDA-graph
capture launches: nothing is compiled or loaded during capture.

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
    host_philox_state,
    launch_config,
    philox_counters,
    philox_normal,
    posterior_mean_from_model_output,
)

__all__ = ["p_sample_kernel", "p_sample"]


# The Philox key and offset are int64 whatever their value: without the annotation and do_not_specialize,
# Triton would compile a new variant whenever a seed happened to be 1, divisible by 16, or past 2**31.
@triton.jit(do_not_specialize=["philox_seed", "philox_offset"])
def p_sample_kernel(
    x_t_ptr,
    model_output_ptr,
    noise_ptr,
    seed_ptr,
    philox_seed: tl.int64,
    philox_offset: tl.int64,
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
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Loads and noise first: none depends on t, so their latency (and the Philox integer work) overlaps the
    # t -> coefficient load chain.
    x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(cd)
    model_output = tl.load(model_output_ptr + offs, mask=mask, other=0.0).to(cd)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cd)
    else:
        # One of the two keys is zero (see the module docstring). torch's offset counts 32-bit outputs: 4 per
        # Philox counter.
        key = tl.load(seed_ptr) ^ philox_seed
        z = philox_normal(key, philox_offset // 4, sample, tile_start, N, BLOCK).to(cd)
    t = tl.load(t_ptr + sample)
    posterior_log_variance = gather_coefficient(table_ptr, ROW_LOG_VAR, t, T)
    mean = posterior_mean_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION, CLIP_DENOISED)
    # The seed's nonzero_mask: no noise is added at the last step (t == 0). Out-of-range t keeps the mask at
    # 1 so its NaN log-variance reaches the output.
    nonzero_mask = (t != 0).to(cd)
    x_prev = mean + nonzero_mask * tl.exp(0.5 * posterior_log_variance) * z
    tl.store(out_ptr + offs, x_prev.to(out_ptr.dtype.element_ty), mask=mask)


_ZERO_KEYS = {}


def _zero_key(device):
    """A zero int64 key tensor per device, allocated once (eagerly: a key tensor is drawn instead during
    capture), so steps keyed by generator state allocate nothing."""
    key = _ZERO_KEYS.get(device)
    if key is None:
        key = _ZERO_KEYS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return key


def _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset, out):
    x_t, batch, n = as_rows(x_t)
    model_output = model_output.contiguous()
    if x_t.numel() == 0:
        return
    has_noise = noise is not None
    if has_noise:
        noise, seed = noise.contiguous(), t  # t: an unread placeholder for the key tensor
    else:
        noise = x_t  # unread placeholder
        if seed is None:
            seed = _zero_key(x_t.device)
    block, warps = launch_config(n, batch)
    with device_of(x_t):
        for b0, nb in batch_chunks(batch):
            p_sample_kernel[(triton.cdiv(n, block), nb)](
                x_t, model_output, noise, seed, philox_seed, philox_offset, t, table, out, n, table.shape[1], b0,
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
    philox_seed: int,
    philox_offset: int,
) -> torch.Tensor:
    """``noise`` when given; else Philox noise keyed by ``seed[0]`` (a device tensor) when given, else by
    ``(philox_seed, philox_offset)``, a generator's Philox state (see the module docstring)."""
    out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset, out)
    return out


@p_sample_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset):
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
    philox_seed: int,
    philox_offset: int,
    out: torch.Tensor,
) -> None:
    noise_args = (noise, seed, philox_seed, philox_offset)
    if out.is_contiguous():
        # Each element is read and written by the same thread, so out may be x_t itself (in-place step).
        _launch(x_t, t, model_output, table, parameterization, clip_denoised, *noise_args, out)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _launch(x_t, t, model_output, table, parameterization, clip_denoised, *noise_args, tmp)
        out.copy_(tmp)


@p_sample_out_op.register_fake
def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset, out):
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
    seed, philox_seed, philox_offset = None, 0, 0
    if noise is None:
        counters = philox_counters(x_t.shape[0], x_t.numel() // x_t.shape[0] if x_t.shape[0] else 0)
        state = host_philox_state(generator, x_t, counters)
        if state is None:
            seed = draw_seed(generator, x_t.device)
        else:
            philox_seed, philox_offset = state
    args = (
        x_t, t, model_output, table, PARAMETERIZATION_ID[parameterization], clip_denoised,
        noise, seed, philox_seed, philox_offset,
    )
    if out is None:
        return p_sample_op(*args)
    p_sample_out_op(*args, out)
    return out
