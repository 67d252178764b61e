"""What is specific to the compiled backends' Euler steps on a sigma table (``euler_step``,
``euler_ancestral_step``: the flow step's kernels with an Euler sampler, csrc/flow.h, csrc/cpu/flow.cpp,
csrc/cuda/flow.cu): dispatch serves them without a fallback warning; the in-kernel table gather (NaN for a bad
step index, no read outside the table); the per-sample churn window against bounds compared exactly for float64
tables; guidance with its rescale; in-kernel Philox noise (the flow step's stream and generator bookkeeping, a
step without noise leaving the generator alone); out= and in-place steps, channels_last, the x0 output; opcheck
of the four operators and torch.compile(fullgraph=True) with the operators in the graph.
``tests/test_euler.py`` checks every dtype, prediction type and guidance against the reference on every fused
backend.

Values are compared with ``ddpm_kernels.reference`` through the public ops (docs/design.md, "Tolerances").
"""

import math
import warnings

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels import reference as R
from ddpm_kernels._spec import EulerStepOptions
from helpers import DEVICES, DTYPES, assert_matches, compiled_family, device_backend, make_inputs

extension, pytestmark = compiled_family("euler_step", "with the Euler steps")

STEPS = (dk.euler_step, dk.euler_ancestral_step)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
ops = torch.ops.ddpm_kernels


def _table(device, dtype=torch.float32):
    """A Karras-like table (descending to 0) whose sigmas are not float32 numbers: float64 tables compare them
    exactly."""
    sigmas = torch.tensor([14.61, 7.3125, 3.1, 1.2345678901234567, 0.4567891234567891, 0.12345678901234567, 0.0],
                          dtype=torch.float64)
    return sigmas.to(dtype).to(device)


def _index(batch, device):
    return torch.arange(batch, device=device) % 6


def _churn(step, **kw):
    return dict(kw, s_churn=kw.get("s_churn", 3.0)) if step is dk.euler_step else {}


# ------------------------------------------------------------------------------------------- dispatch
def test_served_without_a_warning():
    for name in ("euler_step", "euler_ancestral_step"):
        assert extension.CPU_BACKEND.ops[name] is extension.euler_step
        assert name not in extension.CPU_BACKEND.differentiable
        for opts in (EulerStepOptions(name[: -len("_step")], "v", guided=True, guidance_rescale=0.5),
                     EulerStepOptions(name[: -len("_step")], "x0", return_pred_x0=True)):
            assert extension.CPU_BACKEND.declines(name, opts) is None
            for backend in ("cpu", "auto"):
                served, _ = backends.resolve(name, backend, torch.device("cpu"), torch.float32, opts, None)
                assert served == "cpu", (name, backend)
    x, v = make_inputs((2, 3, 4), 2, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dk.euler_step(x, v, _table("cpu"), _index(2, "cpu"), s_churn=1.0, backend="cpu")
        dk.euler_ancestral_step(x, v, _table("cpu"), _index(2, "cpu"), "sample", backend="auto")


# ---------------------------------------------------------------------------------------------- values
RESCALE_SHAPES = [(3, 4, 9, 11), (2, 33), (5, 3, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_guided_with_rescale_matches_reference(device, dtype, step):
    """The guidance rescale's reduction pass before the Euler samplers, per-sample scales and step indices, odd
    shapes, every prediction type."""
    backend = device_backend(device)
    sigmas = _table(device)
    for shape in RESCALE_SHAPES:
        x, c, u, z = make_inputs(shape, 4, dtype, device=device, seed=shape[0])
        index = _index(shape[0], device)
        for prediction_type in PREDICTIONS:
            kw = dict(_churn(step, s_tmin=0.3, s_tmax=8.0), noise=z, return_pred_x0=True, uncond=u,
                      guidance_scale=torch.linspace(1, 7, shape[0], device=device), guidance_rescale=0.6)
            got = step(x * 3, c, sigmas, index, prediction_type, backend=backend, **kw)
            assert_matches(got, lambda *a, **k: step(*a, **k, backend="reference"),
                           (x * 3, c, sigmas, index, prediction_type), kw, dtype)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_unguided_cpu_step_is_the_float32_reference_exactly(step):
    """Every product is rounded before its sum, in the reference's order: on the first step of a
    zero-terminal-SNR table (sigma = 4096, where x + d (sigma' - sigma) cancels to a few thousandths of x) the CPU
    step is the float32 reference bit for bit, every prediction type, with churn."""
    x, v, z = make_inputs((3, 4, 37), 3, torch.float32, seed=15)
    x = x * 4096
    sigmas = torch.tensor([4096.0, 13.766, 5.398, 0.0])
    index = torch.tensor([0, 1, 0])
    for prediction_type in PREDICTIONS:
        kw = dict(_churn(step, s_churn=1.0), noise=z, return_pred_x0=True)
        got = step(x, v, sigmas, index, prediction_type, backend="cpu", **kw)
        expected = step(x, v, sigmas, index, prediction_type, backend="reference", **kw)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_index_is_nan(device):
    """An index outside [0, len - 1) gives NaN for its sample only (step and x0), never a read outside the table
    (the public ops refuse such CPU indices, so the operators are called directly)."""
    device_backend(device)
    x, c, z = make_inputs((5, 3, 4), 3, torch.float32, seed=1, device=device)
    sigmas = _table(device)
    index = torch.tensor([-1, 0, 6, 5, 2**40], device=device)
    bad = torch.tensor([True, False, True, False, True], device=device)
    for opts in (EulerStepOptions("euler", "v", s_churn=3.0, return_pred_x0=True),
                 EulerStepOptions("euler_ancestral", "eps", return_pred_x0=True)):
        if opts.sampler == "euler":
            got = ops.euler_step(x, c, None, None, sigmas, index, "v", 3.0, 0.0, math.inf, 1.0, 0.0, z, None, 0, True)
        else:
            got = ops.euler_ancestral_step(x, c, None, None, sigmas, index, "eps", 0.0, z, None, 0, True)
        expected = R.euler_step_ref(x, c, None, None, sigmas, index, opts, noise=z)
        for g, e in zip(got, expected, strict=True):
            assert bool(g[bad].isnan().all()) and bool(g[~bad].isfinite().all())
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, equal_nan=True)
    with pytest.raises(ValueError, match="step_index"):
        dk.euler_step(x.cpu(), c.cpu(), sigmas.cpu(), index.cpu(), backend="cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_churn_only_inside_bounds(device, dtype):
    """Churn is decided per sample in the kernel: samples with s_tmin <= sigma <= s_tmax (bounds inclusive, equal
    to table sigmas that need all 53 bits in float64) get it, the others take the plain Euler step."""
    backend = device_backend(device)
    sigmas = _table(device, dtype)
    s_tmin, s_tmax = float(sigmas[4]), float(sigmas[1])
    x, v, z = make_inputs((6, 2, 3, 5), 3, dtype, seed=2, device=device)
    x = x * 4
    index = _index(6, device)
    inside = torch.tensor([False, True, True, True, True, False], device=device)
    kw = dict(noise=z, s_churn=4.0, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.01, return_pred_x0=True)
    got = dk.euler_step(x, v, sigmas, index, "v_prediction", backend=backend, **kw)
    ref = lambda *a, **k: dk.euler_step(*a, **k, backend="reference")  # noqa: E731
    assert_matches(got, ref, (x, v, sigmas, index, "v_prediction"), kw, dtype)
    plain = dk.euler_step(x, v, sigmas, index, "v_prediction", backend=backend, noise=z, return_pred_x0=True)
    for g, p in zip(got, plain):
        torch.testing.assert_close(g[~inside], p[~inside], rtol=0, atol=0)
        assert bool(((g - p)[inside].flatten(1).abs().amax(1) > 1e-3).all())
    # the bounds just past the sigmas they were: those samples leave the churn window
    narrower = dict(kw, s_tmin=math.nextafter(s_tmin, math.inf), s_tmax=math.nextafter(s_tmax, -math.inf))
    got = dk.euler_step(x, v, sigmas, index, "v_prediction", backend=backend, **narrower)
    assert_matches(got, ref, (x, v, sigmas, index, "v_prediction"), narrower, dtype)
    if dtype == torch.float64:
        edges = torch.tensor([1, 4], device=device)
        torch.testing.assert_close(got[0][edges], plain[0][edges], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- noise
def _gen(device, seed):
    return torch.Generator(device).manual_seed(seed)


def _flow_noise(shape, device, generator):
    """z of a stochastic flow step, exactly: sigma = 0, sigma_next = 1 gives 0 * x0 + 1 * z."""
    zero = torch.zeros(shape, device=device)
    ones = torch.ones(shape[0], device=device)
    return dk.flow_step(zero, zero, sigma=ones * 0, sigma_next=ones, stochastic=True, generator=generator,
                        backend=device)


def _drawn_ancestral(shape, device, generator):
    """z of an ancestral step with zero sample and x0 prediction (x' = sigma_up z), sample b at step b % 6."""
    zero = torch.zeros(shape, device=device)
    sigmas, index = _table(device), _index(shape[0], device)
    got = dk.euler_ancestral_step(zero, zero, sigmas, index, "sample", generator=generator, backend=device)
    s, s_next = (t.reshape((-1,) + (1,) * (len(shape) - 1))
                 for t in R._gather_sigmas(sigmas, index, 1, torch.float64))
    return got.double() / torch.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)


def _drawn_churn(shape, device, generator):
    """z of an Euler step with churn on every sample, zero sample and model output: x0 = s_noise
    sqrt(sigma_hat^2 - sigma^2) z."""
    zero = torch.zeros(shape, device=device)
    sigmas, index = _table(device), torch.zeros(shape[0], dtype=torch.int64, device=device)
    _, x0 = dk.euler_step(zero, zero, sigmas, index, generator=generator, s_churn=60.0, s_noise=2.0,
                          return_pred_x0=True, backend=device)
    return x0.double() / (2.0 * float(sigmas[0]) * math.sqrt(2.0 - 1))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_the_flow_step_stream(device):
    """Ancestral and churn noise is the stream the stochastic flow step (and p_sample) draws from the same
    generator state, for per-sample sizes that are and are not multiples of 4."""
    device_backend(device)
    for shape in ((4, 2, 9), (3, 4, 8)):
        flow = _flow_noise(shape, device, _gen(device, 3)).double()
        torch.testing.assert_close(_drawn_ancestral(shape, device, _gen(device, 3)), flow, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_drawn_churn(shape, device, _gen(device, 3)), flow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_reproducible_fresh_and_advancing_as_the_flow_step(device):
    """The same generator state draws the same noise; consecutive steps draw fresh noise; every drawing step
    (an empty batch included) advances the generator exactly as one stochastic flow step does."""
    device_backend(device)
    shape = (5, 3, 7)
    for draw in (_drawn_ancestral, _drawn_churn):
        gen = _gen(device, 7)
        a = draw(shape, device, gen)
        b = draw(shape, device, gen)
        torch.testing.assert_close(draw(shape, device, _gen(device, 7)), a, rtol=0, atol=0)
        assert (a - b).abs().mean() > 0.5, "consecutive steps draw fresh noise"
        assert not torch.equal(a[0], a[1])
        assert abs(a.mean().item()) < 0.25 and abs(a.std().item() - 1) < 0.25
        for batch in (shape, (0, 3)):
            g_euler, g_flow = _gen(device, 11), _gen(device, 11)
            draw(batch, device, g_euler)
            _flow_noise(batch, device, g_flow)
            assert torch.equal(g_euler.get_state(), g_flow.get_state())


@pytest.mark.parametrize("device", DEVICES)
def test_step_without_noise_leaves_generator_alone(device):
    device_backend(device)
    x, c = make_inputs((2, 8), 2, torch.float32, seed=6, device=device)
    gen = _gen(device, 1)
    state = gen.get_state()
    z = torch.full_like(x, float("nan"))  # not read: the step has no noise term
    got = dk.euler_step(x, c, _table(device), _index(2, device), noise=z, generator=gen, backend=device)
    assert torch.equal(gen.get_state(), state) and bool(got.isfinite().all())
    dk.euler_step(x, c, _table(device), _index(2, device), generator=gen, s_churn=1.0, backend=device)
    assert not torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_drawn_noise_step_equals_step_with_that_noise(device, step):
    """The step with in-kernel noise is the step with that noise passed in (recovered from a zero-input step on
    the same generator state), on non-trivial inputs, guided with rescale; sample_offset shifts the rows."""
    device_backend(device)
    shape = (4, 3, 5)
    x, c, u = make_inputs(shape, 3, torch.float32, seed=4, device=device)
    sigmas, index = _table(device), torch.tensor([0, 1, 2, 0], device=device)
    if step is dk.euler_step:
        churn, z = dict(s_churn=60.0, s_noise=2.0), _drawn_churn(shape, device, _gen(device, 5))
    else:
        churn, z = {}, _drawn_ancestral(shape, device, _gen(device, 5))
    kw = dict(churn, uncond=u, guidance_scale=torch.tensor([1.0, 2.0, 4.0, 7.5], device=device),
              guidance_rescale=0.3)
    drawn = step(x * 5, c, sigmas, index, "epsilon", generator=_gen(device, 5), backend=device, **kw)
    given = step(x * 5, c, sigmas, index, "epsilon", noise=z.float(), backend=device, **kw)
    torch.testing.assert_close(drawn, given, rtol=1e-5, atol=1e-4)
    # sample_offset: a batch cut in two draws what the whole batch draws
    x8, c8 = make_inputs((8, 2, 5), 2, torch.float32, seed=14, device=device)
    index8 = _index(8, device)
    whole = step(x8, c8, sigmas, index8, generator=_gen(device, 9), backend=device, **churn)
    half = step(x8[4:], c8[4:], sigmas, index8[4:], generator=_gen(device, 9), sample_offset=4, backend=device,
                **churn)
    torch.testing.assert_close(half, whole[4:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- layouts, out=
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last(device, step, dtype):
    device_backend(device)
    x, c, u, z = (t.contiguous(memory_format=torch.channels_last)
                  for t in make_inputs((3, 4, 5, 3), 4, dtype, seed=7, device=device))
    sigmas, index = _table(device), _index(3, device)
    kw = dict(_churn(step, s_tmax=5.0), noise=z, return_pred_x0=True, uncond=u, guidance_scale=3.0,
              guidance_rescale=0.7)
    got = step(x * 3, c, sigmas, index, "v_prediction", backend=device, **kw)
    for g in got:
        assert g.stride() == x.stride() and g.dtype == dtype
    assert_matches(got, lambda *a, **k: step(*a, **k, backend="reference"),
                   (x * 3, c, sigmas, index, "v_prediction"), kw, dtype)
    # drawn noise is the element order of the contiguous sample whatever the layout
    kw = dict(_churn(step), return_pred_x0=True)
    nhwc = step(x, c, sigmas, index, generator=_gen(device, 2), backend=device, **kw)
    nchw = step(x.contiguous(), c.contiguous(), sigmas, index, generator=_gen(device, 2), backend=device, **kw)
    for a, b in zip(nhwc, nchw):
        assert a.stride() == x.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("return_pred_x0", [False, True])
def test_out_and_in_place(device, step, return_pred_x0):
    device_backend(device)
    x, c, z = (t.contiguous(memory_format=torch.channels_last)
               for t in make_inputs((2, 3, 4, 5), 3, torch.float32, seed=8, device=device))
    sigmas, index = _table(device), _index(2, device)
    kw = dict(_churn(step, s_churn=2.0), noise=z, return_pred_x0=return_pred_x0)
    expected = step(x, c, sigmas, index, "epsilon", backend="reference", **kw)
    fused = step(x, c, sigmas, index, "epsilon", backend=device, **kw)
    y = x.clone()
    got = step(y, c, sigmas, index, "epsilon", backend=device, out=y, **kw)
    other = torch.empty(x.shape, device=device)  # a contiguous out for channels_last data: written through a copy
    got_other = step(x, c, sigmas, index, "epsilon", backend=device, out=other, **kw)
    if return_pred_x0:
        assert got[0] is y and got_other[0] is other
        for g in (got[1], got_other[1]):
            torch.testing.assert_close(g, fused[1], rtol=0, atol=0)
            torch.testing.assert_close(g, expected[1], rtol=1e-5, atol=1e-5)
        expected, fused = expected[0], fused[0]
    else:
        assert got is y and got_other is other
    for result in (y, other):
        torch.testing.assert_close(result, fused, rtol=0, atol=0)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_cond_uncond_and_inputs_that_require_grad(device):
    """A (2B, ...) [uncond; cond] output is the step with uncond= given; sampling only: inputs that require grad
    run detached."""
    device_backend(device)
    x = make_inputs((3, 8, 5), 1, torch.float32, seed=9, device=device)[0][:, ::2]
    uncond, cond = make_inputs((3, 4, 5), 2, torch.float32, seed=10, device=device)
    kw = dict(guidance_scale=torch.tensor([2.0, 6.0, 1.0], device=device), guidance_rescale=0.5, s_churn=1.0,
              noise=x * 0.5)
    sigmas, index = _table(device), _index(3, device)
    expected = dk.euler_step(x, cond, sigmas, index, uncond=uncond, backend="reference", **kw)
    got = dk.euler_step(x, torch.cat([uncond, cond]).requires_grad_(), sigmas, index, backend=device, **kw)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    device_backend(device)
    x = torch.zeros(0, 3, device=device)
    index = torch.zeros(0, dtype=torch.int64, device=device)
    got, x0 = dk.euler_ancestral_step(x, x, _table(device), index, return_pred_x0=True, backend=device)
    assert got.shape == x0.shape == x.shape


def test_operator_argument_checks():
    x, c = make_inputs((2, 3), 2, torch.float32)
    sigmas, index = _table("cpu"), _index(2, "cpu")
    w = torch.tensor([2.0, 3.0])
    inf = math.inf
    for call, message in [
        (lambda: ops.euler_step(x, c, None, None, sigmas, index, "eps", -1.0, 0.0, inf, 1.0, 0.0, None, None, 0,
                                False), "s_churn"),
        (lambda: ops.euler_step(x, c, None, None, sigmas, index, "eps", 1.0, math.nan, inf, 1.0, 0.0, None, None, 0,
                                False), "s_tmin"),
        (lambda: ops.euler_step(x, c, None, None, sigmas, index, "eps", 1.0, 0.0, inf, inf, 0.0, None, None, 0,
                                False), "s_noise"),
        (lambda: ops.euler_ancestral_step(x, c, None, None, sigmas.double(), index, "eps", 0.0, None, None, 0,
                                          False), "sigmas"),
        (lambda: ops.euler_ancestral_step(x, c, None, None, sigmas, index.int(), "eps", 0.0, None, None, 0, False),
         "step_index"),
        (lambda: ops.euler_ancestral_step(x, c, c, None, sigmas, index, "eps", 0.0, None, None, 0, False),
         "uncond and guidance"),
        (lambda: ops.euler_ancestral_step(x, c, None, None, sigmas, index, "eps", 0.5, None, None, 0, False),
         "guidance_rescale"),
        (lambda: ops.euler_ancestral_step(x, c, c, w, sigmas, index, "score", 0.0, None, None, 0, False),
         "parameterization"),
        (lambda: ops.euler_ancestral_step(x, c, None, None, sigmas, index, "eps", 0.0, None, None, -1, False),
         "sample_offset"),
    ]:
        with pytest.raises((RuntimeError, ValueError), match=message):
            call()


# ------------------------------------------------------------------------------- opcheck, compile
def _operator_cases(device, dtype):
    x, c, u, z = make_inputs((2, 3, 5), 4, dtype, seed=11, device=device)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    sigmas, index = _table(device, cd), torch.tensor([0, 4], device=device)
    w = torch.tensor([2.0, 5.0], dtype=cd, device=device)
    nhwc = [t.contiguous(memory_format=torch.channels_last)
            for t in make_inputs((2, 3, 2, 4), 3, dtype, seed=12, device=device)]
    inf = math.inf
    return [
        (ops.euler_step.default, (x, c, None, None, sigmas, index, "eps", 0.0, 0.0, inf, 1.0, 0.0, None, None, 0,
                                  False)),
        (ops.euler_step.default, (x, c, u, w, sigmas, index, "v", 2.0, 0.2, 5.0, 1.01, 0.7, z, None, 0, True)),
        (ops.euler_step.default, (x, c, None, None, sigmas, index, "x0", 0.5, 0.0, inf, 1.0, 0.0, None, None, 3,
                                  True)),
        (ops.euler_step_out.default, (*nhwc[:2], None, None, sigmas, index, "eps", 1.0, 0.0, 3.0, 1.0, 0.0, nhwc[2],
                                      None, 0, False, torch.empty_like(nhwc[0]))),
        (ops.euler_ancestral_step.default, (*nhwc[:2], None, None, sigmas, index, "v", 0.0, None, None, 5, True)),
        (ops.euler_ancestral_step.default, (x, c, u, w, sigmas, index, "eps", 0.5, z, None, 0, False)),
        (ops.euler_ancestral_step_out.default, (x, c, u, w, sigmas, index, "x0", 0.0, z, None, 0, True,
                                               torch.empty_like(x))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck(device, dtype):
    device_backend(device)
    for op, args in _operator_cases(device, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, compiler):
    """The public Euler steps under torch.compile(fullgraph=True): the compiled backend's operators in the graph,
    eager's values, the in-place step exactly, drawn noise a step of the right shape."""
    backend = device_backend(device)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    x, c, u, z = make_inputs((2, 3, 4, 4), 4, torch.float32, seed=13, device=device)
    sigmas, index = _table(device), _index(2, device)

    def run(x, c, u, z, index):
        a = dk.euler_step(x, c, sigmas, index, "v_prediction", noise=z, s_churn=3.0, s_tmin=0.3, s_tmax=10.0,
                          return_pred_x0=True, backend=backend)
        b = dk.euler_ancestral_step(x, c, sigmas, index, noise=z, guidance_scale=3.0, uncond=u, guidance_rescale=0.7,
                                    backend=backend)
        y = x.clone()
        dk.euler_ancestral_step(y, c, sigmas, index, "sample", noise=z, backend=backend, out=y)
        drawn = dk.euler_ancestral_step(x, c, sigmas, index, backend=backend)
        return a[0], a[1], b, y, drawn

    eager = run(x, c, u, z, index)
    compiled = torch.compile(run, backend=recording, fullgraph=True)(x, c, u, z, index)
    for a, b in zip(eager[:4], compiled[:4]):
        torch.testing.assert_close(b, a, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(compiled[3], eager[3], rtol=0, atol=0)
    assert compiled[4].shape == x.shape and bool(compiled[4].isfinite().all())
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for name in ("euler_step", "euler_ancestral_step", "euler_ancestral_step_out"):
        assert any(t.startswith(f"ddpm_kernels.{name}.") for t in targets), (name, targets)
