"""The Euler-family steps on a sigma table (``euler_step``, ``euler_ancestral_step``): the reference against
independent float64 math and against diffusers' ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``
``step`` on the same inputs and noise, the argument checks, and every fused backend that implements them against
the reference (docs/design.md, "Euler steps")."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
from helpers import DTYPES, assert_matches, backend_params, fused_backend, make_inputs, served_by

diffusers = pytest.importorskip("diffusers")

STEPS = 12
PREDICTIONS = ("epsilon", "v_prediction", "sample")
GPU = torch.cuda.is_available()
BACKENDS = ("cpu", "cuda", "triton")
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if GPU else "cpu"}


def _stock(cls, prediction_type):
    scheduler = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type)
    scheduler.set_timesteps(STEPS)
    return scheduler


def _f64(x):
    return x.detach().cpu().double().numpy()


def _euler64(x, v, s, s_next, prediction_type, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, z=None,
             steps=STEPS):
    """Karras et al.'s Euler step (Algorithm 2) in float64, written from the paper / diffusers' formulas."""
    gamma = np.where((s_tmin <= s) & (s <= s_tmax), min(churn / steps, 2 ** 0.5 - 1), 0.0)
    s_hat = s * (gamma + 1)
    if churn > 0:
        x = x + z * s_noise * np.sqrt(s_hat ** 2 - s ** 2)
    if prediction_type == "epsilon":
        x0 = x - s_hat * v
    elif prediction_type == "sample":
        x0 = v
    else:
        x0 = v * (-s / np.sqrt(s ** 2 + 1)) + x / (s ** 2 + 1)
    return x + (x - x0) / s_hat * (s_next - s_hat), x0


def _ancestral64(x, v, s, s_next, prediction_type, z):
    s_up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    s_down = np.sqrt(s_next ** 2 - s_up ** 2)
    x0 = {"epsilon": lambda: x - s * v, "sample": lambda: v,
          "v_prediction": lambda: v * (-s / np.sqrt(s ** 2 + 1)) + x / (s ** 2 + 1)}[prediction_type]()
    return x + (x - x0) / s * (s_down - s) + z * s_up, x0


def _case(batch=4, seed=0):
    x, v, z = make_inputs((batch, 3, 6, 5), 3, torch.float32, seed=seed)
    sched = _stock(diffusers.EulerDiscreteScheduler, "epsilon")
    index = torch.tensor([0, 3, 7, STEPS - 1])[:batch]
    return x * sched.sigmas[0], v, z, sched.sigmas, index


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_euler_reference_matches_float64(prediction_type, churn):
    x, v, z, sigmas, index = _case()
    s_tmax = float(sigmas[2])  # the first sample (at sigmas[0]) is above it: no churn there
    got, x0 = dk.euler_step(x, v, sigmas, index, prediction_type, noise=z, s_churn=churn, s_tmax=s_tmax,
                            s_noise=1.003, return_pred_x0=True, backend="reference")
    t64 = _f64(sigmas)
    s, s_next = t64[index.numpy()].reshape(-1, 1, 1, 1), t64[index.numpy() + 1].reshape(-1, 1, 1, 1)
    expected, x0_64 = _euler64(_f64(x), _f64(v), s, s_next, prediction_type, churn, 0.0, s_tmax, 1.003, _f64(z))
    scale = np.abs(_f64(x)).max() + np.abs(_f64(v)).max() * t64.max()
    np.testing.assert_allclose(_f64(got), expected, rtol=0, atol=4e-7 * scale)
    np.testing.assert_allclose(_f64(x0), x0_64, rtol=0, atol=4e-7 * scale)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ancestral_reference_matches_float64(prediction_type):
    x, v, z, sigmas, index = _case()
    got, x0 = dk.euler_ancestral_step(x, v, sigmas, index, prediction_type, noise=z, return_pred_x0=True,
                                      backend="reference")
    t64 = _f64(sigmas)
    s, s_next = t64[index.numpy()].reshape(-1, 1, 1, 1), t64[index.numpy() + 1].reshape(-1, 1, 1, 1)
    expected, x0_64 = _ancestral64(_f64(x), _f64(v), s, s_next, prediction_type, _f64(z))
    scale = np.abs(_f64(x)).max() + np.abs(_f64(v)).max() * t64.max()
    np.testing.assert_allclose(_f64(got), expected, rtol=0, atol=4e-7 * scale)
    np.testing.assert_allclose(_f64(x0), x0_64, rtol=0, atol=4e-7 * scale)


@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_the_stock_step(ancestral, prediction_type):
    """Every step of a stock schedule, one sample at a time at the stock scheduler's own step index, with the
    noise the stock step draws from the same generator state: stock's result within float32 rounding."""
    cls = diffusers.EulerAncestralDiscreteScheduler if ancestral else diffusers.EulerDiscreteScheduler
    stock = _stock(cls, prediction_type)
    x, v, _, _, _ = _case(batch=1, seed=3)
    sigmas = stock.sigmas
    churn = {} if ancestral else dict(s_churn=3.0, s_tmin=0.5, s_tmax=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(stock.timesteps):
            g = torch.Generator().manual_seed(i)
            state = g.get_state()
            expected = stock.step(v, t, x, generator=g, **churn).prev_sample
            g.set_state(state)
            gamma_positive = ancestral or (0.5 <= float(sigmas[i]) <= 10.0)
            noise = torch.randn(x.shape, generator=g) if gamma_positive else torch.zeros_like(x)
            step = dk.euler_ancestral_step if ancestral else dk.euler_step
            got = step(x, v, sigmas, torch.tensor([i]), prediction_type, noise=noise, backend="reference", **churn)
            torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6 * float(sigmas[i] + 1))


def test_guided_step_is_the_step_of_the_guided_output():
    x, c, u, sigmas, index = _case()
    for step in (dk.euler_step, dk.euler_ancestral_step):
        got = step(x, torch.cat([u, c]), sigmas, index, noise=u, guidance_scale=5.0, guidance_rescale=0.5,
                   backend="reference")
        mixed = dk.reference.guided_output(c, u, torch.full((4,), 5.0), 0.5, torch.float32)
        torch.testing.assert_close(got, step(x, mixed, sigmas, index, noise=u, backend="reference"),
                                   rtol=1e-6, atol=1e-6)


def test_argument_checks():
    x, v, z, sigmas, index = _case()
    for call, error, message in [
        (lambda: dk.euler_step(x, v, sigmas, index, "score"), ValueError, "prediction_type: expected one of"),
        (lambda: dk.euler_step(x, v, sigmas, index, s_churn=-1.0), ValueError, "s_churn: expected a number in"),
        (lambda: dk.euler_step(x, v, sigmas, index, s_tmax=float("nan")), ValueError, "s_tmax: expected a number"),
        (lambda: dk.euler_step(x, v, sigmas, index, s_noise="1"), TypeError, "s_noise: expected a real number"),
        (lambda: dk.euler_step(x, v, sigmas, torch.tensor([0, 1, 2, STEPS])), ValueError, "step_index: expected values"),
        (lambda: dk.euler_ancestral_step(x, v, sigmas[None], index), ValueError, "sigmas: expected a 1-D table"),
        (lambda: dk.euler_ancestral_step(x, v[:2], sigmas, index), ValueError, "model_output: expected shape"),
        (lambda: dk.euler_ancestral_step(x, v, sigmas, index, guidance_scale=2.0), ValueError, "batched [uncond; cond]"),
        (lambda: dk.euler_ancestral_step(x, v, sigmas, index, backend="npu"), ValueError, "backend: expected one of"),
    ]:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


# ------------------------------------------------------------------------------------ fused vs reference
def _served(backend, op, dtype, opts):
    """Skip unless ``backend`` serves ``op`` with ``opts`` in ``dtype`` itself (no fallback)."""
    fused_backend(backend, DEVICE[backend], op, dtype)
    if served_by(backend, DEVICE[backend], op, dtype, opts) != backend:
        pytest.skip(f"{backend} does not serve these options")


@pytest.mark.parametrize("backend,dtype,op", backend_params(BACKENDS, DTYPES, ["euler_step", "euler_ancestral_step"]))
def test_fused_backends_match_reference(backend, dtype, op):
    device = DEVICE[backend]
    from ddpm_kernels._spec import EulerStepOptions

    _served(backend, op, dtype, EulerStepOptions(op[: -len("_step")]))
    shapes = [(3, 3, 5, 7), (2, 7, 4)] if backend == "triton" and not GPU else [(4, 3, 17, 19), (2, 33, 8), (5, 7)]
    sigmas = _stock(diffusers.EulerDiscreteScheduler, "epsilon").sigmas.to(device)
    for shape, prediction_type, guided in itertools.product(shapes, PREDICTIONS, (False, True)):
        x, v, u, z = make_inputs(shape, 4, dtype, device=device)
        x = x * 3
        index = torch.arange(shape[0], device=device) * 3 % STEPS
        kwargs = dict(sample=x, model_output=v, sigmas=sigmas, step_index=index, prediction_type=prediction_type,
                      noise=z, return_pred_x0=True)
        if op == "euler_step":
            kwargs.update(s_churn=2.0, s_tmin=0.2, s_tmax=5.0)
        if guided:
            kwargs.update(uncond=u, guidance_scale=torch.linspace(0, 7, shape[0], device=device))
        fn = getattr(dk, op)
        assert_matches(fn(**kwargs, backend=backend), lambda **kw: fn(**kw, backend="reference"), (), kwargs, dtype,
                       bf16_truncates=backend == "triton" and not GPU)
