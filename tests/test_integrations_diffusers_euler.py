"""FusedEulerDiscreteScheduler / FusedEulerAncestralDiscreteScheduler against the stock diffusers schedulers they
replace: full sampling loops over the config matrix (same images, same pred_original_sample and dtypes, same
generator state), the call forms, the stock code path for what the fused ops do not take, no host sync, and
half precision at least as close to float64 as stock."""

import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler  # noqa: E402

from ddpm_kernels import euler as euler_ops  # noqa: E402
from ddpm_kernels.integrations.diffusers import (  # noqa: E402
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
)
from helpers import (  # noqa: E402
    assert_stock_reads_the_device, check_same_as_stock, needs_scipy, warned_stock_path,
    fail_on_sync,  # noqa: F401  (a fixture)
)

SHAPE = (2, 4, 6, 5)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
EULER = (EulerDiscreteScheduler, FusedEulerDiscreteScheduler)
ANCESTRAL = (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler)


def pair(classes, config=None, set_kwargs=None):
    stock = classes[0](**(config or {}))
    fused = classes[1].from_config(stock.config)
    for s in (stock, fused):
        s.set_timesteps(**(set_kwargs or {"num_inference_steps": 8}))
    return stock, fused


def model(x, t, dtype=None):
    """A model output that depends on the sample and the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32)
    out = x.float() * (0.3 + t / 4000) - 0.2 * torch.cos(x.float() + t / 100)
    return out.to(dtype or x.dtype)


def run_loop(scheduler, seed=0, dtype=torch.float32, step_kwargs=None, x=None):
    """A pipeline's loop: scale_model_input, model, step; returns the final sample, every step's outputs, the
    generator's final state and the first sample."""
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)) * scheduler.init_noise_sigma
    x = first = x.to(dtype)
    outputs = []
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t)
        out = scheduler.step(model(scaled, t), t, x, generator=g, **(step_kwargs or {}))
        outputs.append((scaled, out.prev_sample, out.pred_original_sample))
        x = out.prev_sample
    return x, outputs, g.get_state(), first


def assert_close_fp32(got, expected, what="", terms=1.0):
    """Equal up to float32 rounding of the terms (relative to the loop's scale: the larger of the result and
    ``terms``, the magnitude of the loop's first sample)."""
    assert got.dtype == expected.dtype, what
    assert got.shape == expected.shape, what
    scale = max(1.0, terms, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=4e-6 * scale, equal_nan=True, msg=what)


def assert_same_loop(stock, fused, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_loop(fused, **kw)
    assert not [w for w in caught if "stock" in str(w.message)], [str(w.message) for w in caught]
    expected = run_loop(stock, **kw)
    assert torch.equal(got[2], expected[2])  # the generator: same draws, same state
    # the loop's scale: its first sample (a zero-terminal-SNR table's first step, sigma ~ 4096, cancels terms
    # of that size to a result a few hundred times smaller; its float32 rounding carries through the loop)
    terms = expected[3].abs().max().item()
    for i, (g_step, e_step) in enumerate(zip(got[1], expected[1])):
        assert_close_fp32(g_step[0], e_step[0], f"scale_model_input at step {i}", terms)
        assert_close_fp32(g_step[1], e_step[1], f"prev_sample at step {i}", terms)
        assert_close_fp32(g_step[2], e_step[2], f"pred_original_sample at step {i}", terms)
    assert_close_fp32(got[0], expected[0], terms=terms)


# ------------------------------------------------------------------------------------------- the config matrix
EULER_CONFIGS = {
    "eps-linspace": {},
    "eps-leading": dict(timestep_spacing="leading", steps_offset=1),
    "eps-trailing": dict(timestep_spacing="trailing"),
    "v-linspace": dict(prediction_type="v_prediction"),
    "v-trailing-zero-snr": dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                rescale_betas_zero_snr=True),
    "sample": dict(prediction_type="sample"),
    "original_sample": dict(prediction_type="original_sample"),
    "karras": dict(use_karras_sigmas=True),
    "karras-sigma-min-max": dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "final-sigma-min": dict(final_sigmas_type="sigma_min"),
    "log-linear": dict(interpolation_type="log_linear"),
    "continuous-v": dict(prediction_type="v_prediction", timestep_type="continuous"),
    "squaredcos": dict(beta_schedule="squaredcos_cap_v2"),
}
CHURN = {
    "no-churn": {},
    "churn": dict(s_churn=1.0),
    "churn-window": dict(s_churn=3.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003),
    "churn-capped": dict(s_churn=float("inf")),
}


def config_params(configs):
    return [pytest.param(k, marks=needs_scipy) if "beta" == k else k for k in configs]


@pytest.mark.parametrize("churn", list(CHURN))
@pytest.mark.parametrize("name", config_params(EULER_CONFIGS))
def test_euler_loop_equals_stock(name, churn):
    config = dict(SD, **EULER_CONFIGS[name]) if "squaredcos" not in name else EULER_CONFIGS[name]
    stock, fused = pair(EULER, config)
    assert torch.equal(fused.timesteps, stock.timesteps) and torch.equal(fused.sigmas, stock.sigmas)
    assert_same_loop(stock, fused, step_kwargs=CHURN[churn])


# the spacings and predictions of the Euler matrix (the ancestral step has no sigma-schedule options of its own)
ANCESTRAL_CONFIGS = {name: EULER_CONFIGS[name] for name in
                     ("eps-linspace", "eps-leading", "eps-trailing", "v-linspace", "v-trailing-zero-snr")}


@pytest.mark.parametrize("name", list(ANCESTRAL_CONFIGS))
def test_ancestral_loop_equals_stock(name):
    stock, fused = pair(ANCESTRAL, dict(SD, **ANCESTRAL_CONFIGS[name]))
    assert_same_loop(stock, fused)


@pytest.mark.parametrize("set_kwargs", [
    dict(sigmas=[14.6, 6.0, 2.5, 1.0, 0.3, 0.0]),
    dict(timesteps=[999.0, 800.0, 501.0, 250.0, 40.0, 1.0]),
    dict(num_inference_steps=1),
], ids=["custom-sigmas", "custom-timesteps", "one-step"])
@pytest.mark.parametrize("churn", ["no-churn", "churn"])
def test_custom_schedules_equal_stock(set_kwargs, churn):
    stock, fused = pair(EULER, SD, set_kwargs)
    assert_same_loop(stock, fused, step_kwargs=CHURN[churn])


def test_churn_bounds_compare_in_float32_as_stock():
    """A bound equal to a table sigma's float32 value (but not its float64 one) churns exactly where stock does."""
    stock, fused = pair(EULER, SD)
    sigma = float(stock.sigmas[3])
    bound = float(torch.tensor(sigma, dtype=torch.float64) + sigma * 2**-26)  # rounds to the same float32
    assert bound != sigma and torch.tensor(bound, dtype=torch.float32).item() == sigma
    assert_same_loop(stock, fused, step_kwargs=dict(s_churn=2.0, s_tmin=bound, s_tmax=bound))


def test_churn_noise_is_drawn_only_on_churning_steps_as_stock():
    stock, fused = pair(EULER, SD)
    counts = []
    for s in (stock, fused):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE) * s.init_noise_sigma
        states = []
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x, generator=g, s_churn=2.0, s_tmax=3.0).prev_sample
            states.append(g.get_state())
        counts.append(states)
    for got, expected in zip(counts[1], counts[0]):
        assert torch.equal(got, expected)
    assert not torch.equal(counts[0][-1], torch.Generator().manual_seed(0).get_state())  # some steps churned


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
@pytest.mark.parametrize("sample_dtype,model_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float16, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64),
])
def test_output_dtypes_follow_stock(classes, sample_dtype, model_dtype):
    stock, fused = pair(classes, SD)
    results = []
    for s in (stock, fused):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 3).to(sample_dtype)
        t = s.timesteps[2]
        s.set_begin_index(2)
        kwargs = dict(s_churn=1.0) if classes is EULER else {}
        out = s.step(model(x, t, model_dtype), t, x, generator=g, **kwargs)
        results.append((out.prev_sample, out.pred_original_sample, g.get_state()))
    (e_prev, e_x0, e_state), (g_prev, g_x0, g_state) = results
    assert torch.equal(g_state, e_state)
    assert g_prev.dtype == e_prev.dtype and g_x0.dtype == e_x0.dtype
    # half precision: stock rounds sigma * model_output to the model dtype, a few ulps of the largest term
    rel = 1e-2 if model_dtype in (torch.float16, torch.bfloat16) else 4e-6
    for got, expected in ((g_prev, e_prev), (g_x0, e_x0)):
        scale = expected.double().abs().max().item()
        torch.testing.assert_close(got.double(), expected.double(), rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_model_input_is_the_stock_result_bit_for_bit(classes, dtype):
    stock, fused = pair(classes, dict(SD, timestep_spacing="trailing"), dict(num_inference_steps=25))
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    for index in range(len(stock.timesteps)):
        for s in (stock, fused):
            s._step_index = index
        got, expected = fused.scale_model_input(x, None), stock.scale_model_input(x, None)
        assert got.dtype == expected.dtype and torch.equal(got, expected), index
    assert fused.is_scale_input_called


def test_sample_prediction_returns_the_model_output_as_stock():
    stock, fused = pair(EULER, dict(SD, prediction_type="sample"))
    x = torch.randn(SHAPE)
    for s in (stock, fused):
        mo = torch.randn(SHAPE, dtype=torch.float16)
        out = s.step(mo, s.timesteps[0], x)
        assert out.pred_original_sample is mo


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_step_index_and_begin_index_as_stock(classes):
    stock, fused = pair(classes, SD)
    for s in (stock, fused):
        assert s.step_index is None and s.begin_index is None
        s.set_begin_index(3)
    x = torch.randn(SHAPE)
    results = []
    for s in (stock, fused):
        x1 = s.scale_model_input(x, s.timesteps[0])  # begin_index wins over the timestep, as stock
        assert s.step_index == 3 and s.begin_index == 3
        out = s.step(model(x1, s.timesteps[3]), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert s.step_index == 4
        results.append((x1, out.prev_sample))
    assert torch.equal(results[1][0], results[0][0])
    assert_close_fp32(results[1][1], results[0][1])


@pytest.mark.parametrize("form", ["view", "clone", "float", "float64-tensor", "repeated"])
def test_first_step_index_for_every_timestep_form(form):
    set_kwargs = dict(timesteps=[999.0, 700.0, 700.0, 300.0, 1.0]) if form == "repeated" else None
    stock, fused = pair(EULER, SD, set_kwargs)
    index = 1 if form == "repeated" else 2
    for s in (stock, fused):
        t = s.timesteps[index]
        t = {"view": t, "clone": t.clone(), "float": float(t), "float64-tensor": t.double(), "repeated": t}[form]
        s.scale_model_input(torch.ones(SHAPE), t)
    assert fused.step_index == stock.step_index == (2 if form == "repeated" else index)


def test_step_calls_the_fused_op_with_a_device_step_index(monkeypatch):
    """The fused step reads the sigma table itself through a device step index advanced in place: a float32 step
    without noise through the server resolved once per lane (`euler.table_step_server`), any other (here a
    float16 model output) through `euler.checked_table_step`."""
    calls = []

    # (name, backend, sample, model_output, sigmas, step_index, values, noise, generator, mixed)
    def spy(*args, **kwargs):
        calls.append(("checked", args[4], args[5], args[5].tolist()))
        return original(*args, **kwargs)

    def server(*args):  # step(sample, model_output, sigmas, step_index, next_index)
        step = original_server(*args)
        return lambda *b: calls.append(("server", b[2], b[3], b[3].tolist())) or step(*b)

    original, original_server = euler_ops.checked_table_step, euler_ops.table_step_server
    monkeypatch.setattr(euler_ops, "checked_table_step", spy)
    monkeypatch.setattr(euler_ops, "table_step_server", server)
    _, fused = pair(EULER, SD)
    x = torch.randn(SHAPE)
    for t in fused.timesteps[:3]:
        x = fused.step(model(x, t), t, x).prev_sample
    x = fused.step(model(x, fused.timesteps[3], torch.float16), fused.timesteps[3], x).prev_sample
    assert [c[0] for c in calls] == ["server"] * 3 + ["checked"]
    sigmas, index = calls[-1][1], calls[-1][2]
    assert torch.equal(sigmas, fused.sigmas) and index.dtype == torch.int64
    assert [c[3] for c in calls] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert all(c[2] is index for c in calls) and index.tolist() == [4, 4]  # one tensor, advanced in place


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_in_kernel_noise_hands_the_generator_to_the_op(classes, monkeypatch):
    name = "euler_step" if classes is EULER else "euler_ancestral_step"
    seen = []

    def spy(*args, **kwargs):  # (name, backend, sample, model_output, sigmas, step_index, values, noise, generator)
        if args[0] == name:
            seen.append((args[7], args[8]))
        return original(*args, **kwargs)

    original = euler_ops.checked_table_step
    monkeypatch.setattr(euler_ops, "checked_table_step", spy)
    _, fused = pair(classes, SD)
    fused.in_kernel_noise = True
    g = torch.Generator().manual_seed(0)
    kwargs = dict(s_churn=1.0) if classes is EULER else {}
    x = torch.randn(SHAPE)
    fused.step(model(x, fused.timesteps[0]), fused.timesteps[0], x, generator=g, **kwargs)
    assert seen == [(None, g)]


# ------------------------------------------------------------------------------------------- the stock code path
def assert_same_as_stock(call, stock, fused, warns=True):
    """``call(scheduler)`` gives the stock result or raises the stock error; the fused scheduler warns that the
    stock code path took the call."""
    def compare(got, expected):
        for g, e in zip(got, expected):
            assert_close_fp32(g, e)

    check_same_as_stock(call, stock, fused, compare, warned_stock_path if warns else None)


X = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
MO = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))


def _step(mo=MO, x=X, index=0, **kw):
    return lambda s: s.step(mo, s.timesteps[index], x, generator=torch.Generator().manual_seed(0),
                            return_dict=False, **kw)


CALLS_THE_STOCK_PATH_TAKES = {
    "negative-churn": (EULER, {}, _step(s_churn=-0.5)),
    "nan-churn": (EULER, {}, _step(s_churn=float("nan"))),
    "tensor-churn": (EULER, {}, _step(s_churn=torch.tensor(1.0))),
    "infinite-s_noise": (EULER, {}, _step(s_churn=1.0, s_noise=float("inf"))),
    "broadcast-model-output": (EULER, {}, _step(mo=MO[:1])),
    "unknown-prediction": (EULER, dict(prediction_type="flow"), _step()),
    "ancestral-sample-prediction": (ANCESTRAL, dict(prediction_type="sample"), _step()),
    "ancestral-broadcast": (ANCESTRAL, {}, _step(mo=MO[:1])),
}


@pytest.mark.parametrize("name", list(CALLS_THE_STOCK_PATH_TAKES))
def test_calls_the_fused_ops_do_not_take_run_stock(name):
    classes, config, call = CALLS_THE_STOCK_PATH_TAKES[name]
    stock, fused = pair(classes, dict(SD, **config))
    assert_same_as_stock(call, stock, fused)


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_integer_timesteps_and_stepping_past_the_end_raise_the_stock_errors(classes):
    stock, fused = pair(classes, SD)
    assert_same_as_stock(lambda s: s.step(MO, 5, X), stock, fused, warns=False)
    stock, fused = pair(classes, SD, dict(num_inference_steps=2))
    for s in (stock, fused):
        s.set_begin_index(2)
    assert_same_as_stock(lambda s: s.step(MO, s.timesteps[0], X), stock, fused)


def test_sigma_table_the_fused_op_does_not_take_runs_stock():
    stock, fused = pair(EULER, SD)
    for s in (stock, fused):
        s.sigmas = s.sigmas.double()
    assert_same_as_stock(_step(), stock, fused)


def test_one_warning_per_cause():
    _, fused = pair(EULER, SD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in fused.timesteps[:3]:
            fused.step(MO, t, X, s_churn=-1.0)
    assert len([w for w in caught if "stock" in str(w.message)]) == 1


def test_timesteps_replaced_after_set_timesteps():
    stock, fused = pair(EULER, SD)
    for s in (stock, fused):
        s.sigmas = s.sigmas * 0.5  # a new table: the fused step copies it again
    assert_same_loop(stock, fused)


# ------------------------------------------------------------------------------------------- no host sync
def test_step_and_scale_model_input_have_no_host_sync(fail_on_sync):
    schedulers = [pair(EULER, SD)[1], pair(EULER, dict(SD, use_karras_sigmas=True))[1], pair(ANCESTRAL, SD)[1]]
    begin = pair(EULER, SD)[1]
    begin.set_begin_index(2)
    steps = [list(s.timesteps) for s in schedulers]
    copies = [[t.clone() for t in ts] for ts in steps]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    fail_on_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s, ts, cs in zip(schedulers, steps, copies):
            kw = {} if isinstance(s, EulerAncestralDiscreteScheduler) else dict(s_churn=2.0, s_tmin=0.5)
            y = s.scale_model_input(x, ts[0])  # the first index: a view, found in the host copy
            y = s.step(y, ts[0], x, generator=g, **kw).prev_sample
            for t in cs[1:]:  # later steps read nothing, whatever the timestep
                y = s.step(s.scale_model_input(y, t), t, y, generator=g, **kw).prev_sample
        begin.step(begin.scale_model_input(x, copies[0][0]), copies[0][0], x)  # begin_index: not read
    assert not [w for w in caught if "stock" in str(w.message)]  # every call ran the fused ops


def test_sync_guard_catches_the_stock_scheduler(fail_on_sync):
    """The guard is not vacuous: the stock first lookup reads the timesteps (nonzero().item())."""
    assert_stock_reads_the_device(fail_on_sync, EulerDiscreteScheduler(**SD),
                                  lambda stock, t: stock.scale_model_input(X, t))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_no_host_sync_on_cuda_and_same_images_as_stock(classes):
    results = []
    for cls in classes:
        s = cls(**SD)
        s.set_timesteps(8, device="cuda")
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * s.init_noise_sigma
        kw = dict(s_churn=2.0) if classes is EULER else {}
        x = s.step(model(s.scale_model_input(x, s.timesteps[0]), 1.0), s.timesteps[0], x, generator=g, **kw).prev_sample
        torch.cuda.synchronize()
        if cls is classes[1]:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps[1:]:
                x = s.step(model(s.scale_model_input(x, t), 1.0), t, x, generator=g, **kw).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((x, g.get_state()))
    assert torch.equal(results[1][1], results[0][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- precision
def euler_fp64(x, mo, sigma, sigma_next, prediction):
    x, mo = x.double(), mo.double()
    if prediction == "epsilon":
        x0 = x - sigma * mo
    else:
        x0 = mo * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return x + (x - x0) / sigma * (sigma_next - sigma)


def ancestral_fp64(x, mo, noise, sigma, sigma_next, prediction):
    up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    down = math.sqrt(sigma_next**2 - up**2)
    return euler_fp64(x, mo, sigma, down, prediction) + noise.double() * up


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_step_is_at_least_as_close_to_fp64_as_stock(dtype, classes, prediction):
    stock, fused = pair(classes, dict(SD, prediction_type=prediction))
    g = torch.Generator().manual_seed(5)
    shape = (4, 4, 16, 16)
    errors = []
    for index in (0, 3, 6):
        sigma, sigma_next = float(stock.sigmas[index]), float(stock.sigmas[index + 1])
        x = (torch.randn(shape, generator=g) * sigma).to(dtype)
        mo = torch.randn(shape, generator=g).to(dtype)
        for s in (stock, fused):
            s.set_begin_index(index)
            s._step_index = None
        step_errors = []
        for s in (stock, fused):
            gen = torch.Generator().manual_seed(index)
            out = s.step(mo, s.timesteps[index], x, generator=gen).prev_sample
            if classes is EULER:
                exact = euler_fp64(x, mo, sigma, sigma_next, prediction)
            else:
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=dtype)
                exact = ancestral_fp64(x, mo, noise, sigma, sigma_next, prediction)
            step_errors.append((out.double() - exact).abs().max().item())
        errors.append(step_errors)
    for stock_err, fused_err in errors:
        assert fused_err <= stock_err * 1.0001 + 1e-12, errors


def test_fp32_step_matches_fp64_to_rounding():
    _, fused = pair(EULER, SD)
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(SHAPE, generator=g) * 5, torch.randn(SHAPE, generator=g)
    fused.set_begin_index(2)
    out = fused.step(mo, fused.timesteps[2], x).prev_sample
    exact = euler_fp64(x, mo, float(fused.sigmas[2]), float(fused.sigmas[3]), "epsilon")
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_config_round_trip_with_stock(classes, tmp_path):
    stock = classes[0](**dict(SD, timestep_spacing="trailing"))
    stock.save_config(tmp_path)
    fused = classes[1].from_pretrained(tmp_path)
    def options(scheduler):
        return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}

    assert isinstance(fused, classes[0]) and options(fused) == options(stock)
    back = classes[0].from_config(fused.config)
    assert type(back) is classes[0] and options(back) == options(stock)


@pytest.mark.parametrize("classes", [EULER, ANCESTRAL], ids=["euler", "ancestral"])
def test_scale_model_input_of_a_0d_sample_is_the_stock_result(classes):
    """A 0-d sample divided by stock's 0-d float32 divisor promotes to float32: the stock code takes it."""
    stock, fused = pair(classes, SD, dict(num_inference_steps=5))
    for dtype in (torch.float16, torch.float32):
        x = torch.tensor(3.0, dtype=dtype)
        for s in (stock, fused):
            s._step_index = 2
        got, expected = fused.scale_model_input(x, None), stock.scale_model_input(x, None)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
