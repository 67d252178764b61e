"""``python -m ddpm_kernels bench``: every backend against eager PyTorch and torch.compile, side by side.

For each op x shape x dtype x provider one row: median time per call (and 20/80% quantiles), the bytes the op
must move, GB/s, % of the copy bandwidth measured in the same run for the same number of elements, speedup vs
eager and vs torch.compile, launches per call and host syncs per call (counted with the profiler and
``torch.cuda.set_sync_debug_mode``, not assumed). Results go to JSON (with device, versions, date, commit), and
a markdown table and a PNG plot are generated from the JSON.

Providers
  eager       the pure-PyTorch reference (``backend="reference"``): the seed's eager per-step code
  compile     ``torch.compile`` of that same call (compile time reported separately, excluded from timings)
  <backend>   each fused backend available for the device and dtype (cpu / triton / cuda)
  <backend>+out   the same with a preallocated ``out=`` (q_sample, p_sample)
  diffusers   ``DDPMScheduler.add_noise`` / ``DDPMScheduler.step`` / ``DDIMScheduler.step`` when installed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import __version__, backends
from . import ops as dk
from ._info import cpu_name
from .schedule import DiffusionSchedule

OPS = ("q_sample", "p_sample", "p_sample_rng", "loss_fwd_bwd")
OP_HELP = {
    "q_sample": "x_t = sqrt(ab) x0 + sqrt(1-ab) eps (reads x0, eps; writes x_t)",
    "p_sample": "one ancestral step with given noise (reads x_t, model output, noise; writes x_{t-1})",
    "p_sample_rng": "one ancestral step drawing its own noise (reads x_t, model output; writes x_{t-1})",
    "loss_fwd_bwd": "eps/l2 diffusion loss forward + gradient w.r.t. model output",
}
# Full tensors read + written per call, in units of the data tensor's size.
TENSOR_PASSES = {"q_sample": 3, "p_sample": 4, "p_sample_rng": 3, "loss_fwd_bwd": 5}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
GPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (64, 4, 128, 128), (128, 3, 32, 32))
CPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64))


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


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device):
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
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
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


# ------------------------------------------------------------------------------------------------ cases
class Case:
    """Inputs of one op x shape x dtype on a device, and the callables each provider times."""

    def __init__(self, op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 schedule: DiffusionSchedule, memory_format: torch.memory_format = torch.contiguous_format):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.op, self.shape, self.dtype, self.device, self.s = op, tuple(shape), dtype, device, schedule
        T = schedule.num_timesteps

        def rand():
            x = torch.randn(self.shape, generator=g).to(device=device, dtype=dtype)
            return x.contiguous(memory_format=memory_format)

        self.x, self.mo, self.z = rand(), rand(), rand()
        self.t = torch.randint(0, T, (self.shape[0],), generator=g).to(device)
        self.out = torch.empty_like(self.x)
        self.numel = self.x.numel()
        self.bytes = TENSOR_PASSES[op] * self.numel * self.x.element_size()

    def call(self, backend: str, out: bool = False) -> Callable[[], object]:
        x, mo, z, t, s = self.x, self.mo, self.z, self.t, self.s
        o = self.out if out else None
        if self.op == "q_sample":
            return lambda: dk.q_sample(x, t, z, s, backend=backend, out=o)
        if self.op == "p_sample":
            return lambda: dk.p_sample(x, t, mo, s, "eps", True, z, None, backend=backend, out=o)
        if self.op == "p_sample_rng":
            return lambda: dk.p_sample(x, t, mo, s, "eps", True, None, None, backend=backend, out=o)
        mo_grad = mo.detach().requires_grad_(True)

        def loss_fwd_bwd():
            loss = dk.diffusion_loss(mo_grad, x, z, t, s, backend=backend)[0]
            return torch.autograd.grad(loss, mo_grad)

        return loss_fwd_bwd

    def compiled(self) -> Callable[[], object]:
        x, mo, z, t, s = self.x, self.mo, self.z, self.t, self.s
        if self.op == "q_sample":
            f = torch.compile(lambda x, t, z: dk.q_sample(x, t, z, s, backend="reference"), dynamic=False)
            return lambda: f(x, t, z)
        if self.op == "p_sample":
            f = torch.compile(lambda x, t, mo, z: dk.p_sample(x, t, mo, s, noise=z, backend="reference"),
                              dynamic=False)
            return lambda: f(x, t, mo, z)
        if self.op == "p_sample_rng":
            f = torch.compile(lambda x, t, mo: dk.p_sample(x, t, mo, s, backend="reference"), dynamic=False)
            return lambda: f(x, t, mo)
        f = torch.compile(lambda mo, x, z, t: dk.diffusion_loss(mo, x, z, t, s, backend="reference")[0],
                          dynamic=False)
        mo_grad = mo.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(f(mo_grad, x, z, t), mo_grad)

    def diffusers_calls(self) -> Dict[str, Callable[[], object]]:
        try:
            from diffusers import DDIMScheduler, DDPMScheduler
        except ImportError:
            return {}
        betas = self.s.betas.detach().cpu()
        T = self.s.num_timesteps
        x, mo, z = self.x, self.mo, self.z
        # diffusers takes one scalar timestep per call (its step indexes tables on the host)
        step = T // 2
        ddpm = DDPMScheduler(num_train_timesteps=T, trained_betas=betas.tolist())
        ddpm.alphas_cumprod = ddpm.alphas_cumprod.to(self.device)
        if self.op == "q_sample":
            ts = self.t
            return {"diffusers": lambda: ddpm.add_noise(x, z, ts)}
        if self.op == "p_sample_rng":
            return {"diffusers": lambda: ddpm.step(mo, step, x).prev_sample}
        if self.op == "p_sample":
            ddim = DDIMScheduler(num_train_timesteps=T, trained_betas=betas.tolist())
            ddim.set_timesteps(T)
            ddim.alphas_cumprod = ddim.alphas_cumprod.to(self.device)
            return {"diffusers_ddim": lambda: ddim.step(mo, step, x, eta=1.0, variance_noise=z).prev_sample}
        return {}


def _providers(device: torch.device, dtype: torch.dtype, wanted: Optional[Sequence[str]]):
    fused = [b for b in backends.available_backends(device, dtype) if b != "reference"]
    if device.type == "cpu":
        fused = [b for b in fused if b != "triton"]  # the interpreter is for testing, not speed
    names = ["eager", "compile"] + fused + [f + "+out" for f in fused] + ["diffusers"]
    if wanted:
        names = [n for n in names if n in wanted or n.split("+")[0] in wanted]
    return names


def run_case(case: Case, providers: Sequence[str], min_run_time: float, condition: str, progress=None) -> List[Row]:
    rows: List[Row] = []
    device = case.device
    copy_bw = copy_bandwidth(case.bytes, device, min_run_time)
    for provider in providers:
        compile_s = None
        note = ""
        if provider == "eager":
            fns = {"eager": case.call("reference")}
        elif provider == "compile":
            start = time.perf_counter()
            try:
                fn = case.compiled()
                fn()
                _sync(device)
            except Exception as exc:  # report, don't die: a compile failure is a result too
                rows.append(Row(case.op, list(case.shape), str(case.dtype).split(".")[-1], "compile", *(
                    [float("nan")] * 3), case.bytes, float("nan"), condition=condition,
                    note=f"compile failed: {type(exc).__name__}"))
                continue
            compile_s = time.perf_counter() - start
            fns = {"compile": fn}
        elif provider == "diffusers":
            fns = case.diffusers_calls()
            note = "scalar timestep" if fns else ""
        else:
            name, _, out = provider.partition("+")
            if out and case.op == "loss_fwd_bwd":
                continue
            fns = {provider: case.call(name, out=bool(out))}
        for label, fn in fns.items():
            med, q20, q80 = time_fn(fn, device, min_run_time)
            rows.append(
                Row(
                    op=case.op,
                    shape=list(case.shape),
                    dtype=str(case.dtype).split(".")[-1],
                    provider=label,
                    median_us=med * 1e6,
                    q20_us=q20 * 1e6,
                    q80_us=q80 * 1e6,
                    bytes=case.bytes,
                    gbps=case.bytes / med / 1e9,
                    pct_copy_bw=100.0 * (case.bytes / med) / copy_bw,
                    launches=count_launches(fn, device),
                    host_syncs=count_host_syncs(fn, device),
                    compile_s=compile_s,
                    condition=condition,
                    note=note,
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


# ------------------------------------------------------------------------------------------------ e2e
def end_to_end(device: torch.device, shape: Sequence[int], steps: int, min_run_time: float) -> List[dict]:
    """A sampling loop of a small UNet: per-step wall time with each backend, and the scheduler's share."""
    from .diffusion import GaussianDiffusion
    from .unet import UNet

    torch.manual_seed(0)
    b, c, h, w = shape
    model = UNet(in_channels=c, base_channels=64, channel_mult=(1, 2, 2)).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    s = DiffusionSchedule(timesteps=steps).to(device)
    x = torch.randn(tuple(shape), device=device)
    t = torch.full((b,), steps - 1, device=device, dtype=torch.long)

    def paired_median_times(fn_a, fn_b, min_reps=5):
        """Median seconds of two callables timed alternately, so both see the same machine state."""
        times_a, times_b = [], []
        start = time.perf_counter()
        while len(times_a) < min_reps or time.perf_counter() - start < 2 * min_run_time:
            for fn, times in ((fn_a, times_a), (fn_b, times_b)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
        return float(np.median(times_a)), float(np.median(times_b))

    @torch.no_grad()
    def model_loop():  # the sampling loop's model calls, timesteps included, and nothing else
        for i in reversed(range(steps)):
            t.fill_(i)
            model(x, t)

    results = []
    names = ["reference"] + [n for n in backends.available_backends(device) if n != "reference"
                             and not (device.type == "cpu" and n == "triton")]
    for backend in names:
        d = GaussianDiffusion(model, s, backend=backend, image_size=(h, w), channels=c).to(device)
        d.p_sample_loop(tuple(shape), progress=False)  # warm-up
        # the sampling loop and the model-only loop alternate: the scheduler's share is their difference
        loop_s, model_s = paired_median_times(lambda: d.p_sample_loop(tuple(shape), progress=False), model_loop)
        results.append(
            dict(backend=backend, shape=list(shape), steps=steps, model_params=params,
                 step_ms=loop_s / steps * 1e3, model_ms=model_s / steps * 1e3,
                 scheduler_share_pct=max(0.0, 100.0 * (loop_s - model_s) / loop_s))
        )
    return results


# ------------------------------------------------------------------------------------------------ report
def _meta(device: torch.device) -> dict:
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
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
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


def _fmt(v, spec):
    return "" if v is None or v != v else format(v, spec)


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"### {meta['device_name']} ({meta['device']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['date']}, commit {meta['git_commit']}",
        "",
        "| op | shape | dtype | provider | condition | µs (median) | GB/s | % copy BW | × eager | × compile "
        "| launches | host syncs | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['provider']} | {r['condition']} "
            f"| {_fmt(r['median_us'], '.1f')} | {_fmt(r['gbps'], '.1f')} | {_fmt(r['pct_copy_bw'], '.0f')} "
            f"| {_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(r['speedup_vs_compile'], '.2f')} "
            f"| {_fmt(r['launches'], 'd')} | {_fmt(r['host_syncs'], 'd')} | {r['note']} |"
        )
    if result.get("e2e"):
        lines += ["", "End to end (UNet sampling loop):", "",
                  "| backend | shape | UNet params | ms/step | model ms | scheduler share |",
                  "|---|---|---:|---:|---:|---:|"]
        for e in result["e2e"]:
            lines.append(f"| {e['backend']} | {'x'.join(map(str, e['shape']))} | {e['model_params'] / 1e6:.1f} M "
                         f"| {e['step_ms']:.2f} | {e['model_ms']:.2f} | {e['scheduler_share_pct']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return False
    rows = [r for r in result["rows"] if r["speedup_vs_eager"] and r["provider"] != "eager"]
    if not rows:
        return False
    keys = sorted({(r["op"], "x".join(map(str, r["shape"])), r["dtype"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * max(1, len(providers)) / 2), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        vals = []
        for k in keys:
            match = [r["speedup_vs_eager"] for r in rows if (r["op"], "x".join(map(str, r["shape"])), r["dtype"]) == k
                     and r["provider"] == p]
            vals.append(match[0] if match else 0)
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=p)
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


def _parse_shape(text: str):
    return tuple(int(v) for v in text.lower().split("x"))


def _other_malloc_condition(argv: List[str], out_json: str) -> List[dict]:
    """Re-run the eager rows in a child process under the other glibc malloc condition (the variable is read
    once at process start, so it cannot be toggled in-process)."""
    env = dict(os.environ)
    if "MALLOC_MMAP_THRESHOLD_" in env:
        env.pop("MALLOC_MMAP_THRESHOLD_")
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    else:
        # Both: a fixed mmap threshold also freezes the trim threshold at 128 KiB, and trimming the heap top
        # after every free page-faults the next temporary back in just as munmap would.
        env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 30)
    cmd = [sys.executable, "-m", "ddpm_kernels", "bench", *argv, "--providers", "eager", "--no-malloc-variant",
           "--no-e2e", "--no-progress", "--out", out_json]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out_json) as f:
        return json.load(f)["rows"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ddpm_kernels bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=None,
                        help="e.g. 16x4x64x64 (default: four shapes on GPU, two on CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: fp32 bf16 fp16 on GPU, fp32 bf16 on CPU")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", default=None,
                        help="subset of: eager compile cpu triton cuda (+out variants follow) diffusers")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="contiguous",
                        help="layout of every data tensor (channels_last: 4-D shapes only)")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per row")
    parser.add_argument("--e2e-steps", type=int, default=20)
    parser.add_argument("--e2e-shape", type=_parse_shape, default=None)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-malloc-variant", action="store_true",
                        help="CPU: don't re-measure eager under the other malloc condition")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="output path prefix or .json (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtype_names = args.dtypes or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    memory_format = MEMORY_FORMATS[args.memory_format]
    if memory_format is torch.channels_last and any(len(s) != 4 for s in shapes):
        parser.error("--memory-format channels_last: every shape must be 4-D")
    conditions = []
    if device.type == "cpu":
        conditions.append("malloc mmap/trim thresholds raised" if os.environ.get("MALLOC_MMAP_THRESHOLD_")
                          else "default malloc")
    if args.memory_format != "contiguous":
        conditions.append(args.memory_format)
    condition = ", ".join(conditions)
    schedule = DiffusionSchedule(timesteps=args.timesteps).to(device)
    meta = _meta(device)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device_name"]).strip("-").lower()
    out = args.out or os.path.join("benchmarks", "results", f"{device.type}-{slug}")

    from tqdm.auto import tqdm

    plan = [(op, shape, dn) for dn in dtype_names for shape in shapes for op in args.ops]
    total = sum(len(_providers(device, DTYPES[dn], args.providers)) for _, _, dn in plan)
    rows: List[Row] = []
    with tqdm(total=total, desc="bench", disable=args.no_progress, file=sys.stderr) as bar:
        for op, shape, dn in plan:
            case = Case(op, shape, DTYPES[dn], device, schedule, memory_format)
            rows += run_case(case, _providers(device, DTYPES[dn], args.providers), args.min_run_time, condition, bar)
    result = dict(meta=meta, rows=[asdict(r) for r in rows], e2e=[])

    if device.type == "cpu" and not args.no_malloc_variant and (not args.providers or "eager" in args.providers):
        child = out + ".malloc-variant.json"
        child_argv = ["--device", "cpu", "--ops", *args.ops, "--dtypes", *dtype_names, "--timesteps",
                      str(args.timesteps), "--min-run-time", str(args.min_run_time), "--memory-format",
                      args.memory_format,
                      "--shapes", *["x".join(map(str, s)) for s in shapes]]
        other = _other_malloc_condition(child_argv, child)
        for r in other:
            r["provider"] = "eager"
            mine = [m for m in result["rows"] if m["op"] == r["op"] and m["shape"] == r["shape"]
                    and m["dtype"] == r["dtype"] and m["provider"] == "eager"]
            if mine:
                r["speedup_vs_eager"] = mine[0]["median_us"] / r["median_us"]
                cmp_ = [m for m in result["rows"] if m["op"] == r["op"] and m["shape"] == r["shape"]
                        and m["dtype"] == r["dtype"] and m["provider"] == "compile"]
                r["speedup_vs_compile"] = cmp_[0]["median_us"] / r["median_us"] if cmp_ else None
        result["rows"] += other
        for ext in (".json", ".md", ".png"):
            path = child[:-5] + ext
            if os.path.exists(path):
                os.remove(path)

    if not args.no_e2e:
        e2e_shape = args.e2e_shape or ((16, 4, 64, 64) if device.type == "cuda" else (4, 4, 32, 32))
        result["e2e"] = end_to_end(device, e2e_shape, args.e2e_steps, args.min_run_time)

    for path in write_outputs(result, out):
        print(f"wrote {path}")
    print(markdown(result))
    return 0
