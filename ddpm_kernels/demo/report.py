"""The demo's outputs: PNG grids, the markdown tables and the machine description in the JSON report."""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from .._info import cpu_name
from .timing import load_average


# ---------------------------------------------------------------------------------------------- images
def _unit_range(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] as a float32 array in [0, 1], the range the grey colour map spans."""
    return ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2).numpy()


def _pyplot():
    import matplotlib

    # Files only: no display is needed, and none may exist.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tile(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, 1, S, S) in [-1, 1] -> a 2-D grey grid in [0, 1], white padding between images."""
    x = _unit_range(images)[:, 0]
    n, s = x.shape[0], x.shape[-1]
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = np.ones((nrows * (s + pad) + pad, ncol * (s + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (s + pad) : pad + r * (s + pad) + s, pad + c * (s + pad) : pad + c * (s + pad) + s] = x[i]
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 4) -> None:
    """A PNG grid of images, white digits on black as in the data, each pixel ``scale`` x ``scale``."""
    grid = _tile(images, nrow)
    _pyplot().imsave(path, np.kron(grid, np.ones((scale, scale), dtype=np.float32)), cmap="gray", vmin=0, vmax=1)


def save_sample_grid(images: torch.Tensor, path: str) -> None:
    """The first 100 images, ten to a row."""
    save_grid(images[:100], path, nrow=min(10, images.shape[0]))


def save_progression(intermediates: Sequence[torch.Tensor], steps: Sequence[int], path: str, rows: int = 8) -> None:
    """A PNG strip: one row per sample, one column per logged step, from pure noise (left) to x_0."""
    plt = _pyplot()
    cols = len(intermediates)
    rows = min(rows, intermediates[0].shape[0])
    fig, axes = plt.subplots(rows, cols, figsize=(0.75 * cols, 0.75 * rows + 0.35), squeeze=False)
    for c, (img, label) in enumerate(zip(intermediates, steps)):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(_unit_range(img[r, 0]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][c].set_title(label, fontsize=7)
    top = 1 - 0.3 / (0.75 * rows + 0.35)  # room for the column titles
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device, condition: str, load_start: Optional[float]) -> Dict[str, object]:
    """The report's ``machine`` entry: what ran the timings, and how busy the machine was."""
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ddpm_kernels": __version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "condition": condition,
        "load_average": {"start": load_start, "end": load_average()},
    }


def _cpu_name() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# -------------------------------------------------------------------------------------------- markdown
def _fmt_load(machine: Dict[str, object]) -> str:
    load = machine.get("load_average") or {}
    return f"{load.get('start')} at start, {load.get('end')} at the end"


def _step_op(report: Dict[str, object]) -> str:
    """The op a sampling step runs (reports written before flow matching have no ``step_op``: DDPM's)."""
    return report["config"].get("step_op", "p_sample")


def _steps_label(cfg: Dict[str, object]) -> str:
    if cfg.get("objective") == "flow":
        return f"rectified flow, {cfg['timesteps']} Euler steps"
    return f"T={cfg['timesteps']}"


def _timing_rows(report: Dict[str, object]) -> List[str]:
    """The timing table's rows: measured backends, then the fused backends that cannot run here and why."""
    lines = []
    op = _step_op(report)
    us, latent_us = f"{op}_us", f"{op}_latent_us"
    ref = next((r for r in report["timing"] if r["backend"] == "reference"), None)
    for r in report["timing"]:
        speed = "1.00x" if r["backend"] == "reference" or ref is None else (
            f"{ref[us] / r[us]:.2f}x / {ref[latent_us] / r[latent_us]:.2f}x"
        )
        lines.append(f"| {r['backend']} | {r[us]:.1f} | {r[latent_us]:.1f} | {r['step_ms']:.2f} | {speed} |")
    lacking = report.get("no_fused_op", {})
    for name in report["unavailable"]:
        lines.append(f"| {name} | not available on this machine | — | — | — |")
    for name in lacking:
        lines.append(f"| {name} | no fused {op} in this build (the reference ran) | — | — | — |")
    if report["unavailable"] or lacking:
        lines.append("")
        for name, why in {**report["unavailable"], **lacking}.items():
            lines.append(f"- `{name}`: {why}")
    return lines


def render_timing_markdown(report: Dict[str, object]) -> str:
    """The timing table (markdown) from the demo's JSON report; the table is never written by hand."""
    m = report["machine"]
    cfg = report["config"]
    op = _step_op(report)
    shape = "x".join(str(d) for d in cfg["sample_shape"])
    latent = "x".join(str(d) for d in cfg["latent_shape"])
    lines = [
        f"Machine: {m['device_name']} ({m['threads']} torch threads), torch {m['torch']}, "
        f"ddpm_kernels {m['ddpm_kernels']}, {m['date']}, 1-minute load average {_fmt_load(m)}. {m['condition']}",
        "",
        f"Per-step sampling time, {_steps_label(cfg)}, samples {shape}; median of {cfg['timing_rounds']} "
        f"interleaved rounds.",
        "",
        f"| backend | {op} op, {shape} (µs) | {op} op, {latent} (µs) | step: UNet + {op} (ms) "
        f"| op speed-up vs reference |",
        "|---|---:|---:|---:|---:|",
        *_timing_rows(report),
    ]
    sampling = report["sampling"]
    lines += [
        "",
        f"Sampling the grid ({sampling['num_samples']} samples, {cfg['timesteps']} steps) with backend="
        f"`{sampling['backend']}` (ran on `{sampling['resolved']}`): {sampling['seconds']:.1f} s.",
    ]
    if "seconds" in report:
        sec = report["seconds"]
        lines.append(
            f"Whole demo: {sec['total']:.0f} s, of which training ({cfg['training_steps']} steps, batch "
            f"{cfg['batch_size']}) {sec['training']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def render_quality_markdown(quality: Dict[str, object]) -> str:
    """The quality table (markdown) from the demo's quality dict."""
    lines = [
        "Quality figure: an MLP trained on real digits plus a \"not a digit\" class of noise images "
        f"(held-out digit accuracy {quality['classifier_heldout_accuracy']:.3f}) labels each image, pooled to 8x8.",
        "",
        "| images | n | recognised (p >= 0.9) | mean top-digit probability | not a digit | digit score (1-10) "
        "| digits seen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "generated": "trained model's samples",
        "untrained_model": "untrained model's samples",
        "real_heldout": "real held-out digits",
    }
    for key, label in names.items():
        if key in quality:
            q = quality[key]
            lines.append(
                f"| {label} | {q['n']} | {q['recognised']:.1%} | {q['confidence']:.3f} | {q['not_a_digit']:.1%} "
                f"| {q['digit_score']:.2f} | {q['classes']} |"
            )
    return "\n".join(lines) + "\n"
