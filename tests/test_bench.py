"""The benchmark suite and the bench CLI run (smoke mode: tiny shapes, short timing)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_benchmark_suite_runs(tmp_path):
    env = dict(os.environ, DDPM_KERNELS_BENCH_SMOKE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_bench_cli_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "result"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_kernels", "bench", "--shapes", "2x4x8x8", "--dtypes", "fp32", "--ops",
         "q_sample", "p_sample", "--min-run-time", "0.01", "--e2e-steps", "2", "--e2e-shape", "1x1x8x8",
         "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"device", "device_name", "torch", "date", "git_commit"} <= set(result["meta"])
    providers = {r["provider"] for r in result["rows"]}
    assert {"eager", "compile"} <= providers
    for r in result["rows"]:
        assert r["median_us"] > 0 and r["bytes"] > 0 and r["launches"] >= 1
    # eager is measured under both malloc conditions on CPU
    assert len({r["condition"] for r in result["rows"] if r["provider"] == "eager"}) == 2
    assert result["e2e"] and result["e2e"][0]["step_ms"] > 0
    md = (tmp_path / "result.md").read_text()
    assert "| q_sample | 2x4x8x8 |" in md
    assert (tmp_path / "result.png").stat().st_size > 1000
