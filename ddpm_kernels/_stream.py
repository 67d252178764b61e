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

Imports nothing of the package.
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
