"""Sampling the demo's model, and checking the fused backends against the reference on the same noise."""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import torch

from .. import backends, flow
from .. import ops as dk_ops
from ..diffusion import GaussianDiffusion
from ..flow_matching import FlowMatching
from .model import Generative, is_flow, sample_shape
from .timing import timed


@torch.no_grad()
def sample_grid(
    diffusion: Generative, num_samples: int, seed: int = 0, progress: bool = True
) -> Tuple[torch.Tensor, List[torch.Tensor], float]:
    """``p_sample_loop`` (DDPM) or the Euler ``sample_loop`` (flow matching) from a seeded generator:
    ``(samples, intermediates, seconds)``."""
    device = diffusion.device
    g = torch.Generator(device=device).manual_seed(seed)
    shape = sample_shape(diffusion, num_samples)
    loop = diffusion.sample_loop if is_flow(diffusion) else diffusion.p_sample_loop
    (samples, intermediates), seconds = timed(
        lambda: loop(shape, return_intermediates=True, generator=g, progress=progress), device
    )
    return samples, intermediates, seconds


def _p_sample(diffusion: GaussianDiffusion, x_t, t, model_out, noise, backend: str, out=None) -> torch.Tensor:
    """One ancestral step with ``diffusion``'s schedule and options, with explicit ``noise``."""
    return dk_ops.p_sample(
        x_t, t, model_out, diffusion.schedule, diffusion.parameterization, diffusion.clip_denoised,
        noise=noise, backend=backend, out=out,
    )


def _flow_step(fm: FlowMatching, x, sigmas, step_index, model_out, backend: str, out=None) -> torch.Tensor:
    """One deterministic Euler step of ``fm``'s sampler from the table ``sigmas`` at ``step_index``."""
    return flow.flow_step(x, model_out, sigmas, step_index, backend=backend, out=out)


@torch.no_grad()
def _flow_from(fm: FlowMatching, x_init: torch.Tensor, backend: str) -> torch.Tensor:
    """``fm``'s Euler sampling from ``x_init`` with its steps on ``backend`` (the Euler step draws no noise)."""
    sigmas = fm.sigma_table()
    img = x_init.clone()
    step_index = torch.empty((img.shape[0],), device=img.device, dtype=torch.long)
    for i in range(sigmas.shape[0] - 1):
        step_index.fill_(i)
        t = fm.model_timesteps(sigmas[step_index])
        _flow_step(fm, img, sigmas, step_index, fm.model(img, t), backend, out=img)
    return img


@torch.no_grad()
def sample_with_noise(diffusion: Generative, x_T: torch.Tensor, seed: int, backend: str) -> torch.Tensor:
    """Ancestral sampling from ``x_T`` where step ``i`` uses explicit noise drawn from ``seed``.

    Two backends run with the same ``x_T`` and ``seed`` see exactly the same noise, so their results differ
    only by floating-point rounding (in-kernel noise, ``noise=None``, is backend-specific). For flow matching,
    the deterministic Euler sampling from ``x_T`` (``seed`` is not needed: no step adds noise).
    """
    if is_flow(diffusion):
        return _flow_from(diffusion, x_T, backend)
    g = torch.Generator(device=x_T.device).manual_seed(seed)
    img = x_T.clone()
    t = torch.empty((img.shape[0],), device=img.device, dtype=torch.long)
    for i in reversed(range(diffusion.num_timesteps)):
        t.fill_(i)
        noise = torch.randn(img.shape, generator=g, device=img.device, dtype=img.dtype)
        _p_sample(diffusion, img, t, diffusion.model(img, t), noise, backend, out=img)
    return img


def backends_for(device, op: str, dtype=torch.float32) -> Tuple[List[str], Dict[str, str], Dict[str, str]]:
    """The device's fused backends, split: (those that run ``op`` here, {backend: why it cannot run here},
    {backend: why it runs here but not ``op``})."""
    device = torch.device(device)
    available, unavailable, lacking = [], {}, {}
    for name in backends.AUTO_ORDER.get(device.type, ()):
        try:
            impl = backends.get_backend(name, device, dtype)
        except backends.BackendUnavailableError as exc:
            unavailable[name] = str(exc)
            continue
        if op in impl.ops:
            available.append(name)
        else:
            lacking[name] = f"the {name} backend has no fused {op} in this build; the reference runs it"
    return available, unavailable, lacking


def fused_backends(device, dtype=torch.float32, op: str = "p_sample") -> Tuple[List[str], Dict[str, str]]:
    """(fused backends that run ``op`` here, {fused backend: why not} for the device's other fused backends)."""
    available, unavailable, lacking = backends_for(device, op, dtype)
    return available, {**unavailable, **lacking}


def resolved_backend(backend: str, device, dtype=torch.float32, op: str = "p_sample") -> str:
    """The backend that actually runs ``op`` for ``backend`` (``auto`` resolved), without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return backends.resolve(op, backend, torch.device(device), dtype)[0]


def _max_flow_step_diff(fm: FlowMatching, backend: str, shape, g: torch.Generator) -> float:
    """Max |backend - reference| over one Euler step at every logged step, on inputs drawn from ``g``."""
    sigmas = fm.sigma_table()
    err = 0.0
    for i in fm.logged_steps()[:-1]:
        step_index = torch.full((shape[0],), i, device=fm.device, dtype=torch.long)
        x = torch.randn(shape, generator=g, device=fm.device)
        model_out = fm.model(x, fm.model_timesteps(sigmas[step_index]))
        ref = _flow_step(fm, x, sigmas, step_index, model_out, "reference")
        got = _flow_step(fm, x, sigmas, step_index, model_out, backend)
        err = max(err, float((got - ref).abs().max()))
    return err


def _max_step_diff(diffusion: Generative, backend: str, shape, g: torch.Generator) -> float:
    """Max |backend - reference| over one step at every logged t, on inputs and noise drawn from ``g``."""
    if is_flow(diffusion):
        return _max_flow_step_diff(diffusion, backend, shape, g)
    device = diffusion.device
    err = 0.0
    for i in range(diffusion.num_timesteps - 1, -1, -diffusion.log_every_t):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x_t = torch.randn(shape, generator=g, device=device)
        noise = torch.randn(shape, generator=g, device=device)
        model_out = diffusion.model(x_t, t)
        ref = _p_sample(diffusion, x_t, t, model_out, noise, "reference")
        got = _p_sample(diffusion, x_t, t, model_out, noise, backend)
        err = max(err, float((got - ref).abs().max()))
    return err


@torch.no_grad()
def compare_backends(
    diffusion: Generative, fused: Sequence[str], num_samples: int = 8, seed: int = 0
) -> Dict[str, Dict[str, float]]:
    """Max |fused - reference| for each fused backend: one step at every logged t, and whole trajectories
    (same x_T, same explicit noise per step)."""
    device = diffusion.device
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn(sample_shape(diffusion, num_samples), generator=g, device=device)
    results: Dict[str, Dict[str, float]] = {}
    ref_final = sample_with_noise(diffusion, x_T, seed + 1, "reference") if fused else None
    for name in fused:
        step_err = _max_step_diff(diffusion, name, x_T.shape, g)
        final = sample_with_noise(diffusion, x_T, seed + 1, name)
        results[name] = {
            "step_max_abs_diff": step_err,
            "trajectory_max_abs_diff": float((final - ref_final).abs().max()),
        }
    return results
