"""Argument checks of the public ops: each raises ``ValueError`` for bad values, shapes, devices or names and
``TypeError`` for bad dtypes, naming the argument and what was expected (docs/design.md, "Validation").

Tensor checks run in ``ddpm_kernels.ops``' one prologue, in the order the op table declares the tensors; the
scalar validators are named by the op table (``ddpm_kernels._spec``). The value check of ``t`` (``0 <= t < T``)
is done whenever ``t`` is on the CPU (free); for device tensors it would cost a host sync per step, so it is off
unless ``set_device_t_check(True)`` (or ``DDPM_KERNELS_CHECK_T=1``); kernels never read outside the tables
whatever ``t`` holds (NaN results).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import Optional

import torch

from .schedule import DiffusionSchedule

PARAMETERIZATIONS = {"eps": "eps", "x0": "x0", "v": "v", "epsilon": "eps", "sample": "x0", "v_prediction": "v"}
LOSS_TYPES = ("l1", "l2")
BACKEND_NAMES = ("auto", "reference", "triton", "cuda", "cpu")

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


def device_t_check_enabled() -> bool:
    return _device_t_check


@contextlib.contextmanager
def device_t_check(enabled: bool = True):
    """Context manager form of `set_device_t_check`."""
    previous = set_device_t_check(enabled)
    try:
        yield
    finally:
        set_device_t_check(previous)


def _check_data(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension (ndim >= 1), got a 0-d tensor")
    return x


def _check_like(name: str, y, ref_name: str, ref: torch.Tensor, mixed: bool = False) -> torch.Tensor:
    """``y`` with ``ref``'s dtype, shape and device (``mixed``: any float dtype; docs/design.md, "Mixed
    precision")."""
    # ``ref`` is already checked: equal dtype/shape/device is all there is to check (the common case, first)
    if (
        isinstance(y, torch.Tensor) and (y.dtype == ref.dtype or mixed) and y.device == ref.device
        and y.shape == ref.shape
    ):
        return _check_data(name, y) if mixed else y
    _check_data(name, y)
    if y.dtype != ref.dtype and not mixed:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {y.dtype}")
    if y.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(y.shape)}")
    raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {y.device}")


def _check_float_tensor(name: str, value, expected: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A floating-point tensor on ``ref``'s device (``expected``: what the argument is, for the message when
    ``value`` is not a tensor). Shapes are the caller's to check."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {value.device}")
    return value


def _check_model(model):
    """A wrapper module's denoiser: any callable ``model(x, t)``."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    return model


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
    name: str, t, batch: int, device: torch.device, owner: str, shape_note: str, T: int, lo_allowed: int,
    range_note: str,
) -> torch.Tensor:
    """Metadata of a per-sample index tensor (timesteps, or steps of a table: values in ``[lo_allowed, T)``), its
    values where that is free, then int64 with unit stride."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int64), got {t.dtype}")
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) ({shape_note}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {owner}), got {t.device}")
    if (t.is_cpu or _device_t_check) and batch and not torch.compiler.is_compiling():
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


def _check_t(t, x: torch.Tensor, x_name: str, schedule: DiffusionSchedule) -> torch.Tensor:
    return _check_timesteps(
        "t", t, x.shape[0], x.device, x_name, f"one timestep per sample of {x_name}", schedule.num_timesteps, 0,
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


def _check_real_or_inf(value, name: str = None) -> float:
    """A real number, +-inf allowed (a bound such as ``s_tmax``), not NaN."""
    name = name or "value"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name}: expected a number, got nan")
    return value


def _check_out(out, x: torch.Tensor, x_name: str, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``out`` like ``x`` (``dtype``: the promoted dtype of a call with mixed float operands, which ``out``
    must have instead of ``x``'s)."""
    if out is None:
        return None
    if dtype is not None and isinstance(out, torch.Tensor) and out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (the promoted dtype of the inputs), got {out.dtype}")
    _check_like("out", out, x_name, x, mixed=dtype is not None)
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
    return _check_choice("backend", backend, BACKEND_NAMES)


def _check_t_prev(t_prev, t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Like `_check_t` for the step's target timestep, which may also be -1 ("after the last step")."""
    return _check_timesteps(
        "t_prev", t_prev, t.shape[0], t.device, "t", "the shape of t", schedule.num_timesteps, -1,
        "-1: after the last step",
    )


def _check_step_index(step_index, sample: torch.Tensor, steps: int, row_note: str) -> torch.Tensor:
    """A per-sample step index into a table of ``steps`` rows (``row_note`` says what a row is)."""
    return _check_timesteps(
        "step_index", step_index, sample.shape[0], sample.device, "sample", "one step per sample of sample", steps,
        0, row_note,
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


def _check_learned_output(model_output, x_t: torch.Tensor, variance_type: str, mixed: bool = False) -> torch.Tensor:
    _check_data("model_output", model_output)
    if x_t.ndim < 2:
        raise ValueError(f"x_t: variance_type={variance_type!r} needs a channel dim (ndim >= 2), got shape {tuple(x_t.shape)}")
    expected = (x_t.shape[0], 2 * x_t.shape[1]) + tuple(x_t.shape[2:])
    if model_output.dtype != x_t.dtype and not mixed:
        raise TypeError(f"model_output: expected dtype {x_t.dtype} (the dtype of x_t), got {model_output.dtype}")
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"model_output: expected shape {expected} (x_t's channels, then as many variance channels, for "
            f"variance_type={variance_type!r}), got {tuple(model_output.shape)}"
        )
    if model_output.device != x_t.device:
        raise ValueError(f"model_output: expected a tensor on {x_t.device} (the device of x_t), got {model_output.device}")
    return model_output




def _check_guidance(model_output, uncond, guidance_scale, guidance_rescale, x: torch.Tensor, x_name: str,
                    mixed: Optional[torch.dtype] = None, promoted: Optional[torch.dtype] = None):
    """Classifier-free guidance arguments of a step: ``(cond, uncond, scale)`` with ``scale`` a (B,) tensor in
    the compute dtype, or ``(model_output, None, None)`` unguided. A (2B, ...) ``model_output`` without
    ``uncond`` is the batched ``[uncond; cond]`` output and is split into two views (no copy). The shapes of
    ``cond`` against ``x`` are checked by the caller, ``uncond``'s against ``cond`` here. ``mixed``: the
    promoted dtype of a call with mixed float operands (``uncond`` may have any float dtype; the scale is in
    the promoted dtype's compute dtype). ``promoted``: that promotion when ``uncond`` must still have
    ``model_output``'s dtype (the DDIM/DDPM steps): it sets only the scale's dtype."""
    if guidance_scale is None:
        if uncond is not None:
            raise ValueError("uncond: given without guidance_scale (pass guidance_scale to guide)")
        if guidance_rescale:
            raise ValueError("guidance_rescale: needs guidance_scale (it rescales the guided output)")
        return model_output, None, None
    _check_data("model_output", model_output)
    batch = x.shape[0]
    if uncond is None:
        if model_output.shape[0] != 2 * batch:
            raise ValueError(
                f"model_output: with guidance_scale and no uncond, expected the batched [uncond; cond] output "
                f"with {2 * batch} rows (twice {x_name}'s batch), got shape {tuple(model_output.shape)}"
            )
        uncond, model_output = model_output[:batch], model_output[batch:]
    else:
        _check_like("uncond", uncond, "model_output", model_output, mixed=mixed is not None)
    compute = torch.float64 if (mixed or promoted or x.dtype) == torch.float64 else torch.float32
    if isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool):
        value = float(guidance_scale)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"guidance_scale: expected a finite number, got {value}")
        return model_output, uncond, torch.full((batch,), value, dtype=compute, device=x.device)
    _check_float_tensor("guidance_scale", guidance_scale, f"a number or a float tensor of shape ({batch},)", x, x_name)
    if guidance_scale.ndim == 0:
        guidance_scale = guidance_scale.expand(batch)
    if tuple(guidance_scale.shape) != (batch,):
        raise ValueError(f"guidance_scale: expected shape ({batch},) (one scale per sample) or a 0-d tensor, "
                         f"got {tuple(guidance_scale.shape)}")
    return model_output, uncond, guidance_scale.to(compute).contiguous()
