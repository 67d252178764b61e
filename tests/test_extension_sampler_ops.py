"""The compiled ``ddim_step`` and ``ddpm_step`` (ddpm_kernels::ddim_step / ddpm_step, csrc/cpu and csrc/cuda)
against the reference: on the CPU kernels always, on the CUDA kernels when a GPU is present (those cases are
marked ``gpu``).

Tolerances follow DESIGN.md: float32 against the float32 reference at rtol=atol=1e-5; float64 at 1e-12;
float16/bfloat16 against the float64 reference with an error at most twice the reference's own error in that
dtype plus one ulp, and within 2e-3 (fp16) / 1.6e-2 (bf16) relative.

Not fused: dynamic thresholding (``threshold_ratio``) and ``dynamic_threshold`` need a per-sample quantile
(a sort); the compiled backends route those calls to the reference, which the tests below check by identity.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import reference as R

extension = pytest.importorskip("ddpm_kernels.extension")
pytestmark = pytest.mark.skipif(
    extension.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"CPU extension not built: {extension.load_error}",
)

T = 1000
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 element (batch 1); odd 4-D; 3-D with one channel; 128-bit-aligned sizes (the CUDA vector path)
SHAPES = [(1,), (4, 3, 5, 7), (5, 1, 9), (3, 4, 8, 8)]
PARAMETERIZATIONS = ["eps", "x0", "v"]
VARIANCE_TYPES = list(R.VARIANCE_TYPES)
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available()
                or extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32) is not None,
                reason="needs a GPU and the CUDA kernels",
            ),
        ],
    ),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def schedule(backend):
    return dk.DiffusionSchedule(timesteps=T).to(backend)


def make_steps(batch, device, seed=0):
    """Per-sample (t, t_prev): sample 0 is the last step (0 -> -1), the last sample starts the chain
    (T-1 -> T-21), sample 1 is the plain chain (1 -> 0), the others respaced jumps (some to -1)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (batch,), generator=g)
    t_prev = (t - torch.randint(1, 60, (batch,), generator=g)).clamp(min=-1)
    if batch > 1:
        t[-1] = T - 1
        t_prev[-1] = T - 21
    if batch > 2:
        t[1] = 1
        t_prev[1] = 0
    t[0], t_prev[0] = 0, -1
    return t.to(device), t_prev.to(device)


def make_inputs(shape, n, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype) for _ in range(n)]


def learned_output(shape, dtype, device, variance_type, seed=0):
    """``(B, 2C, ...)``: a prediction, then log-variances in [-12, 0] (``learned``) or values in [-1, 1]
    (``learned_range``)."""
    pred, extra = make_inputs(shape, 2, torch.float64, device, seed=seed + 50)
    extra = -3.0 * extra.abs() if variance_type == "learned" else extra.clamp(-1, 1)
    return torch.cat([pred, extra], dim=1).to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def assert_matches(got, ref_fn, args, kwargs, dtype):
    """``got`` (one tensor or a tuple) against ``ref_fn(*args, **kwargs)`` by DESIGN's tolerance rule."""
    outs = got if isinstance(got, tuple) else (got,)

    def run(a, kw):
        r = ref_fn(*a, **kw)
        return r if isinstance(r, tuple) else (r,)

    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for o, r in zip(outs, run(args, kwargs), strict=True):
            assert o.dtype == r.dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=tol, atol=tol, equal_nan=True)
        return
    args64 = [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw64 = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for o, r64, rlp in zip(outs, run(args64, kw64), run(args, kwargs), strict=True):
        assert o.dtype == rlp.dtype == dtype and o.shape == rlp.shape
        err = (o.to(torch.float64) - r64).abs()
        ref_err = (rlp.to(torch.float64) - r64).abs()
        allowed = 2 * ref_err + ulp(r64, dtype)
        assert bool((err <= allowed).all()), f"max excess {(err - allowed).max().item()}"
        assert bool((err <= LOW_PRECISION_TOL[dtype] * (1 + r64.abs())).all())


# ---------------------------------------------------------------------------------------------- DDIM
DDIM_OPTIONS = {
    "eta0": dict(eta=0.0),
    "eta1_clip_clipped_output": dict(eta=1.0, clip_denoised=True, use_clipped_model_output=True),
    "eta0.3_clip_range_final_alpha": dict(eta=0.3, clip_denoised=True, clip_range=1.5, set_alpha_to_one=False),
}


@pytest.mark.parametrize("options", list(DDIM_OPTIONS))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddim_step(backend, schedule, dtype, shape, parameterization, options):
    o = dict(DDIM_OPTIONS[options])
    eta, clip = o.pop("eta"), o.pop("clip_denoised", False)
    x_t, model_output, noise = make_inputs(shape, 3, dtype, backend, seed=1)
    t, t_prev = make_steps(shape[0], backend, seed=1)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, eta, parameterization, clip, noise=noise,
                       backend=backend, return_pred_x0=True, **o)
    assert_matches(got, R.ddim_step_ref, (x_t, t, t_prev, model_output, schedule, eta, parameterization, clip),
                   dict(noise=noise, return_pred_x0=True, **o), dtype)


# ---------------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddpm_step(backend, schedule, dtype, shape, parameterization, variance_type):
    x_t, noise, model_output = make_inputs(shape, 3, dtype, backend, seed=2)
    if variance_type.startswith("learned"):
        model_output = learned_output(shape, dtype, backend, variance_type, seed=2)
    t, t_prev = make_steps(shape[0], backend, seed=2)
    clip = parameterization != "x0"
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip, noise=noise,
                       backend=backend, return_pred_x0=True)
    assert_matches(
        got, R.ddpm_step_ref, (x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip),
        dict(noise=noise, return_pred_x0=True), dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ddpm_step_cosine_clip_range(backend, dtype):
    cosine = dk.DiffusionSchedule("cosine", timesteps=T).to(backend)
    x_t, model_output, noise = make_inputs((4, 3, 9, 5), 3, dtype, backend, seed=4, scale=3.0)
    t, t_prev = make_steps(4, backend, seed=4)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True, noise=noise,
                       backend=backend, clip_range=2.0)
    assert_matches(got, R.ddpm_step_ref, (x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True),
                   dict(noise=noise, clip_range=2.0), dtype)


def test_ddpm_step_on_the_full_chain_is_p_sample(backend, schedule):
    """t_prev = t - 1 with fixed_small is p_sample, for given noise and for in-kernel noise from the same
    generator state (both ops key Philox the same way)."""
    x_t, model_output, noise = make_inputs((4, 3, 5, 5), 3, torch.float32, backend, seed=5)
    t = torch.tensor([0, 1, 500, 999], device=backend)
    for kwargs in (dict(noise=noise), dict(generator=torch.Generator(backend).manual_seed(11))):
        got = dk.ddpm_step(x_t, t, t - 1, model_output, schedule, "v", "fixed_small", True, backend=backend,
                           **kwargs)
        if "generator" in kwargs:
            kwargs = dict(generator=torch.Generator(backend).manual_seed(11))
        expected = dk.p_sample(x_t, t, model_output, schedule, "v", True, backend=backend, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_learned_variance_non_contiguous_model_output(backend, schedule):
    x_t, noise = make_inputs((3, 2, 4, 5), 2, torch.float32, backend, seed=6)
    model_output = learned_output((3, 2, 5, 4), torch.float32, backend, "learned_range", seed=6).transpose(2, 3)
    assert not model_output.is_contiguous()
    t, t_prev = make_steps(3, backend, seed=6)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise, backend=backend)
    expected = R.ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule_kind", ["linear", "cosine", "zero_terminal_snr"])
def test_steps_across_the_chain_float32(backend, schedule_kind):
    """Steps across the chain in one batch, for the plain chain (t_prev = t - 1: ``1 - ab_t / ab_prev`` is ~1e-4
    near t = 0, where a float32 subtraction would cancel) and a respaced one (t_prev = t - 37), eta 0 and 1,
    against the float32 reference at 1e-5."""
    if schedule_kind == "zero_terminal_snr":
        s = dk.DiffusionSchedule(timesteps=T, zero_terminal_snr=True).to(backend)
        parameterization = "v"  # eps is undefined where ab_t = 0
    else:
        s = dk.DiffusionSchedule(schedule_kind, timesteps=T).to(backend)
        parameterization = "eps"
    t = torch.cat([torch.arange(20), torch.linspace(20, T - 9, 20).long(), torch.arange(T - 8, T)]).to(backend)
    x_t, model_output, noise = make_inputs((t.shape[0], 3), 3, torch.float32, backend, seed=3)
    for k in (1, 37):
        t_prev = (t - k).clamp(min=-1)
        for eta in (0.0, 1.0):
            got = dk.ddim_step(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                               backend=backend, return_pred_x0=True)
            ref = R.ddim_step_ref(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                                  return_pred_x0=True)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for variance_type in ("fixed_small", "fixed_large", "learned_range"):
            mo = model_output
            if variance_type == "learned_range":
                mo = torch.cat([model_output, noise.clamp(-1, 1)], 1)
            got = dk.ddpm_step(x_t, t, t_prev, mo, s, parameterization, variance_type, False, noise=noise,
                               backend=backend)
            ref = R.ddpm_step_ref(x_t, t, t_prev, mo, s, parameterization, variance_type, False, noise=noise)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_large_sample_many_threads(backend, schedule):
    """Samples that span several parallel chunks and vector tails (N not a multiple of any vector width)."""
    x_t, model_output, noise = make_inputs((3, 3, 131, 129), 3, torch.float32, backend, seed=21)
    t, t_prev = make_steps(3, backend, seed=21)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.6, "v", True, noise=noise, backend=backend,
                       return_pred_x0=True)
    ref = R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.6, "v", True, noise=noise, return_pred_x0=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    wide = torch.cat([model_output, -noise.abs()], 1)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise, backend=backend)
    ref = R.ddpm_step_ref(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- out= / x0
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_out_in_place_and_non_contiguous(backend, schedule, op):
    x_t, model_output, noise = make_inputs((3, 4, 5), 3, torch.float32, backend, seed=7)
    t, t_prev = make_steps(3, backend, seed=7)
    fn = getattr(dk, op)
    extra = (1.0,) if op == "ddim_step" else ()  # eta: exercise the noise term
    expected, expected_x0 = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend,
                               return_pred_x0=True)
    x = x_t.clone()
    result, x0 = fn(x, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=x,
                    return_pred_x0=True)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(x0, expected_x0, rtol=0, atol=0)
    out = torch.empty_like(x_t)
    assert fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out = torch.empty(3, 5, 4, device=backend).transpose(1, 2)
    result = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=out)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # in place with in-kernel noise equals the out-of-place result from the same generator state
    g = torch.Generator(backend)
    expected = fn(x_t, t, t_prev, model_output, schedule, *extra, generator=g.manual_seed(8), backend=backend)
    x = x_t.clone()
    fn(x, t, t_prev, model_output, schedule, *extra, generator=g.manual_seed(8), backend=backend, out=x)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_strided_inputs(backend, schedule):
    """Non-contiguous x_t, model_output, noise and strided t / t_prev views give the reference's result."""
    x_t, model_output, noise = (a.transpose(1, 2) for a in make_inputs((3, 5, 4), 3, torch.float32, backend, seed=18))
    steps = torch.tensor([[5, 4, 900], [500, 480, 7], [999, 979, 3]], device=backend)
    t, t_prev = steps[:, 0], steps[:, 1]
    assert not t.is_contiguous() and not x_t.is_contiguous()
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise, backend=backend)
    ref = R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise, backend=backend)
    ref = R.ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_out_of_range_steps_give_nan(backend, schedule):
    """Validation bypassed (backend functions called directly): t outside [0, T) or t_prev outside [-1, T)
    gives NaN for that sample only; nothing is read outside the table."""
    x, y, z = make_inputs((5, 3, 4), 3, torch.float32, backend, seed=8)
    t = torch.tensor([-1, 3, T, 2**40, 10], device=backend)
    t_prev = torch.tensor([-1, 2, 5, 1, -2], device=backend)
    bad = torch.tensor([True, False, True, True, True], device=backend)
    ops = extension.CPU_BACKEND.ops if backend == "cpu" else extension.CUDA_BACKEND.ops
    prev, x0 = ops["ddim_step"](x, t, t_prev, y, schedule, 1.0, "eps", True, z, return_pred_x0=True)
    results = [
        prev,
        ops["ddim_step"](x, t, t_prev, y, schedule, 0.0, "v", False),
        ops["ddpm_step"](x, t, t_prev, y, schedule, "x0", "fixed_small", True, z),
        ops["ddpm_step"](x, t, t_prev, torch.cat([y, z], 1), schedule, "eps", "learned_range", False, None),
    ]
    for r in results:
        flat = r.reshape(5, -1)
        assert bool(flat[bad].isnan().all())
        assert bool(flat[~bad].isfinite().all())
    # the predicted x0 depends on t only
    t_bad = torch.tensor([True, False, True, True, False], device=backend)
    assert bool(x0.reshape(5, -1)[t_bad].isnan().all()) and bool(x0.reshape(5, -1)[~t_bad].isfinite().all())


def test_ddim_last_step_with_alpha_one_returns_x0(backend, schedule):
    x_t, model_output, noise = make_inputs((2, 4), 3, torch.float32, backend, seed=13)
    t, t_prev = torch.tensor([3, 0], device=backend), torch.tensor([-1, -1], device=backend)
    out, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, noise=noise, backend=backend,
                           return_pred_x0=True)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)


def test_zero_elements(backend, schedule):
    x = torch.empty(2, 0, 3, device=backend)
    t, t_prev = torch.tensor([5, 1], device=backend), torch.tensor([4, -1], device=backend)
    out, x0 = dk.ddim_step(x, t, t_prev, x, schedule, 1.0, backend=backend, return_pred_x0=True)
    assert out.shape == x.shape and x0.shape == x.shape
    assert dk.ddpm_step(x, t, t_prev, x, schedule, backend=backend).shape == x.shape


# ---------------------------------------------------------------------------------- thresholding fallback
THRESHOLD_OPTIONS = {
    "ratio0.9_max2.5": dict(threshold_ratio=0.9, threshold_max=2.5),
    "ratio0.995_max1_clipped_output": dict(threshold_ratio=0.995, threshold_max=1.0, use_clipped_model_output=True),
}


@pytest.mark.parametrize("options", list(THRESHOLD_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_thresholded_steps_run_the_reference(backend, schedule, dtype, options):
    """threshold_ratio is not fused: the compiled backends run the reference for it, so the result is the
    reference's exactly (same device, same code)."""
    x_t, model_output, noise = make_inputs((3, 2, 5, 3), 3, dtype, backend, seed=10, scale=2.0)
    t, t_prev = make_steps(3, backend, seed=10)
    o = dict(THRESHOLD_OPTIONS[options])
    kw = dict(noise=noise, return_pred_x0=True, threshold_ratio=o["threshold_ratio"],
              threshold_max=o["threshold_max"])
    clipped = o.get("use_clipped_model_output", False)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, backend=backend,
                       use_clipped_model_output=clipped, **kw)
    ref = R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, use_clipped_model_output=clipped,
                          **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    wide = learned_output((3, 2, 5, 3), dtype, backend, "learned_range", seed=10)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned_range", backend=backend, **kw)
    ref = R.ddpm_step_ref(x_t, t, t_prev, wide, schedule, "eps", "learned_range", **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_dynamic_threshold_runs_the_reference(backend):
    (x0,) = make_inputs((3, 4, 5, 7), 1, torch.float32, backend, seed=16, scale=2.0)
    assert extension.CPU_BACKEND.ops["dynamic_threshold"] is R.dynamic_threshold_ref
    got = dk.dynamic_threshold(x0, 0.9, 2.5, backend=backend)
    torch.testing.assert_close(got, R.dynamic_threshold_ref(x0, 0.9, 2.5), rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- noise
def _ddpm_noise(backend, schedule, shape, generator=None):
    """z from ddpm_step's in-kernel draw: x0 parameterization with x_t = x0 = 0 makes the mean 0, so the
    output is std * z."""
    zeros = torch.zeros(shape, device=backend)
    t = torch.full((shape[0],), 500, device=backend)
    out = dk.ddpm_step(zeros, t, t - 20, zeros, schedule, "x0", "fixed_large", False, generator=generator,
                       backend=backend)
    ab = schedule.coefficients64[1]
    beta = 1 - ab[500] / ab[480]
    return out.double() / beta.sqrt()


def _ddim_noise(backend, schedule, shape, generator=None):
    zeros = torch.zeros(shape, device=backend)
    t = torch.full((shape[0],), 500, device=backend)
    out = dk.ddim_step(zeros, t, t - 20, zeros, schedule, 1.0, "x0", generator=generator, backend=backend)
    ab = schedule.coefficients64[1]
    a, p = ab[500], ab[480]
    sigma = ((1 - p) / (1 - a) * (1 - a / p)).sqrt()
    return out.double() / sigma


@pytest.mark.parametrize("draw", [_ddpm_noise, _ddim_noise], ids=["ddpm", "ddim"])
def test_in_kernel_noise(backend, schedule, draw):
    """Standard normal, reproducible from the generator state, fresh on every call, different per sample."""
    gen = torch.Generator(backend).manual_seed(99)
    a = draw(backend, schedule, (2, 4096), gen)
    b = draw(backend, schedule, (2, 4096), gen)
    a2 = draw(backend, schedule, (2, 4096), gen.manual_seed(99))
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert (a - b).abs().mean() > 0.5
    assert not torch.equal(a[0], a[1])
    for z in (a, b):
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03
    torch.manual_seed(5)
    c = draw(backend, schedule, (2, 33))
    torch.manual_seed(5)
    torch.testing.assert_close(c, draw(backend, schedule, (2, 33)), rtol=0, atol=0)


def test_in_kernel_noise_independent_of_threads(schedule, backend):
    if backend != "cpu":
        pytest.skip("CPU thread count")
    x_t, model_output = make_inputs((5, 3, 31, 33), 2, torch.float32, "cpu", seed=22)
    t, t_prev = make_steps(5, "cpu", seed=22)

    def run():
        g = torch.Generator().manual_seed(2)
        return (dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.8, generator=g, backend="cpu"),
                dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=g, backend="cpu"))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_eta0_draws_nothing(backend, schedule):
    x_t, model_output, noise = make_inputs((2, 3, 4), 3, torch.float32, backend, seed=12)
    t, t_prev = make_steps(2, backend, seed=12)
    gen = torch.Generator(backend).manual_seed(0)
    state = gen.get_state()
    a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, generator=gen, backend=backend)
    assert torch.equal(gen.get_state(), state)
    b = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, noise=noise, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddpm_step_advances_the_generator(backend, schedule):
    x_t, model_output = make_inputs((2, 3, 4), 2, torch.float32, backend, seed=19)
    t, t_prev = make_steps(2, backend, seed=19)
    gen = torch.Generator(backend).manual_seed(0)
    a = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend=backend)
    b = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend=backend)
    assert not torch.equal(a[1:], b[1:])  # sample 0 is t = 0: no noise there
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------ torch.library / compile
def _opcheck_cases(backend, schedule, dtype):
    x, y, z = make_inputs((2, 3, 5), 3, dtype, backend, seed=14)
    t, t_prev = make_steps(2, backend, seed=14)
    tab = schedule.table(torch.float64)
    wide = torch.cat([y, z], 1)
    ops = torch.ops.ddpm_kernels
    return [
        (ops.ddim_step, (x, t, t_prev, y, tab, 0.0, "eps", False, 1.0, True, False, None, None, False)),
        (ops.ddim_step, (x, t, t_prev, y, tab, 1.0, "v", True, 1.5, False, True, z, None, True)),
        (ops.ddim_step_out, (x, t, t_prev, y, tab, 0.5, "x0", True, 1.0, True, False, z, None, True,
                             torch.empty_like(x))),
        (ops.ddpm_step, (x, t, t_prev, y, tab, "eps", "fixed_small", True, 1.0, z, None, True)),
        (ops.ddpm_step, (x, t, t_prev, wide, tab, "v", "learned_range", False, 1.0, z, None, False)),
        (ops.ddpm_step_out, (x, t, t_prev, wide, tab, "x0", "learned", True, 2.0, z, None, False,
                             torch.empty_like(x))),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(backend, schedule, dtype):
    for op, args in _opcheck_cases(backend, schedule, dtype):
        torch.library.opcheck(op, args)


def test_opcheck_in_kernel_noise(backend, schedule):
    """noise=None draws from the generator: schema and fake-tensor checks only (values differ per call)."""
    x, y = make_inputs((2, 3, 5), 2, torch.float32, backend, seed=15)
    t, t_prev = make_steps(2, backend, seed=15)
    tab = schedule.table(torch.float64)
    for op, args in (
        (torch.ops.ddpm_kernels.ddim_step, (x, t, t_prev, y, tab, 1.0, "eps", True, 1.0, True, False, None, None,
                                            True)),
        (torch.ops.ddpm_kernels.ddpm_step, (x, t, t_prev, y, tab, "eps", "fixed_large", True, 1.0, None, None,
                                            False)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_steps(backend, schedule):
    """DDIM and DDPM steps (given noise, in place, learned variance) compile with fullgraph=True and match
    eager."""
    x_t, model_output, noise = make_inputs((2, 3, 4, 4), 3, torch.float32, backend, seed=15)
    wide = torch.cat([model_output, -noise.abs()], 1)
    t, t_prev = make_steps(2, backend, seed=15)

    # the in-place step's buffer comes from outside: the graph holds only the ops (no Inductor-generated kernel)
    def steps(x_t, t, t_prev, model_output, wide, noise, x):
        a, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.5, "v", True, noise=noise,
                             backend=backend, return_pred_x0=True)
        b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise, backend=backend)
        dk.ddpm_step(x, t, t_prev, model_output, schedule, noise=noise, backend=backend, out=x)
        return a, x0, b, x

    eager = steps(x_t, t, t_prev, model_output, wide, noise, x_t.clone())
    torch._dynamo.reset()
    compiled = torch.compile(steps, fullgraph=True)(x_t, t, t_prev, model_output, wide, noise, x_t.clone())
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registered_in_backends():
    for b in (extension.CPU_BACKEND, extension.CUDA_BACKEND):
        for name in ("ddim_step", "ddpm_step", "dynamic_threshold"):
            assert inspect.signature(b.ops[name]) == inspect.signature(R.OPS[name])
    for name in ("ddim_step", "ddim_step_out", "ddpm_step", "ddpm_step_out"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_kernels::{name}", "CPU")


def test_auto_picks_the_cpu_kernels():
    from ddpm_kernels import backends

    assert backends.resolve("ddim_step", "auto", torch.device("cpu"), torch.float32)[0] == "cpu"
    assert backends.resolve("ddpm_step", "auto", torch.device("cpu"), torch.float16)[0] == "cpu"


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_cuda_graph_replay_reads_new_steps():
    """t and t_prev are read in-kernel from the captured tensors: new values and a replay give the new step."""
    if extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32) is not None:
        pytest.skip("CUDA kernels not built")
    schedule = dk.DiffusionSchedule(timesteps=T).cuda()
    x_t, model_output, noise = make_inputs((4, 4, 16, 16), 3, torch.float32, "cuda", seed=20)
    wide = torch.cat([model_output, noise.clamp(-1, 1)], 1)
    t = torch.full((4,), 999, device="cuda", dtype=torch.int64)
    t_prev = torch.full((4,), 979, device="cuda", dtype=torch.int64)

    def step():
        a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise, backend="cuda")
        b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise, backend="cuda")
        return a, b

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    t.copy_(torch.tensor([500, 3, 1, 0], device="cuda"))
    t_prev.copy_(torch.tensor([480, 1, 0, -1], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(
        outs[0], R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise),
        rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        outs[1], R.ddpm_step_ref(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise),
        rtol=1e-5, atol=1e-5)
