"""The error contract: bad input raises before any kernel runs, naming the argument and what was expected.

Runs against every backend name so each one gets the same validation (it lives in front of dispatch).
"""

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import ops

T = 50
S = dk.DiffusionSchedule(timesteps=T)


def args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(
        x=torch.randn(3, 2, 4, 4, generator=g),
        y=torch.randn(3, 2, 4, 4, generator=g),
        z=torch.randn(3, 2, 4, 4, generator=g),
        t=torch.tensor([0, 10, T - 1]),
        s=S,
    )
    a.update(over)
    return a


def call(op, a, **kw):
    x, y, z, t, s = a["x"], a["y"], a["z"], a["t"], a["s"]
    if op == "q_sample":
        return dk.q_sample(x, t, y, s, **kw)
    if op == "predict_start_from_noise":
        return dk.predict_start_from_noise(x, t, y, s, **kw)
    if op == "q_posterior":
        return dk.q_posterior(y, x, t, s, **kw)
    if op == "p_mean_variance":
        return dk.p_mean_variance(x, t, y, s, **kw)
    if op == "p_sample":
        return dk.p_sample(x, t, y, s, noise=z, **kw)
    if op == "diffusion_loss":
        return dk.diffusion_loss(x, y, z, t, s, **kw)
    raise AssertionError(op)


OPS = ["q_sample", "predict_start_from_noise", "q_posterior", "p_mean_variance", "p_sample", "diffusion_loss"]
BACKENDS = ["auto", "reference", "triton", "cuda", "cpu"]


@pytest.fixture(autouse=True)
def _no_kernel_runs(monkeypatch):
    """Any of these errors must come before dispatch: make dispatch itself fail loudly if reached."""

    def reached(*a, **k):
        raise AssertionError("dispatch reached with invalid arguments")

    monkeypatch.setattr(ops, "_dispatch", reached)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
class TestErrors:
    def test_t_out_of_range(self, op, backend):
        for bad in ([0, 10, T], [-1, 0, 0]):
            with pytest.raises(ValueError, match=r"t: expected values in \[0, 50\)"):
                call(op, args(t=torch.tensor(bad)), backend=backend)

    def test_t_wrong_shape(self, op, backend):
        for bad in (torch.tensor([1, 2]), torch.tensor([[1, 2, 3]]), torch.tensor(3)):
            with pytest.raises(ValueError, match=r"t: expected shape \(3,\)"):
                call(op, args(t=bad), backend=backend)

    def test_t_not_integer(self, op, backend):
        for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False, True])):
            with pytest.raises(TypeError, match="t: expected an integer tensor"):
                call(op, args(t=bad), backend=backend)
        with pytest.raises(TypeError, match="t: expected an int64 tensor"):
            call(op, args(t=[0, 1, 2]), backend=backend)

    def test_shape_mismatch(self, op, backend):
        with pytest.raises(ValueError, match=r"expected shape \(3, 2, 4, 4\)"):
            call(op, args(y=torch.randn(3, 2, 4, 5)), backend=backend)

    def test_integer_data(self, op, backend):
        with pytest.raises(TypeError, match="floating-point"):
            call(op, args(x=torch.zeros(3, 2, 4, 4, dtype=torch.int32)), backend=backend)

    def test_devices_differ(self, op, backend):
        with pytest.raises(ValueError, match="expected a tensor on cpu"):
            call(op, args(y=torch.randn(3, 2, 4, 4, device="meta")), backend=backend)

    def test_schedule_wrong_type_or_device(self, op, backend):
        with pytest.raises(TypeError, match="schedule: expected a ddpm_kernels.DiffusionSchedule"):
            call(op, args(s=S.betas), backend=backend)
        with pytest.raises(ValueError, match="schedule: its tables are on meta"):
            call(op, args(s=dk.DiffusionSchedule(timesteps=T).to("meta")), backend=backend)


@pytest.mark.parametrize("op", ["p_mean_variance", "p_sample", "diffusion_loss"])
def test_unknown_parameterization(op):
    with pytest.raises(ValueError, match="parameterization: expected one of"):
        call(op, args(), parameterization="score")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        dk.q_sample(*[args()[k] for k in ("x", "t", "y", "s")], backend="mps")


def test_other_bad_arguments():
    a = args()
    x, y, z, t, s = a["x"], a["y"], a["z"], a["t"], a["s"]
    with pytest.raises(TypeError, match="clip_denoised: expected a bool"):
        dk.p_sample(x, t, y, s, clip_denoised="yes", noise=z)
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        dk.diffusion_loss(x, y, z, t, s, loss_type="huber")
    with pytest.raises(TypeError, match="l_simple_weight: expected a real number"):
        dk.diffusion_loss(x, y, z, t, s, l_simple_weight="1")
    with pytest.raises(ValueError, match="original_elbo_weight: expected a finite number"):
        dk.diffusion_loss(x, y, z, t, s, original_elbo_weight=float("nan"))
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        dk.p_sample(x, t, y, s, generator=0)
    with pytest.raises(ValueError, match="out: expected shape"):
        dk.p_sample(x, t, y, s, noise=z, out=torch.empty(3, 2, 4))
    with pytest.raises(ValueError, match="out: expected shape"):
        dk.q_sample(x, t, y, s, out=torch.empty(1))
    with pytest.raises(TypeError, match="x_t: expected a torch.Tensor"):
        dk.p_sample(x.numpy(), t, y, s)
    with pytest.raises(ValueError, match="batch dimension"):
        dk.q_sample(torch.tensor(1.0), torch.tensor([0]), torch.tensor(1.0), s)


def test_device_t_value_check_switch(monkeypatch):
    """On CPU the value check is always on; the switch controls device tensors (simulated here)."""
    assert ops.set_device_t_check(True) is False
    assert ops.set_device_t_check(False) is True
    with dk.device_t_check(True):
        assert ops.device_t_check_enabled()
    assert not ops.device_t_check_enabled()


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.undo()
    a = args()
    with pytest.raises(dk.BackendUnavailableError, match="backend='cuda'"):
        dk.q_sample(a["x"], a["t"], a["y"], a["s"], backend="cuda")


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 dtype in this torch")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_float8_operand_is_refused_by_name(backend):
    # torch does not promote float8 with other floats: such an operand is refused by the checks, not by torch
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    low = x.to(torch.float8_e4m3fn)
    s = dk.DiffusionSchedule("linear", timesteps=10)
    calls = {
        "noise": lambda: dk.q_sample(x, t, low, s, backend=backend),
        "model_output": lambda: dk.p_sample(x, t, low, s, noise=x, backend=backend),
        "model_output ": lambda: dk.flow_step(x, low, torch.linspace(1, 0, 11), t, backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^{name.strip()}: expected dtype"):
            call()
