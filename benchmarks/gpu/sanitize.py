"""Every CUDA and Triton kernel of ddpm_kernels once, at small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/gpu/sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/gpu/sanitize.py --only reductions

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: then every tensor is its own cudaMalloc, so memcheck sees a read
or write past a tensor's end; through torch's caching allocator it would land in a neighbouring block of the
same pool and go unreported. Shapes cover the vector path (16-divisible, 16-byte aligned), the scalar tails
(odd sizes), a misaligned view, and a loss of several pieces per sample; and mixed calls (float32 data with a
bfloat16 or float16 model output and noise, read natively: packets of each operand's own width, or single
elements). Only the public API is used.
Prints one line per call; exits 1 if a call raised (the sanitizer's own report counts the memory errors).
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

T = 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("all", "reductions"), default="all",
                        help="reductions: the loss and the threshold (shared-memory reductions, for racecheck)")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--device", default="cuda",
                        help="cpu: run the same calls on the CPU (with --backends cpu), to check this script "
                             "on a machine without a GPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize: no CUDA device: skipped")
        return 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import warnings

    import ddpm_kernels as dk
    from ddpm_kernels.bench.calls import calls

    warnings.simplefilter("ignore", RuntimeWarning)  # options a backend hands to the reference
    s = dk.DiffusionSchedule("linear", timesteps=T).to(device)
    torch.manual_seed(0)
    n_calls, raised = 0, []
    # (dtype, shape, unaligned, low), most telling first so that a run cut short by its time box keeps them: odd
    # sizes (scalar tails), misaligned views (no vector path), aligned (vector path), a loss of several pieces per
    # sample; float16 and float64 once each for their own instantiations; mixed calls (float32 data, the model
    # outputs and noise in `low`). Backends alternate case by case.
    odd, aligned, pieces = (3, 3, 17, 19), (4, 4, 16, 16), (5, 3, 40, 41)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [(f32, odd, False, None), (bf16, odd, False, None), (f32, odd, False, bf16), (f32, aligned, True, None),
             (bf16, aligned, True, None), (f32, aligned, False, None), (bf16, aligned, False, None),
             (f32, aligned, False, bf16), (f32, aligned, True, f16), (f32, pieces, False, None),
             (f16, odd, False, None), (torch.float64, odd, False, None)]
    for dtype, shape, unaligned, low in cases:
        for backend in args.backends:
            tag = (f"{backend} {str(dtype).split('.')[-1]}{'+' + str(low).split('.')[-1] if low else ''} "
                   f"{'x'.join(map(str, shape))}{' unaligned' if unaligned else ''}")
            if backend not in dk.available_backends(device, dtype):
                print(f"n/a     {tag}: backend not available here")
                continue
            pointwise, reductions = calls(backend, dtype, shape, s, unaligned, device, low)
            todo = dict(reductions) if args.only == "reductions" else {**pointwise, **reductions}
            for name, fn in todo.items():
                n_calls += 1
                try:
                    fn()
                    sync()  # a fault is reported at the call that made it
                    print(f"ok      {tag} {name}", flush=True)
                except dk.BackendUnavailableError:
                    print(f"n/a     {tag} {name}", flush=True)
                except Exception as exc:  # keep going: one report per faulty kernel
                    raised.append(f"{tag} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    print(f"RAISED  {tag} {name}", flush=True)
                    traceback.print_exc(limit=3)
    print(f"sanitize: {n_calls} calls, {len(raised)} raised")
    for line in raised:
        print("  " + line)
    return 1 if raised else 0


if __name__ == "__main__":
    sys.exit(main())
