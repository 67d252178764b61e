"""DiffusionSchedule: beta schedules and tables against independent float64 math, module behaviour."""

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
import fp64_math as m
from ddpm_kernels.schedule import TABLE_NAMES


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt_linear", "sqrt"])
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_betas_match_formula(name, T):
    got = dk.make_beta_schedule(name, T)
    assert got.dtype == np.float64 and got.shape == (T,)
    np.testing.assert_allclose(got, m.betas(name, T), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("alias,name", [("scaled_linear", "linear"), ("squaredcos_cap_v2", "cosine")])
def test_diffusers_aliases(alias, name):
    a, b = dk.DiffusionSchedule(alias, timesteps=100), dk.DiffusionSchedule(name, timesteps=100)
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=0, atol=0)


def test_linear_endpoints():
    s = dk.DiffusionSchedule("linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2)
    assert s.num_timesteps == 1000
    assert abs(float(s.betas[0]) - 1e-4) < 1e-10 and abs(float(s.betas[-1]) - 2e-2) < 1e-9


@pytest.mark.parametrize("v_posterior", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt_linear", "sqrt"])
def test_tables_match_fp64_math(name, v_posterior):
    T = 1000
    s = dk.DiffusionSchedule(name, timesteps=T, v_posterior=v_posterior)
    tb = m.Tables(m.betas(name, T), v_posterior)
    alphas = 1 - tb.b
    with np.errstate(divide="ignore"):
        expected = {
            "betas": tb.b,
            "alphas_cumprod": tb.abar,
            "alphas_cumprod_prev": tb.abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(tb.abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - tb.abar),
            "log_one_minus_alphas_cumprod": np.log(1 - tb.abar),
            "sqrt_recip_alphas_cumprod": 1 / np.sqrt(tb.abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - tb.abar) / tb.abar),
            "posterior_variance": tb.var,
            "posterior_log_variance_clipped": tb.log_var,
            "posterior_mean_coef1": np.sqrt(tb.abar_prev) * tb.b / (1 - tb.abar),
            "posterior_mean_coef2": np.sqrt(alphas) * (1 - tb.abar_prev) / (1 - tb.abar),
            "lvlb_weights_eps": m.lvlb_weights(tb, "eps"),
            "lvlb_weights_x0": m.lvlb_weights(tb, "x0"),
            "lvlb_weights_v": m.lvlb_weights(tb, "v"),
        }
    assert set(expected) == set(TABLE_NAMES)
    for name_, e in expected.items():
        got32 = getattr(s, name_)
        assert got32.dtype == torch.float32 and got32.shape == (T,)
        # float32 storage of a float64 build: within one float32 rounding
        np.testing.assert_allclose(got32.double().numpy(), e, rtol=2**-24, atol=2**-149, err_msg=name_)  # subnormals
        got64 = s.table(torch.float64)[TABLE_NAMES.index(name_)].numpy()
        np.testing.assert_allclose(got64, e, rtol=1e-9, atol=1e-15, err_msg=name_)


def test_lvlb_weights_first_entry_copied_and_finite():
    s = dk.DiffusionSchedule("linear", timesteps=100)
    for p in ("eps", "x0", "v"):
        w = s.lvlb_weights(p)
        assert torch.isfinite(w).all()
        assert w[0] == w[1]
    with pytest.raises(ValueError, match="parameterization"):
        s.lvlb_weights("score")


def test_posterior_log_variance_clipped_at_t0():
    s = dk.DiffusionSchedule("linear", timesteps=100)
    assert s.posterior_variance[0] == 0
    assert torch.isclose(s.posterior_log_variance_clipped[0], torch.tensor(np.log(1e-20), dtype=torch.float32))


def test_given_betas_override():
    betas = np.linspace(1e-3, 0.05, 37)
    s = dk.DiffusionSchedule("cosine", timesteps=5, given_betas=betas)
    assert s.num_timesteps == 37
    np.testing.assert_allclose(s.betas.double().numpy(), betas, rtol=2**-24)
    s2 = dk.DiffusionSchedule(given_betas=torch.tensor(betas))
    torch.testing.assert_close(s.coefficients, s2.coefficients, rtol=0, atol=0)


def test_matches_diffusers_betas():
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs in [("linear", "scaled_linear"), ("sqrt_linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=1e-4, beta_end=2e-2)
        s = dk.DiffusionSchedule(ours, timesteps=1000)
        torch.testing.assert_close(s.betas, sched.betas.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
        s2 = dk.DiffusionSchedule.from_diffusers(sched.config)
        torch.testing.assert_close(s2.betas, s.betas, rtol=1e-6, atol=0)


def test_module_moves_but_keeps_fp32_and_views():
    s = dk.DiffusionSchedule(timesteps=10)
    before = s.coefficients.clone()
    s.half()
    s.to(torch.bfloat16)
    assert s.coefficients.dtype == torch.float32 and s.betas.dtype == torch.float32
    torch.testing.assert_close(s.coefficients, before, rtol=0, atol=0)
    s = s.to("meta")
    assert s.coefficients.device.type == "meta" and s.betas.device.type == "meta"
    assert s.betas.untyped_storage().data_ptr() == s.coefficients.untyped_storage().data_ptr()


def test_state_dict_uses_compvis_names_and_loads_through():
    s = dk.DiffusionSchedule("linear", timesteps=20)
    sd = s.state_dict()
    assert list(sd) == list(TABLE_NAMES)
    other = dk.DiffusionSchedule("cosine", timesteps=20)
    s.load_state_dict(other.state_dict())
    torch.testing.assert_close(s.coefficients, other.coefficients, rtol=0, atol=0)
    torch.testing.assert_close(s.coefficients64.float(), other.coefficients, rtol=0, atol=0)
    # and the ops use the loaded tables
    x, z, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([4, 19])
    torch.testing.assert_close(dk.q_sample(x, t, z, s), dk.q_sample(x, t, z, other), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta_schedule="quadratic"), "beta_schedule"),
        (dict(beta_schedule=None), "beta_schedule"),
        (dict(timesteps=0), "timesteps"),
        (dict(timesteps=10.5), "timesteps"),
        (dict(linear_start=0.0), "linear_start"),
        (dict(linear_end=1.5), "linear_end"),
        (dict(linear_start=0.5, linear_end=0.9, beta_schedule="sqrt"), "betas"),
        (dict(v_posterior=-0.1), "v_posterior"),
        (dict(given_betas=[]), "given_betas"),
        (dict(given_betas=[[0.1, 0.2]]), "given_betas"),
        (dict(given_betas=[0.1, 1.0]), "betas"),
        (dict(given_betas=[0.1, float("nan")]), "betas"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.DiffusionSchedule(**kwargs)


def test_sampling_only_exempts_the_training_tables():
    """A one-step schedule: posterior_variance[0] == 0 makes the eps-form lvlb weight infinite with no neighbour
    to copy from. The strict constructor refuses it (CompVis fails on it too); sampling_only=True builds it,
    every table sampling reads finite."""
    with pytest.raises(ValueError, match="lvlb_weights_eps"):
        dk.DiffusionSchedule("linear", timesteps=1)
    s = dk.DiffusionSchedule("linear", timesteps=1, sampling_only=True)
    assert s.sampling_only and "sampling_only=True" in repr(s)
    assert not dk.DiffusionSchedule("linear", timesteps=2).sampling_only
    training = {"lvlb_weights_eps", "lvlb_weights_x0", "lvlb_weights_v"}
    for name in TABLE_NAMES:
        row = getattr(s, name)
        assert torch.isfinite(row).all() or name in training, name
    assert torch.isinf(s.lvlb_weights("eps")).all()
    # the step works: x0 from eps at t = 0, then t_prev = -1
    x, eps = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.zeros(2, dtype=torch.long)
    out = dk.ddpm_step(x, t, t - 1, eps, s, clip_denoised=False, noise=torch.zeros(2, 3))
    ab = s.coefficients64[TABLE_NAMES.index("alphas_cumprod"), 0]
    torch.testing.assert_close(out.double(), (x.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt(), rtol=1e-6, atol=1e-6)
    s2 = dk.DiffusionSchedule.from_diffusers({"num_train_timesteps": 1, "beta_schedule": "linear"}, sampling_only=True)
    assert s2.sampling_only and s2.num_timesteps == 1


@pytest.mark.parametrize("kwargs", [dict(given_betas=[0.1, 1.5]), dict(given_betas=[0.0, 0.1]),
                                    dict(beta_schedule="sqrt", linear_start=0.5, linear_end=0.9)])
def test_sampling_only_keeps_every_other_check(kwargs):
    with pytest.raises(ValueError, match="betas"):
        dk.DiffusionSchedule(**kwargs, sampling_only=True)
    with pytest.raises(TypeError, match="sampling_only"):
        dk.DiffusionSchedule(sampling_only=1)
