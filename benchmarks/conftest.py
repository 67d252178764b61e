"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (kept out of the default test run).

DDPM_KERNELS_BENCH_SHAPE=16x4x64x64 and DDPM_KERNELS_BENCH_DTYPE=fp32|bf16|fp16 pick the case (defaults:
16x4x64x64 fp32). DDPM_KERNELS_BENCH_SMOKE=1 shrinks it to a tiny tensor and leaves torch.compile out, to
prove in CI that the suite runs.
"""

import os

import pytest
import torch

from ddpm_kernels import bench
from ddpm_kernels.schedule import DiffusionSchedule

SMOKE = os.environ.get("DDPM_KERNELS_BENCH_SMOKE", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = bench._parse_shape(os.environ.get("DDPM_KERNELS_BENCH_SHAPE", "2x4x8x8" if SMOKE else "16x4x64x64"))
DTYPE = bench.DTYPES[os.environ.get("DDPM_KERNELS_BENCH_DTYPE", "fp32")]


def providers():
    names = bench._providers(DEVICE, DTYPE, None)
    if SMOKE:
        names = [n for n in names if n != "compile"]
    return names


@pytest.fixture(scope="session")
def schedule():
    return DiffusionSchedule(timesteps=1000).to(DEVICE)


@pytest.fixture
def run(benchmark, schedule):
    """run(op, provider): benchmark one provider on one op, with the bytes it moves in extra_info."""

    def _run(op, provider):
        case = bench.Case(op, SHAPE, DTYPE, DEVICE, schedule)
        if provider == "eager":
            fn = case.call("reference")
        elif provider == "compile":
            fn = case.compiled()
        elif provider == "diffusers":
            calls = case.diffusers_calls()
            if not calls:
                pytest.skip(f"diffusers has no counterpart of {op} (or is not installed)")
            fn = next(iter(calls.values()))
        else:
            name, _, out = provider.partition("+")
            if out and op == "loss_fwd_bwd":
                pytest.skip("out= is not part of the loss API")
            fn = case.call(name, out=bool(out))
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

            def timed():
                fn()
                torch.cuda.synchronize()

        else:
            timed = fn
        benchmark.extra_info.update(op=op, provider=provider, shape=list(SHAPE), dtype=str(DTYPE), bytes=case.bytes,
                                    device=str(DEVICE))
        benchmark(timed)

    return _run


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", providers())
