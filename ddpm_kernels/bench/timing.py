"""Timers: device time per call (CUDA events / blocked autorange), kernel launches and host syncs per call, the
copy bandwidth that bounds a memory-bound op, and interleaved host time per call for small calls."""

from __future__ import annotations

import gc
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.3):
    """(median, q20, q80) seconds per call. CUDA: triton.testing.do_bench (CUDA events, L2 flushed between
    calls). CPU: torch.utils.benchmark's blocked_autorange (blocks of calls, robust to timer resolution)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, q20, q80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=max(100, int(min_run_time * 1000)))
        return med * 1e-3, q20 * 1e-3, q80 * 1e-3
    from torch.utils.benchmark import Timer

    fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = np.asarray(m.times)
    return float(m.median), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernels per call on CUDA (device kernel events); on CPU the top-level operator calls (ATen ops, custom
    ops, compiled regions), which is what eager dispatch and an elementwise loop pay per pass."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name
                   and "Memset" not in e.name)
    return sum(1 for e in events if e.cpu_parent is None and e.device_type == DeviceType.CPU)


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Synchronizing CUDA calls per call, from torch.cuda.set_sync_debug_mode('warn'); None on CPU."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def copy_bandwidth(nbytes: int, device: torch.device, min_run_time: float) -> float:
    """Bytes/s of ``dst.copy_(src)`` moving ``nbytes`` in all (read + write): the roof for an op that moves as
    many bytes. Matching the bytes, not the element count, keeps the working set the same size, so a copy that
    would fit in cache is not compared with an op whose three or four tensors do not."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device, min_run_time)
    return 2 * src.numel() * src.element_size() / med


def paired_median_times(fn_a, fn_b, device: torch.device, min_run_time: float, min_reps: int = 5):
    """Median seconds of two callables timed alternately, so both see the same machine state."""
    times_a, times_b = [], []
    start = time.perf_counter()
    while len(times_a) < min_reps or time.perf_counter() - start < 2 * min_run_time:
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times_a)), float(np.median(times_b))


def interleaved_host_times(fns: Dict[str, Callable[[], object]], iters: int, rounds: int,
                           blocks: int = 5) -> Dict[str, Tuple[float, float]]:
    """``{name: (median, min of round medians)}`` seconds per call of small host-bound calls.

    A block is ``iters`` back-to-back calls timed together (one call is too short for the clock); each round
    times ``blocks`` blocks of every callable, starting the order one further each round, so slow phases of a
    shared machine fall on all of them alike. The median is over every block; the min of the round medians is
    the least disturbed round, the closest to the machine's own cost."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    names = list(fns)
    blocks_s: Dict[str, list] = {n: [] for n in names}
    round_medians: Dict[str, list] = {n: [] for n in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # a collection inside a block would be charged to whichever call happened to trigger it
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn, times = fns[name], []
                for _ in range(blocks):
                    t0 = time.perf_counter_ns()
                    for _ in range(iters):
                        fn()
                    times.append((time.perf_counter_ns() - t0) * 1e-9 / iters)
                blocks_s[name] += times
                round_medians[name].append(float(np.median(times)))
    finally:
        if enabled:
            gc.enable()
    return {n: (float(np.median(blocks_s[n])), min(round_medians[n])) for n in names}
