"""Backend registry and selection: the one place that decides which implementation serves a call.

A backend is an object with

* ``name``: one of ``BACKEND_NAMES``;
* ``unavailable_reason(device, dtype) -> Optional[str]``: ``None`` when it can run tensors of that device and
  dtype, else a sentence saying why not and how to get it;
* ``ops``: a dict from op name (the keys of ``ddpm_kernels._spec.OPS``) to a function with the signature of
  the reference function of that name (``ddpm_kernels.reference.OPS``); the sampler steps take
  ``(x_t, t, t_prev, model_output, schedule, opts, noise, generator, out)`` with ``opts`` a
  ``ddpm_kernels._spec.StepOptions``. Functions receive validated arguments (``t`` is int64 of shape (B,),
  every tensor on one device, one float dtype unless the op is in ``mixed_dtypes``) and must honour ``out=``
  where the reference does;
* ``differentiable``: op name -> the tensor arguments its kernels give gradients for;
* ``declines(op, opts) -> Optional[str]``: ``None`` when it serves the op with these step options (``opts`` is
  None for ops without them), else why not;
* ``mixed_dtypes`` (optional, default none): the ops whose kernels read float operands of different dtypes each
  in its own dtype (a bf16 model output with fp32 data), computing in the promoted dtype's compute dtype and
  returning the promoted dtype; for the other ops the prologue casts the operands to the promoted dtype first
  (`reads_mixed`; docs/design.md, "Mixed precision").

A fused backend never calls the reference itself: `select` alone falls back to it (with one warning naming
why) when no fused backend can serve a call: none available for the device and dtype, none implementing the
op, the options declined (dynamic thresholding on the compiled backends), or a gradient the kernels do not
give. Sampling ops (the op table's ops without differentiable inputs) run on detached inputs on the fused
backends, so an input that happens to require grad never changes which kernel serves the call, nor the noise
it draws; the reference keeps full autograd for anyone differentiating through a step.

Fused backends live in their own modules and are imported lazily on first use, so a broken or missing
compiled extension never breaks ``import ddpm_kernels``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._spec import OPS as _SPECS
from ._checks import BACKEND_NAMES

__all__ = [
    "BACKEND_NAMES", "BackendUnavailableError", "get_backend", "resolve", "select", "reads_mixed", "available_backends",
]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to get it."""


class _ReferenceBackend:
    name = "reference"
    ops = reference.OPS
    differentiable = {}  # unused: the reference is plain autograd-tracked PyTorch
    mixed_dtypes = frozenset()  # its operands are cast to the promoted dtype (autograd-tracked)

    @staticmethod
    def declines(op: str, opts) -> Optional[str]:
        return None

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None


def _triton_module():
    from . import triton

    return triton


def _extension_module():
    from . import extension

    return extension


# name -> (module importer, attribute, how to get it). The module is imported on first use, by an import
# statement (which torch.compile(fullgraph=True) traces when the first use of a backend is traced; it cannot
# trace importlib).
_FUSED = {
    "triton": (
        _triton_module, "BACKEND",
        "the Triton backend needs `triton` (Linux) and CUDA tensors: pip install triton",
    ),
    "cuda": (
        _extension_module, "CUDA_BACKEND",
        "the CUDA extension is built by `pip install --no-build-isolation .` with a CUDA build of torch and nvcc",
    ),
    "cpu": (
        _extension_module, "CPU_BACKEND",
        "the C++ CPU extension is built by `pip install --no-build-isolation .`",
    ),
}

# Fused backends tried by backend="auto", in order, per device type. On CUDA, Triton comes first until a GPU run
# has verified the C++ CUDA kernels: CI executes the Triton kernels' code through the interpreter, while the
# CUDA kernels are only compiled there (README, "Backends"; docs/design.md, "Dispatch").
AUTO_ORDER = {
    "cuda": ("triton", "cuda"),
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
    importer, attr, how = _FUSED[name]
    # No lock: Python's import lock serializes the import, and a racing thread at worst stores the same object.
    # (A `with lock:` here would also stop torch.compile(fullgraph=True) when the first use is traced.)
    try:
        backend = getattr(importer(), attr)
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


_selected: Dict[tuple, Tuple[str, Callable]] = {}


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, opts=None, grad=None):
    """``(backend name, function)`` serving one call of ``op``: ``opts`` is the call's `StepOptions` (None for
    other ops) and ``grad`` the frozenset of its tensor arguments that require grad (None when none do or grad
    mode is off). Cached per distinct (op, backend, device, dtype, opts, grad): a sampling loop pays one dict
    lookup."""
    key = (op, backend, device, dtype, opts, grad)
    hit = _selected.get(key)
    if hit is None:
        hit = _selected[key] = _select(op, backend, device, dtype, opts, grad)
    return hit


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, opts=None, grad=None) -> Callable:
    """The function of `resolve`."""
    return resolve(op, backend, device, dtype, opts, grad)[1]


def _serves(impl, op: str, opts, grad) -> Optional[str]:
    """None when the available backend ``impl`` serves this call, else why not."""
    reason = impl.declines(op, opts)
    if reason is not None:
        return reason
    if op not in impl.ops:
        return f"no fused {op}"
    if grad is not None and _SPECS[op].differentiable:
        missing = sorted(grad - impl.differentiable.get(op, frozenset()))
        if missing:
            return f"its {op} kernels give no gradient w.r.t. {', '.join(missing)}"
    return None


def _select(op: str, backend: str, device: torch.device, dtype: torch.dtype, opts, grad) -> Callable:
    if backend == "reference":
        return "reference", reference.OPS[op]
    if backend != "auto":
        impl = get_backend(backend, device, dtype)
        if op not in impl.ops and impl.declines(op, opts) is None:
            raise BackendUnavailableError(
                f"backend={backend!r} does not implement {op}; use backend='auto' or 'reference'"
            )
        reason = _serves(impl, op, opts, grad)
        if reason is None:
            return backend, _fused(impl.ops[op], op, grad)
        _warn_once((op, backend, reason), f"backend={backend!r} runs {op} on the pure-PyTorch reference ({reason})")
        return "reference", reference.OPS[op]
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        impl = _load(name)
        if impl is None:
            reasons.append(f"{name}: {_load_errors[name]}")
            continue
        reason = impl.unavailable_reason(device, dtype) or _serves(impl, op, opts, grad)
        if reason is None:
            return name, _fused(impl.ops[op], op, grad)
        reasons.append(f"{name}: {reason}")
    if reasons:
        _warn_once(
            (device.type, dtype, op, opts, grad),
            f"backend='auto' runs {op} on the pure-PyTorch reference for {dtype} tensors on {device.type} ("
            + "; ".join(reasons) + ")",
        )
    return "reference", reference.OPS[op]


def _warn_once(key, message: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn("ddpm_kernels: " + message, RuntimeWarning, stacklevel=5)


def _fused(fn: Callable, op: str, grad) -> Callable:
    return _detached(fn) if grad is not None and _SPECS[op].sampling else fn


def _detached(fn: Callable) -> Callable:
    """``fn`` on detached tensor arguments (``out`` excepted: it is written, and must not require grad)."""

    def call(*args, **kwargs):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) and k != "out" else v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return call


def reads_mixed(name: str, op: str) -> bool:
    """Whether backend ``name`` (one `resolve` returned, hence loaded) reads ``op``'s float operands of
    different dtypes natively: no cast pass before its kernels."""
    return op in getattr(_loaded.get(name), "mixed_dtypes", ())


def available_backends(device="cpu", dtype=torch.float32):
    """Names of the backends that can run ``dtype`` tensors on ``device`` here."""
    device = torch.device(device)
    names = ["reference"]
    for name in _FUSED:
        impl = _load(name)
        if impl is not None and impl.unavailable_reason(device, dtype) is None:
            names.append(name)
    return names
