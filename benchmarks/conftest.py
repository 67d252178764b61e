"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (kept out of the default test run).

The cases are the bench CLI's, taken from the op table (``ddpm_kernels.bench.CASES``), each with every provider
that applies to it. DDPM_KERNELS_BENCH_SHAPE=16x4x64x64 and DDPM_KERNELS_BENCH_DTYPE=fp32|bf16|fp16 pick the
inputs (defaults: 16x4x64x64 fp32). DDPM_KERNELS_BENCH_SMOKE=1 shrinks them to a tiny tensor and leaves
torch.compile out, to prove in CI that the suite runs.
"""

import os

import pytest
import torch

from ddpm_kernels import bench
from ddpm_kernels.bench.sweep import provider_calls
from ddpm_kernels.schedule import DiffusionSchedule

SMOKE = os.environ.get("DDPM_KERNELS_BENCH_SMOKE", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = bench.parse_shape(os.environ.get("DDPM_KERNELS_BENCH_SHAPE", "2x4x8x8" if SMOKE else "16x4x64x64"))
DTYPE = bench.DTYPES[os.environ.get("DDPM_KERNELS_BENCH_DTYPE", "fp32")]


def cases_and_providers():
    """(case, provider) pairs: every case of the op table x the providers that apply to it."""
    pairs = [(case, p) for case in bench.CASES for p in bench.providers(case, DEVICE, DTYPE)]
    return [(c, p) for c, p in pairs if not (SMOKE and p == "compile")]


@pytest.fixture(scope="session")
def schedule():
    return DiffusionSchedule(timesteps=1000).to(DEVICE)


@pytest.fixture
def run(benchmark, schedule):
    """run(case, provider): benchmark one provider on one case, with the bytes it moves in extra_info."""

    def _run(case_name, provider):
        case = bench.Case(case_name, SHAPE, DTYPE, DEVICE, schedule)
        fns, note, _ = provider_calls(case, provider)
        if not fns:
            pytest.skip(note or f"no {provider} call for {case_name}")
        fn = next(iter(fns.values()))
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

            def timed():
                fn()
                torch.cuda.synchronize()

        else:
            timed = fn
        benchmark.extra_info.update(op=case_name, provider=provider, shape=list(SHAPE), dtype=str(DTYPE),
                                    bytes=case.bytes, device=str(DEVICE), note=note)
        benchmark(timed)

    return _run


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        pairs = cases_and_providers()
        metafunc.parametrize(("case", "provider"), pairs, ids=[f"{c}-{p}" for c, p in pairs])
