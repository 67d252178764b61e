"""The result: run metadata, and the markdown table and PNG plot generated from the JSON (never typed)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import List

import numpy as np
import torch

from .. import __version__
from .._info import cpu_name


def meta(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return dict(
        device=device.type,
        device_name=name,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        ddpm_kernels=__version__,
        git_commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    )


def fmt(v, spec):
    return "" if v is None or v != v else format(v, spec)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"### {m['device_name']} ({m['device']}), torch {m['torch']}, triton {m['triton']}, "
        f"{m['date']}, commit {m['git_commit']}",
    ]
    if result["rows"]:
        lines += [
            "",
            "| op | shape | dtype | provider | condition | µs (median) | GB/s | % copy BW | × eager | × compile "
            "| launches | host syncs | note |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in result["rows"]:
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['provider']} | {r['condition']} "
            f"| {fmt(r['median_us'], '.1f')} | {fmt(r['gbps'], '.1f')} | {fmt(r['pct_copy_bw'], '.0f')} "
            f"| {fmt(r['speedup_vs_eager'], '.2f')} | {fmt(r['speedup_vs_compile'], '.2f')} "
            f"| {fmt(r['launches'], 'd')} | {fmt(r['host_syncs'], 'd')} | {r['note']} |"
        )
    if result.get("e2e"):
        lines += ["", "End to end (UNet sampling loop):", "",
                  "| backend | shape | UNet params | ms/step | model ms | scheduler share |",
                  "|---|---|---:|---:|---:|---:|"]
        for e in result["e2e"]:
            lines.append(f"| {e['backend']} | {'x'.join(map(str, e['shape']))} | {e['model_params'] / 1e6:.1f} M "
                         f"| {e['step_ms']:.2f} | {e['model_ms']:.2f} | {e['scheduler_share_pct']:.1f}% |")
    if result.get("scheduler_loops"):
        lines += ["", "Whole diffusers sampling loops with a toy model (a 1x1 convolution), stock scheduler vs the fused "
                  "drop-in (ms/step: the untimed loop's wall time; model ms and scheduler ms: measured call by call "
                  "inside the same loops, timed alternately):", "",
                  "| scheduler | implementation | shape | steps | ms/step | model ms | scheduler ms | scheduler "
                  "speedup | max abs diff vs stock |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for e in result["scheduler_loops"]:
            speedup = f"{e['scheduler_speedup']:.2f}x" if e.get("scheduler_speedup") else ""
            diff = f"{e['max_abs_diff_vs_stock']:.1e}" if "max_abs_diff_vs_stock" in e else ""
            lines.append(f"| {e['scheduler']} | {e['implementation']} | {'x'.join(map(str, e['shape']))} "
                         f"| {e['steps']} | {e['step_ms']:.3f} | {e['model_ms']:.3f} | {e['scheduler_ms']:.3f} "
                         f"| {speedup} | {diff} |")
    if result.get("host_overhead"):
        from .host import markdown as host_markdown

        lines += [""] + host_markdown(result["host_overhead"])
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
    rows = [r for r in result["rows"] if r["speedup_vs_eager"] and r["provider"] != "eager"]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return False

    def key(r):
        return r["op"], "x".join(map(str, r["shape"])), r["dtype"]

    keys = sorted({key(r) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * max(1, len(providers)) / 2), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        speedups = {key(r): r["speedup_vs_eager"] for r in rows if r["provider"] == p}
        ax.bar(np.arange(len(keys)) + i * width, [speedups.get(k, 0) for k in keys], width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup vs eager (×, log)")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels(["\n".join(k) for k in keys], fontsize=7)
    ax.set_title(f"ddpm_kernels on {result['meta']['device_name']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: str) -> List[str]:
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    base = out[:-5] if out.endswith(".json") else out
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    written = [base + ".json", base + ".md"]
    if plot(result, base + ".png"):
        written.append(base + ".png")
    return written
