"""Public functional API: validation in one place, then dispatch to a backend.

Every function checks its arguments before any kernel runs and raises ``ValueError`` for bad values, shapes,
devices or names and ``TypeError`` for bad dtypes, naming the argument and what was expected. Metadata checks
are always on. The value check of ``t`` (``0 <= t < T``) is done whenever ``t`` is on the CPU (free); for
device tensors it would cost a host sync per step, so it is off unless ``set_device_t_check(True)`` (or
``DDPM_KERNELS_CHECK_T=1``); kernels never read outside the tables whatever ``t`` holds (NaN results).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from typing import Optional, Tuple

import torch

from . import backends
from .reference import LEARNED_VARIANCE_TYPES, VARIANCE_TYPES
from .schedule import DiffusionSchedule

__all__ = [
    "q_sample",
    "predict_start_from_noise",
    "predict_noise_from_start",
    "get_v",
    "predict_start_from_z_and_v",
    "predict_eps_from_z_and_v",
    "q_posterior",
    "p_mean_variance",
    "p_sample",
    "diffusion_loss",
    "dynamic_threshold",
    "ddim_step",
    "ddpm_step",
    "set_device_t_check",
    "device_t_check",
]

PARAMETERIZATIONS = {"eps": "eps", "x0": "x0", "v": "v", "epsilon": "eps", "sample": "x0", "v_prediction": "v"}
LOSS_TYPES = ("l1", "l2")

# every integer dtype (signed and unsigned); float, complex and bool timesteps are refused
_INDEX_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
)

_device_t_check = os.environ.get("DDPM_KERNELS_CHECK_T", "0") not in ("", "0", "false", "False")


def set_device_t_check(enabled: bool) -> bool:
    """Also check ``0 <= t < T`` for ``t`` on a GPU (one host sync per call). Returns the previous setting."""
    global _device_t_check
    previous, _device_t_check = _device_t_check, bool(enabled)
    return previous


@contextlib.contextmanager
def device_t_check(enabled: bool = True):
    """Context manager form of `set_device_t_check`."""
    previous = set_device_t_check(enabled)
    try:
        yield
    finally:
        set_device_t_check(previous)


# ---------------------------------------------------------------------------------------------- validation
def _check_data(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension (ndim >= 1), got a 0-d tensor")
    return x


def _check_like(name: str, y, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    # ``ref`` is already checked: equal dtype/shape/device is all there is to check (the common case, first)
    if isinstance(y, torch.Tensor) and y.dtype == ref.dtype and y.device == ref.device and y.shape == ref.shape:
        return y
    _check_data(name, y)
    if y.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {y.dtype}")
    if y.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(y.shape)}")
    raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {y.device}")


def _check_schedule(schedule, x: torch.Tensor) -> DiffusionSchedule:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"schedule: expected a ddpm_kernels.DiffusionSchedule, got {type(schedule).__name__}")
    device = schedule._buffers["coefficients"].device  # skips nn.Module.__getattr__ on the hot path
    if device != x.device:
        raise ValueError(
            f"schedule: its tables are on {device} but the data is on {x.device}; "
            f"call schedule.to({str(x.device)!r})"
        )
    return schedule


def _check_timesteps(
    name: str, t, batch: int, device: torch.device, owner: str, shape_note: str, schedule: DiffusionSchedule,
    lo_allowed: int, range_note: str,
) -> torch.Tensor:
    """Metadata of a per-sample timestep tensor, its values where that is free, then int64 with unit stride."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {t.dtype}")
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) ({shape_note}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {owner}), got {t.device}")
    if (t.is_cpu or _device_t_check) and batch and not torch.compiler.is_compiling():
        T = schedule.num_timesteps
        if batch <= 256:  # a Python min/max of a short list beats two reductions plus two .item()s
            values = t.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < lo_allowed or hi >= T:
            raise ValueError(f"{name}: expected values in [{lo_allowed}, {T}) ({range_note}), got min {lo}, max {hi}")
    # kernels read int64 timesteps with unit stride: a strided view (t = steps[:, 0]) is packed here, once, for
    # every backend (both conversions are skipped when not needed: this runs every sampling step)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t if t.is_contiguous() else t.contiguous()


def _fast(x, others, out, schedule, t, t_prev=None) -> bool:
    """Whether a call's tensor arguments are the plain valid case: ``x``, the data tensors ``others`` (every one
    required: a None among them is a missing argument) and ``out`` of one dtype/shape/device, ``t`` (and
    ``t_prev``) int64 of shape (B,) with unit stride and, where the checks below read them, values in range.
    Established in one C call
    (``ddpm_kernels._C.inputs_ok``, csrc/fast_checks.cpp) once the compiled library is loaded, instead of a
    dozen tensor attribute reads in Python; False sends the caller through the full checks, which raise the
    detailed error or convert the arguments, so every message and conversion stays here."""
    if torch.compiler.is_compiling() or not isinstance(schedule, DiffusionSchedule):
        return False
    extension = sys.modules.get("ddpm_kernels.extension")
    inputs_ok = None if extension is None else extension.inputs_ok
    return inputs_ok is not None and inputs_ok(
        x, others, out, schedule._buffers["coefficients"], schedule.num_timesteps, t, t_prev, _device_t_check
    )


_NO_T_PREV = object()  # p_sample's step has no t_prev argument (None is a bad t_prev of ddim_step/ddpm_step)


def _check_step_tensors(x_t, model_output, noise, out, schedule, t, t_prev=_NO_T_PREV, learned=False):
    """The tensor arguments of a sampling step, ``(t, t_prev, out)`` as the kernels take them. A ``learned``
    variance doubles ``model_output``'s channels: the caller checks it then."""
    has_t_prev = t_prev is not _NO_T_PREV
    others = () if learned else (model_output,)
    if noise is not None:
        others += (noise,)
    if (has_t_prev and t_prev is None) or not _fast(x_t, others, out, schedule, t, t_prev if has_t_prev else None):
        _check_data("x_t", x_t)
        if not learned:
            _check_like("model_output", model_output, "x_t", x_t)
        if noise is not None:
            _check_like("noise", noise, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
        if has_t_prev:
            t_prev = _check_t_prev(t_prev, t, schedule)
        out = _check_out(out, x_t, "x_t")
    return t, t_prev, out


def _check_t(t, x: torch.Tensor, x_name: str, schedule: DiffusionSchedule) -> torch.Tensor:
    return _check_timesteps(
        "t", t, x.shape[0], x.device, x_name, f"one timestep per sample of {x_name}", schedule, 0,
        "the schedule's timesteps",
    )


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    return value


def _check_parameterization(value) -> str:
    return PARAMETERIZATIONS[_check_choice("parameterization", value, PARAMETERIZATIONS)]


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _check_out(out, x: torch.Tensor, x_name: str) -> Optional[torch.Tensor]:
    if out is None:
        return None
    _check_like("out", out, x_name, x)
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out: expected a tensor that does not require grad (out= does not support autograd)")
    return out


def _check_generator(generator, x: torch.Tensor):
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator: expected a generator for {x.device.type}, got one for {generator.device}")
    return generator


def _check_backend(backend) -> str:
    return _check_choice("backend", backend, backends.BACKEND_NAMES)


def _dispatch(op: str, backend: str, x: torch.Tensor):
    return backends.resolve(op, backend, x.device, x.dtype)[1]


def _dispatch_sampling(op: str, backend: str, x_t: torch.Tensor, *inputs: Optional[torch.Tensor]):
    """Dispatch for the sampling steps (p_mean_variance, p_sample, ddim_step, ddpm_step).

    They are not on the seed's training path (its p_sample runs under no_grad): fused backends run them on
    detached inputs, so an input that happens to require grad never changes which kernel serves the call, nor
    the noise stream it draws. The reference keeps full autograd for anyone differentiating through a step.
    """
    name, fn = backends.resolve(op, backend, x_t.device, x_t.dtype)
    if name == "reference" or not torch.is_grad_enabled():
        return fn
    if not x_t.requires_grad:
        for a in inputs:
            if a is not None and a.requires_grad:
                break
        else:
            return fn

    def call(*args, **kwargs):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) and k != "out" else v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return call


# --------------------------------------------------------------------------------------------------- ops
def q_sample(x_start, t, noise, schedule, backend="auto", *, out=None):
    """Diffuse ``x_start`` to step ``t``: ``sqrt(ab_t) x_start + sqrt(1 - ab_t) noise``.

    ``noise=None`` draws ``torch.randn_like(x_start)`` as the seed does. ``out`` may be ``x_start`` itself.
    Differentiable w.r.t. ``x_start`` and ``noise``.
    """
    _check_backend(backend)
    if noise is None:
        noise = torch.randn_like(_check_data("x_start", x_start))
    if not _fast(x_start, (noise,), out, schedule, t):
        _check_data("x_start", x_start)
        _check_like("noise", noise, "x_start", x_start)
        _check_schedule(schedule, x_start)
        t = _check_t(t, x_start, "x_start", schedule)
        out = _check_out(out, x_start, "x_start")
    return _dispatch("q_sample", backend, x_start)(x_start, t, noise, schedule, out=out)


def predict_start_from_noise(x_t, t, noise, schedule, backend="auto"):
    """``x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) noise``."""
    _check_backend(backend)
    if not _fast(x_t, (noise,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("noise", noise, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    return _dispatch("predict_start_from_noise", backend, x_t)(x_t, t, noise, schedule)


def predict_noise_from_start(x_t, t, x0, schedule, backend="auto"):
    """The inverse of `predict_start_from_noise`: ``(sqrt(1/ab_t) x_t - x0) / sqrt(1/ab_t - 1)``."""
    _check_backend(backend)
    if not _fast(x_t, (x0,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("x0", x0, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    return _dispatch("predict_noise_from_start", backend, x_t)(x_t, t, x0, schedule)


def get_v(x_start, noise, t, schedule, backend="auto"):
    """The v-prediction target ``sqrt(ab_t) noise - sqrt(1 - ab_t) x_start`` (the seed's ``get_v``)."""
    _check_backend(backend)
    if not _fast(x_start, (noise,), None, schedule, t):
        _check_data("x_start", x_start)
        _check_like("noise", noise, "x_start", x_start)
        _check_schedule(schedule, x_start)
        t = _check_t(t, x_start, "x_start", schedule)
    return _dispatch("get_v", backend, x_start)(x_start, noise, t, schedule)


def predict_start_from_z_and_v(x_t, t, v, schedule, backend="auto"):
    """``x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v``."""
    _check_backend(backend)
    if not _fast(x_t, (v,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("v", v, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    return _dispatch("predict_start_from_z_and_v", backend, x_t)(x_t, t, v, schedule)


def predict_eps_from_z_and_v(x_t, t, v, schedule, backend="auto"):
    """``eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t``."""
    _check_backend(backend)
    if not _fast(x_t, (v,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("v", v, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    return _dispatch("predict_eps_from_z_and_v", backend, x_t)(x_t, t, v, schedule)


def q_posterior(x_start, x_t, t, schedule, backend="auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``.

    The mean has ``x_t``'s dtype and shape; variance and log-variance are float32 (float64 for float64 data)
    and shaped ``(B, 1, ..., 1)`` as in CompVis.
    """
    _check_backend(backend)
    if not _fast(x_t, (x_start,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("x_start", x_start, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    return _dispatch("q_posterior", backend, x_t)(x_start, x_t, t, schedule)


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True, backend="auto"):
    """Mean and variance of ``p(x_{t-1} | x_t)`` from a model output (eps, x0 or v), x0 clipped to [-1, 1]
    when ``clip_denoised``. Returns ``(mean, var, log_var)`` as `q_posterior`."""
    _check_backend(backend)
    if not _fast(x_t, (model_output,), None, schedule, t):
        _check_data("x_t", x_t)
        _check_like("model_output", model_output, "x_t", x_t)
        _check_schedule(schedule, x_t)
        t = _check_t(t, x_t, "x_t", schedule)
    parameterization = _check_parameterization(parameterization)
    clip_denoised = _check_bool("clip_denoised", clip_denoised)
    fn = _dispatch_sampling("p_mean_variance", backend, x_t, model_output)
    return fn(x_t, t, model_output, schedule, parameterization, clip_denoised)


def p_sample(
    x_t,
    t,
    model_output,
    schedule,
    parameterization="eps",
    clip_denoised=True,
    noise=None,
    generator=None,
    backend="auto",
    *,
    out=None,
):
    """One ancestral sampling step: ``x_{t-1} = mean + [t > 0] exp(0.5 log_var) z``.

    ``noise`` is ``z`` when given; with ``noise=None`` the backend draws it from ``generator`` (or torch's
    default generator), advancing that generator's state. ``out`` may be ``x_t`` (an in-place step).
    """
    _check_backend(backend)
    t, _, out = _check_step_tensors(x_t, model_output, noise, out, schedule, t)
    parameterization = _check_parameterization(parameterization)
    clip_denoised = _check_bool("clip_denoised", clip_denoised)
    generator = _check_generator(generator, x_t)
    fn = _dispatch_sampling("p_sample", backend, x_t, model_output, noise)
    return fn(x_t, t, model_output, schedule, parameterization, clip_denoised, noise, generator, out=out)


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
    backend="auto",
):
    """The seed's ``p_losses`` after the model call: ``(loss, loss_simple, loss_vlb)``, scalars in
    ``model_output``'s dtype, computed in float32 (float64 for float64 data).

    ``loss_simple`` is the mean over the batch of each sample's mean l1/l2 error against the target (noise,
    x_start or v); ``loss_vlb`` weights each sample by ``lvlb_weights[t]``; ``loss = l_simple_weight *
    loss_simple + original_elbo_weight * loss_vlb``. Differentiable w.r.t. ``model_output``.
    """
    _check_backend(backend)
    if not _fast(model_output, (x_start, noise), None, schedule, t):
        _check_data("model_output", model_output)
        _check_like("x_start", x_start, "model_output", model_output)
        _check_like("noise", noise, "model_output", model_output)
        _check_schedule(schedule, model_output)
        t = _check_t(t, model_output, "model_output", schedule)
    parameterization = _check_parameterization(parameterization)
    loss_type = _check_choice("loss_type", loss_type, LOSS_TYPES)
    l_simple_weight = _check_weight("l_simple_weight", l_simple_weight)
    original_elbo_weight = _check_weight("original_elbo_weight", original_elbo_weight)
    fn = _dispatch("diffusion_loss", backend, model_output)
    return fn(
        model_output, x_start, noise, t, schedule, parameterization, loss_type, l_simple_weight, original_elbo_weight
    )



# ------------------------------------------------------------------------------------------ sampler steps
def _check_t_prev(t_prev, t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Like `_check_t` for the step's target timestep, which may also be -1 ("after the last step")."""
    return _check_timesteps(
        "t_prev", t_prev, t.shape[0], t.device, "t", "the shape of t", schedule, -1, "-1: after the last step"
    )


def _check_range(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _check_weight(name, value)
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return value


def _check_thresholding(threshold_ratio, threshold_max):
    if threshold_ratio is not None:
        threshold_ratio = _check_range("threshold_ratio", threshold_ratio, 0.0, 1.0)
    threshold_max = _check_range("threshold_max", threshold_max, 0.0, float("inf"), lo_open=True)
    return threshold_ratio, threshold_max


def _check_learned_output(model_output, x_t: torch.Tensor, variance_type: str) -> torch.Tensor:
    _check_data("model_output", model_output)
    if x_t.ndim < 2:
        raise ValueError(f"x_t: variance_type={variance_type!r} needs a channel dim (ndim >= 2), got shape {tuple(x_t.shape)}")
    expected = (x_t.shape[0], 2 * x_t.shape[1]) + tuple(x_t.shape[2:])
    if model_output.dtype != x_t.dtype:
        raise TypeError(f"model_output: expected dtype {x_t.dtype} (the dtype of x_t), got {model_output.dtype}")
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"model_output: expected shape {expected} (x_t's channels, then as many variance channels, for "
            f"variance_type={variance_type!r}), got {tuple(model_output.shape)}"
        )
    if model_output.device != x_t.device:
        raise ValueError(f"model_output: expected a tensor on {x_t.device} (the device of x_t), got {model_output.device}")
    return model_output


def dynamic_threshold(x0, ratio=0.995, max_value=1.0, backend="auto"):
    """Imagen's dynamic thresholding of a predicted ``x0`` (diffusers' ``_threshold_sample``): per sample,
    ``s`` = the ``ratio`` quantile of ``|x0|`` over all non-batch elements (linear interpolation, as
    ``torch.quantile``), clamped to ``[1, max_value]``; returns ``clamp(x0, -s, s) / s``. Computed in float32
    (float64 for float64 data), returned in ``x0``'s dtype. No host synchronization.
    """
    _check_backend(backend)
    _check_data("x0", x0)
    ratio = _check_range("ratio", ratio, 0.0, 1.0)
    max_value = _check_range("max_value", max_value, 0.0, float("inf"), lo_open=True)
    return _dispatch("dynamic_threshold", backend, x0)(x0, ratio, max_value)


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
    backend="auto",
    *,
    set_alpha_to_one=True,
    use_clipped_model_output=False,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12), per-sample ``t`` and ``t_prev``:

        x0   from model_output (eps, x0 or v), then clipped to [-clip_range, clip_range] when
             ``clip_denoised``, or dynamically thresholded when ``threshold_ratio`` is set (see
             `dynamic_threshold`; it replaces clipping)
        eps  the model's noise prediction (re-derived from the clipped x0 when ``use_clipped_model_output``)
        sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x_{t_prev} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z

    ``t_prev`` is an integer tensor of shape (B,) in ``[-1, T)``; ``-1`` means "after the last step", where
    ``ab_prev`` is 1 when ``set_alpha_to_one`` and ``alphas_cumprod[0]`` otherwise (diffusers'
    ``final_alpha_cumprod``). ``z`` is ``noise`` when given; with ``noise=None`` and ``eta > 0`` the backend
    draws it from ``generator``; with ``eta == 0`` no noise is drawn. ``clip_denoised`` defaults to False as in
    ldm's DDIMSampler (latents are not bounded); diffusers' ``clip_sample`` defaults to True.
    Returns ``x_{t_prev}`` in ``x_t``'s dtype, or ``(x_{t_prev}, x0)`` with ``return_pred_x0=True``.
    ``out`` may be ``x_t`` (an in-place step).
    """
    _check_backend(backend)
    t, t_prev, out = _check_step_tensors(x_t, model_output, noise, out, schedule, t, t_prev)
    eta = _check_range("eta", eta, 0.0, float("inf"))
    parameterization = _check_parameterization(parameterization)
    clip_denoised = _check_bool("clip_denoised", clip_denoised)
    generator = _check_generator(generator, x_t)
    set_alpha_to_one = _check_bool("set_alpha_to_one", set_alpha_to_one)
    use_clipped_model_output = _check_bool("use_clipped_model_output", use_clipped_model_output)
    clip_range = _check_range("clip_range", clip_range, 0.0, float("inf"), lo_open=True)
    threshold_ratio, threshold_max = _check_thresholding(threshold_ratio, threshold_max)
    return_pred_x0 = _check_bool("return_pred_x0", return_pred_x0)
    fn = _dispatch_sampling("ddim_step", backend, x_t, model_output, noise)
    return fn(
        x_t,
        t,
        t_prev,
        model_output,
        schedule,
        eta,
        parameterization,
        clip_denoised,
        noise,
        generator,
        set_alpha_to_one=set_alpha_to_one,
        use_clipped_model_output=use_clipped_model_output,
        clip_range=clip_range,
        threshold_ratio=threshold_ratio,
        threshold_max=threshold_max,
        out=out,
        return_pred_x0=return_pred_x0,
    )


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
    backend="auto",
    *,
    clip_range=1.0,
    threshold_ratio=None,
    threshold_max=1.0,
    out=None,
    return_pred_x0=False,
):
    """One ancestral DDPM step ``x_t -> x_{t_prev}`` on a possibly respaced chain (diffusers'
    ``DDPMScheduler.step``), per-sample ``t`` and ``t_prev`` (``-1``: after the last step, ab_prev = 1):

        ab = alphas_cumprod,  beta = 1 - ab_t / ab_prev,  var = max((1 - ab_prev) / (1 - ab_t) beta, 1e-20)
        x0   from model_output (eps, x0 or v); clipped / thresholded as in `ddim_step`
        mean = sqrt(ab_prev) beta / (1 - ab_t) x0 + sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t) x_t
        x_{t_prev} = mean + [t > 0] std z

    with ``std`` by ``variance_type``: ``fixed_small`` / ``fixed_small_log``: sqrt(var); ``fixed_large`` /
    ``fixed_large_log``: sqrt(beta); ``learned``: exp(v / 2) and ``learned_range``: exp((f log(beta) +
    (1 - f) log(var)) / 2) with f = (v + 1) / 2, where ``v`` is the second half of ``model_output``'s channels
    (dim 1): for learned variances ``model_output`` has shape (B, 2C, ...) for ``x_t`` of shape (B, C, ...),
    as guided-diffusion's and diffusers' models output it. With ``t_prev = t - 1`` and ``fixed_small`` this is
    `p_sample` (v_posterior = 0). ``z`` is ``noise`` when given, else drawn from ``generator``.
    Returns ``x_{t_prev}`` in ``x_t``'s dtype, or ``(x_{t_prev}, x0)`` with ``return_pred_x0=True``.
    """
    _check_backend(backend)
    variance_type = _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    learned = variance_type in LEARNED_VARIANCE_TYPES
    t, t_prev, out = _check_step_tensors(x_t, model_output, noise, out, schedule, t, t_prev, learned)
    if learned:
        _check_learned_output(model_output, x_t, variance_type)
    parameterization = _check_parameterization(parameterization)
    clip_denoised = _check_bool("clip_denoised", clip_denoised)
    generator = _check_generator(generator, x_t)
    clip_range = _check_range("clip_range", clip_range, 0.0, float("inf"), lo_open=True)
    threshold_ratio, threshold_max = _check_thresholding(threshold_ratio, threshold_max)
    return_pred_x0 = _check_bool("return_pred_x0", return_pred_x0)
    fn = _dispatch_sampling("ddpm_step", backend, x_t, model_output, noise)
    return fn(
        x_t,
        t,
        t_prev,
        model_output,
        schedule,
        parameterization,
        variance_type,
        clip_denoised,
        noise,
        generator,
        clip_range=clip_range,
        threshold_ratio=threshold_ratio,
        threshold_max=threshold_max,
        out=out,
        return_pred_x0=return_pred_x0,
    )
