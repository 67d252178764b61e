"""The multistep-solver family: ``solver_step`` (DPM-Solver(++), UniPC, LCM, ... as rows of a coefficient table;
docs/design.md, "Multistep solvers"). Reference: ``ddpm_kernels.reference.solver_step_ref``.

One kernel per step. A program owns a tile of one sample; it gathers its sample's row of the coefficient table
(``SolverColumns``; cast to the compute dtype, NaN for an index outside the table) as scalars, forms the guided
model output in registers, then, in the reference's order of operations,

    x0  = x0_sample x + x0_output y          clamped to +-clip_range, or thresholded with the sample's scale
    m   = m_sample x + m_x0 x0 + m_output y
    x_c = c_sample x + c_last l + c_m m + sum_j c_hist[j] h_j
    x'  = p_xc x_c + p_m m + sum_j p_hist[j] h_j + p_noise z

and writes ``x'``, then ``m`` into ring slot ``step_index mod H`` and ``x_c`` into ``last_sample``: every element
is read before the same thread writes it, so the slot written may be the one read as ``h_H``, and ``out`` may be
``sample``. A term whose coefficient is exactly 0 is exactly 0 and its tensor is not read (the load is masked by
the coefficient), so an unwritten slot may hold NaN. ``h_j`` is slot ``(step_index - j) mod H`` (Python's
modulo: a negative index wraps as the reference's ``torch.remainder``). ``H`` (``SLOTS``) and the optional
tensors (last sample, guidance, noise) are constexprs; a slot read by both the corrector and the predictor is
loaded twice by the same thread (the second load hits the cache), which keeps the reference's order of the sums.

Passes before the step, when needed:
* ``guidance_rescale > 0``: ``guidance.py``'s per-sample statistics pass (as for the flow step);
* ``threshold_ratio``: the kernel with ``X0_ONLY`` writes the raw x0 in the compute dtype, ``threshold.
  threshold_scale`` selects each sample's scale on the device, and the step applies ``clamp(x0, -s, s) / s``.

Noise: ``noise`` given, or drawn in-kernel (``stochastic``) from the noise stream exactly as the flow step draws
it (``noise.py``; same generator bookkeeping and ``sample_offset``). The stream is indexed by each element's
row-major position; on channels_last data, whose storage order the kernel walks, ``philox_normal_at`` draws each
element at its row-major index (``(p mod C) * (N / C) + p div C`` for storage position ``p``), so the state
tensors are written in place in their own format and no contiguous copies are made.

Layouts: the sample's dense format (contiguous, channels_last(_3d)); the ring's slots are read in that format
when the ring is one tensor whose slots are each a dense block of it (``new_history`` makes such a ring), and
through a copy written back after the step otherwise; the same for ``last_sample`` and ``out``.

No autograd: sampling is not differentiated.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._layout import CONTIGUOUS, dense_format, empty_in_format, is_in_format
from .guidance import guidance_kwargs, guidance_stats, guided_prediction, guided_step
from .noise import (NOISE_SCALARS, load_or_draw_noise, noise_key, noise_kwargs, philox_normal_at, takes_noise,
                    zero_key)
from .threshold import bound_pred_x0, threshold_scale
from .utils import (
    as_rows, custom_op_with_out, empty_dense, compute_dtype, result_dtype, launch_per_sample, like_dense, sample_index,
    sample_tile, split_float, store_tile,
)

__all__ = ["solver_step_kernel", "solver_step", "solver_step_op", "solver_step_out_op", "philox_normal_at"]

# The columns of ``SolverColumns`` (``ddpm_kernels._spec``) as constexprs; those after the corrector's history
# depend on the ring's size and are formed in the kernel.
X0_SAMPLE = tl.constexpr(0)
X0_OUTPUT = tl.constexpr(1)
M_SAMPLE = tl.constexpr(2)
M_X0 = tl.constexpr(3)
M_OUTPUT = tl.constexpr(4)
C_SAMPLE = tl.constexpr(5)
C_LAST = tl.constexpr(6)
C_M = tl.constexpr(7)
C_HIST = tl.constexpr(8)


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def coefficient(row_ptr, column, in_range, cd: tl.constexpr):
    """The sample's coefficient ``column`` in the compute dtype; NaN (no memory access) for a bad index."""
    return tl.load(row_ptr + column, mask=in_range, other=float("nan")).to(cd)


@triton.jit
def scaled(c, value):
    """``c * value``, exactly 0 where ``c`` is 0 whatever ``value`` holds (``reference._term``)."""
    return tl.where(c != 0, c * value, 0.0)


@triton.jit
def mask_if(used, mask):
    """``mask`` where the per-sample ``used`` holds, else nothing (``where``: Triton's interpreter cannot ``&``
    a scalar condition with a block)."""
    return tl.where(used, mask, False)


@triton.jit
def load_term(c, ptr, offs, mask, cd: tl.constexpr):
    """``c * tensor[offs]`` with the tensor read only where ``c`` is not 0 (``scaled``)."""
    return scaled(c, tl.load(ptr + offs, mask=mask_if(c != 0, mask), other=0.0).to(cd))


@triton.jit
def ring_slot(i, j, SLOTS: tl.constexpr):
    """``(i - j) mod SLOTS`` with Python's (floored) modulo: in [0, SLOTS) for any ``i``."""
    r = (i - j) % SLOTS
    return tl.where(r < 0, r + SLOTS, r)


# -------------------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=NOISE_SCALARS)
def solver_step_kernel(
    sample_ptr, model_output_ptr, uncond_ptr, guidance_ptr, stats_ptr, noise_ptr, seed_ptr, philox_seed: tl.int64,
    philox_offset: tl.int64, sample_offset: tl.int64, coefficients_ptr, step_index_ptr, n_rows, history_ptr,
    slot_stride, last_ptr, scale_ptr, clip_hi, clip_lo, rescale_hi, rescale_lo, n_splits, chunk, channels, out_ptr, N,
    batch_start, SLOTS: tl.constexpr, HAS_LAST: tl.constexpr, GUIDED: tl.constexpr, RESCALE: tl.constexpr,
    ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr, NOISE_CHANNELS_LAST: tl.constexpr, CLIP: tl.constexpr,
    THRESHOLD: tl.constexpr, X0_ONLY: tl.constexpr, COMPUTE_FP64: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr
):
    """One step (module docstring). ``X0_ONLY``: the first pass of a thresholded step, the raw x0 (compute
    dtype) into ``out`` and nothing else written."""
    sample, tile_start, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    width: tl.constexpr = 11 + 2 * SLOTS
    i, in_range, i_safe = sample_index(step_index_ptr, sample, n_rows)
    row_ptr = coefficients_ptr + i_safe * width
    x0_sample = coefficient(row_ptr, X0_SAMPLE, in_range, cd)
    x0_output = coefficient(row_ptr, X0_OUTPUT, in_range, cd)
    m_sample = coefficient(row_ptr, M_SAMPLE, in_range, cd)
    m_x0 = coefficient(row_ptr, M_X0, in_range, cd)
    m_output = coefficient(row_ptr, M_OUTPUT, in_range, cd)
    # the sample and the model output are read where some coefficient uses them
    if X0_ONLY:
        x_used = x0_sample != 0
        y_used = x0_output != 0
    else:
        c_sample = coefficient(row_ptr, C_SAMPLE, in_range, cd)
        x_used = (x0_sample != 0) | (m_sample != 0) | (c_sample != 0)
        y_used = (x0_output != 0) | (m_output != 0)
    x = tl.load(sample_ptr + offs, mask=mask_if(x_used, mask), other=0.0).to(cd)
    y = tl.load(model_output_ptr + offs, mask=mask_if(y_used, mask), other=0.0).to(cd)
    if GUIDED:
        u = tl.load(uncond_ptr + offs, mask=mask_if(y_used, mask), other=0.0).to(cd)
        y = guided_prediction(y, u, guidance_ptr, stats_ptr, sample, n_splits, chunk, N, rescale_hi, rescale_lo, cd,
                              RESCALE, BLOCK_SPLIT)
    x0 = scaled(x0_sample, x) + scaled(x0_output, y)
    if X0_ONLY:
        store_tile(out_ptr, offs, x0, mask)
    else:
        x0 = bound_pred_x0(x0, scale_ptr, sample, clip_hi, clip_lo, THRESHOLD, CLIP)
        m = scaled(m_sample, x) + scaled(m_x0, x0) + scaled(m_output, y)

        # the corrector: x_c
        x_c = scaled(c_sample, x)
        if HAS_LAST:
            x_c = x_c + load_term(coefficient(row_ptr, C_LAST, in_range, cd), last_ptr, offs, mask, cd)
        x_c = x_c + scaled(coefficient(row_ptr, C_M, in_range, cd), m)
        for j in tl.static_range(1, SLOTS + 1):
            h_offs = ring_slot(i, j, SLOTS).to(tl.int64) * slot_stride + offs
            x_c = x_c + load_term(coefficient(row_ptr, C_HIST + j - 1, in_range, cd), history_ptr, h_offs, mask, cd)

        # the predictor: x'
        p_xc = coefficient(row_ptr, C_HIST + SLOTS, in_range, cd)
        p_m = coefficient(row_ptr, C_HIST + SLOTS + 1, in_range, cd)
        result = scaled(p_xc, x_c) + scaled(p_m, m)
        for j in tl.static_range(1, SLOTS + 1):
            h_offs = ring_slot(i, j, SLOTS).to(tl.int64) * slot_stride + offs
            p_h = coefficient(row_ptr, C_HIST + SLOTS + 1 + j, in_range, cd)
            result = result + load_term(p_h, history_ptr, h_offs, mask, cd)
        if ADD_NOISE:
            p_noise = coefficient(row_ptr, C_HIST + 2 * SLOTS + 2, in_range, cd)
            if NOISE_CHANNELS_LAST:
                # storage position p is row-major element (p mod C) (N / C) + p div C of its sample
                e = (offs_in_sample % channels) * (N // channels) + offs_in_sample // channels
                key = tl.load(seed_ptr) ^ philox_seed
                z = philox_normal_at(key, philox_offset, sample.to(tl.int64) + sample_offset, e).to(cd)
            else:
                z = load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample_offset, sample,
                                       tile_start, offs, mask_if(p_noise != 0, mask), N, cd, HAS_NOISE, BLOCK)
            result = result + scaled(p_noise, z)

        # every read done: the step, then the state
        store_tile(out_ptr, offs, result, mask)
        if SLOTS > 0:
            store_tile(history_ptr, ring_slot(i, 0, SLOTS).to(tl.int64) * slot_stride + offs, m, mask)
        if HAS_LAST:
            store_tile(last_ptr, offs, x_c, mask)


# ------------------------------------------------------------------------------------------------ host side
_CHANNELS_LAST_PERM = {5: (0, 1, 4, 2, 3), 6: (0, 1, 5, 2, 3, 4)}  # by the ring's ndim


def _ring_in_format(history: torch.Tensor, fmt, slot_numel: int) -> bool:
    """Whether the kernel reads ``history`` as it is: every slot a dense block in ``fmt``, ``slot_numel``
    elements apart."""
    return is_in_format(history[0], fmt) and (history.shape[0] == 1 or history.stride(0) == slot_numel)


def _empty_ring(history: torch.Tensor, fmt) -> torch.Tensor:
    """An uninitialized ring like ``history`` whose slots are dense blocks in ``fmt``, one after another."""
    if fmt is CONTIGUOUS:
        return torch.empty(history.shape, dtype=history.dtype, device=history.device)
    slots, batch, channels, *spatial = history.shape
    storage = torch.empty((slots, batch, *spatial, channels), dtype=history.dtype, device=history.device)
    return storage.permute(_CHANNELS_LAST_PERM[history.ndim])


def _launch(sample, model_output, uncond, guidance, stats, coefficients, step_index, history, last_sample, scale,
            clip_range, guidance_rescale, stochastic, noise, seed, philox_seed, philox_offset, sample_offset, out,
            x0_only=False):
    """One launch of ``solver_step_kernel`` writing ``out`` (in the sample's dense format; with ``x0_only`` a
    compute-dtype buffer for the raw x0), the ring and the last sample. State tensors not laid out as the kernel
    reads them go through copies written back after the launch."""
    x, batch, n = as_rows(sample)
    if x.numel() == 0:
        return
    fmt = dense_format(x)
    slots = (coefficients.shape[1] - 11) // 2  # the table's layout (SolverColumns), also for the x0 pass
    ring = history
    if history is not None and not x0_only and not _ring_in_format(history, fmt, batch * n):
        ring = _empty_ring(history, fmt)
        ring.copy_(history)
    has_last = last_sample is not None and not x0_only
    last = last_sample
    if has_last and not is_in_format(last_sample, fmt):
        last = empty_in_format(last_sample, fmt)
        last.copy_(last_sample)
    add_noise = stochastic and not x0_only
    key_standin = zero_key(x.device)
    noise_args = noise_kwargs(noise if add_noise else None, seed, philox_seed, philox_offset, sample_offset, x,
                              key_standin)
    clip_hi, clip_lo = split_float(clip_range if clip_range is not None else 0.0)
    launch_per_sample(
        solver_step_kernel, x, n, batch, sample_ptr=x,
        **guidance_kwargs(x, model_output, uncond, guidance, stats, guidance_rescale, n, batch, coefficients),
        **noise_args, coefficients_ptr=coefficients, step_index_ptr=step_index,
        n_rows=coefficients.shape[0], history_ptr=x if ring is None or x0_only else ring, slot_stride=batch * n,
        last_ptr=last if has_last else x, scale_ptr=coefficients if scale is None else scale,
        clip_hi=clip_hi, clip_lo=clip_lo, channels=x.shape[1] if x.ndim > 1 else 1, out_ptr=out, N=n,
        SLOTS=slots, HAS_LAST=has_last, ADD_NOISE=add_noise,
        NOISE_CHANNELS_LAST=add_noise and not noise_args["HAS_NOISE"] and fmt is not CONTIGUOUS,
        CLIP=clip_range is not None, THRESHOLD=scale is not None, X0_ONLY=x0_only,
        COMPUTE_FP64=out.dtype == torch.float64,
    )
    if ring is not history:
        history.copy_(ring)
    if last is not last_sample:
        last_sample.copy_(last)


def _run(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample, clip_range,
         threshold_ratio, threshold_max, guidance_rescale, stochastic, noise, seed, philox_seed, philox_offset,
         sample_offset, out):
    """The passes of one step into ``out`` (module docstring): the rescale statistics, the thresholding scale,
    then the step."""
    stats = scale = None
    if guidance is not None and guidance_rescale > 0 and sample.numel() > 0:
        x, batch, n = as_rows(sample)
        stats = guidance_stats(like_dense(x, model_output), like_dense(x, uncond), guidance, n, n, batch)
    if threshold_ratio is not None and sample.numel() > 0:
        x0 = empty_in_format(sample, dense_format(as_rows(sample)[0]),
                             compute_dtype(result_dtype(sample, model_output, uncond, noise)))
        _launch(sample, model_output, uncond, guidance, stats, coefficients, step_index, None, None, None, None,
                guidance_rescale, False, None, None, 0, 0, 0, x0, x0_only=True)
        scale = threshold_scale(x0, threshold_ratio, threshold_max)
    _launch(sample, model_output, uncond, guidance, stats, coefficients, step_index, history, last_sample, scale,
            clip_range, guidance_rescale, stochastic, noise, seed, philox_seed, philox_offset, sample_offset, out)


@takes_noise
@guided_step
def _solver_step(
    sample, model_output, uncond, guidance, coefficients: torch.Tensor, step_index: torch.Tensor,
    history: Optional[torch.Tensor], last_sample: Optional[torch.Tensor], clip_range: Optional[float],
    threshold_ratio: Optional[float], threshold_max: float, guidance_rescale: float, stochastic: bool,
    noise, seed, philox_seed, philox_offset, sample_offset
) -> torch.Tensor:
    """One step (module docstring): returns ``x'`` in ``sample``'s dense format and writes the ring's slot
    ``step_index mod H`` of ``history`` and ``last_sample``. ``guidance`` (B,) in the compute dtype given:
    ``model_output`` is the conditional output and ``uncond`` the unconditional one. ``stochastic``: the noise
    term, ``noise`` or drawn with ``seed`` / ``philox_seed`` / ``philox_offset`` (``noise.noise_key``). Float
    operands of different dtypes are each read in their own: ``x'`` (and the state, which must have it) in
    their promoted dtype, computed in its compute dtype."""
    out = empty_dense(sample, result_dtype(sample, model_output, uncond, noise))
    _run(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample, clip_range,
         threshold_ratio, threshold_max, guidance_rescale, stochastic, noise, seed, philox_seed, philox_offset,
         sample_offset, out)
    return out


def _solver_step_fake(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample,
                      clip_range, threshold_ratio, threshold_max, guidance_rescale, stochastic, noise, *_):
    return empty_dense(sample, result_dtype(sample, model_output, uncond, noise))


# solver_step_out writes x' into out, which may be sample itself (each element is read before it is written);
# both forms write the ring and the last sample in place.
solver_step_op, solver_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::solver_step", _solver_step, _solver_step_fake, _run, mutates_args=("history", "last_sample")
)


def solver_step(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample, opts,
                noise=None, generator=None, out=None, sample_offset=0):
    """Backend entry with ``reference.solver_step_ref``'s signature (``opts`` a ``SolverStepOptions``)."""
    if opts.stochastic:
        seed, philox_seed, philox_offset = noise_key(generator, sample, noise)
    else:
        noise, seed, philox_seed, philox_offset = None, None, 0, 0  # nothing read or drawn
    guided = opts.guided
    if guided:
        guidance = guidance.to(compute_dtype(result_dtype(sample, model_output, uncond, noise))).contiguous()
    args = (
        sample, model_output, uncond if guided else None, guidance if guided else None, coefficients, step_index,
        history, last_sample, None if opts.clip_range is None else float(opts.clip_range),
        None if opts.threshold_ratio is None else float(opts.threshold_ratio), float(opts.threshold_max),
        float(opts.guidance_rescale) if guided else 0.0, bool(opts.stochastic), noise, seed, philox_seed,
        philox_offset, sample_offset,
    )
    if out is None:
        return solver_step_op(*args)
    solver_step_out_op(*args, out)
    return out
