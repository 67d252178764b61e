"""How one in-kernel noise draw takes its (key, offset) from a torch generator (docs/design.md, "Noise streams").

Shared by the reference and the Triton backend (the compiled backends do the same in C++: ``csrc/cpu/noise.cpp``,
``csrc/cuda/launch.cuh``), so the generator is consumed identically on every backend of a device type:

* a CPU generator: key = ``randint(0, 2**63 - 1, (1,))`` (one 64-bit draw reduced mod 2**63 - 1, which the C++
  kernels take straight from the generator as ATen's ``random_from_to`` does; one torch.compile traces), offset 0;
* a CUDA generator: key = its seed, offset = its Philox offset, which advances by ``CUDA_OFFSET_STEP`` per call
  whatever the batch size (the counters of one draw never depend on the offset's advance: the sample and the
  element index are their own counter words). While a CUDA graph is captured or torch.compile traces, host
  ints would be frozen into the graph; the key is then a one-element device tensor drawn with ``randint``
  (itself graph safe; it advances the offset by the same 4) and the offset 0.

The stream itself is specified here too (`philox_normal`, re-exported by ``ddpm_kernels.reference``): every
backend's in-kernel noise is tested against it. Imports nothing of the package.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

# Philox offset advance of one CUDA draw: torch counts its offset in 32-bit outputs and rounds every
# reservation up to a multiple of 4 (one Philox counter).
CUDA_OFFSET_STEP = 4
# A key drawn as a tensor is randint(0, KEY_HIGH): a range past 2**32 takes one 64-bit draw.
KEY_HIGH = 2**63 - 1

Key = Union[int, torch.Tensor]


def draw_cpu_key(generator=None) -> torch.Tensor:
    """One 64-bit draw of a CPU generator as a one-element int64 tensor in [0, 2**63 - 1)."""
    return torch.randint(0, KEY_HIGH, (1,), generator=generator, dtype=torch.int64)


def _capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def stream_state(generator, device: torch.device, as_tensor: bool = False) -> Tuple[Key, int]:
    """``(key, offset)`` of one noise draw on ``device`` from ``generator`` (or the device's default generator),
    advancing the generator as the module docstring says. The key is an int, or a one-element int64 tensor on
    ``device`` where it must stay on the device (graph capture) or when ``as_tensor``."""
    device = torch.device(device)
    if device.type == "cpu":
        key = draw_cpu_key(generator)
        return (key if as_tensor else int(key)), 0
    if device.type != "cuda":
        raise ValueError(f"in-kernel noise: no noise stream for device type {device.type!r}")
    if _capturing(device):
        key = torch.randint(0, KEY_HIGH, (1,), generator=generator, device=device, dtype=torch.int64)
        return key, 0
    if generator is None:
        generator = torch.cuda.default_generators[device.index if device.index is not None else
                                                  torch.cuda.current_device()]
    key, offset = take_philox_state(generator)
    if as_tensor:
        return torch.full((1,), key, dtype=torch.int64, device=device), offset
    return key, offset


def take_philox_state(generator) -> Tuple[int, int]:
    """``(key, offset)`` of a Philox generator (CUDA's: ``initial_seed``, ``get_offset``, ``set_offset``),
    advancing its offset by ``CUDA_OFFSET_STEP``. The key is a signed int64 with the seed's 64 bits (torch.library
    ints are int64)."""
    seed = generator.initial_seed()
    offset = generator.get_offset()
    generator.set_offset(offset + CUDA_OFFSET_STEP)
    return (seed - 2**64 if seed >= 2**63 else seed), offset


def check_sample_offset(sample_offset) -> int:
    """``sample_offset`` as an int >= 0 (bool refused), else the documented error."""
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int):
        try:
            import numpy as np

            if isinstance(sample_offset, np.integer):
                sample_offset = int(sample_offset)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(
                f"sample_offset: expected an int (the global index of the batch's first sample), "
                f"got {type(sample_offset).__name__}"
            ) from None
    if not 0 <= sample_offset < 2**32:
        # the global sample index is one 32-bit counter word
        raise ValueError(f"sample_offset: expected an int in [0, 2**32), got {sample_offset}")
    return sample_offset


# ------------------------------------------------------------------------------------------ the noise stream
# The in-kernel noise as a pure function of (key, call offset, global sample index, element index within the
# sample): Philox4x32-10 (Salmon et al., SC'11; the generator of curand and torch's CUDA RNG) at the counter
# (q, sample, offset_lo, offset_hi) with q = element // 4, keyed by (key_lo, key_hi); its four 32-bit outputs
# become four uniforms u = ((x >> 8) + 0.5) * 2**-24 in (0, 1), and the pairs (u0, u1), (u2, u3) four normals
# by Box-Muller, sqrt(-2 ln u_even) * (cos, sin)(2 pi u_odd), element 4q + k taking output k. Nothing depends
# on the grid, the thread count or the other samples of the batch. See docs/design.md, "Noise streams".
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """``(hi, lo)`` 32-bit words of ``a * b`` for a 32-bit constant ``a`` and uint32 values held in int64 (16-bit
    halves keep every product below 2**49)."""
    lo_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, key):
    """Philox4x32-10 of the counters (uint32 values in int64 tensors) under the 64-bit ``key`` (an int, or a
    one-element int64 tensor holding its bits)."""
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def philox_normal(key, offset: int, first_sample: int, batch: int, per_sample: int, device="cpu"):
    """The noise stream's standard normals for samples ``first_sample .. first_sample + batch - 1`` of one draw,
    shape (batch, per_sample), float32: the specification every backend's in-kernel noise follows. ``key``: an
    int or a one-element int64 tensor (a key that stays on the device, as under CUDA-graph capture)."""
    groups = (per_sample + 3) // 4
    q = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    sample = (first_sample + torch.arange(batch, dtype=torch.int64, device=device))[:, None].expand(batch, groups)
    c2 = torch.full_like(q, offset & _U32)
    c3 = torch.full_like(q, (offset >> 32) & _U32)
    words = philox4x32_10(q & _U32, sample & _U32, c2, c3, key)
    u = [((w >> 8).to(torch.float32) + 0.5) * 5.9604644775390625e-08 for w in words]
    two_pi = torch.tensor(6.283185307179586, dtype=torch.float32)
    normals = []
    for even, odd in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(even))
        theta = two_pi * odd
        normals += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(normals, dim=-1).reshape(batch, groups * 4)[:, :per_sample]
