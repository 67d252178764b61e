"""What only the compiled CPU backend (ddpm_kernels._C + the per-ISA CPU libraries) has: its reduction over
large samples, its in-kernel noise stream (one 64-bit draw from the CPU generator per call keys Philox), double
backward of q_sample, the per-ISA library chosen and loaded, and the fallback with its rebuild hint.

The checks every fused backend shares (values against the reference over op x dtype x shape x layout, out=,
strided inputs, out-of-range t, gradients, opcheck, torch.compile) are in tests/test_conformance.py.

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
from ddpm_kernels import backends
from helpers import assert_thread_independent, make_inputs

extension = pytest.importorskip("ddpm_kernels.extension")
pytestmark = pytest.mark.skipif(
    extension.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"CPU extension not built: {extension.load_error}",
)

T = 1000
SCHEDULE = dk.DiffusionSchedule("linear", timesteps=T)


def test_diffusion_loss_large_sample():
    # Several reduction chunks per sample and several samples per thread.
    mo, xs, nz = make_inputs((3, 4, 64, 65), 3, torch.float32)
    t = torch.tensor([0, 17, T - 1])
    for param in ("eps", "v"):
        got = dk.diffusion_loss(mo, xs, nz, t, SCHEDULE, param, "l2", 1.0, 0.5, backend="cpu")
        want = dk.diffusion_loss(mo, xs, nz, t, SCHEDULE, param, "l2", 1.0, 0.5, backend="reference")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ in-kernel noise
def _recovered_noise(x, t, mo, out):
    mean, _, log_var = dk.p_mean_variance(x, t, mo, SCHEDULE, "eps", True, backend="reference")
    return (out.double() - mean.double()) / torch.exp(0.5 * log_var.double())


def test_in_kernel_noise_statistics():
    x, mo = make_inputs((8, 4, 64, 65), 2, torch.float32)
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
    x, mo = make_inputs((3, 3, 17, 19), 2, torch.float32)
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
    x, mo = make_inputs((5, 3, 31, 33), 2, torch.float32)
    t = torch.tensor([1, 10, 100, 500, T - 1])
    many = assert_thread_independent(
        lambda: dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(2), backend="cpu"))
    # Half data draws the same normals (computed in float32, rounded once).
    half = dk.p_sample(x.half(), t, mo.half(), SCHEDULE, generator=torch.Generator().manual_seed(2), backend="cpu")
    torch.testing.assert_close(half.float(), many, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------- autograd
def test_q_sample_double_backward():
    """The C++ q_sample_backward has its own registered backward (q_sample again): gradients of gradients."""
    x, n = (v.requires_grad_() for v in make_inputs((2, 3, 5), 2, torch.float64))
    t = torch.tensor([0, T - 1])
    fn = lambda a, b: dk.q_sample(a, t, b, SCHEDULE, backend="cpu")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, n))


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
    x, mo = make_inputs((2, 3, 8, 8), 2, torch.float32)
    t = torch.tensor([0, 50])
    before = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(1), backend="cpu")
    for name in ("_C_cpu", "_C_cpu_avx2", "_C_cpu_avx512"):
        if importlib.util.find_spec(f"ddpm_kernels.{name}") is not None:
            importlib.import_module(f"ddpm_kernels.{name}")
    after = dk.p_sample(x, t, mo, SCHEDULE, generator=torch.Generator().manual_seed(1), backend="cpu")
    torch.testing.assert_close(after, before, rtol=0, atol=0)
