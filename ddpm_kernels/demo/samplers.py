"""``python -m ddpm_kernels demo --samplers``: the trained digits model sampled by the samplers people run, each
with the fused drop-in scheduler and with the stock diffusers one, from the same noise.

A sampler is a diffusers scheduler class on the model's own training schedule (its betas passed as
``trained_betas``), a number of steps and its options. For each one the same loop runs twice, with the stock
class and with ``ddpm_kernels.integrations.diffusers.Fused<Class>`` (same generator seed, so the same starting
noise and, the drop-ins drawing stock noise, the same per-step noise): the quality figure of each result, the
wall time of the whole loop, the time spent in the scheduler (``scale_model_input`` + ``step``) per step, and
the largest difference between the fused and the stock samples. Each loop runs twice and the second run is
timed, so one-time work (lazy tables, caches) is not counted.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from ..bench.loops import diffusers_loop
from ..diffusion import GaussianDiffusion
from .quality import DigitClassifier, digit_quality
from .timing import sync


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A named sampler: a diffusers scheduler class name, its steps (None: the model's T) and options."""

    name: str
    scheduler: str
    steps: Optional[int]
    options: tuple = ()

    def label(self, timesteps: int) -> str:
        return f"{self.name} ({self.steps or timesteps} steps)"


SAMPLERS: Dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPMScheduler", None, (("clip_sample", True),)),
        Sampler("ddim", "DDIMScheduler", 50, (("clip_sample", True), ("timestep_spacing", "trailing"))),
        Sampler("dpm++2m", "DPMSolverMultistepScheduler", 20, (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
        Sampler("dpm++2m-sde", "DPMSolverMultistepScheduler", 20,
                (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
        Sampler("unipc", "UniPCMultistepScheduler", 10, ()),
        Sampler("euler", "EulerDiscreteScheduler", 30, (("timestep_spacing", "trailing"),)),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler", 30, (("timestep_spacing", "trailing"),)),
    )
}
DEFAULT_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "unipc", "euler_a")


def parse_samplers(names: Sequence[str]) -> List[Sampler]:
    """``NAME`` or ``NAME:STEPS`` (e.g. ``dpm++2m:25``) -> `Sampler`s; an empty list is the default set."""
    out = []
    for item in names or DEFAULT_SAMPLERS:
        name, _, steps = item.partition(":")
        if name not in SAMPLERS:
            raise ValueError(f"--samplers: unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
        sampler = SAMPLERS[name]
        if steps:
            if not steps.isdigit() or int(steps) < 1:
                raise ValueError(f"--samplers: expected NAME:STEPS with STEPS a positive integer, got {item!r}")
            sampler = dataclasses.replace(sampler, steps=int(steps))
        out.append(sampler)
    return out


def scheduler_classes(sampler: Sampler):
    """``(stock class, fused class or None)`` of a sampler; raises ImportError without diffusers."""
    import diffusers

    from ..integrations import diffusers as fused

    return getattr(diffusers, sampler.scheduler), getattr(fused, "Fused" + sampler.scheduler, None)


def make_scheduler(cls, diffusion: GaussianDiffusion, sampler: Sampler):
    """``cls`` on the model's training schedule: its betas (float64 -> the scheduler's float32 table),
    epsilon prediction."""
    schedule = diffusion.schedule
    return cls(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.double().cpu().numpy(),
               prediction_type="epsilon", **dict(sampler.options))


@torch.no_grad()
def run_loop(diffusion: GaussianDiffusion, scheduler, steps: int, num_samples: int, seed: int) -> Dict[str, object]:
    """The diffusers sampling loop with ``scheduler`` (`ddpm_kernels.bench.loops.diffusers_loop`): samples, wall
    seconds, scheduler seconds per step."""
    device = diffusion.device
    shape = (num_samples, diffusion.channels, diffusion.image_size, diffusion.image_size)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(shape, generator=g, device=device)

    def model(x, t):
        return diffusion.model(x, t.to(device).expand(num_samples))

    sync(device)
    start = time.perf_counter()
    result = diffusers_loop(scheduler, model, noise, steps, device, generator=g, timed=True)
    seconds = time.perf_counter() - start
    return {"samples": result.sample, "seconds": seconds,
            "scheduler_ms_per_step": 1e3 * result.scheduler_seconds / result.steps, "steps": result.steps}


def compare_samplers(diffusion: GaussianDiffusion, samplers: Sequence[Sampler], classifier: DigitClassifier,
                     num_samples: int, seed: int = 0) -> List[Dict[str, object]]:
    """For each sampler, the stock and the fused loop from the same seed: one row per (sampler, implementation)
    with the quality figure, the times and (fused rows) the largest |fused - stock|; samples under ``samples``."""
    rows = []
    timesteps = diffusion.num_timesteps
    for sampler in samplers:
        stock_cls, fused_cls = scheduler_classes(sampler)
        steps = sampler.steps or timesteps
        results = {}
        for impl, cls in (("stock", stock_cls), ("fused", fused_cls)):
            if cls is None:
                rows.append({"sampler": sampler.label(timesteps), "name": sampler.name, "implementation": impl,
                             "missing": f"no Fused{sampler.scheduler} drop-in"})
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the first loop warms up (caches, lazy tables, allocator); the second is timed
                for _ in range(2):
                    result = run_loop(diffusion, make_scheduler(cls, diffusion, sampler), steps, num_samples, seed)
            results[impl] = result
            row = {"sampler": sampler.label(timesteps), "name": sampler.name, "implementation": impl,
                   "steps": result["steps"], "seconds": result["seconds"],
                   "scheduler_ms_per_step": result["scheduler_ms_per_step"],
                   "quality": digit_quality(classifier, result["samples"]), "samples": result["samples"]}
            if impl == "fused" and "stock" in results:
                diff = (result["samples"].double() - results["stock"]["samples"].double()).abs().max()
                row["max_abs_diff_vs_stock"] = float(diff)
            rows.append(row)
    return rows


def render_samplers_markdown(rows: Sequence[Dict[str, object]], device: str, num_samples: int) -> str:
    lines = [
        f"Samplers on the trained digits model ({num_samples} samples, {device}): the stock diffusers scheduler and "
        "the fused drop-in, same seed. Quality: the share of samples an MLP trained on real digits (plus a \"not a "
        "digit\" class) recognises with p >= 0.9, and its Inception-style digit score (1-10); time: the whole loop "
        "(model included, second of two runs) and the scheduler's share per step (scale_model_input + step).",
        "",
        "| sampler | scheduler | recognised (p >= 0.9) | digit score | digits seen | loop s | scheduler ms/step | "
        "max abs diff fused vs stock |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['sampler']} | {r['implementation']} | {r['missing']} | | | | | |")
            continue
        q = r["quality"]
        diff = f"{r['max_abs_diff_vs_stock']:.2e}" if "max_abs_diff_vs_stock" in r else ""
        lines.append(
            f"| {r['sampler']} | {r['implementation']} | {100 * q['recognised']:.1f}% | {q['digit_score']:.2f} | "
            f"{q['classes']} | {r['seconds']:.2f} | {r['scheduler_ms_per_step']:.3f} | {diff} |"
        )
    return "\n".join(lines) + "\n"
