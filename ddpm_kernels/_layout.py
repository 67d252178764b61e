"""Memory layouts the fused kernels run in place.

The kernels index storage order, sample ``b`` at ``[b * N, (b + 1) * N)``: they run unchanged on any layout in
which every sample is one dense block, as long as all data tensors of a call share it. The layouts recognised
are torch's contiguous, channels_last (4-D) and channels_last_3d (5-D) memory formats. A call runs in its
primary tensor's format (`dense_format`); other operands are brought to it (`in_format`: no copy when they
already are) and outputs are allocated in it (`empty_in_format`), so an NHWC step reads and writes NHWC.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CONTIGUOUS", "dense_format", "in_format", "empty_in_format", "is_in_format"]

CONTIGUOUS = torch.contiguous_format
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """``x``'s memory format when every sample of ``x`` is one dense block in it, else contiguous (``x`` will be
    copied). A tensor in two formats at once (size-1 dims) is contiguous: both order its elements alike."""
    if x.is_contiguous():
        return CONTIGUOUS
    fmt = _CHANNELS_LAST.get(x.ndim)
    return fmt if fmt is not None and x.is_contiguous(memory_format=fmt) else CONTIGUOUS


def is_in_format(x: torch.Tensor, fmt: torch.memory_format) -> bool:
    return x.is_contiguous() if fmt is CONTIGUOUS else x.is_contiguous(memory_format=fmt)


def in_format(x: Optional[torch.Tensor], fmt: torch.memory_format = CONTIGUOUS) -> Optional[torch.Tensor]:
    """``x`` in memory format ``fmt``: ``x`` itself when it already is, else one copy."""
    if x is None:
        return None
    return x.contiguous() if fmt is CONTIGUOUS else x.contiguous(memory_format=fmt)


def empty_in_format(x: torch.Tensor, fmt: torch.memory_format, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialized tensor of ``x``'s shape and device in format ``fmt`` (``dtype``: default ``x``'s)."""
    return torch.empty(x.shape, dtype=x.dtype if dtype is None else dtype, device=x.device, memory_format=fmt)
