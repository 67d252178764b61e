"""GaussianDiffusion end to end with a tiny model, against the seed's DDPM semantics."""

import pytest
import torch
from torch import nn

import ddpm_kernels as dk
import fp64_math as m
from helpers import np64


class TinyEps(nn.Module):
    def __init__(self, channels=2):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, tt], dim=1))


def make(parameterization="eps", T=20, **kw):
    torch.manual_seed(0)
    s = dk.DiffusionSchedule("linear", timesteps=T, linear_start=1e-3, linear_end=0.2)
    return dk.GaussianDiffusion(TinyEps(), s, parameterization=parameterization, image_size=8, channels=2, **kw)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_p_losses_matches_seed(parameterization, loss_type):
    d = make(parameterization, loss_type=loss_type, l_simple_weight=0.5, original_elbo_weight=0.1)
    x0 = torch.randn(3, 2, 8, 8)
    t = torch.tensor([0, 7, 19])
    noise = torch.randn_like(x0)
    loss, logs = d.p_losses(x0, t, noise=noise)
    assert set(logs) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    # the seed: model on q_sample(x0), loss against the parameterization's target, mean over C,H,W
    tb = m.Tables(d.schedule.betas.double().numpy())
    x_noisy = dk.q_sample(x0, t, noise, d.schedule)
    out = d.model(x_noisy, t)
    expected = m.diffusion_loss(tb, np64(out), np64(x0), np64(noise), t.numpy(), parameterization, loss_type, 0.5, 0.1)
    for got, e in zip((loss, logs["train/loss_simple"], logs["train/loss_vlb"]), expected):
        assert abs(got.item() - e) <= 1e-5 * abs(e) + 1e-7
    loss.backward()
    assert d.model.conv.weight.grad is not None
    d.eval()
    _, logs = d.p_losses(x0, t, noise=noise)
    assert set(logs) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_forward_draws_timesteps():
    d = make()
    loss, logs = d(torch.randn(5, 2, 8, 8))
    assert loss.shape == () and torch.isfinite(loss)


def test_p_sample_equals_functional_with_same_generator_state():
    d = make().eval()
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([5, 0])
    a = d.p_sample(x, t, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mo = d.model(x, t)
    b = dk.p_sample(x, t, mo, d.schedule, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_p_sample_loop_and_intermediates(parameterization):
    d = make(parameterization, T=20, log_every_t=6)
    img, inter = d.p_sample_loop((2, 2, 8, 8), return_intermediates=True, generator=torch.Generator().manual_seed(0),
                                 progress=False)
    assert img.shape == (2, 2, 8, 8) and torch.isfinite(img).all()
    # initial noise, the first step (t = T-1), then every t with t % log_every_t == 0 (18, 12, 6, 0)
    assert len(inter) == 1 + 1 + 4
    torch.testing.assert_close(inter[-1], img, rtol=0, atol=0)
    # the starting noise is the noise stream's (docs/design.md, "Noise streams")
    start = dk.randn_stream((2, 2, 8, 8), torch.Generator().manual_seed(0), backend=d.backend)
    torch.testing.assert_close(inter[0], start, rtol=0, atol=0)


def test_p_sample_loop_equals_manual_loop():
    """The loop is the seed's: x_T ~ N(0, I) (the noise stream's, `randn_stream`), then p_sample for
    t = T-1 ... 0 with one generator."""
    d = make(T=10)
    g = torch.Generator().manual_seed(3)
    got = d.p_sample_loop((2, 2, 8, 8), generator=g, progress=False)
    g = torch.Generator().manual_seed(3)
    x = dk.randn_stream((2, 2, 8, 8), g)
    for i in reversed(range(10)):
        t = torch.full((2,), i, dtype=torch.long)
        with torch.no_grad():
            x = dk.p_sample(x, t, d.model(x, t), d.schedule, generator=g)
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_sample_uses_image_size_and_channels():
    d = make(T=5)
    out = d.sample(batch_size=3, progress=False)
    assert out.shape == (3, 2, 8, 8)


def test_module_moves_schedule_with_model():
    d = make()
    d.to(torch.float64)
    assert d.schedule.coefficients.dtype == torch.float32
    assert d.device == torch.device("cpu")
    assert "schedule.betas" in d.state_dict()


def test_constructor_validates():
    with pytest.raises(ValueError, match="parameterization"):
        make("score")
    with pytest.raises(ValueError, match="loss_type"):
        make(loss_type="huber")
    with pytest.raises(ValueError, match="backend"):
        make(backend="tpu")
    with pytest.raises(TypeError, match="schedule"):
        dk.GaussianDiffusion(TinyEps(), schedule="linear")
