"""The ``python -m ddpm_kernels bench`` command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import List

import torch

from ..schedule import DiffusionSchedule
from .cases import CASES, DTYPES, MEMORY_FORMATS, MIXED_DTYPES, Case, dtype_pair, op_choices, select_cases, \
    takes_model_output
from .report import markdown, meta, write_outputs
from .sweep import Row, end_to_end, providers, run_case, scheduler_loops

GPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64), (64, 4, 128, 128), (128, 3, 32, 32))
CPU_SHAPES = ((1, 4, 64, 64), (16, 4, 64, 64))
# Flow-matching models' latents: 16 channels (SD3, Flux) at 512 and 1024 px, and a transformer's token layout
# (batch, tokens, channels): 4096 tokens of 64 channels (a 1024 px Flux latent, 2x2-patchified).
FLOW_GPU_SHAPES = ((1, 16, 64, 64), (16, 16, 64, 64), (4, 16, 128, 128), (2, 4096, 64))
FLOW_CPU_SHAPES = ((1, 16, 64, 64), (2, 4096, 64))
SHAPE_PRESETS = {"gpu": GPU_SHAPES, "cpu": CPU_SHAPES, "flow": FLOW_GPU_SHAPES, "flow-cpu": FLOW_CPU_SHAPES}


def parse_shape(text: str):
    """``16x4x64x64`` -> (16, 4, 64, 64); any number of dims (``2x4096x64``: tokens)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a shape such as 16x4x64x64 or 2x4096x64, or a preset ({', '.join(SHAPE_PRESETS)}), "
            f"got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least 2 positive dims (batch first), got {text!r}")
    return shape


def parse_shapes(text: str):
    """One ``--shapes`` token: a preset's shapes, or one shape."""
    preset = SHAPE_PRESETS.get(text.lower())
    return preset if preset is not None else (parse_shape(text),)


def default_shapes(device: torch.device, case_names) -> tuple:
    """The device's shapes; a flow model's latents and tokens when every case is a flow-matching op."""
    flow_only = case_names and all(CASES[name].spec.family == "flow" for name in case_names)
    if device.type == "cuda":
        return FLOW_GPU_SHAPES if flow_only else GPU_SHAPES
    return FLOW_CPU_SHAPES if flow_only else CPU_SHAPES


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


def _merge_malloc_variant(result: dict, other: List[dict]) -> None:
    """Append the other condition's eager rows, their speedups taken against this run's eager and compile."""

    def same_case(a, b):
        return a["op"] == b["op"] and a["shape"] == b["shape"] and a["dtype"] == b["dtype"]

    for r in other:
        mine = {m["provider"]: m["median_us"] for m in result["rows"] if same_case(m, r)}
        if "eager" in mine:
            r["speedup_vs_eager"] = mine["eager"] / r["median_us"]
            r["speedup_vs_compile"] = mine["compile"] / r["median_us"] if "compile" in mine else None
    result["rows"] += other


def _parser() -> argparse.ArgumentParser:
    from . import __doc__ as description

    parser = argparse.ArgumentParser(prog="python -m ddpm_kernels bench", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shapes, default=None,
                        help="shapes such as 16x4x64x64 or 2x4096x64 (tokens), or presets: "
                        + ", ".join(f"{k} ({' '.join('x'.join(map(str, s)) for s in v)})"
                                    for k, v in SHAPE_PRESETS.items())
                        + " (default: gpu on GPU, cpu on CPU; flow / flow-cpu when every case is a flow op)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES) + sorted(MIXED_DTYPES), default=None,
                        help="default: fp32 bf16 fp16 on GPU, fp32 bf16 on CPU; fp32+bf16 / fp32+fp16: fp32 data with "
                        "the model output in bf16 / fp16, as under autocast (the ops that take a model output)")
    parser.add_argument("--ops", nargs="+", choices=op_choices(), default=None, metavar="OP",
                        help="cases (default: all): " + " ".join(CASES) + "; an op name that names no case "
                        "(diffusion_loss) selects every case of that op")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="subset of: eager compile cpu triton cuda (+out variants follow) diffusers")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="contiguous",
                        help="layout of every data tensor (channels_last: 4-D shapes only)")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per row")
    parser.add_argument("--e2e-steps", type=int, default=20,
                        help="steps of the end-to-end loops: the UNet sampling loop per backend, and the whole "
                        "diffusers loops (toy model) of each fused drop-in against its stock scheduler")
    parser.add_argument("--e2e-shape", type=parse_shape, default=None,
                        help="shape of the end-to-end loops (default: 16x4x64x64 on GPU; on CPU 4x4x32x32 for the "
                        "UNet loop and 16x4x64x64 for the scheduler loops)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end loops")
    parser.add_argument("--no-malloc-variant", action="store_true",
                        help="CPU: don't re-measure eager under the other malloc condition")
    parser.add_argument("--host-overhead", action="store_true",
                        help="instead of the sweep: host time per call at 1x4x8x8 fp32 on CPU, one thread "
                        "(torch.add, every public op, the compiled operator, diffusers' schedulers)")
    parser.add_argument("--host-iters", type=int, default=1000, help="--host-overhead: calls per timed block")
    parser.add_argument("--host-rounds", type=int, default=15, help="--host-overhead: interleaved rounds")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="output path prefix or .json (default benchmarks/results/...)")
    return parser


def _default_out(m: dict, suffix: str = "") -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in m["device_name"]).strip("-").lower()
    return os.path.join("benchmarks", "results", f"{m['device']}-{slug}{suffix}")


def _finish(result: dict, out: str) -> int:
    for path in write_outputs(result, out):
        print(f"wrote {path}")
    print(markdown(result))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)

    if args.host_overhead:
        from .host import host_overhead

        m = meta(torch.device("cpu"))
        table = host_overhead(args.host_iters, args.host_rounds, args.timesteps)
        result = dict(meta=m, rows=[], e2e=[], host_overhead=table)
        return _finish(result, args.out or _default_out(m, "-host-overhead"))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    dtype_names = args.dtypes or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    case_names = select_cases(args.ops)
    shapes = [s for group in args.shapes for s in group] if args.shapes else default_shapes(device, case_names)
    shapes = list(dict.fromkeys(shapes))
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
    m = meta(device)
    out = args.out or _default_out(m)

    from tqdm.auto import tqdm

    # a mixed dtype (fp32 data, a low-precision model output) applies to the cases with a model output
    plan = [(name, shape, dn) for dn in dtype_names for shape in shapes for name in case_names
            if dn not in MIXED_DTYPES or takes_model_output(name)]

    def names_of(name, dn):
        return providers(name, device, dtype_pair(dn)[0], args.providers, mixed=dn in MIXED_DTYPES)

    total = sum(len(names_of(name, dn)) for name, _, dn in plan)
    rows: List[Row] = []
    with tqdm(total=total, desc="bench", disable=args.no_progress, file=sys.stderr) as bar:
        for name, shape, dn in plan:
            dtype, model_dtype = dtype_pair(dn)
            case = Case(name, shape, dtype, device, schedule, memory_format, model_dtype)
            rows += run_case(case, names_of(name, dn), args.min_run_time, condition, bar)
    result = dict(meta=m, rows=[asdict(r) for r in rows], e2e=[])

    if device.type == "cpu" and not args.no_malloc_variant and (not args.providers or "eager" in args.providers):
        child = out + ".malloc-variant.json"
        child_argv = ["--device", "cpu", "--ops", *case_names, "--dtypes", *dtype_names, "--timesteps",
                      str(args.timesteps), "--min-run-time", str(args.min_run_time), "--memory-format",
                      args.memory_format, "--shapes", *["x".join(map(str, s)) for s in shapes]]
        _merge_malloc_variant(result, _other_malloc_condition(child_argv, child))
        for ext in (".json", ".md", ".png"):
            path = child[:-5] + ext
            if os.path.exists(path):
                os.remove(path)

    if not args.no_e2e:
        e2e_shape = args.e2e_shape or ((16, 4, 64, 64) if device.type == "cuda" else (4, 4, 32, 32))
        result["e2e"] = end_to_end(device, e2e_shape, args.e2e_steps, args.min_run_time)
        result["scheduler_loops"] = scheduler_loops(device, args.e2e_shape or (16, 4, 64, 64), args.e2e_steps,
                                                    args.min_run_time)
    return _finish(result, out)
