"""Patch CompVis / Stability-AI ldm ``DDPM`` and ``LatentDiffusion`` objects to run their per-step math through
ddpm_kernels' fused ops::

    from ddpm_kernels.integrations import compvis
    compvis.patch(model)      # model: ldm.models.diffusion.ddpm.DDPM or LatentDiffusion (or anything alike)
    ...                       # model.p_sample / p_losses / q_sample ... now run fused ops
    compvis.unpatch(model)    # back to the original methods

Nothing from ldm is imported: the model is duck-typed on what ``ldm/models/diffusion/ddpm.py`` gives it (the
schedule buffers ``betas`` ... ``posterior_mean_coef2`` and ``lvlb_weights``, ``parameterization``,
``q_sample``, ``p_mean_variance``, ``p_sample``, ``p_losses``; ``apply_model`` marks a ``LatentDiffusion``).
The patch replaces, on that one instance, ``q_sample``, ``predict_start_from_noise``, ``q_posterior``,
``get_v``, ``predict_start_from_z_and_v``, ``predict_eps_from_z_and_v``, ``p_mean_variance``, ``p_sample``
and ``p_losses`` (those the model has). They keep ldm's signatures, return values, loss-dict keys and random
number use (``torch.randn_like`` for training noise, ``noise_like`` after the model call for sampling
noise), so the same seed gives the same numbers.

``patch(sampler)`` does the same for an ldm ``DDIMSampler``: ``p_sample_ddim`` becomes one
`ddpm_kernels.ddim_step` (ldm's DDIM: ``alphas_cumprod[0]`` after the last step, noise drawn every step).

The schedule the ops read is built from the model's own float32 buffers (loaded row by row), so the
coefficients are the model's; it follows the model across ``.to(device)`` and is rebuilt if a buffer is
replaced or changed in place (a checkpoint load). The model's ``state_dict`` is untouched: the schedule is not
registered as a submodule.

What falls back to the original method (unchanged results, unfused): ``quantize_denoised`` /
``return_codebook_ids``; a ``LatentDiffusion`` whose ``logvar`` is learned or non-zero (the fused loss has no
per-timestep log-variance term); a ``loss_type`` other than l1/l2; inputs the ops do not take (broadcast
shapes, ``t`` not a (B,) integer tensor). Differences, all where ldm errs or promotes: outputs have the data's
dtype (ldm promotes half-precision data to float32 through its float32 buffers), and ``p_mean_variance`` /
``p_sample`` accept ``parameterization="v"`` (ldm's raise there; its DDIM sampler handles v).
"""

from __future__ import annotations

import types
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .. import _checks, ops
from ..schedule import TABLE_NAMES, TABLE_ROW, DiffusionSchedule

__all__ = ["patch", "unpatch", "is_patched", "schedule_of"]

_STATE = "_ddpm_kernels_patch"
_REQUIRED = ("betas", "alphas_cumprod", "parameterization", "num_timesteps", "q_sample", "p_mean_variance", "p_sample")


def _noise_like(shape, device, repeat=False):
    """ldm's ``noise_like``: float32 standard normal, or one sample repeated over the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def _step_noise(x, repeat_noise, temperature, noise_dropout):
    """ldm's sampling noise of a step on ``x``: `_noise_like` times ``temperature``, then dropped out with
    probability ``noise_dropout`` (float32, as ldm draws it)."""
    noise = _noise_like(x.shape, x.device, repeat_noise) * temperature
    if noise_dropout > 0.0:
        noise = torch.nn.functional.dropout(noise, p=noise_dropout)
    return noise


def _corrected(model, model_out, x, t, c, score_corrector, corrector_kwargs):
    """The model output after ldm's optional ``score_corrector.modify_score(model, ...)``, in ``x``'s dtype."""
    if score_corrector is not None:
        model_out = score_corrector.modify_score(model, model_out, x, t, c, **(corrector_kwargs or {}))
    return _as(model_out, x)


class _Patch:
    def __init__(self, model, backend: str):
        self.backend = backend
        self.latent = callable(getattr(model, "apply_model", None))
        self.originals: Dict[str, Callable] = {}
        self.instance_attrs: Dict[str, object] = {}
        self._schedule: Optional[DiffusionSchedule] = None
        self._fingerprint = None
        self._logvar_key = None
        self._logvar_fusable = True

    # ------------------------------------------------------------------ schedule from the model's buffers
    @staticmethod
    def _buffers(model):
        found = {}
        for name in TABLE_NAMES + ("lvlb_weights",):
            value = getattr(model, name, None)
            if isinstance(value, torch.Tensor):
                found[name] = value
        return found

    def schedule(self, model) -> DiffusionSchedule:
        buffers = self._buffers(model)
        fingerprint = tuple((n, id(b), b._version, b.device) for n, b in buffers.items())
        if fingerprint != self._fingerprint:
            self._schedule = self._build(model, buffers)
            self._fingerprint = fingerprint
        return self._schedule

    @staticmethod
    def _build(model, buffers) -> DiffusionSchedule:
        betas = buffers["betas"].detach().to("cpu", torch.float64)
        schedule = DiffusionSchedule(
            given_betas=betas,
            v_posterior=float(getattr(model, "v_posterior", 0.0) or 0.0),
            zero_terminal_snr=bool(betas[-1] >= 1),
        )
        T = schedule.num_timesteps
        rows = {n: b.detach().to("cpu") for n, b in buffers.items() if n in TABLE_NAMES and b.shape == (T,)}
        lvlb = buffers.get("lvlb_weights")
        parameterization = _checks.PARAMETERIZATIONS.get(getattr(model, "parameterization", "eps"), "eps")
        if lvlb is not None and lvlb.shape == (T,):
            rows["lvlb_weights_" + parameterization] = lvlb.detach().to("cpu")
        # every coefficient becomes the model's own value: float32 rows rounded from it, float64 rows exact
        schedule.load_state_dict(rows, strict=False)
        with torch.no_grad():
            for name, value in rows.items():
                schedule.coefficients64[TABLE_ROW[name]] = value.to(torch.float64)
        return schedule.to(buffers["betas"].device)

    def logvar_is_zero(self, model) -> bool:
        """LatentDiffusion's loss divides by exp(logvar[t]) and adds logvar[t]; with the default all-zero,
        unlearned logvar that is the plain loss, which the fused op computes."""
        if getattr(model, "learn_logvar", False):
            return False
        logvar = getattr(model, "logvar", None)
        if logvar is None:
            return True
        if not isinstance(logvar, torch.Tensor) or isinstance(logvar, torch.nn.Parameter):
            return False
        key = (id(logvar), logvar._version)
        if key != self._logvar_key:
            self._logvar_fusable = not bool((logvar != 0).any())  # once per logvar, not per step
            self._logvar_key = key
        return self._logvar_fusable


def _state(model) -> _Patch:
    return model.__dict__[_STATE]


def _fusable(t, *tensors) -> bool:
    """Inputs the ops take as they are: one float dtype, one shape, one device, t an integer (B,) tensor."""
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        return False
    for y in tensors[1:]:
        if not isinstance(y, torch.Tensor) or y.dtype != x.dtype or y.shape != x.shape or y.device != x.device:
            return False
    return (
        isinstance(t, torch.Tensor)
        and not t.dtype.is_floating_point
        and t.dtype != torch.bool
        and t.shape == (x.shape[0],)
        and t.device == x.device
    )


def _as(model_out, x):
    # under autocast the model returns half precision; ldm's arithmetic promotes it to the data's dtype
    return model_out.to(x.dtype) if isinstance(model_out, torch.Tensor) and model_out.dtype != x.dtype else model_out


# ---------------------------------------------------------------------------------------------- fused methods
def _fused(self, name, t, tensors, args):
    """ldm's ``name(*args)`` as the fused op ``ops.<name>(*args, schedule)`` when it takes ``t`` and ``tensors``
    as they are (`_fusable`), else ldm's own method."""
    st = _state(self)
    if not _fusable(t, *tensors):
        return st.originals[name](*args)
    return getattr(ops, name)(*args, st.schedule(self), backend=st.backend)


def _q_sample(self, x_start, t, noise=None):
    noise = torch.randn_like(x_start) if noise is None else noise
    return _fused(self, "q_sample", t, (x_start, noise), (x_start, t, noise))


def _predict_start_from_noise(self, x_t, t, noise):
    return _fused(self, "predict_start_from_noise", t, (x_t, noise), (x_t, t, noise))


def _q_posterior(self, x_start, x_t, t):
    return _fused(self, "q_posterior", t, (x_t, x_start), (x_start, x_t, t))


def _get_v(self, x, noise, t):
    return _fused(self, "get_v", t, (x, noise), (x, noise, t))


def _predict_start_from_z_and_v(self, x_t, t, v):
    return _fused(self, "predict_start_from_z_and_v", t, (x_t, v), (x_t, t, v))


def _predict_eps_from_z_and_v(self, x_t, t, v):
    return _fused(self, "predict_eps_from_z_and_v", t, (x_t, v), (x_t, t, v))


def _x0(self, st, x, t, model_out, clip_denoised):
    """The (clipped) x0 prediction ldm returns with return_x0=True."""
    schedule, parameterization = st.schedule(self), _checks.PARAMETERIZATIONS[self.parameterization]
    if parameterization == "eps":
        x0 = ops.predict_start_from_noise(x, t, model_out, schedule, backend=st.backend)
    elif parameterization == "v":
        x0 = ops.predict_start_from_z_and_v(x, t, model_out, schedule, backend=st.backend)
    else:
        x0 = model_out
    return x0.clamp_(-1.0, 1.0) if clip_denoised else x0


def _p_mean_variance_ddpm(self, x, t, clip_denoised: bool):
    st = _state(self)
    if not _fusable(t, x):
        return st.originals["p_mean_variance"](x, t, clip_denoised)
    model_out = _as(self.model(x, t), x)
    return ops.p_mean_variance(
        x, t, model_out, st.schedule(self), self.parameterization, bool(clip_denoised), backend=st.backend
    )


@torch.no_grad()
def _p_sample_ddpm(self, x, t, clip_denoised=True, repeat_noise=False):
    st = _state(self)
    if not _fusable(t, x):
        return st.originals["p_sample"](x, t, clip_denoised, repeat_noise)
    model_out = _as(self.model(x, t), x)
    noise = _noise_like(x.shape, x.device, repeat_noise).to(x.dtype)
    return ops.p_sample(
        x, t, model_out, st.schedule(self), self.parameterization, bool(clip_denoised), noise=noise, backend=st.backend
    )


def _loss(self, st, x_start, noise, t, model_out):
    loss, loss_simple, loss_vlb = ops.diffusion_loss(
        _as(model_out, x_start),
        x_start,
        noise,
        t,
        st.schedule(self),
        self.parameterization,
        self.loss_type,
        float(self.l_simple_weight),
        float(self.original_elbo_weight),
        backend=st.backend,
    )
    prefix = "train" if self.training else "val"
    return loss, {f"{prefix}/loss_simple": loss_simple, f"{prefix}/loss_vlb": loss_vlb, f"{prefix}/loss": loss}


def _p_losses_ddpm(self, x_start, t, noise=None):
    st = _state(self)
    noise = torch.randn_like(x_start) if noise is None else noise
    if getattr(self, "loss_type", "l2") not in _checks.LOSS_TYPES or not _fusable(t, x_start, noise):
        return st.originals["p_losses"](x_start, t, noise)
    x_noisy = ops.q_sample(x_start, t, noise, st.schedule(self), backend=st.backend)
    return _loss(self, st, x_start, noise, t, self.model(x_noisy, t))


def _p_losses_latent(self, x_start, cond, t, noise=None):
    st = _state(self)
    noise = torch.randn_like(x_start) if noise is None else noise
    if (
        getattr(self, "loss_type", "l2") not in _checks.LOSS_TYPES
        or not _fusable(t, x_start, noise)
        or not st.logvar_is_zero(self)
    ):
        return st.originals["p_losses"](x_start, cond, t, noise)
    x_noisy = ops.q_sample(x_start, t, noise, st.schedule(self), backend=st.backend)
    return _loss(self, st, x_start, noise, t, self.apply_model(x_noisy, t, cond))


def _p_mean_variance_latent(
    self, x, c, t, clip_denoised: bool, return_codebook_ids=False, quantize_denoised=False, return_x0=False,
    score_corrector=None, corrector_kwargs=None
):
    st = _state(self)
    if return_codebook_ids or quantize_denoised or not _fusable(t, x):
        return st.originals["p_mean_variance"](
            x, c, t, clip_denoised, return_codebook_ids, quantize_denoised, return_x0, score_corrector, corrector_kwargs
        )
    model_out = _corrected(self, self.apply_model(x, t, c), x, t, c, score_corrector, corrector_kwargs)
    mean, var, log_var = ops.p_mean_variance(
        x, t, model_out, st.schedule(self), self.parameterization, bool(clip_denoised), backend=st.backend
    )
    if return_x0:
        return mean, var, log_var, _x0(self, st, x, t, model_out, clip_denoised)
    return mean, var, log_var


@torch.no_grad()
def _p_sample_latent(
    self, x, c, t, clip_denoised=False, repeat_noise=False, return_codebook_ids=False, quantize_denoised=False,
    return_x0=False, temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None
):
    st = _state(self)
    if return_codebook_ids or quantize_denoised or not _fusable(t, x):
        return st.originals["p_sample"](
            x,
            c,
            t,
            clip_denoised,
            repeat_noise,
            return_codebook_ids,
            quantize_denoised,
            return_x0,
            temperature,
            noise_dropout,
            score_corrector,
            corrector_kwargs,
        )
    model_out = _corrected(self, self.apply_model(x, t, c), x, t, c, score_corrector, corrector_kwargs)
    x0 = _x0(self, st, x, t, model_out.clone(), clip_denoised) if return_x0 else None
    noise = _step_noise(x, repeat_noise, temperature, noise_dropout)
    out = ops.p_sample(
        x,
        t,
        model_out,
        st.schedule(self),
        self.parameterization,
        bool(clip_denoised),
        noise=noise.to(x.dtype),
        backend=st.backend,
    )
    return (out, x0) if return_x0 else out


# ---------------------------------------------------------------------------------------------- DDIMSampler
def _guided_output(self, x, c, t, unconditional_guidance_scale, unconditional_conditioning):
    """The model output with classifier-free guidance, exactly as ldm's p_sample_ddim forms it."""
    if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
        return self.model.apply_model(x, t, c)
    x_in, t_in = torch.cat([x] * 2), torch.cat([t] * 2)
    if isinstance(c, dict):
        c_in = {}
        for k in c:
            if isinstance(c[k], list):
                c_in[k] = [torch.cat([unconditional_conditioning[k][i], c[k][i]]) for i in range(len(c[k]))]
            else:
                c_in[k] = torch.cat([unconditional_conditioning[k], c[k]])
    elif isinstance(c, list):
        c_in = [torch.cat([unconditional_conditioning[i], c[i]]) for i in range(len(c))]
    else:
        c_in = torch.cat([unconditional_conditioning, c])
    model_uncond, model_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
    return model_uncond + unconditional_guidance_scale * (model_t - model_uncond)


def _make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
    st = _state(self)
    out = st.originals["make_schedule"](ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta,
                                        verbose=verbose)
    # the step needs eta and the timestep sequence; ldm keeps only the sigmas they make
    st.eta = float(ddim_eta)
    st.ddim_timesteps = [int(v) for v in np.asarray(self.ddim_timesteps).reshape(-1)]
    return out


@torch.no_grad()
def _p_sample_ddim(
    self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False, temperature=1.0,
    noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
    unconditional_conditioning=None, **extra
):
    st = _state(self)
    parameterization = _checks.PARAMETERIZATIONS.get(getattr(self.model, "parameterization", "eps"))
    if (
        use_original_steps
        or quantize_denoised
        or st.eta is None
        or any(v is not None for v in extra.values())  # e.g. dynamic_threshold (ldm raises)
        or parameterization not in ("eps", "v")
        or (score_corrector is not None and parameterization != "eps")
        or not _fusable(t, x)
        or not isinstance(index, (int, np.integer))
        or not 0 <= int(index) < len(st.ddim_timesteps)
    ):
        return st.originals["p_sample_ddim"](
            x, c, t, index, repeat_noise, use_original_steps, quantize_denoised, temperature, noise_dropout,
            score_corrector, corrector_kwargs, unconditional_guidance_scale, unconditional_conditioning, **extra
        )
    model_output = _guided_output(self, x, c, t, unconditional_guidance_scale, unconditional_conditioning)
    model_output = _corrected(self.model, model_output, x, t, c, score_corrector, corrector_kwargs)
    index = int(index)
    # the previous DDIM timestep; the first one steps to alphas_cumprod[0] (ldm's ddim_alphas_prev[0])
    t_prev = torch.full_like(t, st.ddim_timesteps[index - 1] if index > 0 else -1)
    noise = _step_noise(x, repeat_noise, temperature, noise_dropout)  # drawn whatever eta, as ldm does
    return ops.ddim_step(
        x,
        t,
        t_prev,
        model_output,
        st.schedule(self.model),
        st.eta,
        parameterization,
        False,
        noise=noise.to(x.dtype),
        backend=st.backend,
        set_alpha_to_one=False,
        return_pred_x0=True,
    )


_COMMON = {
    "q_sample": _q_sample,
    "predict_start_from_noise": _predict_start_from_noise,
    "q_posterior": _q_posterior,
    "get_v": _get_v,
    "predict_start_from_z_and_v": _predict_start_from_z_and_v,
    "predict_eps_from_z_and_v": _predict_eps_from_z_and_v,
}
_DDPM = {"p_mean_variance": _p_mean_variance_ddpm, "p_sample": _p_sample_ddpm, "p_losses": _p_losses_ddpm}
_LATENT = {"p_mean_variance": _p_mean_variance_latent, "p_sample": _p_sample_latent, "p_losses": _p_losses_latent}


# ---------------------------------------------------------------------------------------------- public
def is_patched(model) -> bool:
    return _STATE in getattr(model, "__dict__", {})


def _is_ddim_sampler(obj) -> bool:
    return callable(getattr(obj, "p_sample_ddim", None)) and callable(getattr(obj, "make_schedule", None)) and hasattr(
        obj, "model"
    )


def _patch_ddim_sampler(sampler, backend: str):
    model = sampler.model
    missing = [name for name in ("betas", "alphas_cumprod", "parameterization", "apply_model") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"sampler.model: expected an ldm LatentDiffusion; {type(model).__name__} lacks {missing}")
    _checks._check_parameterization(model.parameterization)
    st = _Patch(model, backend)
    st.schedule(model)
    st.eta, st.ddim_timesteps = None, None  # known once make_schedule runs (sample() calls it)
    return _install(sampler, st, {"make_schedule": _make_schedule, "p_sample_ddim": _p_sample_ddim})


def _install(obj, st: _Patch, methods: dict):
    """Bind ``methods`` on ``obj`` (those it has), keeping the originals (and any instance attributes they
    shadow) in ``st`` for `unpatch`. Returns ``obj``."""
    for name, fn in methods.items():
        if not hasattr(obj, name):
            continue
        if name in obj.__dict__:
            st.instance_attrs[name] = obj.__dict__[name]
        st.originals[name] = getattr(obj, name)
        obj.__dict__[name] = types.MethodType(fn, obj)
    obj.__dict__[_STATE] = st
    return obj


def patch(model, backend: str = "auto"):
    """Route ``model``'s per-step diffusion math through ddpm_kernels' ops (on ``backend``). Returns the model.
    Patching a patched model re-patches it (e.g. with another backend).

    ``model`` may also be an ldm ``DDIMSampler``: its ``p_sample_ddim`` becomes one fused
    `ddpm_kernels.ddim_step` (after the model call and classifier-free guidance), for samplers whose
    ``make_schedule`` runs after the patch (``sample()`` runs it). ``use_original_steps``,
    ``quantize_denoised`` and ``dynamic_threshold`` fall back to the original method."""
    _checks._check_backend(backend)
    if _is_ddim_sampler(model):
        if is_patched(model):
            unpatch(model)
        return _patch_ddim_sampler(model, backend)
    missing = [name for name in _REQUIRED if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"model: expected a CompVis/ldm DDPM or LatentDiffusion (schedule buffers, parameterization, q_sample, "
            f"p_mean_variance, p_sample); {type(model).__name__} lacks {missing}"
        )
    _checks._check_parameterization(model.parameterization)
    if is_patched(model):
        unpatch(model)
    st = _Patch(model, backend)
    st.schedule(model)  # build now: a bad schedule fails here, not in the first step
    return _install(model, st, dict(_COMMON, **(_LATENT if st.latent else _DDPM)))


def unpatch(model):
    """Restore the methods `patch` replaced. Returns the model; a model that is not patched is left as is."""
    if not is_patched(model):
        return model
    st = model.__dict__.pop(_STATE)
    for name in st.originals:
        model.__dict__.pop(name, None)
        if name in st.instance_attrs:
            model.__dict__[name] = st.instance_attrs[name]
    return model


def schedule_of(model) -> DiffusionSchedule:
    """The `DiffusionSchedule` a patched model's ops read (built from its buffers)."""
    if not is_patched(model):
        raise ValueError("model: not patched; call ddpm_kernels.integrations.compvis.patch(model) first")
    return _state(model).schedule(model)
