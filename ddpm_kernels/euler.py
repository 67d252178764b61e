"""Euler-family sampler steps on a sigma table (diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``, SDXL's and ComfyUI's defaults): the sample lives in Karras et al.'s
sigma space, ``x = x0 + sigma eps`` (the model sees ``x / sqrt(sigma^2 + 1)``), and each sample's ``sigma =
sigmas[i]`` and ``sigma' = sigmas[i + 1]`` are gathered on the device from the scheduler's table by a per-sample
step index, as `ddpm_kernels.flow_step` does. Guidance is the step family's option (docs/design.md, "Flow
matching" and "Euler steps")."""

from __future__ import annotations

import torch

from ._spec import OPS as SPECS, EulerStepOptions
from .flow import (
    _check_step_index, _check_table, cached_options, checked_step, run_step, step_inputs, table_inputs_ok,
)
from .ops import _options, row_major, step_server

__all__ = ["euler_step", "euler_ancestral_step"]

_STEP_OPTIONS = {}


def _step_options(spec, values: tuple, guided: bool) -> EulerStepOptions:
    def build():
        checked = dict(zip(spec.option_names, _options(spec, values)))
        checked["parameterization"] = checked.pop("prediction_type")
        return EulerStepOptions(spec.name[: -len("_step")], guided=guided, **checked)

    return cached_options(_STEP_OPTIONS, (spec.name, guided, values, tuple(map(type, values))), build)


def _step(name, sample, model_output, sigmas, step_index, noise, generator, backend, values, out, guidance_scale,
          uncond, guidance_rescale, sample_offset):
    spec = SPECS[name]
    checked, mixed = (
        table_inputs_ok(backend, sample, (model_output, noise), out, sigmas, sigmas.shape[0] - 1, step_index)
        if (guidance_scale is None and uncond is None and not guidance_rescale and not sample_offset
            and type(sigmas) is torch.Tensor and sigmas.ndim == 1) else (0, None))
    if checked:
        # the common call, its tensors accepted by one C call: the table's own check, then the step
        opts = _step_options(spec, values, False)
        sigmas = _check_table(sigmas, sample, mixed)
        fmt, sample, (model_output,) = row_major(opts.adds_noise and noise is None, sample, model_output)
        return run_step(spec, backend, opts, fmt, sample, model_output, None, None, (sigmas, step_index), (sigmas,),
                        noise, generator, out, 0, mixed, checked)
    sample, model_output, uncond, noise, guidance, sample_offset, mixed = step_inputs(
        backend, sample, model_output, uncond, noise, guidance_scale, guidance_rescale, sample_offset
    )
    opts = _step_options(spec, values, guidance is not None)
    sigmas = _check_table(sigmas, sample, mixed)
    step_index = _check_step_index(step_index, sample, sigmas.shape[0] - 1)
    fmt, sample, (model_output, uncond) = row_major(opts.adds_noise and noise is None, sample, model_output, uncond)
    return run_step(spec, backend, opts, fmt, sample, model_output, uncond, guidance, (sigmas, step_index),
                    (sigmas,), noise, generator, out, sample_offset, mixed)


def checked_table_step(name, backend, sample, model_output, sigmas, step_index, values: tuple, noise=None,
                       generator=None, mixed=None):
    """`euler_step` (``name`` "euler_step") or `euler_ancestral_step` ("euler_ancestral_step"), unguided, for a
    caller that built its operands as the kernels read them and checked them as those ops do (the fused
    schedulers' step), `ddpm_kernels.flow.checked_step`: ``sample``, ``model_output`` (and ``noise``) float
    tensors of one shape and device, of one dtype unless ``mixed`` (their promoted dtype) is given; ``sigmas`` the
    contiguous 1-D table in the call's compute dtype on that device; ``step_index`` int64 (B,) there, its values
    steps of the table. ``values``: the op's options in its table row's order (``prediction_type``, the churn
    options of `euler_step`, ``return_pred_x0``, ``guidance_rescale``)."""
    spec = SPECS[name]
    opts = _step_options(spec, values, False)
    return checked_step(spec, backend, opts, opts.adds_noise, sample, model_output, (sigmas, step_index), (sigmas,),
                        noise, generator, mixed)


def table_step_server(name, backend, sample, values: tuple):
    """``step(sample, model_output, sigmas, step_index[, noise[, next_index]])``: `checked_table_step`'s call of
    ``name`` with ``values`` (``noise`` read when the step has a noise term; no generator), resolved once for a
    caller that repeats it (`ddpm_kernels.ops.step_server`). Returns what `checked_table_step` returns."""
    spec = SPECS[name]
    opts = _step_options(spec, values, False)

    def run(fn, sample, model_output, sigmas, step_index, noise=None):
        return fn(sample, model_output, None, None, sigmas, step_index, opts, noise, None, out=None, sample_offset=0)

    return step_server(spec, backend, sample, opts, run, 5)


def euler_step(
    sample, model_output, sigmas, step_index, prediction_type="epsilon", noise=None, generator=None, backend="auto", *,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, return_pred_x0=False, guidance_scale=None, uncond=None,
    guidance_rescale=0.0, out=None, sample_offset=0
):
    """One Euler step of ``EulerDiscreteScheduler.step``, per sample ``sigma = sigmas[step_index]`` and
    ``sigma' = sigmas[step_index + 1]``:

        gamma  = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0
        sigma_hat = sigma (gamma + 1);   x <- x + s_noise z sqrt(sigma_hat^2 - sigma^2)   (only with s_churn > 0)
        x0     = x - sigma_hat v  (epsilon),  v (sample),  v (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
                 (v_prediction)
        x'     = x + (x - x0) / sigma_hat (sigma' - sigma_hat)

    with ``v`` the model output (guided as in `flow_step` when ``guidance_scale`` is given). ``z`` is ``noise``
    when given, else drawn from ``generator`` when ``s_churn > 0`` (for every sample; samples whose sigma is
    outside [s_tmin, s_tmax] get no churn). Returns ``x'`` in ``sample``'s dtype, or ``(x', x0)`` with
    ``return_pred_x0=True``; ``out`` may be ``sample``. Computed in float32 (float64 for float64 data).
    ``sample_offset``: the global index of the batch's first sample in the noise stream (see
    `ddpm_kernels.p_sample`).
    """
    values = (prediction_type, s_churn, s_tmin, s_tmax, s_noise, return_pred_x0, guidance_rescale)
    return _step("euler_step", sample, model_output, sigmas, step_index, noise, generator, backend, values, out,
                 guidance_scale, uncond, guidance_rescale, sample_offset)


def euler_ancestral_step(
    sample, model_output, sigmas, step_index, prediction_type="epsilon", noise=None, generator=None, backend="auto", *,
    return_pred_x0=False, guidance_scale=None, uncond=None, guidance_rescale=0.0, out=None, sample_offset=0
):
    """One ancestral Euler step of ``EulerAncestralDiscreteScheduler.step``:

        sigma_up   = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),   sigma_down = sqrt(sigma'^2 - sigma_up^2)
        x0         as in `euler_step` with sigma_hat = sigma
        x'         = x + (x - x0) / sigma (sigma_down - sigma) + sigma_up z

    ``z`` is ``noise`` when given, else drawn from ``generator``. ``prediction_type="sample"`` (an x0
    prediction), which diffusers' class refuses, is the formula above with x0 = the model output. Returns as
    `euler_step`; ``sample_offset`` as there.
    """
    values = (prediction_type, return_pred_x0, guidance_rescale)
    return _step("euler_ancestral_step", sample, model_output, sigmas, step_index, noise, generator, backend,
                 values, out, guidance_scale, uncond, guidance_rescale, sample_offset)
