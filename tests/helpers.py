"""Shared test utilities: input builders and the error bounds used against float64 math."""

import numpy as np
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 1 element, odd sizes, 1-D to 5-D data; batch 1 and batch > 1
SHAPES = [(1,), (1, 1, 1, 1), (3, 3, 17, 19), (4, 2, 5), (2, 3, 2, 3, 5), (5, 7)]
T_SMALL = 1000


def timesteps(batch, T, generator=None, include=(0, None)):
    """Per-sample timesteps covering 0 and T-1 whenever the batch has room for both."""
    lo, hi = include[0], T - 1 if include[1] is None else include[1]
    if batch == 1:
        return torch.tensor([hi], dtype=torch.long)
    t = torch.randint(0, T, (batch,), generator=generator)
    t[0], t[-1] = lo, hi
    return t


def make(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def np64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def allowed_error(expected, scale, dtype):
    """Error allowed for a result in ``dtype`` computed in float32 (float64 for float64) from inputs exactly
    representable in ``dtype``: a few float32 roundings of every term (``scale`` is the sum of the terms'
    magnitudes) plus the final rounding to ``dtype`` (half an ulp)."""
    expected, scale = np.abs(expected), np.abs(scale)
    if dtype == torch.float64:
        return 1e-12 * (scale + 1e-300)
    allowed = 8 * torch.finfo(torch.float32).eps * scale
    if dtype in (torch.float16, torch.bfloat16):
        fi = torch.finfo(dtype)
        allowed = allowed + 0.5 * fi.eps * expected + fi.tiny * fi.eps
    else:
        allowed = allowed + 1e-30
    return allowed


def assert_close_to_fp64(actual, expected, scale, dtype, what=""):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    a = np64(actual)
    expected = np.broadcast_to(expected, a.shape)
    err = np.abs(a - expected)
    allowed = np.broadcast_to(allowed_error(expected, scale, dtype), a.shape)
    bad = ~(err <= allowed)
    if dtype != torch.float64:
        # a true value beyond the dtype's range correctly rounds to an infinity of the same sign
        overflow = (np.abs(expected) > torch.finfo(dtype).max) & np.isinf(a) & (np.sign(a) == np.sign(expected))
        bad &= ~overflow
    if bad.any():
        i = np.argmax(np.where(bad, err - allowed, -np.inf))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.size} elements off; worst at flat index {i}: got {a.flat[i]!r}, "
            f"expected {expected.flat[i]!r}, error {err.flat[i]:.3g} > allowed {allowed.flat[i]:.3g}"
        )
