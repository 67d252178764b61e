"""Sampling the demo's model, and checking the fused backends against the reference on the same noise."""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import torch

from .. import backends
from .. import ops as dk_ops
from ..diffusion import GaussianDiffusion
from .model import sample_shape
from .timing import timed


@torch.no_grad()
def sample_grid(
    diffusion: GaussianDiffusion, num_samples: int, seed: int = 0, progress: bool = True
) -> Tuple[torch.Tensor, List[torch.Tensor], float]:
    """``p_sample_loop`` from a seeded generator: ``(samples, intermediates, seconds)``."""
    device = diffusion.device
    g = torch.Generator(device=device).manual_seed(seed)
    shape = sample_shape(diffusion, num_samples)
    (samples, intermediates), seconds = timed(
        lambda: diffusion.p_sample_loop(shape, return_intermediates=True, generator=g, progress=progress), device
    )
    return samples, intermediates, seconds


def _p_sample(diffusion: GaussianDiffusion, x_t, t, model_out, noise, backend: str, out=None) -> torch.Tensor:
    """One ancestral step with ``diffusion``'s schedule and options, with explicit ``noise``."""
    return dk_ops.p_sample(
        x_t, t, model_out, diffusion.schedule, diffusion.parameterization, diffusion.clip_denoised,
        noise=noise, backend=backend, out=out,
    )


@torch.no_grad()
def sample_with_noise(diffusion: GaussianDiffusion, x_T: torch.Tensor, seed: int, backend: str) -> torch.Tensor:
    """Ancestral sampling from ``x_T`` where step ``i`` uses explicit noise drawn from ``seed``.

    Two backends run with the same ``x_T`` and ``seed`` see exactly the same noise, so their results differ
    only by floating-point rounding (in-kernel noise, ``noise=None``, is backend-specific).
    """
    g = torch.Generator(device=x_T.device).manual_seed(seed)
    img = x_T.clone()
    t = torch.empty((img.shape[0],), device=img.device, dtype=torch.long)
    for i in reversed(range(diffusion.num_timesteps)):
        t.fill_(i)
        noise = torch.randn(img.shape, generator=g, device=img.device, dtype=img.dtype)
        _p_sample(diffusion, img, t, diffusion.model(img, t), noise, backend, out=img)
    return img


def fused_backends(device, dtype=torch.float32) -> Tuple[List[str], Dict[str, str]]:
    """(fused backends that run here, {fused backend: why not} for the device's other fused backends)."""
    device = torch.device(device)
    names = list(backends.AUTO_ORDER.get(device.type, ()))
    available, missing = [], {}
    for name in names:
        try:
            backends.get_backend(name, device, dtype)
            available.append(name)
        except backends.BackendUnavailableError as exc:
            missing[name] = str(exc)
    return available, missing


def resolved_backend(backend: str, device, dtype=torch.float32) -> str:
    """The backend that actually runs ``p_sample`` for ``backend`` (``auto`` resolved), without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return backends.resolve("p_sample", backend, torch.device(device), dtype)[0]


def _max_step_diff(diffusion: GaussianDiffusion, backend: str, shape, g: torch.Generator) -> float:
    """Max |backend - reference| over one step at every logged t, on inputs and noise drawn from ``g``."""
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
    diffusion: GaussianDiffusion, fused: Sequence[str], num_samples: int = 8, seed: int = 0
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
