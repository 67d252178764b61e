"""The compiled argument check (``ddpm_kernels._C.inputs_ok``, csrc/fast_checks.cpp) that lets a valid call skip
the Python checks in ``ddpm_kernels.ops``. It may only say True where the full checks accept the arguments
as they are (no error, no conversion), and says False only where they convert or reject them, or for tensor
subclasses: every case here is judged by both."""

import os
import subprocess
import sys

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import _checks, _native, ops

pytestmark = pytest.mark.skipif(_native.inputs_ok is None, reason="needs the compiled library")

S = dk.DiffusionSchedule("linear", timesteps=50)
T = S.num_timesteps


class _Subclass(torch.Tensor):
    pass


def _python_accepts(x, others, out, t, t_prev):
    """Whether the full Python checks accept the arguments unchanged."""
    try:
        ops._check_data("x", x)
        for y in others:
            ops._check_like("y", y, "x", x)
        ops._check_schedule(S, x)
        t2 = ops._check_t(t, x, "x", S)
        t_prev2 = None if t_prev is None else ops._check_t_prev(t_prev, t2, S)
        out2 = ops._check_out(out, x, "x")
    except (TypeError, ValueError):
        return False
    return t2 is t and t_prev2 is t_prev and out2 is out


def _fast(x, others, out, t, t_prev=None, device_check=False):
    return _native.inputs_ok(x, others, out, S.table(), T, t, t_prev, device_check)


def _cases():
    x = torch.randn(3, 2, 5)
    y, z, out = torch.randn_like(x), torch.randn_like(x), torch.empty_like(x)
    t = torch.tensor([0, 17, T - 1])
    t_prev = torch.tensor([-1, 16, T - 2])
    strided_t = torch.tensor([[0, 9], [17, 9], [T - 1, 9]])[:, 0]
    grad_out = torch.empty_like(x).requires_grad_()
    return {
        "valid": (x, (y, z), out, t, t_prev),
        "valid, no out": (x, (y,), None, t, None),
        "missing operand": (x, (y, None), None, t, None),
        "valid channels_last": ((c := torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
                                (torch.randn_like(c),), None, t[:2], None),
        "parameter operand": (x, (torch.nn.Parameter(y),), out, t, None),
        "zero batch": (torch.randn(0, 4), (torch.randn(0, 4),), None, t[:0], None),
        "other dtype": (x, (y.double(),), None, t, None),
        "other shape": (x, (y[:, :, :4],), None, t, None),
        "other device": (x, (y.to("meta"),), None, t, None),
        "out dtype": (x, (y,), out.half(), t, None),
        "out requires grad": (x, (y,), grad_out, t, None),
        "integer data": (x.long(), (y.long(),), None, t, None),
        "0-d data": (torch.tensor(1.0), (), None, torch.tensor([1]), None),
        "subclass data": (x.as_subclass(_Subclass), (y,), None, t, None),
        "subclass operand": (x, (y.as_subclass(_Subclass),), None, t, None),
        "int32 t": (x, (y,), None, t.int(), None),
        "strided t": (x, (y,), None, strided_t, None),
        "2-d t": (x, (y,), None, t[:, None], None),
        "short t": (x, (y,), None, t[:2], None),
        "t = T": (x, (y,), None, torch.tensor([0, 1, T]), None),
        "t = -1": (x, (y,), None, torch.tensor([0, -1, 2]), None),
        "t_prev = -2": (x, (y,), None, t, torch.tensor([0, -2, 1])),
        "t_prev = T": (x, (y,), None, t, torch.tensor([0, T, 1])),
        "float t": (x, (y,), None, t.float(), None),
        "t not a tensor": (x, (y,), None, [0, 1, 2], None),
        "operand not a tensor": (x, (y.tolist(),), None, t, None),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_fast_check_agrees_with_the_python_checks(name):
    x, others, out, t, t_prev = CASES[name]
    accepted = _python_accepts(x, others, out, t, t_prev)
    assert accepted == name.startswith(("valid", "parameter", "zero", "subclass")), name
    # a tensor subclass may override metadata: always the Python path, which accepts it
    assert bool(_fast(x, others, out, t, t_prev)) == (accepted and not name.startswith("subclass")), name


def test_says_whether_an_operand_asks_for_a_gradient():
    """2: accepted and no gradient asked for (grad mode off, or no data operand requires grad), so dispatch
    skips its own scan; 1: accepted, some operand requires grad under grad mode."""
    x, y, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2])
    assert _fast(x, (y,), None, t) == 2
    for leaf in ((x.requires_grad_(), y), (x.detach(), y.requires_grad_())):
        assert _fast(leaf[0], (leaf[1],), None, t) == 1
        with torch.no_grad():
            assert _fast(leaf[0], (leaf[1],), None, t) == 2
        x, y = x.detach(), y.detach()
    assert _fast(x, (y,), None, torch.tensor([1, 5000])) == 0


def test_out_requiring_grad_is_fine_without_grad_mode():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    out = torch.empty_like(x).requires_grad_()
    with torch.no_grad():
        assert _fast(x, (y,), out, torch.tensor([1, 2]))
    assert not _fast(x, (y,), out, torch.tensor([1, 2]))


def test_device_timesteps_are_left_to_python_when_their_values_are_checked():
    """Values of a device t cannot be read without a host sync: with the device check on, the fast check
    declines (meta tensors stand in for a GPU here)."""
    x, t = torch.empty(2, 3, device="meta"), torch.empty(2, dtype=torch.long, device="meta")
    table = S.table().to("meta")
    assert _native.inputs_ok(x, (), None, table, T, t, None, False)
    assert not _native.inputs_ok(x, (), None, table, T, t, None, True)
    assert not _native.inputs_ok(x, (), None, S.table(), T, t, None, False)  # table on another device


def test_valid_calls_skip_the_python_tensor_checks(monkeypatch):
    """With the compiled library loaded, a plain valid call never reaches the Python tensor checks; an invalid
    one still gets their message."""
    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([3, 40])
    expected = dk.p_sample(x, t, m, S, noise=z, backend="reference")

    def fail(*args, **kwargs):
        raise AssertionError("the Python tensor checks ran")

    monkeypatch.setattr(_checks, "_check_timesteps", fail)
    monkeypatch.setattr(ops, "_check_like", fail)
    for backend in dk.available_backends("cpu"):
        torch.testing.assert_close(dk.p_sample(x, t, m, S, noise=z, backend=backend), expected)
        dk.ddim_step(x, t, t - 3, m, S, eta=0.5, noise=z, backend=backend)
        dk.q_sample(x, t, z, S, backend=backend)
        dk.diffusion_loss(m, x, z, t, S, backend=backend)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"t: expected values in \[0, 50\)"):
        dk.p_sample(x, torch.tensor([3, 50]), m, S, noise=z, backend="cpu")
    with pytest.raises(TypeError, match="noise: expected a floating-point tensor"):
        dk.p_sample(x, t, m, S, noise=z.int(), backend="cpu")


def test_compiled_calls_take_the_python_checks():
    """Inside torch.compile the C call would break the graph: the Python checks run (and are traced)."""
    x, m, z = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([3, 40])
    f = torch.compile(lambda x, t, m, z: dk.p_sample(x, t, m, S, noise=z, backend="cpu"), fullgraph=True)
    torch.testing.assert_close(f(x, t, m, z), dk.p_sample(x, t, m, S, noise=z, backend="cpu"))


_COLD_COMPILE = """
import torch, ddpm_kernels as dk
S = dk.DiffusionSchedule(timesteps=100)
x, m, z, t = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.tensor([3, 40])
f = torch.compile(lambda x, t, m, z: dk.p_sample(x, t, m, S, noise=z, backend=BACKEND), fullgraph=True)
y = f(x, t, m, z)  # the first call of the process: backend resolution (and the backend's import) is traced
torch.testing.assert_close(y, dk.p_sample(x, t, m, S, noise=z, backend="reference"))
"""


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_a_traced_first_call_resolves_its_backend(backend):
    """torch.compile(fullgraph=True) of an op as the first call of a fresh process: resolving the backend, which
    imports it, is traced (docs/design.md, "Dispatch")."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(dk.__file__)))
    code = f"BACKEND = {backend!r}\n" + _COLD_COMPILE
    res = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_missing_t_prev_is_still_refused(backend):
    """None is "no t_prev" to the compiled check; for the steps that take one it must still be an error."""
    x = torch.randn(2, 3)
    t = torch.tensor([1, 2])
    for step in (dk.ddim_step, dk.ddpm_step):
        with pytest.raises(TypeError, match="t_prev: expected an int64 tensor"):
            step(x, t, None, x, S, backend=backend)


def test_missing_operands_get_the_python_message():
    x, t = torch.randn(2, 3), torch.tensor([1, 2])
    for backend in dk.available_backends("cpu"):
        with pytest.raises(TypeError, match="model_output: expected a torch.Tensor, got NoneType"):
            dk.p_sample(x, t, None, S, backend=backend)
        with pytest.raises(TypeError, match="x_start: expected a torch.Tensor, got NoneType"):
            dk.q_posterior(None, x, t, S, backend=backend)
        with pytest.raises(TypeError, match="noise: expected a torch.Tensor, got NoneType"):
            dk.predict_start_from_noise(x, t, None, S, backend=backend)


def test_tensors_without_plain_storage_take_the_python_path():
    """functorch-wrapped and nested tensors have no plain storage to read: the fast check declines (and never
    lets a C++ exception escape); the ops behave as with the Python checks alone."""
    x, n = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([1, 2])
    grad = torch.func.grad(lambda xx: dk.q_sample(xx, t, n, S, backend="reference").sum())(x)
    torch.testing.assert_close(grad, S.sqrt_alphas_cumprod[t].view(2, 1, 1).expand(2, 3, 4))
    with pytest.raises(RuntimeError, match="storage"):  # the Python value check cannot read a vmapped CPU t
        torch.vmap(lambda tt: dk.q_sample(x, tt, n, S, backend="cpu"))(torch.tensor([[1, 2], [3, 4]]))
    nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(3, 5)])
    assert not _native.inputs_ok(nested, (nested,), None, S.table(), T, t, None, False)
    with pytest.raises(Exception) as info:  # a Python error, whatever layer reports it; never an abort
        dk.q_sample(nested, t, nested, S, backend="cpu")
    assert not isinstance(info.value, AssertionError)


def _table_steps(x, m, z, backend, sigmas=None, out=None, index=None):
    """The table-form steps' common calls: flow_step, euler_step, euler_ancestral_step and solver_step (a
    2-slot ring and a last-sample buffer, written by the call: fresh ones per call)."""
    from ddpm_kernels.solvers import SolverColumns, new_history, solver_step

    B = x.shape[0]
    sigmas = torch.linspace(14.6, 0.0, 11) if sigmas is None else sigmas
    index = torch.tensor([0, 4][:B]) if index is None else index
    width = SolverColumns(2).width
    table = torch.linspace(-1.0, 1.0, 6 * width).reshape(6, width)
    ring, last = new_history(x, 2), torch.zeros_like(x)
    return {
        "flow_step": dk.flow_step(x, m, sigmas, index, backend=backend, out=out),
        "flow_step stochastic": dk.flow_step(x, m, sigmas, index, noise=z, stochastic=True, backend=backend),
        "euler_step": dk.euler_step(x, m, sigmas, index, backend=backend, return_pred_x0=True),
        "euler_ancestral_step": dk.euler_ancestral_step(x, m, sigmas, index, noise=z, backend=backend),
        "solver_step": (solver_step(x, m, table, index, ring, last, noise=z, backend=backend), ring, last),
    }


def test_table_steps_skip_the_python_tensor_checks(monkeypatch):
    """The table-form steps' plain valid calls are accepted by the compiled check (the Python tensor checks never
    run) and give what the Python-checked calls give, bit for bit, on every CPU backend; an invalid call still
    gets the Python message."""
    from ddpm_kernels import flow, solvers

    x, m, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for backend in dk.available_backends("cpu"):
        with monkeypatch.context() as patch:
            patch.setattr(_native, "inputs_ok", lambda *args: 0)  # every call through the Python checks
            expected = _table_steps(x, m, z, backend)

        def fail(*args, **kwargs):
            raise AssertionError("the Python tensor checks ran")

        with monkeypatch.context() as patch:
            for module, name in ((_checks, "_check_timesteps"), (flow, "_check_like"), (flow, "_check_data"),
                                 (solvers, "_check_like"), (flow, "_check_out")):
                patch.setattr(module, name, fail)
            got = _table_steps(x, m, z, backend, out=torch.empty_like(x))
        for name, value in expected.items():
            for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (value, got[name]))):
                assert torch.equal(a, b), (backend, name)
    for bad_index in (torch.tensor([0, 10]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"step_index: expected values in \[0, 10\)"):
            dk.flow_step(x, m, torch.linspace(14.6, 0.0, 11), bad_index, backend="cpu")
    with pytest.raises(ValueError, match=r"step_index: expected values in \[0, 6\)"):
        _table_steps(x, m, z, "cpu", index=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="out: expected a tensor that does not require grad"):
        dk.euler_step(x, m, torch.linspace(14.6, 0.0, 11), torch.tensor([0, 1]), backend="cpu",
                      out=torch.empty_like(x).requires_grad_())
    with pytest.raises(TypeError, match="model_output: expected a floating-point tensor"):
        dk.euler_step(x, m.int(), torch.linspace(14.6, 0.0, 11), torch.tensor([0, 1]), backend="cpu")


def test_a_table_that_asks_for_a_gradient_is_dispatched_as_before(monkeypatch):
    """The compiled check answers for the data operands' gradients; a sigma table that asks for one makes the
    call one that needs a gradient, as the Python checks make it (the same backend, the same result)."""
    x, m = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sigmas = torch.linspace(14.6, 0.0, 11).requires_grad_()
    index = torch.tensor([0, 4])
    got = dk.euler_step(x, m, sigmas, index, backend="auto")
    monkeypatch.setattr(_native, "inputs_ok", lambda *args: 0)
    expected = dk.euler_step(x, m, sigmas, index, backend="auto")
    assert torch.equal(got, expected) and got.requires_grad == expected.requires_grad


def test_mixed_operands_are_checked_by_the_c_call_as_by_python():
    """With ``mixed`` (a 9th argument, True) the compiled check takes other operands and ``out`` of any floating
    dtype, of x's shape and device; integers, other shapes or devices still take the Python path."""
    x = torch.randn(3, 2, 5)
    t = torch.tensor([0, 17, T - 1])
    low, high = x.bfloat16(), x.double()
    assert not _fast(x, (low,), None, t)
    assert _native.inputs_ok(x, (low, high), x.clone(), S.table(), T, t, None, False, True) == 2
    assert _native.inputs_ok(x, (low.requires_grad_(),), None, S.table(), T, t, None, False, True) == 1
    for bad in (x.int(), torch.randn(3, 2, 4).bfloat16(), torch.randn(2, 2, 5).half()):
        assert not _native.inputs_ok(x, (bad,), None, S.table(), T, t, None, False, True)
    assert not _native.inputs_ok(x, (low,), torch.empty(3, 2, 4), S.table(), T, t, None, False, True)
    with pytest.raises(TypeError, match="takes 8 or 9 arguments"):
        _native.inputs_ok(x, (), None, S.table(), T, t)


def test_mixed_calls_skip_the_python_tensor_checks(monkeypatch):
    """A bf16 model output with float32 data (autocast's mix): the compiled check accepts the call (no Python
    tensor check runs) and it gives what the Python-checked call gives, bit for bit, for the DDPM ops and the
    table-form steps; an ``out`` not in the promoted dtype gets the Python message."""
    from ddpm_kernels import flow, solvers

    x, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    m = torch.randn(2, 3, 4).bfloat16()
    t = torch.tensor([3, 40])

    def ddpm_ops(backend):
        return {
            "p_sample": dk.p_sample(x, t, m, S, noise=z, backend=backend),
            "ddim_step": dk.ddim_step(x, t, t - 3, m, S, eta=0.5, noise=z, backend=backend),
            "ddpm_step": dk.ddpm_step(x, t, t - 3, m, S, noise=z, backend=backend, out=torch.empty_like(x)),
            "diffusion_loss": dk.diffusion_loss(m, x, z, t, S, backend=backend),
        }

    def fail(*args, **kwargs):
        raise AssertionError("the Python tensor checks ran")

    for backend in dk.available_backends("cpu"):
        with monkeypatch.context() as patch:
            patch.setattr(_native, "inputs_ok", lambda *args: 0)  # every call through the Python checks
            expected = dict(ddpm_ops(backend), **_table_steps(x, m, z, backend))
        with monkeypatch.context() as patch:
            for module, name in ((_checks, "_check_timesteps"), (ops, "_check_like"), (ops, "_check_out"),
                                 (flow, "_check_like"), (flow, "_check_data"), (solvers, "_check_like"),
                                 (flow, "_check_out")):
                patch.setattr(module, name, fail)
            got = dict(ddpm_ops(backend), **_table_steps(x, m, z, backend))
        for name, value in expected.items():
            for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (value, got[name]))):
                assert a.dtype == b.dtype and torch.equal(a, b), (backend, name)
    with pytest.raises(TypeError, match=r"out: expected dtype torch.float32 \(the promoted dtype"):
        dk.p_sample(x, t, m, S, noise=z, backend="cpu", out=torch.empty_like(m))
    with pytest.raises(TypeError, match=r"out: expected dtype torch.float32 \(the promoted dtype"):
        dk.euler_step(x, m, torch.linspace(14.6, 0.0, 11), torch.tensor([0, 1]), backend="cpu",
                      out=torch.empty_like(m))


def test_same_kind():
    """``same_kind(ref, *tensors)``: True only for plain tensors of the reference's dtype, sizes and device of which
    no gradient is asked (grad mode on and requires_grad); anything else, a subclass or a non-tensor, is False."""
    ref = torch.empty((), dtype=torch.float32).expand(2, 3)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    assert _native.same_kind(ref) is True
    assert _native.same_kind(ref, x, y) is True
    assert _native.same_kind(ref, x.t().contiguous().t()) is True  # (strides are not compared)
    assert _native.same_kind(ref, x, y.double()) is False
    assert _native.same_kind(ref, x, torch.randn(3, 2)) is False
    assert _native.same_kind(ref, x, torch.randn(2, 3, 1)) is False
    assert _native.same_kind(ref, x, torch.randn(2, 3, device="meta")) is False
    assert _native.same_kind(ref, x.as_subclass(_Subclass)) is False
    assert _native.same_kind(ref, x, 1.0) is False
    assert _native.same_kind(1.0, x) is False
    graded = torch.randn(2, 3, requires_grad=True)
    assert _native.same_kind(ref, x, graded) is False
    with torch.no_grad():
        assert _native.same_kind(ref, x, graded) is True
    with pytest.raises(TypeError, match="same_kind"):
        _native.same_kind()
