"""In-kernel noise. With ``noise=None`` a kernel draws ``z`` itself: the noise stream (``philox_normal``; the
specification is ``ddpm_kernels.reference.philox_normal``), element ``e`` of global sample ``s`` from the Philox4x32-10
counter ``(e // 4, s, offset_lo, offset_hi)``. The key and offset come from the generator as on every backend
(``ddpm_kernels._stream``; ``noise_key``):

* Eager CUDA (the common case): the generator's seed and Philox offset, read and advanced (by 4) on the host
  (no device work, no sync) and passed as kernel arguments, the way torch's RNG kernels take ``(seed,
  offset)``. The step is exactly one kernel launch.
* While a CUDA graph is being captured, or torch.compile is tracing: host ints would be frozen into the
  graph, replaying the same noise forever. The key is instead a one-element int64 device tensor drawn with
  ``randint(generator=...)`` and read by the kernel from memory (offset 0); the captured draw follows torch's
  graph-safe Philox bookkeeping, so every replay gets a fresh key. This costs a second, one-element launch,
  which a graph replays for free.
* CPU tensors (Triton's interpreter): the key tensor as well, one 64-bit draw from the CPU generator, as the
  reference and the C++ CPU kernels draw it.

Both sources run the same compiled kernel (key = key tensor XOR key argument, with a cached zero tensor or a
zero argument standing in for the unused one), so a kernel warmed up eagerly is the one a later CUDA-graph
capture launches: nothing is compiled or loaded during capture.

The kernels that take noise (``p_sample``, the DDIM/DDPM step, the flow and Euler steps, the solver step) read
``noise`` when it is given (``HAS_NOISE``) and draw from the stream otherwise (``load_or_draw_noise``); their
Philox key and offset arguments are int64 whatever their value (``NOISE_SCALARS``: without the annotation and
``do_not_specialize``, Triton would compile a new variant whenever a seed happened to be 1, divisible by 16, or
past 2**31).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._stream import stream_state
from .utils import annotated, like_dense, load_tile, sqrt_rn

__all__ = [
    "NOISE_SCALARS",
    "NOISE_PARAMETERS",
    "takes_noise",
    "zero_key",
    "noise_operands",
    "noise_kwargs",
    "noise_key",
    "step_noise",
    "draw_seed",
    "philox_at",
    "philox_normal",
    "philox_normal_at",
    "load_or_draw_noise",
]

# The noise-taking kernels' int64 scalars, compiled without value specialization (module docstring).
NOISE_SCALARS = ("philox_seed", "philox_offset", "sample_offset")


# The noise operands of every op that takes noise, in its schema: the noise, or the key tensor, key and offset of
# an in-kernel draw (``noise_key``), and the global sample of the op's first one (``sample_offset``).
NOISE_PARAMETERS = (("noise", Optional[torch.Tensor]), ("seed", Optional[torch.Tensor]), ("philox_seed", int),
                    ("philox_offset", int), ("sample_offset", int))


def takes_noise(fn):
    """Decorator of an op function that names the ``NOISE_PARAMETERS`` unannotated: their schema types."""
    return annotated(fn, NOISE_PARAMETERS)


# ------------------------------------------------------------------------------------------------ host side
_ZERO_KEYS = {}


def zero_key(device) -> torch.Tensor:
    """A zero int64 key tensor per device, allocated once (eagerly: a key tensor is drawn instead during
    capture), so steps keyed by generator state allocate nothing."""
    key = _ZERO_KEYS.get(device)
    if key is None:
        key = _ZERO_KEYS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return key


def noise_operands(noise, seed, x_t: torch.Tensor, t: torch.Tensor):
    """``(noise, seed, HAS_NOISE)`` as the noise-taking kernels read them (``load_or_draw_noise``): given noise
    in ``x_t``'s dense format, with ``t`` as an unread stand-in for the key tensor; or ``x_t`` as an unread stand-in for
    the noise, with the key tensor ``seed`` (a cached zero key when the Philox state comes as ints)."""
    if noise is not None:
        return like_dense(x_t, noise), t, True
    return x_t, (zero_key(x_t.device) if seed is None else seed), False


def noise_kwargs(noise, seed, philox_seed: int, philox_offset: int, sample_offset: int, x: torch.Tensor,
                 standin: torch.Tensor) -> dict:
    """A noise-taking kernel's noise arguments by name (``noise_ptr``, ``seed_ptr``, ``NOISE_SCALARS``,
    ``HAS_NOISE``; ``noise_operands``'s ``x`` and ``standin``): what ``load_or_draw_noise`` reads."""
    noise, seed, has_noise = noise_operands(noise, seed, x, standin)
    return dict(noise_ptr=noise, seed_ptr=seed, philox_seed=philox_seed, philox_offset=philox_offset,
                sample_offset=sample_offset, HAS_NOISE=has_noise)


def noise_key(generator, x: torch.Tensor, noise=None):
    """(key tensor or None, key, offset) for one in-kernel noise draw on ``x``'s device (module docstring): the
    CUDA generator's seed and offset as ints in eager CUDA, else a one-element key tensor (CUDA-graph capture,
    torch.compile tracing, CPU tensors) and offset 0. ``(None, 0, 0)``, drawing nothing, when ``noise`` is
    given."""
    if noise is not None:
        return None, 0, 0
    key, offset = stream_state(generator, x.device, as_tensor=not x.is_cuda)
    if isinstance(key, torch.Tensor):
        return key, 0, offset
    return None, key, offset


def step_noise(adds_noise: bool, generator, x: torch.Tensor, noise=None):
    """``(noise, key tensor or None, key, offset)`` of a step on ``x``: `noise_key`'s draw when the step has a
    noise term, else nothing read or drawn (``(None, None, 0, 0)``)."""
    if not adds_noise:
        return None, None, 0, 0
    return (noise, *noise_key(generator, x, noise))


def draw_seed(generator, device) -> torch.Tensor:
    """A one-element int64 device tensor holding a fresh 63-bit Philox key, drawn from ``generator`` (torch's
    default generator for ``device`` when None) with ``randint``. Read by kernels from memory, never passed as
    an int, so a captured CUDA graph re-draws it on every replay."""
    return torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device, dtype=torch.int64)



# -------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _probe():
    pass


# Triton's interpreter has no libdevice; compiled kernels call CUDA's accurate logf/cosf/sinf (within 2 ulps)
# by name, so the stream's transcendentals never become approximate instructions.
_LIBDEVICE = tl.constexpr(type(_probe).__name__ != "InterpretedFunction")

@triton.jit
def _uniform(x):
    """``((x >> 8) + 0.5) * 2**-24`` of uint32 ``x``: exact, in (0, 1)."""
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def box_muller(bits_radius, bits_angle):
    """The two normals ``(r cos theta, r sin theta)`` of two uint32 Philox outputs made uniforms ``u1``, ``u2``
    (``_uniform``): ``r = sqrt(-2 log u1)``, ``theta = 2 pi u2``."""
    u = _uniform(bits_radius)
    theta = 6.283185307179586 * _uniform(bits_angle)
    if _LIBDEVICE:
        log_u, cos_theta, sin_theta = libdevice.log(u), libdevice.cos(theta), libdevice.sin(theta)
    else:
        log_u, cos_theta, sin_theta = tl.log(u), tl.cos(theta), tl.sin(theta)
    radius = sqrt_rn(-2.0 * log_u)
    return radius * cos_theta, radius * sin_theta


@triton.jit
def philox_at(key, offset, sample, q):
    """The four uint32 outputs of Philox4x32-10 under the 64-bit ``key`` at the counters ``(q, sample,
    offset_lo, offset_hi)`` (``q``: an int64 tensor of counter indices, element ``e``'s is ``e // 4``)."""
    zero = tl.zeros_like(q)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((zero + sample) & 0xFFFFFFFF).to(tl.uint32)
    c2 = ((zero + offset) & 0xFFFFFFFF).to(tl.uint32)
    c3 = (((zero + offset) >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(key, c0, c1, c2, c3)


@triton.jit
def philox_normal(key, offset, sample, tile_start, BLOCK: tl.constexpr):
    """The noise stream's normals of elements ``tile_start + arange(BLOCK)`` of global sample ``sample``
    (``tile_start % 4 == 0``): element ``e`` is output ``e % 4`` of Philox4x32-10 at the counter ``(e // 4,
    sample, offset_lo, offset_hi)`` under the 64-bit ``key``, the outputs made uniforms and the pairs normals by
    Box-Muller (``ddpm_kernels.reference.philox_normal``). Nothing depends on BLOCK or the grid."""
    q = tile_start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = philox_at(key, offset, sample, q)
    n1, n2 = box_muller(r0, r1)
    n3, n4 = box_muller(r2, r3)
    # join(join(n1, n3), join(n2, n4)) has shape (BLOCK/4, 2, 2); row-major flattening lays it out as
    # n1, n2, n3, n4 per counter, so each thread's 4 contiguous elements come from one Philox call (the
    # compiled PTX keeps them in registers: no shared-memory shuffle).
    return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [BLOCK])


@triton.jit
def philox_normal_at(key, offset, sample, e):
    """The noise stream's normal of element ``e`` (any int64 tensor of row-major indices) of global sample
    ``sample``: output ``e mod 4`` of the Philox counter ``(e // 4, sample, offset_lo, offset_hi)``, made a
    normal by the same operations as ``philox_normal`` (so the same value, bit for bit)."""
    r0, r1, r2, r3 = philox_at(key, offset, sample, e // 4)
    lane = e % 4
    first_pair = lane < 2
    n_cos, n_sin = box_muller(tl.where(first_pair, r0, r2), tl.where(first_pair, r1, r3))
    return tl.where(lane % 2 == 0, n_cos, n_sin)


@triton.jit
def load_or_draw_noise(noise_ptr, seed_ptr, philox_seed, philox_offset, sample_offset, sample, tile_start, offs,
                       mask, N, dtype: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """The tile's standard normals in ``dtype``: read from ``noise`` with ``HAS_NOISE``, else the noise stream
    (``philox_normal``) of global sample ``sample + sample_offset`` keyed by ``seed[0] ^ philox_seed``, one of
    which is zero (module docstring), at offset ``philox_offset``."""
    if HAS_NOISE:
        z = load_tile(noise_ptr, offs, mask, dtype)
    else:
        key = tl.load(seed_ptr) ^ philox_seed
        z = philox_normal(key, philox_offset, sample.to(tl.int64) + sample_offset, tile_start, BLOCK).to(dtype)
    return z

