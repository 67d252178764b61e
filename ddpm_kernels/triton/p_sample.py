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
    like_dense,
    PARAMETERIZATION_ID,
    ROW,
    as_rows,
    custom_op_with_out,
    empty_dense,
    gather_coefficient,
    launch_per_sample,
    load_or_draw_noise,
    load_tile,
    noise_operands,
    posterior_mean_from_model_output,
    sample_tile,
    step_noise_key,
    store_tile,
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
    sample, tile_start, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Loads and noise first: none depends on t, so their latency (and the Philox integer work) overlaps the
    # t -> coefficient load chain.
    x_t = load_tile(x_t_ptr, offs, mask, cd)
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample, tile_start, offs, mask, N, cd,
                           HAS_NOISE, BLOCK)
    t = tl.load(t_ptr + sample)
    posterior_log_variance = gather_coefficient(table_ptr, ROW_LOG_VAR, t, T)
    mean = posterior_mean_from_model_output(x_t, model_output, t, table_ptr, T, PARAMETERIZATION, CLIP_DENOISED)
    # The seed's nonzero_mask: no noise is added at the last step (t == 0). Out-of-range t keeps the mask at
    # 1 so its NaN log-variance reaches the output.
    nonzero_mask = (t != 0).to(cd)
    x_prev = mean + nonzero_mask * tl.exp(0.5 * posterior_log_variance) * z
    store_tile(out_ptr, offs, x_prev, mask)


def _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset, out):
    x_t, batch, n = as_rows(x_t)
    model_output = like_dense(x_t, model_output)
    if x_t.numel() == 0:
        return
    noise, seed, has_noise = noise_operands(noise, seed, x_t, t)
    launch_per_sample(
        p_sample_kernel, x_t, n, batch,
        x_t, model_output, noise, seed, philox_seed, philox_offset, t, table, out, n, table.shape[1],
        PARAMETERIZATION=parameterization, CLIP_DENOISED=clip_denoised, HAS_NOISE=has_noise,
        ROW_LOG_VAR=ROW["posterior_log_variance_clipped"],
    )


def _p_sample(
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
    out = empty_dense(x_t)
    _launch(x_t, t, model_output, table, parameterization, clip_denoised, noise, seed, philox_seed, philox_offset, out)
    return out


def _p_sample_fake(x_t, *_):
    return empty_dense(x_t)


# p_sample_out writes into out, which may be x_t itself (an in-place step).
p_sample_op, p_sample_out_op = custom_op_with_out("ddpm_kernels_triton::p_sample", _p_sample, _p_sample_fake, _launch)


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
    seed, philox_seed, philox_offset = step_noise_key(generator, x_t, noise)
    args = (
        x_t, t, model_output, table, PARAMETERIZATION_ID[parameterization], clip_denoised,
        noise, seed, philox_seed, philox_offset,
    )
    if out is None:
        return p_sample_op(*args)
    p_sample_out_op(*args, out)
    return out
