"""FusedDDPMScheduler / FusedDDIMScheduler against the stock diffusers schedulers they replace."""

import inspect
import pickle
import warnings

import numpy as np

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ddpm_kernels as dk  # noqa: E402
from ddpm_kernels import ops  # noqa: E402
from ddpm_kernels.integrations.diffusers import ddpm as dkd  # noqa: E402  (the module whose globals tests patch)
from ddpm_kernels.integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402
from ddpm_kernels.integrations.diffusers._common import _randn  # noqa: E402
from helpers import (  # noqa: E402
    GENERATOR_FORMS, assert_stock_reads_the_device, check_same_as_stock, generator_form, generator_state, sync_guard,
    warned_stock_path,
)

PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]
SHAPE = (2, 3, 6, 5)


def pair(stock_cls, fused_cls, **config):
    stock = stock_cls(**config)
    return stock, fused_cls.from_config(stock.config)


def model_output(shape, variance_type, g):
    mo = torch.randn(shape, generator=g)
    if variance_type in ("learned", "learned_range"):
        v = torch.rand(shape, generator=g) * 2 - 1  # learned_range: in [-1, 1]
        if variance_type == "learned":
            v = v * 4 - 6  # a log-variance
        mo = torch.cat([mo, v], dim=1)
    return mo


def assert_matches_stock(got, expected, exact, what):
    """Equal to the stock scheduler up to the stock's own float32 error (its `1 - ab_t / ab_prev` cancels near
    t = 0), measured against the same step computed in float64. The float64 step is ours, so the allowance is
    capped: a consistent mistake of ours cannot widen it past 1e-4."""
    stock_err = (expected.double() - exact).abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=min(2 * stock_err + 1e-6, 1e-4), msg=what)


def assert_same_as_stock(call, stock, fused, warns=True):
    """``call(scheduler)`` gives the stock scheduler's result (NaN where it has NaN) or raises its error (same
    type and message); the fused scheduler warns that the stock code path took the call."""
    check_same_as_stock(call, stock, fused, check_warnings=warned_stock_path if warns else None)


def run_steps(stock, fused, step_kwargs=None, variance_type="fixed_small", seed=0, steps=None):
    """Step both schedulers over their timesteps from the same inputs and generators; compare every output."""
    step_kwargs = step_kwargs or {}
    g = torch.Generator().manual_seed(seed)
    timesteps = list(stock.timesteps)
    assert torch.equal(stock.timesteps, fused.timesteps)
    for t in timesteps if steps is None else [timesteps[i] for i in steps]:
        sample = torch.randn(SHAPE, generator=g) * 1.5
        mo = model_output(SHAPE, variance_type, g)
        gs, gf, ge = (torch.Generator().manual_seed(int(t) + 17) for _ in range(3))
        expected = stock.step(mo, t, sample, generator=gs, **step_kwargs)
        got = fused.step(mo, t, sample, generator=gf, **step_kwargs)
        exact = fused.step(mo.double(), t, sample.double(), generator=ge, **step_kwargs)
        assert torch.equal(gs.get_state(), gf.get_state()), f"t={int(t)}: the generators advanced differently"
        for name in ("prev_sample", "pred_original_sample"):
            assert_matches_stock(getattr(got, name), getattr(expected, name), getattr(exact, name), f"t={int(t)} {name}")


# ------------------------------------------------------------------------------------------------ DDPM
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip_sample,thresholding", [(True, False), (False, False), (False, True)],
                         ids=["clip", "noclip", "threshold"])
def test_ddpm_step_equals_stock(prediction_type, variance_type, clip_sample, thresholding):
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, num_train_timesteps=1000,
                        beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2,
                        prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample,
                        thresholding=thresholding, sample_max_value=2.0, dynamic_thresholding_ratio=0.9)
    for s in (stock, fused):
        s.set_timesteps(8)
    run_steps(stock, fused, variance_type=variance_type)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddpm_timestep_spacings(spacing, steps_offset):
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, num_train_timesteps=200,
                        beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing, steps_offset=steps_offset,
                        clip_sample_range=1.5)
    for s in (stock, fused):
        s.set_timesteps(7)
    run_steps(stock, fused)


def test_ddpm_full_chain_and_custom_timesteps():
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, num_train_timesteps=50)
    run_steps(stock, fused, steps=[0, 1, 25, 48, 49])  # no set_timesteps: t -> t - 1
    for s in (stock, fused):
        s.set_timesteps(timesteps=[45, 30, 29, 7, 0])
    run_steps(stock, fused)
    # timesteps replaced outside set_timesteps (every other one): the previous-step table follows
    for s in (stock, fused):
        s.set_timesteps(10)
        s.timesteps = s.timesteps[1::2]
    run_steps(stock, fused)


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "learned"])
def test_ddpm_where_stock_is_nan_we_give_the_intended_result(variance_type):
    """diffusers 0.42.1 takes the square root of a log-variance for these two (NaN); the fused scheduler uses
    it as a log-variance: fixed_large_log is fixed_large, learned scales the noise by exp(0.5 * v)."""
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, variance_type=variance_type)
    for s in (stock, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, mo = torch.randn(SHAPE, generator=g), model_output(SHAPE, variance_type, g)
    t = stock.timesteps[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock_out = stock.step(mo, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    got = fused.step(mo, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.isfinite(got).all()
    if diffusers.__version__ == "0.42.1":
        assert torch.isnan(stock_out).any()  # the stock bug this replaces
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    s = dk.DiffusionSchedule.from_diffusers(fused)
    tt, tp = torch.full((2,), int(t)), torch.full((2,), int(fused.timesteps[4]))
    if variance_type == "fixed_large_log":
        expected = dk.ddpm_step(sample, tt, tp, mo, s, variance_type="fixed_large", noise=z)
        large = FusedDDPMScheduler.from_config(fused.config, variance_type="fixed_large")
        large.set_timesteps(10)
        torch.testing.assert_close(got, large.step(mo, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample,
                                   rtol=0, atol=0)
    else:
        ab = s.coefficients64[1]
        x0 = ((sample.double() - (1 - ab[tt]).sqrt().reshape(2, 1, 1, 1) * mo[:, :3].double())
              / ab[tt].sqrt().reshape(2, 1, 1, 1)).clamp(-1, 1)
        beta = 1 - ab[tt] / ab[tp]
        mean = (ab[tp].sqrt() * beta / (1 - ab[tt])).reshape(2, 1, 1, 1) * x0 + (
            (1 - beta).sqrt() * (1 - ab[tp]) / (1 - ab[tt])).reshape(2, 1, 1, 1) * sample.double()
        expected = mean + torch.exp(0.5 * mo[:, 3:].double()) * z.double()
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_ddpm_learned_variance_without_its_channels_behaves_as_stock():
    """A learned variance type with a model output of the sample's channels: the stock step uses no variance
    at t == 0 and fails at t > 0; the fused scheduler hands the call to it (one warning) and so does the same."""
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, variance_type="learned_range")
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.warns(RuntimeWarning, match="stock DDPMScheduler code path"):
        got = fused.step(mo, 0, x, generator=torch.Generator().manual_seed(0))
    expected = stock.step(mo, 0, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.prev_sample, expected.prev_sample)
    with pytest.raises(TypeError) as stock_error:
        stock.step(mo, 10, x)
    with pytest.raises(TypeError) as fused_error:
        fused.step(mo, 10, x)
    assert str(fused_error.value) == str(stock_error.value)


# ------------------------------------------------------------------------------------------------ DDIM
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample,thresholding", [(True, False), (False, False), (False, True)],
                         ids=["clip", "noclip", "threshold"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_step_equals_stock(prediction_type, eta, clip_sample, thresholding, set_alpha_to_one):
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, clip_sample=clip_sample,
                        thresholding=thresholding, sample_max_value=2.0, set_alpha_to_one=set_alpha_to_one)
    for s in (stock, fused):
        s.set_timesteps(6)
    run_steps(stock, fused, {"eta": eta})


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_spacings_and_clipped_model_output(spacing, use_clipped_model_output):
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, num_train_timesteps=300,
                        timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    for s in (stock, fused):
        s.set_timesteps(9)
    run_steps(stock, fused, {"eta": 0.5, "use_clipped_model_output": use_clipped_model_output})


def test_ddim_zero_terminal_snr():
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                        prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False,
                        clip_sample=False)
    for s in (stock, fused):
        s.set_timesteps(5)
    assert int(stock.timesteps[0]) == 999
    run_steps(stock, fused, {"eta": 1.0})


def test_ddim_variance_noise_and_errors():
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler)
    with pytest.raises(ValueError, match="set_timesteps"):
        fused.step(torch.randn(SHAPE), 10, torch.randn(SHAPE))
    for s in (stock, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    sample, mo, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    expected = stock.step(mo, 501, sample, eta=0.7, variance_noise=z).prev_sample
    got = fused.step(mo, 501, sample, eta=0.7, variance_noise=z).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        fused.step(mo, 501, sample, eta=0.7, variance_noise=z, generator=g)


def test_ddim_half_precision_is_more_accurate_than_stock():
    """The stock scheduler casts alphas_cumprod to the sample dtype before its square roots; the fused step
    computes the coefficients in float64 and the math in float32 whatever the dtype."""
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, clip_sample=False)
    for s in (stock, fused):
        s.set_timesteps(20)
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.bfloat16):
        errs = {"stock": 0.0, "fused": 0.0}
        for t in stock.timesteps[::4]:
            sample, mo = (torch.randn(SHAPE, generator=g).to(dtype) for _ in range(2))
            exact = fused.step(mo.double(), t, sample.double()).prev_sample
            for name, sch in (("stock", stock), ("fused", fused)):
                out = sch.step(mo, t, sample).prev_sample
                assert out.dtype == dtype
                errs[name] = max(errs[name], (out.double() - exact).abs().max().item())
        assert errs["fused"] <= errs["stock"], (dtype, errs)


# ------------------------------------------------------------------- every configuration the stock accepts
def test_one_step_schedule():
    """num_train_timesteps=1: the training-only lvlb weights are infinite (no neighbour to copy the t = 0 weight
    from), which does not keep the schedule from sampling: fused, equal to stock, no warning."""
    for cls, fused_cls in ((diffusers.DDPMScheduler, FusedDDPMScheduler), (diffusers.DDIMScheduler, FusedDDIMScheduler)):
        stock, fused = pair(cls, fused_cls, num_train_timesteps=1)
        for s in (stock, fused):
            s.set_timesteps(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_steps(stock, fused)
            x, z = torch.randn(SHAPE), torch.randn(SHAPE)
            # the stock sqrt(1 - ab_0) cancels in float32 (~1e-5 absolute), as in test_add_noise_and_velocity
            torch.testing.assert_close(fused.add_noise(x, z, torch.tensor([0])), stock.add_noise(x, z, torch.tensor([0])),
                                       rtol=2e-5, atol=2e-5)
        assert fused._dk_schedule(torch.device("cpu")).sampling_only


def _arguments(fn, args, kwargs) -> dict:
    """A call's arguments by name, however it passed them."""
    return inspect.signature(fn).bind(*args, **kwargs).arguments


def test_variance_type_other_is_fixed_small_as_in_stock():
    """The stock _get_variance computes a variance type it does not name as fixed_small; so does the fused step
    (fused, one warning), with the same noise draws."""
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, variance_type="other")
    for s in (stock, fused):
        s.set_timesteps(10)
    with pytest.warns(RuntimeWarning, match="'other'.*fixed_small") as caught:
        run_steps(stock, fused)
    assert len([w for w in caught if "variance_type" in str(w.message)]) == 1
    calls = []
    real = ops.ddpm_step
    try:
        ops.ddpm_step = lambda *a, **k: calls.append(_arguments(real, a, k)["variance_type"]) or real(*a, **k)
        fused.step(torch.randn(SHAPE), fused.timesteps[0], torch.randn(SHAPE))
    finally:
        ops.ddpm_step = real
    assert calls == ["fixed_small"]


@pytest.mark.parametrize("cls,fused_cls", [(diffusers.DDPMScheduler, FusedDDPMScheduler),
                                           (diffusers.DDIMScheduler, FusedDDIMScheduler)], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("config", [
    dict(beta_start=0.1, beta_end=2.0),                # betas past 1: alphas_cumprod changes sign
    dict(trained_betas=[0.0] + [0.01] * 9, num_train_timesteps=10),   # a zero beta: 1 - ab_0 == 0
    dict(prediction_type="score"),                     # the stock step raises its own ValueError
    dict(clip_sample_range=0.0),
    dict(clip_sample_range=-1.0),
    dict(thresholding=True, sample_max_value=-1.0),
    dict(thresholding=True, dynamic_thresholding_ratio=1.5),
], ids=["betas_past_1", "zero_beta", "prediction_score", "clip_range_0", "clip_range_neg",
        "threshold_max_neg", "threshold_ratio_1.5"])
def test_configs_the_fused_ops_do_not_take_run_stock(cls, fused_cls, config):
    """Configurations the fused ops reject construct, warn once and give the stock result or the stock error,
    in step and add_noise, at every timestep."""
    stock = cls(**config)
    with pytest.warns(RuntimeWarning, match="stock .* code path"):
        fused = fused_cls.from_config(stock.config)
        fused.add_noise(torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([0, 1]))
    for s in (stock, fused):
        s.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, mo, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    T = stock.config.num_train_timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per scheduler and cause: none from here on
        for t in list(stock.timesteps):
            step = lambda s: s.step(mo, t, x, generator=torch.Generator().manual_seed(1)).prev_sample  # noqa: E731
            assert_same_as_stock(step, stock, fused, warns=False)
        for t in (torch.tensor([0, T - 1]), torch.tensor([T // 2, 3])):
            assert_same_as_stock(lambda s: s.add_noise(x, z, t), stock, fused, warns=False)


def test_alphas_cumprod_underflowing_float32():
    """betas 0.01 -> 0.2 over 1000 steps: alphas_cumprod leaves float32's range (0 from t = 959 in the stock
    float32 cumprod). With x0 clipped (the default) the fused step equals the stock step everywhere; unclipped, x0
    from eps is ~1e24 there and the stock step overflows to inf, where the fused step gives the float64 result."""
    for cls, fused_cls in ((diffusers.DDPMScheduler, FusedDDPMScheduler), (diffusers.DDIMScheduler, FusedDDIMScheduler)):
        stock, fused = pair(cls, fused_cls, beta_start=0.01, beta_end=0.2)
        for s in (stock, fused):
            s.set_timesteps(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_steps(stock, fused)
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, beta_start=0.01, beta_end=0.2, clip_sample=False)
    for s in (stock, fused):
        s.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    expected = stock.step(mo, 999, x).prev_sample
    got = fused.step(mo, 999, x).prev_sample
    exact = fused.step(mo.double(), 999, x.double()).prev_sample
    assert torch.isinf(expected).all() and torch.isfinite(got).all()
    # the fp32 step here sums terms far larger than the result: judged against the fp32 reference (the
    # documented rule, docs/design.md "Tolerances"), and no further from the float64 result than that reference
    schedule = dk.DiffusionSchedule.from_diffusers(fused, sampling_only=True)
    t, t_prev = torch.full((SHAPE[0],), 999), torch.full((SHAPE[0],), 799)  # DDIM's step: 999 - 1000 // 5
    ref = dk.ddim_step(x, t, t_prev, mo, schedule, 0.0, "eps", False, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got.double() - exact).abs().max() <= (ref.double() - exact).abs().max()


def test_timesteps_outside_the_schedule_run_stock():
    """An int timestep outside [0, T): the stock step indexes with it (a negative one wraps around, T raises
    IndexError); the fused scheduler hands it over."""
    for cls, fused_cls in ((diffusers.DDPMScheduler, FusedDDPMScheduler), (diffusers.DDIMScheduler, FusedDDIMScheduler)):
        stock, fused = pair(cls, fused_cls)
        for s in (stock, fused):
            s.set_timesteps(10)
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
        for t in (1000, -1, -5, torch.tensor(1000)):
            assert_same_as_stock(lambda s: s.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                 stock, fused, warns=False)
        for t in (torch.tensor([1000, 3]), torch.tensor([-1, 3])):
            assert_same_as_stock(lambda s: s.add_noise(x, mo, t), stock, fused, warns=False)


def test_ddim_eta_and_variance_noise_the_fused_op_does_not_take_run_stock():
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler)
    for s in (stock, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x, mo, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = stock.timesteps[3]
    for eta in (-0.5, float("nan"), float("inf")):
        assert_same_as_stock(lambda s: s.step(mo, t, x, eta=eta, variance_noise=z).prev_sample, stock, fused, warns=False)
    # noise that broadcasts: one (1, C, H, W) draw for the whole batch
    assert_same_as_stock(lambda s: s.step(mo, t, x, eta=0.5, variance_noise=z[:1]).prev_sample, stock, fused)
    # both a generator and variance_noise: the stock error
    assert_same_as_stock(lambda s: s.step(mo, t, x, eta=0.5, variance_noise=z, generator=g), stock, fused, warns=False)
    # eta == 0 ignores variance_noise whatever its shape, as the stock step does: fused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = FusedDDIMScheduler.from_config(stock.config)
        got.set_timesteps(10)
        torch.testing.assert_close(got.step(mo, t, x, eta=0.0, variance_noise=z[:1]).prev_sample,
                                   stock.step(mo, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_model_output_the_fused_op_does_not_take_runs_stock():
    """A model output that broadcasts against the sample (or sits on another device / is not floating) is the
    stock step's business."""
    for cls, fused_cls in ((diffusers.DDPMScheduler, FusedDDPMScheduler), (diffusers.DDIMScheduler, FusedDDIMScheduler)):
        stock, fused = pair(cls, fused_cls)
        for s in (stock, fused):
            s.set_timesteps(10)
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
        t = stock.timesteps[2]
        assert_same_as_stock(lambda s: s.step(mo[:1], t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                             stock, fused)
        assert_same_as_stock(lambda s: s.step(mo[..., :1], t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                             stock, fused, warns=False)


@pytest.mark.parametrize("sample_dtype,model_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                                      (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_follow_the_stock_promotion(sample_dtype, model_dtype):
    """The stock step's arithmetic promotes sample and model output to a common dtype; so does the fused step,
    and it draws the noise in the model output's dtype as the stock step does."""
    for cls, fused_cls, kw in ((diffusers.DDPMScheduler, FusedDDPMScheduler, {}),
                               (diffusers.DDIMScheduler, FusedDDIMScheduler, {"eta": 1.0})):
        stock, fused = pair(cls, fused_cls, clip_sample=False)
        for s in (stock, fused):
            s.set_timesteps(10)
        g = torch.Generator().manual_seed(3)
        x, mo = torch.randn(SHAPE, generator=g).to(sample_dtype), torch.randn(SHAPE, generator=g).to(model_dtype)
        gs, gf = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        t = stock.timesteps[4]
        expected = stock.step(mo, t, x, generator=gs, **kw).prev_sample
        got = fused.step(mo, t, x, generator=gf, **kw).prev_sample
        assert got.dtype == expected.dtype == torch.promote_types(sample_dtype, model_dtype)
        assert torch.equal(gs.get_state(), gf.get_state())
        # the stock step rounds terms to the narrower dtype on the way (its noise term is computed in the model
        # output's dtype): a few units of that dtype's epsilon
        tol = 4 * torch.finfo(model_dtype if model_dtype.itemsize < sample_dtype.itemsize else sample_dtype).eps
        if sample_dtype.itemsize == model_dtype.itemsize:
            tol = 4 * max(torch.finfo(sample_dtype).eps, torch.finfo(model_dtype).eps)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_timestep_views_are_read_without_touching_the_tensor():
    """A timestep taken from scheduler.timesteps is recognized by its place in that tensor's storage (what makes
    a device timestep's value known without a sync): same result as the int, also after the timesteps were
    replaced or changed in place, and a view of anything else is not mistaken for one."""
    fused = FusedDDPMScheduler()
    fused.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = lambda t: fused.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample  # noqa: E731
    for i, t in enumerate(fused.timesteps):
        torch.testing.assert_close(ref(t), ref(int(fused.timesteps.tolist()[i])), rtol=0, atol=0)
    other = torch.arange(1000).flip(0)  # other[i] == 999 - i: its views must be read for their own value
    torch.testing.assert_close(ref(other[499]), ref(500), rtol=0, atol=0)
    fused.timesteps = fused.timesteps[1::2]
    assert [int(v) for v in fused.timesteps] == [800, 600, 400, 200, 0]
    for t in fused.timesteps:
        torch.testing.assert_close(ref(t), ref(int(t.tolist())), rtol=0, atol=0)
    fused.timesteps[0] = 700  # in place: the host copy of the values follows
    torch.testing.assert_close(ref(fused.timesteps[0]), ref(700), rtol=0, atol=0)


def test_ddpm_draws_nothing_at_t0_for_device_timesteps_from_the_schedule(monkeypatch):
    """With timesteps read as if on a device (no host reads), a timestep from scheduler.timesteps still tells
    t == 0 apart: no draw there, the generator ends where the stock one does."""
    monkeypatch.setattr(dkd, "_host_timesteps", lambda timestep: None)
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler)
    for s in (stock, fused):
        s.set_timesteps(4)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    gs, gf = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in stock.timesteps:
        stock.step(mo, t, x, generator=gs)
    for t in fused.timesteps:
        fused.step(mo, t, x, generator=gf)
    assert torch.equal(gs.get_state(), gf.get_state())
    # a copy is not a view of the schedule: drawn and masked, as documented
    fused.step(mo, fused.timesteps.clone()[-1], x, generator=gf)
    assert not torch.equal(gs.get_state(), gf.get_state())


def test_step_tensors_are_built_once_per_timestep_and_batch(monkeypatch):
    fused = FusedDDIMScheduler()
    fused.set_timesteps(5)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    fused.step(mo, fused.timesteps[0], x)
    fills = []
    real = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **k: fills.append(a) or real(*a, **k))
    for _ in range(2):
        for t in fused.timesteps:
            fused.step(mo, t, x)
    assert len(fills) == 2 * (len(fused.timesteps) - 1)  # t and t_prev for each timestep not seen before
    fused.set_timesteps(5)  # a new schedule drops them
    fused.step(mo, fused.timesteps[0], x)
    assert len(fills) == 2 * len(fused.timesteps)


# ------------------------------------------------------------------------------------ per-sample timesteps
def test_per_sample_timesteps_ddpm(monkeypatch):
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler, variance_type="fixed_small_log")
    for s in (stock, fused):
        s.set_timesteps(25)
    g = torch.Generator().manual_seed(5)
    ts = stock.timesteps[[0, 7, 24, 13]]
    sample, mo, z = (torch.randn((4,) + SHAPE[1:], generator=g) for _ in range(3))
    got = fused.step(mo, ts, sample, generator=torch.Generator().manual_seed(6))
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(6))
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    for i, t in enumerate(ts):
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, i=i, **k: z[i:i + 1].clone())
        expected = stock.step(mo[i:i + 1], t, sample[i:i + 1])
        torch.testing.assert_close(got.prev_sample[i:i + 1], expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pred_original_sample[i:i + 1], expected.pred_original_sample, rtol=1e-5,
                                   atol=1e-5)


def test_per_sample_timesteps_ddim():
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler, set_alpha_to_one=False)
    for s in (stock, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(7)
    ts = stock.timesteps[[9, 0, 4]]
    sample, mo, z = (torch.randn((3,) + SHAPE[1:], generator=g) for _ in range(3))
    got = fused.step(mo, ts, sample, eta=1.0, variance_noise=z)
    for i, t in enumerate(ts):
        expected = stock.step(mo[i:i + 1], t, sample[i:i + 1], eta=1.0, variance_noise=z[i:i + 1])
        torch.testing.assert_close(got.prev_sample[i:i + 1], expected.prev_sample, rtol=1e-5, atol=1e-5)


def test_timestep_forms():
    fused = FusedDDIMScheduler()
    fused.set_timesteps(10)
    g = torch.Generator().manual_seed(8)
    sample, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = fused.step(mo, 500, sample).prev_sample
    assert int(fused.timesteps[4]) == 500
    for t in (np.int64(500), torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500]),
              torch.tensor([500, 500], dtype=torch.int32), fused.timesteps[4], fused.timesteps[4:5],
              fused.timesteps.clone()[4]):
        torch.testing.assert_close(fused.step(mo, t, sample).prev_sample, ref, rtol=0, atol=0)


@pytest.mark.parametrize("timestep", [torch.tensor([501, 501, 501]), torch.tensor(501.0), 501.0, torch.tensor([[501]]),
                                      torch.tensor([[[[[501]]]]])],
                         ids=["three_for_two", "float_tensor", "float", "2d", "5d"])
def test_timestep_forms_the_stock_step_takes_or_rejects(timestep):
    """Timesteps that are neither an integer nor one per sample go to the stock step: its result or its error."""
    stock, fused = pair(diffusers.DDIMScheduler, FusedDDIMScheduler)
    for s in (stock, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(8)
    sample, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    assert_same_as_stock(lambda s: s.step(mo, timestep, sample).prev_sample, stock, fused)


# ------------------------------------------------------------------------------------------- add_noise
@pytest.mark.parametrize("cls,fused_cls", [(diffusers.DDPMScheduler, FusedDDPMScheduler),
                                           (diffusers.DDIMScheduler, FusedDDIMScheduler)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity(cls, fused_cls, dtype):
    stock, fused = pair(cls, fused_cls, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2)
    g = torch.Generator().manual_seed(9)
    x0, noise = (torch.randn(5, 4, 8, 8, generator=g, dtype=dtype) for _ in range(2))
    for t in (torch.tensor([0, 1, 500, 998, 999]), torch.tensor(300), torch.tensor([300]),
              torch.tensor([0, 1, 500, 998, 999], dtype=torch.int32)):
        # the stock scheduler builds alphas_cumprod by a float32 cumprod: ~1e-5 near t = 0
        torch.testing.assert_close(fused.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(fused.get_velocity(x0, noise, t), stock.get_velocity(x0, noise, t), rtol=2e-5,
                                   atol=2e-5)
    # shapes the fused op does not take go to the stock implementation
    torch.testing.assert_close(fused.add_noise(x0, noise[:1], torch.tensor([3] * 5)),
                               stock.add_noise(x0, noise[:1], torch.tensor([3] * 5)))


def test_add_noise_runs_the_fused_op(monkeypatch):
    fused = FusedDDPMScheduler()
    calls = []
    real = ops.q_sample
    monkeypatch.setattr(ops, "q_sample", lambda *a, **k: calls.append(k) or real(*a, **k))
    fused.add_noise(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2]))
    assert calls and calls[0]["backend"] == "auto"


# ------------------------------------------------------------------------------------------- no host sync
@pytest.fixture
def fail_on_sync(monkeypatch):
    """Make every value-reading Tensor method raise, as a device tensor read would sync. Timesteps are
    treated as device tensors (never read on the host). The one exception is ops' t range check, which runs
    on CPU tensors only (where it is free) and is skipped for device tensors."""
    monkeypatch.setattr(dkd, "_host_timesteps", lambda timestep: None)
    return sync_guard(monkeypatch, {"_check_timesteps"})


@pytest.mark.parametrize("in_kernel_noise", [False, True])
def test_step_has_no_host_sync(fail_on_sync, in_kernel_noise):
    ddpm = FusedDDPMScheduler(variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.9,
                              sample_max_value=1.5)
    ddim = FusedDDIMScheduler(thresholding=True)
    for s in (ddpm, ddim):
        s.set_timesteps(5, device="cpu")
        s.in_kernel_noise = in_kernel_noise
    g = torch.Generator().manual_seed(10)
    x = torch.randn(SHAPE, generator=g)
    mo2 = torch.randn((2, 6) + SHAPE[2:], generator=g)
    mo = torch.randn(SHAPE, generator=g)
    ddpm_ts, ddim_ts = list(ddpm.timesteps), list(ddim.timesteps)
    per_sample = torch.stack([ddpm.timesteps[0], ddpm.timesteps[3]])
    # views of scheduler.timesteps (what loops pass) and copies (looked up on the device)
    copies = [t.clone() for t in ddpm_ts], [t.clone() for t in ddim_ts]
    fail_on_sync()
    for _ in range(2):  # the second pass takes the cached timestep tensors
        for t in ddpm_ts + copies[0] + [per_sample]:
            x = ddpm.step(mo2, t, x, generator=g).prev_sample
        for t in ddim_ts + copies[1]:
            x = ddim.step(mo, t, x, eta=1.0, generator=g).prev_sample
    x = ddpm.add_noise(x, mo, per_sample)


def test_sync_guard_catches_the_stock_scheduler(fail_on_sync):
    """The guard is not vacuous: the stock DDPM step reads the timestep (t > 0, nonzero())."""
    x, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    assert_stock_reads_the_device(fail_on_sync, diffusers.DDPMScheduler(),
                                  lambda stock, t: stock.step(model_output, t, x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_has_no_host_sync_on_cuda():
    for sched, kw in ((FusedDDPMScheduler(variance_type="learned_range", thresholding=True), {}),
                      (FusedDDIMScheduler(), {"eta": 1.0})):
        sched.set_timesteps(5, device="cuda")
        g = torch.Generator("cuda").manual_seed(0)
        channels = 6 if isinstance(sched, FusedDDPMScheduler) else 3
        x = torch.randn(SHAPE, device="cuda")
        mo = torch.randn((2, channels) + SHAPE[2:], device="cuda")
        sched.step(mo, sched.timesteps[0], x, generator=g, **kw)  # warm-up: lazy allocations, backend loading
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                x = sched.step(mo, t, x, generator=g, **kw).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_cuda_timesteps_same_images_and_generator_state_as_stock(generator_device):
    """Timesteps on the GPU (set_timesteps(device="cuda"), as SD pipelines do) are recognized as views of the
    schedule: the DDPM step skips the draw at t == 0 like the stock one, so images and generator state match;
    a CPU generator draws on the CPU and moves the noise, as diffusers' randn_tensor does."""
    for cls, fused_cls, kw in ((diffusers.DDPMScheduler, FusedDDPMScheduler, {}),
                               (diffusers.DDIMScheduler, FusedDDIMScheduler, {"eta": 1.0})):
        stock, fused = pair(cls, fused_cls, clip_sample=False)
        for s in (stock, fused):
            s.set_timesteps(6, device="cuda")
        x0 = torch.randn(SHAPE, device="cuda")
        mo = torch.randn(SHAPE, device="cuda")
        results = []
        for s in (stock, fused):
            g = torch.Generator(generator_device).manual_seed(0)
            x = x0
            for t in s.timesteps:
                x = s.step(mo, t, x, generator=g, **kw).prev_sample
            results.append((x, g.get_state()))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
        assert torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------- noise, config
def test_in_kernel_noise_hands_the_generator_to_the_op(monkeypatch):
    fused = FusedDDPMScheduler()
    fused.set_timesteps(10)
    seen = {}
    real = ops.ddpm_step
    def spy(*a, **k):
        arguments = _arguments(real, a, k)
        seen.update(noise=arguments["noise"], generator=arguments["generator"])
        return real(*a, **k)

    monkeypatch.setattr(ops, "ddpm_step", spy)
    g = torch.Generator().manual_seed(0)
    fused.step(torch.randn(SHAPE), fused.timesteps[0], torch.randn(SHAPE), generator=g)
    assert seen["noise"] is not None and seen["generator"] is None
    fused.in_kernel_noise = True
    fused.step(torch.randn(SHAPE), fused.timesteps[0], torch.randn(SHAPE), generator=g)
    assert seen["noise"] is None and seen["generator"] is g


def test_no_noise_drawn_at_t0_for_host_timesteps():
    stock, fused = pair(diffusers.DDPMScheduler, FusedDDPMScheduler)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    gs, gf = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    stock.step(mo, 0, x, generator=gs)
    fused.step(mo, torch.tensor(0), x, generator=gf)
    assert torch.equal(gs.get_state(), gf.get_state())


@pytest.mark.parametrize("generator", GENERATOR_FORMS)
def test_noise_draw_equals_randn_tensor(generator):
    """The step's draw is diffusers' randn_tensor: same numbers, same generator (or global RNG) state after."""
    for dtype in (torch.float32, torch.float16):
        g1 = generator_form(generator, SHAPE[0])
        expected = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=g1, device=torch.device("cpu"), dtype=dtype)
        s1 = generator_state(g1)
        g2 = generator_form(generator, SHAPE[0])
        got = _randn(torch.Size(SHAPE), g2, torch.device("cpu"), dtype)
        assert torch.equal(got, expected) and got.dtype == dtype
        assert all(torch.equal(a, b) for a, b in zip(generator_state(g2), s1))


@pytest.mark.parametrize("generator", GENERATOR_FORMS)
def test_kept_noise_buffer_draws_randn_tensor(generator):
    """A drop-in's step noise drawn into its kept buffer (`_dk_randn`) is randn_tensor's draw, call after call
    (the buffer reused, in and out of inference mode, another dtype or shape), and so is the cast to the op's
    dtype; the buffer is not pickled."""
    fused = FusedDDPMScheduler()
    g = generator_form(generator, SHAPE[0])
    buffered = generator in ("none", "one")  # (a list goes through randn_tensor)
    cpu = torch.device("cpu")

    def rewind(states):
        for target, state in zip(g if isinstance(g, list) else [g], states):
            torch.set_rng_state(state) if target is None else target.set_state(state)
    draws = [(SHAPE, torch.float32, None, False), (SHAPE, torch.float32, None, True), (SHAPE, torch.float32, None,
             False), (SHAPE, torch.float16, torch.float32, False), ((SHAPE[0], 5, 7), torch.float32, None, False)]
    for shape, dtype, as_dtype, inference in draws:
        before = generator_state(g)
        expected = diffusers.utils.torch_utils.randn_tensor(shape, generator=g, device=cpu, dtype=dtype)
        if as_dtype is not None:
            expected = expected.to(as_dtype)
        after = generator_state(g)
        rewind(before)
        with torch.inference_mode(inference):
            got = fused._dk_randn(torch.Size(shape), g, cpu, dtype, as_dtype)
        assert torch.equal(got, expected) and got.dtype == expected.dtype
        # (the kept buffer is a normal tensor, drawn into under inference mode too)
        assert got.is_inference() == (inference and not buffered)
        assert all(torch.equal(a, b) for a, b in zip(generator_state(g), after))
    assert (fused.__dict__.get("_dk_noise_") is not None) == buffered
    assert "_dk_noise_" not in pickle.loads(pickle.dumps(fused)).__dict__


def test_step_output_is_the_stock_output():
    """The step's output is built without the dataclass constructor; it is the same object the constructor
    builds, for both return forms."""
    for cls, fused_cls, out_cls in ((diffusers.DDPMScheduler, FusedDDPMScheduler, dkd.DDPMSchedulerOutput),
                                    (diffusers.DDIMScheduler, FusedDDIMScheduler, dkd.DDIMSchedulerOutput)):
        fused = fused_cls()
        fused.set_timesteps(10)
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
        out = fused.step(mo, fused.timesteps[2], x, generator=torch.Generator().manual_seed(0))
        ref = out_cls(prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample)
        assert type(out) is out_cls
        assert list(out.keys()) == list(ref.keys()) == ["prev_sample", "pred_original_sample"]
        assert vars(out).keys() == vars(ref).keys()
        assert out[0] is out["prev_sample"] is out.prev_sample and out[1] is out.pred_original_sample
        assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)
        tup = fused.step(mo, fused.timesteps[2], x, generator=torch.Generator().manual_seed(0), return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 2
        torch.testing.assert_close(tup[0], out.prev_sample, rtol=0, atol=0)
        out.prev_sample = x  # the dataclass' attribute assignment writes through to the item, as on a stock one
        assert out["prev_sample"] is x


def test_step_tensor_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(dkd, "_STEP_CACHE_LIMIT", 4)
    fused = FusedDDIMScheduler()
    fused.set_timesteps(10)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in list(fused.timesteps) + list(range(0, 1000, 37)):
        expected = fused.step(mo, int(t), x).prev_sample
        torch.testing.assert_close(fused.step(mo, t, x).prev_sample, expected, rtol=0, atol=0)
        steps = fused.__dict__["_dk_steps_"]
        assert len(steps.tensors) + len(steps.views) <= 5


def test_config_round_trip(tmp_path):
    stock = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    timestep_spacing="trailing", rescale_betas_zero_snr=True)
    fused = FusedDDIMScheduler.from_config(stock.config)
    assert isinstance(fused, diffusers.DDIMScheduler)
    keys = {k for k in stock.config if not k.startswith("_")}
    assert {k: fused.config[k] for k in keys} == {k: stock.config[k] for k in keys}
    fused.save_pretrained(tmp_path)
    again = FusedDDIMScheduler.from_pretrained(tmp_path)
    back = diffusers.DDIMScheduler.from_config(again.config)
    assert {k: back.config[k] for k in keys} == {k: stock.config[k] for k in keys}
    ddpm = FusedDDPMScheduler.from_config(diffusers.DDPMScheduler(variance_type="learned_range").config)
    assert ddpm.variance_type == "learned_range" and ddpm.config.variance_type == "learned_range"


# ------------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    make = lambda out_channels: diffusers.UNet2DModel(  # noqa: E731
        sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()
    return {3: make(3), 6: make(6)}


def _images(pipe, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = pipe(batch_size=2, generator=g, output_type="np", **kw).images
    return images, g.get_state()


@pytest.mark.parametrize("config", [
    dict(),
    dict(variance_type="learned_range", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(variance_type="fixed_large", thresholding=True, sample_max_value=1.5, clip_sample=False),
], ids=["default", "learned_range_v", "fixed_large_threshold"])
def test_ddpm_pipeline_same_images(unets, config):
    stock = diffusers.DDPMScheduler(num_train_timesteps=100, **config)
    unet = unets[6 if config.get("variance_type") == "learned_range" else 3]
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=stock)
    pipe.set_progress_bar_config(disable=True)
    expected, state = _images(pipe, 0, num_inference_steps=6)
    pipe.scheduler = FusedDDPMScheduler.from_config(stock.config)
    got, fused_state = _images(pipe, 0, num_inference_steps=6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(state, fused_state)  # the same random numbers were drawn


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [
    dict(),
    dict(set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False),
], ids=["default", "trailing_v"])
def test_ddim_pipeline_same_images(unets, eta, config):
    stock = diffusers.DDIMScheduler(num_train_timesteps=100, **config)
    pipe = diffusers.DDIMPipeline(unet=unets[3], scheduler=stock)
    pipe.set_progress_bar_config(disable=True)
    expected, state = _images(pipe, 1, num_inference_steps=5, eta=eta)
    # DDIMPipeline converts the scheduler it is built with to a stock DDIMScheduler; assign afterwards
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    got, fused_state = _images(pipe, 1, num_inference_steps=5, eta=eta)
    assert isinstance(pipe.scheduler, FusedDDIMScheduler)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(state, fused_state)


def _drop_in_pairs():
    import diffusers

    from ddpm_kernels.integrations import diffusers as fused

    return [(getattr(fused, name), getattr(diffusers, name[len("Fused"):])) for name in fused.__all__]


@pytest.mark.parametrize("pair", _drop_in_pairs(), ids=lambda p: p[0].__name__)
def test_drop_ins_run_under_inference_mode(pair):
    """A pipeline call wrapped in torch.inference_mode (its set_timesteps too; inference tensors keep no version
    counter, which the drop-ins' cached tables are checked against), then a second loop on the same scheduler
    outside it (the step index tensor made inside is advanced outside): stock's results both times."""
    from ddpm_kernels.bench.loops import diffusers_loop

    fused_cls, stock_cls = pair
    results = []
    for cls in (fused_cls, stock_cls):
        scheduler = cls()
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        model = lambda x, t: 0.5 * x  # noqa: E731
        with torch.inference_mode():
            first = diffusers_loop(scheduler, model, x, 4, "cpu", torch.Generator().manual_seed(1)).sample
        second = diffusers_loop(scheduler, model, x, 6, "cpu", torch.Generator().manual_seed(2)).sample
        results.append((first, second))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*requires grad")
@pytest.mark.parametrize("pair", _drop_in_pairs(), ids=lambda p: p[0].__name__)
def test_drop_in_steps_asked_for_a_gradient_keep_the_graph(pair):
    """A step whose model output requires grad (guidance by gradients through the sampler) runs the stock step,
    with one warning: prev_sample keeps the graph, and the gradient is stock's."""
    fused_cls, stock_cls = pair
    grads, samples = [], []
    for cls in (fused_cls, stock_cls):
        scheduler = cls()
        scheduler.set_timesteps(4)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        w = torch.ones(1, requires_grad=True)
        t = scheduler.timesteps[0]
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        step = scheduler.step(0.5 * x_in * w, t, x, generator=torch.Generator().manual_seed(1)) \
            if "generator" in inspect.signature(scheduler.step).parameters else scheduler.step(0.5 * x_in * w, t, x)
        assert step.prev_sample.requires_grad
        (g,) = torch.autograd.grad(step.prev_sample.square().sum(), w)
        grads.append(g)
        samples.append(step.prev_sample.detach())
    torch.testing.assert_close(samples[0], samples[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)
