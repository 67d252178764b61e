"""The sampler-step family's public ops: one DDIM step and one ancestral DDPM step ``x_t -> x_{t_prev}`` with
per-sample timesteps, fused classifier-free guidance and dynamic thresholding, on `ddpm_kernels.ops`' prologue
(validation and dispatch). Their kernels: csrc/sampler_coefficients.h and ``ddpm_kernels.triton.sampler_step``;
see docs/design.md, "Kernel families". `ddpm_kernels.ops` re-exports both."""

from __future__ import annotations

import inspect

from . import ops
from ._checks import _check_guidance
from ._spec import OPS as SPECS
from ._stream import check_sample_offset
from .ops import _options, _prologue, promoted_dtype, restore_format, row_major, step_server

__all__ = ["ddim_step", "ddpm_step"]

# each step's options, in the order of the tuple `_step` takes (and their defaults, read from the signatures)
_OPTION_NAMES = {
    "ddim_step": ("eta", "parameterization", "clip_denoised", "set_alpha_to_one", "use_clipped_model_output",
                  "clip_range", "threshold_ratio", "threshold_max", "return_pred_x0", "guidance_rescale"),
    "ddpm_step": ("parameterization", "variance_type", "clip_denoised", "clip_range", "threshold_ratio",
                  "threshold_max", "return_pred_x0", "guidance_rescale"),
}
_DEFAULTS = {}


def ddim_step(
    x_t, t, t_prev, model_output, schedule, eta=0.0, parameterization="eps", clip_denoised=False, noise=None,
    generator=None, backend="auto", *, set_alpha_to_one=True, use_clipped_model_output=False, clip_range=1.0,
    threshold_ratio=None, threshold_max=1.0, out=None, return_pred_x0=False, guidance_scale=None, uncond=None,
    guidance_rescale=0.0, sample_offset=0
):
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12), per-sample ``t`` and ``t_prev``:

        x0   from model_output (eps, x0 or v), then clipped to [-clip_range, clip_range] when
             ``clip_denoised``, or dynamically thresholded when ``threshold_ratio`` is set (see
             `ddpm_kernels.dynamic_threshold`; it replaces clipping)
        eps  the model's noise prediction (re-derived from the clipped x0 when ``use_clipped_model_output``)
        sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x_{t_prev} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z

    ``t_prev`` is an integer tensor of shape (B,) in ``[-1, T)``; ``-1`` means "after the last step", where
    ``ab_prev`` is 1 when ``set_alpha_to_one`` and ``alphas_cumprod[0]`` otherwise (diffusers'
    ``final_alpha_cumprod``). ``z`` is ``noise`` when given; with ``noise=None`` and ``eta > 0`` the backend
    draws it from ``generator``; with ``eta == 0`` no noise is drawn. ``clip_denoised`` defaults to False as in
    ldm's DDIMSampler (latents are not bounded); diffusers' ``clip_sample`` defaults to True.
    Returns ``x_{t_prev}`` in ``x_t``'s dtype, or ``(x_{t_prev}, x0)`` with ``return_pred_x0=True``.
    ``out`` may be ``x_t`` (an in-place step). ``guidance_scale`` guides the step (see `_step`).
    ``sample_offset``: the global index of the batch's first sample in the noise stream (see `ddpm_kernels.p_sample`).
    """
    options = (
        eta, parameterization, clip_denoised, set_alpha_to_one, use_clipped_model_output, clip_range,
        threshold_ratio, threshold_max, return_pred_x0, guidance_rescale,
    )
    return _step("ddim_step", backend, x_t, t, t_prev, model_output, schedule, options, noise, generator, out,
                 guidance_scale, uncond, guidance_rescale, sample_offset)


def ddpm_step(
    x_t, t, t_prev, model_output, schedule, parameterization="eps", variance_type="fixed_small", clip_denoised=True,
    noise=None, generator=None, backend="auto", *, clip_range=1.0, threshold_ratio=None, threshold_max=1.0, out=None,
    return_pred_x0=False, guidance_scale=None, uncond=None, guidance_rescale=0.0, sample_offset=0
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
    `ddpm_kernels.p_sample` (v_posterior = 0). ``z`` is ``noise`` when given, else drawn from ``generator``.
    Returns ``x_{t_prev}`` in ``x_t``'s dtype, or ``(x_{t_prev}, x0)`` with ``return_pred_x0=True``.
    ``guidance_scale`` guides the step (see `_step`; a learned variance comes from the conditional output).
    ``sample_offset``: the global index of the batch's first sample in the noise stream (see `ddpm_kernels.p_sample`).
    """
    options = (
        parameterization, variance_type, clip_denoised, clip_range, threshold_ratio, threshold_max, return_pred_x0,
        guidance_rescale,
    )
    return _step("ddpm_step", backend, x_t, t, t_prev, model_output, schedule, options, noise, generator, out,
                 guidance_scale, uncond, guidance_rescale, sample_offset)


def step_options(name, **options) -> tuple:
    """The option values of ``name``'s call (`ddim_step` or `ddpm_step`) with ``options`` given by keyword and
    the rest at their defaults, in the order `_step` takes them (what `sampler_step_server` binds)."""
    defaults = _DEFAULTS.get(name)
    if defaults is None:
        parameters = inspect.signature(globals()[name]).parameters
        defaults = _DEFAULTS[name] = {key: parameters[key].default for key in _OPTION_NAMES[name]}
    values = dict(defaults, **options)
    return tuple(values[key] for key in defaults)


def sampler_step_server(name, backend, x_t, options: tuple):
    """``step(x_t, t, t_prev, model_output, schedule, noise=None)``: `ddim_step` / `ddpm_step` (``name``) with the
    option values ``options`` (`step_options`), unguided, without a generator, ``out`` or a sample offset, resolved
    once for a caller that made the same call through the public op and its checks and repeats it on operands it
    built and checked as the public op does (a drop-in scheduler's steps: `ddpm_kernels.ops.step_server`)."""
    spec = SPECS[name]
    opts = _options(spec, options)

    def run(fn, x_t, t, t_prev, model_output, schedule, noise=None):
        return fn(x_t, t, t_prev, model_output, schedule, opts, noise, None, out=None, sample_offset=0)

    return step_server(spec, backend, x_t, opts, run, 6)


def _served_step(name, backend, x_t, t, t_prev, model_output, schedule, options, noise):
    """The plain call of `ddim_step` / `ddpm_step` (unguided, no generator, ``out`` or sample offset, ``t_prev``
    given) served by one bound call of the compiled operator (``extension.sampler_step_server``, what the DDIM /
    DDPM drop-ins' steps use) when `ops._plain` finds it plain (a compiled backend declines thresholding); None
    for the prologue."""
    if t_prev is None:
        return None
    plain = ops._plain(name, backend, x_t, (model_output,) if noise is None else (model_output, noise), schedule,
                       t, options, None, t_prev)
    if plain is None:
        return None
    extension = ops._extension
    return extension._public_server(extension.sampler_step_server, plain[0])(x_t, t, t_prev, model_output, schedule,
                                                                            noise)


def _step(name, backend, x_t, t, t_prev, model_output, schedule, options, noise, generator, out, guidance_scale,
          uncond, guidance_rescale, sample_offset=0):
    """The sampler steps' common call. Guidance (``guidance_scale`` not None), as in `ddpm_kernels.flow_step`:
    the model output is ``u + w (c - u)`` of the conditional output ``c`` and the unconditional ``u`` (
    ``model_output`` is either the (2B, ...) output of a batched ``[uncond; cond]`` forward or ``c`` with
    ``uncond=``), with ``w`` a number or a float tensor (B,) per sample, formed in the step; ``guidance_rescale``
    in [0, 1] is diffusers' ``rescale_noise_cfg`` (per-sample standard deviations). ``sample_offset``: as in
    `ddpm_kernels.p_sample`."""
    if (guidance_scale is None and uncond is None and generator is None and out is None
            and type(sample_offset) is int and not sample_offset):
        served = _served_step(name, backend, x_t, t, t_prev, model_output, schedule, options, noise)
        if served is not None:
            return served
    if sample_offset:
        sample_offset = check_sample_offset(sample_offset)
    guidance = None
    if guidance_scale is not None or uncond is not None:
        # the scale is taken in the compute dtype of the call's promotion (float64 when any operand is)
        model_output, uncond, guidance = _check_guidance(
            model_output, uncond, guidance_scale, guidance_rescale, x_t, "x_t",
            promoted=promoted_dtype(x_t, (model_output, noise)),
        )
    fn, opts, t, t_prev, out, x_t, (model_output, noise, uncond) = _prologue(
        SPECS[name], backend, x_t, (model_output, noise), schedule, t, options, generator, guided=guidance is not None,
        passengers=(uncond,), t_prev=t_prev, out=out,
    )
    fmt, x_t, (model_output, uncond) = row_major(opts.adds_noise and noise is None, x_t, model_output, uncond)
    if guidance is None:
        result = fn(x_t, t, t_prev, model_output, schedule, opts, noise, generator, out=out,
                    sample_offset=sample_offset)
        return restore_format(result, fmt, out)
    result = fn(x_t, t, t_prev, model_output, schedule, opts, noise, generator, out=out, uncond=uncond,
                guidance=guidance, sample_offset=sample_offset)
    return restore_format(result, fmt, out)
