"""Property-based tests: every public op on every backend available here against the reference.

Random shapes (1-5 dims after the batch, sizes 1..300 with primes), batch 1..64, per-sample t over the whole
range, fp32/fp16/bf16/fp64, contiguous / channels_last / transposed / sliced (storage offset) inputs, every
parameterization, clip on/off, given noise. Bounded by default; `--hypothesis-profile=nightly` runs the long
profile (see README).

The bound is the rule of docs/design.md, "Tolerances": the fused result's max error against the float64 reference is at most twice the
reference's own error in that dtype plus one ulp of the output's magnitude.
"""

import math
import os

import pytest
import torch

import ddpm_kernels as dk
from helpers import DTYPES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=600, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

T = 1000
SCHEDULES = {name: dk.DiffusionSchedule(name, timesteps=T) for name in ("linear", "cosine")}
# The Triton interpreter runs kernels element by element in numpy: keep its tensors small.
MAX_NUMEL = {"triton": 3000}


def fused_backends():
    names = set()
    for dtype in DTYPES:
        names.update(n for n in dk.available_backends("cpu", dtype) if n != "reference")
    return sorted(names)


BACKENDS = fused_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend available on this machine")

SIZES = st.one_of(st.integers(1, 8), st.sampled_from([11, 13, 17, 19, 31, 64, 97, 127, 257, 300]))


@st.composite
def case(draw, backend):
    max_numel = MAX_NUMEL.get(backend, 200_000)
    batch = draw(st.integers(1, 64))
    ndim = draw(st.integers(1, 5))
    dims = [draw(SIZES) for _ in range(ndim)]
    while batch * math.prod(dims) > max_numel:
        i = max(range(ndim), key=lambda k: dims[k])
        if dims[i] == 1:
            batch = max(1, batch // 2)
        else:
            dims[i] = max(1, dims[i] // 2)
    shape = (batch, *dims)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]))
    t = draw(st.lists(st.integers(0, T - 1), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, dtype, layout, torch.tensor(t, dtype=torch.long), seed


def tensor(shape, dtype, layout, g, scale=1.0):
    if layout == "transposed" and len(shape) >= 3:
        base = torch.randn((shape[0], *shape[1:][::-1]), generator=g, dtype=torch.float64)
        x = base.permute(0, *range(len(shape) - 1, 0, -1))
    elif layout == "channels_last" and len(shape) == 4:
        x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn((shape[0] + 1, *shape[1:]), generator=g, dtype=torch.float64)[1:]
        assert x.storage_offset() > 0
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    return (x * scale).to(dtype)


def check(fused, exact, in_dtype, what):
    """The bound of docs/design.md, "Tolerances"; `exact` is the reference on float64 copies, `ref` its run in the input's dtype."""
    fused_out, ref_out = fused
    for f, r in zip(fused_out if isinstance(fused_out, tuple) else (fused_out,),
                    ref_out if isinstance(ref_out, tuple) else (ref_out,)):
        e = exact.pop(0)
        assert f.shape == r.shape and f.dtype == r.dtype, what
        e64, f64, r64 = e.double(), f.double(), r.double()
        finite = torch.isfinite(e64)
        assert torch.equal(torch.isnan(f64), torch.isnan(r64)), f"{what}: NaN pattern differs"
        if not finite.any():
            continue
        err_fused = (f64 - e64)[finite].abs().max().item()
        err_ref = (r64 - e64)[finite].abs().max().item()
        if f.dtype == torch.float64:
            ulp = 1e-12 * max(1.0, e64[finite].abs().max().item())
        else:
            ulp = torch.finfo(f.dtype).eps * e64[finite].abs().max().item()
            if f.dtype == torch.float32:
                # fp32 results of a float32 computation vs float32 reference: rtol=atol=1e-5 (docs/design.md)
                ulp = max(ulp, 1e-5 * max(1.0, e64[finite].abs().max().item()))
        assert err_fused <= 2 * err_ref + ulp, f"{what}: fused error {err_fused:.3g} > 2*{err_ref:.3g} + {ulp:.3g}"


def run_op(op, backend, shape, dtype, layout, t, seed, parameterization="eps", clip=True, schedule="linear",
           loss_type="l2"):
    g = torch.Generator().manual_seed(seed)
    s = SCHEDULES[schedule]
    a, b, c = (tensor(shape, dtype, layout, g) for _ in range(3))

    def call(be, a, b, c):
        if op == "q_sample":
            return dk.q_sample(a, t, b, s, backend=be)
        if op == "predict_start_from_noise":
            return dk.predict_start_from_noise(a, t, b, s, backend=be)
        if op == "q_posterior":
            return dk.q_posterior(a, b, t, s, backend=be)
        if op == "p_mean_variance":
            return dk.p_mean_variance(a, t, b, s, parameterization, clip, backend=be)
        if op == "p_sample":
            return dk.p_sample(a, t, b, s, parameterization, clip, noise=c, backend=be)
        if op == "diffusion_loss":
            return dk.diffusion_loss(a, b, c, t, s, parameterization, loss_type, 1.0, 0.5, backend=be)
        raise AssertionError(op)

    try:
        fused = call(backend, a, b, c)
    except dk.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    ref = call("reference", a, b, c)
    exact = call("reference", a.double(), b.double(), c.double())
    exact = list(exact) if isinstance(exact, tuple) else [exact]
    check((fused, ref), exact, dtype, f"{op} {backend} {shape} {dtype} {layout} {parameterization} clip={clip}")


OPS = ["q_sample", "predict_start_from_noise", "q_posterior", "p_mean_variance", "p_sample", "diffusion_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_fuzz_against_reference(op, backend):
    @given(data=st.data())
    def prop(data):
        shape, dtype, layout, t, seed = data.draw(case(backend))
        kw = {}
        if op in ("p_mean_variance", "p_sample", "diffusion_loss"):
            kw["parameterization"] = data.draw(st.sampled_from(["eps", "x0", "v"]))
        if op in ("p_mean_variance", "p_sample"):
            kw["clip"] = data.draw(st.booleans())
        if op == "diffusion_loss":
            kw["loss_type"] = data.draw(st.sampled_from(["l1", "l2"]))
        kw["schedule"] = data.draw(st.sampled_from(sorted(SCHEDULES)))
        run_op(op, backend, shape, dtype, layout, t, seed, **kw)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_is_standard_normal_and_reproducible(backend):
    """noise=None: with a zero model output and eps/no clip at a fixed t, x_{t-1} - mean is sigma_t * z."""
    s = SCHEDULES["linear"]
    shape = (4, 3, 20, 25) if backend != "triton" else (2, 3, 10, 10)
    x = torch.zeros(shape)
    mo = torch.zeros(shape)
    t = torch.full((shape[0],), 500, dtype=torch.long)
    try:
        a = dk.p_sample(x, t, mo, s, "eps", False, generator=torch.Generator().manual_seed(1), backend=backend)
    except dk.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    b = dk.p_sample(x, t, mo, s, "eps", False, generator=torch.Generator().manual_seed(1), backend=backend)
    c = dk.p_sample(x, t, mo, s, "eps", False, generator=torch.Generator().manual_seed(2), backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    z = a / torch.exp(0.5 * s.posterior_log_variance_clipped[500])
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_timestep_view(backend):
    """t as a strided view (a column of a (B, k) table) reads the right timesteps on every backend."""
    s = SCHEDULES["linear"]
    steps = torch.tensor([[0, 7], [999, 3], [500, 1]])
    t = steps[:, 0]
    assert not t.is_contiguous()
    g = torch.Generator().manual_seed(0)
    x, mo, z = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    expected = dk.p_sample(x, t.contiguous(), mo, s, noise=z, backend="reference")
    torch.testing.assert_close(dk.p_sample(x, t, mo, s, noise=z, backend=backend), expected, rtol=1e-5, atol=1e-5)
    expected = dk.q_sample(x, t.contiguous(), z, s, backend="reference")
    torch.testing.assert_close(dk.q_sample(x, t, z, s, backend=backend), expected, rtol=1e-5, atol=1e-5)
