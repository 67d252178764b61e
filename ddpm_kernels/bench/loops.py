"""The diffusers sampling loop, as a pipeline runs it, for the benchmarks and the demo: one helper for the
stock schedulers and their fused drop-ins alike (``python -m ddpm_kernels bench``'s scheduler-loop and UNet
DPM-Solver rows, ``python -m ddpm_kernels demo --samplers``)."""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable, Optional

import torch

from .timing import sync

__all__ = ["LoopResult", "diffusers_loop", "step_takes_generator"]


@dataclasses.dataclass
class LoopResult:
    """The final ``sample``, the number of ``steps`` taken and, for a timed loop, the seconds spent in the
    scheduler (``scale_model_input`` + ``step``) and in the model calls (None otherwise)."""

    sample: torch.Tensor
    steps: int
    scheduler_seconds: Optional[float] = None
    model_seconds: Optional[float] = None


def step_takes_generator(scheduler) -> bool:
    """Whether the scheduler's ``step`` takes a ``generator`` (UniPC's draws nothing and takes none)."""
    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def diffusers_loop(scheduler, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   steps: int, device, generator: Optional[torch.Generator] = None,
                   timed: bool = False) -> LoopResult:
    """``steps`` steps of ``scheduler`` from the noise ``x``, as diffusers pipelines loop:
    ``set_timesteps(steps, device=device)``, the noise scaled by ``init_noise_sigma``, then for each timestep
    ``t`` ``model(scheduler.scale_model_input(x, t), t)`` (a flow-matching scheduler has neither: the noise as it
    is, the model on ``x``) and ``x = scheduler.step(output, t, x).prev_sample``,
    with ``generator=generator`` when one is given and ``step`` takes it.

    ``timed``: also count the seconds spent in ``scale_model_input`` and ``step``, and in the model calls, the
    device synchronized around each call (which slows the loop on a GPU: time the whole loop untimed)."""
    device = torch.device(device)
    scheduler.set_timesteps(steps, device=device)
    # (flow-matching schedulers have neither an initial noise scale nor an input scaling)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    extra = {"generator": generator} if generator is not None and step_takes_generator(scheduler) else {}
    timesteps = scheduler.timesteps
    if not timed:
        for t in timesteps:
            x = scheduler.step(model(scale_model_input(x, t), t), t, x, **extra).prev_sample
        return LoopResult(x, len(timesteps))
    in_scheduler = in_model = 0.0
    for t in timesteps:
        sync(device)
        t0 = time.perf_counter()
        model_in = scale_model_input(x, t)
        sync(device)
        t1 = time.perf_counter()
        output = model(model_in, t)
        sync(device)
        t2 = time.perf_counter()
        x = scheduler.step(output, t, x, **extra).prev_sample
        sync(device)
        t3 = time.perf_counter()
        in_scheduler += (t1 - t0) + (t3 - t2)
        in_model += t2 - t1
    return LoopResult(x, len(timesteps), in_scheduler, in_model)
