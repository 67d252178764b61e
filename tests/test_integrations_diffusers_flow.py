"""FusedFlowMatchEulerDiscreteScheduler against the stock diffusers FlowMatchEulerDiscreteScheduler it replaces.

The first part is a scheduler test in the style of diffusers' ``SchedulerCommonTest`` harness (save/load,
from_config round trips, step shapes, tuple vs dict outputs, full loops with sums hard-coded from the stock
class), run against both the stock and the fused class. The rest compares the two over the config matrix and
call forms, and checks what the fused class adds: no host sync, the stock noise stream, better half precision.
"""

import tempfile
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import ddpm_kernels  # noqa: E402
from ddpm_kernels import flow as flow_ops  # noqa: E402
from ddpm_kernels.integrations.diffusers import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402
from ddpm_kernels.integrations.diffusers import _common  # noqa: E402  (whose on_host tests replace)
from helpers import (  # noqa: E402
    GENERATOR_FORMS, assert_stock_reads_the_device, check_same_as_stock, generator_form, generator_state, needs_scipy,
    fail_on_sync,  # noqa: F401  (a fixture)
)

CLASSES = [FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler]
over_classes = pytest.mark.parametrize("scheduler_class", CLASSES, ids=["stock", "fused"])
SHAPE = (2, 4, 6, 5)


# ============================================================================ SchedulerCommonTest-style harness
def get_scheduler_config(**kwargs):
    config = {"num_train_timesteps": 1000, "shift": 1.0}
    config.update(kwargs)
    return config


def dummy_sample():
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def dummy_sample_deter():
    n = 4 * 3 * 8 * 8
    sample = torch.arange(n).reshape(3, 8, 8, 4) / n
    return sample.permute(3, 0, 1, 2)


def dummy_model(sample, t):
    """A velocity that depends on the sample and the timestep, as the harness' ``dummy_model`` does."""
    t = torch.as_tensor(t).reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype) / 1000
    return sample * t / (t + 1) - 0.5 * (1 - t)


def check_over_configs(scheduler_class, set_kwargs=None, step=0, **config):
    """Saved and reloaded, the scheduler steps as the original."""
    set_kwargs = set_kwargs or {}
    scheduler = scheduler_class(**get_scheduler_config(**config))
    with tempfile.TemporaryDirectory() as tmpdirname:
        scheduler.save_config(tmpdirname)
        new_scheduler = scheduler_class.from_pretrained(tmpdirname)
    assert type(new_scheduler) is scheduler_class
    sample = dummy_sample()
    residual = 0.1 * sample
    outputs = []
    for s in (scheduler, new_scheduler):
        s.set_timesteps(10, **set_kwargs)
        outputs.append(s.step(residual, s.timesteps[step], sample, generator=torch.manual_seed(0)).prev_sample)
    assert torch.sum(torch.abs(outputs[0] - outputs[1])) < 1e-5, "Scheduler outputs are not identical"


@over_classes
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
def test_configs_shift(scheduler_class, num_train_timesteps, shift):
    check_over_configs(scheduler_class, num_train_timesteps=num_train_timesteps, shift=shift)


@over_classes
@pytest.mark.parametrize("config,set_kwargs", [
    (dict(use_dynamic_shifting=True), dict(mu=0.7)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.2)),
    (dict(shift=3.0, shift_terminal=0.05), {}),
    (dict(use_karras_sigmas=True), {}),
    (dict(use_exponential_sigmas=True), {}),
    pytest.param(dict(use_beta_sigmas=True), {}, marks=needs_scipy),
    (dict(invert_sigmas=True), {}),
    (dict(stochastic_sampling=True), {}),
], ids=["dynamic", "dynamic_linear", "shift_terminal", "karras", "exponential", "beta", "invert", "stochastic"])
@pytest.mark.parametrize("step", [0, 5])
def test_configs(scheduler_class, config, set_kwargs, step):
    check_over_configs(scheduler_class, set_kwargs=set_kwargs, step=step, **config)


@over_classes
def test_from_pretrained(scheduler_class):
    scheduler = scheduler_class(**get_scheduler_config(shift=3.0, use_karras_sigmas=True))
    with tempfile.TemporaryDirectory() as tmpdirname:
        scheduler.save_pretrained(tmpdirname)
        new_scheduler = scheduler_class.from_pretrained(tmpdirname)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == new_scheduler.config


@over_classes
def test_step_shape(scheduler_class):
    scheduler = scheduler_class(**get_scheduler_config())
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    residual = 0.1 * sample
    output_0 = scheduler.step(residual, scheduler.timesteps[0], sample).prev_sample
    output_1 = scheduler.step(residual, scheduler.timesteps[1], sample).prev_sample
    assert output_0.shape == sample.shape == output_1.shape


@over_classes
def test_scheduler_outputs_equivalence(scheduler_class):
    outputs = []
    for return_dict in (True, False):
        scheduler = scheduler_class(**get_scheduler_config())
        scheduler.set_timesteps(50)
        sample = dummy_sample()
        out = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample, return_dict=return_dict)
        outputs.append(out)
    as_dict, as_tuple = outputs
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert type(as_dict).__name__ == "FlowMatchEulerDiscreteSchedulerOutput"
    assert list(as_dict.keys()) == ["prev_sample"] and as_dict[0] is as_dict.prev_sample
    assert torch.allclose(as_tuple[0], as_dict.prev_sample, atol=1e-5)


@over_classes
def test_scale_noise_device_and_shape(scheduler_class):
    scheduler = scheduler_class(**get_scheduler_config())
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[3:4]
    scaled = scheduler.scale_noise(sample, t, noise)
    sigma = scheduler.sigmas[3]
    assert scaled.shape == sample.shape
    torch.testing.assert_close(scaled, sigma * noise + (1 - sigma) * sample, rtol=1e-6, atol=1e-6)


@over_classes
def test_set_begin_index_and_step_index(scheduler_class):
    scheduler = scheduler_class(**get_scheduler_config())
    scheduler.set_timesteps(10)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(4)
    sample = dummy_sample()
    for k in range(3):
        scheduler.step(0.1 * sample, scheduler.timesteps[0], sample)  # the timestep is not read: begin_index
        assert scheduler.step_index == 5 + k
    scheduler.set_timesteps(10)
    assert scheduler.step_index is None and scheduler.begin_index is None


# the stock class' (sum, mean |x|) of `full_loop` (diffusers 0.42.1)
FULL_LOOP_SUMS = {
    "default": (434.7023, 0.566019),
    "shift3": (420.8026, 0.547920),
    "dynamic_exponential": (426.6133, 0.555486),
    "dynamic_linear": (432.2039, 0.562765),
    "shift_terminal": (426.4260, 0.555242),
    "karras": (400.1996, 0.521093),
    "exponential": (371.8571, 0.484189),
    "beta": (431.7677, 0.562198),
    "invert": (240.3781, 0.403025),
    "stochastic": (164.8250, 0.370842),
}
FULL_LOOP_CONFIGS = {
    "default": (dict(), dict()),
    "shift3": (dict(shift=3.0), dict()),
    "dynamic_exponential": (dict(use_dynamic_shifting=True), dict(mu=0.8)),
    "dynamic_linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.5)),
    "shift_terminal": (dict(shift=3.0, shift_terminal=0.1), dict()),
    "karras": (dict(use_karras_sigmas=True), dict()),
    "exponential": (dict(use_exponential_sigmas=True), dict()),
    "beta": (dict(use_beta_sigmas=True), dict()),
    "invert": (dict(invert_sigmas=True), dict()),
    "stochastic": (dict(stochastic_sampling=True, shift=3.0), dict()),
}


def full_loop(scheduler_class, config, set_kwargs, num_inference_steps=10):
    scheduler = scheduler_class(**get_scheduler_config(**config))
    scheduler.set_timesteps(num_inference_steps, **set_kwargs)
    sample = dummy_sample_deter()
    generator = torch.manual_seed(0)
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    return sample


@over_classes
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_scipy) if n == "beta" else n for n in FULL_LOOP_SUMS])
def test_full_loop(scheduler_class, name):
    result = full_loop(scheduler_class, *FULL_LOOP_CONFIGS[name])
    expected_sum, expected_mean = FULL_LOOP_SUMS[name]
    assert abs(result.sum().item() - expected_sum) < 1e-2
    assert abs(result.abs().mean().item() - expected_mean) < 1e-3


# ============================================================================ parity with the stock class
CONFIGS = {
    "default": (dict(), dict(num_inference_steps=7)),
    "shift3": (dict(shift=3.0), dict(num_inference_steps=7)),
    "dynamic": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(num_inference_steps=7, mu=1.1)),
    "dynamic_linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=6, mu=2.0)),
    "shift_terminal": (dict(shift=3.0, shift_terminal=0.1), dict(num_inference_steps=7)),
    "karras": (dict(use_karras_sigmas=True, shift=3.0), dict(num_inference_steps=7)),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=7)),
    "beta": (dict(use_beta_sigmas=True), dict(num_inference_steps=7)),
    "invert": (dict(invert_sigmas=True), dict(num_inference_steps=7)),
    "dynamic_karras_terminal": (dict(use_dynamic_shifting=True, use_karras_sigmas=True, shift_terminal=0.02),
                                dict(num_inference_steps=5, mu=0.9)),
    "custom_sigmas": (dict(shift=2.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
    "custom_timesteps": (dict(), dict(timesteps=[1000.0, 750.0, 420.0, 180.0, 20.0])),
    "custom_both": (dict(), dict(sigmas=[1.0, 0.7, 0.4, 0.2], timesteps=[999.0, 700.0, 400.0, 200.0])),
    "repeated_timesteps": (dict(), dict(sigmas=[1.0, 0.9, 0.8, 0.5, 0.2], timesteps=[999.0, 900.0, 900.0, 500.0, 200.0])),
    "stochastic": (dict(stochastic_sampling=True, shift=3.0), dict(num_inference_steps=7)),
    "stochastic_invert": (dict(stochastic_sampling=True, invert_sigmas=True), dict(num_inference_steps=5)),
}
CONFIG_IDS = [pytest.param(k, marks=needs_scipy) if "beta" in k else k for k in CONFIGS]
MAX_DIFF = {}  # name -> the largest |fused - stock| seen (for the record; asserted below)


def pair(config=None, set_kwargs=None):
    config = config or {}
    stock = FlowMatchEulerDiscreteScheduler(**config)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)
    if set_kwargs is not None:
        for s in (stock, fused):
            s.set_timesteps(**set_kwargs)
    return stock, fused


def assert_close_fp32(got, expected, what=""):
    """fp32: equal to the stock result within rounding (docs/design.md, Tolerances: rtol = atol = 1e-5)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, expected.dtype, what)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("name", CONFIG_IDS)
def test_step_equals_stock(name):
    config, set_kwargs = CONFIGS[name]
    stock, fused = pair(config, set_kwargs)
    assert torch.equal(stock.timesteps, fused.timesteps) and torch.equal(stock.sigmas, fused.sigmas)
    data = torch.Generator().manual_seed(3)
    gs, gf = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    worst = 0.0
    for t in fused.timesteps:
        sample = torch.randn(SHAPE, generator=data)
        mo = torch.randn(SHAPE, generator=data)
        expected = stock.step(mo, t, sample, generator=gs).prev_sample
        got = fused.step(mo, t, sample, generator=gf).prev_sample
        assert fused.step_index == stock.step_index
        assert torch.equal(gs.get_state(), gf.get_state()), "the generators advanced differently"
        assert_close_fp32(got, expected, f"{name} t={float(t)}")
        worst = max(worst, (got - expected).abs().max().item())
    MAX_DIFF[name] = worst


@pytest.mark.parametrize("name", ["default", "shift_terminal", "stochastic", "repeated_timesteps", "invert"])
def test_full_chain_same_images_and_generator_state(name):
    """A sampling loop: the sample fed back each step, the same generator on both sides."""
    config, set_kwargs = CONFIGS[name]
    stock, fused = pair(config, set_kwargs)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    results = []
    for s in (stock, fused):
        g = torch.Generator().manual_seed(1)
        x = x0
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, generator=g).prev_sample
        results.append((x, g.get_state(), s.step_index))
    assert_close_fp32(results[1][0], results[0][0])
    assert torch.equal(results[0][1], results[1][1]) and results[0][2] == results[1][2]


@pytest.mark.parametrize("generator", GENERATOR_FORMS)
def test_stochastic_noise_is_the_stock_draw(generator):
    """Same images and the same generator (or global RNG) state, for every generator form randn_tensor takes."""
    stock, fused = pair(dict(stochastic_sampling=True), dict(num_inference_steps=4))
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    outs = []
    for s in (stock, fused):
        g = generator_form(generator, SHAPE[0])
        outs.append((s.step(mo, s.timesteps[1], x, generator=g).prev_sample, generator_state(g)))
    assert_close_fp32(outs[1][0], outs[0][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_in_kernel_noise_hands_the_generator_to_the_op(monkeypatch):
    seen = {}
    real = flow_ops.checked_table_step  # (backend, x, v, sigmas, step_index, stochastic, noise, generator)
    monkeypatch.setattr(flow_ops, "checked_table_step",
                        lambda *a: seen.update(noise=a[6], generator=a[7], stochastic=a[5]) or real(*a))
    _, fused = pair(dict(stochastic_sampling=True), dict(num_inference_steps=4))
    g = torch.Generator().manual_seed(0)
    fused.step(torch.randn(SHAPE), fused.timesteps[0], torch.randn(SHAPE), generator=g)
    assert seen["noise"] is not None and seen["generator"] is None and seen["stochastic"]
    fused.in_kernel_noise = True
    fused.step(torch.randn(SHAPE), fused.timesteps[1], torch.randn(SHAPE), generator=g)
    assert seen["noise"] is None and seen["generator"] is g


def test_stock_arguments_are_accepted_and_ignored_as_stock_does():
    stock, fused = pair({}, dict(num_inference_steps=5))
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    kw = dict(s_churn=0.5, s_tmin=0.1, s_tmax=10.0, s_noise=1.3)
    for t in fused.timesteps[:3]:
        assert_close_fp32(fused.step(mo, t, x, **kw).prev_sample, stock.step(mo, t, x, **kw).prev_sample)


@pytest.mark.parametrize("form", ["view", "float", "cpu_tensor", "clone"])
def test_first_step_index_for_every_timestep_form(form):
    """The first step finds the stock index (the second match of a repeated value) whatever the form."""
    config, set_kwargs = CONFIGS["repeated_timesteps"]
    for position in range(len(set_kwargs["timesteps"])):
        stock, fused = pair(config, set_kwargs)
        view = fused.timesteps[position]
        t = {"view": view, "float": float(view), "cpu_tensor": torch.tensor(float(view)), "clone": view.clone()}[form]
        x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
        expected = stock.step(mo, stock.timesteps[position], x).prev_sample
        got = fused.step(mo, t, x).prev_sample
        assert fused.step_index == stock.step_index
        assert_close_fp32(got, expected)


def test_step_calls_the_fused_op_with_a_device_step_index(monkeypatch):
    """The plain step calls the table form of the op on operands it built (`flow.checked_table_step`, which
    skips `flow_step`'s checks of them; the next steps of the schedule through the server it resolved once,
    `flow.table_step_server`); a step it cannot build so (a float64 model output: the table is float32) calls the
    public op."""
    calls = []
    real = flow_ops.checked_table_step
    monkeypatch.setattr(flow_ops, "checked_table_step",
                        lambda *a: calls.append((a[3], a[4].clone(), "checked")) or real(*a))
    real_server = flow_ops.table_step_server

    def server(*a):  # step(sample, model_output, sigmas, step_index)
        step = real_server(*a)
        return lambda *b: calls.append((b[2], b[3].clone(), "server")) or step(*b)

    monkeypatch.setattr(flow_ops, "table_step_server", server)
    public = []
    real_public = flow_ops.flow_step
    monkeypatch.setattr(flow_ops, "flow_step", lambda *a, **k: public.append(a[1].dtype) or real_public(*a, **k))
    stock, fused = pair({}, dict(num_inference_steps=4))
    x = torch.randn(SHAPE)
    for t in fused.timesteps:
        x = fused.step(torch.randn(SHAPE), t, x).prev_sample
    assert [c[1].tolist() for c in calls] == [[i] * SHAPE[0] for i in range(4)]
    assert [c[2] for c in calls] == ["checked"] + ["server"] * 3
    assert all(c[0] is fused.sigmas for c in calls)  # the table itself, not a copy per step
    assert not public
    stock.set_timesteps(4)
    fused.set_timesteps(4)
    mo, x = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE)
    got = fused.step(mo, fused.timesteps[0], x).prev_sample
    assert public == [torch.float64] and len(calls) == 4
    torch.testing.assert_close(got, stock.step(mo, stock.timesteps[0], x).prev_sample)


# ------------------------------------------------------------------------------------------- per-token
def per_token_case(fused, step, seed=0):
    """LTX-style per-token timesteps for a (B, L, C) sample: tokens at the step's timestep, conditioning tokens
    at 0, tokens exactly on other table timesteps, within the 1e-6 margin of them, between them, at 1000."""
    g = torch.Generator().manual_seed(seed)
    batch, tokens, channels = 2, 24, 5
    t = fused.timesteps[step]
    table = fused.sigmas * 1000
    choices = torch.cat([t.reshape(1), torch.zeros(1), table, table + 4e-4, table - 4e-4,
                         torch.rand(4, generator=g) * 1000, torch.full((1,), 1000.0)])
    pick = torch.randint(0, choices.shape[0], (batch, tokens), generator=g)
    per_token = choices[pick].clamp(0, 1000)
    per_token[:, :3] = t
    sample = torch.randn(batch, tokens, channels, generator=g)
    mo = torch.randn(batch, tokens, channels, generator=g)
    return sample, mo, per_token


@pytest.mark.parametrize("name", ["default", "shift3", "invert", "stochastic", "karras"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_per_token_timesteps_equal_stock(name, model_dtype):
    config, set_kwargs = CONFIGS[name]
    stock, fused = pair(config, set_kwargs)
    for step, t in enumerate(fused.timesteps):
        sample, mo, per_token = per_token_case(fused, step, seed=step)
        mo = mo.to(model_dtype)
        gs, gf = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        expected = stock.step(mo, t, sample, generator=gs, per_token_timesteps=per_token).prev_sample
        got = fused.step(mo, t, sample, generator=gf, per_token_timesteps=per_token).prev_sample
        assert got.dtype == expected.dtype == torch.float32  # the stock per-token branch returns float32
        assert_close_fp32(got, expected, f"{name} step {step}")
        assert torch.equal(gs.get_state(), gf.get_state()) and fused.step_index == stock.step_index


def test_per_token_next_sigma_is_the_stock_masked_max():
    """The binary search gives the stock definition on the edge cases (equal, within the margin, outside the
    table), checked against the stock formula directly."""
    _, fused = pair(dict(shift=3.0), dict(num_inference_steps=6))
    table = fused.sigmas
    sigma = torch.cat([table, table + 5e-7, table + 2e-6, table - 5e-7, torch.tensor([0.0, 1.0, 1.5, -0.5])])
    sigma = sigma.reshape(1, -1)
    tables = fused._dk_tables()
    _, _, ascending = fused._dk_device_tables(tables, sigma.device)
    got_sigma, got_next = fused._dk_per_token_sigmas(sigma * 1000, ascending)
    per_token_sigmas = sigma * 1000 / 1000
    lower = (table[:, None, None] < per_token_sigmas[None] - 1e-6) * table[:, None, None]
    torch.testing.assert_close(got_next[..., 0], lower.max(dim=0).values, rtol=0, atol=0)
    torch.testing.assert_close(got_sigma[..., 0], per_token_sigmas, rtol=0, atol=0)


def test_per_token_sign_is_the_stock_one():
    """The per-token branch moves by (sigma - sigma_next) v, the opposite of the per-sample branch (LTX passes
    -v): with every token at the step's timestep, the two branches are mirror images."""
    stock, fused = pair({}, dict(num_inference_steps=4))
    x, v = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    t = fused.timesteps[1]
    per_token = t.expand(2, 6).clone()
    for s in (stock, fused):
        s.set_begin_index(1)
    a = fused.step(v, t, x, per_token_timesteps=per_token).prev_sample
    fused.set_begin_index(1)
    fused._step_index = None
    b = fused.step(-v, t, x).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, stock.step(v, t, x, per_token_timesteps=per_token).prev_sample, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- scale_noise
@pytest.mark.parametrize("name", ["default", "shift3", "repeated_timesteps", "custom_timesteps", "invert"])
@pytest.mark.parametrize("form", ["per_sample", "one", "begin_index", "after_steps"])
def test_scale_noise_equals_stock(name, form):
    config, set_kwargs = CONFIGS[name]
    stock, fused = pair(config, set_kwargs)
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    n = len(fused.timesteps)
    if form == "per_sample":
        t = fused.timesteps[torch.tensor([1, n - 1])]
    else:
        t = fused.timesteps[2:3] if form != "per_sample" else None
    if form == "begin_index":
        for s in (stock, fused):
            s.set_begin_index(n - 2)
    if form == "after_steps":
        for s in (stock, fused):
            s.step(noise, s.timesteps[0], x)
            s.step(noise, s.timesteps[1], x)
    got, expected = fused.scale_noise(x, t, noise), stock.scale_noise(x, t, noise)
    assert_close_fp32(got, expected)


def test_scale_noise_calls_the_fused_op(monkeypatch):
    calls = []
    real = flow_ops.flow_interpolate
    monkeypatch.setattr(flow_ops, "flow_interpolate", lambda *a, **k: calls.append(a) or real(*a, **k))
    _, fused = pair({}, dict(num_inference_steps=4))
    fused.scale_noise(torch.randn(SHAPE), fused.timesteps[:1], torch.randn(SHAPE))
    assert len(calls) == 1


def test_scale_noise_device_timestep_not_in_schedule_gives_nan(monkeypatch):
    """On a device the missing index cannot raise without a sync: its samples are NaN, the others exact. On
    the host the stock IndexError is raised."""
    stock, fused = pair({}, dict(num_inference_steps=4))
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.stack([fused.timesteps[1], torch.tensor(123.0)])
    with pytest.raises(IndexError) as stock_error:
        stock.scale_noise(x, t, noise)
    with pytest.raises(IndexError) as fused_error:
        fused.scale_noise(x, t, noise)
    assert str(stock_error.value) == str(fused_error.value)
    monkeypatch.setattr(_common, "on_host", lambda tensor: False)
    got = fused.scale_noise(x, t, noise)
    assert torch.isnan(got[1]).all()
    expected = stock.scale_noise(x[:1], t[:1], noise[:1])
    assert_close_fp32(got[:1], expected)


# ------------------------------------------------------------------------------------------- dtypes
DTYPE_PAIRS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
               (torch.float64, torch.float32), (torch.float32, torch.float64)]


@pytest.mark.parametrize("sample_dtype,model_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_mixed_dtypes_follow_the_stock_promotion(sample_dtype, model_dtype, stochastic):
    stock, fused = pair(dict(stochastic_sampling=stochastic), dict(num_inference_steps=4))
    g = torch.Generator().manual_seed(4)
    x, mo = torch.randn(SHAPE, generator=g).to(sample_dtype), torch.randn(SHAPE, generator=g).to(model_dtype)
    t = fused.timesteps[1]
    expected = stock.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    got = fused.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert got.dtype == expected.dtype == model_dtype
    # one rounding to the output dtype apart (the stock step rounds dt * v to a half model dtype first)
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(model_dtype, 1e-5)
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


def step_fp64(x, mo, sigma, sigma_next):
    """The deterministic step in float64 from the same (rounded) inputs and float32 sigmas."""
    return x.double() + (sigma_next.double() - sigma.double()) * mo.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_is_at_least_as_close_to_fp64_as_stock(dtype):
    stock, fused = pair(dict(shift=3.0), dict(num_inference_steps=8))
    g = torch.Generator().manual_seed(6)
    stock_err = fused_err = stock_sum = fused_sum = 0.0
    for i, t in enumerate(fused.timesteps):
        x = (torch.randn(SHAPE, generator=g) * 2).to(dtype)
        mo = (torch.randn(SHAPE, generator=g) * 2).to(dtype)
        exact = step_fp64(x, mo, fused.sigmas[i], fused.sigmas[i + 1])
        e_stock = (stock.step(mo, t, x).prev_sample.double() - exact).abs()
        e_fused = (fused.step(mo, t, x).prev_sample.double() - exact).abs()
        # the fused step rounds once: within an ulp of the output
        ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
        assert (e_fused <= ulp).all()
        stock_err, fused_err = max(stock_err, e_stock.max().item()), max(fused_err, e_fused.max().item())
        stock_sum, fused_sum = stock_sum + e_stock.sum().item(), fused_sum + e_fused.sum().item()
    assert fused_err <= stock_err and fused_sum < stock_sum
    MAX_DIFF[f"step_{dtype}"] = (fused_err, stock_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scale_noise_is_closer_to_fp64_than_stock(dtype):
    stock, fused = pair(dict(shift=3.0), dict(num_inference_steps=8))
    g = torch.Generator().manual_seed(8)
    x, noise = (torch.randn(SHAPE, generator=g) * 3).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)
    t = fused.timesteps[torch.tensor([2, 5])]
    sigma = fused.sigmas[torch.tensor([2, 5])].double().reshape(2, 1, 1, 1)
    exact = sigma * noise.double() + (1 - sigma) * x.double()
    e_stock = (stock.scale_noise(x, t, noise).double() - exact).abs().max().item()
    e_fused = (fused.scale_noise(x, t, noise).double() - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    assert (e_fused <= ulp).all()
    assert e_fused.max().item() <= e_stock
    MAX_DIFF[f"scale_noise_{dtype}"] = (e_fused.max().item(), e_stock)


def test_fp32_step_matches_fp64_to_rounding():
    _, fused = pair(dict(shift=3.0), dict(num_inference_steps=8))
    g = torch.Generator().manual_seed(9)
    for i, t in enumerate(fused.timesteps):
        x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        got = fused.step(mo, t, x).prev_sample
        exact = step_fp64(x, mo, fused.sigmas[i], fused.sigmas[i + 1])
        # a few float32 roundings of each term
        bound = 4 * torch.finfo(torch.float32).eps * (x.abs() + (fused.sigmas[i] * mo).abs()).double()
        assert ((got.double() - exact).abs() <= bound).all()


# ------------------------------------------------------------------------------------------- the stock path
def assert_same_as_stock(call, stock, fused, warns=True):
    """``call(scheduler)`` gives the stock result (NaN where it has NaN) or raises its error (same type and
    message); the fused scheduler warns once that the stock code path took the call."""
    def check_warnings(caught):
        ours = [w for w in caught if "stock FlowMatchEulerDiscreteScheduler code path" in str(w.message)]
        assert len(ours) == (1 if warns else 0), [str(w.message) for w in caught]

    check_same_as_stock(call, stock, fused, check_warnings=check_warnings)


X, MO = torch.randn(SHAPE), torch.randn(SHAPE)


def _step(mo, t_index=0, x=X, **kw):
    return lambda s: s.step(mo, s.timesteps[t_index], x, **kw).prev_sample


CALLS_THE_STOCK_PATH_TAKES = {
    "broadcast_model_output": (_step(MO[:, :1]), True),
    "model_output_other_batch": (_step(MO[:1]), True),
    "integer_timestep": (lambda s: s.step(MO, 3, X), False),
    "int_tensor_timestep": (lambda s: s.step(MO, torch.tensor(3), X), False),
    "timestep_not_in_schedule": (lambda s: s.step(MO, 123.0, X), False),
    "per_token_float64": (lambda s: s.step(MO[:, :, :, 0], s.timesteps[0], X[:, :, :, 0],
                                            per_token_timesteps=s.timesteps[:1].double().expand(2, 4)).prev_sample, True),
    "per_token_for_4d_sample": (_step(MO, per_token_timesteps=torch.full((2, 4), 500.0)), True),
    "scale_noise_without_noise": (lambda s: s.scale_noise(X, s.timesteps[:1]), True),
    "scale_noise_0d_timestep": (lambda s: s.scale_noise(X, s.timesteps[0], MO), True),
    "scale_noise_float_timestep": (lambda s: s.scale_noise(X, 500.0, MO), True),
    "scale_noise_noise_dtype": (lambda s: s.scale_noise(X, s.timesteps[:1], MO.double()), True),
    "scale_noise_timesteps_for_3_samples": (lambda s: s.scale_noise(X[:1], s.timesteps[:3], MO[:1]), True),
}


@pytest.mark.parametrize("name", list(CALLS_THE_STOCK_PATH_TAKES))
def test_calls_the_fused_ops_do_not_take_run_stock(name):
    call, warns = CALLS_THE_STOCK_PATH_TAKES[name]
    stock, fused = pair({}, dict(num_inference_steps=5))
    assert_same_as_stock(call, stock, fused, warns=warns)


def test_sigma_table_the_fused_op_does_not_take_runs_stock():
    stock, fused = pair({}, dict(num_inference_steps=5))
    for s in (stock, fused):
        s.sigmas = s.sigmas.double()
    assert_same_as_stock(_step(MO, 1), stock, fused)


def test_stepping_past_the_end_raises_the_stock_error():
    stock, fused = pair({}, dict(num_inference_steps=3))
    for s in (stock, fused):
        for t in s.timesteps:
            s.step(MO, t, X)
    assert_same_as_stock(_step(MO, 0), stock, fused)


def test_one_warning_per_cause():
    _, fused = pair({}, dict(num_inference_steps=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in fused.timesteps:
            fused.step(MO[:, :1], t, X)
    assert len([w for w in caught if "stock" in str(w.message)]) == 1


def test_timesteps_replaced_after_set_timesteps():
    """Tables replaced by hand (as some pipelines do) are re-read, not served stale."""
    stock, fused = pair({}, dict(num_inference_steps=6))
    for s in (stock, fused):
        s.timesteps = s.timesteps[2:].clone()
        s.sigmas = s.sigmas[2:].clone()
    for t in fused.timesteps[:-1]:
        assert_close_fp32(fused.step(MO, t, X).prev_sample, stock.step(MO, t, X).prev_sample)
    fused.sigmas.mul_(0.5)  # in place: a new version of the same tensor
    stock.sigmas.mul_(0.5)
    for s in (stock, fused):
        s._step_index = None
    t = fused.timesteps[1]
    assert_close_fp32(fused.step(MO, t, X).prev_sample, stock.step(MO, t, X).prev_sample)


# ------------------------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("in_kernel_noise", [False, True])
def test_step_and_scale_noise_have_no_host_sync(fail_on_sync, in_kernel_noise):
    schedulers = [FusedFlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic, shift=3.0)
                  for stochastic in (False, True)]
    for s in schedulers:
        s.set_timesteps(5, device="cpu")
        s.in_kernel_noise = in_kernel_noise
    begin = FusedFlowMatchEulerDiscreteScheduler()
    begin.set_timesteps(5, device="cpu")
    begin.set_begin_index(1)
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    tokens, mo_tokens = torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 3, generator=g)
    per_token = torch.rand(2, 7, generator=g) * 1000
    steps = [list(s.timesteps) for s in schedulers]
    copies = [[t.clone() for t in ts] for ts in steps]
    per_sample = schedulers[0].timesteps[torch.tensor([0, 3])]
    fail_on_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps_without_sync(schedulers, steps, copies, begin, x, mo, tokens, mo_tokens, per_token, per_sample, g)
    assert not [w for w in caught if "stock" in str(w.message)]  # every call ran the fused ops


def _steps_without_sync(schedulers, steps, copies, begin, x, mo, tokens, mo_tokens, per_token, per_sample, g):
    for s, ts, cs in zip(schedulers, steps, copies):
        x = s.scale_noise(x, per_sample, mo)  # before the first step: the index found on the device
        x = s.step(mo, ts[0], x, generator=g).prev_sample  # the first step: a view, found in the host copy
        x = s.step(mo, cs[1], x, generator=g).prev_sample  # later steps read nothing, whatever the timestep
        x = s.step(mo_tokens, cs[2], tokens, generator=g, per_token_timesteps=per_token).prev_sample.sum() + x
        x = s.scale_noise(x, cs[3].reshape(1), mo)  # after steps: the step index
        x = s.step(mo, ts[3], x, generator=g).prev_sample
    x = begin.step(mo, copies[0][0], x, generator=g).prev_sample  # begin_index: the timestep is not read
    x = begin.scale_noise(x, copies[0][1].reshape(1), mo)
    uncond_cond = torch.cat([mo, mo * 0.5])
    schedulers[0].guided_step(uncond_cond, copies[0][4], x, guidance_scale=4.0)


def test_sync_guard_catches_the_stock_scheduler(fail_on_sync):
    """The guard is not vacuous: the stock first step and scale_noise read the device (nonzero().item())."""
    x, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    assert_stock_reads_the_device(fail_on_sync, FlowMatchEulerDiscreteScheduler(),
                                  lambda stock, t: stock.step(model_output, t, x),
                                  lambda stock, t: stock.scale_noise(x, stock.timesteps[:2], x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda_and_same_images_as_stock():
    results = []
    x0 = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mo = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    for cls in CLASSES:
        s = cls(stochastic_sampling=True, shift=3.0)
        s.set_timesteps(6, device="cuda")
        fresh = cls(shift=3.0)  # scale_noise before any step: the indices are searched for
        fresh.set_timesteps(6, device="cuda")
        g = torch.Generator("cuda").manual_seed(0)
        x = s.scale_noise(x0, s.timesteps[:1].expand(SHAPE[0]), mo)
        x = s.step(mo, s.timesteps[0], x, generator=g).prev_sample
        torch.cuda.synchronize()
        if cls is FusedFlowMatchEulerDiscreteScheduler:
            torch.cuda.set_sync_debug_mode("error")
        try:
            noised = fresh.scale_noise(x0, fresh.timesteps[1:3], mo)
            per_token = s.timesteps[1:3].reshape(1, 2, 1).expand(2, 2, 3).reshape(2, 6)
            tokens = s.step(mo[:, 0], s.timesteps[1], x[:, 0], generator=g, per_token_timesteps=per_token).prev_sample
            for t in s.timesteps[2:]:
                x = s.step(mo, t, x, generator=g).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((x, g.get_state(), noised, tokens))
    for got, expected in zip(results[1], results[0]):
        if got.dtype == torch.uint8:  # generator states
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- config, pipelines
def test_config_round_trip_with_stock(tmp_path):
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2,
                                            shift_terminal=0.05, use_karras_sigmas=True, time_shift_type="linear",
                                            stochastic_sampling=True, invert_sigmas=True)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)
    assert isinstance(fused, FlowMatchEulerDiscreteScheduler)
    keys = {k for k in stock.config if not k.startswith("_")}
    assert {k: fused.config[k] for k in keys} == {k: stock.config[k] for k in keys}
    fused.save_pretrained(tmp_path)
    again = FusedFlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    back = FlowMatchEulerDiscreteScheduler.from_config(again.config)
    assert type(back) is FlowMatchEulerDiscreteScheduler
    assert {k: back.config[k] for k in keys} == {k: stock.config[k] for k in keys}
    assert again.shift == stock.shift == 3.0


class ToyTransformer(torch.nn.Module):
    """A stand-in for an SD3 / Flux transformer: a velocity from the latents, the timestep and a prompt
    embedding (zeros for the unconditional half)."""

    def __init__(self, channels=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.3)
        self.time = torch.nn.Parameter(torch.randn(channels, generator=g))

    def forward(self, latents, timestep, prompt):
        h = torch.einsum("bchw,cd->bdhw", latents, self.mix)
        t = (timestep / 1000).reshape(-1, 1, 1, 1).to(latents.dtype)
        return torch.tanh(h + t * self.time.reshape(1, -1, 1, 1)) + prompt.reshape(-1, 1, 1, 1)


def toy_pipeline(scheduler, guidance_scale, seed, fused_guidance=False, strength=None, steps=6, mu=None,
                 dtype=torch.float32):
    """The denoising loop of diffusers' SD3 pipeline (img2img when ``strength`` is given), classifier-free
    guidance formed the stock way or by ``guided_step``."""
    model = ToyTransformer().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 4, 8, 8)
    kwargs = {} if mu is None else {"mu": mu}
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    timesteps = scheduler.timesteps
    latents = diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, dtype=dtype)
    if strength is not None:
        image_latents = torch.linspace(-1, 1, latents.numel()).reshape(shape).to(dtype)
        t_start = int(steps - min(steps * strength, steps))
        timesteps = timesteps[t_start * scheduler.order:]
        scheduler.set_begin_index(t_start * scheduler.order)
        latent_timestep = timesteps[:1].repeat(shape[0])
        latents = scheduler.scale_noise(image_latents, latent_timestep, latents)
    prompt = torch.tensor([0.0, 0.0, 0.3, -0.2], dtype=dtype)  # [uncond; cond] embeddings
    with torch.no_grad():
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2)
            timestep = t.expand(latent_model_input.shape[0])
            noise_pred = model(latent_model_input, timestep, prompt)
            if fused_guidance:
                latents = scheduler.guided_step(noise_pred, t, latents, guidance_scale, generator=generator,
                                                return_dict=False)[0]
            else:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    return latents, generator.get_state()


@pytest.mark.parametrize("config,extra", [
    (dict(shift=3.0), {}),
    (dict(use_dynamic_shifting=True), dict(mu=1.0)),
    (dict(stochastic_sampling=True, shift=3.0), {}),
    (dict(shift=3.0), dict(strength=0.6)),
    (dict(stochastic_sampling=True), dict(strength=0.5)),
], ids=["sd3", "flux_dynamic", "stochastic", "img2img", "img2img_stochastic"])
@pytest.mark.parametrize("fused_guidance", [False, True], ids=["stock_guidance", "guided_step"])
def test_pipeline_same_images_as_stock(config, extra, fused_guidance):
    stock = FlowMatchEulerDiscreteScheduler(**config)
    expected, state = toy_pipeline(stock, 5.0, 0, **extra)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)
    got, fused_state = toy_pipeline(fused, 5.0, 0, fused_guidance=fused_guidance, **extra)
    assert_close_fp32(got, expected)
    assert torch.equal(state, fused_state)  # the same random numbers were drawn
    MAX_DIFF[f"pipeline_{config}_{extra}_{fused_guidance}"] = (got - expected).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_guided_step_in_half_precision_is_at_least_as_close_to_fp64_as_stock_guidance(dtype):
    """Guidance the stock way rounds ``u + w (c - u)`` to the model dtype before the step; guided_step forms it
    in float32 inside the step and rounds once."""
    stock, fused = pair(dict(shift=3.0), dict(num_inference_steps=6))
    g = torch.Generator().manual_seed(12)
    w = 4.5
    errors = {"stock": [], "fused": []}
    for i, t in enumerate(fused.timesteps):
        x = torch.randn(SHAPE, generator=g).to(dtype)
        uc = torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=g).to(dtype)
        u, c = uc.chunk(2)
        exact = step_fp64(x, u.double() + w * (c.double() - u.double()), fused.sigmas[i], fused.sigmas[i + 1])
        expected = stock.step(u + w * (c - u), t, x).prev_sample
        got = fused.guided_step(uc, t, x, guidance_scale=w).prev_sample
        assert got.dtype == expected.dtype == dtype
        errors["stock"].append((expected.double() - exact).abs())
        errors["fused"].append((got.double() - exact).abs())
        ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
        assert (errors["fused"][-1] <= ulp).all()  # one rounding: within an ulp of the output
    e_stock, e_fused = torch.stack(errors["stock"]), torch.stack(errors["fused"])
    assert e_fused.max() <= e_stock.max() and e_fused.mean() < e_stock.mean()
    MAX_DIFF[f"guided_{dtype}"] = (e_fused.max().item(), e_stock.max().item())


def test_guided_step_falls_back_to_the_stock_step_on_the_guided_output():
    stock, fused = pair({}, dict(num_inference_steps=4))
    x = torch.randn(SHAPE)
    mo2 = torch.randn((2 * SHAPE[0],) + SHAPE[1:])
    u, c = mo2.chunk(2)
    expected = stock.step(u + 3.0 * (c - u), stock.timesteps[0], x).prev_sample
    got = fused.guided_step(mo2, fused.timesteps[0], x, guidance_scale=3.0).prev_sample
    assert_close_fp32(got, expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = fused.guided_step(mo2[:, :1], fused.timesteps[1], x, guidance_scale=3.0).prev_sample
    assert any("stock" in str(w.message) for w in caught)
    u1, c1 = mo2[:, :1].chunk(2)
    assert_close_fp32(fallback, stock.step(u1 + 3.0 * (c1 - u1), stock.timesteps[1], x).prev_sample)


def test_package_exports():
    import ddpm_kernels.integrations.diffusers as package

    assert set(package.__all__) >= {"FusedDDPMScheduler", "FusedDDIMScheduler", "FusedFlowMatchEulerDiscreteScheduler"}
    assert package.FusedFlowMatchEulerDiscreteScheduler is FusedFlowMatchEulerDiscreteScheduler
    assert ddpm_kernels.integrations.diffusers.ddpm.FusedDDPMScheduler is package.FusedDDPMScheduler
