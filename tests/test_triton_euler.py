"""Triton Euler steps on a sigma table (``euler_step``, ``euler_ancestral_step``) against the reference, on CPU
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU) or on a GPU.
``tests/test_euler.py`` checks every dtype, prediction type and guidance against the reference; here is what is
Triton's own: the in-kernel table gather (NaN for a bad step index), the per-sample churn decision against
bounds passed exactly, in-kernel Philox noise (reproducible, the flow step's stream, the step it gives equal to
the step with that noise passed in), out= and in-place steps, channels_last, the x0 output, opcheck of the custom
ops, torch.compile(fullgraph=True).

Tolerances are docs/design.md's "Tolerances" (tests/helpers.assert_matches).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import reference as R
from ddpm_kernels._spec import EulerStepOptions
from helpers import DTYPES, assert_compiles_like_eager, triton_device

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import euler as te  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)
ops = torch.ops.ddpm_kernels_triton
STEPS = (dk.euler_step, dk.euler_ancestral_step)
EULER, ANCESTRAL = te.SAMPLER_ID["euler"], te.SAMPLER_ID["euler_ancestral"]
EPS, X0, V = (tu.PARAMETERIZATION_ID[p] for p in ("eps", "x0", "v"))


def _table(dtype=torch.float32):
    """A Karras-like table (descending to 0) whose sigmas are not float32 numbers: float64 tables compare them
    exactly."""
    sigmas = torch.tensor([14.61, 7.3125, 3.1, 1.2345678901234567, 0.4567891234567891, 0.12345678901234567, 0.0],
                          dtype=torch.float64)
    return sigmas.to(dtype).to(DEVICE)


def _index(batch):
    return torch.arange(batch, device=DEVICE) % 6


def _ref(step):
    return partial(step, backend="reference")


def test_registered_in_backend():
    import inspect

    for name in ("euler_step", "euler_ancestral_step"):
        assert tk.BACKEND.ops[name] is te.euler_step
        assert inspect.signature(tk.BACKEND.ops[name]) == inspect.signature(R.OPS[name])
        assert name not in tk.BACKEND.differentiable
    for opts in (EulerStepOptions("euler", "v", s_churn=1.0, guided=True, guidance_rescale=0.5),
                 EulerStepOptions("euler_ancestral", "x0", return_pred_x0=True)):
        assert tk.BACKEND.declines("euler_step", opts) is None


def test_split_float3_is_exact():
    for value in (0.1, 1.2345678901234567, -3.3e-7, 14.61, 1e30, 2.0 ** -100 * 3):
        hi, mid, lo = tu.split_float3(value)
        assert hi + mid + lo == value and hi == float(torch.tensor(value, dtype=torch.float32))
    assert tu.split_float3(math.inf) == (math.inf, 0.0, 0.0)
    assert tu.split_float3(-1e300) == (-math.inf, 0.0, 0.0)


def test_bad_index_is_nan():
    """An index outside [0, len - 1) gives NaN for its sample only (step and x0), never an out-of-bounds read
    (the public ops reject such indices on the CPU, so the operator is called directly)."""
    x, c, z = make_inputs((5, 3, 4), 3, torch.float32, seed=1)
    sigmas = _table()
    index = torch.tensor([-1, 0, 6, 5, 2**40], device=DEVICE)
    bad = torch.tensor([True, False, True, False, True], device=DEVICE)
    for sampler, opts in ((EULER, EulerStepOptions("euler", "v", s_churn=3.0, return_pred_x0=True)),
                          (ANCESTRAL, EulerStepOptions("euler_ancestral", "eps", return_pred_x0=True))):
        churn = min(opts.s_churn / 6, 2 ** 0.5 - 1)
        got = ops.euler_step(x, c, None, None, sigmas, index, sampler, tu.PARAMETERIZATION_ID[opts.parameterization],
                             churn, 0.0, math.inf, 1.0, 0.0, True, z, None, 0, 0, 0)
        expected = R.euler_step_ref(x, c, None, None, sigmas, index, opts, noise=z)
        for g, e in zip(got, expected, strict=True):
            assert bool(g[bad].isnan().all()) and bool(g[~bad].isfinite().all())
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_churn_only_inside_bounds(dtype):
    """Churn is decided per sample on the device: samples with s_tmin <= sigma <= s_tmax (bounds inclusive, equal
    to table sigmas that need all 53 bits in float64) get it, the others take the plain Euler step."""
    sigmas = _table(dtype)
    s_tmin, s_tmax = float(sigmas[4]), float(sigmas[1])
    if dtype == torch.float64:
        # two float32 parts would move these bounds off the sigmas they equal
        assert sum(tu.split_float(s_tmin)) != s_tmin or sum(tu.split_float(s_tmax)) != s_tmax
    x, v, z = make_inputs((6, 2, 3, 5), 3, dtype, seed=2)
    x = x * 4
    index = _index(6)
    inside = torch.tensor([False, True, True, True, True, False], device=DEVICE)
    kw = dict(noise=z, s_churn=4.0, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.01, return_pred_x0=True)
    got = dk.euler_step(x, v, sigmas, index, "v_prediction", backend="triton", **kw)
    assert_matches(got, _ref(dk.euler_step), (x, v, sigmas, index, "v_prediction"), kw, dtype)
    plain = dk.euler_step(x, v, sigmas, index, "v_prediction", backend="triton", noise=z, return_pred_x0=True)
    for g, p in zip(got, plain):
        torch.testing.assert_close(g[~inside], p[~inside], rtol=0, atol=0)
        assert bool(((g - p)[inside].flatten(1).abs().amax(1) > 1e-3).all())
    # the bounds just past the sigmas they were: those samples leave the churn window
    narrower = dict(kw, s_tmin=math.nextafter(s_tmin, math.inf), s_tmax=math.nextafter(s_tmax, -math.inf))
    got = dk.euler_step(x, v, sigmas, index, "v_prediction", backend="triton", **narrower)
    assert_matches(got, _ref(dk.euler_step), (x, v, sigmas, index, "v_prediction"), narrower, dtype)
    if dtype == torch.float64:
        edges = torch.tensor([1, 4], device=DEVICE)
        torch.testing.assert_close(got[0][edges], plain[0][edges], rtol=0, atol=0)


# -------------------------------------------------------------------------------------- in-kernel noise
def _drawn_ancestral(shape, generator, dtype=torch.float32):
    """z of an ancestral step with zero sample and x0 prediction (x' = sigma_up z), sample b at step b % 6."""
    zero = torch.zeros(shape, device=DEVICE, dtype=dtype)
    sigmas, index = _table(), _index(shape[0])
    got = dk.euler_ancestral_step(zero, zero, sigmas, index, "sample", generator=generator, backend="triton")
    s, s_next = (t.double().reshape((-1,) + (1,) * (len(shape) - 1)) for t in R._gather_sigmas(sigmas, index, 1,
                                                                                                 torch.float64))
    s_up = torch.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    return got.double() / s_up


def _drawn_churn(shape, generator):
    """z of an Euler step with churn on every sample, zero sample and model output: x0 = s_noise
    sqrt(sigma_hat^2 - sigma^2) z."""
    zero = torch.zeros(shape, device=DEVICE)
    sigmas, index = _table(), torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
    _, x0 = dk.euler_step(zero, zero, sigmas, index, generator=generator, s_churn=60.0, s_noise=2.0,
                          return_pred_x0=True, backend="triton")
    s = float(sigmas[0])
    return x0.double() / (2.0 * s * math.sqrt((1 + (2 ** 0.5 - 1)) ** 2 - 1))


def test_noise_reproducible_and_fresh():
    gen = torch.Generator(DEVICE).manual_seed(7)
    shape = (5, 3, 7)
    for draw in (_drawn_ancestral, _drawn_churn):
        a = draw(shape, gen.manual_seed(7))
        b = draw(shape, gen)
        torch.testing.assert_close(draw(shape, gen.manual_seed(7)), a, rtol=0, atol=0)
        assert (a - b).abs().mean() > 0.5, "consecutive steps draw fresh noise"
        assert not torch.equal(a[0], a[1])
        assert abs(a.mean().item()) < 0.25 and abs(a.std().item() - 1) < 0.25


def test_noise_is_the_flow_step_stream():
    """Ancestral and churn noise is the stream the flow step (and p_sample) draws from the same generator state."""
    shape = (4, 2, 9)
    gen = torch.Generator(DEVICE)
    zero = torch.zeros(shape, device=DEVICE)
    ones = torch.ones(shape[0], device=DEVICE)
    flow = dk.flow_step(zero, zero, sigma=ones * 0.5, sigma_next=ones, stochastic=True,
                        generator=gen.manual_seed(3), backend="triton").double()
    torch.testing.assert_close(_drawn_ancestral(shape, gen.manual_seed(3)), flow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_drawn_churn(shape, gen.manual_seed(3)), flow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_drawn_noise_step_equals_step_with_that_noise(step):
    """The step with in-kernel noise is the step with that noise passed in (recovered from a zero-input step on
    the same generator state), on non-trivial inputs, guided."""
    shape = (4, 3, 5)
    x, c, u = make_inputs(shape, 3, torch.float32, seed=4)
    sigmas, index = _table(), torch.tensor([0, 1, 2, 0], device=DEVICE)
    churn = dict(s_churn=60.0, s_noise=2.0) if step is dk.euler_step else {}
    gen = torch.Generator(DEVICE)
    if step is dk.euler_step:
        z = _drawn_churn(shape, gen.manual_seed(5))
    else:
        z = _drawn_ancestral(shape, gen.manual_seed(5))
    kw = dict(churn, uncond=u, guidance_scale=torch.tensor([1.0, 2.0, 4.0, 7.5], device=DEVICE),
              guidance_rescale=0.3)
    drawn = step(x * 5, c, sigmas, index, "epsilon", generator=gen.manual_seed(5), backend="triton", **kw)
    given = step(x * 5, c, sigmas, index, "epsilon", noise=z.float(), backend="triton", **kw)
    torch.testing.assert_close(drawn, given, rtol=1e-5, atol=1e-4)


def test_step_without_noise_leaves_generator_alone():
    x, c = make_inputs((2, 8), 2, torch.float32, seed=6)
    gen = torch.Generator(DEVICE).manual_seed(1)
    state = gen.get_state()
    z = torch.full_like(x, float("nan"))  # not read: the step has no noise term
    got = dk.euler_step(x, c, _table(), _index(2), noise=z, generator=gen, backend="triton")
    assert torch.equal(gen.get_state(), state) and bool(got.isfinite().all())
    dk.euler_step(x, c, _table(), _index(2), generator=gen, s_churn=1.0, backend="triton")
    assert not torch.equal(gen.get_state(), state)


# ---------------------------------------------------------------------------------------- layouts, out=
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last(step, dtype):
    x, c, u, z = (t.contiguous(memory_format=torch.channels_last)
                  for t in make_inputs((3, 4, 5, 3), 4, dtype, seed=7))
    churn = dict(s_churn=3.0, s_tmax=5.0) if step is dk.euler_step else {}
    kw = dict(churn, noise=z, return_pred_x0=True, uncond=u, guidance_scale=3.0, guidance_rescale=0.7)
    got = step(x * 3, c, _table(), _index(3), "v_prediction", backend="triton", **kw)
    for g in got:
        assert g.stride() == x.stride() and g.dtype == dtype
    assert_matches(got, _ref(step), (x * 3, c, _table(), _index(3), "v_prediction"), kw, dtype)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("return_pred_x0", [False, True])
def test_out_and_in_place(step, return_pred_x0):
    x, c, z = (t.contiguous(memory_format=torch.channels_last) for t in make_inputs((2, 3, 4, 5), 3,
                                                                                    torch.float32, seed=8))
    sigmas, index = _table(), _index(2)
    churn = dict(s_churn=2.0) if step is dk.euler_step else {}
    kw = dict(churn, noise=z, return_pred_x0=return_pred_x0)
    expected = step(x, c, sigmas, index, "epsilon", backend="reference", **kw)
    y = x.clone()
    got = step(y, c, sigmas, index, "epsilon", backend="triton", out=y, **kw)
    other = torch.empty(x.shape, device=DEVICE)  # contiguous out for channels_last data
    got_other = step(x, c, sigmas, index, "epsilon", backend="triton", out=other, **kw)
    if return_pred_x0:
        assert got[0] is y and got_other[0] is other
        for g in (got[1], got_other[1]):
            torch.testing.assert_close(g, expected[1], rtol=1e-5, atol=1e-5)
        expected = expected[0]
    else:
        assert got is y and got_other is other
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, expected, rtol=1e-5, atol=1e-5)


def test_batched_cond_uncond_and_strided_inputs():
    """A (2B, ...) [uncond; cond] output (two views) and strided data are read correctly; sampling only: inputs
    that require grad run detached."""
    x = make_inputs((3, 8, 5), 1, torch.float32, seed=9)[0][:, ::2]
    both = torch.cat(make_inputs((3, 4, 5), 2, torch.float32, seed=10))
    kw = dict(guidance_scale=torch.tensor([2.0, 6.0, 1.0], device=DEVICE), guidance_rescale=0.5, s_churn=1.0,
              noise=x * 0.5)
    expected = dk.euler_step(x, both, _table(), _index(3), backend="reference", **kw)
    got = dk.euler_step(x, both.clone().requires_grad_(), _table(), _index(3), backend="triton", **kw)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x = torch.zeros(0, 3, device=DEVICE)
    index = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    got, x0 = dk.euler_ancestral_step(x, x, _table(), index, return_pred_x0=True, backend="triton")
    assert got.shape == x0.shape == x.shape


# ----------------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases(dtype):
    x, c, u, z = make_inputs((2, 3, 5), 4, dtype, seed=11)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    sigmas, index = _table(cd), torch.tensor([0, 4], device=DEVICE)
    w = torch.tensor([2.0, 5.0], dtype=cd, device=DEVICE)
    key = torch.tensor([123456789], device=DEVICE)
    nhwc = [t.contiguous(memory_format=torch.channels_last) for t in make_inputs((2, 3, 2, 4), 3, dtype, seed=12)]
    return [
        (ops.euler_step, (x, c, None, None, sigmas, index, EULER, EPS, 0.0, 0.0, math.inf, 1.0, 0.0, False, None,
                          None, 0, 0, 0)),
        (ops.euler_step, (x, c, u, w, sigmas, index, EULER, V, 0.3, 0.2, 5.0, 1.01, 0.7, True, z, None, 0, 0, 0)),
        (ops.euler_step, (x, c, None, None, sigmas, index, EULER, X0, 0.1, 0.0, math.inf, 1.0, 0.0, True, None, key,
                          0, 0, 0)),
        (ops.euler_step, (*nhwc[:2], None, None, sigmas, index, ANCESTRAL, V, 0.0, 0.0, math.inf, 1.0, 0.0, True,
                          None, None, 2**62 + 3, 4 * 17, 0)),
        (ops.euler_step, (x, c, u, w, sigmas, index, ANCESTRAL, EPS, 0.0, 0.0, math.inf, 1.0, 0.5, False, z, None,
                          0, 0, 0)),
        (ops.euler_step_out, (x, c, u, w, sigmas, index, ANCESTRAL, X0, 0.0, 0.0, math.inf, 1.0, 0.0, True, z,
                              None, 0, 0, 0, torch.empty_like(x))),
        (ops.euler_step_out, (*nhwc[:2], None, None, sigmas, index, EULER, EPS, 0.2, 0.0, 3.0, 1.0, 0.0, False,
                              nhwc[2], None, 0, 0, 0, torch.empty(nhwc[0].shape, dtype=dtype, device=DEVICE))),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    for op, args in _opcheck_cases(dtype):
        torch.library.opcheck(op, args)


def test_torch_compile():
    """The public ops compile with fullgraph=True and match eager (in-place steps exactly); drawn noise compiles
    to a step of the right shape."""
    x, c, u, z = make_inputs((2, 3, 4, 4), 4, torch.float32, seed=13)
    sigmas, index = _table(), _index(2)

    def run(x, c, u, z):
        a = dk.euler_step(x, c, sigmas, index, "v_prediction", noise=z, s_churn=3.0, s_tmin=0.3, s_tmax=10.0,
                          return_pred_x0=True, backend="triton")
        b = dk.euler_ancestral_step(x, c, sigmas, index, noise=z, guidance_scale=3.0, uncond=u, guidance_rescale=0.7,
                                    backend="triton")
        y = x.clone()
        dk.euler_ancestral_step(y, c, sigmas, index, "sample", noise=z, backend="triton", out=y)
        drawn = dk.euler_ancestral_step(x, c, sigmas, index, backend="triton")
        return a[0], a[1], b, y, drawn

    assert_compiles_like_eager(run, (x, c, u, z), exact=(3,), drawn=4)
