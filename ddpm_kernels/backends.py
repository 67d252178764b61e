"""Backend registry and selection.

A backend is an object with

* ``name``: one of ``BACKEND_NAMES``;
* ``unavailable_reason(device, dtype) -> Optional[str]``: ``None`` when it can run tensors of that device and
  dtype, else a sentence saying why not and how to get it;
* ``ops``: a dict from op name (the keys of ``ddpm_kernels.reference.OPS``) to a function with the same
  signature as the reference function of that name. Functions receive validated arguments (``t`` is int64 of
  shape (B,), every tensor on one device, one float dtype) and must honour ``out=`` where the reference does.

Fused backends live in their own modules and are imported lazily on first use, so a broken or missing
compiled extension never breaks ``import ddpm_kernels``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference

__all__ = ["BACKEND_NAMES", "BackendUnavailableError", "get_backend", "resolve", "available_backends"]

BACKEND_NAMES = ("auto", "reference", "triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to get it."""


class _ReferenceBackend:
    name = "reference"
    ops = reference.OPS

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None


# name -> ("module:attribute", how to get it). The module is imported on first use.
_FUSED = {
    "triton": (
        "ddpm_kernels.triton:BACKEND",
        "the Triton backend needs `triton` (Linux) and CUDA tensors: pip install triton",
    ),
    "cuda": (
        "ddpm_kernels.extension:CUDA_BACKEND",
        "the CUDA extension is built by `pip install --no-build-isolation .` with a CUDA build of torch and nvcc",
    ),
    "cpu": (
        "ddpm_kernels.extension:CPU_BACKEND",
        "the C++ CPU extension is built by `pip install --no-build-isolation .`",
    ),
}

# Fused backends tried by backend="auto", in order, per device type (see README, "Backends": the CUDA order is
# set by host overhead, not yet by a GPU timing).
AUTO_ORDER = {
    "cuda": ("cuda", "triton"),
    "cpu": ("cpu",),
}

_loaded: Dict[str, object] = {"reference": _ReferenceBackend()}
_load_errors: Dict[str, str] = {}
_warned = set()


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    target, how = _FUSED[name]
    module_name, attr = target.split(":")
    # No lock: Python's import lock serializes the import, and a racing thread at worst stores the same object.
    # (A `with lock:` here would also stop torch.compile(fullgraph=True) when the first use is traced.)
    try:
        backend = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, or an extension built for another torch (OSError, ...)
        _load_errors[name] = f"{type(exc).__name__}: {exc}; {how}"
        return None
    _loaded[name] = backend
    return backend


def get_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The backend object for an explicit name, or raise BackendUnavailableError saying why."""
    if name == "reference":
        return _loaded["reference"]
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend={name!r} is not available: {_load_errors[name]}")
    reason = backend.unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={name!r} cannot run {dtype} tensors on {device}: {reason}")
    return backend


_resolved: Dict[tuple, Tuple[str, Callable]] = {}


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable]:
    """(backend name, op function) serving ``op`` for tensors of ``device``/``dtype``."""
    key = (op, backend, device, dtype)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(op, backend, device, dtype)
    return hit


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable]:
    if backend != "auto":
        impl = get_backend(backend, device, dtype)
        fn = impl.ops.get(op)
        if fn is None:
            raise BackendUnavailableError(
                f"backend={backend!r} does not implement {op}; use backend='auto' or 'reference'"
            )
        return backend, fn
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        impl = _load(name)
        if impl is None:
            reasons.append(f"{name}: {_load_errors[name]}")
            continue
        reason = impl.unavailable_reason(device, dtype)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
            continue
        fn = impl.ops.get(op)
        if fn is not None:
            return name, fn
        reasons.append(f"{name}: no fused {op}")
    if reasons:
        key = (device.type, dtype)
        if key not in _warned and not torch.compiler.is_compiling():
            _warned.add(key)
            warnings.warn(
                f"ddpm_kernels: backend='auto' runs {op} on the pure-PyTorch reference for {dtype} tensors on "
                f"{device.type} (" + "; ".join(reasons) + ")",
                RuntimeWarning,
                stacklevel=4,
            )
    return "reference", reference.OPS[op]


def available_backends(device="cpu", dtype=torch.float32):
    """Names of the backends that can run ``dtype`` tensors on ``device`` here."""
    device = torch.device(device)
    names = ["reference"]
    for name in _FUSED:
        impl = _load(name)
        if impl is not None and impl.unavailable_reason(device, dtype) is None:
            names.append(name)
    return names
