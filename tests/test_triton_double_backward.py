"""Gradients of gradients through the Triton ops, in float64 (docs/design.md, "Dispatch and fallbacks"): the
backward operators of the pair ops (q_sample ...), q_posterior, flow_interpolate, diffusion_loss and flow_loss
have autograd of their own. ``torch.autograd.gradgradcheck`` checks them against finite differences, and the
second-order gradients (w.r.t. the inputs and the incoming gradients) are compared with the reference's
autograd on the same inputs. Without the registration the double backward raises (a custom operator with no
autograd kernel), so each test fails there.

Shapes are small: gradgradcheck perturbs every element of every input of the backward, one interpreted launch
each on CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ddpm_kernels as dk
from helpers import triton_device

DEVICE = triton_device()
T = 50
S = dk.DiffusionSchedule("cosine", timesteps=T).to(DEVICE)
SHAPE = (2, 2, 1)
TOL = dict(rtol=1e-10, atol=1e-12)


def _leaves(n, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(n)]


def _t():
    return torch.tensor([3, T - 1], device=DEVICE)


def _strict(fn):
    """``fn`` with a fallback to the reference an error: the Triton kernels must serve every call."""

    def call(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            return fn(*args)

    return call


def _second_order(fn, leaves, seed=1):
    """The gradient w.r.t. ``leaves`` and a random upstream gradient of ``<cot, d<fn(leaves), w>/d leaves>``:
    second-order gradients w.r.t. the inputs and the incoming gradient."""
    g = torch.Generator().manual_seed(seed)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ws = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(DEVICE).requires_grad_() for o in outs]
    grads = torch.autograd.grad(outs, leaves, ws, create_graph=True, allow_unused=True)
    cots = [torch.randn(x.shape, generator=g, dtype=x.dtype).to(DEVICE) for x in leaves]
    inner = sum((c * gr).sum() for c, gr in zip(cots, grads) if gr is not None)
    return torch.autograd.grad(inner, leaves + ws, allow_unused=True)


def _check(make, leaves):
    """gradgradcheck of the Triton call, and its second-order gradients equal the reference's."""
    triton_fn = _strict(make("triton"))
    assert torch.autograd.gradgradcheck(triton_fn, leaves)
    got = _second_order(triton_fn, leaves)
    want = _second_order(make("reference"), leaves)
    for g, w in zip(got, want, strict=True):
        if w is None or g is None:
            assert (g is None or not bool(g.any())) and (w is None or not bool(w.any()))
        else:
            torch.testing.assert_close(g, w, **TOL)


PAIRS = {
    "q_sample": lambda b: lambda x, y: dk.q_sample(x, _t(), y, S, backend=b),
    "predict_start_from_noise": lambda b: lambda x, y: dk.predict_start_from_noise(x, _t(), y, S, backend=b),
    "predict_noise_from_start": lambda b: lambda x, y: dk.predict_noise_from_start(x, _t(), y, S, backend=b),
    "get_v": lambda b: lambda x, y: dk.get_v(x, y, _t(), S, backend=b),
    "predict_start_from_z_and_v": lambda b: lambda x, y: dk.predict_start_from_z_and_v(x, _t(), y, S, backend=b),
    "predict_eps_from_z_and_v": lambda b: lambda x, y: dk.predict_eps_from_z_and_v(x, _t(), y, S, backend=b),
    "q_posterior": lambda b: lambda x, y: dk.q_posterior(x, y, _t(), S, backend=b)[0],
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_double_backward(name):
    _check(PAIRS[name], _leaves(2))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_diffusion_loss_double_backward(parameterization, loss_type):
    def make(backend):
        def f(mo, x, z):
            return dk.diffusion_loss(mo, x, z, _t(), S, parameterization, loss_type, 0.8, 0.25, backend=backend)

        return f

    _check(make, _leaves(3, seed=2))


def test_diffusion_loss_double_backward_of_model_output_alone():
    """The common case (a gradient penalty on the model output): x_start and noise do not require grad."""
    mo, = _leaves(1, seed=3)
    x, z = (a.detach() for a in _leaves(2, seed=4))

    def make(backend):
        return lambda mo: dk.diffusion_loss(mo, x, z, _t(), S, "v", "l2", 1.0, 0.5, backend=backend)

    _check(make, [mo])


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_flow_interpolate_double_backward(per_token):
    sigma = (torch.tensor([0.3, 0.8], dtype=torch.float64, device=DEVICE) if not per_token
             else torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE))

    def make(backend):
        return lambda x, z: dk.flow_interpolate(x, z, sigma if not per_token else sigma.reshape(2, 3, 1),
                                                backend=backend)

    _check(make, _leaves(2, seed=6, shape=(2, 3, 1) if per_token else SHAPE))


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_flow_loss_double_backward(weighting, loss_type):
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64, device=DEVICE)

    def make(backend):
        return lambda mo, x, z: dk.flow_loss(mo, x, z, sigma, weighting, loss_type, backend=backend)

    _check(make, _leaves(3, seed=7))
