"""Bound operator calls (``ddpm_kernels.extension.bound_op``: ``_C.bind_op`` / ``call_bound``, csrc/fast_calls.cpp),
the drop-in schedulers' step call with its constant arguments converted once: the same operator through the
dispatcher as a ``torch.ops`` call with those arguments (bit for bit, seen by dispatch modes), the optional index
advance after the op, and clear errors for bad bindings and calls."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_kernels import _native, extension
from helpers import DTYPES

pytestmark = pytest.mark.skipif(_native.bind_op is None, reason="needs the compiled library")

FLOW_TAIL = (None, 1, 1, None, 1, 1, False, 0.0, None, None, 0)  # flow_step after its table operands


def _operands(dtype, shape=(3, 3, 5, 7), steps=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    table = torch.linspace(1.0, 0.0, steps + 1, dtype=compute)
    index = torch.tensor([0, 4, steps - 1][: shape[0]] * (shape[0] // 3 + 1))[: shape[0]]
    return x, v, table, index


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
def test_bound_flow_step_is_the_operator(dtype):
    """The bound flow step equals the ``torch.ops`` call with the same arguments bit for bit; with a next index
    it writes it into the step index after the op, with -1 it leaves the index alone."""
    x, v, table, index = _operands(dtype)
    op = torch.ops.ddpm_kernels.flow_step.default
    expected = op(x, v, None, None, table, index, *FLOW_TAIL)
    call = extension.bound_op("flow_step", (..., ..., None, None, ..., ..., *FLOW_TAIL), advance=5)
    before = index.clone()
    assert torch.equal(call(x, v, table, index, -1), expected) and torch.equal(index, before)
    assert torch.equal(call(x, v, table, index, 7), expected) and index.tolist() == [7] * x.shape[0]


def test_bound_calls_of_other_schemas():
    """A schema with str / float / bool constants and a tuple result (euler_step), and an out form (no result),
    without an index advance."""
    x, v, table, index = _operands(torch.float32)
    args = ("eps", 0.0, 0.0, math.inf, 1.0, 0.0, None, None, 0, True)  # (no churn: no noise drawn)
    expected = torch.ops.ddpm_kernels.euler_step.default(x, v, None, None, table * 14.6, index, *args)
    call = extension.bound_op("euler_step", (..., ..., None, None, ..., ..., *args))
    got = call(x, v, table * 14.6, index)
    assert isinstance(got, tuple) and len(got) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    out = torch.empty_like(x)
    call_out = extension.bound_op("flow_step_out", (..., ..., None, None, ..., ..., *FLOW_TAIL, ...))
    assert call_out(x, v, table, index, out) is None
    assert torch.equal(out, torch.ops.ddpm_kernels.flow_step.default(x, v, None, None, table, index, *FLOW_TAIL))
    # an optional tensor given per call may be None
    call_opt = extension.bound_op("flow_step", (..., ..., ..., None, ..., ..., *FLOW_TAIL))
    assert torch.equal(call_opt(x, v, None, table, index), out)


def test_bound_call_goes_through_the_dispatcher():
    """A TorchDispatchMode sees the operator and then the index fill, as it sees ``torch.ops`` calls."""
    x, v, table, index = _operands(torch.float32)
    call = extension.bound_op("flow_step", (..., ..., None, None, ..., ..., *FLOW_TAIL), advance=5)
    with _Seen() as seen:
        call(x, v, table, index, 3)
    assert seen.ops[0] == "ddpm_kernels.flow_step.default" and seen.ops[1].startswith("aten.fill_")
    assert len(seen.ops) == 2


def test_bad_bindings():
    """Binding names what is wrong: the argument count, a tensor constant, a value of the wrong kind, None for a
    non-optional argument, a per-call slot that is not a tensor, an advance that is not a per-call slot."""
    bind = _native.bind_op
    with pytest.raises(TypeError, match="takes 17 arguments, got 3"):
        bind("ddpm_kernels::flow_step", (..., ..., None))
    with pytest.raises(TypeError, match="sigma_period"):
        bind("ddpm_kernels::flow_step", (..., ..., None, None, ..., ..., None, 1.5, *FLOW_TAIL[2:]))
    with pytest.raises(TypeError, match="sample"):
        bind("ddpm_kernels::flow_step", (torch.zeros(1), ..., None, None, ..., ..., *FLOW_TAIL))
    with pytest.raises(TypeError, match="None for stochastic"):
        bind("ddpm_kernels::flow_step", (..., ..., None, None, ..., ..., *FLOW_TAIL[:6], None, *FLOW_TAIL[7:]))
    with pytest.raises(TypeError, match="cannot be given per call"):
        bind("ddpm_kernels::flow_step", (..., ..., None, None, ..., ..., None, ..., *FLOW_TAIL[2:]))
    with pytest.raises(TypeError, match="advance=2 is not a per-call argument"):
        bind("ddpm_kernels::flow_step", (..., ..., None, None, ..., ..., *FLOW_TAIL), 2)
    with pytest.raises(RuntimeError, match="no_such_op"):
        bind("ddpm_kernels::no_such_op", ())


def test_bad_calls_leave_the_index():
    """A call with the wrong count or kind of arguments raises TypeError naming it; the operator's own errors
    come back as ``torch.ops`` raises them; the index is advanced only after a successful op."""
    x, v, table, index = _operands(torch.float32)
    call = extension.bound_op("flow_step", (..., ..., None, None, ..., ..., *FLOW_TAIL), advance=5)
    with pytest.raises(TypeError, match="takes 5 per-call arguments, got 4"):
        call(x, v, table, index)
    with pytest.raises(TypeError, match="model_output must be a Tensor, got float"):
        call(x, 1.0, table, index, 1)
    with pytest.raises(TypeError, match="sample must be a Tensor, got NoneType"):
        call(None, v, table, index, 1)
    with pytest.raises(TypeError):
        call(x, v, table, index, "1")
    with pytest.raises(RuntimeError, match="sigmas"):
        call(x, v, table.double(), index, 1)  # a float64 table for float32 data
    with pytest.raises(RuntimeError, match="model_output"):
        call(x, v[:1], table, index, 1)
    assert index.tolist() == [0, 4, 9]
    with pytest.raises(TypeError, match="bound operator"):
        _native.call_bound()
    with pytest.raises(ValueError):
        _native.call_bound(object(), x)


@pytest.mark.parametrize("mixed", [False, True])
def test_public_table_steps_make_bound_calls(monkeypatch, mixed):
    """The public table-form steps' plain calls (unguided, no ``out``, generator or sample offset, contiguous
    operands) make one bound call of their operator: the same results, bit for bit, as the ``torch.ops`` call
    they make without the bound calls, for one dtype and the autocast mix; a call with ``out`` or a strided
    sample takes ``torch.ops``."""
    import ddpm_kernels as dk
    from ddpm_kernels.solvers import SolverColumns, new_history, solver_step

    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    if mixed:
        m = m.bfloat16()
    sigmas, index = torch.linspace(14.6, 0.0, 11), torch.tensor([0, 4])
    width = SolverColumns(2).width
    table = torch.linspace(-1.0, 1.0, 6 * width).reshape(6, width)

    def calls(**kwargs):
        ring, last = new_history(x, 2), torch.zeros_like(x)
        return [
            dk.flow_step(x, m, sigmas, index, backend="cpu", **kwargs),
            dk.euler_step(x, m, sigmas, index, backend="cpu", return_pred_x0=True, **kwargs),
            dk.euler_ancestral_step(x, m, sigmas, index, noise=z, backend="cpu", **kwargs),
            solver_step(x, m, table, index, ring, last, noise=z, backend="cpu", **kwargs), ring, last,
        ]

    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})  # (servers bound after the spy is in place)
    got = calls()
    assert len(bound) == 4
    bound.clear()
    calls(out=torch.empty_like(x))
    assert not bound
    monkeypatch.setattr(_native, "bind_op", None)  # every call through torch.ops
    expected = calls()
    flat = lambda values: [t for v in values for t in (v if isinstance(v, tuple) else (v,))]  # noqa: E731
    for a, b in zip(flat(got), flat(expected)):
        assert a.dtype == b.dtype and torch.equal(a, b)


class _Tagged(torch.Tensor):
    pass


def test_public_table_steps_keep_a_tensor_subclass():
    """A tensor subclass operand keeps the ``torch.ops`` call (its ``__torch_function__`` sees the operator), so
    the public steps return the subclass, as they did before the bound calls."""
    import ddpm_kernels as dk

    x = torch.randn(2, 3, 4).as_subclass(_Tagged)
    m = torch.randn(2, 3, 4)
    sigmas, index = torch.linspace(14.6, 0.0, 11), torch.tensor([0, 4])
    assert type(dk.flow_step(x, m, sigmas, index, backend="cpu")) is _Tagged
    assert type(dk.euler_step(x, m, sigmas, index, backend="cpu")) is _Tagged


def _p_sample_calls(x, m, z, t, schedule, **kwargs):
    """p_sample's calls that may take its bound server: functional, into a new ``out`` and in place, each
    parameterization with and without clipping."""
    import ddpm_kernels as dk

    got = []
    for parameterization in ("eps", "x0", "v"):
        for clip in (True, False):
            options = dict(parameterization=parameterization, clip_denoised=clip, noise=z, backend="cpu", **kwargs)
            got.append(dk.p_sample(x, t, m, schedule, **options))
            out = torch.empty_like(x)
            assert dk.p_sample(x, t, m, schedule, out=out, **options) is out
            got.append(out)
            inplace = x.clone()
            assert dk.p_sample(inplace, t, m, schedule, out=inplace, **options) is inplace
            got.append(inplace)
    return got


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
def test_public_p_sample_makes_bound_calls(monkeypatch, dtype):
    """p_sample's plain call (noise given, no generator or sample offset, contiguous operands of one dtype, no
    gradient) makes one bound call of its operator (or of its ``_out`` form): the same results, bit for bit, as the
    ``torch.ops`` calls it makes without the bound calls, t = 0 (no noise added) included."""
    from ddpm_kernels import DiffusionSchedule

    g = torch.Generator().manual_seed(1)
    x, m, z = (torch.randn(3, 2, 5, 3, generator=g).to(dtype) for _ in range(3))
    t, schedule = torch.tensor([0, 17, 999]), DiffusionSchedule(timesteps=1000)
    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})
    got = _p_sample_calls(x, m, z, t, schedule)
    assert len(bound) == len(got)
    monkeypatch.setattr(_native, "bind_op", None)  # every call through the prologue and torch.ops
    expected = _p_sample_calls(x, m, z, t, schedule)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_public_p_sample_other_calls_take_the_prologue(monkeypatch):
    """What the bound call does not serve takes the prologue with its checks and messages: a strided or mixed
    operand, a gradient, a generator or sample offset, a backend other than a compiled one, a tensor subclass, a
    bad timestep or option."""
    import ddpm_kernels as dk
    from ddpm_kernels import DiffusionSchedule

    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, schedule = torch.tensor([3, 40]), DiffusionSchedule(timesteps=100)
    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})
    base = dk.p_sample(x, t, m, schedule, noise=z, backend="cpu")
    assert len(bound) == 1
    bound.clear()
    strided = torch.randn(2, 4, 3).transpose(1, 2)
    strided.copy_(x)
    assert torch.equal(dk.p_sample(strided, t, m, schedule, noise=z, backend="cpu"), base)
    assert torch.equal(dk.p_sample(x, t, strided.clone().copy_(m), schedule, noise=z, backend="cpu"), base)
    assert torch.equal(dk.p_sample(x, t, m, schedule, noise=strided.clone().copy_(z), backend="cpu"), base)
    out = torch.empty(2, 4, 3).transpose(1, 2)
    assert dk.p_sample(x, t, m, schedule, noise=z, out=out, backend="cpu") is out and torch.equal(out, base)
    assert dk.p_sample(x, t, m.bfloat16(), schedule, noise=z, backend="cpu").dtype == torch.float32
    assert torch.equal(dk.p_sample(x, t, m, schedule, noise=z, backend="cpu", sample_offset=5), base)
    ref = dk.p_sample(x, t, m, schedule, noise=z, backend="reference")
    torch.testing.assert_close(ref, base)
    assert type(dk.p_sample(x.as_subclass(_Tagged), t, m, schedule, noise=z, backend="cpu")) is _Tagged
    dk.p_sample(x, t, m, schedule, noise=z, generator=torch.Generator(), backend="cpu")
    graded = dk.p_sample(x, t, m.clone().requires_grad_(), schedule, noise=z, backend="cpu")
    torch.testing.assert_close(graded.detach(), base)
    assert not bound
    with pytest.raises(ValueError, match="t"):
        dk.p_sample(x, torch.tensor([3, 100]), m, schedule, noise=z, backend="cpu")
    with pytest.raises(ValueError, match="parameterization"):
        dk.p_sample(x, t, m, schedule, parameterization="score", noise=z, backend="cpu")
    with pytest.raises(ValueError, match="out"):
        dk.p_sample(x, t, m, schedule, noise=z, out=torch.empty(2, 3, 5), backend="cpu")
    assert not bound


def _sampler_step_calls(x, m, z, t, t_prev, schedule):
    """ddim_step / ddpm_step calls that may take their bound server: DDIM without and with noise, its options,
    the returned x0, DDPM's variance types and parameterizations."""
    import ddpm_kernels as dk

    got = [
        dk.ddim_step(x, t, t_prev, m, schedule, backend="cpu"),
        dk.ddim_step(x, t, t_prev, m, schedule, noise=z, backend="cpu"),  # (eta = 0: the noise is not read)
        dk.ddim_step(x, t, t_prev, m, schedule, eta=0.7, noise=z, parameterization="v", clip_denoised=True,
                     set_alpha_to_one=False, use_clipped_model_output=True, backend="cpu"),
        *dk.ddim_step(x, t, t_prev, m, schedule, parameterization="x0", return_pred_x0=True, backend="cpu"),
    ]
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
        for parameterization in ("eps", "x0", "v"):
            got.append(dk.ddpm_step(x, t, t_prev, m, schedule, parameterization=parameterization,
                                    variance_type=variance_type, noise=z, backend="cpu"))
    got += dk.ddpm_step(x, t, t_prev, m, schedule, noise=z, clip_denoised=False, return_pred_x0=True, backend="cpu")
    return got


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
def test_public_sampler_steps_make_bound_calls(monkeypatch, dtype):
    """ddim_step / ddpm_step's plain calls (unguided, no generator, ``out`` or sample offset, contiguous operands
    of one dtype, no gradient) make one bound call of their operator: the same results, bit for bit, as the
    prologue and ``torch.ops`` calls they make without the bound calls, ``t_prev = -1`` and ``t = 0`` included."""
    from ddpm_kernels import DiffusionSchedule

    g = torch.Generator().manual_seed(2)
    x, m, z = (torch.randn(3, 2, 5, 3, generator=g).to(dtype) for _ in range(3))
    t, t_prev = torch.tensor([0, 17, 999]), torch.tensor([-1, 3, 979])
    schedule = DiffusionSchedule(timesteps=1000)
    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})
    got = _sampler_step_calls(x, m, z, t, t_prev, schedule)
    assert len(bound) == 17  # (one per call: 4 DDIM, 13 DDPM)
    monkeypatch.setattr(_native, "bind_op", None)
    expected = _sampler_step_calls(x, m, z, t, t_prev, schedule)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_public_sampler_steps_other_calls_take_the_prologue(monkeypatch):
    """What the bound call does not serve takes the prologue with its checks and messages: guidance, a generator,
    ``out``, a sample offset, thresholding (which the compiled backends decline), a learned variance, a strided or
    mixed operand, a tensor subclass, a missing or bad ``t_prev``, bad options."""
    import ddpm_kernels as dk
    from ddpm_kernels import DiffusionSchedule

    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, t_prev, schedule = torch.tensor([3, 40]), torch.tensor([1, 20]), DiffusionSchedule(timesteps=100)
    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})
    base = dk.ddpm_step(x, t, t_prev, m, schedule, noise=z, backend="cpu")
    assert len(bound) == 1
    bound.clear()
    assert torch.equal(dk.ddpm_step(x, t, t_prev, m, schedule, noise=z, out=torch.empty_like(x), backend="cpu"), base)
    assert torch.equal(dk.ddpm_step(x, t, t_prev, m, schedule, noise=z, sample_offset=4, backend="cpu"), base)
    dk.ddpm_step(x, t, t_prev, m, schedule, generator=torch.Generator(), backend="cpu")
    dk.ddim_step(x, t, t_prev, torch.cat([m, m]), schedule, guidance_scale=2.0, backend="cpu")
    dk.ddim_step(x, t, t_prev, m, schedule, threshold_ratio=0.9, backend="cpu")
    dk.ddpm_step(x, t, t_prev, torch.cat([m, m], 1), schedule, variance_type="learned", noise=z, backend="cpu")
    strided = torch.randn(2, 4, 3).transpose(1, 2)
    strided.copy_(x)
    assert torch.equal(dk.ddpm_step(strided, t, t_prev, m, schedule, noise=z, backend="cpu"), base)
    assert dk.ddpm_step(x, t, t_prev, m.bfloat16(), schedule, noise=z, backend="cpu").dtype == torch.float32
    assert type(dk.ddim_step(x.as_subclass(_Tagged), t, t_prev, m, schedule, backend="cpu")) is _Tagged
    graded = dk.ddpm_step(x, t, t_prev, m.clone().requires_grad_(), schedule, noise=z, backend="cpu")
    torch.testing.assert_close(graded.detach(), base)
    strided_m, strided_z = torch.randn(2, 4, 3).transpose(1, 2), torch.randn(2, 4, 3).transpose(1, 2)
    strided_m.copy_(m)
    strided_z.copy_(z)
    assert torch.equal(dk.ddpm_step(x, t, t_prev, strided_m, schedule, noise=z, backend="cpu"), base)
    assert torch.equal(dk.ddpm_step(x, t, t_prev, m, schedule, noise=strided_z, backend="cpu"), base)
    assert not bound
    with pytest.raises(TypeError, match="t_prev"):
        dk.ddim_step(x, t, None, m, schedule, backend="cpu")
    with pytest.raises(ValueError, match="t_prev"):
        dk.ddim_step(x, t, torch.tensor([1, 100]), m, schedule, backend="cpu")
    with pytest.raises(ValueError, match="variance_type"):
        dk.ddpm_step(x, t, t_prev, m, schedule, variance_type="other", noise=z, backend="cpu")
    with pytest.raises(ValueError, match="eta"):
        dk.ddim_step(x, t, t_prev, m, schedule, eta=-1.0, backend="cpu")
    assert not bound


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
def test_public_q_sample_makes_bound_calls(monkeypatch, dtype):
    """q_sample's plain call (noise given, contiguous operands of one dtype, none asking for a gradient) makes one
    bound call of its operator (or of its ``_out`` form, into a new tensor or in place): the same results, bit for
    bit, as without the bound calls; a call that asks for a gradient, a strided, mixed or subclass operand take the
    prologue, with its graph, result dtype and type."""
    import ddpm_kernels as dk
    from ddpm_kernels import DiffusionSchedule

    g = torch.Generator().manual_seed(3)
    x, z = (torch.randn(3, 2, 5, 3, generator=g).to(dtype) for _ in range(2))
    t, schedule = torch.tensor([0, 17, 999]), DiffusionSchedule(timesteps=1000)

    def calls():
        inplace, out = x.clone(), torch.empty_like(x)
        assert dk.q_sample(x, t, z, schedule, backend="cpu", out=out) is out
        assert dk.q_sample(inplace, t, z, schedule, backend="cpu", out=inplace) is inplace
        return [dk.q_sample(x, t, z, schedule, backend="cpu"), out, inplace]

    bound = []
    real = _native.call_bound
    monkeypatch.setattr(_native, "call_bound", lambda *a: bound.append(1) or real(*a))
    monkeypatch.setattr(extension, "_PUBLIC_SERVERS", {})
    got = calls()
    assert len(bound) == 3
    bound.clear()
    graded = dk.q_sample(x.clone().requires_grad_(), t, z, schedule, backend="cpu")
    assert graded.requires_grad and torch.equal(graded.detach(), got[0])
    strided = torch.empty(3, 2, 3, 5, dtype=dtype).transpose(2, 3)
    strided.copy_(x)
    assert torch.equal(dk.q_sample(strided, t, z, schedule, backend="cpu"), got[0])
    other = torch.float64 if dtype != torch.float64 else torch.float32
    assert dk.q_sample(x, t, z.to(other), schedule, backend="cpu").dtype == torch.promote_types(dtype, other)
    assert type(dk.q_sample(x.as_subclass(_Tagged), t, z, schedule, backend="cpu")) is _Tagged
    with pytest.raises(ValueError, match="t"):
        dk.q_sample(x, torch.tensor([0, 1, 1000]), z, schedule, backend="cpu")
    assert not bound
    monkeypatch.setattr(_native, "bind_op", None)
    for a, b in zip(got, calls()):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_public_plain_calls_under_a_torch_function_mode():
    """Under a TorchFunctionMode the plain calls of p_sample, q_sample, ddim_step and ddpm_step make their
    ``torch.ops`` call, which the mode sees (a bound C call would hide it), with the same results."""
    import ddpm_kernels as dk
    from torch.overrides import TorchFunctionMode

    from ddpm_kernels import DiffusionSchedule

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, t_prev, schedule = torch.tensor([3, 40]), torch.tensor([1, 20]), DiffusionSchedule(timesteps=100)
    calls = {
        "p_sample": lambda: dk.p_sample(x, t, m, schedule, noise=z, backend="cpu"),
        "q_sample": lambda: dk.q_sample(x, t, z, schedule, backend="cpu"),
        "ddim_step": lambda: dk.ddim_step(x, t, t_prev, m, schedule, backend="cpu"),
        "ddpm_step": lambda: dk.ddpm_step(x, t, t_prev, m, schedule, noise=z, backend="cpu"),
    }
    for name, call in calls.items():
        expected = call()
        with Seen() as seen:
            got = call()
        assert torch.equal(got, expected)
        assert any(name in n for n in seen.names), (name, seen.names)
