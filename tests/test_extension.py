"""The compiled CPU backend (ddpm_kernels._C + the per-ISA CPU libraries) against the reference.

Skipped as a whole when the extension is not built; the fallback (warning, reference results) is tested in a
subprocess that hides the libraries.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import backends, reference

extension = pytest.importorskip("ddpm_kernels.extension")
pytestmark = pytest.mark.skipif(
    extension.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"CPU extension not built: {extension.load_error}",
)

T = 1000
SCHEDULE = dk.DiffusionSchedule("linear", timesteps=T)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, per-sample t): 1 element, odd sizes, 3-D, 5-D, a batch of 16; t covers 0 and T-1.
CASES = [
    ((1,), [T - 1]),
    ((1, 1), [0]),
    ((3, 3, 17, 19), [0, 500, T - 1]),
    ((2, 5, 7), [T - 1, 0]),
    ((2, 3, 2, 3, 5), [1, T - 1]),
    ((16, 3, 8, 8), [0, T - 1] + list(range(7, 1000, 71))[:14]),
]
CASE_IDS = ["1el", "1x1", "3x3x17x19", "3d", "5d", "b16"]


def _inputs(shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def _check_close(fused, ref_dtype, ref64, dtype):
    """docs/design.md tolerances: fp32/fp64 close to the same-dtype reference; halves judged against fp64."""
    assert fused.dtype == ref_dtype.dtype and fused.shape == ref_dtype.shape
    if dtype == torch.float32:
        torch.testing.assert_close(fused, ref_dtype, rtol=1e-5, atol=1e-5, equal_nan=True)
    elif dtype == torch.float64:
        torch.testing.assert_close(fused, ref_dtype, rtol=1e-12, atol=1e-12, equal_nan=True)
    else:
        exact = ref64.to(torch.float64)
        err_fused = (fused.to(torch.float64) - exact).abs().max().item()
        err_ref = (ref_dtype.to(torch.float64) - exact).abs().max().item()
        ulp = torch.finfo(dtype).eps * max(exact.abs().max().item(), 1e-30)
        assert err_fused <= 2 * err_ref + ulp, (err_fused, err_ref, ulp)
        bound = 2e-3 if dtype == torch.float16 else 1.6e-2
        rel = err_fused / max(exact.abs().max().item(), 1.0)
        assert rel <= bound, rel


def _run_both(fn, dtype, inputs64, t):
    """fn(inputs, t, backend) on the cpu backend and on the reference, in dtype and in float64."""
    inputs = [x.to(dtype) for x in inputs64]
    exact_inputs = [x.to(torch.float64) for x in inputs]  # the rounded values, in fp64
    fused = fn(inputs, t, "cpu")
    ref = fn(inputs, t, "reference")
    ref64 = fn(exact_inputs, t, "reference")
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    for f, r, e in zip(as_tuple(fused), as_tuple(ref), as_tuple(ref64)):
        _check_close(f, r, e, dtype)


PAIR_OPS = {
    "q_sample": lambda i, t, b: dk.q_sample(i[0], t, i[1], SCHEDULE, backend=b),
    "predict_start_from_noise": lambda i, t, b: dk.predict_start_from_noise(i[0], t, i[1], SCHEDULE, backend=b),
    "predict_noise_from_start": lambda i, t, b: dk.predict_noise_from_start(i[0], t, i[1], SCHEDULE, backend=b),
    "get_v": lambda i, t, b: dk.get_v(i[0], i[1], t, SCHEDULE, backend=b),
    "predict_start_from_z_and_v": lambda i, t, b: dk.predict_start_from_z_and_v(i[0], t, i[1], SCHEDULE, backend=b),
    "predict_eps_from_z_and_v": lambda i, t, b: dk.predict_eps_from_z_and_v(i[0], t, i[1], SCHEDULE, backend=b),
    "q_posterior": lambda i, t, b: dk.q_posterior(i[0], i[1], t, SCHEDULE, backend=b),
}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(PAIR_OPS))
def test_two_operand_ops(op, dtype, case):
    shape, t = case
    _run_both(PAIR_OPS[op], dtype, _inputs(shape, torch.float64), torch.tensor(t))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("op", ["p_mean_variance", "p_sample"])
def test_step_ops(op, param, clip, dtype, case):
    shape, t = case
    if op == "p_mean_variance":
        fn = lambda i, t, b: dk.p_mean_variance(i[0], t, i[1], SCHEDULE, param, clip, backend=b)  # noqa: E731
    else:
        fn = lambda i, t, b: dk.p_sample(i[0], t, i[1], SCHEDULE, param, clip, noise=i[2], backend=b)  # noqa: E731
    _run_both(fn, dtype, _inputs(shape, torch.float64), torch.tensor(t))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_diffusion_loss(param, loss_type, dtype, case):
    shape, t = case

    def fn(i, t, b):
        return dk.diffusion_loss(i[0], i[1], i[2], t, SCHEDULE, param, loss_type, 0.7, 0.3, backend=b)

    _run_both(fn, dtype, _inputs(shape, torch.float64), torch.tensor(t))


def test_diffusion_loss_large_sample():
    # Several reduction chunks per sample and several samples per thread.
    mo, xs, nz = _inputs((3, 4, 64, 65), torch.float32)
    t = torch.tensor([0, 17, T - 1])
    for param in ("eps", "v"):
        got = dk.diffusion_loss(mo, xs, nz, t, SCHEDULE, param, "l2", 1.0, 0.5, backend="cpu")
        want = dk.diffusion_loss(mo, xs, nz, t, SCHEDULE, param, "l2", 1.0, 0.5, backend="reference")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_out_of_range_t_gives_nan_not_a_crash():
    x, y, z = _inputs((3, 2, 5), torch.float32)
    t = torch.tensor([-1, 3, T])  # bypasses validation: calls the backend directly
    ops = extension.OPS
    for out in (
        ops["q_sample"](x, t, y, SCHEDULE),
        ops["p_sample"](x, t, y, SCHEDULE, "eps", True, z),
        ops["p_sample"](x, t, y, SCHEDULE, "eps", True, None),
        ops["p_mean_variance"](x, t, y, SCHEDULE, "v", True)[0],
        ops["predict_noise_from_start"](x, t, y, SCHEDULE),
    ):
        assert out[0].isnan().all() and out[2].isnan().all() and out[1].isfinite().all()
    loss = ops["diffusion_loss"](x, y, z, t, SCHEDULE, "eps", "l2", 1.0, 1.0)
    assert loss[0].isnan() and loss[2].isnan() and loss[1].isfinite()


# ------------------------------------------------------------------------------------------ in-kernel noise
def _recovered_noise(x, t, mo, out):
    mean, _, log_var = dk.p_mean_variance(x, t, mo, SCHEDULE, "eps", True, backend="reference")
    return (out.double() - mean.double()) / torch.exp(0.5 * log_var.double())


def test_in_kernel_noise_statistics():
    x, mo = _inputs((8, 4, 64, 65), torch.float32, n=2)
    t = torch.full((8,), 400)
    out = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(3), backend="cpu")
    z = _recovered_noise(x, t, mo, out).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (2 / n) ** 0.5
    # Normal quantiles: fraction within 1, 2 and 3 sigma; skewness and kurtosis.
    for k, p in ((1, 0.682689), (2, 0.954500), (3, 0.997300)):
        frac = (z.abs() < k).double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, (k, frac)
    assert abs((z**3).mean().item()) < 0.02
    assert abs((z**4).mean().item() - 3) < 0.05
    # Neighbouring elements are uncorrelated (each Philox output feeds a different element).
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / n**0.5
    assert abs((z[64:] * z[:-64]).mean().item()) < 5 / n**0.5


def test_in_kernel_noise_reproducible_from_generator_state():
    x, mo = _inputs((3, 3, 17, 19), torch.float32, n=2)
    t = torch.tensor([5, 500, T - 1])
    g = torch.Generator().manual_seed(11)
    a = dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu")
    b = dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu")
    assert not torch.equal(a, b)  # the generator advanced
    g.manual_seed(11)
    torch.testing.assert_close(dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu"), a, rtol=0, atol=0)
    state = g.get_state()
    c = dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu")
    g.set_state(state)
    torch.testing.assert_close(dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu"), c, rtol=0, atol=0)
    # The default generator, through torch.manual_seed.
    torch.manual_seed(5)
    d = dk.p_sample(x, t, mo, SCHEDULE, backend="cpu")
    torch.manual_seed(5)
    torch.testing.assert_close(dk.p_sample(x, t, mo, SCHEDULE, backend="cpu"), d, rtol=0, atol=0)


def test_in_kernel_noise_independent_of_threads_and_dtype():
    x, mo = _inputs((5, 3, 31, 33), torch.float32, n=2)
    t = torch.tensor([1, 10, 100, 500, T - 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(2), backend="cpu")
    finally:
        torch.set_num_threads(threads)
    many = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(2), backend="cpu")
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    # Half data draws the same normals (computed in float32, rounded once).
    half = dk.p_sample(x.half(), t, mo.half(), SCHEDULE, generator=torch.Generator().manual_seed(2), backend="cpu")
    torch.testing.assert_close(half.float(), many, rtol=2e-3, atol=2e-3)


def test_no_noise_at_t0():
    x, mo = _inputs((4, 3, 5, 5), torch.float32, n=2)
    t = torch.zeros(4, dtype=torch.long)
    out = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(0), backend="cpu")
    mean = dk.p_mean_variance(x, t, mo, SCHEDULE, backend="reference")[0]
    torch.testing.assert_close(out, mean, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- out= / layout
def test_out_and_in_place():
    x, mo, nz = _inputs((3, 3, 17, 19), torch.float32)
    t = torch.tensor([0, 300, T - 1])
    want = dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="reference")
    out = torch.empty_like(x)
    assert dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="cpu", out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    x_in = x.clone()
    assert dk.p_sample(x_in, t, mo, SCHEDULE, noise=nz, backend="cpu", out=x_in) is x_in
    torch.testing.assert_close(x_in, want, rtol=1e-5, atol=1e-5)
    # In place with in-kernel noise equals the out-of-place result from the same generator state.
    g = torch.Generator().manual_seed(4)
    ref_random = dk.p_sample(x, t, mo, SCHEDULE, generator=g, backend="cpu")
    x_in = x.clone()
    dk.p_sample(x_in, t, mo, SCHEDULE, generator=g.manual_seed(4), backend="cpu", out=x_in)
    torch.testing.assert_close(x_in, ref_random, rtol=0, atol=0)
    # q_sample in place.
    xs = x.clone()
    dk.q_sample(xs, t, nz, SCHEDULE, backend="cpu", out=xs)
    torch.testing.assert_close(xs, dk.q_sample(x, t, nz, SCHEDULE, backend="reference"), rtol=1e-5, atol=1e-5)
    # A non-contiguous out.
    out_nc = torch.empty(3, 3, 19, 17).transpose(2, 3)
    dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="cpu", out=out_nc)
    torch.testing.assert_close(out_nc, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    base = _inputs((3, 3, 19, 17), torch.float32)
    x, mo, nz = (b.transpose(2, 3) for b in base)
    t = torch.tensor([0, 300, T - 1])
    got = dk.p_sample(x, t, mo, SCHEDULE, "v", True, noise=nz, backend="cpu")
    want = dk.p_sample(x, t, mo, SCHEDULE, "v", True, noise=nz, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = dk.diffusion_loss(mo, x, nz, t, SCHEDULE, backend="cpu")
    want = dk.diffusion_loss(mo, x, nz, t, SCHEDULE, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- autograd
def test_q_sample_gradcheck():
    x, n = (v.requires_grad_() for v in _inputs((2, 3, 5), torch.float64, n=2))
    t = torch.tensor([0, T - 1])
    fn = lambda a, b: dk.q_sample(a, t, b, SCHEDULE, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, n))
    assert torch.autograd.gradgradcheck(fn, (x, n))


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_diffusion_loss_gradcheck(param, loss_type):
    mo, xs, nz = _inputs((3, 2, 5), torch.float64)
    mo.requires_grad_()
    t = torch.tensor([0, 400, T - 1])

    def fn(m):
        return dk.diffusion_loss(m, xs, nz, t, SCHEDULE, param, loss_type, 0.8, 0.4, backend="cpu")

    assert torch.autograd.gradcheck(fn, (mo,))


def test_diffusion_loss_backward_matches_reference_float32():
    mo, xs, nz = _inputs((4, 3, 9, 9), torch.float32)
    t = torch.tensor([0, 1, 500, T - 1])
    grads = []
    for backend in ("cpu", "reference"):
        m = mo.clone().requires_grad_()
        loss, simple, vlb = dk.diffusion_loss(m, xs, nz, t, SCHEDULE, "v", "l2", 1.0, 0.25, backend=backend)
        (loss * 2 + simple * 0.5 + vlb).backward()
        grads.append(m.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_q_sample_backward_both_grads_one_op():
    x, n = (v.requires_grad_() for v in _inputs((2, 3, 4), torch.float32, n=2))
    t = torch.tensor([3, 700])
    out = dk.q_sample(x, t, n, SCHEDULE, backend="cpu")
    assert "q_sample" in type(out.grad_fn).__name__.lower() or out.grad_fn is not None
    out.sum().backward()
    a, b = reference.extract(SCHEDULE, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, 3, torch.float32)
    torch.testing.assert_close(x.grad, a.expand_as(x))
    torch.testing.assert_close(n.grad, b.expand_as(n))


def test_sampling_steps_run_detached_on_fused_backends():
    """p_sample is a sampling step (the seed runs it under no_grad): the fused kernel serves it even when an
    input requires grad, with no autograd history; the reference keeps autograd for differentiating a step."""
    x, mo, nz = _inputs((2, 3, 4), torch.float64)
    mo.requires_grad_()
    t = torch.tensor([3, 700])
    out = dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="cpu")
    assert not out.requires_grad
    ref = dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="reference")
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    ref.sum().backward()
    assert mo.grad is not None and mo.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- torch.library checks
def _opcheck_cases():
    x, y, z = _inputs((2, 3, 5), torch.float32)
    x64 = x.double()
    t = torch.tensor([0, T - 1])
    tab, tab64 = SCHEDULE.table(torch.float32), SCHEDULE.table(torch.float64)
    g = torch.tensor(1.0)
    return [
        ("q_sample", (x, t, y, tab)),
        ("q_sample", (x64.requires_grad_(), t, y.double().requires_grad_(), tab64)),
        ("q_sample_out", (x, t, y, tab, torch.empty_like(x))),
        ("q_sample_backward", (x, t, tab)),
        ("predict_start_from_noise", (x, t, y, tab)),
        ("predict_noise_from_start", (x, t, y, tab)),
        ("get_v", (x, y, t, tab)),
        ("predict_start_from_z_and_v", (x, t, y, tab)),
        ("predict_eps_from_z_and_v", (x.half(), t, y.half(), tab)),
        ("q_posterior", (x, y, t, tab)),
        ("p_mean_variance", (x.bfloat16(), t, y.bfloat16(), tab, "v", True)),
        ("p_sample", (x, t, y, tab, "eps", True, z, None)),
        ("p_sample_out", (x, t, y, tab, "x0", False, z, None, torch.empty_like(x))),
        ("diffusion_loss", (x, y, z, t, tab, "eps", "l2", 1.0, 0.5)),
        ("diffusion_loss", (x64.clone().requires_grad_(), y.double(), z.double(), t, tab64, "v", "l1", 1.0, 0.5)),
        ("diffusion_loss_backward", (g, g, g, x, y, z, t, tab, "v", "l2", 1.0, 0.5)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_opcheck(case):
    name, args = case
    torch.library.opcheck(getattr(torch.ops.ddpm_kernels, name), args)


def test_opcheck_in_kernel_noise():
    # Random outputs differ run to run, so only the checks that do not compare two runs.
    x, y = _inputs((2, 3, 5), torch.float32, n=2)
    args = (x, torch.tensor([0, 9]), y, SCHEDULE.table(torch.float32), "eps", True, None, None)
    torch.library.opcheck(torch.ops.ddpm_kernels.p_sample, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_sees_the_ops():
    x, mo, nz = _inputs((2, 3, 8, 8), torch.float32)
    t = torch.tensor([0, 600])
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, t, mo, nz, out):
        x_t = dk.q_sample(x, t, nz, SCHEDULE, backend="cpu")
        dk.p_sample(x_t, t, mo, SCHEDULE, noise=nz, backend="cpu", out=out)
        loss = dk.diffusion_loss(mo, x, nz, t, SCHEDULE, backend="cpu")[0]
        return x_t, loss

    want_out = torch.empty_like(x)
    want = step(x, t, mo, nz, want_out)  # eager first: loads the backend outside the traced region
    out = torch.empty_like(x)
    got = torch.compile(step, backend=record, fullgraph=True)(x, t, mo, nz, out)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("q_sample", "p_sample_out", "diffusion_loss"):
        assert f"ddpm_kernels.{op}" in targets or f"ddpm_kernels.{op}.default" in targets, targets
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, want_out)


def test_torch_compile_aot_autograd():
    # Fake kernels, functionalization of the out= op and the registered backward under AOTAutograd.
    x, mo, nz = _inputs((2, 3, 8, 8), torch.float32)
    t = torch.tensor([0, 600])

    def train(mo, x, nz):
        x_t = dk.q_sample(x, t, nz, SCHEDULE, backend="cpu")
        return dk.diffusion_loss(mo, x_t, nz, t, SCHEDULE, "v", backend="cpu")[0]

    def sample(x, mo, nz):
        dk.p_sample(x, t, mo, SCHEDULE, noise=nz, backend="cpu", out=x)
        return x

    sample(x.clone(), mo, nz)  # eager first: loads the backend outside the traced region
    m1 = mo.clone().requires_grad_()
    torch.compile(train, backend="aot_eager", fullgraph=True)(m1, x, nz).backward()
    m2 = mo.clone().requires_grad_()
    train(m2, x, nz).backward()
    torch.testing.assert_close(m1.grad, m2.grad)
    got = torch.compile(sample, backend="aot_eager", fullgraph=True)(x.clone(), mo, nz)
    torch.testing.assert_close(got, sample(x.clone(), mo, nz))


# ------------------------------------------------------------------------------------------ loading/selection
def test_auto_picks_the_cpu_backend():
    assert backends.resolve("p_sample", "auto", torch.device("cpu"), torch.float32)[0] == "cpu"
    assert "cpu" in dk.available_backends("cpu", torch.bfloat16)


def test_loaded_cpu_library_matches_capability():
    cap = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX512": "_C_cpu_avx512", "AVX2": "_C_cpu_avx2"}.get(cap, "_C_cpu")
    assert extension.cpu_capability in (expected, "_C_cpu_avx2", "_C_cpu")
    if os.environ.get("DDPM_KERNELS_CPU_ISA") is None:  # a full build has every library
        assert extension.cpu_capability == expected


_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import torch, ddpm_kernels as dk
    from ddpm_kernels import extension
    s = dk.DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x, mo, nz = (torch.randn(3, 4, 9, 11, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    for p in ("eps", "v"):
        a = dk.p_sample(x, t, mo, s, p, True, noise=nz, backend="cpu")
        b = dk.p_sample(x, t, mo, s, p, True, noise=nz, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a = dk.diffusion_loss(mo, x, nz, t, s, p, backend="cpu")
        b = dk.diffusion_loss(mo, x, nz, t, s, p, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    z = dk.p_sample(x.half(), t, mo.half(), s, generator=g, backend="cpu")
    assert z.isfinite().all()
    print(extension.cpu_capability)
    """
)


@pytest.mark.parametrize("capability,library", [("avx2", "_C_cpu_avx2"), ("default", "_C_cpu")])
def test_narrower_cpu_builds(capability, library):
    """Each per-ISA build works; ATEN_CPU_CAPABILITY selects it as it selects torch's own kernels."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" and capability != "default":
        pytest.skip("this CPU has no AVX2")
    here = os.path.dirname(os.path.dirname(extension.__file__))
    # Look, don't import: loading a second CPU library here would re-register (override) this process's kernels.
    if importlib.util.find_spec(f"ddpm_kernels.{library}") is None:
        pytest.skip(f"{library} not built")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK], env=env, cwd=here, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == library


_FALLBACK_CHECK = textwrap.dedent(
    """
    import sys, warnings, importlib.abc
    MODE = sys.argv[1]
    if MODE == "missing":
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("ddpm_kernels._C"):
                    raise ImportError(f"No module named {name!r}")
        sys.meta_path.insert(0, Hide())
    import torch
    if MODE == "stale":
        torch.__version__ = "1.0.0"
    import ddpm_kernels as dk
    warnings.simplefilter("always")
    s = dk.DiffusionSchedule()
    x = torch.randn(2, 3, 4); t = torch.tensor([0, 5])
    with warnings.catch_warnings(record=True) as caught:
        a = dk.p_sample(x, t, x, s, noise=x)
        b = dk.p_sample(x, t, x, s, noise=x)
        dk.q_sample(x, t, x, s)
    torch.testing.assert_close(a, dk.p_sample(x, t, x, s, noise=x, backend="reference"))
    ours = [w for w in caught if w.category.__name__ == "ExtensionUnavailableWarning"]
    assert len(ours) == 1, [str(w.message) for w in caught]
    print(ours[0].message)
    try:
        dk.p_sample(x, t, x, s, noise=x, backend="cpu")
    except dk.BackendUnavailableError as exc:
        print("explicit:", exc)
    else:
        raise SystemExit("backend='cpu' should have raised")
    """
)


@pytest.mark.parametrize("mode", ["missing", "stale"])
def test_fallback_warns_once_with_rebuild_hint(mode):
    here = os.path.dirname(os.path.dirname(extension.__file__))
    res = subprocess.run(
        [sys.executable, "-c", _FALLBACK_CHECK, mode], cwd=here, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "pip install --no-build-isolation" in res.stdout
    if mode == "stale":
        assert "built for torch" in res.stdout


def test_loading_a_second_cpu_library_keeps_the_kernels_in_use():
    x, mo = _inputs((2, 3, 8, 8), torch.float32, n=2)
    t = torch.tensor([0, 50])
    before = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(1), backend="cpu")
    for name in ("_C_cpu", "_C_cpu_avx2", "_C_cpu_avx512"):
        if importlib.util.find_spec(f"ddpm_kernels.{name}") is not None:
            importlib.import_module(f"ddpm_kernels.{name}")
    after = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(1), backend="cpu")
    torch.testing.assert_close(after, before, rtol=0, atol=0)
