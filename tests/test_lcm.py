"""LCM's coefficient table (``ddpm_kernels.solvers.lcm``): each row against float64 math written from the
method's definition (x0 from the prediction, the boundary condition c_skip / c_out, the noise to the next
timestep), `solver_step` on it against that math with clipping, thresholding and noise, and the argument checks.
See docs/design.md, "Multistep solvers", "LCM"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_kernels.solvers import SolverColumns, solver_step
from ddpm_kernels.solvers.lcm import lcm_coefficients

SHAPE = (3, 2, 5, 7)
TIMESTEPS = np.array([999, 759, 499, 259, 19])


def alphas_cumprod(n=1000):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2
    return np.cumprod(1 - betas)


def lcm64(x, y, z, abar, abar_next, t, prediction, scaling, clip=None, threshold=None, last=False):
    """One LCM step in float64 from its definition; returns (x', denoised)."""
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x0 = {"epsilon": (x - s * y) / a, "sample": y, "v_prediction": a * x - s * y}[prediction]
    if threshold is not None:
        flat = x0.reshape(x0.shape[0], -1)
        q = np.clip(np.quantile(np.abs(flat), threshold[0], axis=1), 1.0, threshold[1])[:, None]
        x0 = (np.clip(flat, -q, q) / q).reshape(x0.shape)
    elif clip is not None:
        x0 = np.clip(x0, -clip, clip)
    T = t * scaling
    c_skip, c_out = 0.25 / (T**2 + 0.25), T / np.sqrt(T**2 + 0.25)
    denoised = c_out * x0 + c_skip * x
    if last:
        return denoised, denoised
    return np.sqrt(abar_next) * denoised + np.sqrt(1 - abar_next) * z, denoised


@pytest.mark.parametrize("scaling", [10.0, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("options", [{}, dict(clip_range=1.0), dict(threshold_ratio=0.9, threshold_max=1.5)],
                         ids=["plain", "clip", "threshold"])
def test_steps_match_float64_math(prediction, scaling, options):
    acp = alphas_cumprod()
    table = torch.from_numpy(lcm_coefficients(acp, TIMESTEPS, prediction_type=prediction, timestep_scaling=scaling))
    assert table.shape == (len(TIMESTEPS), SolverColumns(0).width)
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    clip = options.get("clip_range")
    threshold = (options["threshold_ratio"], options["threshold_max"]) if "threshold_ratio" in options else None
    for i, t in enumerate(TIMESTEPS):
        final = i == len(TIMESTEPS) - 1
        abar_next = acp[TIMESTEPS[i + 1]] if not final else acp[t]
        expected, expected_denoised = lcm64(x.numpy(), y.numpy(), z.numpy(), acp[t], abar_next, t, prediction,
                                            scaling, clip, threshold, last=final)
        denoised = torch.empty_like(x)
        got = solver_step(x, y, table, torch.full((SHAPE[0],), i), None, denoised, z, backend="reference", **options)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(denoised.numpy(), expected_denoised, rtol=1e-12, atol=1e-12)


def test_the_last_row_has_no_noise_and_num_inference_steps_picks_it():
    acp = alphas_cumprod()
    col = SolverColumns(0)
    table = lcm_coefficients(acp, TIMESTEPS)
    assert table[-1, col.p_noise] == 0 and table[-1, col.p_xc] == 1
    assert (table[:-1, col.p_noise] > 0).all()
    early = lcm_coefficients(acp, TIMESTEPS, num_inference_steps=2)
    assert early[1, col.p_noise] == 0 and early[-1, col.p_noise] > 0  # the stock rule: step num_inference_steps - 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(timesteps=np.array([1000])), "timesteps"),
    (dict(timesteps=np.array([1.5])), "timesteps"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(alphas_cumprod=np.ones((2, 2))), "alphas_cumprod"),
])
def test_argument_checks(kwargs, message):
    args = dict(alphas_cumprod=alphas_cumprod(), timesteps=TIMESTEPS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lcm_coefficients(args.pop("alphas_cumprod"), args.pop("timesteps"), **args)
