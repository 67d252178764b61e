"""Loading the compiled libraries, and the compiled fast argument check.

Libraries (built by setup.py from ``csrc/``):

* ``ddpm_kernels._C``: every operator's schema (``TORCH_LIBRARY(ddpm_kernels, m)``), the fast argument check
  ``inputs_ok`` and, in a CUDA build, the CUDA kernels;
* ``ddpm_kernels._C_cpu`` / ``_C_cpu_avx2`` / ``_C_cpu_avx512``: the same CPU kernels built for three
  instruction sets. Exactly one is loaded: the widest that ``torch.backends.cpu.get_cpu_capability()``
  allows (so ``ATEN_CPU_CAPABILITY=avx2`` or ``=default`` selects a narrower one, as it does for PyTorch's
  own kernels).

Loading never raises: when ``_C`` is missing or was built for another torch, ``inputs_ok`` is None and the
compiled backends report themselves unavailable, so ``backend="auto"`` runs the reference; the warning that
says how to rebuild comes once, when a compiled backend is first asked for (``ddpm_kernels.extension``). ``ddpm_kernels.ops`` imports this module for ``inputs_ok``;
``ddpm_kernels.extension`` (the compiled backends) for the libraries.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["ExtensionUnavailableWarning", "REBUILD_HINT", "cpu_capability", "inputs_ok", "load_error"]

REBUILD_HINT = (
    "rebuild it against the installed torch with `pip install --no-build-isolation -e .` (or "
    "`pip install --no-build-isolation .`) from the ddpm_kernels source tree; see README, 'Building the extension'"
)


class ExtensionUnavailableWarning(RuntimeWarning):
    """The compiled ddpm_kernels libraries could not be used; the pure-PyTorch reference runs instead."""


def _torch_release() -> str:
    return torch.__version__.split("+")[0]


# Widest first: the CPU libraries worth trying for each capability torch reports.
_CPU_LIBRARIES = {
    "AVX512": ("_C_cpu_avx512", "_C_cpu_avx2", "_C_cpu"),
    "AVX2": ("_C_cpu_avx2", "_C_cpu"),
}


def _import_checked(name: str):
    module = importlib.import_module(f"{__package__}.{name}")
    built = getattr(module, "TORCH_VERSION", None)
    if built != _torch_release():
        raise ImportError(
            f"ddpm_kernels.{name} was built for torch {built}, but torch {torch.__version__} is installed"
        )
    return module


def _load():
    """(schema library, CPU library, CPU library name, error); error is None when both loaded."""
    try:
        schema = _import_checked("_C")
    except Exception as exc:  # ImportError, OSError (undefined symbols of another torch), ...
        return None, None, None, f"{type(exc).__name__}: {exc}"
    capability = torch.backends.cpu.get_cpu_capability()
    tried = []
    for name in _CPU_LIBRARIES.get(capability, ("_C_cpu",)):
        try:
            return schema, _import_checked(name), name, None
        except ModuleNotFoundError as exc:
            tried.append(f"{name} (not built: {exc.name})")
        except Exception as exc:
            tried.append(f"{name} ({type(exc).__name__}: {exc})")
    return schema, None, None, "no CPU kernel library could be loaded: " + "; ".join(tried)


schema_lib, cpu_lib, cpu_capability, load_error = _load()
"""`cpu_capability`: the CPU library in use (e.g. "_C_cpu_avx512"); `load_error`: why something is missing."""

inputs_ok = getattr(schema_lib, "inputs_ok", None)
"""``ddpm_kernels._C.inputs_ok`` (csrc/fast_checks.cpp), the argument check ``ddpm_kernels.ops`` uses for the
common case, or None without the compiled library."""

same_kind = getattr(schema_lib, "same_kind", None)
"""``ddpm_kernels._C.same_kind(ref, *tensors)`` (csrc/fast_checks.cpp): whether the tensors are plain tensors of
``ref``'s dtype, sizes and device of which no gradient is asked; None without the compiled library."""

bind_op = getattr(schema_lib, "bind_op", None)
call_bound = getattr(schema_lib, "call_bound", None)
"""``ddpm_kernels._C.bind_op`` / ``call_bound`` (csrc/fast_calls.cpp): an operator with its constant arguments
converted once, called with the rest (``ddpm_kernels.extension.bound_op``); None without the compiled library."""


def traced() -> bool:
    """Whether a call here is seen above the dispatcher: traced by torch.compile, or under a TorchFunctionMode
    (both see ``torch.ops`` calls, not a bound C call; dispatch modes, below, see both). A bound call is for the
    other, eager calls."""
    return torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()

has_cuda_kernels = bool(
    schema_lib is not None
    and getattr(schema_lib, "WITH_CUDA", 0)
    and torch._C._dispatch_has_kernel_for_dispatch_key("ddpm_kernels::p_sample", "CUDA")
)
