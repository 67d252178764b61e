"""Timing a sampling step on every backend, and the machine conditions that the timings depend on."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from .. import flow
from .. import ops as dk_ops
from ..diffusion import GaussianDiffusion
from ..flow_matching import FlowMatching
from .model import Generative, is_flow, sample_shape, step_op

# The latent-diffusion-sized shape at which the op's memory traffic, not its launch, dominates.
LATENT_SHAPE = (8, 4, 64, 64)
# Backends are timed in interleaved rounds: on a shared, noisy machine each sees the same conditions.
TIMING_ROUNDS = 5

R = TypeVar("R")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], R], device) -> Tuple[R, float]:
    """``(fn(), seconds)``; on CUDA synchronised around the call so the kernels' time is counted."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_time(fn, repeats: int, device) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA: synchronised around each call)."""
    for _ in range(max(2, repeats // 10)):
        fn()
    return statistics.median([timed(fn, device)[1] for _ in range(repeats)])


def _step_calls(
    diffusion: GaussianDiffusion, batch_size: int, latent_shape: Sequence[int], seed: int
) -> Dict[str, Callable[[str], Callable[[], object]]]:
    """{kind: backend name -> the call to time}; the inputs are drawn once, so every backend does the same work."""
    device = diffusion.device
    s = diffusion.schedule
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(sample_shape(diffusion, batch_size), generator=g, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=g, device=device)
    model_out = diffusion.model(x, t)
    xl = torch.randn(tuple(latent_shape), generator=g, device=device)
    tl = torch.randint(0, diffusion.num_timesteps, (xl.shape[0],), generator=g, device=device)
    outl = torch.randn(xl.shape, generator=g, device=device)
    buf, bufl = torch.empty_like(x), torch.empty_like(xl)
    kw = dict(parameterization=diffusion.parameterization, clip_denoised=diffusion.clip_denoised, generator=g)

    def op(name):
        return lambda: dk_ops.p_sample(x, t, model_out, s, backend=name, out=buf, **kw)

    def op_latent(name):
        return lambda: dk_ops.p_sample(xl, tl, outl, s, backend=name, out=bufl, **kw)

    def step(name):
        return lambda: dk_ops.p_sample(x, t, diffusion.model(x, t), s, backend=name, out=buf, **kw)

    return {"op": op, "op_latent": op_latent, "step": step}


def _flow_step_calls(
    fm: FlowMatching, batch_size: int, latent_shape: Sequence[int], seed: int
) -> Dict[str, Callable[[str], Callable[[], object]]]:
    """As `_step_calls`, for the Euler step of a `FlowMatching` (``flow_step`` on its sigma table)."""
    device = fm.device
    sigmas = fm.sigma_table()
    n = sigmas.shape[0] - 1
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(sample_shape(fm, batch_size), generator=g, device=device)
    i = torch.randint(0, n, (batch_size,), generator=g, device=device)
    t = fm.model_timesteps(sigmas[i])
    model_out = fm.model(x, t)
    xl = torch.randn(tuple(latent_shape), generator=g, device=device)
    il = torch.randint(0, n, (xl.shape[0],), generator=g, device=device)
    outl = torch.randn(xl.shape, generator=g, device=device)
    buf, bufl = torch.empty_like(x), torch.empty_like(xl)

    def op(name):
        return lambda: flow.flow_step(x, model_out, sigmas, i, backend=name, out=buf)

    def op_latent(name):
        return lambda: flow.flow_step(xl, outl, sigmas, il, backend=name, out=bufl)

    def step(name):
        return lambda: flow.flow_step(x, fm.model(x, t), sigmas, i, backend=name, out=buf)

    return {"op": op, "op_latent": op_latent, "step": step}


@torch.no_grad()
def time_sampling_step(
    diffusion: Generative, batch_size: int, backend_names: Sequence[str], repeats: int = 50,
    latent_shape: Sequence[int] = LATENT_SHAPE, seed: int = 0
) -> List[Dict[str, object]]:
    """Per-step sampling time on each backend, same inputs, interleaved so load changes hit all alike.

    For each backend: the step op alone (``p_sample``; ``flow_step`` for flow matching) at the demo's shape and
    at a latent-diffusion-sized shape (``latent_shape``, where the op's memory traffic matters), and a whole step
    (UNet call + the op), as the sampling loop runs it (DDPM: ``noise=None``, noise drawn by the backend from a
    generator). The row's keys name the op: ``p_sample_us``, ``p_sample_latent_us`` (``flow_step_us``, ...).
    """
    device = diffusion.device
    make_calls = _flow_step_calls if is_flow(diffusion) else _step_calls
    calls = make_calls(diffusion, batch_size, latent_shape, seed)
    name_op = step_op(diffusion)
    # The slower the call, the fewer repeats its median needs.
    call_repeats = {"op": repeats, "op_latent": max(5, repeats // 5), "step": max(3, repeats // 10)}
    results = {name: {kind: [] for kind in calls} for name in backend_names}
    for _ in range(TIMING_ROUNDS):
        for name in backend_names:
            for kind, call in calls.items():
                results[name][kind].append(median_time(call(name), call_repeats[kind], device))
    rows = []
    for name in backend_names:
        r = {k: statistics.median(v) for k, v in results[name].items()}
        rows.append(
            {
                "backend": name,
                f"{name_op}_us": r["op"] * 1e6,
                f"{name_op}_latent_us": r["op_latent"] * 1e6,
                "step_ms": r["step"] * 1e3,
            }
        )
    return rows


def load_average() -> Optional[float]:
    """The 1-minute load average (other processes competing for the cores), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def auto_threads(device) -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load average).

    PyTorch's CPU ops split work across threads that meet at a barrier after every op; when another process
    holds one of the cores, every op waits for the descheduled thread. On a 2-core machine with a load of ~4
    this makes a training step 3x slower with 2 threads than with 1.
    """
    threads = torch.get_num_threads()
    load = load_average()
    if torch.device(device).type != "cpu" or load is None:
        return threads
    free = (os.cpu_count() or threads) - int(round(load))
    return max(1, min(threads, free))
