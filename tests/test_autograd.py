"""Gradients of the differentiable ops (the seed's training path) in float64, through the public API."""

import pytest
import torch

import ddpm_kernels as dk

T = 100
S = dk.DiffusionSchedule("cosine", timesteps=T)


def _inputs(shape=(3, 2, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 37, T - 1])[: shape[0]]
    return t, [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_q_sample_gradcheck(backend):
    t, (x0, eps, _) = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: dk.q_sample(a, t, b, S, backend=backend), (x0, eps))
    assert torch.autograd.gradgradcheck(lambda a, b: dk.q_sample(a, t, b, S, backend=backend), (x0, eps))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_diffusion_loss_gradcheck(backend, parameterization, loss_type):
    t, (mo, x0, eps) = _inputs(seed=1)

    def f(model_output, x_start, noise):
        return dk.diffusion_loss(model_output, x_start, noise, t, S, parameterization, loss_type, 0.8, 0.25,
                                 backend=backend)

    assert torch.autograd.gradcheck(f, (mo, x0, eps))


def test_training_step_gradient_flows_to_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    x0 = torch.randn(4, 2, 6, 6)
    t = torch.tensor([0, 3, 50, 99])
    noise = torch.randn_like(x0)
    x_t = dk.q_sample(x0, t, noise, S)
    loss, _, _ = dk.diffusion_loss(net(x_t), x0, noise, t, S)
    loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all() and net.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss", ["diffusion_loss", "flow_loss"])
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton") if b in dk.available_backends("cpu")])
def test_bf16_gradients_of_a_float64_promoted_loss(backend, loss):
    # bf16 model output (and x_start / x0) with float64 noise: the loss runs in float64, and each gradient comes back
    # in bf16 rounded from the float64 one (not the bits of a float64 -> bf16 truncation)
    g = torch.Generator().manual_seed(0)
    mo, x, z = (torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 7, 19])
    s = dk.DiffusionSchedule("linear", timesteps=20)

    def grads(mo, x, z):
        # (the fused flow loss differentiates the model output only: an x0 needing grad would run the reference)
        leaves = [mo.clone().requires_grad_(), x.clone().requires_grad_(loss == "diffusion_loss")]
        if loss == "diffusion_loss":
            value = dk.diffusion_loss(leaves[0], leaves[1], z, t, s, "x0", backend=backend)[0]
        else:
            value = dk.flow_loss(leaves[0], leaves[1], z, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
                                 backend=backend)
        return value, torch.autograd.grad(value, [a for a in leaves if a.requires_grad])

    value, got = grads(mo.bfloat16(), x.bfloat16(), z)
    value64, want = grads(mo.bfloat16().double(), x.bfloat16().double(), z)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, value64)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16 and b.abs().max() > 0.01
        torch.testing.assert_close(a.double(), b.bfloat16().double(), rtol=2 ** -7, atol=1e-6)
