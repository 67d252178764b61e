#!/usr/bin/env bash
# The GPU check of ddpm_kernels in one command: environment and copy bandwidth; the CUDA extension for this GPU
# (the prebuilt library when it matches, else a build); every GPU test; compute-sanitizer (memcheck on every
# CUDA and Triton kernel, racecheck on the reductions); the GPU benchmark; a summary. Sized for one call on a
# lent GPU machine: each step is time-boxed from a total budget (GPU_CHECK_BUDGET_S, default 480 s) and the
# later steps keep a reserve, so the command ends well inside its limit; every result is written to $OUT as
# the run goes (8 files at most: all that a lent machine returns), so a run cut short still returns what
# finished. The summary (OUT/summary.md) is printed last, where the tail of the output shows it.
#
# On a lent GPU machine (an H200 with torch 2.11.0+cu130, triton 3.6, nvcc 13.0, no network) that runs one command
# over a copy of the working tree plus carried git-ignored paths, returning the files written under $OUT:
#   1. beforehand, on any Linux x86-64 machine with nvcc 13.0 (no GPU needed; see benchmarks/gpu/README.md):
#        bash benchmarks/gpu/prebuild.sh
#   2. command:   bash benchmarks/gpu_check.sh
#      carry:     ["benchmarks/gpu/carry"]
#      timeout_s: 540
#   The results: summary.md, check.log, env.txt, build.log, tests.xml, sanitizer.log, bench.json, bench.md.
#
# On a machine without a GPU every GPU step says so in one line and skips; the rest runs: the environment, the
# collection of the GPU tests (their GPU-marked part runs, and skips), the sanitizer's and the benchmark's call
# tables checked on the CPU, and the summary. OUT defaults to ${TMPDIR:-/tmp}/gpucheck-out.
#
# Knobs: OUT, PYTHON (python3), GPU_CHECK_BUDGET_S (480), GPU_CHECK_WORK (scratch, ${TMPDIR:-/tmp}/gpucheck-work),
#        GPU_CHECK_TEST_WORKERS (8: pytest-xdist processes sharing the GPU; Triton and inductor compile in
#        parallel that way), GPU_CHECK_TEST_TIMEOUT (180 s per test), GPU_CHECK_FORCE_BUILD=1 (ignore the
#        prebuilt library), GPU_CHECK_CLI_BENCH=0 (skip `python -m ddpm_kernels bench`).
set -uo pipefail  # no -e: a failing step is a result, and the steps after it still run

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-${TMPDIR:-/tmp}/gpucheck-out}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpucheck-work}
PY=${PYTHON:-python3}
CARRY=$REPO/benchmarks/gpu/carry
mkdir -p "$OUT" "$WORK"
rm -rf "${WORK:?}"/* "$OUT"/summary.md "$OUT"/tests.xml "$OUT"/bench.json "$OUT"/bench.md "$OUT"/sanitizer.log
: > "$OUT/check.log"
exec > >(tee -a "$OUT/check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------------------------------- step helpers
now() { date +%s; }
elapsed() { echo $(( $(now) - START )); }
# seconds a step may take: at most $1, leaving $2 for the steps after it
allow() { local left=$(( DEADLINE - $(now) - $2 )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
STEP='' STEP_T0=0 STEP_BUDGET=0
begin() {
  STEP=$1 STEP_BUDGET=$2 STEP_T0=$(now)
  echo
  echo "=== [$(elapsed) s] $STEP: up to ${STEP_BUDGET} s ==="
}
end() {  # end STATUS [NOTE]
  local secs=$(( $(now) - STEP_T0 ))
  printf '%s\t%s\t%s\t%s\t%s\n' "$STEP" "$1" "$secs" "$STEP_BUDGET" "${2:-}" >> "$WORK/steps.tsv"
  echo "=== [$(elapsed) s] $STEP: $1 in $secs s${2:+ ($2)}"
}
py_ok() { "$PY" -c "$1" >/dev/null 2>&1; }

HAVE_GPU=0
py_ok "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && HAVE_GPU=1
# compute-sanitizer ships with the CUDA toolkit, which need not be on PATH
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
      /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
NPROC=$(nproc 2>/dev/null || echo 4)
echo "gpu_check: budget ${BUDGET} s (each step: at most its budget, keeping a reserve for the steps after it):"
echo "  env 45 | deps 30 | build 240 (prebuilt: ~10) | tests 200 | sanitize 90 | bench 150 | cli-bench 45 (what is left) | summary 20"
echo "gpu_check: OUT=$OUT WORK=$WORK PYTHON=$PY GPU=$([ $HAVE_GPU = 1 ] && echo yes || echo no)"

# ------------------------------------------------------------------------------------------- 1. environment
B=$(allow 45 300); begin env "$B"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   $(uname -srm)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x $NPROC"
  echo "memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB, " $7 " GiB available"}')   disk: $(df -h . | awk 'NR==2 {print $4 " free"}')"
  echo "repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git metadata')   sources stamp: $(bash benchmarks/gpu/source_stamp.sh 2>/dev/null)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,compute_mode --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"; fi
  echo "compute-sanitizer: ${SAN:-not found}"
  echo "env: $(env | grep -E '^(CUDA|TORCH|TRITON|NVIDIA|PYTORCH)[A-Z_]*=' | sort | tr '\n' ' ')"
  timeout "$B" "$PY" - "$WORK" <<'PY'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print("python", info["python"], "| torch", info["torch"], "(CUDA", str(info["torch_cuda"]) + ") | triton", info["triton"])
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    # Device-to-device copy of 1 GiB: the bandwidth roof for these memory-bound ops (bytes read + written).
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); dst.copy_(src); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    gbps = 2 * src.numel() / times[len(times) // 2] / 1e9
    print(f"copy bandwidth: {gbps:.0f} GB/s (1 GiB device-to-device copy, median of 20, read + write)")
    info.update(device=p.name, copy_gbps=gbps)
else:
    print("device: no CUDA device visible to torch: GPU steps will skip")
json.dump(info, open(f"{sys.argv[1]}/env.json", "w"))
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
COPY_GBPS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('copy_gbps') or '')" "$WORK/env.json" 2>/dev/null)
"$PY" -c "
import json, sys
e = json.load(open(sys.argv[1]))
copy = f\"{e['copy_gbps']:.0f} GB/s\" if e.get('copy_gbps') else 'n/a'
print(f\"{e.get('device') or 'no GPU'} · torch {e['torch']} · triton {e['triton']} · copy bandwidth {copy} · budget ${BUDGET} s\")
" "$WORK/env.json" > "$WORK/headline.txt" 2>/dev/null
end ok

# ------------------------------------------------------------------------------------------- 2. packages
# pytest and friends are on the GPU image; diffusers is not. Missing ones come from the carried wheels, one at
# a time and without their dependencies, so nothing the image has is shadowed or upgraded.
B=$(allow 30 280); begin deps "$B"
SITE=$WORK/site
missing=()
for pair in pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging pytest_timeout:pytest_timeout \
            execnet:execnet xdist:pytest_xdist hypothesis:hypothesis pytest_benchmark:pytest_benchmark \
            cpuinfo:py_cpuinfo importlib_metadata:importlib_metadata diffusers:diffusers; do
  mod=${pair%%:*} whl=${pair#*:}
  if ! py_ok "import $mod"; then
    found=$(ls "$CARRY/wheels/$whl"-*.whl 2>/dev/null | head -1)
    if [ -n "$found" ]; then missing+=("$found"); else echo "deps: $mod missing and no carried wheel"; fi
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  timeout "$B" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}" \
    && export PYTHONPATH="$PYTHONPATH:$SITE" && echo "deps: installed from carried wheels: ${missing[*]##*/}"
fi
"$PY" - <<'PY'
import importlib.metadata as md
import importlib.util
for dist, mod in (("pytest", "pytest"), ("pytest-xdist", "xdist"), ("pytest-timeout", "pytest_timeout"),
                  ("hypothesis", "hypothesis"), ("diffusers", "diffusers"), ("triton", "triton"), ("numpy", "numpy")):
    found = importlib.util.find_spec(mod) is not None
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "?"
    print(f"deps: {dist} {version if found else 'unavailable'}")
PY
end ok

# ------------------------------------------------------------------------------------------- 3. extension
# The CUDA kernels for this GPU only. A library prebuilt elsewhere (benchmarks/gpu/prebuild.sh) is used when it
# was built from these very sources for this torch, Python and arch; else it is built here, one arch, all cores.
B=$(allow 240 200); begin build "$B"
BUILD_NOTE=""
if [ $HAVE_GPU = 0 ]; then
  echo "build: no CUDA device: the CUDA extension is not built here (the installed package is used as it is)"
  echo "no CUDA device: not built" > "$OUT/build.log"
  BUILD_NOTE="no GPU"
else
  read -r ARCH SUFFIX TORCH_V < <("$PY" -c "
import sysconfig, torch
print('%d.%d' % torch.cuda.get_device_capability(), sysconfig.get_config_var('EXT_SUFFIX'), torch.__version__)")
  STAMP_HERE=$(bash benchmarks/gpu/source_stamp.sh)
  {
    echo "build: want sources=$STAMP_HERE torch=$TORCH_V suffix=$SUFFIX arch=$ARCH"
    [ -f "$CARRY/prebuilt/STAMP" ] && { echo "build: prebuilt:"; sed 's/^/    /' "$CARRY/prebuilt/STAMP"; } || echo "build: no prebuilt library carried"
  } > "$OUT/build.log"
  cat "$OUT/build.log"
  use_prebuilt=0
  if [ "${GPU_CHECK_FORCE_BUILD:-0}" != 1 ] && [ -f "$CARRY/prebuilt/STAMP" ] && [ -f "$CARRY/prebuilt/_C$SUFFIX" ] \
     && grep -qx "sources=$STAMP_HERE" "$CARRY/prebuilt/STAMP" && grep -qx "torch=$TORCH_V" "$CARRY/prebuilt/STAMP" \
     && grep -qx "suffix=$SUFFIX" "$CARRY/prebuilt/STAMP" && grep -qx "arch=$ARCH" "$CARRY/prebuilt/STAMP"; then
    cp "$CARRY"/prebuilt/_C*"$SUFFIX" ddpm_kernels/ && use_prebuilt=1
  fi
  libs_ok() { "$PY" -c "
import sys, ddpm_kernels as dk
cuda, cpu = dk.available_backends('cuda'), dk.available_backends('cpu')
print('build: backends for cuda tensors:', cuda, '| for cpu tensors:', cpu)
sys.exit(0 if 'cuda' in cuda and 'cpu' in cpu else 1)" 2>&1 | tail -3; }
  if [ $use_prebuilt = 1 ] && libs_ok; then
    BUILD_NOTE="prebuilt libraries, stamp $STAMP_HERE"
    echo "build: using the prebuilt libraries (stamp matches)" | tee -a "$OUT/build.log"
  else
    [ $use_prebuilt = 1 ] && echo "build: the prebuilt libraries did not load; building" | tee -a "$OUT/build.log"
    rm -f ddpm_kernels/_C*"$SUFFIX"
    t0=$(now)
    # One arch; the baseline CPU library only (without any CPU library the package warns at every import).
    echo "build: TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$NPROC DDPM_KERNELS_CPU_ISA=default"
    DDPM_KERNELS_CUDA=1 DDPM_KERNELS_CPU_ISA=default TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$NPROC \
      timeout "$(allow 240 200)" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
    rc=$?
    echo "build: setup.py build_ext exit $rc in $(( $(now) - t0 )) s" | tee -a "$OUT/build.log"
    tail -5 "$OUT/build.log"
    BUILD_NOTE="built here in $(( $(now) - t0 )) s, exit $rc"
    libs_ok || BUILD_NOTE="$BUILD_NOTE; compiled backends incomplete: their tests skip, Triton runs"
  fi
  timeout 60 "$PY" -m ddpm_kernels info 2>&1 | tail -12
fi
end ran "$BUILD_NOTE"

# ------------------------------------------------------------------------------------------- 4. tests
# Run A: every test of the files that exercise the GPU (GPU-marked tests, and the Triton suites, which run on
# the GPU when there is one). Run B: the GPU tests of every other file (GPU-marked, or named for cuda).
B=$(allow 200 120); begin tests "$B"
A_FILES=()
for f in tests/test_extension_gpu.py tests/test_gpu_graphs.py tests/test_triton_gpu.py tests/test_gpu_paths.py \
         tests/test_conformance.py tests/test_func_transforms.py \
         tests/test_triton.py tests/test_triton_sampler_ops.py tests/test_extension_sampler_ops.py \
         tests/test_layouts.py tests/test_*gpu*.py tests/test_triton_*.py tests/test_flow.py tests/test_euler.py \
         tests/test_guidance.py tests/test_noise_backends.py tests/test_extension_euler.py \
         tests/test_solver_kernels.py tests/test_mixed_precision.py; do
  [ -f "$f" ] && [[ " ${A_FILES[*]} " != *" $f "* ]] && A_FILES+=("$f")
done
IGNORE=()
for f in "${A_FILES[@]}"; do IGNORE+=(--ignore "$f"); done
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEX)
echo "tests: files with GPU paths: ${A_FILES[*]}"
if [ $HAVE_GPU = 1 ]; then
  EXTRA=()
  py_ok "import xdist" && EXTRA+=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
  # thread method: a test stuck inside a CUDA call is ended too (its worker is replaced)
  py_ok "import pytest_timeout" && EXTRA+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-180}" --timeout-method thread)
  [ ${#EXTRA[@]} -gt 0 ] && echo "tests: ${EXTRA[*]}" || echo "tests: no xdist, no pytest-timeout: one process, the time box of this step only"
  # Each pytest-xdist worker would start one inductor compile process per core: 8 x nproc is too many.
  export TORCHINDUCTOR_COMPILE_THREADS=2
  BA=$(( B > 70 ? B - 35 : B * 2 / 3 ))
  # SIGINT first: pytest then stops, reports and writes its JUnit file; KILL 20 s later if it does not.
  timeout -s INT -k 20 "$BA" "${PYTEST[@]}" "${EXTRA[@]}" --durations=15 -m "gpu or not gpu" \
    --junitxml="$OUT/tests.xml" -o junit_suite_name=gpu_files "${A_FILES[@]}"
  echo "tests: run A exit $?"
  BB=$(( DEADLINE - $(now) - 120 )); [ "$BB" -gt 35 ] && BB=35
  if [ "$BB" -ge 10 ]; then
    timeout -s INT -k 10 "$BB" "${PYTEST[@]}" "${EXTRA[@]}" -k "gpu or cuda" -m "gpu or not gpu" \
      --junitxml="$WORK/tests-b.xml" -o junit_suite_name=gpu_tests_elsewhere tests "${IGNORE[@]}"
    echo "tests: run B exit $?"
  else
    echo "tests: run B skipped: time budget"
  fi
  unset TORCHINDUCTOR_COMPILE_THREADS
  end ran
else
  echo "tests: no CUDA device: the GPU tests are collected and their GPU-marked part runs, which skips"
  timeout "$B" "$PY" -m pytest -p no:cacheprovider -q --co -m "gpu or not gpu" "${A_FILES[@]}" 2>&1 | tail -1 \
    | sed 's/^/tests: run A would run: /'
  timeout -s INT -k 10 "$B" "${PYTEST[@]}" -m gpu --junitxml="$OUT/tests.xml" -o junit_suite_name=gpu_files \
    "${A_FILES[@]}" 2>&1 | tail -3
  timeout -s INT -k 10 "$(allow 60 120)" "${PYTEST[@]}" -m gpu --junitxml="$WORK/tests-b.xml" \
    -o junit_suite_name=gpu_tests_elsewhere tests "${IGNORE[@]}" 2>&1 | tail -3
  end skipped "no GPU: collected, GPU-marked tests skipped"
fi

# ------------------------------------------------------------------------------------------- 5. sanitizer
# memcheck over every kernel once; racecheck over the shared-memory reductions (the loss, the threshold).
# Without torch's caching allocator every tensor is its own allocation, so an access past one is caught.
B=$(allow 90 75); begin sanitize "$B"
if [ $HAVE_GPU = 1 ] && [ -n "$SAN" ]; then
  for tool in memcheck racecheck; do
    if [ $tool = memcheck ]; then TB=$(( B * 3 / 5 )); ARGS=(); else TB=$(allow $(( B * 2 / 5 )) 75); ARGS=(--only reductions); fi
    [ "$TB" -lt 15 ] && { echo "===== [gpu_check] tool $tool: skipped, time budget" >> "$OUT/sanitizer.log"; continue; }
    echo "===== [gpu_check] tool $tool: up to $TB s" >> "$OUT/sanitizer.log"
    t0=$(now)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$TB" "$SAN" --tool $tool --print-limit 50 \
      "$PY" benchmarks/gpu/sanitize.py "${ARGS[@]}" >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    echo "===== [gpu_check] $tool exit $rc in $(( $(now) - t0 )) s$([ $rc = 124 ] && echo ' (time box: cut short)')" >> "$OUT/sanitizer.log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^sanitize: |\[gpu_check\]" "$OUT/sanitizer.log" | tail -4
  done
  end ran
else
  why=$([ $HAVE_GPU = 0 ] && echo "no CUDA device" || echo "compute-sanitizer not found")
  echo "sanitize: $why: compute-sanitizer not run; the script's calls are checked on the CPU instead"
  { echo "===== [gpu_check] tool none: $why"
    timeout "$B" "$PY" benchmarks/gpu/sanitize.py --device cpu --backends cpu reference 2>&1 | tail -1
  } > "$OUT/sanitizer.log"
  cat "$OUT/sanitizer.log"
  end skipped "$why"
fi

# ------------------------------------------------------------------------------------------- 6. benchmark
B=$(allow 150 20); begin bench "$B"
timeout -k 10 "$B" "$PY" benchmarks/gpu/bench_gpu.py --out-json "$OUT/bench.json" --out-md "$OUT/bench.md" \
  --budget-s $(( B - 15 )) ${COPY_GBPS:+--peak-copy-gbps "$COPY_GBPS"}
rc=$?
end "$([ $HAVE_GPU = 1 ] && echo "exit $rc" || echo skipped)" "$([ $HAVE_GPU = 1 ] || echo 'no GPU: call table checked on the CPU')"

# The package's own benchmark for what bench_gpu.py leaves out (given noise, out= variants, the posterior, the
# threshold, a UNet sampling loop), at one shape, in what time is left.
B=$(allow 45 20); begin cli-bench "$B"
if [ $HAVE_GPU = 1 ] && [ "${GPU_CHECK_CLI_BENCH:-1}" = 1 ] && [ "$B" -ge 30 ]; then
  timeout -k 5 "$B" "$PY" -m ddpm_kernels bench --device cuda --shapes 16x4x64x64 --dtypes fp32 \
    --ops p_sample p_mean_variance q_posterior dynamic_threshold --providers eager cuda triton \
    --min-run-time 0.05 --e2e-steps 20 --no-progress --out "$WORK/bench-cli" \
    > "$WORK/bench-cli.log" 2>&1
  rc=$?
  grep -E "^wrote|Error|error" "$WORK/bench-cli.log" | tail -5
  end "exit $rc"
else
  echo "cli-bench: skipped ($([ $HAVE_GPU = 1 ] && echo "time budget or GPU_CHECK_CLI_BENCH=0" || echo "no CUDA device"))"
  end skipped
fi

# ------------------------------------------------------------------------------------------- 7. summary
begin summary "$(allow 20 0)"
end ok "total $(elapsed) s of $BUDGET"
timeout 30 "$PY" benchmarks/gpu/summarize.py --out "$OUT" --work "$WORK" > /dev/null
echo
cat "$OUT/summary.md"
echo "gpu_check: done in $(elapsed) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1  # let tee write the last lines to check.log
