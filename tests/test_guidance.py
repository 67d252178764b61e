"""Classifier-free guidance as an option of every sampler step (``ddim_step``, ``ddpm_step``; ``flow_step`` in
tests/test_flow.py): ``u + w (c - u)`` with a per-sample ``w``, optionally std-rescaled as diffusers'
``rescale_noise_cfg`` — the reference against float64 math written the diffusers way (CFG on the model output,
then the stock step), the argument forms, and every fused backend that serves a guided step against the
reference."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
import fp64_math
import fp64_sampler_math as m
from ddpm_kernels import backends
from ddpm_kernels._spec import OPS, step_options
from helpers import DTYPES, assert_matches, make_inputs

T = 100
S = dk.DiffusionSchedule("linear", timesteps=T)
ABAR = np.cumprod(1 - fp64_math.betas("linear", T))  # independent float64 betas, as tests/test_sampler_ops.py
GPU = torch.cuda.is_available()


def _f64(x):
    return x.detach().cpu().double().numpy()


def _cfg64(c, u, w, rescale):
    """diffusers' pipelines: noise_pred = u + w (c - u), then rescale_noise_cfg(noise_pred, c, rescale)."""
    c, u = _f64(c), _f64(u)
    w = np.asarray(w, dtype=np.float64).reshape((-1,) + (1,) * (c.ndim - 1))
    g = u + w * (c - u)
    if rescale > 0:
        axes = tuple(range(1, c.ndim))
        g = rescale * g * (c.std(axis=axes, ddof=1, keepdims=True) / g.std(axis=axes, ddof=1, keepdims=True)) \
            + (1 - rescale) * g
    return g


def _args(shape=(4, 3, 6, 5), seed=0):
    x, c, u, z = make_inputs(shape, 4, torch.float32, seed=seed)
    t = torch.tensor([0, 1, 57, T - 1])[: shape[0]]
    return x, c, u, z, t, (t - 1).clamp(min=-1)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_reference_matches_cfg_then_step_in_float64(op, rescale):
    x, c, u, z, t, tp = _args()
    w = np.array([1.0, 2.5, 7.5, 0.0])
    got = getattr(dk, op)(x, t, tp, c, S, noise=z, guidance_scale=torch.tensor(w, dtype=torch.float32),
                          uncond=u, guidance_rescale=rescale, backend="reference",
                          **({"eta": 0.5} if op == "ddim_step" else {}))
    g = _cfg64(c, u, w, rescale)
    if op == "ddim_step":
        expected = m.ddim_step(ABAR, _f64(x), t.numpy(), tp.numpy(), g, _f64(z), 0.5, "eps", False)[0]
    else:
        expected = m.ddpm_step(ABAR, _f64(x), t.numpy(), tp.numpy(), g, _f64(z), "eps", "fixed_small", True)[0]
    np.testing.assert_allclose(_f64(got), expected, rtol=2e-5, atol=2e-5)


def test_forms_of_the_guided_output():
    """Batched [uncond; cond] equals two tensors; a number equals a per-sample tensor; w = 1 is the conditional
    step; a learned variance comes from the conditional output's variance channels."""
    x, c, u, z, t, tp = _args()
    two = dk.ddim_step(x, t, tp, c, S, guidance_scale=4.0, uncond=u, backend="reference")
    torch.testing.assert_close(dk.ddim_step(x, t, tp, torch.cat([u, c]), S, guidance_scale=4.0, backend="reference"),
                               two, rtol=0, atol=0)
    torch.testing.assert_close(
        dk.ddim_step(x, t, tp, c, S, guidance_scale=torch.full((4,), 4.0), uncond=u, backend="reference"),
        two, rtol=0, atol=0)
    torch.testing.assert_close(dk.ddim_step(x, t, tp, c, S, guidance_scale=1.0, uncond=u, backend="reference"),
                               dk.ddim_step(x, t, tp, c, S, backend="reference"), rtol=1e-6, atol=1e-6)
    cv, uv = torch.cat([c, torch.randn_like(c)], 1), torch.cat([u, torch.randn_like(u)], 1)
    got = dk.ddpm_step(x, t, tp, cv, S, variance_type="learned_range", noise=z, guidance_scale=3.0, uncond=uv,
                       backend="reference")
    mixed = torch.cat([u + 3.0 * (c - u), cv[:, 3:]], 1)
    expected = dk.ddpm_step(x, t, tp, mixed, S, variance_type="learned_range", noise=z, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_guidance_argument_checks():
    x, c, u, z, t, tp = _args()
    for call, error, message in [
        (lambda: dk.ddim_step(x, t, tp, c, S, guidance_scale=2.0), ValueError, "batched [uncond; cond]"),
        (lambda: dk.ddim_step(x, t, tp, c, S, uncond=u), ValueError, "uncond: given without"),
        (lambda: dk.ddpm_step(x, t, tp, c, S, guidance_scale=2.0, uncond=u[:, :2]), ValueError, "uncond: expected shape"),
        (lambda: dk.ddim_step(x, t, tp, c, S, guidance_scale=2.0, uncond=u.int()), TypeError, "uncond: expected a floating"),
        (lambda: dk.ddim_step(x, t, tp, c, S, guidance_scale=torch.ones(2), uncond=u), ValueError,
         "guidance_scale: expected shape (4,)"),
        (lambda: dk.ddim_step(x, t, tp, c, S, guidance_scale="7", uncond=u), TypeError, "guidance_scale: expected a number"),
        (lambda: dk.ddim_step(x, t, tp, c, S, guidance_scale=2.0, uncond=u, guidance_rescale=-0.1), ValueError,
         "guidance_rescale: expected a number in [0.0, 1.0]"),
    ]:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


def _fused(device):
    return [b for b in ("cpu", "cuda", "triton") if b in dk.available_backends(device)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_fused_backends_match_reference(op, rescale, dtype):
    """Every fused backend that serves the guided step itself, against the reference; a backend that declines it
    is skipped with its reason (the dispatcher then runs the reference, with one warning)."""
    device = "cuda" if GPU else "cpu"
    ran = []
    for backend in _fused(device):
        opts = step_options(OPS[op], tuple(o.default for o in OPS[op].options))
        opts = dataclasses.replace(opts, guided=True, guidance_rescale=rescale,
                                   **({"eta": 0.5} if op == "ddim_step" else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served, _ = backends.resolve(op, backend, torch.device(device), dtype, opts, None)
        if served != backend:
            continue
        shape = (4, 3, 5, 7) if backend == "triton" and not GPU else (4, 3, 17, 19)
        x, c, u, z = make_inputs(shape, 4, dtype, device=device)
        t = torch.tensor([0, 1, 57, T - 1], device=device)
        kwargs = dict(x_t=x, t=t, t_prev=(t - 1).clamp(min=-1), model_output=torch.cat([u, c]), schedule=S.to(device),
                      noise=z, guidance_scale=torch.tensor([1.0, 2.5, 7.5, 0.0], device=device),
                      guidance_rescale=rescale, **({"eta": 0.5} if op == "ddim_step" else {}))
        got = getattr(dk, op)(**kwargs, backend=backend)
        assert_matches(got, lambda **kw: getattr(dk, op)(**kw, backend="reference"), (), kwargs, dtype,
                       bf16_truncates=backend == "triton" and not GPU)
        ran.append(backend)
    if not ran:
        pytest.skip("no fused backend serves a guided sampler step here")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
@pytest.mark.parametrize("backend", ["reference"] + _fused("cpu"))
def test_a_float64_promotion_takes_its_guidance_scale_in_float64(op, backend):
    """float32 data with a float64 model output promotes to float64: the guidance scale (a number) is taken in
    float64 too, so the call equals the all-float64 one exactly (a float32 scale is 1e-8 off for 7.3)."""
    x, c, u, z, t, t_prev = _args((4, 3, 5, 7))
    c64, u64 = c.double(), u.double()
    kwargs = dict(t=t, t_prev=t_prev, schedule=S, guidance_scale=7.3, uncond=u64, backend=backend)
    mixed = getattr(dk, op)(x, model_output=c64, noise=z.double(), **kwargs)
    full = getattr(dk, op)(x.double(), model_output=c64, noise=z.double(), **kwargs)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, full, rtol=0, atol=0)
