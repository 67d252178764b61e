"""Host overhead per call: what a sampling step costs the CPU before and around its kernel.

At a tiny shape the arithmetic is nothing, so the time per call is the Python and dispatch work of the call
itself: argument checks, backend selection, the operator call. Rows: ``torch.add`` (the floor any op pays),
each public op through ``ddpm_kernels.<op>`` on the CPU backend with given noise, the compiled operator called
directly with prepared arguments (what the public layer adds on top of it), and, with diffusers installed, the
fused schedulers' ``step`` against the stock ones. One thread, so a parallel region's wake-up is not counted.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple

import torch

from .._spec import OPS
from ..schedule import DiffusionSchedule
from .cases import Case, CaseSpec, diffusers_installed
from .sweep import served_by
from .timing import interleaved_host_times

SHAPE = (1, 4, 8, 8)
DTYPE = torch.float32
BLOCKS = 5
# inference steps of the diffusers schedulers; the timed step is the middle one
_INFERENCE_STEPS = 50

# (name, runs on, callable or None, note, baseline name or None)
Candidate = Tuple[str, str, Optional[Callable[[], object]], str, Optional[str]]


def _public_ops(schedule: DiffusionSchedule) -> List[Candidate]:
    device = torch.device("cpu")
    out = []
    for spec in OPS.values():
        case = Case(CaseSpec(spec.name, spec), SHAPE, DTYPE, device, schedule)
        try:
            runs_on = served_by(case, "cpu")
        except Exception as exc:  # the CPU backend is not built here: say so in the row
            out.append((f"dk.{spec.name}", "-", None, f"{type(exc).__name__}: {exc}"[:120], None))
            continue
        note = "" if runs_on == "cpu" else "the CPU backend declines it"
        out.append((f"dk.{spec.name}", runs_on, case.call("cpu"), note, None))
    return out


def _raw_operator(schedule: DiffusionSchedule) -> Candidate:
    name = "torch.ops.ddpm_kernels.p_sample.default"
    from .. import _native

    if _native.schema_lib is None:
        return name, "-", None, f"compiled library not loaded: {_native.load_error}"[:120], None
    case = Case("p_sample", SHAPE, DTYPE, torch.device("cpu"), schedule)
    ts = case.tensors
    op = torch.ops.ddpm_kernels.p_sample.default
    args = (ts["x_t"], ts["t"], ts["model_output"], schedule.table(DTYPE), "eps", True, ts["noise"], None, 0)
    return name, "cpu", lambda: op(*args), "arguments prepared once", "dk.p_sample"


def _diffusers_steps() -> List[Candidate]:
    if not diffusers_installed():
        return []
    from diffusers import DDIMScheduler, DDPMScheduler

    try:
        from ..integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler
    except Exception as exc:
        why = f"integration not importable: {type(exc).__name__}"
        return [(f"{cls}.step", "-", None, why, None) for cls in ("FusedDDIMScheduler", "FusedDDPMScheduler")]
    g = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = []
    for stock, fused in ((DDIMScheduler, FusedDDIMScheduler), (DDPMScheduler, FusedDDPMScheduler)):
        for cls, runs_on, baseline in ((stock, "diffusers", None), (fused, "auto", f"{stock.__name__}.step")):
            scheduler = cls(num_train_timesteps=1000)
            scheduler.set_timesteps(_INFERENCE_STEPS)
            # an element of scheduler.timesteps, as pipelines pass it
            timestep = scheduler.timesteps[_INFERENCE_STEPS // 2]

            def step(scheduler=scheduler, timestep=timestep):
                return scheduler.step(model_output, timestep, sample).prev_sample

            out.append((f"{cls.__name__}.step", runs_on, step, "", baseline))
    return out


def _walking_steps(stock, fused_name: str, steps: int, **config) -> List[Candidate]:
    """Stock and fused ``step`` of the scheduler class ``stock`` (its drop-in named ``fused_name``) walking a
    ``steps``-step schedule in order (as a pipeline does), rewound to its start when it runs out. The schedulers
    that ask for ``scale_model_input`` first are told it was called (a pipeline calls it; its cost is not the
    step's)."""
    try:
        from ..integrations import diffusers as integration

        fused = getattr(integration, fused_name)
    except Exception as exc:
        return [(f"{fused_name}.step", "-", None, f"integration not importable: {type(exc).__name__}", None)]
    g = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = []
    stock_name = f"{stock.__name__}.step"
    for cls, runs_on, baseline in ((stock, "diffusers", None), (fused, "auto", stock_name)):
        scheduler = cls(**config)

        def start(scheduler=scheduler):
            scheduler.set_timesteps(steps)
            if hasattr(scheduler, "is_scale_input_called"):
                scheduler.is_scale_input_called = True
            return list(scheduler.timesteps)  # elements of scheduler.timesteps, as pipelines pass them

        state = {"i": 0, "timesteps": start()}

        def step(scheduler=scheduler, state=state, start=start):
            if state["i"] == steps:  # rewind: one call in a thousand
                state.update(i=0, timesteps=start())
            result = scheduler.step(model_output, state["timesteps"][state["i"]], sample).prev_sample
            state["i"] += 1
            return result

        out.append((f"{cls.__name__}.step", runs_on, step, "", baseline))
    return out


# the drop-ins walking a schedule: (stock class, steps, config); LCM's schedule has at most its 50 original steps
_WALKING = (
    ("FlowMatchEulerDiscreteScheduler", 1000, {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", 1000, {}),  # DPM-Solver++ 2M
    ("UniPCMultistepScheduler", 1000, {}),
    ("EulerDiscreteScheduler", 1000, {}),
    ("EulerAncestralDiscreteScheduler", 1000, {}),  # (its noise drawn as stock draws it, every step)
    ("LCMScheduler", 50, {}),  # (its noise drawn as stock draws it, every step but the last)
)


def _sigma_table_steps() -> List[Candidate]:
    """``step`` of the sigma-table and solver schedulers (`_WALKING`) over their schedules, stock and fused."""
    if not diffusers_installed():
        return []
    import diffusers

    out = []
    for name, steps, config in _WALKING:
        out += _walking_steps(getattr(diffusers, name), "Fused" + name, steps, **config)
    return out


def candidates(schedule: DiffusionSchedule) -> List[Candidate]:
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    floor: Candidate = ("torch.add", "aten", lambda: torch.add(a, b), "the floor: one ATen op", None)
    return [floor] + _public_ops(schedule) + [_raw_operator(schedule)] + _diffusers_steps() + _sigma_table_steps()


def host_overhead(iters: int = 1000, rounds: int = 15, timesteps: int = 1000) -> dict:
    """The host-overhead table: ``{shape, dtype, threads, iters, blocks, rounds, rows}`` with a row per call:
    ``name``, ``runs_on``, ``median_us``, ``min_of_medians_us``, ``vs_floor`` (× torch.add's median),
    ``baseline`` and ``speedup_vs_baseline`` (the baseline's median over this row's), ``note``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        schedule = DiffusionSchedule(timesteps=timesteps)
        table = candidates(schedule)
        timed = {name: fn for name, _, fn, _, _ in table if fn is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallbacks are named in the rows; a warning per call is noise
            times = interleaved_host_times(timed, iters, rounds, BLOCKS)
    finally:
        torch.set_num_threads(threads)
    nan = float("nan")
    floor = times["torch.add"][0]
    rows = []
    for name, runs_on, _, note, baseline in table:
        median, best = times.get(name, (nan, nan))
        base = times.get(baseline, (nan,))[0] if baseline else nan
        rows.append(dict(name=name, runs_on=runs_on, median_us=median * 1e6, min_of_medians_us=best * 1e6,
                         vs_floor=median / floor, baseline=baseline, speedup_vs_baseline=base / median if baseline
                         else None, note=note))
    return dict(shape=list(SHAPE), dtype=str(DTYPE).split(".")[-1], threads=1, iters=iters, blocks=BLOCKS,
                rounds=rounds, rows=rows)


def markdown(table: dict) -> List[str]:
    """The table's markdown lines."""
    from .report import fmt

    shape = "x".join(map(str, table["shape"]))
    lines = [
        f"Host overhead per call ({shape} {table['dtype']} CPU tensors, {table['threads']} thread; median of "
        f"{table['rounds']} rounds x {table['blocks']} blocks of {table['iters']} calls, and the least "
        "disturbed round's median):",
        "",
        "| call | runs on | µs (median) | µs (min of round medians) | × torch.add | speedup | vs | note |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['name']} | {r['runs_on']} | {fmt(r['median_us'], '.2f')} | {fmt(r['min_of_medians_us'], '.2f')} "
            f"| {fmt(r['vs_floor'], '.1f')} | {fmt(r['speedup_vs_baseline'], '.2f')} | {r['baseline'] or ''} "
            f"| {r['note']} |"
        )
    return lines
