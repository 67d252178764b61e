"""The compiled ``ddim_step`` and ``ddpm_step`` (ddpm_kernels::ddim_step / ddpm_step, csrc/cpu and csrc/cuda)
against the reference: on the CPU kernels always, on the CUDA kernels when a GPU is present (those cases are
marked ``gpu``).

Tolerances follow docs/design.md, "Tolerances": float32 against the float32 reference at rtol=atol=1e-5; float64 at 1e-12;
float16/bfloat16 against the float64 reference with an error at most twice the reference's own error in that
dtype plus one ulp, and within 2e-3 (fp16) / 1.6e-2 (bf16) relative.

Not fused: dynamic thresholding (``threshold_ratio``) and ``dynamic_threshold`` need a per-sample quantile
(a sort); the compiled backends route those calls to the reference, which the tests below check by identity.

The checks every fused backend shares are in tests/sampler_cases.py; this module runs them on the compiled
kernels and adds their own (thread counts, the thresholding fallback, the ddpm_kernels:: schemas).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import reference as R
from helpers import assert_thread_independent, compiled_backends, ddim_step_ref, ddpm_step_ref, make_inputs
from sampler_cases import SamplerStepCases, backend_fixtures, learned_output, make_steps, opcheck_cases

extension, pytestmark, BACKENDS = compiled_backends()
backend, schedule = backend_fixtures(BACKENDS)


@pytest.fixture(scope="module")
def device(backend):
    return backend


@pytest.fixture(scope="module")
def backend_ops(backend):
    return extension.CPU_BACKEND.ops if backend == "cpu" else extension.CUDA_BACKEND.ops


class TestSamplerSteps(SamplerStepCases):
    """The checks shared with the Triton backend (tests/sampler_cases.py), on the CPU and CUDA kernels."""


def test_large_sample_many_threads(backend, schedule):
    """Samples that span several parallel chunks and vector tails (N not a multiple of any vector width)."""
    x_t, model_output, noise = make_inputs((3, 3, 131, 129), 3, torch.float32, seed=21, device=backend)
    t, t_prev = make_steps(3, backend, seed=21)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.6, "v", True, noise=noise, backend=backend,
                       return_pred_x0=True)
    ref = ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.6, "v", True, noise=noise, return_pred_x0=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    wide = torch.cat([model_output, -noise.abs()], 1)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise, backend=backend)
    ref = ddpm_step_ref(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


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
    x_t, model_output, noise = make_inputs((3, 2, 5, 3), 3, dtype, seed=10, scale=2.0, device=backend)
    t, t_prev = make_steps(3, backend, seed=10)
    o = dict(THRESHOLD_OPTIONS[options])
    kw = dict(noise=noise, return_pred_x0=True, threshold_ratio=o["threshold_ratio"],
              threshold_max=o["threshold_max"])
    clipped = o.get("use_clipped_model_output", False)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, backend=backend,
                       use_clipped_model_output=clipped, **kw)
    ref = ddim_step_ref(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, use_clipped_model_output=clipped,
                          **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    wide = learned_output((3, 2, 5, 3), dtype, backend, "learned_range", seed=10)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned_range", backend=backend, **kw)
    ref = ddpm_step_ref(x_t, t, t_prev, wide, schedule, "eps", "learned_range", **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_dynamic_threshold_runs_the_reference(backend):
    (x0,) = make_inputs((3, 4, 5, 7), 1, torch.float32, seed=16, scale=2.0, device=backend)
    from ddpm_kernels import backends

    assert backends.resolve("dynamic_threshold", backend, x0.device, x0.dtype)[1] is R.dynamic_threshold_ref
    got = dk.dynamic_threshold(x0, 0.9, 2.5, backend=backend)
    torch.testing.assert_close(got, R.dynamic_threshold_ref(x0, 0.9, 2.5), rtol=0, atol=0)


def test_in_kernel_noise_independent_of_threads(schedule, backend):
    if backend != "cpu":
        pytest.skip("CPU thread count")
    x_t, model_output = make_inputs((5, 3, 31, 33), 2, torch.float32, seed=22, device="cpu")
    t, t_prev = make_steps(5, "cpu", seed=22)

    def run():
        g = torch.Generator().manual_seed(2)
        return (dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.8, generator=g, backend="cpu"),
                dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=g, backend="cpu"))

    assert_thread_independent(run)


# ------------------------------------------------------------------------------ torch.library / compile
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(backend, schedule, dtype, guided):
    for op, args in opcheck_cases(backend, schedule, dtype, guided):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_opcheck_in_kernel_noise(backend, schedule, guided):
    """noise=None draws from the generator: schema and fake-tensor checks only (values differ per call)."""
    for op, args in opcheck_cases(backend, schedule, torch.float32, guided, in_kernel_noise=True):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_steps(backend, schedule):
    """DDIM and DDPM steps (given noise, in place, learned variance) compile with fullgraph=True and match
    eager."""
    x_t, model_output, noise = make_inputs((2, 3, 4, 4), 3, torch.float32, seed=15, device=backend)
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
        for name in ("ddim_step", "ddpm_step"):
            assert inspect.signature(b.ops[name]) == inspect.signature(R.OPS[name])
        assert b.declines("dynamic_threshold", None) is not None
    for name in ("ddim_step", "ddim_step_out", "ddpm_step", "ddpm_step_out"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_kernels::{name}", "CPU")


def test_auto_picks_the_cpu_kernels():
    from ddpm_kernels import backends

    assert backends.resolve("ddim_step", "auto", torch.device("cpu"), torch.float32)[0] == "cpu"
    assert backends.resolve("ddpm_step", "auto", torch.device("cpu"), torch.float16)[0] == "cpu"

