"""The compiled backends, ``"cpu"`` and ``"cuda"``: C++/CUDA kernels behind one ``ddpm_kernels::`` schema.

Libraries (built by setup.py from ``csrc/``):

* ``ddpm_kernels._C``: every operator's schema (``TORCH_LIBRARY(ddpm_kernels, m)``) and, in a CUDA build,
  the CUDA kernels;
* ``ddpm_kernels._C_cpu`` / ``_C_cpu_avx2`` / ``_C_cpu_avx512``: the same CPU kernels built for three
  instruction sets. Exactly one is loaded: the widest that ``torch.backends.cpu.get_cpu_capability()``
  allows (so ``ATEN_CPU_CAPABILITY=avx2`` or ``=default`` selects a narrower one, as it does for PyTorch's
  own kernels).

Loading never raises: when ``_C`` is missing or was built for another torch, this module warns once
(saying how to rebuild) and both backends report themselves unavailable, so ``backend="auto"`` runs the
reference. Fake (meta) kernels and autograd formulas are registered here, once, for the schema.

Each backend's ``ops`` maps an op name to a function with the reference signature (``ddpm_kernels.reference``).
Inputs that need a gradient the kernels do not provide (anything but ``q_sample`` w.r.t. ``x_start``/``noise``
and ``diffusion_loss`` w.r.t. ``model_output``) are served by the reference, so autograd is always right.
"""

from __future__ import annotations

import importlib
import types
import warnings
from typing import Optional

import torch

from . import reference
from ._layout import CONTIGUOUS, dense_format, in_format, is_in_format

__all__ = [
    "CPU_BACKEND",
    "CUDA_BACKEND",
    "ExtensionUnavailableWarning",
    "cpu_capability",
    "load_error",
    "REBUILD_HINT",
]

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


_schema_lib, _cpu_lib, cpu_capability, load_error = _load()
"""`cpu_capability`: the CPU library in use (e.g. "_C_cpu_avx512"); `load_error`: why something is missing."""

if load_error is not None:
    warnings.warn(
        f"ddpm_kernels: the compiled kernels are not available ({load_error}); backend='cpu'/'cuda' cannot run "
        f"and backend='auto' uses the pure-PyTorch reference. To get them, {REBUILD_HINT}.",
        ExtensionUnavailableWarning,
        stacklevel=2,
    )

_HAS_SCHEMA = _schema_lib is not None
inputs_ok = getattr(_schema_lib, "inputs_ok", None)
"""``ddpm_kernels._C.inputs_ok`` (csrc/fast_checks.cpp), the argument check ``ddpm_kernels.ops`` uses for the common
case, or None without the compiled library."""
_HAS_CUDA_KERNELS = bool(
    _HAS_SCHEMA
    and getattr(_schema_lib, "WITH_CUDA", 0)
    and torch._C._dispatch_has_kernel_for_dispatch_key("ddpm_kernels::p_sample", "CUDA")
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ helpers
_OP_NAMES = (
    "q_sample", "q_sample_out", "q_sample_backward", "predict_start_from_noise", "predict_noise_from_start",
    "get_v", "predict_start_from_z_and_v", "predict_eps_from_z_and_v", "q_posterior", "p_mean_variance",
    "p_sample", "p_sample_out", "diffusion_loss", "diffusion_loss_backward", "ddim_step", "ddim_step_out",
    "ddpm_step", "ddpm_step_out",
)
# Each operator's OpOverload (``torch.ops.ddpm_kernels.<name>.default``), looked up once: calling an overload
# skips the packet's overload resolution, which is a measurable part of a small sampling step.
_OVERLOADS = (
    types.SimpleNamespace(**{name: getattr(torch.ops.ddpm_kernels, name).default for name in _OP_NAMES})
    if _HAS_SCHEMA
    else None
)


def _ops():
    return _OVERLOADS


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _fits(out: Optional[torch.Tensor], fmt: torch.memory_format) -> bool:
    """Whether a kernel can write into ``out`` directly (else it writes a new tensor that is copied in)."""
    return out is not None and is_in_format(out, fmt)


def _store(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _per_sample(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=dtype)


# ---------------------------------------------------------------------------------------------------- ops
def q_sample(x_start, t, noise, schedule, out=None):
    fmt = dense_format(x_start)
    args = (in_format(x_start, fmt), t, in_format(noise, fmt), schedule.table(x_start.dtype))
    if not _fits(out, fmt) or _needs_grad(x_start, noise):
        return _store(_ops().q_sample(*args), out)
    _ops().q_sample_out(*args, out)
    return out


def _pair(name, ref):
    def op(x, t, y, schedule):
        if _needs_grad(x, y):
            return ref(x, t, y, schedule)
        fmt = dense_format(x)
        return getattr(_ops(), name)(in_format(x, fmt), t, in_format(y, fmt), schedule.table(x.dtype))

    op.__name__ = name
    return op


predict_start_from_noise = _pair("predict_start_from_noise", reference.predict_start_from_noise_ref)
predict_noise_from_start = _pair("predict_noise_from_start", reference.predict_noise_from_start_ref)
predict_start_from_z_and_v = _pair("predict_start_from_z_and_v", reference.predict_start_from_z_and_v_ref)
predict_eps_from_z_and_v = _pair("predict_eps_from_z_and_v", reference.predict_eps_from_z_and_v_ref)


def get_v(x_start, noise, t, schedule):
    if _needs_grad(x_start, noise):
        return reference.get_v_ref(x_start, noise, t, schedule)
    fmt = dense_format(x_start)
    return _ops().get_v(in_format(x_start, fmt), in_format(noise, fmt), t, schedule.table(x_start.dtype))


def q_posterior(x_start, x_t, t, schedule):
    if _needs_grad(x_start, x_t):
        return reference.q_posterior_ref(x_start, x_t, t, schedule)
    fmt = dense_format(x_t)
    return _ops().q_posterior(in_format(x_start, fmt), in_format(x_t, fmt), t, schedule.table(x_t.dtype))


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    # Sampling steps reach the kernels on detached inputs (ops._dispatch_sampling), so no autograd fallback here.
    fmt = dense_format(x_t)
    return _ops().p_mean_variance(
        in_format(x_t, fmt), t, in_format(model_output, fmt), schedule.table(x_t.dtype), parameterization,
        clip_denoised,
    )


def p_sample(
    x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True, noise=None, generator=None, out=None
):
    fmt = dense_format(x_t)
    args = (
        in_format(x_t, fmt),
        t,
        in_format(model_output, fmt),
        schedule.table(x_t.dtype),
        parameterization,
        clip_denoised,
        in_format(noise, fmt),
        generator,
    )
    if not _fits(out, fmt):
        return _store(_ops().p_sample(*args), out)
    _ops().p_sample_out(*args, out)
    return out


def diffusion_loss(
    model_output,
    x_start,
    noise,
    t,
    schedule,
    parameterization="eps",
    loss_type="l2",
    l_simple_weight=1.0,
    original_elbo_weight=0.0,
):
    if _needs_grad(x_start, noise):
        return reference.diffusion_loss_ref(
            model_output, x_start, noise, t, schedule, parameterization, loss_type, l_simple_weight,
            original_elbo_weight,
        )
    fmt = dense_format(model_output)
    return _ops().diffusion_loss(
        in_format(model_output, fmt),
        in_format(x_start, fmt),
        in_format(noise, fmt),
        t,
        schedule.table(model_output.dtype),
        parameterization,
        loss_type,
        float(l_simple_weight),
        float(original_elbo_weight),
    )


# ---------------------------------------------------------------------------------------------- sampler steps
# ddim_step / ddpm_step: one fused pass with the per-sample coefficients derived in float64 inside the kernels
# from the float64 table (csrc/sampler_coefficients.h). Dynamic thresholding (threshold_ratio) needs a
# per-sample quantile over the whole sample, which one elementwise pass cannot see: those calls, like calls
# that need a gradient, run the reference (ddpm_kernels.reference) on the same device.
def _step_call(op, out, fmt, args, return_pred_x0):
    if _fits(out, fmt):
        x0 = getattr(_ops(), op + "_out")(*args, out)
        result = out
    else:
        result, x0 = getattr(_ops(), op)(*args)
        result = _store(result, out)
    return (result, x0) if return_pred_x0 else result


def ddim_step(
    x_t,
    t,
    t_prev,
    model_output,
    schedule,
    eta=0.0,
    parameterization="eps",
    clip_denoised=False,
    noise=None,
    generator=None,
    set_alpha_to_one=True,
    use_clipped_model_output=False,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    if threshold_ratio is not None:  # a per-sample quantile: not one elementwise pass
        return reference.ddim_step_ref(
            x_t, t, t_prev, model_output, schedule, eta, parameterization, clip_denoised, noise, generator,
            set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped_model_output,
            clip_range=clip_range, threshold_ratio=threshold_ratio, threshold_max=threshold_max, out=out,
            return_pred_x0=return_pred_x0,
        )
    eta = float(eta)
    fmt = dense_format(x_t)
    args = (
        in_format(x_t, fmt),
        t,
        t_prev,
        in_format(model_output, fmt),
        schedule.table(torch.float64),
        eta,
        parameterization,
        bool(clip_denoised),
        float(clip_range),
        bool(set_alpha_to_one),
        bool(use_clipped_model_output),
        in_format(noise, fmt) if eta > 0 else None,  # eta == 0: no noise term, nothing read or drawn
        generator,
        bool(return_pred_x0),
    )
    return _step_call("ddim_step", out, fmt, args, return_pred_x0)


def ddpm_step(
    x_t,
    t,
    t_prev,
    model_output,
    schedule,
    parameterization="eps",
    variance_type="fixed_small",
    clip_denoised=True,
    noise=None,
    generator=None,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    if threshold_ratio is not None:  # a per-sample quantile: not one elementwise pass
        return reference.ddpm_step_ref(
            x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip_denoised, noise,
            generator, clip_range=clip_range, threshold_ratio=threshold_ratio, threshold_max=threshold_max,
            out=out, return_pred_x0=return_pred_x0,
        )
    # learned variances read model_output's two channel halves by index: contiguous data only
    fmt = CONTIGUOUS if variance_type in reference.LEARNED_VARIANCE_TYPES else dense_format(x_t)
    args = (
        in_format(x_t, fmt),
        t,
        t_prev,
        in_format(model_output, fmt),
        schedule.table(torch.float64),
        parameterization,
        variance_type,
        bool(clip_denoised),
        float(clip_range),
        in_format(noise, fmt),
        generator,
        bool(return_pred_x0),
    )
    return _step_call("ddpm_step", out, fmt, args, return_pred_x0)


OPS = {
    "q_sample": q_sample,
    "predict_start_from_noise": predict_start_from_noise,
    "predict_noise_from_start": predict_noise_from_start,
    "get_v": get_v,
    "predict_start_from_z_and_v": predict_start_from_z_and_v,
    "predict_eps_from_z_and_v": predict_eps_from_z_and_v,
    "q_posterior": q_posterior,
    "p_mean_variance": p_mean_variance,
    "p_sample": p_sample,
    "diffusion_loss": diffusion_loss,
    "ddim_step": ddim_step,
    "ddpm_step": ddpm_step,
    # Not fused: a per-sample quantile (a sort) is no elementwise kernel; the compiled backends serve it with
    # the reference so that every sampler op is available on them.
    "dynamic_threshold": reference.dynamic_threshold_ref,
}


# ----------------------------------------------------------------------------------- fake and autograd
def _register_python_parts() -> None:
    lib = "ddpm_kernels::"
    fake = torch.library.register_fake

    def like(x, *rest):  # as the kernels allocate: a dense input's strides are preserved
        return torch.empty_like(x)

    for name in (
        "q_sample",
        "predict_start_from_noise",
        "predict_noise_from_start",
        "get_v",
        "predict_start_from_z_and_v",
        "predict_eps_from_z_and_v",
    ):
        fake(lib + name)(like)

    @fake(lib + "q_sample_out")
    def _(x_start, t, noise, table, out):
        return None

    @fake(lib + "q_sample_backward")
    def _(grad, t, table):
        return like(grad), like(grad)

    @fake(lib + "q_posterior")
    def _(x_start, x_t, t, table):
        return like(x_t), _per_sample(x_t, table.dtype), _per_sample(x_t, table.dtype)

    @fake(lib + "p_mean_variance")
    def _(x_t, t, model_output, table, parameterization, clip_denoised):
        return like(x_t), _per_sample(x_t, table.dtype), _per_sample(x_t, table.dtype)

    @fake(lib + "p_sample")
    def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, generator):
        return like(x_t)

    @fake(lib + "p_sample_out")
    def _(x_t, t, model_output, table, parameterization, clip_denoised, noise, generator, out):
        return None

    @fake(lib + "diffusion_loss")
    def _(model_output, x_start, noise, t, table, parameterization, loss_type, l_simple_weight, original_elbo_weight):
        return tuple(model_output.new_empty(()) for _ in range(3))

    @fake(lib + "diffusion_loss_backward")
    def _(g_loss, g_simple, g_vlb, model_output, *rest):
        return like(model_output)

    def step_outputs(x_t, return_pred_x0):
        return like(x_t), (like(x_t) if return_pred_x0 else x_t.new_empty(0))

    @fake(lib + "ddim_step")
    def _(x_t, t, t_prev, model_output, table64, eta, parameterization, clip_denoised, clip_range,
          set_alpha_to_one, use_clipped_model_output, noise, generator, return_pred_x0):
        return step_outputs(x_t, return_pred_x0)

    @fake(lib + "ddim_step_out")
    def _(x_t, t, t_prev, model_output, table64, eta, parameterization, clip_denoised, clip_range,
          set_alpha_to_one, use_clipped_model_output, noise, generator, return_pred_x0, out):
        return step_outputs(x_t, return_pred_x0)[1]

    @fake(lib + "ddpm_step")
    def _(x_t, t, t_prev, model_output, table64, parameterization, variance_type, clip_denoised, clip_range,
          noise, generator, return_pred_x0):
        return step_outputs(x_t, return_pred_x0)

    @fake(lib + "ddpm_step_out")
    def _(x_t, t, t_prev, model_output, table64, parameterization, variance_type, clip_denoised, clip_range,
          noise, generator, return_pred_x0, out):
        return step_outputs(x_t, return_pred_x0)[1]

    # q_sample: d/dx_start = sqrt(ab) g, d/dnoise = sqrt(1 - ab) g, both from one kernel. Its backward is
    # linear in g, and its own backward is q_sample again, so double backward works too.
    def q_sample_setup(ctx, inputs, output):
        _, t, _, table = inputs
        ctx.save_for_backward(t, table)

    def q_sample_backward(ctx, grad):
        t, table = ctx.saved_tensors
        grad_x, grad_noise = _ops().q_sample_backward(in_format(grad, dense_format(grad)), t, table)
        return grad_x, None, grad_noise, None

    torch.library.register_autograd(lib + "q_sample", q_sample_backward, setup_context=q_sample_setup)

    def q_sample_backward_setup(ctx, inputs, output):
        _, t, table = inputs
        ctx.save_for_backward(t, table)

    def q_sample_double_backward(ctx, grad_grad_x, grad_grad_noise):
        t, table = ctx.saved_tensors
        gx = torch.zeros_like(grad_grad_noise) if grad_grad_x is None else grad_grad_x
        gn = torch.zeros_like(gx) if grad_grad_noise is None else grad_grad_noise
        fmt = dense_format(gx)
        return _ops().q_sample(in_format(gx, fmt), t, in_format(gn, fmt), table), None, None

    torch.library.register_autograd(
        lib + "q_sample_backward", q_sample_double_backward, setup_context=q_sample_backward_setup
    )

    # diffusion_loss: gradient w.r.t. model_output in one pass (x_start and noise are data).
    def loss_setup(ctx, inputs, output):
        model_output, x_start, noise, t, table, parameterization, loss_type, w_simple, w_elbo = inputs
        ctx.save_for_backward(model_output, x_start, noise, t, table)
        ctx.config = (parameterization, loss_type, w_simple, w_elbo)

    def loss_backward(ctx, g_loss, g_simple, g_vlb):
        model_output, x_start, noise, t, table = ctx.saved_tensors
        grads = [
            model_output.new_zeros(()) if g is None else g.to(model_output.dtype).reshape(()).contiguous()
            for g in (g_loss, g_simple, g_vlb)
        ]
        grad = _ops().diffusion_loss_backward(*grads, model_output, x_start, noise, t, table, *ctx.config)
        return (grad,) + (None,) * 8

    torch.library.register_autograd(lib + "diffusion_loss", loss_backward, setup_context=loss_setup)


if _HAS_SCHEMA:
    _register_python_parts()


# ------------------------------------------------------------------------------------------------ backends
class _CompiledBackend:
    """A backend per the protocol of ``ddpm_kernels.backends``."""

    ops = OPS

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name} backend runs {self.device_type} tensors only"
        if dtype not in _FLOAT_DTYPES:
            return f"the {self.name} kernels support float16, bfloat16, float32 and float64, not {dtype}"
        if not _HAS_SCHEMA:
            return f"the compiled kernels are not available ({load_error}); {REBUILD_HINT}"
        if self.device_type == "cpu" and _cpu_lib is None:
            return f"{load_error}; {REBUILD_HINT}"
        if self.device_type == "cuda" and not _HAS_CUDA_KERNELS:
            return (
                "ddpm_kernels._C was built without CUDA kernels; rebuild with a CUDA build of torch and nvcc "
                "(DDPM_KERNELS_CUDA=1 forces it): " + REBUILD_HINT
            )
        return None

    def __repr__(self) -> str:
        return f"<ddpm_kernels {self.name} backend>"


CPU_BACKEND = _CompiledBackend("cpu", "cpu")
CUDA_BACKEND = _CompiledBackend("cuda", "cuda")
