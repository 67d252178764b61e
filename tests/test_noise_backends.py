"""Every backend's in-kernel noise is the specified stream (docs/design.md, "Noise streams"): the normals equal
``reference.philox_normal`` for the key and offset the generator gives, in every op that draws; the generator
advances by the documented amount whatever the backend and the batch size; ``sample_offset`` makes a batch cut
in two draw exactly what the whole batch draws; channels_last data draws what contiguous data draws."""

import math

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import _native
from ddpm_kernels._stream import draw_cpu_key
from ddpm_kernels.reference import philox_normal

BACKENDS = ["reference", "triton"] + (["cpu"] if _native.schema_lib is not None else [])
# Shapes: per-sample sizes that are and are not multiples of 4 (a 4-element group never spans two samples),
# one spanning several of the CPU kernels' 256-element noise blocks and parallel chunks.
SHAPES = [(3, 2, 5, 7), (2, 4, 8, 8), (5, 3), (2, 3, 37, 41)]

# One normal against the specification: both sides compute the same exact uniforms and the same correctly
# rounded 2*pi*u and sqrt; they may differ in log, cos and sin, each within 1 ulp of the true value on the CPU
# (SLEEF's u10 functions in at::vec and in torch; numpy's float32 SIMD functions in Triton's interpreter are
# within 4 ulps) and 2 ulps on CUDA. The radius takes half the log's relative error through the sqrt; the
# product with cos/sin adds half an ulp: at most about 8 ulps of |z| in all, i.e. a relative 2**-20.
NOISE_RTOL = 2.0**-20


def _schedule():
    return dk.DiffusionSchedule(timesteps=100)


def _flow_noise(shape, generator, backend, sample_offset=0, channels_last=False, dtype=torch.float32):
    """The in-kernel z of a stochastic flow step, exactly: with sigma = 0 and sigma_next = 1 the step is
    ``0 * x0 + 1 * z``."""
    b = shape[0]
    x = torch.zeros(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return dk.flow_step(x, torch.zeros_like(x), noise=None, generator=generator, backend=backend,
                        sigma=torch.zeros(b), sigma_next=torch.ones(b), stochastic=True, sample_offset=sample_offset)


def _expected(shape, seed, sample_offset=0):
    key = int(draw_cpu_key(torch.Generator().manual_seed(seed)))
    b = shape[0]
    return philox_normal(key, 0, sample_offset, b, math.prod(shape) // b).reshape(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_noise_is_the_specified_stream(backend, shape):
    for sample_offset in (0, 5):
        z = _flow_noise(shape, torch.Generator().manual_seed(17), backend, sample_offset)
        want = _expected(shape, 17, sample_offset)
        if backend == "reference":
            assert torch.equal(z, want)
        else:
            torch.testing.assert_close(z, want, rtol=NOISE_RTOL, atol=0)


def _draw(op, backend, x, generator, sample_offset=0, **extra):
    """One call of a noise-drawing op with in-kernel noise on fixed inputs."""
    s = _schedule()
    b = x.shape[0]
    gen = torch.Generator().manual_seed(1)
    model_output = torch.randn(x.shape, generator=gen).to(x.dtype)
    t = torch.randint(1, 100, (b,), generator=gen)
    if op == "p_sample":
        return dk.p_sample(x, t, model_output, s, generator=generator, backend=backend, sample_offset=sample_offset)
    if op == "ddim_step":
        return dk.ddim_step(x, t, t - 1, model_output, s, eta=0.7, generator=generator, backend=backend,
                            sample_offset=sample_offset, **extra)
    if op == "ddpm_step":
        return dk.ddpm_step(x, t, t - 1, model_output, s, generator=generator, backend=backend,
                            sample_offset=sample_offset, **extra)
    sigmas = torch.linspace(1, 0, 11)
    return dk.flow_step(x, model_output, sigmas, torch.full((b,), 3), generator=generator, backend=backend,
                        stochastic=True, sample_offset=sample_offset)


OPS = ["p_sample", "ddim_step", "ddpm_step", "flow_step"]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("op", OPS)
def test_every_drawing_op_matches_the_reference(backend, op):
    """Same generator state, same noise: each fused op equals the reference op within the fp32 tolerance."""
    x = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(2))
    for sample_offset in (0, 3):
        got = _draw(op, backend, x, torch.Generator().manual_seed(9), sample_offset)
        want = _draw(op, "reference", x, torch.Generator().manual_seed(9), sample_offset)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it is the stream, not any normal noise: another key is far off
    other = _draw(op, backend, x, torch.Generator().manual_seed(10))
    assert (other - want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_generator_advances_by_one_draw(backend, op):
    """Every drawing call consumes one 64-bit draw of a CPU generator, whatever the batch size."""
    states = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(4)
        _draw(op, backend, torch.randn(batch, 3, 4, 4), g)
        states.append(g.get_state())
    ref = torch.Generator().manual_seed(4)
    draw_cpu_key(ref)
    assert torch.equal(states[0], states[1])
    assert torch.equal(states[0], ref.get_state())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_sample_offset_shards_reproduce_the_batch(backend, op):
    """A batch of 8 equals two calls of 4 with sample_offset 0 and 4 (each from the same generator state, as
    ranks seeded alike), bit for bit on the same backend."""
    x = torch.randn(8, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    s = _schedule()
    gen = torch.Generator().manual_seed(1)
    model_output = torch.randn(x.shape, generator=gen)
    t = torch.randint(1, 100, (8,), generator=gen)

    def call(rows, sample_offset):
        g = torch.Generator().manual_seed(21)
        xs, mo, ts = x[rows], model_output[rows], t[rows]
        if op == "p_sample":
            return dk.p_sample(xs, ts, mo, s, generator=g, backend=backend, sample_offset=sample_offset)
        if op == "ddim_step":
            return dk.ddim_step(xs, ts, ts - 1, mo, s, eta=1.0, generator=g, backend=backend,
                                sample_offset=sample_offset)
        if op == "ddpm_step":
            return dk.ddpm_step(xs, ts, ts - 1, mo, s, generator=g, backend=backend, sample_offset=sample_offset)
        return dk.flow_step(xs, mo, torch.linspace(1, 0, 11), ts % 10, generator=g, backend=backend,
                            stochastic=True, sample_offset=sample_offset)

    whole = call(slice(0, 8), 0)
    halves = torch.cat([call(slice(0, 4), 0), call(slice(4, 8), 4)])
    assert torch.equal(whole, halves)
    assert not torch.equal(call(slice(4, 8), 0), whole[4:])  # the offset is what makes them agree


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_draws_what_contiguous_draws(backend):
    shape = (2, 3, 5, 7)
    z = _flow_noise(shape, torch.Generator().manual_seed(8), backend, channels_last=True)
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(z, _flow_noise(shape, torch.Generator().manual_seed(8), backend))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    for op in ("ddpm_step", "p_sample"):
        got = _draw(op, backend, x, torch.Generator().manual_seed(6))
        want = _draw(op, backend, x.contiguous(), torch.Generator().manual_seed(6))
        assert torch.equal(got, want), op
    s = _schedule()
    t = torch.full((2,), 50)
    r = dk.p_sample(x, t, x, s, generator=torch.Generator().manual_seed(6), backend=backend, out=out)
    assert r is out
    assert torch.equal(out, dk.p_sample(x.contiguous(), t, x.contiguous(), s,
                                        generator=torch.Generator().manual_seed(6), backend=backend))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_in_other_dtypes_is_the_float32_stream(backend, dtype):
    """The normals are float32 on every backend; other dtypes take them in their compute dtype and round the
    result once."""
    shape = (2, 3, 4, 5)
    z = _flow_noise(shape, torch.Generator().manual_seed(12), backend, dtype=dtype)
    want = _expected(shape, 12).to(dtype)
    tol = {torch.float64: NOISE_RTOL}.get(dtype, 0)
    if tol:
        torch.testing.assert_close(z, want, rtol=tol, atol=0)
    else:  # one rounding of nearly equal float32 values: at most one ulp apart
        assert (z.double() - want.double()).abs().le(want.double().abs() * 2 ** -7 + 1e-30).all()


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**32, ValueError), (1.0, TypeError), (True, TypeError),
                                        ("0", TypeError)])
@pytest.mark.parametrize("op", OPS)
def test_sample_offset_is_validated(op, bad, error):
    with pytest.raises(error, match="sample_offset"):
        _draw(op, "reference", torch.randn(2, 3), None, sample_offset=bad)


@pytest.mark.skipif(_native.schema_lib is None, reason="needs the compiled library")
def test_cpu_noise_statistics_at_scale():
    """Over 4M in-kernel normals of the compiled CPU backend: moments, tails and neighbour correlations (a
    broken counter layout or transform shows as correlation or a wrong tail mass)."""
    shape = (4, 4, 512, 513)
    z = _flow_noise(shape, torch.Generator().manual_seed(2024), "cpu").double().flatten()
    n = z.numel()
    assert n > 4_000_000
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs(((z - z.mean()) ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    p = (z.abs() > 3).double().mean().item()  # P(|z| > 3) = 0.0026998
    assert abs(p - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    for lag in (1, 2, 3, 4, 513, 512 * 513):
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), lag


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_cuda_noise_is_the_stream_and_advances_by_four(backend):
    """On a CUDA generator: key = seed, offset = the Philox offset, advanced by 4 per call whatever the batch;
    statistics over 4M normals."""
    for batch in (1, 16):
        g = torch.Generator("cuda").manual_seed(5)
        g.set_offset(8)
        shape = (batch, 4, 256, 257)
        x = torch.zeros(shape, device="cuda")
        z = dk.flow_step(x, x, generator=g, backend=backend, sigma=torch.zeros(batch, device="cuda"),
                         sigma_next=torch.ones(batch, device="cuda"), stochastic=True, sample_offset=3)
        assert g.get_offset() == 12
        want = philox_normal(5, 8, 3, batch, z[0].numel(), device="cuda").reshape(shape)
        torch.testing.assert_close(z, want, rtol=NOISE_RTOL, atol=0)
    z = z.double().flatten()
    n = z.numel()
    assert n > 4_000_000
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_randn_stream_is_what_the_ops_draw(backend):
    """`randn_stream` gives the stream's rows sample_offset.. and consumes the generator as one drawing call."""
    shape = (4, 3, 5, 6)
    g = torch.Generator().manual_seed(31)
    z = dk.randn_stream(shape, g, sample_offset=2, backend=backend)
    assert z.shape == shape and z.dtype == torch.float32
    assert torch.equal(z, _flow_noise(shape, torch.Generator().manual_seed(31), backend, sample_offset=2))
    torch.testing.assert_close(z, _expected(shape, 31, sample_offset=2), rtol=NOISE_RTOL, atol=0)
    ref = torch.Generator().manual_seed(31)
    draw_cpu_key(ref)
    assert torch.equal(g.get_state(), ref.get_state())
    assert dk.randn_stream(shape, torch.Generator().manual_seed(31), dtype=torch.float64, backend=backend).dtype == \
        torch.float64
    with pytest.raises(TypeError, match="dtype"):
        dk.randn_stream(shape, dtype=torch.int64)
    with pytest.raises(ValueError, match="sample_offset"):
        dk.randn_stream(shape, sample_offset=-2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["euler_step", "euler_ancestral_step"])
def test_euler_steps_shard_with_sample_offset(op, backend):
    """The Euler steps draw the same stream on every backend: 8 = 4 + 4 with sample_offset."""
    x = torch.randn(8, 2, 3, 5, generator=torch.Generator().manual_seed(5))
    v = torch.randn(8, 2, 3, 5, generator=torch.Generator().manual_seed(6))
    sigmas, index = torch.linspace(10, 0, 11), torch.full((8,), 2)
    fn = getattr(dk, op)
    kw = {"s_churn": 5.0} if op == "euler_step" else {}

    def call(rows, sample_offset):
        return fn(x[rows], v[rows], sigmas, index[rows], generator=torch.Generator().manual_seed(3),
                  backend=backend, sample_offset=sample_offset, **kw)

    whole = call(slice(0, 8), 0)
    assert torch.equal(whole, torch.cat([call(slice(0, 4), 0), call(slice(4, 8), 4)]))
    assert not torch.equal(call(slice(4, 8), 0), whole[4:])
