"""Triton ``ddim_step``, ``ddpm_step`` and ``dynamic_threshold`` against the reference, on CPU through Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1 when there is no GPU) or on a GPU when one is present; GPU-only checks
(CUDA-graph replay, launch counts, eager generator state) are marked ``gpu``.

Tolerances follow DESIGN.md, as in tests/test_triton.py: float32 against the float32 reference at
rtol=atol=1e-5; float64 at 1e-12; float16/bfloat16 against the float64 reference with an error at most twice the
reference's own error in that dtype plus one ulp (plus one bfloat16 ulp under the interpreter, which truncates
float32 -> bfloat16 where a GPU rounds), and within 2e-3 (fp16) / 1.6e-2 (bf16) relative.

With ``threshold_ratio`` a step is an x0 pass, a per-sample sort (the reference's quantile) and the step kernel;
``dynamic_threshold`` is the same sort and one elementwise kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import reference as R

triton = pytest.importorskip("triton")
tk = pytest.importorskip("ddpm_kernels.triton")
from ddpm_kernels.triton import utils as tu  # noqa: E402
from ddpm_kernels.triton.ddpm_step import VARIANCE_ID  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tu.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

T = 1000
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 element (batch 1); odd 4-D; 3-D with one channel
SHAPES = [(1,), (4, 3, 5, 7), (5, 1, 9)]
PARAMETERIZATIONS = ["eps", "x0", "v"]
VARIANCE_TYPES = list(VARIANCE_ID)
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).to(DEVICE)


@pytest.fixture(scope="module")
def cosine():
    return dk.DiffusionSchedule("cosine", timesteps=T).to(DEVICE)


def make_steps(batch, seed=0):
    """Per-sample (t, t_prev): sample 0 is the last step (0 -> -1), the last sample starts the chain
    (T-1 -> T-1-k), sample 1 is the plain chain (t -> t-1), the others respaced jumps (some to -1)."""
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
    return t.to(DEVICE), t_prev.to(DEVICE)


def make_inputs(shape, n, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype) for _ in range(n)]


def learned_output(shape, dtype, variance_type, seed=0):
    """``(B, 2C, ...)``: a prediction, then log-variances in [-12, 0] (``learned``) or values in [-1, 1]
    (``learned_range``)."""
    pred, extra = make_inputs(shape, 2, torch.float64, seed=seed + 50)
    extra = -3.0 * extra.abs() if variance_type == "learned" else extra.clamp(-1, 1)
    return torch.cat([pred, extra], dim=1).to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def assert_matches(got, ref_fn, args, kwargs, dtype):
    """``got`` (one tensor or a tuple) against ``ref_fn(*args, **kwargs)`` by DESIGN's tolerance rule."""
    outs = got if isinstance(got, tuple) else (got,)

    def run(a):
        r = ref_fn(*a, **kwargs)
        return r if isinstance(r, tuple) else (r,)

    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for o, r in zip(outs, run(args), strict=True):
            assert o.dtype == r.dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=tol, atol=tol, equal_nan=True)
        return
    args64 = [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    extra = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    refs64 = ref_fn(*args64, **extra)
    refs64 = refs64 if isinstance(refs64, tuple) else (refs64,)
    for o, r64, rlp in zip(outs, refs64, run(args), strict=True):
        assert o.dtype == rlp.dtype == dtype and o.shape == rlp.shape
        err = (o.to(torch.float64) - r64).abs()
        ref_err = (rlp.to(torch.float64) - r64).abs()
        extra_ulp = ulp(r64, dtype) if (dtype == torch.bfloat16 and tu.INTERPRETED) else 0.0
        allowed = 2 * ref_err + ulp(r64, dtype) + extra_ulp
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
def test_ddim_step(schedule, dtype, shape, parameterization, options):
    o = dict(DDIM_OPTIONS[options])
    eta, clip = o.pop("eta"), o.pop("clip_denoised", False)
    x_t, model_output, noise = make_inputs(shape, 3, dtype, seed=1)
    t, t_prev = make_steps(shape[0], seed=1)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, eta, parameterization, clip, noise=noise,
                       backend="triton", return_pred_x0=True, **o)
    assert_matches(got, R.ddim_step_ref, (x_t, t, t_prev, model_output, schedule, eta, parameterization, clip),
                   dict(noise=noise, return_pred_x0=True, **o), dtype)


# ---------------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddpm_step(schedule, dtype, shape, parameterization, variance_type):
    x_t, noise, model_output = make_inputs(shape, 3, dtype, seed=2)
    if variance_type.startswith("learned"):
        model_output = learned_output(shape, dtype, variance_type, seed=2)
    t, t_prev = make_steps(shape[0], seed=2)
    clip = parameterization != "x0"
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip, noise=noise,
                       backend="triton", return_pred_x0=True)
    assert_matches(
        got, R.ddpm_step_ref, (x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip),
        dict(noise=noise, return_pred_x0=True), dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ddpm_step_cosine_clip_range(cosine, dtype):
    x_t, model_output, noise = make_inputs((4, 3, 9, 5), 3, dtype, seed=4, scale=3.0)
    t, t_prev = make_steps(4, seed=4)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True, noise=noise,
                       backend="triton", clip_range=2.0)
    assert_matches(got, R.ddpm_step_ref, (x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True),
                   dict(noise=noise, clip_range=2.0), dtype)


def test_ddpm_step_on_the_full_chain_is_p_sample(schedule):
    """t_prev = t - 1 with fixed_small is p_sample, for given noise and for in-kernel noise from the same
    generator state (both ops key Philox the same way)."""
    x_t, model_output, noise = make_inputs((4, 3, 5, 5), 3, torch.float32, seed=5)
    t = torch.tensor([0, 1, 500, 999], device=DEVICE)
    for kwargs in (dict(noise=noise), dict(generator=torch.Generator(DEVICE).manual_seed(11))):
        got = dk.ddpm_step(x_t, t, t - 1, model_output, schedule, "v", "fixed_small", True, backend="triton",
                           **kwargs)
        if "generator" in kwargs:
            kwargs = dict(generator=torch.Generator(DEVICE).manual_seed(11))
        expected = dk.p_sample(x_t, t, model_output, schedule, "v", True, backend="triton", **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_learned_variance_non_contiguous_model_output(schedule):
    x_t, noise = make_inputs((3, 2, 4, 5), 2, torch.float32, seed=6)
    model_output = learned_output((3, 2, 5, 4), torch.float32, "learned_range", seed=6).transpose(2, 3)
    assert not model_output.is_contiguous()
    t, t_prev = make_steps(3, seed=6)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise,
                       backend="triton")
    expected = R.ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule_kind", ["linear", "cosine", "zero_terminal_snr"])
def test_steps_across_the_chain_float32(schedule_kind):
    """Steps across the chain in one batch, for the plain chain (t_prev = t - 1: ``1 - ab_t / ab_prev`` is ~1e-4
    near t = 0, where a float32 subtraction would cancel) and a respaced one (t_prev = t - 37), eta 0 and 1,
    against the float32 reference at 1e-5."""
    if schedule_kind == "zero_terminal_snr":
        s = dk.DiffusionSchedule(timesteps=T, zero_terminal_snr=True).to(DEVICE)
        parameterization = "v"  # eps is undefined where ab_t = 0
    else:
        s = dk.DiffusionSchedule(schedule_kind, timesteps=T).to(DEVICE)
        parameterization = "eps"
    # the first 20 steps (where the cancellation is worst), the last 8, and a spread between
    t = torch.cat([torch.arange(20), torch.linspace(20, T - 9, 20).long(), torch.arange(T - 8, T)]).to(DEVICE)
    x_t, model_output, noise = make_inputs((t.shape[0], 3), 3, torch.float32, seed=3)
    for k in (1, 37):
        t_prev = (t - k).clamp(min=-1)
        for eta in (0.0, 1.0):
            got = dk.ddim_step(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                               backend="triton", return_pred_x0=True)
            ref = R.ddim_step_ref(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                                  return_pred_x0=True)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for variance_type in ("fixed_small", "fixed_large"):
            got = dk.ddpm_step(x_t, t, t_prev, model_output, s, parameterization, variance_type, False,
                               noise=noise, backend="triton")
            ref = R.ddpm_step_ref(x_t, t, t_prev, model_output, s, parameterization, variance_type, False,
                                  noise=noise)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- out= / x0
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_out_in_place_and_non_contiguous(schedule, op):
    x_t, model_output, noise = make_inputs((3, 4, 5), 3, torch.float32, seed=7)
    t, t_prev = make_steps(3, seed=7)
    fn = getattr(dk, op)
    extra = (1.0,) if op == "ddim_step" else ()  # eta: exercise the noise term
    expected, expected_x0 = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend="triton",
                               return_pred_x0=True)
    x = x_t.clone()
    result, x0 = fn(x, t, t_prev, model_output, schedule, *extra, noise=noise, backend="triton", out=x,
                    return_pred_x0=True)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(x0, expected_x0, rtol=0, atol=0)
    out = torch.empty(3, 5, 4, device=DEVICE).transpose(1, 2)
    result = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend="triton", out=out)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_strided_inputs(schedule):
    """Non-contiguous x_t, model_output, noise and strided t / t_prev views give the reference's result."""
    x_t, model_output, noise = (a.transpose(1, 2) for a in make_inputs((3, 5, 4), 3, torch.float32, seed=18))
    steps = torch.tensor([[5, 4, 900], [500, 480, 7], [999, 979, 3]], device=DEVICE)
    t, t_prev = steps[:, 0], steps[:, 1]
    assert not t.is_contiguous() and not x_t.is_contiguous()
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise, backend="triton")
    ref = R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise, backend="triton")
    ref = R.ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_out_of_range_steps_give_nan(schedule):
    """Validation bypassed (backend functions called directly): t outside [0, T) or t_prev outside [-1, T)
    gives NaN for that sample only; nothing is read outside the table."""
    x, y, z = make_inputs((5, 3, 4), 3, torch.float32, seed=8)
    t = torch.tensor([-1, 3, T, 2**40, 10], device=DEVICE)
    t_prev = torch.tensor([-1, 2, 5, 1, -2], device=DEVICE)
    bad = torch.tensor([True, False, True, True, True], device=DEVICE)
    ops = tk.BACKEND.ops
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
    t_bad = torch.tensor([True, False, True, True, False], device=DEVICE)
    assert bool(x0.reshape(5, -1)[t_bad].isnan().all()) and bool(x0.reshape(5, -1)[~t_bad].isfinite().all())


def test_batch_chunks_match_single_launch(schedule, monkeypatch):
    x, y, z = make_inputs((5, 2, 9), 3, torch.float32, seed=9)
    t, t_prev = make_steps(5, seed=9)

    def run():
        return [
            tk.BACKEND.ops["ddim_step"](x, t, t_prev, y, schedule, 0.5, "v", True, None,
                                        torch.Generator(DEVICE).manual_seed(3)),
            tk.BACKEND.ops["ddpm_step"](x, t, t_prev, torch.cat([y, z], 1), schedule, "eps", "learned", True,
                                        None, torch.Generator(DEVICE).manual_seed(4)),
        ]

    single = run()
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    chunked = run()
    for a, b in zip(single, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


THRESHOLD_OPTIONS = {
    "ratio0.9_max2.5": dict(threshold_ratio=0.9, threshold_max=2.5),
    "ratio0.995_max1_clipped_output": dict(threshold_ratio=0.995, threshold_max=1.0, use_clipped_model_output=True),
    "ratio1_max3": dict(threshold_ratio=1.0, threshold_max=3.0),
}


@pytest.mark.parametrize("options", list(THRESHOLD_OPTIONS))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholded_steps(schedule, dtype, parameterization, options):
    """threshold_ratio: an x0 pass, a per-sample sort for the scale, then the step kernel applying it."""
    x_t, model_output, noise = make_inputs((3, 2, 5, 3), 3, dtype, seed=10, scale=2.0)
    t, t_prev = make_steps(3, seed=10)
    o = dict(THRESHOLD_OPTIONS[options])
    kw = dict(noise=noise, return_pred_x0=True, threshold_ratio=o["threshold_ratio"],
              threshold_max=o["threshold_max"])
    clipped = o.get("use_clipped_model_output", False)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, parameterization, True, backend="triton",
                       use_clipped_model_output=clipped, **kw)
    assert_matches(got, R.ddim_step_ref, (x_t, t, t_prev, model_output, schedule, 1.0, parameterization, True),
                   dict(use_clipped_model_output=clipped, **kw), dtype)
    wide = learned_output((3, 2, 5, 3), dtype, "learned_range", seed=10)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, parameterization, "learned_range", backend="triton", **kw)
    assert_matches(got, R.ddpm_step_ref, (x_t, t, t_prev, wide, schedule, parameterization, "learned_range"), kw,
                   dtype)


@pytest.mark.parametrize("shape", [(1,), (3, 4, 5, 7), (2, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_threshold(dtype, shape):
    (x0,) = make_inputs(shape, 1, dtype, seed=16, scale=2.0)
    for ratio, max_value in ((0.995, 1.0), (0.9, 2.5), (0.0, 10.0), (1.0, 1.5)):
        got = dk.dynamic_threshold(x0, ratio, max_value, backend="triton")
        assert_matches(got, R.dynamic_threshold_ref, (x0, ratio, max_value), {}, dtype)


def test_dynamic_threshold_nan_sample():
    (x0,) = make_inputs((3, 40), 1, torch.float32, seed=17, scale=2.0)
    x0[1, 7] = float("nan")
    got = dk.dynamic_threshold(x0, 0.9, 2.0, backend="triton")
    assert bool(got[1].isnan().all()) and bool(got[[0, 2]].isfinite().all())
    torch.testing.assert_close(got, R.dynamic_threshold_ref(x0, 0.9, 2.0), equal_nan=True)


# -------------------------------------------------------------------------------------------- noise
def _ddpm_noise(schedule, shape, generator=None):
    """z from ddpm_step's in-kernel draw: x0 parameterization with x_t = x0 = 0 makes the mean 0, so the
    output is std * z."""
    zeros = torch.zeros(shape, device=DEVICE)
    t = torch.full((shape[0],), 500, device=DEVICE)
    out = dk.ddpm_step(zeros, t, t - 20, zeros, schedule, "x0", "fixed_large", False, generator=generator,
                       backend="triton")
    ab = schedule.coefficients64[1]
    beta = 1 - ab[500] / ab[480]
    return out.double() / beta.sqrt()


def _ddim_noise(schedule, shape, generator=None):
    zeros = torch.zeros(shape, device=DEVICE)
    t = torch.full((shape[0],), 500, device=DEVICE)
    out = dk.ddim_step(zeros, t, t - 20, zeros, schedule, 1.0, "x0", generator=generator, backend="triton")
    ab = schedule.coefficients64[1]
    a, p = ab[500], ab[480]
    sigma = ((1 - p) / (1 - a) * (1 - a / p)).sqrt()
    return out.double() / sigma


@pytest.mark.parametrize("draw", [_ddpm_noise, _ddim_noise], ids=["ddpm", "ddim"])
def test_in_kernel_noise(schedule, draw):
    """Standard normal, reproducible from the generator state, fresh on every call, different per sample."""
    gen = torch.Generator(DEVICE).manual_seed(99)
    a = draw(schedule, (2, 4096), gen)
    b = draw(schedule, (2, 4096), gen)
    a2 = draw(schedule, (2, 4096), gen.manual_seed(99))
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert (a - b).abs().mean() > 0.5
    assert not torch.equal(a[0], a[1])
    for z in (a, b):
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03
    torch.manual_seed(5)
    c = draw(schedule, (2, 33))
    torch.manual_seed(5)
    torch.testing.assert_close(c, draw(schedule, (2, 33)), rtol=0, atol=0)


def test_ddim_eta0_draws_nothing(schedule):
    x_t, model_output, noise = make_inputs((2, 3, 4), 3, torch.float32, seed=12)
    t, t_prev = make_steps(2, seed=12)
    gen = torch.Generator(DEVICE).manual_seed(0)
    state = gen.get_state()
    a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, generator=gen, backend="triton")
    assert torch.equal(gen.get_state(), state)
    b = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, noise=noise, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_last_step_with_alpha_one_returns_x0(schedule):
    x_t, model_output, noise = make_inputs((2, 4), 3, torch.float32, seed=13)
    t, t_prev = torch.tensor([3, 0], device=DEVICE), torch.tensor([-1, -1], device=DEVICE)
    out, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, noise=noise, backend="triton",
                           return_pred_x0=True)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)


# ------------------------------------------------------------------------------ torch.library / compile
def _opcheck_cases(schedule, dtype):
    x, y, z = make_inputs((2, 3, 5), 3, dtype, seed=14)
    t, t_prev = make_steps(2, seed=14)
    ab = schedule.coefficients64[1]
    wide = torch.cat([y, z], 1)
    seed = tu.draw_seed(None, x.device)
    scale = torch.tensor([1.0, 1.7], dtype=R.compute_dtype(dtype), device=DEVICE)
    ops = torch.ops.ddpm_kernels_triton
    return [
        (ops.ddim_step, (x, t, t_prev, y, ab, 0.0, 0, False, False, True, 1.0, None, None, 0, 0, False, None)),
        (ops.ddim_step, (x, t, t_prev, y, ab, 1.0, 2, True, True, False, 1.5, z, None, 0, 0, True, None)),
        (ops.ddim_step, (x, t, t_prev, y, ab, 0.5, 1, True, False, True, 1.0, None, seed, 0, 0, True, scale)),
        (ops.ddim_step_out, (x, t, t_prev, y, ab, 0.5, 0, True, False, True, 1.0, None, None, 2**62 + 3, 68,
                             True, None, torch.empty_like(x))),
        (ops.ddim_step_x0, (x, t, t_prev, y, ab, 2)),
        (ops.ddpm_step, (x, t, t_prev, y, ab, 0, 0, True, 1.0, z, None, 0, 0, True, None)),
        (ops.ddpm_step, (x, t, t_prev, wide, ab, 2, 3, False, 1.0, None, seed, 0, 0, False, scale)),
        (ops.ddpm_step_out, (x, t, t_prev, wide, ab, 1, 2, True, 2.0, z, None, 0, 0, False, None,
                             torch.empty_like(x))),
        (ops.ddpm_step_x0, (x, t, t_prev, wide, ab, 0, 2)),
        (ops.dynamic_threshold_apply, (x, scale)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(schedule, dtype):
    for op, args in _opcheck_cases(schedule, dtype):
        torch.library.opcheck(op, args)


def test_torch_compile_steps(schedule):
    """DDIM and DDPM steps (given noise, in-kernel noise, in place) compile with fullgraph=True and match
    eager."""
    x_t, model_output, noise = make_inputs((2, 3, 4, 4), 3, torch.float32, seed=15)
    wide = torch.cat([model_output, -noise.abs()], 1)
    t, t_prev = make_steps(2, seed=15)

    def steps(x_t, t, t_prev, model_output, wide, noise):
        a, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.5, "v", True, noise=noise,
                             backend="triton", return_pred_x0=True)
        b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise, backend="triton")
        drawn = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, backend="triton")
        x = x_t.clone()
        dk.ddpm_step(x, t, t_prev, model_output, schedule, noise=noise, backend="triton", out=x)
        thresholded = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, "eps", backend="triton",
                                   threshold_ratio=0.9, threshold_max=2.0)
        scaled = dk.dynamic_threshold(model_output, 0.8, 1.5, backend="triton")
        return a, x0, b, x, thresholded, scaled, drawn

    eager = steps(x_t, t, t_prev, model_output, wide, noise)
    compiled = torch.compile(steps, fullgraph=True)(x_t, t, t_prev, model_output, wide, noise)
    for a, b in zip(eager[:6], compiled[:6]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled[6].shape == x_t.shape and bool(compiled[6].isfinite().all())


def test_registered_in_backend():
    assert tk.BACKEND.ops["ddim_step"].__module__ == "ddpm_kernels.triton.ddim_step"
    assert tk.BACKEND.ops["ddpm_step"].__module__ == "ddpm_kernels.triton.ddpm_step"
    import inspect

    assert tk.BACKEND.ops["dynamic_threshold"].__module__ == "ddpm_kernels.triton.dynamic_threshold"
    for name in ("ddim_step", "ddpm_step", "dynamic_threshold"):
        assert inspect.signature(tk.BACKEND.ops[name]) == inspect.signature(R.OPS[name])


# ------------------------------------------------------------------------------------------- GPU only
def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_cuda_graph_replay_reads_new_steps(schedule):
    """t and t_prev are read in-kernel from the captured tensors: new values and a replay give the new step."""
    x_t, model_output, noise = make_inputs((4, 4, 16, 16), 3, torch.float32, seed=20)
    wide = torch.cat([model_output, noise.clamp(-1, 1)], 1)
    t = torch.full((4,), 999, device="cuda", dtype=torch.int64)
    t_prev = torch.full((4,), 979, device="cuda", dtype=torch.int64)

    def step():
        a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise, backend="triton")
        b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise, backend="triton")
        c = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, "eps", backend="triton", threshold_ratio=0.9,
                         threshold_max=3.0)
        return a, b, c

    graph, (a, b, c) = _capture(step)
    for new_t, new_prev in (([500, 1, 0, 998], [480, 0, -1, 978]), ([3, 700, 250, 0], [-1, 650, 249, -1])):
        t.copy_(torch.tensor(new_t))
        t_prev.copy_(torch.tensor(new_prev))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(
            a, R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise),
            rtol=1e-5, atol=1e-5,
        )
        torch.testing.assert_close(
            b, R.ddpm_step_ref(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise),
            rtol=1e-5, atol=1e-5,
        )
        torch.testing.assert_close(
            c, R.ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.0, "eps", threshold_ratio=0.9,
                               threshold_max=3.0),
            rtol=1e-5, atol=1e-5,
        )


@pytest.mark.gpu
def test_cuda_graph_in_kernel_noise_fresh_each_replay(schedule):
    zeros = torch.zeros(2, 4, 64, 64, device="cuda")
    t = torch.full((2,), 500, device="cuda", dtype=torch.int64)
    graph, out = _capture(lambda: dk.ddpm_step(zeros, t, t - 20, zeros, schedule, "x0", "fixed_large", False,
                                               backend="triton"))
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def _cuda_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
def test_one_launch_per_step_and_generator_state(schedule):
    """Each step is one kernel with given or in-kernel noise (eager: the generator's Philox state as kernel
    arguments), with learned variances and return_pred_x0; no host sync."""
    x_t, model_output, noise = make_inputs((16, 4, 32, 32), 3, torch.float32, seed=21)
    wide = torch.cat([model_output, -noise.abs()], 1)
    t = torch.randint(1, T, (16,), device="cuda")
    t_prev = t - 1
    out = torch.empty_like(x_t)
    calls = [
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, noise=noise, backend="triton"),
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, backend="triton", return_pred_x0=True),
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, backend="triton", out=out),
        lambda: dk.ddpm_step(x_t, t, t_prev, model_output, schedule, noise=noise, backend="triton"),
        lambda: dk.ddpm_step(x_t, t, t_prev, wide, schedule, "v", "learned", backend="triton"),
    ]
    for call in calls:
        call()  # compile outside the profile
        torch.cuda.set_sync_debug_mode("error")
        try:
            kernels = _cuda_kernels(call)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(kernels) == 1 and "step_kernel" in kernels[0], kernels
    gen = torch.Generator("cuda").manual_seed(21)
    a = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend="triton")
    assert gen.get_offset() == 4 * 16 * (4 * 32 * 32 // 4)
    gen.manual_seed(21)
    torch.testing.assert_close(a, dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen,
                                               backend="triton"), rtol=0, atol=0)
