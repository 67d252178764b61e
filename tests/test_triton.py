"""Triton backend against the reference, on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) or on a GPU when one is present.

Tolerances follow DESIGN.md: float32 against the float32 reference at rtol=atol=1e-5; float16/bfloat16
against the float64 reference, with an error at most twice the reference's own error in that dtype plus one
ulp (plus one bfloat16 ulp under the interpreter, which truncates float32 -> bfloat16 where a GPU rounds), and
within 2e-3 (fp16) / 1.6e-2 (bf16) relative.
"""

from __future__ import annotations

import importlib
import math
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import reference as R
from ddpm_kernels._spec import StepOptions
from helpers import triton_device

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402

T = 1000
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 element; odd 4-D; 3-D; 5-D; batch of 1 with a 16-divisible sample (the vectorized path on a GPU).
SHAPES = [(1,), (3, 3, 5, 7), (2, 5, 7), (2, 2, 3, 1, 5), (1, 4, 8, 8)]
PARAMETERIZATIONS = ["eps", "x0", "v"]

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).to(DEVICE)


def make_t(batch, seed=0):
    """Per-sample timesteps that always include 0 and T-1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (batch,), generator=g)
    t[0] = 0
    if batch > 1:
        t[-1] = T - 1
    return t.to(DEVICE)


# ---------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("op", ["q_sample", "predict_start_from_noise"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_and_predict_start_from_noise(schedule, dtype, shape, op):
    """x_t from (x_start, noise) and x_start from (x_t, noise): one signature, each op its own table rows."""
    x, noise = make_inputs(shape, 2, dtype)
    t = make_t(shape[0])
    out = getattr(dk, op)(x, t, noise, schedule, backend="triton")
    assert_matches(out, R.OPS[op], (x, t, noise, schedule), {}, dtype)


def pair_args(op, a, b, t, schedule):
    """A pair op's arguments in its own order (get_v takes t last)."""
    return (a, b, t, schedule) if op == "get_v" else (a, t, b, schedule)


MORE_PAIR_OPS = ["predict_noise_from_start", "get_v", "predict_start_from_z_and_v", "predict_eps_from_z_and_v"]


@pytest.mark.parametrize("op", MORE_PAIR_OPS)
@pytest.mark.parametrize("shape", [(1,), (3, 3, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_more_pair_ops(schedule, dtype, shape, op):
    """The inverse helpers and the v conversions run on the same pair kernel, each with its rows and order."""
    a, b = make_inputs(shape, 2, dtype)
    args = pair_args(op, a, b, make_t(shape[0]), schedule)
    out = getattr(dk, op)(*args, backend="triton")
    assert_matches(out, R.OPS[op], args, {}, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_posterior(schedule, dtype, shape):
    x_start, x_t = make_inputs(shape, 2, dtype)
    t = make_t(shape[0])
    out = dk.q_posterior(x_start, x_t, t, schedule, backend="triton")
    assert out[1].shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert_matches(out, R.q_posterior_ref, (x_start, x_t, t, schedule), {}, dtype)


@pytest.mark.parametrize("op", ["p_mean_variance", "p_sample"])
@pytest.mark.parametrize("clip_denoised", [True, False])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_p_mean_variance_and_p_sample(schedule, dtype, shape, parameterization, clip_denoised, op):
    """The posterior of the predicted x0, and a step from it with given noise."""
    x_t, model_output, noise = make_inputs(shape, 3, dtype)
    t = make_t(shape[0])
    args = (x_t, t, model_output, schedule, parameterization, clip_denoised)
    kwargs = dict(noise=noise) if op == "p_sample" else {}
    out = getattr(dk, op)(*args, backend="triton", **kwargs)
    assert_matches(out, R.OPS[op], args, kwargs, dtype)


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss(schedule, dtype, shape, parameterization, loss_type):
    model_output, x_start, noise = make_inputs(shape, 3, dtype)
    t = make_t(shape[0])
    weights = (0.7, 0.3)
    out = dk.diffusion_loss(
        model_output, x_start, noise, t, schedule, parameterization, loss_type, *weights, backend="triton"
    )
    args = (model_output, x_start, noise, t, schedule, parameterization, loss_type, *weights)
    assert all(o.shape == () for o in out)
    assert_matches(out, R.diffusion_loss_ref, args, {}, dtype)


def test_diffusion_loss_reduction_loops(schedule, monkeypatch):
    """The reduction kernel loops over batch chunks and partial-sum tiles (forced with small tiles)."""
    loss_module = importlib.import_module("ddpm_kernels.triton.loss")
    monkeypatch.setattr(loss_module, "REDUCE_BLOCK_B", 4)
    monkeypatch.setattr(loss_module, "REDUCE_BLOCK_P", 2)
    model_output, x_start, noise = make_inputs((9, 2, 300), 3, torch.float32)
    t = make_t(9)
    args = (model_output, x_start, noise, t, schedule, "v", "l2", 1.0, 0.5)
    out = tk.BACKEND.ops["diffusion_loss"](*args)
    assert_matches(out, R.diffusion_loss_ref, args, {}, torch.float32)


@pytest.mark.parametrize(
    "op", ["q_sample", "predict_start_from_noise", "get_v", "q_posterior", "p_mean_variance", "p_sample"]
)
def test_non_contiguous_inputs(schedule, op):
    base = make_inputs((3, 6, 5), 3, torch.float32)
    a, b, c = (x.transpose(1, 2) for x in base)  # (3, 5, 6), not contiguous
    assert not a.is_contiguous()
    t = make_t(3)
    args = {
        "q_sample": (a, t, b, schedule),
        "predict_start_from_noise": (a, t, b, schedule),
        "get_v": (a, b, t, schedule),
        "q_posterior": (a, b, t, schedule),
        "p_mean_variance": (a, t, b, schedule, "v", True),
        "p_sample": (a, t, b, schedule, "eps", True, c),
    }[op]
    assert_matches(tk.BACKEND.ops[op](*args), R.OPS[op], args, {}, torch.float32)


# ------------------------------------------------------------------------------ out=, t, batch chunks
def test_q_sample_out_in_place(schedule):
    x_start, noise = make_inputs((3, 4, 5), 2, torch.float32)
    t = make_t(3)
    expected = R.q_sample_ref(x_start, t, noise, schedule)
    x = x_start.clone()
    result = dk.q_sample(x, t, noise, schedule, backend="triton", out=x)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise_given", [True, False])
def test_p_sample_out_in_place(schedule, noise_given):
    x_t, model_output, noise = make_inputs((3, 4, 5), 3, torch.float32)
    t = make_t(3)
    gen = torch.Generator(DEVICE)
    kwargs = {"noise": noise} if noise_given else {"generator": gen.manual_seed(7)}
    expected = dk.p_sample(x_t, t, model_output, schedule, backend="triton", **kwargs)
    if not noise_given:
        gen.manual_seed(7)
    x = x_t.clone()
    result = dk.p_sample(x, t, model_output, schedule, backend="triton", out=x, **kwargs)
    assert result is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_q_sample_out_keeps_autograd(schedule):
    x_start, noise = (x.requires_grad_() for x in make_inputs((2, 3, 4), 2, torch.float32))
    t = make_t(2)
    out = dk.q_sample(x_start, t, noise, schedule, backend="triton", out=torch.empty(2, 3, 4, device=DEVICE))
    out.sum().backward()
    a, b = R.extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, 3, torch.float32)
    torch.testing.assert_close(x_start.grad, a.expand_as(out))
    torch.testing.assert_close(noise.grad, b.expand_as(out))


def test_torch_compile_in_place_step(schedule):
    """An in-place sampling step (out=x_t) under torch.compile mutates x_t like eager."""
    x_t, model_output, noise = make_inputs((2, 3, 5), 3, torch.float32)
    t = make_t(2)
    expected = dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")

    def step(x, t, model_output, noise):
        return dk.p_sample(x, t, model_output, schedule, noise=noise, backend="triton", out=x)

    x = x_t.clone()
    result = torch.compile(step, fullgraph=True)(x, t, model_output, noise)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_out_non_contiguous(schedule):
    x_start, noise = make_inputs((3, 4, 5), 2, torch.float32)
    t = make_t(3)
    out = torch.empty(3, 5, 4, device=DEVICE).transpose(1, 2)
    dk.q_sample(x_start, t, noise, schedule, backend="triton", out=out)
    torch.testing.assert_close(out, R.q_sample_ref(x_start, t, noise, schedule), rtol=1e-5, atol=1e-5)
    out2 = torch.empty(3, 5, 4, device=DEVICE).transpose(1, 2)
    dk.p_sample(x_start, t, noise, schedule, noise=noise, backend="triton", out=out2)
    expected = R.p_sample_ref(x_start, t, noise, schedule, noise=noise)
    torch.testing.assert_close(out2, expected, rtol=1e-5, atol=1e-5)


def test_out_of_range_t_gives_nan(schedule):
    """Validation is bypassed (backend functions called directly): kernels mask the gather, so bad samples
    come out NaN and good samples are untouched; nothing reads outside the table."""
    x, y, z = make_inputs((4, 3, 5), 3, torch.float32)
    t = torch.tensor([-1, 3, T, 2**40], device=DEVICE)
    bad = torch.tensor([True, False, True, True], device=DEVICE)
    results = [
        tk.BACKEND.ops["q_sample"](x, t, y, schedule),
        tk.BACKEND.ops["predict_start_from_noise"](x, t, y, schedule),
        *(tk.BACKEND.ops[op](*pair_args(op, x, y, t, schedule)) for op in MORE_PAIR_OPS),
        *tk.BACKEND.ops["q_posterior"](x, y, t, schedule),
        *tk.BACKEND.ops["p_mean_variance"](x, t, y, schedule, "eps", True),
        tk.BACKEND.ops["p_sample"](x, t, y, schedule, "v", True, z),
        tk.BACKEND.ops["p_sample"](x, t, y, schedule, "x0", False, None),
    ]
    for r in results:
        flat = r.reshape(4, -1)
        assert bool(flat[bad].isnan().all())
        assert bool(flat[~bad].isfinite().all())
    loss = tk.BACKEND.ops["diffusion_loss"](x, y, z, t, schedule, "eps", "l2", 1.0, 0.0)
    assert bool(loss[2].isnan()) and bool(loss[1].isfinite())


def test_batch_chunks_match_single_launch(schedule, monkeypatch):
    """Batches beyond CUDA's grid-y limit launch in chunks; forced here with a tiny limit."""
    x, y, z = make_inputs((5, 2, 9), 3, torch.float32)
    t = make_t(5)

    def run():
        gen = torch.Generator(DEVICE).manual_seed(3)
        return [
            tk.BACKEND.ops["q_sample"](x, t, y, schedule),
            tk.BACKEND.ops["predict_start_from_noise"](x, t, y, schedule),
            *tk.BACKEND.ops["q_posterior"](x, y, t, schedule),
            *tk.BACKEND.ops["p_mean_variance"](x, t, y, schedule, "v", True),
            tk.BACKEND.ops["p_sample"](x, t, y, schedule, "eps", True, None, gen),
            *tk.BACKEND.ops["diffusion_loss"](x, y, z, t, schedule, "v", "l2", 1.0, 0.5),
        ]

    single = run()
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    assert len(tu.batch_chunks(5)) == 3
    chunked = run()
    for a, b in zip(single, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_launch_config_table():
    for n, batch in [(1, 1), (7, 3), (16384, 1), (65536, 64), (2**31 + 5, 1)]:
        block, warps = tu.launch_config(n, batch)
        assert block & (block - 1) == 0 and 16 <= block <= 1024 and warps in (1, 2, 4)
    assert tu.launch_config(65536, 64) == (1024, 4)  # large: the bandwidth-bound default
    assert tu.launch_config(16384, 1)[0] < 1024  # small latent: more, smaller programs


def test_split_float_is_exact_to_float64():
    for v in (0.1, 1.0, 0.0, 1 / 3, 12345.678):
        hi, lo = tu.split_float(v)
        assert abs((hi + lo) - v) <= 1e-14 * max(1.0, abs(v))


# ---------------------------------------------------------------------------------- in-kernel noise
def _standard_noise(schedule, shape, generator=None, dtype=torch.float32):
    """z drawn in-kernel, recovered exactly: with x0 parameterization, zero inputs and t > 0, the step is
    sigma_t z."""
    x_t = torch.zeros(shape, device=DEVICE, dtype=dtype)
    t = torch.full((shape[0],), 500, device=DEVICE)
    out = dk.p_sample(x_t, t, x_t, schedule, "x0", False, generator=generator, backend="triton")
    sigma = schedule.posterior_log_variance_clipped[500].double().mul(0.5).exp()
    return out.double() / sigma


def test_noise_is_standard_normal(schedule):
    gen = torch.Generator(DEVICE).manual_seed(1234)
    z = _standard_noise(schedule, (4, 4096), gen).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 4 / math.sqrt(2 * n)
    # Kolmogorov-Smirnov distance to N(0, 1); 1.95/sqrt(n) is the 0.1% critical value.
    zs = z.sort().values
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=z.device)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)
    # Neighbours (same Philox call, other Box-Muller pair, next counter) are uncorrelated.
    zz = z.reshape(-1)
    for lag in (1, 2, 3, 4, 4096):
        corr = torch.corrcoef(torch.stack([zz[:-lag], zz[lag:]]))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(n)
    # Tails: a truncated or mis-scaled transform shows here first.
    # P(|z| > 2.5) = 0.01242; +-0.003 is 5 standard errors at this n.
    assert 0.0094 < (z.abs() > 2.5).double().mean().item() < 0.0154
    assert z.abs().max().item() > 3.0


def test_noise_deterministic_from_generator_state(schedule):
    gen = torch.Generator(DEVICE).manual_seed(99)
    a = _standard_noise(schedule, (3, 7, 5), gen)
    b = _standard_noise(schedule, (3, 7, 5), gen)
    gen.manual_seed(99)
    a2 = _standard_noise(schedule, (3, 7, 5), gen)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b), "consecutive calls must draw fresh noise"
    assert (a - b).abs().mean() > 0.5
    # Samples of one batch differ from each other.
    assert not torch.equal(a[0], a[1])


def test_noise_default_generator_follows_manual_seed(schedule):
    torch.manual_seed(5)
    a = _standard_noise(schedule, (2, 33))
    torch.manual_seed(5)
    b = _standard_noise(schedule, (2, 33))
    c = _standard_noise(schedule, (2, 33))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(b, c)


def test_noise_independent_of_launch_table(schedule, monkeypatch):
    """Noise depends on (seed, sample, element) only, so retuning block sizes keeps samples reproducible."""
    gen = torch.Generator(DEVICE)
    a = _standard_noise(schedule, (3, 1000), gen.manual_seed(4))
    monkeypatch.setattr(tu, "LAUNCH_TABLE", ((64, 1),))
    monkeypatch.setattr(tu, "MIN_PROGRAMS", 1)
    assert tu.launch_config(1000, 3)[0] == 64
    b = _standard_noise(schedule, (3, 1000), gen.manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _generator_state_noise(schedule, shape, key, offset):
    """z from the eager-CUDA noise source (a generator's Philox key and offset as kernel arguments), run
    through the op directly so the interpreter covers it on CPU."""
    x_t = torch.zeros(shape, device=DEVICE)
    t = torch.full((shape[0],), 500, device=DEVICE)
    table = schedule.table(torch.float32)
    out = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, None, key, offset)
    return out.double() / schedule.posterior_log_variance_clipped[500].double().mul(0.5).exp()


def test_generator_state_noise(schedule):
    z = _generator_state_noise(schedule, (2, 4096), 12345, 0)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.02
    torch.testing.assert_close(z, _generator_state_noise(schedule, (2, 4096), 12345, 0), rtol=0, atol=0)
    # A key past 2**63 arrives as a negative int64 with the same bits, and is a different stream.
    other = _generator_state_noise(schedule, (2, 4096), -(2**63) + 12345, 0)
    assert (z - other).abs().mean() > 0.5
    # Counter layout: sample b uses counters offset/4 + b*ceil(N/4) + [0, ceil(N/4)); with N = 10,
    # ceil(N/4) = 3, so moving the offset by 4*3 shifts samples by one.
    a = _generator_state_noise(schedule, (3, 10), 7, 0)
    b = _generator_state_noise(schedule, (3, 10), 7, 4 * 3)
    torch.testing.assert_close(a[1:], b[:-1], rtol=0, atol=0)
    assert tu.philox_counters(3, 10) == 9
    # Both key sources run one kernel: a key tensor k with zero arguments equals the argument k.
    x_t = torch.zeros(2, 50, device=DEVICE)
    t = torch.full((2,), 500, device=DEVICE)
    table = schedule.table(torch.float32)
    key = torch.tensor([2**62 + 99], device=DEVICE)
    from_tensor = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, key, 0, 0)
    from_args = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, None, 2**62 + 99, 0)
    torch.testing.assert_close(from_tensor, from_args, rtol=0, atol=0)


def test_advance_philox_state():
    class PhiloxGenerator:  # the three methods torch's CUDA generator has
        def __init__(self, seed, offset):
            self.seed, self.offset = seed, offset

        def initial_seed(self):
            return self.seed

        def get_offset(self):
            return self.offset

        def set_offset(self, offset):
            self.offset = offset

    gen = PhiloxGenerator(2**64 - 1, 8)
    assert tu.advance_philox_state(gen, 5) == (-1, 8)
    assert gen.offset == 8 + 4 * 5
    assert tu.advance_philox_state(gen, 1) == (-1, 28)
    # CPU tensors never use host Philox state (the CPU generator is not Philox): a seed tensor is drawn.
    assert tu.host_philox_state(None, torch.zeros(1), 4) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_noise_other_dtypes(schedule, dtype):
    gen = torch.Generator(DEVICE).manual_seed(11)
    z = _standard_noise(schedule, (2, 2048), gen, dtype=dtype)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05


def test_noise_zero_at_t0(schedule):
    x_t, model_output = make_inputs((2, 9), 2, torch.float32)
    t = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    a = dk.p_sample(x_t, t, model_output, schedule, backend="triton")
    mean = R.p_mean_variance_ref(x_t, t, model_output, schedule)[0]
    torch.testing.assert_close(a, mean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ autograd
def _fp64_inputs(shape, n, seed=0):
    return [x.requires_grad_() for x in make_inputs(shape, n, torch.float64, seed)]


def test_gradcheck_q_sample(schedule):
    x_start, noise = _fp64_inputs((2, 3, 4), 2)
    t = make_t(2)
    assert torch.autograd.gradcheck(lambda a, b: dk.q_sample(a, t, b, schedule, backend="triton"), (x_start, noise))


def test_gradcheck_predict_start_from_noise(schedule):
    x_t, noise = _fp64_inputs((2, 5), 2)
    t = make_t(2)
    fn = lambda a, b: dk.predict_start_from_noise(a, t, b, schedule, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x_t, noise))


@pytest.mark.parametrize("op", MORE_PAIR_OPS)
def test_gradcheck_more_pair_ops(schedule, op):
    a, b = _fp64_inputs((2, 5), 2)
    t = make_t(2)
    fn = lambda a, b: getattr(dk, op)(*pair_args(op, a, b, t, schedule), backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


def test_gradcheck_q_posterior_mean(schedule):
    x_start, x_t = _fp64_inputs((2, 2, 3), 2)
    t = make_t(2)
    fn = lambda a, b: dk.q_posterior(a, b, t, schedule, backend="triton")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x_start, x_t))


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_gradcheck_diffusion_loss(schedule, parameterization, loss_type):
    """The fused loss differentiates w.r.t. model_output and, where the target depends on them, x_start
    (x0, v) and noise (eps, v): the same gradients as the reference."""
    model_output, x_start, noise = _fp64_inputs((2, 3), 3)
    t = make_t(2)

    def fn(m, a, b):
        loss, simple, vlb = dk.diffusion_loss(m, a, b, t, schedule, parameterization, loss_type, 0.7, 0.3, "triton")
        # Every output carries gradient, with different weights, so each output's backward is checked.
        return loss + 2 * simple + 3 * vlb

    assert torch.autograd.gradcheck(fn, (model_output, x_start, noise))


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_diffusion_loss_grads_match_reference(schedule, parameterization):
    """Which inputs get a gradient (None vs tensor) matches the reference, and the values match."""
    inputs = [x.requires_grad_() for x in make_inputs((3, 4, 5), 3, torch.float32)]
    t = make_t(3)
    grads = []
    for backend in ("triton", "reference"):
        for x in inputs:
            x.grad = None
        loss = dk.diffusion_loss(*inputs, t, schedule, parameterization, "l2", 1.0, 0.1, backend=backend)[0]
        loss.backward()
        grads.append([None if x.grad is None else x.grad.clone() for x in inputs])
    for g_fused, g_ref in zip(*grads):
        assert (g_fused is None) == (g_ref is None)
        if g_ref is not None:
            torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-7)


def test_diffusion_loss_backward_only_model_output(schedule):
    model_output = make_inputs((2, 6), 1, torch.float16)[0].requires_grad_()
    x_start, noise = make_inputs((2, 6), 2, torch.float16, seed=1)
    t = make_t(2)
    dk.diffusion_loss(model_output, x_start, noise, t, schedule, "v", backend="triton")[0].backward()
    ref = model_output.detach().clone().requires_grad_()
    dk.diffusion_loss(ref, x_start, noise, t, schedule, "v", backend="reference")[0].backward()
    assert model_output.grad.dtype == torch.float16
    torch.testing.assert_close(model_output.grad, ref.grad, rtol=2e-3, atol=1e-5)


def test_q_sample_backward_one_pass(schedule):
    grad = make_inputs((3, 4, 5), 1, torch.float32)[0]
    t = make_t(3)
    table = schedule.table(torch.float32)
    g_x, g_n = torch.ops.ddpm_kernels_triton.q_sample_backward(grad, t, table)
    a, b = R.extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, 3, torch.float32)
    torch.testing.assert_close(g_x, a * grad)
    torch.testing.assert_close(g_n, b * grad)


@pytest.mark.parametrize("op", ["p_mean_variance", "p_sample"])
def test_sampling_ops_have_no_backward(schedule, op):
    """Sampling ops are not differentiable in the fused backend: backward raises (forward still runs)."""
    x_t, model_output, noise = make_inputs((2, 5), 3, torch.float32)
    model_output.requires_grad_()
    t = make_t(2)
    fn = getattr(dk, op)
    out = fn(x_t, t, model_output, schedule, backend="triton", **({"noise": noise} if op == "p_sample" else {}))
    out = out[0] if isinstance(out, tuple) else out
    with pytest.raises(RuntimeError):
        out.sum().backward()


# ------------------------------------------------------------------------------- torch.library / compile
def _opcheck_cases(schedule, dtype):
    x, y, z = make_inputs((2, 3, 5), 3, dtype)
    t = make_t(2)
    table = schedule.table(dtype)
    seed = tu.draw_seed(None, x.device)
    ops = torch.ops.ddpm_kernels_triton
    return [
        (ops.q_sample, (x, t, y, table)),
        (ops.q_sample_out, (x, t, y, table, torch.empty_like(x))),
        (ops.q_sample_backward, (x, t, table)),
        (ops.predict_start_from_noise, (x, t, y, table)),
        (ops.predict_start_from_noise_backward, (x, t, table)),
        (ops.predict_noise_from_start, (x, t, y, table)),
        (ops.predict_noise_from_start_backward, (x, t, table)),
        (ops.get_v, (x, y, t, table)),
        (ops.get_v_backward, (x, t, table)),
        (ops.predict_start_from_z_and_v, (x, t, y, table)),
        (ops.predict_start_from_z_and_v_backward, (x, t, table)),
        (ops.predict_eps_from_z_and_v, (x, t, y, table)),
        (ops.predict_eps_from_z_and_v_backward, (x, t, table)),
        (ops.q_posterior, (x, y, t, table)),
        (ops.q_posterior_backward, (x, t, table)),
        (ops.p_mean_variance, (x, t, y, table, 2, True)),
        (ops.p_sample, (x, t, y, table, 0, True, z, None, 0, 0)),
        (ops.p_sample, (x, t, y, table, 1, False, None, seed, 0, 0)),
        (ops.p_sample, (x, t, y, table, 2, True, None, None, 2**62 + 3, 4 * 17)),
        (ops.p_sample_out, (x, t, y, table, 0, True, z, None, 0, 0, torch.empty_like(x))),
        (ops.diffusion_loss, (x, y, z, t, table, 2, False, 1.0, 0.5)),
        (
            ops.diffusion_loss_backward,
            (x.new_ones(()), x.new_ones(()), x.new_ones(()), x, y, z, t, table, 2, True, 1.0, 0.5, True, True),
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(schedule, dtype):
    for op, args in _opcheck_cases(schedule, dtype):
        torch.library.opcheck(op, args)


def test_opcheck_autograd_registration(schedule):
    x, y, z = (a.requires_grad_() for a in make_inputs((2, 3), 3, torch.float64))
    t = make_t(2)
    table = schedule.table(torch.float64)
    ops = torch.ops.ddpm_kernels_triton
    for op, args in [
        (ops.q_sample, (x, t, y, table)),
        (ops.predict_start_from_noise, (x, t, y, table)),
        (ops.predict_noise_from_start, (x, t, y, table)),
        (ops.get_v, (x, y, t, table)),
        (ops.predict_start_from_z_and_v, (x, t, y, table)),
        (ops.predict_eps_from_z_and_v, (x, t, y, table)),
        (ops.q_posterior, (x, y, t, table)),
        (ops.diffusion_loss, (x, y, z, t, table, 0, False, 1.0, 0.0)),
    ]:
        torch.library.opcheck(op, args)


def test_torch_compile_sampling_and_training_step(schedule):
    """One sampling step and one training step through every fused op, compiled with fullgraph=True (no
    graph break), match eager; the training step's backward runs through the registered autograd."""
    x_t, model_output, noise, x_start = make_inputs((2, 3, 4, 4), 4, torch.float32)
    t = make_t(2)

    def sampling_step(x_t, t, model_output, noise):
        mean, var, log_var = dk.p_mean_variance(x_t, t, model_output, schedule, "eps", True, backend="triton")
        x0 = dk.predict_start_from_noise(x_t, t, model_output, schedule, backend="triton")
        post = dk.q_posterior(x0.clamp(-1, 1), x_t, t, schedule, backend="triton")[0]
        x_prev = dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")
        drawn = dk.p_sample(x_t, t, model_output, schedule, backend="triton")  # in-kernel noise
        return mean, var, log_var, post, x_prev, drawn

    def training_step(x_start, noise, t, w):
        x_noisy = dk.q_sample(x_start, t, noise, schedule, backend="triton")
        model_output = x_noisy * w
        return dk.diffusion_loss(model_output, x_start, noise, t, schedule, "eps", "l2", 1.0, 0.1, backend="triton")

    eager = sampling_step(x_t, t, model_output, noise)
    compiled = torch.compile(sampling_step, fullgraph=True)(x_t, t, model_output, noise)
    for a, b in zip(eager[:5], compiled[:5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled[5].shape == x_t.shape and bool(compiled[5].isfinite().all())

    w = torch.full((), 0.5, device=DEVICE, requires_grad=True)
    x_s = x_start.clone().requires_grad_()
    loss_eager = training_step(x_s, noise, t, w)[0]
    g_eager = torch.autograd.grad(loss_eager, (w, x_s))
    loss_compiled = torch.compile(training_step, fullgraph=True)(x_s, noise, t, w)[0]
    g_compiled = torch.autograd.grad(loss_compiled, (w, x_s))
    torch.testing.assert_close(loss_eager, loss_compiled, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_eager, g_compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- dispatch
def test_backend_availability():
    assert tk.BACKEND.name == "triton"
    assert set(tk.BACKEND.ops) == set(R.OPS)  # every op has a Triton kernel
    assert set(tk.BACKEND.differentiable) <= set(tk.BACKEND.ops)
    assert tk.BACKEND.differentiable["q_sample"] == {"x_start", "noise"}
    assert tk.BACKEND.differentiable["get_v"] == {"x_start", "noise"}
    assert "p_sample" not in tk.BACKEND.differentiable and "ddim_step" not in tk.BACKEND.differentiable
    assert tk.BACKEND.declines("q_sample", None) is None
    assert tk.BACKEND.declines("ddim_step", StepOptions("ddim", eta=0.5)) is None
    assert tk.BACKEND.declines("ddim_step", StepOptions("euler")) is not None
    assert tk.BACKEND.unavailable_reason(torch.device(DEVICE), torch.float32) is None
    assert tk.BACKEND.unavailable_reason(torch.device(DEVICE), torch.int32) is not None
    assert tk.BACKEND.unavailable_reason(torch.device("meta"), torch.float32) is not None
    assert "triton" in dk.backends.available_backends(DEVICE)


def test_unfused_op_raises_for_explicit_backend(schedule, monkeypatch):
    """An op the backend has no kernel for (every op has one now: one is taken away here) raises for an explicit
    backend="triton" instead of running something else."""
    monkeypatch.delitem(tk.BACKEND.ops, "get_v")
    for key in list(dk.backends._selected):  # the dispatch cache (the public ops hold the same dict)
        monkeypatch.delitem(dk.backends._selected, key)
    x, y = make_inputs((2, 3), 2, torch.float32)
    with pytest.raises(dk.backends.BackendUnavailableError):
        dk.get_v(x, y, make_t(2), schedule, backend="triton")
