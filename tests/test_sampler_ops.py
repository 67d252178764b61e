"""Sampler ops (ddim_step, ddpm_step with every variance type, dynamic_threshold) and zero-terminal-SNR
schedules: the reference against independent float64 math, plus the error contract."""

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
import fp64_math as m
import fp64_sampler_math as sm
from ddpm_kernels import ops
from ddpm_kernels._spec import StepOptions
from helpers import DTYPES, SHAPES, assert_close_to_fp64, ddim_step_ref, ddpm_step_ref, make, np64, timesteps

T = 1000
PARAMS = ["eps", "x0", "v"]
_cache = {}


def schedule_and_abar(name="linear", zero_snr=False):
    key = (name, zero_snr)
    if key not in _cache:
        betas = m.betas(name, T)
        if zero_snr:
            betas = sm.rescale_zero_terminal_snr(betas)
        _cache[key] = (dk.DiffusionSchedule(name, timesteps=T, zero_terminal_snr=zero_snr), np.cumprod(1 - betas))
    return _cache[key]


def step_inputs(shape, dtype, n, seed=0, channels_factor=1, scale=1.0):
    """Per-sample t covering 0 and T-1, t_prev = t - k with per-sample k (some -1), and n data tensors."""
    g = torch.Generator().manual_seed(seed)
    t = timesteps(shape[0], T, g)
    k = torch.randint(1, 60, (shape[0],), generator=g)
    t_prev = (t - k).clamp(min=-1)
    if shape[0] > 2:
        t_prev[1] = t[1] - 1 if t[1] > 0 else -1  # the plain DDPM chain
    data = [make(shape, dtype, g, scale) for _ in range(n)]
    return t, t_prev, data


def widen(shape, dtype, seed):
    """A model output carrying variance channels: (B, 2C, ...) for x of shape (B, C, ...)."""
    g = torch.Generator().manual_seed(seed + 100)
    mo = make((shape[0], 2 * shape[1]) + tuple(shape[2:]), dtype, g)
    # keep learned log-variances in a sane range ([-12, 0]) and learned_range values in [-1, 1]
    return mo


def table_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ DDIM
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_ddim_step(shape, dtype, parameterization, eta, clip):
    s, abar = schedule_and_abar("linear")
    t, t_prev, (x, mo, z) = step_inputs(shape, dtype, 3, seed=1)
    got, x0 = dk.ddim_step(x, t, t_prev, mo, s, eta, parameterization, clip, noise=z, backend="reference",
                           return_pred_x0=True)
    prev, scale, e_x0, x0_scale = sm.ddim_step(abar, np64(x), np64(t), np64(t_prev), np64(mo), np64(z), eta,
                                               parameterization, clip)
    assert got.shape == x.shape and x0.shape == x.shape
    assert_close_to_fp64(x0, e_x0, x0_scale, dtype, "ddim x0")
    assert_close_to_fp64(got, prev, scale, dtype, "ddim_step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("options", [
    dict(set_alpha_to_one=False),
    dict(use_clipped_model_output=True, clip=True),
    dict(clip=True, clip_range=1.5),
    dict(threshold_ratio=0.9, threshold_max=2.5),
    dict(threshold_ratio=0.995, threshold_max=1.0, use_clipped_model_output=True),
], ids=["final_alpha", "clipped_output", "clip_range", "threshold", "threshold_clipped_output"])
def test_ddim_step_options(dtype, parameterization, options):
    s, abar = schedule_and_abar("cosine")
    shape = (5, 3, 7, 6)
    t, t_prev, (x, mo, z) = step_inputs(shape, dtype, 3, seed=2, scale=2.0)
    o = dict(options)
    clip = o.pop("clip", False)
    final = o.get("set_alpha_to_one", True)
    got = dk.ddim_step(x, t, t_prev, mo, s, 1.0, parameterization, clip, noise=z, backend="reference", **o)
    prev, scale, _, _ = sm.ddim_step(
        abar, np64(x), np64(t), np64(t_prev), np64(mo), np64(z), 1.0, parameterization, clip,
        final_alpha=1.0 if final else abar[0], use_clipped=o.get("use_clipped_model_output", False),
        clip_range=o.get("clip_range", 1.0), threshold_ratio=o.get("threshold_ratio"),
        threshold_max=o.get("threshold_max", 1.0),
    )
    assert_close_to_fp64(got, prev, scale, dtype, "ddim_step")


def test_ddim_eta0_is_deterministic_and_draws_nothing():
    s, _ = schedule_and_abar()
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, tp = torch.tensor([999, 10]), torch.tensor([979, -1])
    g = torch.Generator().manual_seed(0)
    a = dk.ddim_step(x, t, tp, mo, s, 0.0, generator=g, backend="reference")
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    b = dk.ddim_step(x, t, tp, mo, s, 0.0, noise=torch.randn(2, 3, 4, 4), backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_generator_noise_is_the_stream():
    s, _ = schedule_and_abar()
    x, mo = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t, tp = torch.tensor([0, 500, 999]), torch.tensor([-1, 480, 979])
    drawn = dk.ddim_step(x, t, tp, mo, s, 1.0, generator=torch.Generator().manual_seed(7), backend="reference")
    z = dk.randn_stream(x.shape, torch.Generator().manual_seed(7), backend="reference")
    given = dk.ddim_step(x, t, tp, mo, s, 1.0, noise=z, backend="reference")
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)


def test_ddim_last_step_with_alpha_one_returns_x0():
    """t_prev = -1 with set_alpha_to_one: ab_prev = 1, sigma = 0, so x_{-1} is the predicted x0."""
    s, _ = schedule_and_abar()
    x, mo = torch.randn(2, 4), torch.randn(2, 4)
    t, tp = torch.tensor([3, 0]), torch.tensor([-1, -1])
    out, x0 = dk.ddim_step(x, t, tp, mo, s, 1.0, noise=torch.randn(2, 4), backend="reference", return_pred_x0=True)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ DDPM
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_ddpm_step(shape, dtype, parameterization, variance_type):
    s, abar = schedule_and_abar("linear")
    t, t_prev, (x, mo, z) = step_inputs(shape, dtype, 3, seed=3)
    if variance_type in ("learned", "learned_range"):
        mo = widen(shape, dtype, 3)
        if variance_type == "learned":  # a log-variance
            mo[:, shape[1]:] = (-3.0 * mo[:, shape[1]:].abs()).to(dtype)
        else:  # in [-1, 1]
            mo[:, shape[1]:] = mo[:, shape[1]:].clamp(-1, 1)
    got, x0 = dk.ddpm_step(x, t, t_prev, mo, s, parameterization, variance_type, True, noise=z,
                           backend="reference", return_pred_x0=True)
    prev, scale, e_x0, x0_scale = sm.ddpm_step(abar, np64(x), np64(t), np64(t_prev), np64(mo), np64(z),
                                               parameterization, variance_type, True)
    assert torch.isfinite(got).all()
    assert_close_to_fp64(x0, e_x0, x0_scale, dtype, "ddpm x0")
    assert_close_to_fp64(got, prev, scale, dtype, f"ddpm_step {variance_type}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("options", [
    dict(clip=False), dict(clip=True, clip_range=2.0), dict(threshold_ratio=0.95, threshold_max=3.0),
], ids=["noclip", "clip_range", "threshold"])
def test_ddpm_step_clip_and_threshold(dtype, options):
    s, abar = schedule_and_abar("cosine")
    shape = (4, 3, 9, 5)
    t, t_prev, (x, mo, z) = step_inputs(shape, dtype, 3, seed=4, scale=3.0)
    o = dict(options)
    clip = o.pop("clip", True)
    got = dk.ddpm_step(x, t, t_prev, mo, s, "v", "fixed_small", clip, noise=z, backend="reference", **o)
    prev, scale, _, _ = sm.ddpm_step(abar, np64(x), np64(t), np64(t_prev), np64(mo), np64(z), "v", "fixed_small",
                                     clip, clip_range=o.get("clip_range", 1.0),
                                     threshold_ratio=o.get("threshold_ratio"), threshold_max=o.get("threshold_max", 1.0))
    assert_close_to_fp64(got, prev, scale, dtype, "ddpm_step")


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_on_the_full_chain_is_p_sample(parameterization, clip):
    s, _ = schedule_and_abar("linear")
    g = torch.Generator().manual_seed(5)
    x, mo, z = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    got = dk.ddpm_step(x, t, t - 1, mo, s, parameterization, "fixed_small", clip, noise=z)
    expected = dk.p_sample(x, t, mo, s, parameterization, clip, noise=z)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fixed_large_log_equals_fixed_large_and_learned_is_exp_half_logvar():
    s, _ = schedule_and_abar()
    g = torch.Generator().manual_seed(6)
    x, mo, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, tp = torch.tensor([10, 700]), torch.tensor([9, 650])
    large = dk.ddpm_step(x, t, tp, mo, s, variance_type="fixed_large", noise=z, backend="reference")
    large_log = dk.ddpm_step(x, t, tp, mo, s, variance_type="fixed_large_log", noise=z, backend="reference")
    torch.testing.assert_close(large, large_log, rtol=0, atol=0)
    assert torch.isfinite(large).all()
    # learned with log(beta) as the model's log-variance is fixed_large; with log(var) it is fixed_small
    ab = s.coefficients64[1].double()
    beta = 1 - ab[t] / ab[tp]
    var = (1 - ab[tp]) / (1 - ab[t]) * beta
    for log_var, fixed in ((beta.log(), "fixed_large"), (var.log(), "fixed_small")):
        v = log_var.float().reshape(2, 1, 1, 1).expand(2, 3, 4, 4)
        learned = dk.ddpm_step(x, t, tp, torch.cat([mo, v], 1), s, variance_type="learned", noise=z,
                               backend="reference")
        ref = dk.ddpm_step(x, t, tp, mo, s, variance_type=fixed, noise=z, backend="reference")
        torch.testing.assert_close(learned, ref, rtol=1e-5, atol=1e-5)
    # learned_range at v = -1 is fixed_small, at v = +1 fixed_large
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        out = dk.ddpm_step(x, t, tp, torch.cat([mo, torch.full_like(mo, v)], 1), s, variance_type="learned_range",
                           noise=z, backend="reference")
        ref = dk.ddpm_step(x, t, tp, mo, s, variance_type=fixed, noise=z, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_learned_variance_channels_may_be_a_view():
    s, _ = schedule_and_abar()
    g = torch.Generator().manual_seed(8)
    x, z = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mo = torch.randn(2, 4, 4, 6, generator=g).permute(0, 3, 1, 2)  # non-contiguous (2, 6, 4, 4)
    t, tp = torch.tensor([5, 900]), torch.tensor([4, 880])
    got = dk.ddpm_step(x, t, tp, mo, s, variance_type="learned_range", noise=z, backend="reference")
    expected = dk.ddpm_step(x, t, tp, mo.contiguous(), s, variance_type="learned_range", noise=z, backend="reference")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_out_in_place_and_no_noise_at_t0(op):
    s, _ = schedule_and_abar()
    g = torch.Generator().manual_seed(9)
    x, mo, z = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    t, tp = torch.tensor([0, 40, 999]), torch.tensor([-1, 20, 979])
    fn = (lambda **kw: dk.ddim_step(x_in, t, tp, mo, s, 1.0, noise=z, backend="reference", **kw)) if op == "ddim_step" \
        else (lambda **kw: dk.ddpm_step(x_in, t, tp, mo, s, noise=z, backend="reference", **kw))
    x_in = x
    expected = fn()
    x_in = x.clone()
    assert fn(out=x_in) is x_in
    torch.testing.assert_close(x_in, expected, rtol=0, atol=0)
    if op == "ddpm_step":
        x_in = x
        other = dk.ddpm_step(x, t, tp, mo, s, noise=torch.randn(3, 2, 4, generator=g), backend="reference")
        torch.testing.assert_close(other[0], expected[0], rtol=0, atol=0)  # t = 0: no noise
        assert not torch.equal(other[1:], expected[1:])


def test_out_of_range_t_prev_gives_nan_not_a_crash():
    s, _ = schedule_and_abar()
    x, mo = torch.randn(3, 4), torch.randn(3, 4)
    t, tp = torch.tensor([5, 5, 5]), torch.tensor([-2, 4, T])
    # the reference directly: the public ops refuse such a t_prev before any math runs
    out = dk.reference.sampler_step_ref(x, t, tp, mo, s, StepOptions("ddim"))
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[1]).all()
    out = dk.reference.sampler_step_ref(x, t, tp, mo, s, StepOptions("ddpm", clip_denoised=True), torch.zeros(3, 4))
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[1]).all()


# ------------------------------------------------------------------------------------ dynamic thresholding
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.995, 3.0), (0.5, 2.0), (1.0, 10.0), (0.0, 1.5)])
def test_dynamic_threshold(shape, dtype, ratio, max_value):
    g = torch.Generator().manual_seed(10)
    x0 = make(shape, dtype, g, scale=2.5)
    got = dk.dynamic_threshold(x0, ratio, max_value, backend="reference")
    expected, scale = sm.threshold(np64(x0), np.abs(np64(x0)), ratio, max_value)
    assert_close_to_fp64(got, expected, scale, dtype, "dynamic_threshold")


def test_dynamic_threshold_equals_diffusers_threshold_sample():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.97, sample_max_value=2.0)
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(11)) * 2
    torch.testing.assert_close(dk.dynamic_threshold(x0, 0.97, 2.0), sched._threshold_sample(x0), rtol=0, atol=0)


def test_dynamic_threshold_nan_sample_stays_nan_others_unaffected():
    x0 = torch.randn(2, 10) * 3
    x0[0, 4] = float("nan")
    out = dk.dynamic_threshold(x0, 0.9, 2.0)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


# ------------------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt_linear"])
def test_zero_terminal_snr_schedule(name):
    s, abar = schedule_and_abar(name, zero_snr=True)
    expected_betas = sm.rescale_zero_terminal_snr(m.betas(name, T))
    np.testing.assert_allclose(dk.rescale_zero_terminal_snr(m.betas(name, T)), expected_betas, rtol=1e-12, atol=1e-15)
    assert s.zero_terminal_snr and s.betas[-1].item() == 1.0 and s.alphas_cumprod[-1].item() == 0.0
    np.testing.assert_allclose(np64(s.coefficients64[1]), abar, rtol=1e-12, atol=1e-300)
    # the first alpha_bar is unchanged; the schedule stays decreasing
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - m.betas(name, T)[0], rel=1e-7)
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    table = s.coefficients
    inf_rows = {dk.schedule.TABLE_ROW[n] for n in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")}
    for row in range(table.shape[0]):
        finite = torch.isfinite(table[row])
        if row in inf_rows:
            assert finite[:-1].all() and torch.isposinf(table[row, -1])
        else:
            assert finite.all(), dk.schedule.TABLE_NAMES[row]
    # idempotent: rescaling a zero-SNR schedule changes nothing
    again = dk.DiffusionSchedule(given_betas=s.coefficients64[0], zero_terminal_snr=True)
    torch.testing.assert_close(again.coefficients64[1], s.coefficients64[1], rtol=1e-12, atol=1e-15)


def test_zero_terminal_snr_ops_at_the_last_step():
    s, abar = schedule_and_abar("linear", zero_snr=True)
    g = torch.Generator().manual_seed(12)
    x0, eps, v = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.full((3,), T - 1)
    torch.testing.assert_close(dk.q_sample(x0, t, eps, s), eps, rtol=0, atol=0)  # pure noise at zero SNR
    for p in ("eps", "x0", "v"):
        loss = dk.diffusion_loss(v, x0, eps, t, s, p, original_elbo_weight=0.0)[0]
        assert torch.isfinite(loss)
    # v-prediction is well defined at zero SNR: x0 = -v
    tp = torch.full((3,), T - 101)
    out, pred = dk.ddim_step(x0, t, tp, v, s, 1.0, "v", noise=eps, return_pred_x0=True)
    torch.testing.assert_close(pred, -v, rtol=0, atol=0)
    prev, scale, _, _ = sm.ddim_step(abar, np64(x0), np64(t), np64(tp), np64(v), np64(eps), 1.0, "v", False)
    assert_close_to_fp64(out, prev, scale, torch.float32, "ddim at zero SNR")
    out = dk.ddpm_step(x0, t, tp, v, s, "v", "fixed_small", False, noise=eps)
    prev, scale, _, _ = sm.ddpm_step(abar, np64(x0), np64(t), np64(tp), np64(v), np64(eps), "v", "fixed_small", False)
    assert_close_to_fp64(out, prev, scale, torch.float32, "ddpm at zero SNR")


def test_zero_terminal_snr_from_diffusers_and_errors():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    rescale_betas_zero_snr=True)
    s = dk.DiffusionSchedule.from_diffusers(sched)
    assert s.zero_terminal_snr and s.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    s2 = dk.DiffusionSchedule.from_diffusers(dict(sched.config))
    torch.testing.assert_close(s2.alphas_cumprod, sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="zero_terminal_snr: expected a bool"):
        dk.DiffusionSchedule(zero_terminal_snr=1)
    with pytest.raises(ValueError, match="at least 2 steps"):
        dk.DiffusionSchedule(timesteps=1, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="betas"):
        dk.DiffusionSchedule(given_betas=[0.1, 1.0, 0.5])  # a beta of 1 is only allowed last, with zero SNR
    assert not dk.DiffusionSchedule(timesteps=10).zero_terminal_snr


# ------------------------------------------------------------------------------------------ error contract
S = dk.DiffusionSchedule(timesteps=50)


def _args():
    g = torch.Generator().manual_seed(0)
    x, mo, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    return x, torch.tensor([0, 10, 49]), torch.tensor([-1, 5, 30]), mo, z


@pytest.fixture
def no_dispatch(monkeypatch):
    def reached(*a, **k):
        raise AssertionError("dispatch reached with invalid arguments")

    monkeypatch.setattr(ops, "_dispatch", reached)


@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_step_errors(op, no_dispatch):
    x, t, tp, mo, z = _args()

    def call(x=x, t=t, tp=tp, mo=mo, **kw):
        if op == "ddim_step":
            return dk.ddim_step(x, t, tp, mo, S, kw.pop("eta", 1.0), noise=kw.pop("noise", z), **kw)
        return dk.ddpm_step(x, t, tp, mo, S, noise=kw.pop("noise", z), **kw)

    for bad in ([-2, 0, 0], [0, 0, 50]):
        with pytest.raises(ValueError, match=r"t_prev: expected values in \[-1, 50\)"):
            call(tp=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 50\)"):
        call(t=torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match=r"t_prev: expected shape \(3,\)"):
        call(tp=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="t_prev: expected an integer tensor"):
        call(tp=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="t_prev: expected an int64 tensor"):
        call(tp=[0, 1, 2])
    with pytest.raises(ValueError, match="t_prev: expected a tensor on cpu"):
        call(tp=torch.tensor([0, 1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"model_output: expected shape \(3, 2, 4, 4\)"):
        call(mo=torch.randn(3, 2, 4, 5))
    with pytest.raises(TypeError, match="noise: expected a floating-point tensor"):
        call(noise=z.int())
    with pytest.raises(ValueError, match="parameterization: expected one of"):
        call(parameterization="score")
    with pytest.raises(ValueError, match="threshold_ratio: expected a number in"):
        call(threshold_ratio=1.5)
    with pytest.raises(ValueError, match="threshold_max: expected a number in"):
        call(threshold_ratio=0.9, threshold_max=0.0)
    with pytest.raises(ValueError, match="clip_range: expected a number in"):
        call(clip_range=-1.0)
    with pytest.raises(TypeError, match="clip_denoised: expected a bool"):
        call(clip_denoised=1)
    with pytest.raises(TypeError, match="return_pred_x0: expected a bool"):
        call(return_pred_x0=None)
    with pytest.raises(ValueError, match="out: expected shape"):
        call(out=torch.empty(3, 2))
    with pytest.raises(ValueError, match="backend: expected one of"):
        call(backend="mps")
    with pytest.raises(TypeError, match="schedule: expected a ddpm_kernels.DiffusionSchedule"):
        (dk.ddim_step(x, t, tp, mo, S.betas) if op == "ddim_step" else dk.ddpm_step(x, t, tp, mo, S.betas))


def test_ddim_specific_errors(no_dispatch):
    x, t, tp, mo, z = _args()
    for bad, exc in ((-0.1, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="eta: expected"):
            dk.ddim_step(x, t, tp, mo, S, bad)
    with pytest.raises(TypeError, match="set_alpha_to_one: expected a bool"):
        dk.ddim_step(x, t, tp, mo, S, set_alpha_to_one="yes")
    with pytest.raises(TypeError, match="use_clipped_model_output: expected a bool"):
        dk.ddim_step(x, t, tp, mo, S, use_clipped_model_output=0)


def test_ddpm_specific_errors(no_dispatch):
    x, t, tp, mo, z = _args()
    with pytest.raises(ValueError, match="variance_type: expected one of"):
        dk.ddpm_step(x, t, tp, mo, S, variance_type="learned_log")
    with pytest.raises(ValueError, match=r"model_output: expected shape \(3, 4, 4, 4\)"):
        dk.ddpm_step(x, t, tp, mo, S, variance_type="learned_range")
    with pytest.raises(TypeError, match="model_output: expected a floating-point tensor"):
        dk.ddpm_step(x, t, tp, torch.cat([mo, mo], 1).int(), S, variance_type="learned")
    with pytest.raises(ValueError, match="needs a channel dim"):
        dk.ddpm_step(torch.randn(3), t, tp, torch.randn(6), S, variance_type="learned")


def test_dynamic_threshold_errors(no_dispatch):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"ratio: expected a number in \[0.0, 1.0\]"):
        dk.dynamic_threshold(x, 1.01)
    with pytest.raises(ValueError, match="max_value: expected a number in"):
        dk.dynamic_threshold(x, 0.9, 0.0)
    with pytest.raises(TypeError, match="x0: expected a floating-point tensor"):
        dk.dynamic_threshold(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch dimension"):
        dk.dynamic_threshold(torch.tensor(1.0))


def test_auto_falls_back_to_the_reference_for_new_ops():
    """backend='auto' runs ops a fused backend lacks on the reference (the per-op fallback)."""
    x, t, tp, mo, z = _args()
    for fn in (
        lambda b: dk.ddim_step(x, t, tp, mo, S, 1.0, noise=z, backend=b),
        lambda b: dk.ddpm_step(x, t, tp, mo, S, noise=z, backend=b),
        lambda b: dk.dynamic_threshold(x * 3, 0.9, 2.0, backend=b),
    ):
        torch.testing.assert_close(fn("auto"), fn("reference"), rtol=1e-5, atol=1e-5)
