"""FlowMatching: the training loss against the SD3 / Flux training scripts' code, the sampling loop against
hand-written Euler loops (and diffusers' stock scheduler), guidance against CFG done by hand, and a toy
distribution learnt end to end."""

import math
import warnings

import pytest
import torch
from torch import nn

import ddpm_kernels as dk
from ddpm_kernels.flow_matching import timestep_density


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # Where no fused flow kernel exists yet the public ops run the reference with a one-time warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class TinyVelocity(nn.Module):
    """A per-pixel velocity model for (B, C, H, W) images, dependent on t (and a class label when given)."""

    def __init__(self, channels=2, classes=0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.t_proj = nn.Linear(1, channels)
        self.label = nn.Embedding(classes, channels) if classes else None
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.data_ptr(), t.detach().clone(), None if cond is None else cond.clone()))
        h = self.conv(x) + self.t_proj(t.float()[:, None] / 1000)[:, :, None, None]
        if cond is not None:
            h = h + self.label(cond)[:, :, None, None]
        return torch.tanh(h)


def _diffusers():
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    return FlowMatchEulerDiscreteScheduler, compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("timestep_sampling, weighting, shift", [
    ("logit_normal", "none", 1.0),
    ("logit_normal", "cosmap", 3.0),
    ("mode", "sigma_sqrt", 1.0),
    ("uniform", "none", 3.0),
])
def test_training_loss_equals_sd3_script(timestep_sampling, weighting, shift):
    """The loss, the sigmas, the model's inputs and the gradients equal those of the SD3 training script's code
    (diffusers' examples/dreambooth/train_dreambooth_sd3.py) on the same generator draws."""
    Scheduler, density, loss_weighting = _diffusers()
    T, B = 1000, 6
    x0 = torch.randn(B, 2, 5, 7, generator=torch.Generator().manual_seed(1))
    model = TinyVelocity()
    fm = dk.FlowMatching(model, timestep_sampling=timestep_sampling, logit_mean=0.3, logit_std=1.2,
                         weighting=weighting, shift=shift, num_train_timesteps=T)
    loss, loss_dict = fm.training_loss(x0, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    got_x, got_t = model.calls[-1][0], model.calls[-1][1]

    # the script, written out
    scheduler = Scheduler(num_train_timesteps=T, shift=shift)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    u = density(weighting_scheme=timestep_sampling, batch_size=B, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                generator=g)
    indices = (u * T).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(B, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    model.calls.clear()
    pred = model(noisy, timesteps)
    w = loss_weighting(weighting_scheme=weighting, sigmas=sigmas)
    target = noise - x0
    expected = torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1).mean()
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))

    torch.testing.assert_close(got_t, timesteps, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert loss_dict["train/loss"] is loss
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_loss_given_sigma_and_noise_is_the_formula():
    model = TinyVelocity()
    fm = dk.FlowMatching(model, weighting="cosmap")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9, 1.0])
    loss, _ = fm.training_loss(x0, noise, sigma)
    s = sigma.reshape(4, 1, 1, 1)
    pred = model(((1 - s) * x0 + s * noise), sigma * 1000)
    w = 2 / (math.pi * (1 - 2 * s + 2 * s * s))
    expected = (w * (pred - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    fm.eval()
    assert set(fm.training_loss(x0, noise, sigma)[1]) == {"val/loss"}


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_timestep_density_matches_diffusers(scheme):
    _, density, _ = _diffusers()
    got = timestep_density(scheme, 64, 0.2, 0.8, 1.29, generator=torch.Generator().manual_seed(3))
    want = density(scheme, 64, logit_mean=0.2, logit_std=0.8, mode_scale=1.29,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert ((got >= 0) & (got <= 1)).all()


def test_train_sigmas_are_the_schedulers():
    Scheduler, _, _ = _diffusers()
    for shift in (1.0, 3.0):
        fm = dk.FlowMatching(TinyVelocity(), shift=shift, num_train_timesteps=1000)
        torch.testing.assert_close(fm.train_sigmas, Scheduler(num_train_timesteps=1000, shift=shift).sigmas,
                                   rtol=1e-6, atol=1e-7)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timestep_sampling"):
        dk.FlowMatching(TinyVelocity(), timestep_sampling="cosine")
    with pytest.raises(ValueError, match="weighting"):
        dk.FlowMatching(TinyVelocity(), weighting="snr")
    with pytest.raises(ValueError, match="shift"):
        dk.FlowMatching(TinyVelocity(), shift=0.0)
    with pytest.raises(TypeError, match="model"):
        dk.FlowMatching(3)
    fm = dk.FlowMatching(TinyVelocity(classes=3), image_size=(4, 4), channels=2)
    with pytest.raises(ValueError, match="uncond"):
        fm.sample(2, num_steps=2, guidance_scale=2.0, cond=torch.tensor([0, 1]), progress=False)


# ------------------------------------------------------------------------------------------------ sampling
def test_sigma_table():
    s = dk.flow_sigmas(4)
    assert s.dtype == torch.float32 and s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = dk.flow_sigmas(4, shift=3.0)
    base = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, (3 * base / (1 + 2 * base)).float())
    assert shifted[0] == 1 and shifted[-1] == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_loop_equals_hand_written_euler(shift):
    model = TinyVelocity()
    fm = dk.FlowMatching(model, shift=shift, image_size=(5, 6), channels=2).eval()
    n, B = 7, 3
    out, intermediates = fm.sample(B, num_steps=n, generator=torch.Generator().manual_seed(0),
                                   return_intermediates=True, progress=False)
    ptrs = {c[0] for c in model.calls}
    model_ts = [c[1] for c in model.calls]
    assert len(model.calls) == n
    assert ptrs == {out.data_ptr()}  # every step reads and writes the one buffer

    x = torch.randn((B, 2, 5, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(intermediates[0], x)
    base = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    sigmas = (shift * base / (1 + (shift - 1) * base)).float()
    with torch.no_grad():
        for i in range(n):
            t = torch.full((B,), float(sigmas[i]) * 1000)
            torch.testing.assert_close(model_ts[i], t)
            x = x + (sigmas[i + 1] - sigmas[i]) * model(x, t)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)
    assert len(intermediates) == len(fm.logged_steps(n))
    torch.testing.assert_close(intermediates[-1], out)


def test_sample_loop_on_the_stock_schedulers_table_equals_its_steps():
    """Given diffusers' inference sigmas, the loop is ``FlowMatchEulerDiscreteScheduler``'s own loop."""
    Scheduler, _, _ = _diffusers()
    scheduler = Scheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(6)
    model = TinyVelocity()
    fm = dk.FlowMatching(model, shift=3.0)
    x_init = torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(5))
    got = fm.sample_loop(x_init.shape, sigmas=scheduler.sigmas, x_init=x_init, progress=False)
    x = x_init.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, x_init)


@pytest.mark.parametrize("per_sample", [False, True])
def test_guidance_matches_manual_cfg_then_step(per_sample):
    model = TinyVelocity(classes=4)
    fm = dk.FlowMatching(model, shift=2.0, image_size=(4, 5), channels=2)
    B, n = 3, 5
    cond, uncond = torch.tensor([0, 1, 2]), torch.full((3,), 3)
    w = torch.tensor([1.0, 3.5, 7.0]) if per_sample else 4.0
    got = fm.sample(B, num_steps=n, guidance_scale=w, cond=cond, uncond=uncond,
                    generator=torch.Generator().manual_seed(2), progress=False)
    assert all(c[1].shape == (2 * B,) and torch.equal(c[2], torch.cat([uncond, cond])) for c in model.calls)

    x = torch.randn((B, 2, 4, 5), generator=torch.Generator().manual_seed(2))
    sigmas = fm.sigma_table(n)
    scale = (w if per_sample else torch.full((B,), w)).reshape(B, 1, 1, 1)
    with torch.no_grad():
        for i in range(n):
            t = torch.full((2 * B,), float(sigmas[i]) * 1000)
            u, c = model(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (u + scale * (c - u))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)

    # conditional sampling without guidance calls the model on the conditional batch only
    model.calls.clear()
    plain = fm.sample(B, num_steps=n, cond=cond, generator=torch.Generator().manual_seed(2), progress=False)
    assert all(c[1].shape == (B,) and torch.equal(c[2], cond) for c in model.calls)
    assert (plain - got).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- learns a toy
class MLPVelocity(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None] / 1000], dim=1))


def _two_moons_of_gaussians(n, g):
    """A 2-D mixture: two tight Gaussians at (-2, 0) and (2, 0)."""
    side = torch.randint(0, 2, (n,), generator=g).float() * 4 - 2
    return torch.stack([side, torch.zeros(n)], 1) + 0.2 * torch.randn(n, 2, generator=g)


def _near_modes(x):
    d = torch.stack([(x - torch.tensor([-2.0, 0.0])).norm(dim=1), (x - torch.tensor([2.0, 0.0])).norm(dim=1)], 1)
    near = d.min(dim=1).values < 0.8
    return near.float().mean().item(), (x[near][:, 0] > 0).float().mean().item() if near.any() else 0.0


def test_learns_a_2d_toy_distribution():
    torch.manual_seed(0)
    fm = dk.FlowMatching(MLPVelocity(), timestep_sampling="uniform")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(fm.model.parameters(), lr=3e-3)
    before_fraction, _ = _near_modes(fm.sample_loop((400, 2), num_steps=20, generator=torch.Generator().manual_seed(1),
                                                    progress=False))
    losses = []
    for _ in range(600):
        loss, _ = fm.training_loss(_two_moons_of_gaussians(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.75 * first, (first, last)
    x = fm.sample_loop((400, 2), num_steps=20, generator=torch.Generator().manual_seed(1), progress=False)
    fraction, right = _near_modes(x)
    assert before_fraction < 0.3
    assert fraction > 0.8, fraction
    assert 0.3 < right < 0.7, right  # both modes, not one
