"""FusedUniPCMultistepScheduler against the stock diffusers scheduler it replaces: full 10- and 25-step loops over
the option matrix (same samples within float32 rounding, same dtypes, same host state), the stock NaN cases
finite and at the float64 limit, no host sync, no per-step allocation, and the stock code path (one warning)
for what the fused step does not take."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from ddpm_kernels.integrations.diffusers import FusedUniPCMultistepScheduler  # noqa: E402
from ddpm_kernels.integrations.diffusers import _solver  # noqa: E402
from helpers import (  # noqa: E402
    HAS_SCIPY, assert_close_to_stock, assert_stock_reads_the_device, assert_stock_step_errors, scheduler_model,
    scheduler_pair, fail_on_sync,  # noqa: F401  (a fixture)
)

SHAPE = (2, 4, 6, 5)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def pair(config=None, steps=10, **set_kwargs):
    config = dict(SD, **(config or {}))
    return scheduler_pair(UniPCMultistepScheduler, FusedUniPCMultistepScheduler, config, steps, **set_kwargs)


def run_loop(scheduler, dtype=torch.float32, begin=0, x=None, record=False):
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype)
    if begin:
        scheduler.set_begin_index(begin)
    states = []
    for t in scheduler.timesteps[begin:]:
        x = scheduler.step(scheduler_model(x, t), t, x).prev_sample
        if record:
            states.append((scheduler.step_index, scheduler.this_order, scheduler.lower_order_nums))
    return x, states


def fused_loop(fused, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_loop(fused, **kw)
    assert not [w for w in caught if "stock" in str(w.message)], [str(w.message) for w in caught]
    return got


CONFIGS = {
    "default": {},
    "order1": dict(solver_order=1),
    "order3": dict(solver_order=3),
    "order3-no-lower-final-sigma-min": dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    "disable-corrector": dict(solver_order=3, disable_corrector=[0, 2, 5]),
    "eps-form-sigma-min": dict(predict_x0=False, final_sigmas_type="sigma_min"),
    "eps-form-bh1-v-sigma-min": dict(predict_x0=False, solver_type="bh1", prediction_type="v_prediction",
                                     final_sigmas_type="sigma_min"),
    "v": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample", solver_order=3),
    "thresholding": dict(thresholding=True, sample_max_value=1.5, prediction_type="sample"),
    "karras": dict(use_karras_sigmas=True, solver_order=3),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "trailing-zero-snr-v": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                prediction_type="v_prediction"),
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "flow": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    "flow-sigma-min": dict(use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="sigma_min"),
    "midpoint-is-bh2": dict(solver_type="midpoint"),
}


@pytest.mark.parametrize("begin", [0, 4])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.skipif(k == "beta" and not HAS_SCIPY,
                                                                           reason="needs scipy")) for k in CONFIGS])
def test_loop_equals_stock(name, steps, begin):
    stock, fused = pair(CONFIGS[name], steps)
    assert torch.equal(fused.timesteps, stock.timesteps) and torch.equal(fused.sigmas, stock.sigmas)
    got, got_states = fused_loop(fused, begin=begin, record=True)
    expected, expected_states = run_loop(stock, begin=begin, record=True)
    assert_close_to_stock(got, expected, name)
    assert got_states == expected_states  # step index, this_order, lower_order_nums as stock keeps them


@pytest.mark.parametrize("form", [np.array, torch.tensor, tuple], ids=["ndarray", "tensor", "tuple"])
def test_disable_corrector_as_an_array_or_tensor_equals_stock(form):
    # stock tests `step_index - 1 in disable_corrector`, which any sequence of step indices answers
    stock, fused = pair(dict(solver_order=3, disable_corrector=form([0, 2, 5])))
    assert_close_to_stock(fused_loop(fused)[0], run_loop(stock)[0])


@pytest.mark.parametrize("config", [
    dict(solver_type="bh1"),
    dict(predict_x0=False),
    dict(predict_x0=False, solver_order=3, lower_order_final=False),
    dict(solver_order=3, lower_order_final=False),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_stock_nan_cases_are_finite_and_the_limit(config):
    """The stock loop ends in NaN (or a singular solve) at a zero final sigma; the fused one is finite and
    equals the float64 math at a vanishing final sigma (where that has a limit; else the first-order step,
    tests/test_unipc.py)."""
    stock, fused = pair(config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got, _ = fused_loop(fused, x=x)
    assert torch.isfinite(got).all()
    try:
        finite = bool(torch.isfinite(run_loop(stock, x=x)[0]).all())
    except torch.linalg.LinAlgError:
        finite = False
    assert not finite
    exact = UniPCMultistepScheduler(**dict(SD, **config))
    exact.set_timesteps(10)
    exact.sigmas = exact.sigmas.double()
    exact.sigmas[-1] = 1e-14
    expected = x.double()
    for i, t in enumerate(exact.timesteps):
        if i == 9 and exact.predict_x0:
            exact.register_to_config(lower_order_final=True)  # no limit: the first-order last step
        expected = exact.step(scheduler_model(expected, t), t, expected).prev_sample
    assert_close_to_stock(got.double(), expected)


def test_half_precision_is_at_least_as_close_to_fp64_as_stock():
    errors = []
    for dtype in (torch.float16, torch.bfloat16):
        stock, fused = pair(dict(solver_order=3))
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        exact = UniPCMultistepScheduler(**dict(SD, solver_order=3))
        exact.set_timesteps(10)
        exact.sigmas = exact.sigmas.double()
        x64, _ = run_loop(exact, dtype=torch.float64, x=x.to(dtype).double())
        got, _ = fused_loop(fused, dtype=dtype, x=x)
        ref, _ = run_loop(stock, dtype=dtype, x=x)
        assert got.dtype == ref.dtype == dtype
        errors.append(((got.double() - x64).abs().max().item(), (ref.double() - x64).abs().max().item()))
    for fused_err, stock_err in errors:
        assert fused_err <= stock_err, errors


@pytest.mark.parametrize("sample_dtype, model_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_mixed_dtypes_give_the_stock_dtype_closer_to_fp64(sample_dtype, model_dtype):
    """A model output in another dtype than the sample: the stock result dtype (the sample's), and closer to the
    float64 loop (the same roundings of the sample and the output before each model call) than stock, which
    rounds sigma * output to the output's dtype."""
    stock, fused = pair(dict(solver_order=3), 6)
    exact = UniPCMultistepScheduler(**dict(SD, solver_order=3))
    exact.set_timesteps(6)
    exact.sigmas = exact.sigmas.double()
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for s in (fused, exact, stock):
        x = start.to(sample_dtype) if s is not exact else start.to(sample_dtype).double()
        try:
            for t in s.timesteps:
                mo = scheduler_model(x.to(sample_dtype), t).to(model_dtype)
                x = s.step(mo if s is not exact else mo.double(), t, x).prev_sample
        except RuntimeError:  # stock's order-3 einsum of float16 rhos with float32 differences
            assert s is stock and sample_dtype == torch.float16
            x = torch.full_like(x, math.inf)
        results.append(x)
    assert results[0].dtype == results[2].dtype == sample_dtype
    fused_err, stock_err = ((results[i].double() - results[1]).abs().max().item() for i in (0, 2))
    assert math.isfinite(fused_err) and fused_err <= stock_err, (fused_err, stock_err)


@pytest.mark.parametrize("memory_format", [torch.channels_last])
def test_channels_last_stays_channels_last(memory_format):
    stock, fused = pair(dict(solver_order=3))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(memory_format=memory_format)
    got, _ = fused_loop(fused, x=x)
    assert got.is_contiguous(memory_format=memory_format)
    assert fused._dk_buffers_[1][0].is_contiguous(memory_format=memory_format)  # the ring's slots too
    assert_close_to_stock(got, run_loop(stock, x=x)[0])


def test_a_layout_change_within_the_loop_keeps_the_state():
    # a first sample with the batch innermost (no dense format: the kernels take a row-major copy) and row-major
    # results after it, as diffusers' own scheduler tests build theirs: the ring and the last sample carry over
    stock, fused = pair(dict(solver_order=3))
    x = torch.randn(SHAPE[1:] + SHAPE[:1], generator=torch.Generator().manual_seed(1)).permute(3, 0, 1, 2)
    assert_close_to_stock(fused_loop(fused, x=x)[0], run_loop(stock, x=x)[0])


def test_a_second_loop_reuses_the_buffers_and_equals_the_first():
    _, fused = pair(dict(solver_order=3))
    first, _ = fused_loop(fused)
    history, last = fused._dk_buffers_[1:3]
    fused.set_timesteps(10)
    second, _ = fused_loop(fused)
    assert torch.equal(first, second)
    assert fused._dk_buffers_[1] is history and fused._dk_buffers_[2] is last and fused.last_sample is last


def test_a_schedule_set_again_reuses_its_table_and_a_changed_one_is_rebuilt(monkeypatch):
    # pipelines call set_timesteps with the same steps every generation: the table is built once for those values
    _, fused = pair(dict(solver_order=3))
    builds = []
    build = FusedUniPCMultistepScheduler._dk_build
    monkeypatch.setattr(FusedUniPCMultistepScheduler, "_dk_build",
                        lambda self, schedule, begin: builds.append(schedule.steps) or build(self, schedule, begin))
    first, _ = fused_loop(fused)
    fused.set_timesteps(10)
    again, _ = fused_loop(fused)
    assert builds == [10] and torch.equal(first, again)
    stock, _ = pair(dict(solver_order=3), steps=12)
    fused.set_timesteps(12)  # other values: a new table, equal to stock's step
    assert_close_to_stock(fused_loop(fused)[0], run_loop(stock)[0])
    fused.config.prediction_type = "v_prediction"  # a config change in place: a new key
    fused.set_timesteps(12)
    stock.config.prediction_type = "v_prediction"
    stock.set_timesteps(12)
    assert_close_to_stock(fused_loop(fused)[0], run_loop(stock)[0])
    assert builds == [10, 12, 12]


# ------------------------------------------------------------------------------------------- no sync, no allocation
def test_step_has_no_host_sync(fail_on_sync):
    schedulers = [pair(c)[1] for c in (CONFIGS["default"], CONFIGS["order3"], CONFIGS["thresholding"],
                                       CONFIGS["flow"])]
    begin = pair()[1]
    begin.set_begin_index(3)
    views = [s.timesteps[0] for s in schedulers]  # what iterating the timesteps yields
    steps = [[t.clone() for t in s.timesteps] for s in schedulers]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    fail_on_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s, view, ts in zip(schedulers, views, steps):
            y = s.step(scheduler_model(x, 500.0), view, x).prev_sample  # a view: found in the host copy
            for t in ts[1:]:  # later steps read nothing, whatever the timestep
                y = s.step(scheduler_model(y, 500.0), t, y).prev_sample
        begin.step(scheduler_model(x, 500.0), steps[0][3], x)  # begin_index: not read
    assert not [w for w in caught if "stock" in str(w.message)]


def test_sync_guard_catches_the_stock_scheduler(fail_on_sync):
    """The guard is not vacuous: the stock first lookup reads the timesteps (nonzero().item())."""
    x = torch.zeros(SHAPE)
    assert_stock_reads_the_device(fail_on_sync, UniPCMultistepScheduler(**SD),
                                  lambda stock, t: stock.step(x, t.clone(), x))


def test_no_per_step_allocation_of_state(monkeypatch):
    """The table is built and copied once, the ring, the last sample and the step index are allocated once:
    a step allocates its result only."""
    _, fused = pair(dict(solver_order=3))
    builds, rings = [], []
    build, new_history = fused._dk_build, _solver.new_history
    monkeypatch.setattr(fused, "_dk_build", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(_solver, "new_history", lambda *a: rings.append(1) or new_history(*a))
    x = torch.randn(SHAPE)
    seen = set()
    for t in fused.timesteps:
        x = fused.step(scheduler_model(x, t), t, x).prev_sample
        seen.add((id(fused._dk_buffers_[1]), id(fused._dk_buffers_[2]), id(fused._dk_index_[0])))
    assert len(builds) == 1 and len(rings) == 1 and len(seen) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda_and_same_samples_as_stock():
    results = []
    for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
        s = cls(**SD, solver_order=3)
        s.set_timesteps(12, device="cuda")
        x = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x = s.step(scheduler_model(x, 1.0), s.timesteps[0], x).prev_sample
        torch.cuda.synchronize()
        if cls is FusedUniPCMultistepScheduler:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps[1:]:
                x = s.step(scheduler_model(x, 1.0), t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- the stock path
def test_solver_p_takes_the_stock_path_with_one_warning():
    solver_p = DPMSolverMultistepScheduler(**SD)
    stock = UniPCMultistepScheduler(**SD, solver_p=solver_p)
    fused = FusedUniPCMultistepScheduler(**SD, solver_p=DPMSolverMultistepScheduler(**SD))
    for s in (stock, fused):
        s.set_timesteps(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = run_loop(fused)
    messages = [str(w.message) for w in caught if "stock" in str(w.message)]
    assert len(messages) == 1 and "solver_p" in messages[0]
    assert torch.equal(got, run_loop(stock)[0])


def test_stock_errors_are_the_stock_ones():
    assert_stock_step_errors(FusedUniPCMultistepScheduler(**SD, prediction_type="flow_prediction", predict_x0=False),
                             FusedUniPCMultistepScheduler(**SD), 5, SHAPE)


def test_mismatched_model_output_takes_the_stock_path():
    stock, fused = pair()
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE[1:])  # broadcast by the stock arithmetic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fused.step(mo, fused.timesteps[0], x).prev_sample
    assert any("stock" in str(w.message) for w in caught)
    torch.testing.assert_close(got, stock.step(mo, stock.timesteps[0], x).prev_sample)


def test_config_round_trip_with_stock(tmp_path):
    stock = UniPCMultistepScheduler(**dict(SD, solver_order=3, timestep_spacing="trailing"))
    stock.save_config(tmp_path)
    fused = FusedUniPCMultistepScheduler.from_pretrained(tmp_path)

    def options(scheduler):
        return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}

    assert isinstance(fused, UniPCMultistepScheduler) and options(fused) == options(stock)
    back = UniPCMultistepScheduler.from_config(fused.config)
    assert type(back) is UniPCMultistepScheduler and options(back) == options(stock)
