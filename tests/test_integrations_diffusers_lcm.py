"""FusedLCMScheduler against the stock diffusers LCMScheduler: full sampling loops over the option matrix (same
samples and denoised outputs within float32 rounding, same dtypes, same generator state), img2img starts, no
host sync, the compatibles, and the stock code path (one warning) for what the fused step does not take."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import LCMScheduler  # noqa: E402

from ddpm_kernels.integrations.diffusers import FusedLCMScheduler  # noqa: E402
from helpers import (  # noqa: E402
    assert_close_to_stock, assert_stock_step_errors, scheduler_model, scheduler_pair,
    fail_on_sync,  # noqa: F401  (a fixture)
)
from test_lcm import lcm64  # noqa: E402  (the float64 step)

SHAPE = (2, 4, 6, 5)


def pair(config=None, steps=4, **set_kwargs):
    return scheduler_pair(LCMScheduler, FusedLCMScheduler, config or {}, steps, **set_kwargs)


def run_loop(scheduler, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(scheduler_model(x, t), t, x, generator=g)
        outputs.append((out.prev_sample, out.denoised))
        x = out.prev_sample
    return outputs, g.get_state()


def assert_same_loop(stock, fused, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_state = run_loop(fused, **kw)
    assert not [w for w in caught if "stock" in str(w.message)], [str(w.message) for w in caught]
    expected, expected_state = run_loop(stock, **kw)
    assert torch.equal(got_state, expected_state)  # the same draws: same generator state
    for i, ((prev, denoised), (e_prev, e_denoised)) in enumerate(zip(got, expected)):
        assert_close_to_stock(prev, e_prev, f"prev_sample at step {i}")
        assert_close_to_stock(denoised, e_denoised, f"denoised at step {i}")
    # each step's denoised is its own tensor, as stock returns it
    assert len({d.data_ptr() for _, d in got}) == len(got)


CONFIGS = {
    "default": {},
    "v": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "clip": dict(clip_sample=True, clip_sample_range=0.8),
    "threshold": dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    "threshold-below-1": dict(thresholding=True, sample_max_value=0.5),
    "scaling": dict(timestep_scaling=1.0),
    "trailing-zero-snr": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                              prediction_type="v_prediction"),
    "linear": dict(beta_schedule="linear", set_alpha_to_one=False),
}


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loop_equals_stock(name, steps):
    stock, fused = pair(CONFIGS[name], steps)
    assert torch.equal(fused.timesteps, stock.timesteps)
    assert_same_loop(stock, fused)


def test_img2img_strength_and_custom_timesteps():
    assert_same_loop(*pair(steps=6, strength=0.5))
    stock, fused = pair()
    for s in (stock, fused):
        s.set_timesteps(timesteps=[899, 699, 499, 299, 99])
    assert_same_loop(stock, fused)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_at_least_as_close_to_fp64_as_stock(dtype):
    """Each step on half-precision inputs, against the float64 step on the same inputs and noise: the stock
    dtypes, and the fused step (float32 math, one rounding) no farther than stock (rounding each term)."""
    stock, fused = pair(steps=6)
    acp = stock.alphas_cumprod.double().numpy()
    ts = stock.timesteps.tolist()
    g = torch.Generator().manual_seed(5)
    shape = (4, 4, 16, 16)
    for index in range(6):
        x, mo = (torch.randn(shape, generator=g) * 2).to(dtype), torch.randn(shape, generator=g).to(dtype)
        results = []
        for s in (stock, fused):
            s.set_begin_index(index)
            s._step_index = None
            out = s.step(mo, s.timesteps[index], x, generator=torch.Generator().manual_seed(index))
            assert out.prev_sample.dtype == out.denoised.dtype == dtype
            results.append(out.prev_sample)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=dtype)
        final = index == 5
        exact, _ = lcm64(x.double().numpy(), mo.double().numpy(), noise.double().numpy(), acp[ts[index]],
                         acp[ts[index if final else index + 1]], ts[index], "epsilon", 10.0, last=final)
        stock_err, fused_err = ((r.double().numpy() - exact).__abs__().max() for r in results)
        assert fused_err <= stock_err, (index, fused_err, stock_err)


def test_in_kernel_noise_draws_from_the_generator_in_the_op():
    _, fused = pair()
    fused.in_kernel_noise = True
    first, _ = run_loop(fused, seed=3)
    fused.set_timesteps(4)
    second, _ = run_loop(fused, seed=3)
    for (a, _), (b, _) in zip(first, second):
        assert torch.equal(a, b)
    assert torch.isfinite(first[-1][0]).all()


def test_compatibles_include_the_stock_class():
    assert LCMScheduler in FusedLCMScheduler().compatibles
    back = LCMScheduler.from_config(FusedLCMScheduler().config)
    assert type(back) is LCMScheduler


def test_step_has_no_host_sync(fail_on_sync):
    _, fused = pair(dict(thresholding=True), steps=6)
    view = fused.timesteps[0]
    later = [t.clone() for t in fused.timesteps[1:]]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    fail_on_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = fused.step(scheduler_model(x, 500.0), view, x, generator=g).prev_sample
        for t in later:
            x = fused.step(scheduler_model(x, 500.0), t, x, generator=g).prev_sample
    assert not [w for w in caught if "stock" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda_and_same_samples_as_stock():
    results = []
    for cls in (LCMScheduler, FusedLCMScheduler):
        s = cls()
        s.set_timesteps(6, device="cuda")
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x = s.step(scheduler_model(x, 1.0), s.timesteps[0], x, generator=g).prev_sample
        torch.cuda.synchronize()
        if cls is FusedLCMScheduler:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps[1:]:
                x = s.step(scheduler_model(x, 1.0), t, x, generator=g).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((x, g.get_state()))
    assert torch.equal(results[1][1], results[0][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)


def test_unsupported_options_take_the_stock_path_with_one_warning():
    stock, fused = pair(dict(clip_sample=True, clip_sample_range=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_state = run_loop(fused)
    messages = [str(w.message) for w in caught if "stock" in str(w.message)]
    assert len(messages) == 1 and "clip_sample_range" in messages[0]
    expected, expected_state = run_loop(stock)
    assert torch.equal(got_state, expected_state) and torch.equal(got[-1][0], expected[-1][0])


def test_stock_errors_are_the_stock_ones():
    assert_stock_step_errors(FusedLCMScheduler(prediction_type="flow_prediction"), FusedLCMScheduler(), 4, SHAPE)


@pytest.mark.parametrize("form", [float, lambda t: t.float(), lambda t: t.double(), lambda t: np.float32(t)],
                         ids=["float", "float32-tensor", "float64-tensor", "np.float32"])
def test_a_float_timestep_gets_the_stock_error(form):
    # stock indexes its alphas_cumprod by the timestep itself: a float one raises IndexError there
    stock, fused = pair()
    x = torch.zeros(SHAPE)
    for scheduler in (stock, fused):
        with pytest.raises(IndexError):
            scheduler.step(x, form(scheduler.timesteps[0]), x)


def test_repeated_steps_take_the_checked_call(monkeypatch):
    """After a step passed `solver_step`'s checks, the next steps (each with its stock-drawn noise, a new
    `denoised` buffer and, with clip_sample, a clip range) are direct steps through the server resolved then
    (`solvers.table_step_server`; the last step, without noise, through the same call's server without it), bit
    for bit the fully checked steps, the generator drawn as stock draws it. The same schedule set again (a
    pipeline's next generation) keeps the checked call: its first step is served too."""
    from ddpm_kernels.integrations.diffusers import _solver

    calls, direct = [], []
    real_step, real_server = _solver.solver_step, _solver.table_step_server
    real_served = _solver._SolverDropIn._dk_served

    def spy_step(*args, **kwargs):
        calls.append("checked")
        return real_step(*args, **kwargs)

    def spy_server(*args):
        step = real_server(*args)
        return lambda *b: calls.append("server") or step(*b)

    def spy_served(self, *args):
        direct.append(self._step_index)
        return real_served(self, *args)

    monkeypatch.setattr(_solver, "solver_step", spy_step)
    monkeypatch.setattr(_solver, "table_step_server", spy_server)
    monkeypatch.setattr(_solver._SolverDropIn, "_dk_served", spy_served)
    for config in ({}, dict(clip_sample=True, clip_sample_range=1.5)):
        fused, checked = (FusedLCMScheduler(**config) for _ in range(2))
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        for loop in range(2):
            calls.clear(), direct.clear()
            for s in (fused, checked):
                s.set_timesteps(6)
            x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
            denoised = []
            for t in fused.timesteps:
                out = scheduler_model(x, t)
                x, d = fused.step(out, t, x, generator=g1).to_tuple()
                for key in checked._dk_transient:  # every step fully checked
                    checked.__dict__.pop(key, None)
                y, e = checked.step(out, t, y, generator=g2, return_dict=False)
                assert torch.equal(x, y) and torch.equal(d, e), t
                denoised.append(d)
            assert torch.equal(g1.get_state(), g2.get_state())
            # a new `denoised` every step, as stock returns
            assert len({d.data_ptr() for d in denoised}) == len(denoised)
            # fused: checked once, then the direct steps through the servers (the first step of the same schedule
            # set again through the checked call's server)
            assert calls[::2] == ["checked" if loop == 0 else "server"] + ["server"] * 5, config
            assert direct == [1, 2, 3, 4, 5], config
