"""Mixed float dtypes (docs/design.md, "Mixed precision"): a bf16/fp16 model output (or noise) with fp32 data,
as under ``torch.autocast``, gives torch's type promotion of the inputs — the call with every operand in the
promoted dtype — on every backend; gradients come back in each input's own dtype; GaussianDiffusion trains
and samples under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels.solvers import SolverColumns

T = 50
S = dk.DiffusionSchedule("linear", timesteps=T)
_KARRAS = torch.cat([torch.linspace(14.6, 0.03, T), torch.zeros(1)])  # an Euler sigma table, final sigma 0
LOW = (torch.bfloat16, torch.float16)


def _backends():
    names = ["reference"] + [b for b in dk.available_backends("cpu") if b in ("cpu", "triton")]
    return names


# The schedules and sigma tables of the test calls per device type: a call takes them on its data's device, made
# there by _inputs before any call (so that a test counting conversions sees none of theirs).
_ON = {"cpu": (S, _KARRAS, torch.linspace(1, 0, T + 1))}


def _inputs(shape=(3, 2, 5, 7), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if device not in _ON:
        _ON[device] = (dk.DiffusionSchedule("linear", timesteps=T).to(device), _KARRAS.to(device),
                       torch.linspace(1, 0, T + 1).to(device))
    return [torch.randn(shape, generator=g).to(device) for _ in range(4)], torch.tensor([0, 17, T - 1], device=device)


def _sched(x):
    """The schedule S on x's device."""
    return _ON[x.device.type][0]


def _karras(x):
    """The Euler sigma table on x's device."""
    return _ON[x.device.type][1]


def _linear(x):
    """A flow-matching sigma table (1 to 0) on x's device."""
    return _ON[x.device.type][2]


def _rand(x, shape, seed):
    """Uniform values of ``shape`` on x's device from a generator seeded with ``seed`` there."""
    return torch.rand(shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device)


def _device(backend):
    """The device of a backend's test tensors: CUDA for the CUDA kernels, else the CPU."""
    return "cuda" if backend == "cuda" else "cpu"


def _runs(backend):
    """Whether ``backend`` runs here on its device (the CUDA kernels need a GPU)."""
    device = _device(backend)
    return (device == "cpu" or torch.cuda.is_available()) and backend in dk.available_backends(device)


# (name, call(x, y, z, t, backend)) where y is the operand whose dtype differs (the model output or noise)
CALLS = {
    "q_sample": lambda x, y, z, t, b: dk.q_sample(x, t, y, _sched(x), backend=b),
    "predict_start_from_noise": lambda x, y, z, t, b: dk.predict_start_from_noise(x, t, y, _sched(x), backend=b),
    "get_v": lambda x, y, z, t, b: dk.get_v(x, y, t, _sched(x), backend=b),
    "q_posterior": lambda x, y, z, t, b: dk.q_posterior(y, x, t, _sched(x), backend=b),
    "p_mean_variance": lambda x, y, z, t, b: dk.p_mean_variance(x, t, y, _sched(x), "v", backend=b),
    "p_sample": lambda x, y, z, t, b: dk.p_sample(x, t, y, _sched(x), noise=z, backend=b),
    "p_sample_low_noise": lambda x, y, z, t, b: dk.p_sample(x, t, z, _sched(x), noise=y, backend=b),
    "diffusion_loss": lambda x, y, z, t, b: dk.diffusion_loss(y, x, z, t, _sched(x), "v", original_elbo_weight=0.5,
                                                              backend=b),
    "ddim_step": lambda x, y, z, t, b: dk.ddim_step(x, t, t - 1, y, _sched(x), eta=0.5, noise=z, backend=b),
    "ddpm_step": lambda x, y, z, t, b: dk.ddpm_step(x, t, t - 1, y, _sched(x), noise=z, backend=b),
    "flow_interpolate": lambda x, y, z, t, b: dk.flow_interpolate(x, y, t / T, backend=b),
    "flow_step": lambda x, y, z, t, b: dk.flow_step(x, y, _linear(x), t, noise=z, stochastic=True, backend=b),
    "flow_step_guided": lambda x, y, z, t, b: dk.flow_step(x, y, _linear(x), t, backend=b, guidance_scale=3.0,
                                                           uncond=z, guidance_rescale=0.5),
    "flow_loss": lambda x, y, z, t, b: dk.flow_loss(y, x, z, (t + 1) / (T + 1), "cosmap", backend=b),
    "flow_interpolate_low_x0": lambda x, y, z, t, b: dk.flow_interpolate(y, x, t / T, backend=b),
    "flow_step_per_token_sigma": lambda x, y, z, t, b: dk.flow_step(
        x, y, sigma=_rand(x, (x.shape[0], x.shape[1]), 1), sigma_next=_rand(x, (x.shape[0], 1, x.shape[2]), 2),
        backend=b),
    "euler_step": lambda x, y, z, t, b: dk.euler_step(x, y, _karras(x), t, "v_prediction", noise=z, s_churn=5.0,
                                                      return_pred_x0=True, backend=b),
    "euler_step_guided": lambda x, y, z, t, b: dk.euler_step(x, y, _karras(x), t, backend=b, guidance_scale=2.5,
                                                             uncond=z, guidance_rescale=0.3),
    "euler_ancestral_step": lambda x, y, z, t, b: dk.euler_ancestral_step(x, y, _karras(x), t, noise=z, backend=b),
    "solver_step": lambda x, y, z, t, b: _solver_call(x, y, z, t, b),
    "solver_step_guided_clipped": lambda x, y, z, t, b: _solver_call(x, y, z, t, b, guidance_scale=1.5,
                                                                      uncond=z.flip(0), clip_range=1.0),
}


def _solver_call(x, y, z, t, backend, noise=True, **kwargs):
    """A stochastic `solver_step` on a random two-slot table: ``(x', history, last_sample)``, the state fresh
    per call (in the promoted dtype of ``x``, ``y`` and ``z``)."""
    g = torch.Generator(x.device).manual_seed(3)
    table = torch.randn(T, SolverColumns(2).width, generator=g, dtype=torch.float64, device=x.device)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), z.dtype)
    history = torch.randn((2,) + tuple(x.shape), generator=g, dtype=dtype, device=x.device)  # drawn in it: no cast
    last = torch.randn(x.shape, generator=g, dtype=dtype, device=x.device)
    result = dk.solver_step(x, y, table, t, history=history, last_sample=last, noise=z if noise else None,
                            backend=backend, **kwargs)
    return result, history, last


def _tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _interpreted_triton(backend):
    if backend != "triton":
        return False
    from ddpm_kernels.triton import utils

    return utils.INTERPRETED


def _rounded(g32, low, backend):
    """A float32 gradient as a kernel storing it in ``low`` gives it: rounded to nearest, except through Triton's
    interpreter, whose float32 -> bfloat16 conversion truncates (compiled Triton rounds to nearest)."""
    if low == torch.bfloat16 and _interpreted_triton(backend):
        return (g32.contiguous().view(torch.int32) & -65536).view(torch.float32).to(low)
    return g32.to(low)


class _Casts(TorchDispatchMode):
    """The dtype conversions and copies a call launches outside the library's own operators (whose kernels are
    what they are), and which of those operators ran."""

    CASTS = ("aten::_to_copy", "aten::copy_", "aten::to", "aten::_to_dtype")

    def __init__(self):
        super().__init__()
        self.casts, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("ddpm_kernels"):
            self.ops.append(name)
        elif any(name.startswith(c) for c in self.CASTS):
            self.casts.append(name)
        return func(*args, **(kwargs or {}))


# ops whose mixed calls the fused kernels (Triton's, the compiled CPU backend's) read natively (their backends'
# mixed_dtypes), by their CALLS names
NATIVE_CALLS = [n for n in CALLS if n.startswith(("q_sample", "predict_start", "get_v", "q_posterior", "p_mean",
                                                  "p_sample", "diffusion_loss", "ddim_step", "ddpm_step", "flow_",
                                                  "euler_", "solver_step"))]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("name", list(CALLS))
def test_low_precision_operand_promotes(name, low, backend):
    """The low-precision operand is read as float32: exactly the all-float32 call (the cast is exact), results in
    float32."""
    op = next(o for o in backends.reference.OPS if name.startswith(o))
    if backend != "reference" and op not in backends.get_backend(backend, torch.device("cpu"), torch.float32).ops:
        pytest.skip(f"{backend}: no fused {op}")
    (x, y, z, _), t = _inputs((3, 2, 3, 5) if backend == "triton" else (3, 2, 5, 7))
    y_low = y.to(low)
    got = _tuple(CALLS[name](x, y_low, z, t, backend))
    expected = _tuple(CALLS[name](x, y_low.float(), z, t, backend))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32 == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_promotion_follows_torch():
    """float64 with float32 gives float64; bf16 with fp16 gives float32; every output kind follows."""
    (x, y, z, _), t = _inputs()
    assert dk.q_sample(x, t, y.double(), S, backend="reference").dtype == torch.float64
    out = dk.q_sample(x.bfloat16(), t, y.half(), S)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dk.q_sample(x.bfloat16().float(), t, y.half().float(), S), rtol=0, atol=0)
    mean, var, log_var = dk.q_posterior(y.bfloat16(), x, t, S)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


def test_in_place_step_with_low_precision_model_output():
    """An fp32 sampling buffer stepped in place with a bf16 model output (the autocast sampling loop)."""
    (x, y, z, _), t = _inputs()
    expected = dk.p_sample(x, t, y.bfloat16().float(), S, noise=z)
    buf = x.clone()
    assert dk.p_sample(buf, t, y.bfloat16(), S, noise=z, out=buf) is buf
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="out: expected dtype torch.float32"):  # the promoted result does not fit a bf16 out
        dk.p_sample(x.bfloat16(), t, y, S, noise=z, out=torch.empty_like(x, dtype=torch.bfloat16))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", _backends())
def test_gradients_in_each_inputs_dtype(backend):
    (x, y, z, _), t = _inputs((3, 2, 3, 5))
    for low in LOW:
        mo = y.to(low).requires_grad_()
        loss, _, _ = dk.diffusion_loss(mo, x, z, t, S, backend=backend)
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, mo)
        assert g.dtype == low
        mo32 = y.to(low).float().requires_grad_()
        (g32,) = torch.autograd.grad(dk.diffusion_loss(mo32, x, z, t, S, backend=backend)[0], mo32)
        torch.testing.assert_close(g, _rounded(g32, low, backend), rtol=0, atol=0)
        noise = z.to(low).requires_grad_()
        x_start = x.clone().requires_grad_()
        gx, gn = torch.autograd.grad(dk.q_sample(x_start, t, noise, S, backend=backend).sum(), (x_start, noise))
        assert gx.dtype == torch.float32 and gn.dtype == low
        flow_backend = backend if backend == "reference" or "flow_loss" in backends.get_backend(
            backend, torch.device("cpu"), torch.float32).ops else "reference"
        fl = dk.flow_loss(mo, x, z, (t.float() + 1) / (T + 1), backend=flow_backend)
        (gf,) = torch.autograd.grad(fl, mo)
        assert fl.dtype == torch.float32 and gf.dtype == low


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, tt], dim=1))


def test_gaussian_diffusion_trains_and_samples_under_autocast():
    """Under CPU autocast (bf16) the model returns bf16 while the data stays fp32: the loss is fp32 and
    differentiable into the model's parameters, and the sampling loop runs in fp32 in place."""
    torch.manual_seed(0)
    diffusion = dk.GaussianDiffusion(_Tiny(), S, image_size=6, channels=2)
    x0 = torch.randn(4, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert diffusion.model(x0, torch.zeros(4, dtype=torch.long)).dtype == torch.bfloat16
        loss, logs = diffusion(x0)
    assert loss.dtype == torch.float32 and bool(loss.isfinite())
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in diffusion.model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        samples = diffusion.sample(batch_size=2, progress=False, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float32 and samples.shape == (2, 2, 6, 6) and bool(samples.isfinite().all())


def test_auto_serves_mixed_calls_with_the_fused_backend():
    """Promotion happens before dispatch: a mixed call is a plain float32 call to the backends."""
    if "cpu" not in dk.available_backends("cpu"):
        pytest.skip("the compiled CPU backend is not built")
    name, _ = backends.resolve("p_sample", "auto", torch.device("cpu"), torch.float32, None, None)
    assert name == "cpu"


# (backend, operator namespace, test shape): the Triton interpreter is slow; the CPU shape has full vectors and
# tails, the CUDA one packets (N % 4 == 0) and single elements (odd N)
_FUSED = {"triton": ("ddpm_kernels_triton", (3, 2, 3, 5)), "cpu": ("ddpm_kernels", (3, 2, 5, 37)),
          "cuda": ("ddpm_kernels", (3, 2, 5, 37))}
_CUDA = pytest.param("cuda", marks=pytest.mark.gpu)  # the compiled CUDA kernels (skipped without a GPU)
FUSED_BACKENDS = ["triton", "cpu", _CUDA]
COMPILED_BACKENDS = ["cpu", _CUDA]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("name", NATIVE_CALLS)
def test_fused_kernels_read_mixed_operands_without_a_cast(name, low, backend):
    """The Triton, CPU and CUDA kernels read the low-precision operand in its own dtype: the call launches no
    conversion or copy before its kernel (the reference, which casts, is the control that the count sees one),
    and equals the all-float32 call exactly. CUDA: also with N % 4 == 0 (packet loads of each operand's own
    width)."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    namespace, shape = _FUSED[backend]
    (x, y, z, _), t = _inputs(shape, device=_device(backend))
    with _Casts() as ref:
        CALLS[name](x, y.to(low), z, t, "reference")
    assert ref.casts
    _assert_reads_natively(name, low, backend, shape, namespace)
    if backend == "cuda":
        _assert_reads_natively(name, low, backend, (3, 2, 4, 36), namespace)


def _assert_reads_natively(name, low, backend, shape, namespace):
    """CALLS[name] with its operand y in ``low`` launches no conversion or copy before the operators of
    ``namespace``, and equals the all-float32 call exactly, in float32."""
    (x, y, z, _), t = _inputs(shape, device=_device(backend))
    y_low = y.to(low)
    with _Casts() as mode:
        got = _tuple(CALLS[name](x, y_low, z, t, backend))
    assert mode.casts == [] and any(op.startswith(namespace + "::") for op in mode.ops), (mode.casts, mode.ops)
    for g, e in zip(got, _tuple(CALLS[name](x, y_low.float(), z, t, backend)), strict=True):
        assert g.dtype == torch.float32 == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="the Triton backend does not run here")
@pytest.mark.parametrize("low", LOW, ids=str)
def test_triton_low_precision_data_with_float32_operands(low):
    """The data is the low-precision operand (a bf16 sample with an fp32 model output, a bf16 model output in
    the loss with fp32 targets): results in the promoted float32, exactly the all-float32 call, no cast."""
    (x, y, z, _), t = _inputs((3, 2, 3, 5))
    x_low = x.to(low)
    calls = [
        lambda x, y, z, b: dk.p_sample(x, t, y, S, noise=z, backend=b),
        lambda x, y, z, b: dk.q_sample(x, t, y, S, backend=b),
        lambda x, y, z, b: dk.p_mean_variance(x, t, y, S, "x0", backend=b),
        lambda x, y, z, b: dk.diffusion_loss(x, y, z, t, S, "v", original_elbo_weight=0.5, backend=b),
        lambda x, y, z, b: dk.flow_interpolate(x, y, t / T, backend=b),
        lambda x, y, z, b: dk.flow_step(x, y, torch.linspace(1, 0, T + 1), t, noise=z, stochastic=True, backend=b),
        lambda x, y, z, b: dk.flow_loss(x, y, z, (t + 1) / (T + 1), "sigma_sqrt", backend=b),
        lambda x, y, z, b: dk.euler_step(x, y, _KARRAS, t, "sample", return_pred_x0=True, backend=b),
        lambda x, y, z, b: dk.euler_ancestral_step(x, y, _KARRAS, t, noise=z, backend=b),
        lambda x, y, z, b: _solver_call(x, y, z, t, b, guidance_scale=3.0, uncond=y.flip(0), guidance_rescale=0.5),
    ]
    for call in calls:
        with _Casts() as mode:
            got = _tuple(call(x_low, y, z, "triton"))
        assert mode.casts == []
        for g, e in zip(got, _tuple(call(x_low.float(), y, z, "triton")), strict=True):
            assert g.dtype == torch.float32 == e.dtype
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_loss_gradients_in_each_operands_dtype(backend, parameterization):
    """A bf16 model output with an fp32 x_start and fp16 noise: each gradient in its input's dtype, the float32
    call's gradients rounded once (the Triton kernels store them so, without a cast pass)."""
    (x, y, z, _), t = _inputs((3, 2, 3, 5))
    operands = (y.bfloat16(), x, z.half())
    leaves = [a.clone().requires_grad_() for a in operands]
    loss = dk.diffusion_loss(*leaves, t, S, parameterization, original_elbo_weight=0.5, backend=backend)[0]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    leaves32 = [a.float().requires_grad_() for a in operands]
    loss32 = dk.diffusion_loss(*leaves32, t, S, parameterization, original_elbo_weight=0.5, backend=backend)[0]
    grads32 = torch.autograd.grad(loss32, leaves32, allow_unused=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss32, rtol=0, atol=0)
    for g, g32, a in zip(grads, grads32, operands, strict=True):
        assert (g is None) == (g32 is None)
        if g is not None:
            assert g.dtype == a.dtype
            torch.testing.assert_close(g, _rounded(g32, a.dtype, backend), rtol=0, atol=0)


@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="the Triton backend does not run here")
def test_triton_mixed_out_rules():
    """out= of a mixed call has the promoted dtype: an out aliasing the fp32 data is an in-place step read
    natively, one in the low-precision operand's dtype is refused before any kernel runs."""
    (x, y, z, _), t = _inputs((3, 2, 3, 5))
    expected = dk.q_sample(x, t, y.bfloat16().float(), S, backend="triton")
    buf, noise = x.clone(), y.bfloat16()
    with _Casts() as mode:
        assert dk.q_sample(buf, t, noise, S, backend="triton", out=buf) is buf
    assert mode.casts == []
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="out: expected dtype torch.float32 .the promoted dtype"):
        dk.q_sample(x, t, noise, S, backend="triton", out=noise)
    buf = x.clone()
    assert dk.p_sample(buf, t, y.half(), S, noise=z.bfloat16(), backend="triton", out=buf) is buf
    torch.testing.assert_close(buf, dk.p_sample(x, t, y.half().float(), S, noise=z.bfloat16().float(),
                                                backend="triton"), rtol=0, atol=0)
    _assert_in_place_sigma_steps("triton", x, y, t)


def _assert_in_place_sigma_steps(backend, x, y, t):
    """Flow and Euler steps of an fp32 buffer in place with a bf16 model output read natively (no cast, the
    all-float32 call exactly); an out in the model output's dtype is refused."""
    for step in (lambda x, y, out: dk.flow_step(x, y, _linear(x), t, backend=backend, out=out),
                 lambda x, y, out: dk.euler_step(x, y, _karras(x), t, backend=backend, out=out)):
        buf, y_low = x.clone(), y.bfloat16()
        with _Casts() as mode:
            assert step(buf, y_low, buf) is buf
        assert mode.casts == []
        torch.testing.assert_close(buf, step(x, y_low.float(), None), rtol=0, atol=0)
        with pytest.raises(TypeError, match="out: expected dtype torch.float32 .the promoted dtype"):
            step(x, y_low, torch.empty_like(x, dtype=torch.bfloat16))


STEP_CALLS = {
    "ddim_guided_rescaled": lambda x, c, u, z, t, b: dk.ddim_step(x, t, t - 1, c, _sched(x), eta=0.5, noise=z,
                                                                  backend=b, guidance_scale=4.0, uncond=u,
                                                                  guidance_rescale=0.7),
    "ddim_thresholded": lambda x, c, u, z, t, b: dk.ddim_step(x, t, t - 1, c, _sched(x), threshold_ratio=0.9,
                                                              threshold_max=1.5, return_pred_x0=True, backend=b),
    "ddpm_learned_guided": lambda x, c, u, z, t, b: dk.ddpm_step(
        x, t, t - 1, torch.cat([c, c.flip(0)], 1), _sched(x), variance_type="learned_range", noise=z,
        guidance_scale=2.0, uncond=torch.cat([u, u], 1), backend=b),
}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(STEP_CALLS))
def test_mixed_sampler_steps(name, backend):
    """Guided (with rescale: its statistics pass reads the operands natively too), thresholded (the x0 pass;
    Triton only: the compiled backends decline thresholding) and learned-variance steps with bf16 model outputs
    and fp32 data: the all-float32 call exactly, with no cast on the way, and with the data in bf16 and the model
    outputs in fp32 too (shape (3, 2, 3, 37) on the CPU: full vectors and tails; CUDA also (3, 2, 3, 36):
    packets)."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    if backend != "triton" and name == "ddim_thresholded":
        pytest.skip("the compiled backends decline dynamic thresholding")
    shapes = {"triton": [(3, 2, 3, 5)], "cpu": [(3, 2, 3, 37)], "cuda": [(3, 2, 3, 37), (3, 2, 3, 36)]}[backend]
    for shape in shapes:
        _assert_mixed_sampler_step(name, backend, shape)


def _assert_mixed_sampler_step(name, backend, shape):
    (x, c, u, z), t = _inputs(shape, device=_device(backend))
    t = t.clamp(min=1)
    for low_data in (False, True):
        xs, cs, us = (x.bfloat16(), c, u) if low_data else (x, c.bfloat16(), u.bfloat16())
        with _Casts() as mode:
            got = _tuple(STEP_CALLS[name](xs, cs, us, z, t, backend))
        assert backend == "triton" or mode.casts == [], mode.casts
        expected = _tuple(STEP_CALLS[name](xs.float(), cs.float(), us.float(), z, t, backend))
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype == torch.float32
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        reference = _tuple(STEP_CALLS[name](xs, cs, us, z, t, "reference"))
        for g, r in zip(got, reference, strict=True):
            assert r.dtype == torch.float32
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


class _Calls(TorchDispatchMode):
    """The operators of ``namespace`` (Triton's, or the compiled ``ddpm_kernels``) a call runs, with their
    arguments as they were before it (out= forms write theirs)."""

    def __init__(self, namespace="ddpm_kernels_triton"):
        super().__init__()
        self.namespace = namespace
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == self.namespace:
            copy = lambda a: a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            self.calls.append((func, tuple(map(copy, args)), {k: copy(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="the Triton backend does not run here")
def test_triton_mixed_calls_pass_opcheck():
    """The fake kernels give a mixed call's output dtypes (the promoted one; each input's for the loss
    gradients), as the kernels do: torch.library.opcheck of every Triton operator a mixed call runs."""
    (x, y, z, _), t = _inputs((2, 2, 3, 4))
    t = t[1:]
    mo = y.bfloat16().requires_grad_()
    x_start = x.clone().requires_grad_()
    with _Calls() as calls:
        dk.q_sample(x.bfloat16(), t, y, S, backend="triton")
        dk.p_sample(x, t, y.half(), S, noise=z.bfloat16(), backend="triton")
        dk.q_posterior(y.bfloat16(), x, t, S, backend="triton")
        dk.ddim_step(x.bfloat16(), t, t - 1, y, S, eta=0.5, noise=z, return_pred_x0=True, backend="triton")
        loss = dk.diffusion_loss(mo, x_start, z.half(), t, S, "v", backend="triton")[0]
        torch.autograd.grad(loss, (mo, x_start))
        dk.flow_interpolate(x.bfloat16(), y, t / T, backend="triton")
        dk.flow_step(x, y.bfloat16(), torch.linspace(1, 0, T + 1), t, noise=z.half(), stochastic=True,
                     backend="triton")
        dk.euler_step(x.bfloat16(), y, _KARRAS, t, return_pred_x0=True, backend="triton")
        _solver_call(x, y.bfloat16(), z, t, "triton", noise=False)
        flow_loss = dk.flow_loss(mo, x, z.half(), t / T, backend="triton")
        torch.autograd.grad(flow_loss, mo)
    names = {func.name() for func, _, _ in calls.calls}
    assert {"ddpm_kernels_triton::q_sample", "ddpm_kernels_triton::diffusion_loss_backward",
            "ddpm_kernels_triton::sampler_step", "ddpm_kernels_triton::flow_interpolate",
            "ddpm_kernels_triton::flow_step", "ddpm_kernels_triton::euler_step", "ddpm_kernels_triton::solver_step",
            "ddpm_kernels_triton::flow_loss_backward"} <= names, names
    for func, args, kwargs in calls.calls:
        torch.library.opcheck(func, args, kwargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", _backends())
def test_mixed_calls_still_refuse_bad_input(backend, monkeypatch):
    """A mixed call takes the C check for the data and timesteps and the Python checks for the rest (any float
    dtype accepted there): bad values, shapes, non-float operands and an out of another dtype than the promoted
    one are refused before dispatch."""
    from ddpm_kernels import ops

    def no_dispatch(*args, **kwargs):
        raise AssertionError("dispatched a bad call")

    monkeypatch.setattr(ops, "_dispatch", no_dispatch)
    (x, y, z, _), t = _inputs()
    low = y.bfloat16()
    cases = [
        (ValueError, r"t: expected values in \[0, 50\)", lambda: dk.q_sample(x, t + 1, low, S, backend=backend)),
        (ValueError, "noise: expected shape", lambda: dk.q_sample(x, t, low[:2], S, backend=backend)),
        (TypeError, "noise: expected a floating-point tensor", lambda: dk.q_sample(x, t, y.int(), S, backend=backend)),
        (TypeError, "out: expected dtype torch.float32 .the promoted dtype",
         lambda: dk.q_sample(x, t, low, S, backend=backend, out=torch.empty_like(x, dtype=torch.float64))),
        (ValueError, "model_output: expected shape",
         lambda: dk.ddpm_step(x, t, t - 1, low, S, variance_type="learned_range", backend=backend)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("backend", _backends())
def test_mixed_sigma_table_steps_still_refuse_bad_input(backend, monkeypatch):
    """The flow, Euler and solver steps of mixed calls: the other operands take any float dtype, while the
    solver's state and out must have the promoted dtype (the step writes them in it), and shapes are still
    checked; all refused before dispatch."""
    from ddpm_kernels import flow

    def no_dispatch(*args, **kwargs):
        raise AssertionError("dispatched a bad call")

    monkeypatch.setattr(flow, "_dispatch", no_dispatch)
    (x, y, z, _), t = _inputs()
    low, sigmas = y.bfloat16(), torch.linspace(1, 0, T + 1)
    table = torch.zeros(T, SolverColumns(1).width)
    cases = [
        (ValueError, "model_output: expected shape", lambda: dk.flow_step(x, low[:2], sigmas, t, backend=backend)),
        (ValueError, "noise: expected shape",
         lambda: dk.euler_ancestral_step(x, low, _KARRAS, t, noise=z[:, :1].half(), backend=backend)),
        (ValueError, "sigmas: expected a 1-D table", lambda: dk.euler_step(x, low, _KARRAS[None], t, backend=backend)),
        (ValueError, "uncond: expected shape",
         lambda: dk.flow_step(x, y, sigmas, t, guidance_scale=2.0, uncond=low[:2], backend=backend)),
        (TypeError, "out: expected dtype torch.float32 .the promoted dtype",
         lambda: dk.flow_interpolate(x, low, t / T, backend=backend, out=low.clone())),
        (ValueError, "noise: expected shape", lambda: dk.flow_loss(x, low, z[:1], t / T, backend=backend)),
        (TypeError, "history: expected dtype torch.float32 .the promoted dtype",
         lambda: dk.solver_step(x, low, table, t, history=low[None], backend=backend)),
        (TypeError, "last_sample: expected dtype torch.float32 .the promoted dtype",
         lambda: dk.solver_step(x, low, table, t, last_sample=low.clone(), backend=backend)),
        (ValueError, "history: expected shape",
         lambda: dk.solver_step(x, low, table, t, history=x[None, :2], backend=backend)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="the Triton backend does not run here")
def test_triton_mixed_step_compiles():
    """torch.compile(fullgraph=True) of mixed calls served natively by Triton (a bf16 model output with fp32
    data: in-place DDIM and flow steps, the loss, then its registered backward) gives eager's results."""
    from helpers import assert_compiles_like_eager

    torch._dynamo.reset()
    (x, y, z, _), t = _inputs((3, 2, 3, 5))

    def run(x, y, z, t):
        buf = x.clone()
        dk.ddim_step(buf, t, t - 1, y, S, eta=0.5, noise=z, backend="triton", out=buf)
        flow_buf = x.clone()
        dk.flow_step(flow_buf, y.detach(), sigmas, t, backend="triton", out=flow_buf)
        return buf, dk.diffusion_loss(y, x, z, t, S, "v", backend="triton")[0], flow_buf

    sigmas = torch.linspace(1, 0, T + 1)
    mo = y.bfloat16().requires_grad_()
    eager, compiled = assert_compiles_like_eager(run, (x, mo, z, t.clamp(min=1)), exact=(0, 1, 2))
    assert [r.dtype for r in compiled] == [torch.float32] * 3
    (g_eager,) = torch.autograd.grad(eager[1], mo)
    (g_compiled,) = torch.autograd.grad(compiled[1], mo)
    assert g_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ compiled CPU kernels
_NEEDS_CPU = pytest.mark.skipif("cpu" not in dk.available_backends("cpu"), reason="the compiled CPU backend is not built")


@_NEEDS_CPU
def test_compiled_backends_declare_their_native_ops():
    """The CPU and CUDA backends list exactly the ops their kernels read mixed (the prologue stops casting for
    those)."""
    from ddpm_kernels import extension

    assert extension.CPU_BACKEND.mixed_dtypes == {
        "q_sample", "predict_start_from_noise", "predict_noise_from_start", "get_v", "predict_start_from_z_and_v",
        "predict_eps_from_z_and_v", "q_posterior", "p_mean_variance", "p_sample", "diffusion_loss", "ddim_step",
        "ddpm_step", "flow_interpolate", "flow_step", "euler_step", "euler_ancestral_step", "flow_loss",
        "solver_step"}
    assert extension.CUDA_BACKEND.mixed_dtypes == extension.CPU_BACKEND.mixed_dtypes
    (x, y, z, _), t = _inputs()
    dk.p_sample(x, t, y, S, noise=z, backend="cpu")
    assert backends.reads_mixed("cpu", "ddim_step") and backends.reads_mixed("cpu", "flow_step")
    assert not backends.reads_mixed("cpu", "dynamic_threshold")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mixes_no_kernel_reads_are_cast(backend):
    """A float64 operand with a bfloat16 one, a mix no kernel reads, is cast by the prologue to the promoted
    float64 (the control that the count sees a cast) and equals the all-float64 call."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    (x, y, z, _), t = _inputs(_FUSED[backend][1], device=_device(backend))
    x64 = x.double()
    for name in ("flow_step", "q_sample"):
        with _Casts() as mode:
            got = CALLS[name](x64, y.bfloat16(), z.double(), t, backend)
        assert mode.casts
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, CALLS[name](x64, y.bfloat16().double(), z.double(), t, backend), rtol=0, atol=0)


@_NEEDS_CPU
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("low", LOW, ids=str)
def test_compiled_mixed_data_and_three_dtypes(low, backend):
    """The data is the low-precision operand (a bf16 sample with an fp32 model output; a bf16 model output as
    the loss's data with fp32 targets), or all three operands differ: float32 results, exactly the all-float32
    call, no cast; in-kernel noise is the same stream."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    b, dev = backend, _device(backend)
    (x, y, z, _), t = _inputs((3, 2, 5, 37), device=dev)
    s, scale = _sched(x), torch.tensor([1.5, 3.0, 7.5], device=dev)
    other = torch.float16 if low == torch.bfloat16 else torch.bfloat16
    calls = [
        lambda x, y, z: dk.p_sample(x, t, y, s, noise=z, backend=b),
        lambda x, y, z: dk.p_sample(x, t, y, s, generator=torch.Generator(dev).manual_seed(5), backend=b),
        lambda x, y, z: dk.p_mean_variance(x, t, y, s, "x0", backend=b),
        lambda x, y, z: dk.q_posterior(y, x, t, s, backend=b),
        lambda x, y, z: dk.diffusion_loss(x, y, z, t, s, "eps", "l1", backend=b),
        lambda x, y, z: dk.q_sample(x, t, y, s, backend=b),
        lambda x, y, z: dk.predict_eps_from_z_and_v(x, t, y, s, backend=b),
        lambda x, y, z: dk.ddim_step(x, t, t - 1, y, s, eta=0.7, noise=z, return_pred_x0=True, backend=b),
        lambda x, y, z: dk.ddpm_step(x, t, t - 1, y, s, "v", generator=torch.Generator(dev).manual_seed(6),
                                     backend=b),
        lambda x, y, z: dk.ddim_step(x, t, t - 1, y, s, guidance_scale=scale, uncond=y.flip(0),
                                     guidance_rescale=0.7, clip_denoised=True, backend=b),
        lambda x, y, z: dk.flow_interpolate(x, y, t / T, backend=b),
        lambda x, y, z: dk.flow_step(x, y, _linear(x), t, generator=torch.Generator(dev).manual_seed(7),
                                     stochastic=True, guidance_scale=2.0, uncond=y.flip(0), guidance_rescale=0.5,
                                     backend=b),
        lambda x, y, z: dk.flow_step(x, y, sigma=_rand(x, (3, 2, 1, 1), 1),
                                     sigma_next=t / T, noise=z, stochastic=True, backend=b),
        lambda x, y, z: dk.euler_step(x, y, _karras(x), t, "v_prediction", noise=z, s_churn=5.0, return_pred_x0=True,
                                      backend=b),
        lambda x, y, z: dk.euler_ancestral_step(x, y, _karras(x), t, generator=torch.Generator(dev).manual_seed(8),
                                                backend=b),
        lambda x, y, z: dk.flow_loss(x, y, z, _rand(x, (3, 2, 1, 1), 2),
                                     "sigma_sqrt", "l1", backend=b),
        lambda x, y, z: _solver_call(x, y, z, t, b, guidance_scale=1.5, uncond=y.flip(0), clip_range=1.0),
    ]
    for x_, y_, z_ in ((x.to(low), y, z), (x, y.to(low), z.to(other)), (x.to(low), y.to(other), z)):
        for call in calls:
            with _Casts() as mode:
                got = _tuple(call(x_, y_, z_))
            assert mode.casts == []
            for g, e in zip(got, _tuple(call(x_.float(), y_.float(), z_.float())), strict=True):
                assert g.dtype == torch.float32 == e.dtype
                torch.testing.assert_close(g, e, rtol=0, atol=0)


@_NEEDS_CPU
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_compiled_loss_gradient_in_the_model_outputs_dtype(parameterization, loss_type, backend):
    """The losses (diffusion_loss; flow_loss, whose parameterization is fixed) with a bf16 / fp16 model output and
    fp32 (or other reduced) targets: forward and backward launch no cast; the gradient is written in the model
    output's dtype, the float32 call's gradient rounded once. CUDA also with N % 4 == 0 (packets)."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    for shape in [(3, 2, 5, 37)] + ([(3, 2, 4, 36)] if backend == "cuda" else []):
        _assert_loss_gradients_natively(parameterization, loss_type, backend, shape)


def _assert_loss_gradients_natively(parameterization, loss_type, b, shape):
    (x, y, z, _), t = _inputs(shape, device=_device(b))
    s = _sched(x)
    for mo_dtype, z_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                              (torch.bfloat16, torch.float16)):
        mo, noise = y.to(mo_dtype).requires_grad_(), z.to(z_dtype)
        with _Casts() as mode:
            loss = dk.diffusion_loss(mo, x, noise, t, s, parameterization, loss_type,
                                     original_elbo_weight=0.5, backend=b)[0]
            (g,) = torch.autograd.grad(loss, mo)
        assert mode.casts == [] and "ddpm_kernels::diffusion_loss_backward" in mode.ops, (mode.casts, mode.ops)
        mo32 = y.to(mo_dtype).float().requires_grad_()
        loss32 = dk.diffusion_loss(mo32, x, z.to(z_dtype).float(), t, s, parameterization, loss_type,
                                   original_elbo_weight=0.5, backend=b)[0]
        (g32,) = torch.autograd.grad(loss32, mo32)
        assert loss.dtype == torch.float32 and g.dtype == mo_dtype
        torch.testing.assert_close(loss, loss32, rtol=0, atol=0)
        torch.testing.assert_close(g, g32.to(mo_dtype), rtol=0, atol=0)
        sigma = (t + 1) / (T + 1)
        with _Casts() as mode:
            flow = dk.flow_loss(mo, x, noise, sigma, "cosmap", loss_type, backend=b)
            (g,) = torch.autograd.grad(flow, mo)
        assert mode.casts == [] and "ddpm_kernels::flow_loss_backward" in mode.ops, (mode.casts, mode.ops)
        flow32 = dk.flow_loss(mo32, x, z.to(z_dtype).float(), sigma, "cosmap", loss_type, backend=b)
        (g32,) = torch.autograd.grad(flow32, mo32)
        assert flow.dtype == torch.float32 and g.dtype == mo_dtype
        torch.testing.assert_close(flow, flow32, rtol=0, atol=0)
        torch.testing.assert_close(g, g32.to(mo_dtype), rtol=0, atol=0)


# steps without a noise term, given one: call(x, y, z, t, backend, **guidance)
_UNREAD_NOISE_STEPS = {
    "ddim_step": lambda x, y, z, t, b, **kw: dk.ddim_step(x, t, t - 1, y, _sched(x), eta=0.0, noise=z, backend=b,
                                                          **kw),
    "flow_step": lambda x, y, z, t, b, **kw: dk.flow_step(x, y, _linear(x), t, noise=z, backend=b, **kw),
    "euler_step": lambda x, y, z, t, b, **kw: dk.euler_step(x, y, _karras(x), t, noise=z, backend=b, **kw),
}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", list(_UNREAD_NOISE_STEPS))
def test_unread_noise_still_promotes(name, guided, backend):
    """A step without a noise term (DDIM with eta = 0, the deterministic flow step, Euler without churn) given a
    noise of a wider dtype: the result has the promotion of all the operands, as the reference's, with and
    without out= (the noise is not read; a kernel reading the others natively would give their narrower dtype,
    so the call is cast)."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    (x, y, z, _), t = _inputs(_FUSED[backend][1], device=_device(backend))
    t = t.clamp(min=1)
    step = _UNREAD_NOISE_STEPS[name]
    for xd, nd in ((torch.float16, torch.float32), (torch.float32, torch.float64)):
        scale = torch.tensor([1.5, 3.0, 7.5], device=x.device)
        guidance = dict(guidance_scale=scale, uncond=y.flip(0).to(xd)) if guided else {}
        ref = step(x.to(xd), y.to(xd), z.to(nd), t, "reference", **guidance)
        got = step(x.to(xd), y.to(xd), z.to(nd), t, backend, **guidance)
        assert got.dtype == ref.dtype == nd
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        out = torch.empty_like(x, dtype=nd)
        assert step(x.to(xd), y.to(xd), z.to(nd), t, backend, out=out, **guidance) is out
        torch.testing.assert_close(out, got, rtol=0, atol=0)


@_NEEDS_CPU
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_mixed_out_rules(backend):
    """out= of a mixed call has the promoted dtype: an fp32 sampling buffer stepped in place with a bf16 model
    output and fp16 noise reads natively; the raw operator refuses an out of another dtype, and mixes it does
    not read (float64 with float32) name the operand; the public call casts those and still serves them."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    b = backend
    (x, y, z, _), t = _inputs((3, 2, 5, 37), device=_device(b))
    s = _sched(x)
    buf, mo, noise = x.clone(), y.bfloat16(), z.half()
    with _Casts() as mode:
        assert dk.p_sample(buf, t, mo, s, noise=noise, backend=b, out=buf) is buf
    assert mode.casts == []
    torch.testing.assert_close(buf, dk.p_sample(x, t, mo.float(), s, noise=noise.float(), backend=b),
                               rtol=0, atol=0)
    buf = x.clone()
    with _Casts() as mode:
        assert dk.q_sample(buf, t, mo, s, backend=b, out=buf) is buf
    assert mode.casts == []
    torch.testing.assert_close(buf, dk.q_sample(x, t, mo.float(), s, backend=b), rtol=0, atol=0)
    _assert_in_place_sigma_steps(b, x, y, t)
    ops, table = torch.ops.ddpm_kernels, s.table(torch.float32)
    with pytest.raises(RuntimeError, match="out has dtype BFloat16, expected Float .the result dtype"):
        ops.q_sample_out(x, t, mo, table, torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out has dtype BFloat16, expected Float .the result dtype"):
        ops.p_sample_out(x, t, y.bfloat16(), table, "eps", True, z, None, 0, torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="model_output has dtype Double, expected Float .operands of different"):
        ops.p_mean_variance(x, t, y.double(), table, "eps", True)
    with pytest.raises(RuntimeError, match="noise has dtype Int, expected BFloat16 .operands of different"):
        ops.diffusion_loss(y.bfloat16(), x, z.int(), t, table, "eps", "l2", 1.0, 0.0)
    sigmas = _linear(x)
    with pytest.raises(RuntimeError, match="out has dtype BFloat16, expected Float .the result dtype"):
        ops.flow_step_out(x, y.bfloat16(), None, None, sigmas, t, None, 1, 1, None, 1, 1, False, 0.0, None, None, 0,
                          torch.empty_like(x, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="noise has dtype Double, expected Float .operands of different"):
        ops.euler_ancestral_step(x, y, None, None, _karras(x), t, "eps", 0.0, z.double(), None, 0, False)
    with pytest.raises(RuntimeError, match="history must be .* of Float"):
        ops.solver_step(x, y.bfloat16(), None, None, torch.zeros(T, SolverColumns(1).width, device=x.device), t,
                        y.bfloat16()[None], None, False, None, 0.0, None, None, 0)
    got = dk.p_mean_variance(x, t, y.double(), s, "v", backend=b)
    assert got[0].dtype == torch.float64
    torch.testing.assert_close(got[0], dk.p_mean_variance(x.double(), t, y.double(), s, "v", backend=b)[0],
                               rtol=0, atol=0)


@_NEEDS_CPU
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_mixed_calls_pass_opcheck(backend):
    """The fake kernels give a mixed call's output dtypes (float32; the loss gradient in the model output's),
    as the CPU and CUDA kernels do: torch.library.opcheck of every operator a mixed call runs."""
    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    b = backend
    (x, y, z, _), t = _inputs((2, 2, 3, 4), device=_device(b))
    t, s = t[1:], _sched(x)
    mo = y.bfloat16().requires_grad_()
    with _Calls("ddpm_kernels") as calls:
        dk.q_sample(x.bfloat16(), t, y, s, backend=b)
        dk.get_v(x, y.half(), t, s, backend=b)
        dk.p_sample(x, t, y.half(), s, noise=z.bfloat16(), backend=b)
        dk.p_sample(x.bfloat16(), t, y, s, noise=z, backend=b, out=x.clone())
        dk.p_mean_variance(x.bfloat16(), t, y, s, "v", backend=b)
        dk.q_posterior(y.bfloat16(), x, t, s, backend=b)
        loss = dk.diffusion_loss(mo, x, z.half(), t, s, "v", backend=b)[0]
        torch.autograd.grad(loss, mo)
        dk.flow_interpolate(x.bfloat16(), y, t / T, backend=b)
        dk.flow_step(x, y.bfloat16(), _linear(x), t, noise=z.half(), stochastic=True, backend=b)
        dk.euler_step(x.bfloat16(), y, _karras(x), t, return_pred_x0=True, backend=b)
        dk.euler_ancestral_step(x, y.half(), _karras(x), t, noise=z.bfloat16(), backend=b)
        _solver_call(x, y.bfloat16(), z, t, b, noise=False)
        torch.autograd.grad(dk.flow_loss(mo, x, z.half(), t / T, backend=b), mo)
    names = {func.name() for func, _, _ in calls.calls}
    assert {"ddpm_kernels::q_sample", "ddpm_kernels::get_v", "ddpm_kernels::p_sample", "ddpm_kernels::p_sample_out",
            "ddpm_kernels::p_mean_variance", "ddpm_kernels::q_posterior", "ddpm_kernels::diffusion_loss",
            "ddpm_kernels::diffusion_loss_backward", "ddpm_kernels::flow_interpolate", "ddpm_kernels::flow_step",
            "ddpm_kernels::euler_step", "ddpm_kernels::euler_ancestral_step", "ddpm_kernels::solver_step",
            "ddpm_kernels::flow_loss", "ddpm_kernels::flow_loss_backward"} <= names, names
    for func, args, kwargs in calls.calls:
        torch.library.opcheck(func, args, kwargs, test_utils=("test_schema", "test_faketensor"))


@_NEEDS_CPU
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_mixed_step_compiles(backend):
    """torch.compile(fullgraph=True) of mixed calls served natively by the CPU and CUDA kernels (a bf16 model
    output with fp32 data: an in-place p_sample, the loss, then its backward) gives eager's results."""
    from helpers import assert_compiles_like_eager

    if not _runs(backend):
        pytest.skip(f"the {backend} backend does not run here")
    b = backend
    torch._dynamo.reset()
    (x, y, z, _), t = _inputs((3, 2, 3, 5), device=_device(b))
    s = _sched(x)

    def run(x, y, z, t):
        buf = x.clone()
        dk.p_sample(buf, t, y.detach(), s, noise=z, backend=b, out=buf)
        return buf, dk.diffusion_loss(y, x, z, t, s, "v", backend=b)[0]

    mo = y.bfloat16().requires_grad_()
    eager, compiled = assert_compiles_like_eager(run, (x, mo, z, t), exact=(0, 1))
    assert [r.dtype for r in compiled] == [torch.float32] * 2
    (g_eager,) = torch.autograd.grad(eager[1], mo)
    (g_compiled,) = torch.autograd.grad(compiled[1], mo)
    assert g_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)
