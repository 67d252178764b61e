"""The benchmark suite and the bench CLI run (smoke mode: tiny shapes, short timing). Structure only: no timing
here is a performance claim."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ddpm_kernels._spec import OPS, OpSpec
from ddpm_kernels.bench import CASES, Case, providers
from ddpm_kernels.bench.cases import _cases
from ddpm_kernels.schedule import DiffusionSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_op_in_the_table_is_benchmarked():
    assert {case.spec.name for case in CASES.values()} == set(OPS)
    assert {"ddim_step", "ddpm_step", "ddpm_step_rng", "p_sample_rng", "diffusion_loss_fwd_bwd"} <= set(CASES)


def test_cases_follow_the_declared_roles():
    plain = OpSpec("pair_op", "pair", "x", like=("y",))
    noisy = OpSpec("noisy_op", "posterior", "x", like=("y",), optional=("noise",), draws_noise=True)
    loss = OpSpec("loss_op", "loss", "x", like=("y",), outputs=("scalar",))
    assert [c.name for c in _cases(plain)] == ["pair_op"]
    assert [(c.name, c.in_kernel_noise) for c in _cases(noisy)] == [("noisy_op", False), ("noisy_op_rng", True)]
    assert [(c.name, c.backward) for c in _cases(loss)] == [("loss_op_fwd_bwd", True)]


@pytest.mark.parametrize("case, passes", [
    ("q_sample", 3),  # x_start, noise in; x_t out
    ("p_sample", 4),  # x_t, model_output, noise in; x_{t-1} out
    ("p_sample_rng", 3),  # noise drawn in the kernel
    ("ddim_step", 3),  # eta = 0 by default: the given noise is not read
    ("ddpm_step", 4),
    ("q_posterior", 3),  # the per-sample variances are not counted
    ("dynamic_threshold", 2),
    ("diffusion_loss_fwd_bwd", 7),  # three in forward, the same three again in backward, one gradient out
])
def test_bytes_come_from_the_table(case, passes):
    c = Case(case, (2, 3, 5, 7), torch.float32, torch.device("cpu"), DiffusionSchedule(timesteps=10))
    assert c.bytes == passes * c.numel * 4
    if "t_prev" in c.tensors:
        assert torch.equal(c.tensors["t_prev"], (c.tensors["t"] - 1).clamp(min=-1))
    if "noise" in c.spec.optional:
        assert (c.tensors["noise"] is None) == case.endswith("_rng")


@pytest.mark.parametrize("case, passes", [
    ("p_sample", 3.5),  # x_t, noise in fp32, model_output in bf16; x_{t-1} out in fp32
    ("flow_step", 2.5),  # sample in fp32, model_output in bf16 (no noise read); the step out in fp32
    ("diffusion_loss_fwd_bwd", 5.5),  # bf16 model output and fp32 targets, twice; its gradient in bf16
])
def test_mixed_case_bytes_count_each_operand_in_its_dtype(case, passes):
    """A mixed case (fp32 data, a bf16 model output, as under autocast): the model output is the only bf16
    tensor, and the bytes count each operand at its own size, outputs in the promoted fp32."""
    c = Case(case, (2, 3, 5, 7), torch.float32, torch.device("cpu"), DiffusionSchedule(timesteps=10),
             model_dtype=torch.bfloat16)
    assert c.tensors["model_output"].dtype == torch.bfloat16
    assert all(v.dtype != torch.bfloat16 for n, v in c.tensors.items() if n != "model_output" and v is not None)
    assert c.bytes == passes * c.numel * 4


def test_bench_cli_times_mixed_calls_against_cast_then_call(tmp_path):
    """``--dtypes fp32+bf16``: the ops that take a model output, each fused backend natively and "+cast" (the
    model output cast first), labelled float32+bfloat16; ops without a model output are left out."""
    out = tmp_path / "mixed"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_kernels", "bench", "--shapes", "2x4x8x8", "--dtypes", "fp32+bf16", "--ops",
         "q_sample", "p_sample", "diffusion_loss_fwd_bwd", "--providers", "eager", "cpu", "--min-run-time", "0.01",
         "--no-e2e", "--no-malloc-variant", "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "mixed.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"p_sample", "diffusion_loss_fwd_bwd"}
    assert {r["dtype"] for r in rows} == {"float32+bfloat16"}
    from ddpm_kernels import available_backends

    fused = {"cpu", "cpu+cast"} if "cpu" in available_backends("cpu") else set()
    assert {r["provider"] for r in rows if r["op"] == "p_sample"} == {"eager"} | fused | (
        {"cpu+out"} if fused else set())
    assert {r["provider"] for r in rows if r["op"] == "diffusion_loss_fwd_bwd"} == {"eager"} | fused
    for r in rows:
        assert r["median_us"] > 0 and r["bytes"] > 0


def test_pytest_benchmark_suite_runs(tmp_path):
    env = dict(os.environ, DDPM_KERNELS_BENCH_SMOKE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every case x every provider that applies to it, torch.compile left out in smoke mode
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = sum(p != "compile" for case in CASES for p in providers(case, device, torch.float32))
    assert f"{expected} passed" in proc.stdout, proc.stdout[-3000:]


def test_bench_cli_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "result"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_kernels", "bench", "--shapes", "2x4x8x8", "--dtypes", "fp32", "--ops",
         "q_sample", "ddim_step", "--min-run-time", "0.01", "--e2e-steps", "2", "--e2e-shape", "1x1x8x8",
         "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"device", "device_name", "torch", "date", "git_commit"} <= set(result["meta"])
    assert {r["op"] for r in result["rows"]} == {"q_sample", "ddim_step"}
    providers = {r["provider"] for r in result["rows"]}
    assert {"eager", "compile"} <= providers
    for r in result["rows"]:
        assert r["median_us"] > 0 and r["bytes"] > 0 and r["launches"] >= 1
    # eager is measured under both malloc conditions on CPU
    assert len({r["condition"] for r in result["rows"] if r["provider"] == "eager"}) == 2
    assert result["e2e"] and result["e2e"][0]["step_ms"] > 0
    md = (tmp_path / "result.md").read_text()
    assert "| q_sample | 2x4x8x8 |" in md and "| ddim_step | 2x4x8x8 |" in md
    assert (tmp_path / "result.png").stat().st_size > 1000


def test_host_overhead_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_kernels", "bench", "--host-overhead", "--host-iters", "2", "--host-rounds", "2",
         "--out", str(tmp_path / "host")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((tmp_path / "host.json").read_text())["host_overhead"]
    assert table["shape"] == [1, 4, 8, 8] and table["dtype"] == "float32" and table["threads"] == 1
    assert (table["iters"], table["rounds"]) == (2, 2)
    rows = {r["name"]: r for r in table["rows"]}
    expected = {"torch.add", "torch.ops.ddpm_kernels.p_sample.default"} | {f"dk.{op}" for op in OPS}
    try:
        import diffusers  # noqa: F401

        kinds = ("DDIM", "DDPM", "FlowMatchEulerDiscrete", "DPMSolverMultistep", "UniPCMultistep", "EulerDiscrete",
                 "EulerAncestralDiscrete", "LCM")
        expected |= {f"{p}{s}Scheduler.step" for p in ("", "Fused") for s in kinds}
    except ImportError:
        pass
    assert set(rows) == expected
    for r in rows.values():
        assert {"runs_on", "median_us", "min_of_medians_us", "vs_floor", "baseline", "speedup_vs_baseline",
                "note"} <= set(r)
        if r["runs_on"] != "-":  # "-": not runnable here, and the note says why
            assert math.isfinite(r["median_us"]) and 0 < r["min_of_medians_us"]
    assert rows["torch.add"]["vs_floor"] == 1.0
    assert rows["torch.ops.ddpm_kernels.p_sample.default"]["baseline"] == "dk.p_sample"
    md = (tmp_path / "host.md").read_text()
    assert "| call | runs on |" in md and "| dk.ddpm_step |" in md
    assert not (tmp_path / "host.png").exists()  # no sweep rows: nothing to plot


FLOW_CASES = ["flow_interpolate", "flow_step", "flow_step_guided"]


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 64, 16)])
@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_diffusers_counterparts_do_the_cases_work(case, shape):
    """The diffusers rows time the same computation as the case: the stock call's result equals the op's on the
    same tensors (a step at one index for every sample, as the stock step takes one)."""
    pytest.importorskip("diffusers")
    c = Case(case, shape, torch.float32, torch.device("cpu"), DiffusionSchedule(timesteps=10))
    assert providers(case, c.device, c.dtype)[-1] == "diffusers"
    if "step_index" in c.tensors:
        c.tensors["step_index"].fill_(int(c.tensors["step_index"][0]))
    if c.case.guided:
        assert c.tensors["model_output"].shape == (2 * shape[0],) + shape[1:]
        assert c.bytes == 4 * c.numel * 4  # sample and the doubled output in, the step out
    (stock,) = c.diffusers_calls().values()
    ours = c.call("reference")()
    torch.testing.assert_close(stock(), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["solver_step", "solver_step_sde"])
def test_solver_diffusers_counterparts_are_the_dpm_solver_2m_step(case):
    """The diffusers rows of the multistep-solver cases time DPMSolverMultistepScheduler's second-order step on
    the case's tensors (its earlier output the case's ring entry, the SDE form with the case's noise): the same
    result as `solver_step` on the DPM-Solver table of the same schedule."""
    pytest.importorskip("diffusers")
    from ddpm_kernels.solvers import solver_step
    from ddpm_kernels.solvers.dpm import dpm_solver_coefficients

    c = Case(case, (2, 4, 8, 8), torch.float32, torch.device("cpu"), DiffusionSchedule(timesteps=10))
    assert providers(case, c.device, c.dtype)[-1] == "diffusers"
    (stock,) = c.diffusers_calls().values()
    ring = c.tensors["history"][1:].clone()  # read before the stock call replaces its list
    sde = case.endswith("_sde")
    expected = stock()
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    s.set_timesteps(50)
    table = dpm_solver_coefficients(s.sigmas, algorithm_type=s.config.algorithm_type).float()
    got = solver_step(c.tensors["sample"], c.tensors["model_output"], table, torch.full((2,), 25), history=ring,
                      noise=c.tensors["noise"] if sde else None, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bench_cli_accepts_flow_shapes_and_presets():
    from ddpm_kernels.bench.cli import FLOW_GPU_SHAPES, _parser, default_shapes

    args = _parser().parse_args(["--shapes", "flow", "2x4096x64", "--ops", "flow_step"])
    assert [s for group in args.shapes for s in group] == list(FLOW_GPU_SHAPES) + [(2, 4096, 64)]
    assert FLOW_GPU_SHAPES == ((1, 16, 64, 64), (16, 16, 64, 64), (4, 16, 128, 128), (2, 4096, 64))
    assert default_shapes(torch.device("cuda"), ["flow_step", "flow_interpolate"]) == FLOW_GPU_SHAPES
    assert default_shapes(torch.device("cuda"), ["flow_step", "q_sample"])[0] == (1, 4, 64, 64)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--shapes", "16by4"])


def test_bench_cli_runs_a_token_layout(tmp_path):
    out = tmp_path / "tokens"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_kernels", "bench", "--shapes", "2x64x16", "--dtypes", "fp32", "--ops",
         "flow_step_guided", "flow_interpolate", "--providers", "eager", "diffusers", "--min-run-time", "0.01",
         "--no-e2e", "--no-malloc-variant", "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "tokens.json").read_text())["rows"]
    assert {(r["op"], tuple(r["shape"])) for r in rows} == {("flow_step_guided", (2, 64, 16)),
                                                             ("flow_interpolate", (2, 64, 16))}
    try:
        import diffusers  # noqa: F401

        assert {r["provider"] for r in rows} == {"eager", "diffusers"}
    except ImportError:
        assert {r["provider"] for r in rows} == {"eager"}
    for r in rows:
        assert r["median_us"] > 0 and r["bytes"] > 0


def test_scheduler_loops_compare_each_drop_in_with_stock():
    """The whole-loop table: every scheduler that has a fused drop-in, stock then fused, the model's and the
    scheduler's time measured inside the loop, and the fused loop's result equal to stock's within float32
    rounding."""
    pytest.importorskip("diffusers")
    from ddpm_kernels.bench.sweep import SCHEDULER_LOOPS, scheduler_loops
    from ddpm_kernels.integrations import diffusers as fused

    rows = scheduler_loops(torch.device("cpu"), (2, 4, 8, 8), 4, min_run_time=0.0)
    expected = [label for label, name, _ in SCHEDULER_LOOPS if hasattr(fused, "Fused" + name)]
    assert [r["scheduler"] for r in rows] == [label for label in expected for _ in range(2)]
    for stock, ours in zip(rows[::2], rows[1::2]):
        assert (stock["implementation"], ours["implementation"]) == ("stock", "fused")
        assert ours["max_abs_diff_vs_stock"] <= 1e-4, ours
        for r in (stock, ours):
            assert r["step_ms"] > 0 and r["model_ms"] > 0 and r["scheduler_ms"] > 0 and r["steps"] == 4


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_diffusers_loop_is_the_pipeline_loop(name):
    """The one sampling loop of the benchmarks and the demo: a pipeline's loop written out (the noise scaled by
    ``init_noise_sigma``, ``scale_model_input``, the model, ``step``), the generator passed only to a ``step``
    that takes one (UniPC's refuses it); the timed loop gives the same samples and counts its scheduler time."""
    diffusers = pytest.importorskip("diffusers")
    from ddpm_kernels.bench.loops import diffusers_loop, step_takes_generator

    cls = getattr(diffusers, name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)

    def model(sample, t):
        return 0.9 * sample + 1e-3 * t

    expected_scheduler = cls()
    g = torch.Generator().manual_seed(5)
    extra = {"generator": g} if step_takes_generator(expected_scheduler) else {}
    assert bool(extra) == (name == "EulerAncestralDiscreteScheduler")
    expected_scheduler.set_timesteps(5)
    expected = x * expected_scheduler.init_noise_sigma
    for t in expected_scheduler.timesteps:
        expected = expected_scheduler.step(model(expected_scheduler.scale_model_input(expected, t), t), t, expected,
                                           **extra).prev_sample
    for timed in (False, True):
        result = diffusers_loop(cls(), model, x, 5, "cpu", generator=torch.Generator().manual_seed(5), timed=timed)
        assert torch.equal(result.sample, expected) and result.steps == 5
        assert (result.scheduler_seconds is not None) == timed
        if timed:
            assert result.scheduler_seconds > 0


@pytest.mark.filterwarnings("ignore:ddpm_kernels:RuntimeWarning")  # options a backend hands to the reference
def test_every_op_call_list_covers_the_table_and_runs_on_cpu():
    """The sanitizer's and the GPU no-sync test's call list (ddpm_kernels.bench.calls): every public op in it,
    each call running on the CPU backend, on odd sizes, and on a misaligned view."""
    from ddpm_kernels.bench.calls import calls

    schedule = DiffusionSchedule("linear", timesteps=1000)
    for unaligned in (False, True):
        pointwise, reductions = calls("cpu", torch.float32, (3, 3, 5, 7), schedule, unaligned, device="cpu")
        names = set(pointwise) | set(reductions)
        assert not set(pointwise) & set(reductions)
        missing = [op for op in OPS if not any(name.split()[0] == op for name in names)]
        assert not missing, f"ops with no call: {missing}"
        for name, fn in {**pointwise, **reductions}.items():
            result = fn()
            flat = result if isinstance(result, (tuple, list)) else (result,)
            assert all(torch.isfinite(r).all() for r in flat if isinstance(r, torch.Tensor)), name
