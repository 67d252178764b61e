"""GPU benchmark: the sampler and training ops on every provider, and a 50-step sampling loop eager vs replayed
from one captured CUDA graph.

    python benchmarks/gpu/bench_gpu.py --out-json OUT/bench.json --out-md OUT/bench.md [--budget-s 150]

Ops (in-kernel noise wherever the op draws noise, as a sampling loop runs them):
  q_sample      x_t = sqrt(ab) x0 + sqrt(1-ab) eps            reads x0, eps; writes x_t
  p_sample      one ancestral DDPM step, noise drawn in-kernel reads x_t, model output; writes x_{t-1}
  ddpm_step     DDPMScheduler.step on a respaced chain          reads x_t, model output; writes x_{t_prev}
  ddim_step     DDIM step with eta = 1                          reads x_t, model output; writes x_{t_prev}
  loss_fwd_bwd  eps/l2 diffusion loss and its gradient          reads 2 + 2, writes 1 (model output, noise)
Providers: eager (the pure-PyTorch reference), cuda and triton (the fused backends), diffusers (stock
DDPMScheduler / DDIMScheduler: add_noise and step with one scalar timestep; absent when diffusers is not
installed), compile (torch.compile of the reference, dynamic shapes: one compile per op and dtype serves
every shape, so the compile column fits a time-boxed run; compile time reported apart).
Per row: median and 20/80% quantiles over CUDA-event timings (triton.testing.do_bench, L2 flushed between
calls), GB/s of the bytes the op must move (each operand read once, each output written once), % of the
device-to-device copy bandwidth measured for the same number of bytes, kernels launched per call
(torch.profiler) and host synchronizations per call (torch.cuda.set_sync_debug_mode). Rows are written as
they finish (JSON, then the markdown table generated from it), fused and eager rows first, then the loops,
then diffusers and torch.compile, so a run cut short by its time box keeps the most important numbers.
Uses the public API only. Without a GPU, checks its own call table once on the CPU and writes no timings.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

T = 1000
OPS = ("q_sample", "p_sample", "ddpm_step", "ddim_step", "loss_fwd_bwd", "flow_step", "flow_step_guided",
       "flow_interpolate", "flow_loss_fwd_bwd")
FLOW_OPS = tuple(op for op in OPS if op.startswith("flow"))
# Full tensors each op must read plus write, in units of the data tensor's size (the guided step reads the
# unconditional and the conditional outputs).
PASSES = {"q_sample": 3, "p_sample": 3, "ddpm_step": 3, "ddim_step": 3, "loss_fwd_bwd": 5, "flow_step": 3,
          "flow_step_guided": 4, "flow_interpolate": 3, "flow_loss_fwd_bwd": 7}
SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (64, 4, 128, 128))
# Flow-matching latents (16 channels: SD3, Flux) and a transformer's token layout, for the flow ops
FLOW_SHAPES = ((4, 16, 128, 128), (2, 4096, 64))
FLOW_STEPS = 28
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOOP_STEPS = 50


# ------------------------------------------------------------------------------------------- measuring
def do_bench(fn: Callable[[], object], rep_ms: float):
    """(median, q20, q80) microseconds per call."""
    from triton.testing import do_bench as triton_do_bench

    med, q20, q80 = triton_do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return med * 1e3, q20 * 1e3, q80 * 1e3


def count_kernels(fn: Callable[[], object]):
    """(kernels, memcpy/memset) launched by one call, from the profiler's device events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum(1 for n in names if "Memcpy" in n or "Memset" in n)
    return len(names) - copies, copies


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls in one call: the package benchmark's counter (torch's sync debug mode)."""
    from ddpm_kernels.bench.timing import count_host_syncs as counted

    return counted(fn, torch.device("cuda"))


_copy_bw: Dict[int, float] = {}


def copy_bandwidth(nbytes: int, rep_ms: float) -> float:
    """GB/s of dst.copy_(src) moving ``nbytes`` in all (read + write), the roof for an op moving as many
    bytes: the same working-set size, so an op is never compared with a copy that fits in L2 when it does not."""
    if nbytes not in _copy_bw:
        src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        med, _, _ = do_bench(lambda: dst.copy_(src), rep_ms)
        _copy_bw[nbytes] = 2 * src.numel() / (med * 1e-6) / 1e9
    return _copy_bw[nbytes]


# ------------------------------------------------------------------------------------------- cases
class Case:
    """Inputs of one op x shape x dtype on the GPU and the call each provider times."""

    def __init__(self, op, shape, dtype, s, device="cuda"):
        g = torch.Generator(device=device).manual_seed(0)
        self.op, self.shape, self.dtype, self.s, self.device = op, tuple(shape), dtype, s, device
        self.x, self.mo, self.z = (torch.randn(self.shape, generator=g, device=device).to(dtype) for _ in range(3))
        B = self.shape[0]
        self.t = torch.randint(1, T, (B,), generator=g, device=device)
        self.t_prev = (self.t - 20).clamp(min=-1)
        self.numel = self.x.numel()
        self.bytes = PASSES[op] * self.numel * self.x.element_size()
        self.sigmas = torch.linspace(1.0, 0.0, FLOW_STEPS + 1, device=device)
        self.index = torch.full((B,), FLOW_STEPS // 2, dtype=torch.long, device=device)
        self.sigma = torch.rand(B, generator=g, device=device) * 0.9 + 0.05
        self.both = torch.cat([self.z, self.mo])

    def call(self, backend: str) -> Callable[[], object]:
        import ddpm_kernels as dk

        x, mo, z, t, tp, s, op = self.x, self.mo, self.z, self.t, self.t_prev, self.s, self.op
        if op == "q_sample":
            return lambda: dk.q_sample(x, t, z, s, backend=backend)
        if op == "p_sample":
            return lambda: dk.p_sample(x, t, mo, s, backend=backend)
        if op == "ddpm_step":
            return lambda: dk.ddpm_step(x, t, tp, mo, s, backend=backend)
        if op == "ddim_step":
            return lambda: dk.ddim_step(x, t, tp, mo, s, 1.0, backend=backend)
        if op in FLOW_OPS:
            return self._flow_call(op, backend)
        mo_grad = mo.detach().clone().requires_grad_(True)

        def loss_fwd_bwd():
            return torch.autograd.grad(dk.diffusion_loss(mo_grad, x, z, t, s, backend=backend)[0], mo_grad)

        return loss_fwd_bwd

    def _flow_call(self, op: str, backend: str) -> Callable[[], object]:
        import ddpm_kernels as dk

        x, mo, z, sigmas, index, sigma, both = self.x, self.mo, self.z, self.sigmas, self.index, self.sigma, self.both
        if op == "flow_step":
            return lambda: dk.flow_step(x, mo, sigmas, index, backend=backend)
        if op == "flow_step_guided":
            return lambda: dk.flow_step(x, both, sigmas, index, guidance_scale=4.5, backend=backend)
        if op == "flow_interpolate":
            return lambda: dk.flow_interpolate(x, z, sigma, backend=backend)
        mo_grad = mo.detach().clone().requires_grad_(True)
        return lambda: torch.autograd.grad(dk.flow_loss(mo_grad, x, z, sigma, backend=backend), mo_grad)

    def compiled_call(self, compiled: Dict) -> Callable[[], object]:
        """torch.compile of the reference; one compiled function per (op, dtype) serves every shape."""
        import ddpm_kernels as dk

        s, op = self.s, self.op
        key = (op, self.dtype)
        if op in FLOW_OPS:
            if key not in compiled:
                compiled[key] = torch.compile(self._flow_call(op, "reference"), dynamic=True)
            return compiled[key]
        if key not in compiled:
            if op == "q_sample":
                f = lambda x, t, tp, mo, z: dk.q_sample(x, t, z, s, backend="reference")  # noqa: E731
            elif op == "p_sample":
                f = lambda x, t, tp, mo, z: dk.p_sample(x, t, mo, s, backend="reference")  # noqa: E731
            elif op == "ddpm_step":
                f = lambda x, t, tp, mo, z: dk.ddpm_step(x, t, tp, mo, s, backend="reference")  # noqa: E731
            elif op == "ddim_step":
                f = lambda x, t, tp, mo, z: dk.ddim_step(x, t, tp, mo, s, 1.0, backend="reference")  # noqa: E731
            else:
                f = lambda x, t, tp, mo, z: dk.diffusion_loss(mo, x, z, t, s, backend="reference")[0]  # noqa: E731
            compiled[key] = torch.compile(f, dynamic=True)
        f = compiled[key]
        x, mo, z, t, tp = self.x, self.mo, self.z, self.t, self.t_prev
        if op == "loss_fwd_bwd":
            mo_grad = mo.detach().clone().requires_grad_(True)
            return lambda: torch.autograd.grad(f(x, t, tp, mo_grad, z), mo_grad)
        return lambda: f(x, t, tp, mo, z)

    def diffusers_call(self) -> Optional[Callable[[], object]]:
        """The stock diffusers counterpart (scalar timestep, its tables on the host as it keeps them)."""
        try:
            from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
        except ImportError:
            return None
        if self.op in ("flow_step", "flow_step_guided"):
            sched = FlowMatchEulerDiscreteScheduler()
            sched.set_timesteps(FLOW_STEPS, device=self.device)
            timestep, x, mo, both = sched.timesteps[FLOW_STEPS // 2], self.x, self.mo, self.both

            def stock_step():
                sched._step_index = FLOW_STEPS // 2  # the same step every call
                v = mo
                if self.op == "flow_step_guided":  # a pipeline's CFG, then the stock step
                    u, c = both.chunk(2)
                    v = u + 4.5 * (c - u)
                return sched.step(v, timestep, x).prev_sample

            return stock_step
        betas = self.s.betas.detach().cpu().tolist()
        x, mo, z = self.x, self.mo, self.z
        if self.op == "q_sample":
            sched = DDPMScheduler(num_train_timesteps=T, trained_betas=betas)
            t = self.t
            return lambda: sched.add_noise(x, z, t)
        if self.op == "p_sample":
            sched = DDPMScheduler(num_train_timesteps=T, trained_betas=betas)
            return lambda: sched.step(mo, T // 2, x).prev_sample
        if self.op == "ddpm_step":
            sched = DDPMScheduler(num_train_timesteps=T, trained_betas=betas)
            sched.set_timesteps(LOOP_STEPS)
            step = int(sched.timesteps[LOOP_STEPS // 2])
            return lambda: sched.step(mo, step, x).prev_sample
        if self.op == "ddim_step":
            sched = DDIMScheduler(num_train_timesteps=T, trained_betas=betas)
            sched.set_timesteps(LOOP_STEPS)
            step = int(sched.timesteps[LOOP_STEPS // 2])
            return lambda: sched.step(mo, step, x, eta=1.0).prev_sample
        return None


# ------------------------------------------------------------------------------------------- loops
def sampling_loop(kind: str, backend: str, dtype, shape, rep_ms: float) -> dict:
    """LOOP_STEPS steps of ``kind`` (p_sample on a LOOP_STEPS-step schedule, or ddim_step eta=1 respaced from
    1000) in place on one buffer, with a fixed stand-in model output, timed eagerly and as one captured graph
    replayed; and whether the replay equals the eager loop from the same generator state."""
    import ddpm_kernels as dk

    B = shape[0]
    g = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(shape, generator=g, device="cuda").to(dtype)
    mo = (0.1 * torch.randn(shape, generator=g, device="cuda")).to(dtype)
    x = x0.clone()
    if kind == "p_sample":
        s = dk.DiffusionSchedule("linear", timesteps=LOOP_STEPS).cuda()
        ts = [torch.full((B,), i, device="cuda", dtype=torch.long) for i in reversed(range(LOOP_STEPS))]

        def loop():
            for t in ts:
                dk.p_sample(x, t, mo, s, backend=backend, out=x)
    else:
        s = dk.DiffusionSchedule("linear", timesteps=T).cuda()
        stride = T // LOOP_STEPS
        seq = list(range(T - stride, -1, -stride))
        ts = [torch.full((B,), i, device="cuda", dtype=torch.long) for i in seq]
        tps = [torch.full((B,), i - stride if i - stride >= 0 else -1, device="cuda", dtype=torch.long) for i in seq]

        def loop():
            for t, tp in zip(ts, tps):
                dk.ddim_step(x, t, tp, mo, s, 1.0, backend=backend, out=x)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation, lazy init) outside the capture
        loop()
    torch.cuda.current_stream().wait_stream(side)
    eager = do_bench(loop, rep_ms)
    launches, _ = count_kernels(loop)
    syncs = count_host_syncs(loop)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    replay = do_bench(graph.replay, rep_ms)

    state = torch.cuda.get_rng_state()
    x.copy_(x0)
    loop()
    eager_out = x.clone()
    torch.cuda.set_rng_state(state)
    x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    same = bool(torch.allclose(x.float(), eager_out.float(), rtol=1e-5, atol=1e-5))
    return dict(loop=kind, backend=backend, dtype=str(dtype).split(".")[-1], shape=list(shape), steps=LOOP_STEPS,
                eager_ms=eager[0] / 1e3, graph_ms=replay[0] / 1e3, eager_us_per_step=eager[0] / LOOP_STEPS,
                graph_us_per_step=replay[0] / LOOP_STEPS, graph_speedup=eager[0] / replay[0],
                launches_per_loop=launches, host_syncs_per_loop=syncs, replay_equals_eager=same)


# ------------------------------------------------------------------------------------------- report
def meta() -> dict:
    import triton

    import ddpm_kernels as dk

    p = torch.cuda.get_device_properties(0)
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return dict(
        device_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
        memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, diffusers=diffusers_version,
        python=platform.python_version(), ddpm_kernels=dk.__version__,
        backends={name: dk.available_backends("cuda", dt) for name, dt in DTYPES.items()},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        compile_mode="torch.compile(dynamic=True) of the reference",
    )


def _fmt(v, spec):
    return "" if v is None or v != v else format(v, spec)


def with_speedups(rows: List[dict]) -> List[dict]:
    base = {}
    for r in rows:
        if r["provider"] in ("eager", "compile") and r.get("median_us"):
            base[(r["provider"], r["op"], tuple(r["shape"]), r["dtype"])] = r["median_us"]
    out = []
    for r in rows:
        r = dict(r)
        key = (r["op"], tuple(r["shape"]), r["dtype"])
        if r.get("median_us"):
            e, c = base.get(("eager",) + key), base.get(("compile",) + key)
            r["speedup_vs_eager"] = e / r["median_us"] if e else None
            r["speedup_vs_compile"] = c / r["median_us"] if c else None
        out.append(r)
    return out


def markdown(result: dict) -> str:
    if result.get("skipped"):
        return f"### GPU benchmark\n\nNot run: {result['skipped']}\n"
    m = result["meta"]
    lines = [f"### GPU benchmark: {m.get('device_name')} (sm {m.get('capability')}, {m.get('sms')} SMs), torch "
             f"{m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, diffusers {m.get('diffusers')}, "
             f"{m.get('date')}", ""]
    lines += [f"Device-to-device copy bandwidth (large copy, read + write): {_fmt(result.get('peak_copy_gbps'), '.0f')} "
              "GB/s. % copy BW: against a copy of the same number of bytes. Providers: eager = reference, "
              f"compile = {m.get('compile_mode')}.", "",
              "| op | shape | dtype | provider | µs (median) | q20–q80 | GB/s | % copy BW | × eager | × compile "
              "| kernels | memcpy | host syncs | note |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in with_speedups(result.get("rows", [])):
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['provider']} "
            f"| {_fmt(r.get('median_us'), '.1f')} | {_fmt(r.get('q20_us'), '.1f')}–{_fmt(r.get('q80_us'), '.1f')} "
            f"| {_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('pct_copy_bw'), '.0f')} "
            f"| {_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('speedup_vs_compile'), '.2f')} "
            f"| {_fmt(r.get('kernels'), 'd')} | {_fmt(r.get('memcpy'), 'd')} | {_fmt(r.get('host_syncs'), 'd')} "
            f"| {r.get('note', '')} |")
    if result.get("loops"):
        lines += ["", f"{LOOP_STEPS}-step sampling loop, in place, fixed model output: eager vs one captured CUDA "
                  "graph replayed", "",
                  "| loop | backend | dtype | shape | eager ms | graph ms | eager µs/step | graph µs/step | × graph "
                  "| kernels/loop | host syncs/loop | replay = eager |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in result["loops"]:
            if "error" in e:
                lines.append(f"| {e['loop']} | {e['backend']} | {e['dtype']} | | | | | | | | | {e['error']} |")
                continue
            lines.append(
                f"| {e['loop']} | {e['backend']} | {e['dtype']} | {'x'.join(map(str, e['shape']))} "
                f"| {e['eager_ms']:.3f} | {e['graph_ms']:.3f} | {e['eager_us_per_step']:.1f} "
                f"| {e['graph_us_per_step']:.1f} | {e['graph_speedup']:.2f} | {e['launches_per_loop']} "
                f"| {e['host_syncs_per_loop']} | {e['replay_equals_eager']} |")
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_json: str, out_md: Optional[str]):
    for path, text in ((out_json, json.dumps(result, indent=1)), (out_md, markdown(result) if out_md else None)):
        if path and text is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


# ------------------------------------------------------------------------------------------- main
def cpu_dry_run() -> int:
    """Build every case on the CPU at a tiny shape and call each provider once (no timing)."""
    import ddpm_kernels as dk

    s = dk.DiffusionSchedule("linear", timesteps=T)
    n = 0
    for op in OPS:
        case = Case(op, (2, 4, 8, 8), torch.float32, s, device="cpu")
        fns = {"eager": case.call("reference")}
        fns.update({b: case.call(b) for b in dk.available_backends("cpu") if b not in ("reference", "triton")})
        d = case.diffusers_call()
        if d is not None:
            fns["diffusers"] = d
        for fn in fns.values():
            fn()
            n += 1
    print(f"bench_gpu: no CUDA device: timings skipped; call table checked on the CPU ({n} calls ran)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--out-md", default=None)
    parser.add_argument("--budget-s", type=float, default=150, help="stop starting new work after this")
    parser.add_argument("--rep-ms", type=float, default=50, help="timing window per row (triton do_bench rep)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--flow-shapes", nargs="+", default=["x".join(map(str, s)) for s in FLOW_SHAPES],
                        help="the flow ops' shapes")
    parser.add_argument("--peak-copy-gbps", type=float, default=None, help="large-copy bandwidth measured before")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        write({"skipped": "no CUDA device"}, args.out_json, args.out_md)
        return cpu_dry_run()

    import ddpm_kernels as dk

    warnings.simplefilter("ignore", RuntimeWarning)  # a backend handing an option to the reference says so once
    start = time.perf_counter()

    def left():
        return args.budget_s - (time.perf_counter() - start)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    dtypes = [DTYPES[d] for d in args.dtypes]
    s = dk.DiffusionSchedule("linear", timesteps=T).cuda()
    result = dict(meta=meta(), peak_copy_gbps=args.peak_copy_gbps, rows=[], loops=[], notes=[])
    if result["peak_copy_gbps"] is None:
        result["peak_copy_gbps"] = copy_bandwidth(2 << 30, 200)
    write(result, args.out_json, args.out_md)

    def add_row(case: Case, provider: str, fn, note="", compile_s=None):
        try:
            med, q20, q80 = do_bench(fn, args.rep_ms)
            kernels, memcpy = count_kernels(fn)
            syncs = count_host_syncs(fn)
        except Exception as exc:  # a provider failing is a result too
            row = dict(op=case.op, shape=list(case.shape), dtype=str(case.dtype).split(".")[-1], provider=provider,
                       note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        else:
            gbps = case.bytes / (med * 1e-6) / 1e9
            row = dict(op=case.op, shape=list(case.shape), dtype=str(case.dtype).split(".")[-1], provider=provider,
                       median_us=med, q20_us=q20, q80_us=q80, bytes=case.bytes, gbps=gbps,
                       pct_copy_bw=100 * gbps / copy_bandwidth(case.bytes, args.rep_ms), kernels=kernels,
                       memcpy=memcpy, host_syncs=syncs, compile_s=compile_s, note=note)
        result["rows"].append(row)
        write(result, args.out_json, args.out_md)
        print(f"bench_gpu: {row['op']:12s} {'x'.join(map(str, row['shape'])):12s} {row['dtype']:9s} "
              f"{provider:9s} {_fmt(row.get('median_us'), '9.1f')} us {_fmt(row.get('pct_copy_bw'), '4.0f')}% "
              f"{row.get('note', '')}  [{left():.0f} s left]", flush=True)

    # 1. eager and the fused backends on every case
    flow_shapes = [tuple(int(v) for v in s.split("x")) for s in args.flow_shapes]
    cases = [Case(op, shape, dt, s) for dt in dtypes for op in args.ops
             for shape in (flow_shapes if op in FLOW_OPS else shapes)]
    for case in cases:
        if left() < 5:
            result["notes"].append("time budget spent: later rows not run")
            break
        fused = [b for b in ("cuda", "triton") if b in dk.available_backends("cuda", case.dtype)]
        for provider in ["eager"] + fused:
            add_row(case, provider, case.call("reference" if provider == "eager" else provider))

    # 2. sampling loops, eager vs one captured graph
    for kind in ("p_sample", "ddim_step"):
        for dt in dtypes:
            for backend in ["reference"] + [b for b in ("cuda", "triton") if b in dk.available_backends("cuda", dt)]:
                if left() < 5:
                    break
                try:
                    entry = sampling_loop(kind, backend, dt, (16, 4, 64, 64), args.rep_ms)
                except Exception as exc:
                    entry = dict(loop=kind, backend=backend, dtype=str(dt).split(".")[-1],
                                 error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                result["loops"].append(entry)
                write(result, args.out_json, args.out_md)
                print(f"bench_gpu: loop {kind} {backend} {dt}: {entry}", flush=True)

    # 3. stock diffusers (host-side tables, one scalar timestep)
    for case in cases:
        if left() < 5:
            break
        fn = case.diffusers_call()
        if fn is not None:
            add_row(case, "diffusers", fn, note="scalar timestep")
    if importlib.util.find_spec("diffusers") is None:
        result["notes"].append("diffusers not installed: no diffusers rows")

    # 4. torch.compile of the reference. dynamic=True: one compile per (op, dtype) serves every batch > 1 (the
    # largest shape goes first); a batch of 1 is specialized by torch and compiles once more.
    compiled: Dict = {}
    if args.no_compile:
        result["notes"].append("torch.compile rows not asked for")
    order = sorted(cases, key=lambda c: (str(c.dtype), OPS.index(c.op), -c.numel))
    for case in [] if args.no_compile else order:
        if left() < 30:  # a compile can take tens of seconds
            result["notes"].append(f"time budget: no torch.compile rows from {case.op} {case.dtype} "
                                   f"{'x'.join(map(str, case.shape))} on")
            break
        t0 = time.perf_counter()
        try:
            fn = case.compiled_call(compiled)
            fn()
            torch.cuda.synchronize()
        except Exception as exc:
            result["rows"].append(dict(op=case.op, shape=list(case.shape), dtype=str(case.dtype).split(".")[-1],
                                       provider="compile",
                                       note=f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            continue
        first_s = time.perf_counter() - t0
        add_row(case, "compile", fn, note=f"first call {first_s:.1f} s", compile_s=first_s)

    write(result, args.out_json, args.out_md)
    print(f"bench_gpu: {len(result['rows'])} rows, {len(result['loops'])} loops in "
          f"{time.perf_counter() - start:.0f} s; wrote {args.out_json}" + (f", {args.out_md}" if args.out_md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
