"""The fused kernels of the multistep-solver step (``solver_step``; docs/design.md, "Multistep solvers") on every
fused backend — the compiled CPU and CUDA kernels (csrc/solver.h) and Triton (ddpm_kernels/triton/solver.py, on
CPU through Triton's interpreter when there is no GPU) — against the reference: every dtype, odd shapes,
per-sample rows, ring sizes, the last-sample buffer, noise given / drawn in-kernel / none, guidance (two tensors
and the batched [uncond; cond] output, with rescale), clipping and thresholding, NaN in unread slots, a bad
index, out= and in-place steps, channels_last; the ring and the last sample written as the reference writes them;
opcheck, torch.compile(fullgraph=True), one launch per step and no allocation per step.

Tolerances are docs/design.md's "Tolerances" (tests/helpers.assert_matches), applied to the step's result, the
ring and the last-sample buffer alike.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels._spec import SolverStepOptions
from ddpm_kernels.solvers import SolverColumns, new_history, solver_step
from helpers import DTYPES, assert_matches, backend_params, make_inputs

GPU = torch.cuda.is_available()
BACKENDS = ("cpu", "cuda", "triton")
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if GPU else "cpu"}
STEPS = 7


def _impl(backend, dtype=torch.float32):
    """The backend object, or skip when it cannot run here or has no fused solver step."""
    try:
        impl = backends.get_backend(backend, torch.device(DEVICE[backend]), dtype)
    except backends.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if "solver_step" not in impl.ops:
        pytest.skip(f"{backend}: no fused solver_step")
    return impl


def _device(backend, dtype=torch.float32):
    """The device of a backend that runs the fused solver step here (skips as `_impl`)."""
    _impl(backend, dtype)
    return DEVICE[backend]


def _interpreted(backend):
    return backend == "triton" and not GPU


def _shapes(backend):
    """Odd shapes; small ones for the interpreter (tests/helpers.TRITON_SHAPES' reasoning)."""
    if _interpreted(backend):
        return [(3, 3, 5, 7), (2, 7, 4), (1, 5)]
    return [(4, 3, 17, 19), (2, 33, 8), (5, 7), (1,)]


def _table(slots, device, seed=0, density=0.7, steps=STEPS):
    """Random float64 coefficients, about a third exactly zero (the unread terms)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn((steps, SolverColumns(slots).width), generator=g, dtype=torch.float64) * 0.5
    return (table * (torch.rand(table.shape, generator=g, dtype=torch.float64) < density)).to(device)


def _step(backend, sample, model_output, coefficients, step_index, history, last_sample, seed=None, **kwargs):
    """One step on copies of the state: ``(x', history', last')`` (``seed``: in-kernel noise from a generator
    seeded so)."""
    history = None if history is None else history.clone(memory_format=torch.preserve_format)
    last_sample = None if last_sample is None else last_sample.clone(memory_format=torch.preserve_format)
    generator = None if seed is None else torch.Generator(sample.device).manual_seed(seed)
    result = solver_step(sample, model_output, coefficients, step_index, history, last_sample, generator=generator,
                         backend=backend, **kwargs)
    return tuple(t for t in (result, history, last_sample) if t is not None)


def _check(backend, dtype, kwargs):
    """The fused step against the reference (docs/design.md, "Tolerances"), no fallback warning. In-kernel noise
    agrees with the stream to 2^-20 relative (docs/design.md, "Noise streams"), so a float64 step drawing it is
    held to the float32 tolerance."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step(backend, **kwargs)
    drawn = kwargs.get("seed") is not None and dtype == torch.float64
    assert_matches(got, lambda **kw: _step("reference", **kw), (), kwargs, torch.float32 if drawn else dtype,
                   bf16_truncates=_interpreted(backend))
    return got


def _state(shape, slots, dtype, device, seed):
    """(history, last_sample), random (None for no ring)."""
    history = make_inputs((slots,) + shape, 1, dtype, seed=seed + 1, device=device)[0] if slots else None
    last = make_inputs(shape, 1, dtype, seed=seed + 2, device=device)[0]
    return history, last


# ------------------------------------------------------------------------------------ fused vs reference
@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, DTYPES))
def test_matches_reference(backend, dtype):
    """Every ring size 0..3 and one of 5 (past the slots whose columns the C++ Coef holds, csrc/solver.h), with and
    without the last sample, noise none / given / in-kernel, per-sample rows."""
    device = _device(backend, dtype)
    noises = ("none", "given", "kernel")
    for k, (shape, slots) in enumerate(itertools.product(_shapes(backend), (0, 1, 2, 3, 5))):
        noise_mode, with_last = noises[k % 3], k % 2 == 0
        x, y, z = make_inputs(shape, 3, dtype, seed=k, device=device)
        history, last = _state(shape, slots, dtype, device, k)
        index = torch.arange(shape[0], device=device) * 3 % STEPS
        kwargs = dict(sample=x, model_output=y, coefficients=_table(slots, device, seed=k), step_index=index,
                      history=history, last_sample=last if with_last else None)
        if noise_mode == "given":
            kwargs.update(noise=z)
        elif noise_mode == "kernel":
            kwargs.update(stochastic=True, seed=1234 + k)
        _check(backend, dtype, kwargs)


@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, [torch.float32, torch.bfloat16]))
def test_guidance_and_clip(backend, dtype):
    """Guided (two tensors, per-sample scales; the batched [uncond; cond] output), with rescale, and clipped."""
    device = _device(backend, dtype)
    shape = _shapes(backend)[0]
    x, c, u = make_inputs(shape, 3, dtype, device=device)
    history, last = _state(shape, 2, dtype, device, 0)
    base = dict(sample=x, coefficients=_table(2, device, density=0.9), step_index=torch.arange(shape[0],
                device=device) % STEPS, history=history, last_sample=last)
    scales = torch.linspace(1.0, 7.5, shape[0], device=device)
    for extra in (
        dict(model_output=c, uncond=u, guidance_scale=scales),
        dict(model_output=torch.cat([u, c]), guidance_scale=4.0),
        dict(model_output=c, uncond=u, guidance_scale=scales, guidance_rescale=0.7),
        dict(model_output=c, clip_range=0.5),
        dict(model_output=c, uncond=u, guidance_scale=3.0, guidance_rescale=0.3, clip_range=1.0),
    ):
        _check(backend, dtype, dict(base, **extra))


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_threshold(backend):
    """Triton thresholds in a first x0 pass; the compiled backends decline it (a sort), served by the reference
    with one warning."""
    impl = _impl(backend)
    device = DEVICE[backend]
    shape = _shapes(backend)[0]
    x, y = make_inputs(shape, 2, torch.float32, device=device)
    history, last = _state(shape, 2, torch.float32, device, 0)
    table = _table(2, device, density=1.0)
    kwargs = dict(sample=x * 3, model_output=y * 3, coefficients=table, step_index=torch.arange(shape[0],
                  device=device) % STEPS, history=history, last_sample=last, threshold_ratio=0.9,
                  threshold_max=2.0)
    opts = SolverStepOptions(threshold_ratio=0.9, threshold_max=2.0)
    reason = impl.declines("solver_step", opts)
    if reason:
        assert "threshold" in reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's one warning (once per process)
            served, _ = backends.resolve("solver_step", backend, torch.device(device), torch.float32, opts, None)
            got = _step(backend, **kwargs)
        assert served == "reference"
    else:
        got = _check(backend, torch.float32, kwargs)
        # guided with rescale: the x0 pass forms the same guided output, after the statistics pass
        u, = make_inputs(shape, 1, torch.float32, seed=5, device=device)
        _check(backend, torch.float32, dict(kwargs, uncond=u * 3, guidance_scale=2.5, guidance_rescale=0.5))
    for g, r in zip(got, _step("reference", **kwargs)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [3, 5])
@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, [torch.float32, torch.float64]))
def test_zero_coefficients_read_nothing_and_bad_rows_give_nan(backend, dtype, slots):
    """NaN/inf in every tensor a row leaves at zero leaves no trace; an index outside the table gives NaN for its
    sample (and its ring slot, at the index's floored modulo, as the reference writes it). 5 slots: past those
    whose columns the C++ Coef holds (csrc/solver.h)."""
    impl = _impl(backend, dtype)
    device = DEVICE[backend]
    shape = (4, 3, 5)
    col = SolverColumns(slots)
    x, y, z = make_inputs(shape, 3, dtype, device=device)
    history, last = _state(shape, slots, dtype, device, 0)
    table = torch.zeros((STEPS, col.width), dtype=torch.float64)
    table[:, col.x0_sample], table[:, col.x0_output], table[:, col.m_x0] = 1.5, -0.5, 1.0
    table[:, col.c_sample], table[:, col.p_xc], table[:, col.p_hist] = 1.0, 0.9, 0.25  # reads h_1 only
    table = table.to(device)
    index = torch.tensor([0, 3, -1, STEPS], device=device)  # two bad rows (the raw op: no value check)
    for j in range(2, slots + 1):  # h_2 .. h_H: never read
        history[(index.cpu() - j) % slots, torch.arange(4)] = float("nan") if j % 2 == 0 else float("inf")
    last.fill_(float("nan"))  # c_last = 0: not read
    z.fill_(float("nan"))  # p_noise = 0: not read
    opts = SolverStepOptions(stochastic=True)
    results = {}
    for name, fn in (("fused", impl.ops["solver_step"]), ("reference", dk.reference.solver_step_ref)):
        h, l = history.clone(), last.clone()
        out = fn(x, y, None, None, table, index, h, l, opts, noise=z)
        results[name] = (out, h, l)
    fused, ref = results["fused"], results["reference"]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r, rtol=tol, atol=tol, equal_nan=True)
    assert torch.isfinite(fused[0][:2]).all() and torch.isnan(fused[0][2:]).all()


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_noise_stream_and_generator(backend):
    """In-kernel noise is the stream the reference draws (same generator bookkeeping, sample_offset): equal to
    the step with that noise given; a deterministic step leaves the generator alone."""
    device = _device(backend)
    shape = (2, 3, 4, 5)
    x, y = make_inputs(shape, 2, torch.float32, device=device)
    table = _table(1, device, density=1.0)
    index = torch.tensor([1, 4], device=device)
    history = make_inputs((1,) + shape, 1, torch.float32, device=device)[0]
    for offset in (0, 5):
        g = torch.Generator(device).manual_seed(7)
        got = solver_step(x, y, table, index, history.clone(), stochastic=True, generator=g, sample_offset=offset,
                          backend=backend)
        after_fused = torch.randint(0, 2**62, (1,), generator=g, device=device)
        g = torch.Generator(device).manual_seed(7)
        z = dk.randn_stream(shape, generator=g, sample_offset=offset, device=device)
        after_ref = torch.randint(0, 2**62, (1,), generator=g, device=device)
        assert after_fused == after_ref
        given = solver_step(x, y, table, index, history.clone(), noise=z, backend=backend)
        torch.testing.assert_close(got, given, rtol=1e-5, atol=1e-5)
    g = torch.Generator(device).manual_seed(7)
    solver_step(x, y, table, index, history.clone(), generator=g, backend=backend)
    assert g.get_state().equal(torch.Generator(device).manual_seed(7).get_state())


# ------------------------------------------------------------------------------------ out=, layouts
@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_out_and_in_place(backend):
    device = _device(backend)
    shape = (3, 2, 5, 7)
    x, y, z = make_inputs(shape, 3, torch.float32, device=device)
    history, last = _state(shape, 2, torch.float32, device, 0)
    kwargs = dict(model_output=y, coefficients=_table(2, device), step_index=torch.tensor([0, 2, 5], device=device),
                  noise=z)
    expected = _step("reference", x, history=history, last_sample=last, **kwargs)
    out = torch.empty_like(x)
    h, l = history.clone(), last.clone()
    assert solver_step(x, history=h, last_sample=l, out=out, backend=backend, **kwargs) is out
    for got, e in zip((out, h, l), expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)
    h, l, x_in_place = history.clone(), last.clone(), x.clone()
    assert solver_step(x_in_place, history=h, last_sample=l, out=x_in_place, backend=backend, **kwargs) is x_in_place
    for got, e in zip((x_in_place, h, l), expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,ring", backend_params(BACKENDS, ["channels_last", "contiguous"]))
def test_channels_last(backend, ring):
    """NHWC data with the ring in its format (``new_history``) or not (read and written back through a copy),
    noise given and drawn in-kernel (indexed by row-major position), out= in NHWC and in place."""
    device = _device(backend)
    shape = (2, 3, 5, 4)
    x, y, z, u = (t.to(memory_format=torch.channels_last) for t in make_inputs(shape, 4, torch.float32, device=device))
    history = make_inputs((2,) + shape, 1, torch.float32, device=device)[0]
    if ring == "channels_last":
        history = new_history(x, 2).copy_(history)
        assert history[0].is_contiguous(memory_format=torch.channels_last)
    last = make_inputs(shape, 1, torch.float32, device=device)[0].to(memory_format=torch.channels_last)
    base = dict(sample=x, model_output=y, coefficients=_table(2, device, density=1.0),
                step_index=torch.tensor([1, 6], device=device), history=history, last_sample=last)
    for extra in (dict(noise=z), dict(stochastic=True, seed=3), dict(uncond=u, guidance_scale=2.5)):
        got = _check(backend, torch.float32, dict(base, **extra))
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    h, l, x_in_place = history.clone(), last.clone(), x.clone()
    g = torch.Generator(device).manual_seed(3)
    solver_step(x_in_place, y, base["coefficients"], base["step_index"], h, l, generator=g, stochastic=True,
                out=x_in_place, backend=backend)
    expected = _step("reference", **dict(base, stochastic=True, seed=3))
    for got, e in zip((x_in_place, h, l), expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)
    assert x_in_place.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_multistep_loop_matches_reference(backend):
    """A loop of steps 0..STEPS-1 carrying the ring and the last sample: the state stays the reference's."""
    device = _device(backend)
    shape = (2, 3, 4, 4)
    x, = make_inputs(shape, 1, torch.float32, device=device)
    table = _table(3, device, density=0.8)
    states = {}
    for name in (backend, "reference"):
        sample, history, last = x.clone(), new_history(x, 3), torch.zeros_like(x)
        for i in range(STEPS):
            index = torch.full((2,), i, device=device)
            solver_step(sample, sample * 0.5 - 0.1, table, index, history, last, out=sample, backend=name)
        states[name] = (sample, history, last)
    for f, r in zip(states[backend], states["reference"]):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ launches, allocations
def _launches(backend, fn, monkeypatch):
    """Kernel launches of ``fn()``: CUDA kernels on a GPU; the compiled CPU operator calls on the CPU; the
    interpreted Triton launches counted at the launcher."""
    if DEVICE[backend] == "cuda":
        from helpers import cuda_kernel_names

        return len(cuda_kernel_names(fn))
    if backend == "triton":
        from ddpm_kernels.triton import solver as ts

        calls = []
        original = ts.launch_per_sample
        monkeypatch.setattr(ts, "launch_per_sample", lambda *a, **k: (calls.append(a[0]), original(*a, **k)))
        fn()
        return len(calls)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and "ddpm_kernels" in e.name)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_one_launch_per_step(backend, monkeypatch):
    device = _device(backend)
    shape = (2, 3, 8, 8)
    x, y, u = make_inputs(shape, 3, torch.float32, device=device)
    history, last = new_history(x, 2), torch.zeros_like(x)
    table, index = _table(2, device), torch.tensor([2, 3], device=device)
    g = torch.Generator(device).manual_seed(0)
    scales = torch.tensor([3.0, 5.0], device=device)  # in the compute dtype already: no conversion launched
    for kwargs in (dict(), dict(stochastic=True, generator=g), dict(uncond=u, guidance_scale=scales, clip_range=1.0)):
        def step():
            solver_step(x, y, table, index, history, last, out=x, backend=backend, **kwargs)

        step()
        assert _launches(backend, step, monkeypatch) == 1, kwargs


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_loop_with_out_allocates_nothing_per_step(backend):
    """Counted with the profiler's memory events, as tests/test_hardening.py counts the p_sample loop's."""
    from torch.profiler import ProfilerActivity, profile

    device = _device(backend)
    shape = (4, 3, 16, 16)
    step_bytes = math.prod(shape) * 4
    x, y = make_inputs(shape, 2, torch.float32, device=device)
    history, last = new_history(x, 2), torch.zeros_like(x)
    table = _table(2, device)

    def loop():
        for i in range(STEPS):
            index = torch.full((4,), i, device=device)
            solver_step(x, y, table, index, history, last, out=x, backend=backend)

    loop()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        loop()
    big = [(e.name, e.cpu_memory_usage, e.device_memory_usage) for e in prof.events()
           if max(e.cpu_memory_usage, e.device_memory_usage) >= step_bytes // 2]
    assert not big, big


# ------------------------------------------------------------------------------------ opcheck, compile
def _operator_args(device, dtype, stochastic, guided, slots=2):
    shape = (2, 3, 4, 5)
    x, y, u, z = make_inputs(shape, 4, dtype, device=device)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    history = make_inputs((slots,) + shape, 1, dtype, device=device)[0]
    return [x, y, u if guided else None, torch.tensor([2.0, 5.0], dtype=cd, device=device) if guided else None,
            _table(slots, device), torch.tensor([1, 4], device=device), history, y.clone(), stochastic, 1.5,
            0.5 if guided else 0.0, z if stochastic else None, None, 0]


@pytest.mark.parametrize("device", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck_compiled(device, dtype):
    _impl(device, dtype)
    ops = torch.ops.ddpm_kernels
    for stochastic, guided in ((False, False), (True, True)):
        args = _operator_args(device, dtype, stochastic, guided)
        torch.library.opcheck(ops.solver_step.default, tuple(args))
        torch.library.opcheck(ops.solver_step_out.default, tuple(args) + (torch.empty_like(args[0]),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_triton(dtype):
    _impl("triton", dtype)
    from ddpm_kernels.triton import solver as ts

    device = DEVICE["triton"]
    for stochastic, guided in ((False, False), (True, True)):
        x, y, u, w, table, index, history, last, _, clip, rescale, z, _, offset = _operator_args(
            device, dtype, stochastic, guided)
        args = (x, y, u, w, table, index, history, last, clip, None, 1.0, rescale, stochastic, z, None, 0, 0, offset)
        torch.library.opcheck(ts.solver_step_op, args)
        torch.library.opcheck(ts.solver_step_out_op, args + (torch.empty_like(x),))


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_torch_compile_fullgraph(backend):
    """A step under torch.compile(fullgraph=True): the state mutation and the in-place result as eager."""
    device = _device(backend)
    shape = (2, 3, 8, 8)
    x, y, u = make_inputs(shape, 3, torch.float32, device=device)
    table, index = _table(2, device), torch.tensor([2, 5], device=device)

    def run(sample, history, last, c, un, idx):
        a = solver_step(sample, c, table, idx, history, last, uncond=un, guidance_scale=3.0, clip_range=2.0,
                        backend=backend)
        solver_step(sample, c, table, idx + 1, history, last, out=sample, backend=backend)
        return a

    states = []
    for fn in (run, torch.compile(run, fullgraph=True)):
        sample, history, last = x.clone(), new_history(x, 2).normal_(generator=torch.Generator(device).manual_seed(0)), \
            torch.ones_like(x)
        a = fn(sample, history, last, y, u, index)
        states.append((a, sample, history, last))
    for c, e in zip(states[1], states[0]):
        torch.testing.assert_close(c, e, rtol=1.3e-6, atol=1e-6)
