"""Classifier-free guidance's std-rescale statistics, shared by the step kernels that fuse guidance (the flow
step, ``flow.py``, and the DDIM/DDPM step, ``sampler_step.py``). Reference: ``ddpm_kernels.reference.guided_output``.

A guided step forms ``g = u + w[b] (c - u)`` in registers from the conditional output ``c`` and the
unconditional ``u``. With ``guidance_rescale = phi > 0`` (Lin et al. 2023, diffusers' ``rescale_noise_cfg``)
it also multiplies ``g`` by ``phi std(c) / std(g) + (1 - phi)``, with per-sample unbiased standard deviations
over the whole sample, which one elementwise pass cannot see. So a rescaled step is two launches:

    guidance_stats_kernel   program (split, sample): the mean and the sum of squared deviations (M2) of ``c``
                            and of ``g`` over one of at most ``MAX_SPLITS`` contiguous chunks of the sample
                            (each tile's exact two-pass mean and M2 merged into the chunk's by Chan et al.'s
                            pairwise update, which, unlike sums of x and x^2, loses nothing when a sample's mean
                            is large against its spread), stored at ``stats[sample, split, 0:4]``
    the step kernel         ``rescale_factor``: merges its sample's partials (one vector of at most
                            ``MAX_SPLITS``) and forms the factor with torch.std's unbiased estimator (the
                            ``N - 1`` of both cancels but is kept so the numbers follow torch's)

No host synchronization: the statistics stay on the device. A sample's guided elements are the ``N``
consecutive elements at ``sample * stride`` of ``c`` and ``u`` (``stride = 2N`` when learned-variance channels
follow them, which are not guided).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import utils
from .utils import (
    annotated, batch_chunks, device_of, div_rn, launch_config, like_dense, load_tile, split_float, split_scalar,
    sqrt_rn,
)

__all__ = [
    "MAX_SPLITS",
    "chan_merge",
    "rescale_factor",
    "guidance_stats_kernel",
    "stats_splits",
    "stats_layout",
    "block_split",
    "guidance_stats",
    "guidance_kwargs",
    "GUIDED_STEP_PARAMETERS",
    "guided_step",
]

# Partials per sample of the rescale statistics: enough programs to fill a GPU for small batches, and few enough
# that each step program merges its sample's partials as one vector.
MAX_SPLITS = 64


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries (``count_a + count_b > 0``)."""
    count = count_a + count_b
    frac_b = div_rn(count_b, count)
    delta = mean_b - mean_a
    return count, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b


@triton.jit
def rescale_factor(stats_ptr, sample, n_splits, chunk, N, rescale_hi, rescale_lo, cd: tl.constexpr,
                   BLOCK_SPLIT: tl.constexpr):
    """``phi std(c) / std(g) + (1 - phi)`` of one sample from its ``n_splits`` stats partials of ``chunk``
    elements each (the last one the rest of ``N``); ``phi`` as hi + lo float32s."""
    j = tl.arange(0, BLOCK_SPLIT)
    valid = j < n_splits
    base = stats_ptr + (sample.to(tl.int64) * n_splits + j) * 4
    mean_c = tl.load(base, mask=valid, other=0.0)
    m2_c = tl.load(base + 1, mask=valid, other=0.0)
    mean_g = tl.load(base + 2, mask=valid, other=0.0)
    m2_g = tl.load(base + 3, mask=valid, other=0.0)
    first = j.to(tl.int64) * chunk
    count = tl.where(valid, tl.minimum(N - first, chunk), 0).to(cd)
    total = tl.sum(count, axis=0)
    # the merge of many summaries at once: the overall mean, then the within-chunk M2 plus the between-chunk one
    mean_c_all = div_rn(tl.sum(count * mean_c, axis=0), total)
    mean_g_all = div_rn(tl.sum(count * mean_g, axis=0), total)
    dev_c = tl.where(valid, mean_c - mean_c_all, 0.0)
    dev_g = tl.where(valid, mean_g - mean_g_all, 0.0)
    m2_c_all = tl.sum(m2_c, axis=0) + tl.sum(count * dev_c * dev_c, axis=0)
    m2_g_all = tl.sum(m2_g, axis=0) + tl.sum(count * dev_g * dev_g, axis=0)
    dof = total - 1.0
    std_c = sqrt_rn(div_rn(m2_c_all, dof))
    std_g = sqrt_rn(div_rn(m2_g_all, dof))
    phi = split_scalar(rescale_hi, rescale_lo, cd)
    return phi * div_rn(std_c, std_g) + (1.0 - phi)


@triton.jit
def guided_prediction(c, u, guidance_ptr, stats_ptr, sample, n_splits, chunk, N, rescale_hi, rescale_lo,
                      cd: tl.constexpr, RESCALE: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """The guided model output ``u + w[sample] (c - u)``, times the sample's ``rescale_factor`` (``RESCALE``)."""
    w = tl.load(guidance_ptr + sample)
    g = u + w * (c - u)
    if RESCALE:
        g = g * rescale_factor(stats_ptr, sample, n_splits, chunk, N, rescale_hi, rescale_lo, cd, BLOCK_SPLIT)
    return g


@triton.jit
def guidance_stats_kernel(
    model_output_ptr, uncond_ptr, guidance_ptr, stats_ptr, N, stride, n_splits, tiles_per_split, batch_start,
    BLOCK: tl.constexpr
):
    """Program ``(split, sample)``: (mean, M2) of ``c`` and of ``g = u + w (c - u)`` over the split's tiles
    ``[split * tiles_per_split, ...)`` of the sample's ``N`` guided elements (at ``sample * stride``), stored
    at ``stats[sample, split, 0:4]``; computed in ``guidance``'s dtype (the compute dtype)."""
    split = tl.program_id(0)
    sample = tl.program_id(1) + batch_start
    cd: tl.constexpr = guidance_ptr.dtype.element_ty
    w = tl.load(guidance_ptr + sample)
    count = tl.zeros((), cd)
    mean_c = tl.zeros((), cd)
    m2_c = tl.zeros((), cd)
    mean_g = tl.zeros((), cd)
    m2_g = tl.zeros((), cd)
    tile = split * tiles_per_split
    end = tl.minimum(tile + tiles_per_split, tl.cdiv(N, BLOCK))
    # while, not range(): Triton's interpreter cannot take a runtime bound in range() with numpy 2
    while tile < end:
        offs_in_sample = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs_in_sample < N
        offs = sample.to(tl.int64) * stride + offs_in_sample
        c = load_tile(model_output_ptr, offs, mask, cd)
        u = load_tile(uncond_ptr, offs, mask, cd)
        g = tl.where(mask, u + w * (c - u), 0.0)
        m = tl.sum(mask.to(cd), axis=0)
        # the tile's own mean and M2 in two passes over registers, exact to rounding
        tile_mean_c = div_rn(tl.sum(c, axis=0), m)
        tile_mean_g = div_rn(tl.sum(g, axis=0), m)
        dev_c = tl.where(mask, c - tile_mean_c, 0.0)
        dev_g = tl.where(mask, g - tile_mean_g, 0.0)
        _, mean_c, m2_c = chan_merge(count, mean_c, m2_c, m, tile_mean_c, tl.sum(dev_c * dev_c, axis=0))
        count, mean_g, m2_g = chan_merge(count, mean_g, m2_g, m, tile_mean_g, tl.sum(dev_g * dev_g, axis=0))
        tile += 1
    base = stats_ptr + (sample.to(tl.int64) * n_splits + split) * 4
    tl.store(base, mean_c)
    tl.store(base + 1, m2_c)
    tl.store(base + 2, mean_g)
    tl.store(base + 3, m2_g)


# ------------------------------------------------------------------------------------------------- host side
def stats_splits(n: int, batch: int, block: int) -> Tuple[int, int]:
    """``(n_splits, tiles_per_split)`` of the statistics of ``batch`` samples of ``n`` elements in tiles of
    ``block``: about ``utils.MIN_PROGRAMS`` programs in all, at most ``MAX_SPLITS`` per sample, and no empty
    split."""
    n_tiles = triton.cdiv(n, block)
    splits = max(1, min(n_tiles, MAX_SPLITS, triton.cdiv(utils.MIN_PROGRAMS, max(batch, 1))))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def stats_layout(n: int, batch: int) -> Tuple[int, int, Tuple[int, int]]:
    """``(n_splits, chunk, (BLOCK, num_warps))`` of the statistics of ``batch`` samples of ``n`` guided elements:
    what ``guidance_stats`` writes, and what the step kernel reading them is told (``chunk``: elements per
    split). A pure function of ``(n, batch)``, so the statistics pass and the step agree on it."""
    config = launch_config(n, batch)
    n_splits, tiles_per_split = stats_splits(n, batch, config[0])
    return n_splits, tiles_per_split * config[0], config


def block_split(n_splits: int) -> int:
    """The step kernel's ``BLOCK_SPLIT``: the vector of partials it merges."""
    return max(2, triton.next_power_of_2(n_splits))


def guidance_stats(cond: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor, n: int, stride: int,
                   batch: int) -> torch.Tensor:
    """Launch the statistics pass: ``(batch, n_splits, 4)`` partials in ``guidance``'s dtype (the compute
    dtype) of the ``n`` guided elements at ``sample * stride`` of the dense ``cond`` and ``uncond``."""
    n_splits, chunk, (block, warps) = stats_layout(n, batch)
    stats = torch.empty((batch, n_splits, 4), dtype=guidance.dtype, device=cond.device)
    with device_of(cond):
        for b0, nb in batch_chunks(batch):
            guidance_stats_kernel[(n_splits, nb)](
                cond, uncond, guidance, stats, n, stride, n_splits, chunk // block, batch_start=b0, BLOCK=block,
                num_warps=warps,
            )
    return stats


def guidance_kwargs(x: torch.Tensor, model_output: torch.Tensor, uncond, guidance, stats, guidance_rescale: float,
                    n: int, batch: int, standin: torch.Tensor) -> dict:
    """A step kernel's model-output and guidance arguments by name, as ``guided_prediction`` reads them: the
    (conditional) ``model_output`` and ``uncond`` in ``x``'s dense format, the per-sample ``guidance`` (None:
    unguided) and ``guidance_stats``' partials ``stats`` of ``batch`` samples of ``n`` elements (None: no rescale)
    with ``guidance_rescale``; ``standin`` is passed for the pointers that are not read."""
    guided = guidance is not None
    cond = like_dense(x, model_output)
    n_splits, chunk = 1, n  # read only with RESCALE
    if stats is not None:
        n_splits, chunk, _ = stats_layout(n, batch)
    rescale_hi, rescale_lo = split_float(guidance_rescale)
    return dict(
        model_output_ptr=cond, uncond_ptr=like_dense(x, uncond) if guided else cond,
        guidance_ptr=guidance if guided else standin, stats_ptr=standin if stats is None else stats,
        rescale_hi=rescale_hi, rescale_lo=rescale_lo, n_splits=n_splits, chunk=chunk, GUIDED=guided,
        RESCALE=stats is not None, BLOCK_SPLIT=block_split(n_splits),
    )


# The operands that the guided step ops (flow, Euler, solver) take first, in their schema: the sample, the
# (conditional) model output, and the unconditional output and per-sample scale, None when unguided.
GUIDED_STEP_PARAMETERS = (("sample", torch.Tensor), ("model_output", torch.Tensor), ("uncond", Optional[torch.Tensor]),
                          ("guidance", Optional[torch.Tensor]))


def guided_step(fn):
    """Decorator of a step op function that names the ``GUIDED_STEP_PARAMETERS`` unannotated: their schema
    types."""
    return annotated(fn, GUIDED_STEP_PARAMETERS)
