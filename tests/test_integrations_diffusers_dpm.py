"""FusedDPMSolverMultistepScheduler against the stock DPMSolverMultistepScheduler it replaces: full sampling loops
over the option matrix from the same generator (same images, same generator state, same stock attributes), the
call forms (begin index, a start inside the schedule, given noise, learned variance, half precision), per-sample
step indices through the op, the ring kept across steps and loops, the stock code path for what the fused step
does not take, and no host sync."""

import itertools
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from ddpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler  # noqa: E402
from ddpm_kernels.integrations.diffusers import _solver  # noqa: E402  (whose ring allocation a test counts)
from ddpm_kernels.solvers import new_history, solver_step  # noqa: E402
from helpers import (  # noqa: E402
    assert_close_to_stock, assert_stock_reads_the_device, scheduler_model, scheduler_pair,
    fail_on_sync,  # noqa: F401  (a fixture)
)

SHAPE = (2, 3, 6, 5)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PLUS = ("dpmsolver++", "sde-dpmsolver++")
SOLVERS = [(a, o, s) for a, o, s in itertools.product(
    ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"), (1, 2, 3), ("midpoint", "heun"))
    if not (a == "sde-dpmsolver" and o == 3)]
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _matrix():
    """Every algorithm x order x solver type on each sigma kind, with the prediction type, lower_order_final, the
    final sigma and the step count cycling through their values (a covering of the rest of the matrix)."""
    cases = []
    for k, ((algorithm, order, solver_type), sigmas) in enumerate(
            itertools.product(SOLVERS, ("vp", "karras", "flow"))):
        plus = algorithm in PLUS
        prediction = "flow_prediction" if sigmas == "flow" and plus and k % 2 else PREDICTIONS[k % 3]
        config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                      prediction_type=prediction, lower_order_final=bool(k % 2),
                      final_sigmas_type="zero" if plus and k % 4 < 2 else "sigma_min")
        if sigmas == "karras":
            config.update(use_karras_sigmas=True)
        elif sigmas == "flow":
            config.update(use_flow_sigmas=True, flow_shift=3.0)
        cases.append(pytest.param(config, (10, 16, 25)[k % 3], id=f"{algorithm}-{order}-{solver_type}-{sigmas}-"
                                  f"{prediction}-{config['final_sigmas_type']}-{'lof' if k % 2 else 'nolof'}"))
    return cases


model = scheduler_model


def pair(config, steps=10):
    return scheduler_pair(DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, config, steps)


def run_loop(scheduler, seed=0, dtype=torch.float32, timesteps=None, x=None, out=None, noises=None):
    """A pipeline's loop; returns the final sample, each step's (prev_sample, step_index, lower_order_nums) and
    the generator's final state."""
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(dtype)
    states = []
    for k, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        y = model(scheduler.scale_model_input(x, t), t) if out is None else out(x, t)
        kwargs = {} if noises is None else dict(variance_noise=noises[k])
        x = scheduler.step(y, t, x, generator=g, **kwargs).prev_sample
        states.append((x, scheduler.step_index, scheduler.lower_order_nums))
    return x, states, g.get_state()


def assert_same_loop(stock, fused, rtol=1e-5, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_loop(fused, **kw)
    assert not [w for w in caught if "stock" in str(w.message)], "the fused step took the stock path"
    expected = run_loop(stock, **kw)
    assert torch.equal(got[2], expected[2]), "the generators differ"
    for k, ((a, ia, na), (b, ib, nb)) in enumerate(zip(got[1], expected[1])):
        assert (ia, na) == (ib, nb), f"step {k}: step_index / lower_order_nums"
        assert a.dtype == b.dtype and a.shape == b.shape, f"step {k}"
        scale = b.float().nan_to_num().abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=f"step {k}")
    return got


@pytest.mark.parametrize("config,steps", _matrix())
def test_loops_match_stock(config, steps):
    stock, fused = pair(config, steps)
    # the epsilon-form flow loops divide by sigma_s down to 0.01: float32 rounding grows by up to 1/sigma
    rtol = 4e-5 if config.get("use_flow_sigmas") and config["algorithm_type"] not in PLUS else 1e-5
    assert_same_loop(stock, fused, rtol=rtol)


@pytest.mark.parametrize("config", [
    dict(use_lu_lambdas=True, prediction_type="v_prediction"),
    dict(use_exponential_sigmas=True),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, lambda_min_clipped=-5.1),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3),
    dict(euler_at_final=True, final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++"),
    dict(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction"),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sigma_schedules_match_stock(config):
    stock, fused = pair(dict(SD, **config), 12)
    if config.get("use_dynamic_shifting"):
        for s in (stock, fused):
            s.set_timesteps(12, mu=0.8)
    assert_same_loop(stock, fused)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("order", [2, 3])
def test_thresholding_matches_stock(algorithm, prediction, order):
    config = dict(algorithm_type=algorithm, prediction_type=prediction, solver_order=order, thresholding=True,
                  dynamic_thresholding_ratio=0.9, sample_max_value=1.5, final_sigmas_type="sigma_min")
    stock, fused = pair(config, 10)
    x = 2 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    assert_same_loop(stock, fused, x=x)


def test_begin_index_and_a_start_inside_the_schedule():
    """set_begin_index (a pipeline's img2img) and a first timestep inside the schedule: the warm-up starts there."""
    for begin in (3, 7):
        stock, fused = pair(dict(SD, solver_order=3), 12)
        for s in (stock, fused):
            s.set_begin_index(begin)
        assert_same_loop(stock, fused, timesteps=stock.timesteps[begin:])
        stock, fused = pair(dict(SD, solver_order=3), 12)
        assert_same_loop(stock, fused, timesteps=stock.timesteps[begin:])
    # a second loop on the same schedule from another start builds its own table
    stock, fused = pair(dict(SD, solver_order=3), 12)
    assert_same_loop(stock, fused)
    for s in (stock, fused):
        s.set_timesteps(12)
        s.set_begin_index(4)
    assert_same_loop(stock, fused, timesteps=stock.timesteps[4:])


def test_given_variance_noise_and_the_generator_state():
    stock, fused = pair(dict(SD, algorithm_type="sde-dpmsolver++"), 10)
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    assert_same_loop(stock, fused, noises=noises)


def test_learned_variance_output_is_sliced_as_stock():
    config = dict(SD, variance_type="learned_range")
    stock, fused = pair(config, 10)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    assert_same_loop(stock, fused, x=x, out=lambda x, t: torch.cat([model(x, t), torch.ones_like(x)], dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_other_precisions(dtype, algorithm):
    """The stock dtypes; values as close as the model dtype allows (the stock step keeps its converted outputs in
    half precision, the fused ring in float32)."""
    config = dict(SD, algorithm_type=algorithm, final_sigmas_type="sigma_min", prediction_type="v_prediction")
    stock, fused = pair(config, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, expected = run_loop(fused, dtype=dtype), run_loop(stock, dtype=dtype)
    for (a, *_), (b, *_) in zip(got[1], expected[1]):
        assert a.dtype == b.dtype == dtype
    tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(got[0].double(), expected[0].double(), rtol=tol, atol=tol)


def test_stock_attributes_are_kept():
    stock, fused = pair(dict(SD, solver_order=3), 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xs, xf = x, x.clone()
    for t in stock.timesteps[:4]:
        xs = stock.step(model(xs, t), t, xs).prev_sample
        xf = fused.step(model(xf, t), t, xf).prev_sample
        assert (fused.step_index, fused.lower_order_nums) == (stock.step_index, stock.lower_order_nums)
        listed = fused.model_outputs
        assert len(listed) == 3 and listed[0] is None  # the oldest, which no later step reads, is not kept
        for a, b in zip(listed[1:], stock.model_outputs[1:]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fused.set_timesteps(8)
    assert fused.model_outputs == [None] * 3 and fused.lower_order_nums == 0 and fused.step_index is None


@pytest.mark.parametrize("memory_format", ["batch_innermost", torch.channels_last])
def test_a_layout_change_within_the_loop_keeps_the_state(memory_format):
    # a first sample in another layout than the results after it (diffusers' own tests build theirs with the
    # batch innermost): the ring moves into the new layout with its history
    stock, fused = pair(dict(solver_order=3))
    x = torch.randn(SHAPE[1:] + SHAPE[:1], generator=torch.Generator().manual_seed(1)).permute(3, 0, 1, 2)
    if memory_format != "batch_innermost":
        x = x.contiguous(memory_format=memory_format)
    got = run_loop(fused, x=x)[0]
    assert_close_to_stock(got, run_loop(stock, x=x)[0])


@pytest.mark.parametrize("change", [dict(thresholding=True, sample_max_value=0.5), dict(solver_order=3),
                                    dict(prediction_type="sample"), dict(lower_order_final=False)])
def test_a_config_entry_changed_in_place_is_followed(change):
    # pipelines set scheduler.config.<name> directly (diffusers' FrozenDict lets it through) and stock reads it
    results = []
    for s in pair(dict(solver_order=2)):
        run_loop(s)
        for name, value in change.items():
            setattr(s.config, name, value)
        s.set_timesteps(10)
        results.append(run_loop(s)[0])
    assert_close_to_stock(results[1], results[0])


def test_first_order_keeps_no_ring():
    stock, fused = pair(dict(SD, solver_order=1), 6)
    assert_same_loop(stock, fused)
    assert fused.model_outputs == [None] and "_dk_buffers_" not in fused.__dict__


def test_in_kernel_noise():
    """``in_kernel_noise``: the op draws the SDE noise from the generator (another stream than stock's draw)."""
    _, fused = pair(dict(SD, algorithm_type="sde-dpmsolver++"), 8)
    fused.in_kernel_noise = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_loop(fused)
        fused.set_timesteps(8)
        again = run_loop(fused)
    assert not [w for w in caught if "stock" in str(w.message)]
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)  # the same generator, the same images
    fused.in_kernel_noise = False
    fused.set_timesteps(8)
    drawn = run_loop(fused)
    assert torch.isfinite(first[0]).all() and not torch.allclose(first[0], drawn[0])


def test_per_sample_step_indices_through_the_op():
    """Batch rows at different steps of one table and one ring: each row steps as it would alone."""
    _, fused = pair(dict(SD, solver_order=3, algorithm_type="sde-dpmsolver++", lower_order_final=False), 12)
    fused.step(torch.zeros(SHAPE), fused.timesteps[0], torch.zeros(SHAPE))  # builds the table
    (table,) = fused._dk_tables().devices.values()
    slots = 2
    g = torch.Generator().manual_seed(0)
    starts = [torch.randn((1,) + SHAPE[1:], generator=g) for _ in range(2)]
    noise = [[torch.randn((1,) + SHAPE[1:], generator=g) for _ in range(12)] for _ in range(2)]

    def alone(row):  # every state (sample, ring) of a single-row loop
        x, ring, states = starts[row], new_history(starts[row], slots), []
        for i in range(12):
            states.append((x, ring.clone()))
            t = fused.timesteps[i]
            x = solver_step(x, model(x, t), table, torch.tensor([i]), history=ring, noise=noise[row][i],
                            backend="reference")
        states.append((x, ring.clone()))
        return states

    a, b = alone(0), alone(1)
    lead = 5  # row 0 is 5 steps ahead of row 1
    x = torch.cat([a[lead][0], b[0][0]])
    ring = torch.cat([a[lead][1], b[0][1]], dim=1)
    for k in range(12 - lead):
        index = torch.tensor([lead + k, k])
        y = torch.cat([model(x[:1], fused.timesteps[lead + k]), model(x[1:], fused.timesteps[k])])
        z = torch.cat([noise[0][lead + k], noise[1][k]])
        x = solver_step(x, y, table, index, history=ring, noise=z, backend="reference")
        torch.testing.assert_close(x[:1], a[lead + k + 1][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x[1:], b[k + 1][0], rtol=1e-6, atol=1e-6)


def test_the_ring_is_allocated_once(monkeypatch):
    made = []

    def counting(like, slots):
        made.append(slots)
        return new_history(like, slots)

    monkeypatch.setattr(_solver, "new_history", counting)
    _, fused = pair(dict(SD, solver_order=3), 10)
    run_loop(fused)
    ring = fused._dk_buffers_[1]
    pointer = ring.data_ptr()
    for steps in (10, 7):
        fused.set_timesteps(steps)
        run_loop(fused, seed=steps)
        assert fused._dk_buffers_[1] is ring and ring.data_ptr() == pointer
    assert made == [2]
    fused.set_timesteps(10)
    run_loop(fused, x=torch.randn(1, 3, 6, 5))  # another shape: another ring
    assert made == [2, 2]


def test_unsupported_calls_take_the_stock_path_with_one_warning():
    # a sample_max_value the fused threshold does not take
    stock, fused = pair(dict(thresholding=True, sample_max_value=0.0, final_sigmas_type="sigma_min"), 6)
    with pytest.warns(RuntimeWarning, match="stock DPMSolverMultistepScheduler code path") as caught:
        got = run_loop(fused)
    assert len([w for w in caught if "stock" in str(w.message)]) == 1
    expected = run_loop(stock)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, equal_nan=True)
    # configurations the stock step refuses: the same error
    for config in (dict(algorithm_type="dpmsolver", prediction_type="flow_prediction",
                        final_sigmas_type="sigma_min"),
                   dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")):
        stock, fused = pair(config, 8)
        with pytest.raises(Exception) as stock_error:
            run_loop(stock)
        with pytest.warns(RuntimeWarning, match="stock"), pytest.raises(type(stock_error.value)):
            run_loop(fused)


def _run_both(stock, fused, loop):
    """``loop(scheduler, x)`` on the stock and on the fused scheduler from the same start sample: ``(stock's
    result, fused's result)`` and the warnings of the fused run."""
    results = []
    for s in (stock, fused):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(loop(s, x))
    return results, caught


@pytest.mark.parametrize("order", [2, 3])
def test_a_stock_step_mid_loop_takes_over_the_history(order):
    """A call the fused step does not take (here a model output that broadcasts) in the middle of a loop: the
    stock path gets the ring's outputs as its list and keeps the rest of the loop, as stock would run it."""
    stock, fused = pair(dict(SD, solver_order=order, lower_order_final=False), 10)

    def loop(s, x):
        for k, t in enumerate(s.timesteps):
            y = model(x, t)
            x = s.step(y[:1] if k == 5 else y, t, x).prev_sample
        return x

    (expected, got), caught = _run_both(stock, fused, loop)
    assert len([w for w in caught if "stock" in str(w.message)]) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_state_set_from_outside_gives_the_stock_order(order):
    """``step_index`` / ``lower_order_nums`` set by hand (as diffusers' tests and benchmarks do): the order is the
    one stock derives from them. With one ring slot (2M) the fused step serves it; with two, a step index moved
    by hand no longer says which slot holds the last output, and the stock path takes over with the ring's
    outputs as its list."""
    stock, fused = pair(dict(SD, solver_order=order, lower_order_final=False), 12)

    def loop(s, x):
        xs = []
        for k in list(range(6)) + [None, 3, 4, 5, 6, 7]:
            if k is None:  # rewind to index 3 as if one step had been taken
                s._step_index, s.lower_order_nums = 3, 1
                continue
            t = s.timesteps[k]
            x = s.step(model(x, t), t, x).prev_sample
            xs.append(x)
        return xs

    (expected, got), caught = _run_both(stock, fused, loop)
    assert len([w for w in caught if "stock" in str(w.message)]) == (order == 3)
    assert len(got) == len(expected) == 11
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_call_forms():
    stock, fused = pair(SD, 5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = fused.timesteps[0]
    (got,) = fused.step(model(x, t), t, x, return_dict=False)
    (expected,) = stock.step(model(x, t), t, x, return_dict=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    t = fused.timesteps[1]
    got = fused.step(model(x, t), int(t), x).prev_sample  # a Python number: found on the host
    expected = stock.step(model(x, t), int(t), x).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fresh = FusedDPMSolverMultistepScheduler(**SD)
    with pytest.raises(ValueError, match="set_timesteps"):  # the stock error
        fresh.step(x, 999, x)


def test_step_has_no_host_sync(fail_on_sync):
    schedulers = [pair(dict(SD, algorithm_type=a, solver_order=3 if a == "dpmsolver++" else 2,
                            thresholding=a == "dpmsolver++"), 8)[1] for a in PLUS]
    begin = pair(SD, 8)[1]
    begin.set_begin_index(2)
    # the first timestep a view of scheduler.timesteps (found in the host copy), later ones copies: not read
    steps = [[s.timesteps[0]] + [t.clone() for t in s.timesteps[1:]] for s in schedulers]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    fail_on_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s, ts in zip(schedulers, steps):
            y = x
            for t in ts:
                y = s.step(model(y, t), t, y, generator=g).prev_sample
        begin.step(model(x, 0), begin.timesteps[2].clone(), x)  # begin_index: the timestep is not read
    assert not [w for w in caught if "stock" in str(w.message)]  # every call ran the fused op


def test_sync_guard_catches_the_stock_scheduler(fail_on_sync):
    """The guard is not vacuous: the stock first lookup reads the timesteps (nonzero().item())."""
    assert_stock_reads_the_device(fail_on_sync, DPMSolverMultistepScheduler(**SD),
                                  lambda stock, t: stock.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_images_as_stock_on_cuda():
    results = []
    for cls in (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler):
        s = cls(**SD, algorithm_type="sde-dpmsolver++")
        s.set_timesteps(12, device="cuda")
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, generator=g).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_repeated_plain_steps_take_the_checked_call(monkeypatch):
    """After a plain step (no noise, one dtype) passed `solver_step`'s checks, the next steps on the same table,
    index tensor and ring go through the server resolved then (`solvers.table_step_server`: no checks, the index
    advanced in the same call), bit for bit the fully checked step; a step on other operands (a float16 model
    output) takes `solver_step`, and the next plain one the server again. Those served steps skip the step's
    own preparation too (the direct step)."""
    calls = []
    real_step, real_server = _solver.solver_step, _solver.table_step_server

    def spy_step(*args, **kwargs):
        calls.append(("checked", args[3].tolist()))
        return real_step(*args, **kwargs)

    def spy_server(*args):
        step = real_server(*args)
        return lambda *b: calls.append(("server", b[3].tolist())) or step(*b)

    monkeypatch.setattr(_solver, "solver_step", spy_step)
    monkeypatch.setattr(_solver, "table_step_server", spy_server)
    direct = []
    real_direct = FusedDPMSolverMultistepScheduler._dk_direct

    def spy_direct(self, *args):
        direct.append(self._step_index)
        return real_direct(self, *args)

    monkeypatch.setattr(FusedDPMSolverMultistepScheduler, "_dk_direct", spy_direct)
    stock, fused = pair(dict(algorithm_type="dpmsolver++", solver_order=2), 6)
    checked = FusedDPMSolverMultistepScheduler.from_config(stock.config)
    checked.set_timesteps(6)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for k, t in enumerate(fused.timesteps):
        out = model(x, t) if k != 4 else model(x, t).half()
        x = fused.step(out, t, x).prev_sample
        checked.__dict__.pop("_dk_checked_", None)  # every step fully checked
        y = checked.step(out, t, y).prev_sample
        assert torch.equal(x, y), k
    ours = calls[::2]  # (the calls of `fused`; `checked` takes solver_step every step)
    assert [c[0] for c in ours] == ["checked", "server", "server", "server", "checked", "server"]
    assert direct == [1, 2, 3, 5]  # the direct step (`_dk_continues`): all but the first and the float16 step
    assert [c[1] for c in ours] == [[k] * SHAPE[0] for k in range(6)]
