"""Parity with real diffusers: p_sample == DDPMScheduler.step, q_sample == add_noise, same noise."""

import pytest
import torch

import ddpm_kernels as dk

diffusers = pytest.importorskip("diffusers")

PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
T = 1000


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", list(PREDICTION))
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log"])
def test_p_sample_equals_ddpm_scheduler_step(beta_schedule, prediction_type, clip_sample, variance_type):
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        beta_start=1e-4,
        beta_end=2e-2,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        variance_type=variance_type,
    )
    s = dk.DiffusionSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 9, 11)
    for step in (T - 1, 731, 250, 1, 0):
        sample = torch.randn(shape, generator=g)
        model_output = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        expected = sched.step(
            model_output, step, sample, generator=torch.Generator().manual_seed(step)
        ).prev_sample
        args = (torch.full((2,), step, dtype=torch.long),)
        rest = (s, PREDICTION[prediction_type], clip_sample)
        got = dk.p_sample(sample, *args, model_output, *rest, noise=noise, backend="reference")
        exact = dk.p_sample(sample.double(), *args, model_output.double(), *rest, noise=noise.double())
        # diffusers computes in float32 in its own operation order; at t = 1 its `1 - ab_t / ab_{t-1}` cancels
        # (beta_1 ~ 1e-4 from two numbers near 1), costing it ~1e-4 absolute. The two must agree up to
        # diffusers' own error against float64 math, and ours must be the closer of the two.
        diffusers_err = (expected.double() - exact).abs().max().item()
        ours_err = (got.double() - exact).abs().max().item()
        assert ours_err <= max(diffusers_err, 1e-6 * s.sqrt_recip_alphas_cumprod[step].item())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2 * diffusers_err + 1e-6)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_sample_equals_add_noise(beta_schedule, dtype):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=2e-2)
    s = dk.DiffusionSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(5, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 500, 998, 999])
    expected = sched.add_noise(x0, noise, t)
    got = dk.q_sample(x0, t, noise, s, backend="reference")
    # diffusers builds alphas_cumprod by a float32 cumprod and takes (1 - ab) ** 0.5 in float32, where 1 - ab
    # cancels near t = 0 (~1e-5 absolute); ours is built in float64.
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_v_target_equals_get_velocity():
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2)
    s = dk.DiffusionSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(dk.get_v(x0, noise, t, s), sched.get_velocity(x0, noise, t), rtol=2e-5, atol=2e-5)
