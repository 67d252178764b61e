"""The sweep: every provider on one case side by side (one `Row` each), and the end-to-end sampling loop."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import backends
from .cases import CASES, Case, has_diffusers_counterpart
from .loops import diffusers_loop
from .timing import copy_bandwidth, count_host_syncs, count_launches, paired_median_times, sync, time_fn


@dataclass
class Row:
    op: str
    shape: List[int]
    dtype: str
    provider: str
    median_us: float
    q20_us: float
    q80_us: float
    bytes: int
    gbps: float
    pct_copy_bw: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    launches: Optional[int] = None
    host_syncs: Optional[int] = None
    compile_s: Optional[float] = None
    condition: str = ""
    note: str = ""


def fused_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> List[str]:
    """The fused backends worth timing here: Triton on CPU is its interpreter, for testing, not speed."""
    names = [b for b in backends.available_backends(device, dtype) if b != "reference"]
    return [b for b in names if not (device.type == "cpu" and b == "triton")]


def providers(case: str, device: torch.device, dtype: torch.dtype, wanted: Optional[Sequence[str]] = None,
              mixed: bool = False):
    """Provider names for one case: eager, compile, each fused backend, its ``+out`` form where the op takes
    ``out=``, its ``+cast`` form in a ``mixed`` case (the model output cast first), and diffusers where it has a
    counterpart (not in a mixed case); ``wanted`` filters (a backend name keeps its +out and +cast)."""
    spec = CASES[case]
    fused = [b for b in fused_backends(device, dtype)
             if spec.spec.name in backends.get_backend(b, device, dtype).ops]
    names = ["eager", "compile"] + fused
    if spec.spec.has_out and not spec.backward:
        names += [f + "+out" for f in fused]
    if mixed:
        names += [f + "+cast" for f in fused]
    elif has_diffusers_counterpart(case):
        names.append("diffusers")
    if wanted:
        names = [n for n in names if n in wanted or n.split("+")[0] in wanted]
    return names


def served_by(case: Case, backend: str) -> str:
    """The backend that actually serves the case's call when ``backend`` is asked for (the dispatcher runs the
    reference for options or gradients a fused backend declines)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning is reported in the row's note instead
        return backends.resolve(case.spec.name, backend, case.device, case.dtype, case.case.step_options,
                                case.grad_inputs)[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def provider_calls(case: Case, provider: str):
    """``(callables by row label, note, compile seconds)`` of one provider on one case; no callables when a
    compile failed (the note says why) or diffusers has no counterpart."""
    if provider == "eager":
        return {"eager": case.call("reference")}, "", None
    if provider == "compile":
        start = time.perf_counter()
        try:
            fn = case.compiled()
            fn()
            sync(case.device)
        except Exception as exc:  # report, don't die: a compile failure is a result too
            return {}, f"compile failed: {type(exc).__name__}", None
        return {"compile": fn}, "", time.perf_counter() - start
    if provider == "diffusers":
        return case.diffusers_calls(), case.diffusers_note, None
    name, _, form = provider.partition("+")
    fns = {provider: case.call(name, out=form == "out", cast=form == "cast")}
    served = served_by(case, name)
    return fns, "" if served == name else f"served by the {served} backend", None


def run_case(case: Case, names: Sequence[str], min_run_time: float, condition: str, progress=None) -> List[Row]:
    rows: List[Row] = []
    device, shape, dtype = case.device, list(case.shape), _dtype_name(case.dtype)
    if case.model_dtype is not None:  # fp32 data with a low-precision model output
        dtype += "+" + _dtype_name(case.model_dtype)
    copy_bw = copy_bandwidth(case.bytes, device, min_run_time)
    for provider in names:
        fns, note, compile_s = provider_calls(case, provider)
        if provider == "compile" and not fns:
            nan = float("nan")
            rows.append(Row(case.op, shape, dtype, "compile", nan, nan, nan, case.bytes, nan, condition=condition,
                            note=note))
        for label, fn in fns.items():
            med, q20, q80 = time_fn(fn, device, min_run_time)
            rows.append(
                Row(
                    op=case.op, shape=shape, dtype=dtype, provider=label,
                    median_us=med * 1e6, q20_us=q20 * 1e6, q80_us=q80 * 1e6,
                    bytes=case.bytes, gbps=case.bytes / med / 1e9, pct_copy_bw=100.0 * (case.bytes / med) / copy_bw,
                    launches=count_launches(fn, device), host_syncs=count_host_syncs(fn, device),
                    compile_s=compile_s, condition=condition, note=note,
                )
            )
        if progress is not None:
            progress.update(1)
    base = {r.provider: r.median_us for r in rows}
    for r in rows:
        if "eager" in base:
            r.speedup_vs_eager = base["eager"] / r.median_us
        if "compile" in base and base["compile"] == base["compile"]:
            r.speedup_vs_compile = base["compile"] / r.median_us
    return rows


def end_to_end(device: torch.device, shape: Sequence[int], steps: int, min_run_time: float) -> List[dict]:
    """A sampling loop of a small UNet: per-step wall time with each backend, and the scheduler's share."""
    from ..diffusion import GaussianDiffusion
    from ..schedule import DiffusionSchedule
    from ..unet import UNet

    torch.manual_seed(0)
    b, c, h, w = shape
    model = UNet(in_channels=c, base_channels=64, channel_mult=(1, 2, 2)).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    s = DiffusionSchedule(timesteps=steps).to(device)
    x = torch.randn(tuple(shape), device=device)
    t = torch.full((b,), steps - 1, device=device, dtype=torch.long)

    @torch.no_grad()
    def model_loop():  # the sampling loop's model calls, timesteps included, and nothing else
        for i in reversed(range(steps)):
            t.fill_(i)
            model(x, t)

    results = []
    for backend in ["reference"] + fused_backends(device):
        d = GaussianDiffusion(model, s, backend=backend, image_size=(h, w), channels=c).to(device)
        d.p_sample_loop(tuple(shape), progress=False)  # warm-up
        # the sampling loop and the model-only loop alternate: the scheduler's share is their difference
        loop_s, model_s = paired_median_times(lambda: d.p_sample_loop(tuple(shape), progress=False), model_loop,
                                              device, min_run_time)
        results.append(
            dict(backend=backend, shape=list(shape), steps=steps, model_params=params,
                 step_ms=loop_s / steps * 1e3, model_ms=model_s / steps * 1e3,
                 scheduler_share_pct=max(0.0, 100.0 * (loop_s - model_s) / loop_s))
        )
    return results + _dpm_solver_loops(model, x, t, steps, device, min_run_time, model_loop, params)


def _dpm_solver_loops(model, x, t, steps, device, min_run_time, model_loop, params) -> List[dict]:
    """The same UNet under a DPM-Solver++ 2M loop: diffusers' ``DPMSolverMultistepScheduler`` and its drop-in
    ``FusedDPMSolverMultistepScheduler`` (``set_timesteps`` once per loop, as a pipeline calls it), each
    alternating with the model-only loop; empty without diffusers."""
    try:
        from diffusers import DPMSolverMultistepScheduler

        from ..integrations.diffusers import FusedDPMSolverMultistepScheduler
    except ImportError:
        return []

    def unet(sample, timestep):  # the UNet at the loop's timestep, in the preallocated timestep tensor t
        return model(sample, t.fill_(timestep))

    results = []
    for label, cls in (("diffusers DPM++ 2M", DPMSolverMultistepScheduler),
                       ("fused DPM++ 2M", FusedDPMSolverMultistepScheduler)):
        scheduler = cls(algorithm_type="dpmsolver++", solver_order=2)

        def loop(scheduler=scheduler):
            return diffusers_loop(scheduler, unet, x, steps, device).sample

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a backend's fallback to the reference is the row's own business
            loop()  # warm-up
            loop_s, model_s = paired_median_times(loop, model_loop, device, min_run_time)
        results.append(
            dict(backend=label, shape=list(x.shape), steps=steps, model_params=params,
                 step_ms=loop_s / steps * 1e3, model_ms=model_s / steps * 1e3,
                 scheduler_share_pct=max(0.0, 100.0 * (loop_s - model_s) / loop_s))
        )
    return results


# the diffusers schedulers whose fused drop-ins the scheduler-loop table compares with stock: (label, class, config)
# Stable Diffusion's training schedule, for the schedulers built on one
_SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# (label, diffusers class name, constructor arguments)
SCHEDULER_LOOPS = (
    ("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", dict(_SD_BETAS, algorithm_type="dpmsolver++", solver_order=2)),
    ("DPM-Solver++ 2M SDE", "DPMSolverMultistepScheduler",
     dict(_SD_BETAS, algorithm_type="sde-dpmsolver++", solver_order=2)),
    ("UniPC", "UniPCMultistepScheduler", _SD_BETAS),
    ("Euler ancestral", "EulerAncestralDiscreteScheduler", _SD_BETAS),
    ("Euler", "EulerDiscreteScheduler", _SD_BETAS),
    ("DDIM", "DDIMScheduler", _SD_BETAS),
    ("DDPM", "DDPMScheduler", _SD_BETAS),
    ("LCM", "LCMScheduler", _SD_BETAS),
    ("Flow matching Euler", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
)


def _loop_times(loop, device: torch.device, min_run_time: float):
    """``(loop, model, scheduler)`` median seconds: ``loop()`` untimed (its wall time) alternating with
    ``loop(timed=True)`` (its model and scheduler seconds, `diffusers_loop`'s count; `paired_median_times`), so
    both see the same machine state."""
    models, schedulers = [], []

    def timed():
        result = loop(timed=True)
        models.append(result.model_seconds)
        schedulers.append(result.scheduler_seconds)

    loop_s, _ = paired_median_times(loop, timed, device, min_run_time)
    return loop_s, float(np.median(models)), float(np.median(schedulers))


def scheduler_loops(device: torch.device, shape: Sequence[int], steps: int, min_run_time: float) -> List[dict]:
    """Whole ``steps``-step diffusers sampling loops with a toy model (one 1x1 convolution, so the scheduler's
    cost is visible), the stock scheduler against its fused drop-in: per step the loop's wall time (untimed
    loops), and the model's and the scheduler's time measured call by call inside the same loops (timed loops,
    alternating with the untimed ones; medians). The model's time is measured on the loop's own samples, not
    apart from the loop: the same convolution on other data, or after other allocations, can take several times
    as long on a CPU. Empty without diffusers; a scheduler without a drop-in is skipped."""
    try:
        import diffusers
    except ImportError:
        return []
    from ..integrations import diffusers as fused

    torch.manual_seed(0)
    c = shape[1]
    model = torch.nn.Conv2d(c, c, 1).to(device).eval() if len(shape) == 4 else torch.nn.Linear(c, c).to(device)
    x_init = torch.randn(tuple(shape), device=device)

    def toy_model(x, t):
        return model(x)

    results = []
    for label, name, config in SCHEDULER_LOOPS:
        if getattr(fused, "Fused" + name, None) is None:
            continue
        per_impl = {}
        for impl, cls in (("stock", getattr(diffusers, name)), ("fused", getattr(fused, "Fused" + name))):
            scheduler = cls(**config)
            g = torch.Generator(device=device)

            def loop(scheduler=scheduler, g=g, timed=False):
                g.manual_seed(0)
                return diffusers_loop(scheduler, toy_model, x_init, steps, device, generator=g, timed=timed)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_impl[impl] = loop().sample  # warm-up (lazy tables, caches), and the result to compare
                loop_s, model_s, scheduler_s = _loop_times(loop, device, min_run_time)
            results.append(dict(scheduler=label, implementation=impl, shape=list(shape), steps=steps,
                                step_ms=loop_s / steps * 1e3, model_ms=model_s / steps * 1e3,
                                scheduler_ms=scheduler_s / steps * 1e3))
        diff = (per_impl["fused"].double() - per_impl["stock"].double()).abs().max().item()
        stock_ms = results[-2]["scheduler_ms"]
        results[-1].update(max_abs_diff_vs_stock=diff,
                           scheduler_speedup=stock_ms / results[-1]["scheduler_ms"] if results[-1]["scheduler_ms"]
                           else None)
    return results
