#!/usr/bin/env bash
# Prepares, on a machine without a GPU, what benchmarks/gpu_check.sh takes to the lent GPU machine in one
# carried folder, benchmarks/gpu/carry/ (git-ignored through .git/info/exclude):
#   prebuilt/  the extension compiled for that machine's Python and torch: ddpm_kernels/_C with the CUDA
#              kernels for sm_90 only and _C_cpu (baseline x86-64 CPU kernels), debug info stripped; and STAMP:
#              the source hash (benchmarks/gpu/source_stamp.sh), torch, Python tag and arch they were built
#              for. gpu_check.sh uses them only when all of these match there.
#   wheels/    packages the GPU image may lack, installed there only when missing: diffusers (absent from the
#              image) and importlib_metadata <9 (its one missing need), and, in case a future image drops them,
#              pytest, pluggy, iniconfig, packaging, pytest-timeout, pytest-xdist, execnet, hypothesis,
#              pytest-benchmark, py-cpuinfo.
# Why prebuild: csrc/cuda is one translation unit that nvcc compiles on one core in ~170 s of CPU time even
# for a single arch, a third of an ~8-minute GPU run; the stripped libraries are ~5 MB to carry.
#
# Knobs: GPU_PYTHON (a python3.12; default: the newest pyenv 3.12), GPU_TORCH (torch==2.11.0, the GPU image's
#        2.11.0+cu130, which PyPI serves for Linux x86-64), GPU_ARCH (9.0), PREBUILD_VENV
#        (${TMPDIR:-/tmp}/ddpm-gpu-prebuild-venv, kept between runs: ~4.7 GB, ~3 min to make), PREBUILD_SRC
#        (${TMPDIR:-/tmp}/ddpm-gpu-prebuild-src: the sources' copy and build directory, kept), MAX_JOBS (2),
#        CUDA_HOME (/usr/local/cuda, nvcc 13.0 as on the GPU image), SKIP_WHEELS=1.
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
carry="$repo/benchmarks/gpu/carry"
venv=${PREBUILD_VENV:-${TMPDIR:-/tmp}/ddpm-gpu-prebuild-venv}
torch_spec=${GPU_TORCH:-torch==2.11.0}
arch=${GPU_ARCH:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
py312=${GPU_PYTHON:-$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1)}
[ -x "$py312" ] || { echo "prebuild: no python3.12 found (set GPU_PYTHON)" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "prebuild: nvcc not found (set CUDA_HOME)" >&2; exit 1; }

# The carried folder must never be committed: make sure git ignores it.
exclude="$(git -C "$repo" rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/benchmarks/gpu/carry/" "$exclude" 2>/dev/null || echo "/benchmarks/gpu/carry/" >> "$exclude"

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$torch_spec" setuptools wheel ninja numpy
fi
py="$venv/bin/python"
torch_version=$("$py" -c "import torch; print(torch.__version__)")
py_tag=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
echo "prebuild: torch $torch_version, extension suffix $py_tag, $(nvcc --version | tail -1)"

# A private copy of the sources: the build writes ddpm_kernels/_C*.so next to them, and the stamp is taken
# from the copy, so an edit made meanwhile in the checkout cannot end up under a wrong stamp. The copy and its
# build directory are kept (PREBUILD_SRC) and files are copied with their times, so ninja recompiles only the
# translation units whose sources changed since the last prebuild.
work=${PREBUILD_SRC:-${TMPDIR:-/tmp}/ddpm-gpu-prebuild-src}
mkdir -p "$work/ddpm_kernels"
rm -rf "$work/csrc" "$work"/ddpm_kernels/*.py "$work"/ddpm_kernels/_C*.so
cp -a "$repo/setup.py" "$repo/pyproject.toml" "$repo/README.md" "$repo/csrc" "$work/"
cp -a "$repo"/ddpm_kernels/*.py "$work/ddpm_kernels/"
stamp=$(bash "$repo/benchmarks/gpu/source_stamp.sh" "$work")

# The CUDA library and the baseline CPU one: without any CPU library the package warns at every import that
# the compiled kernels are unavailable, and the tests that also run the CPU backend would skip it.
build_start=$(date +%s)
(cd "$work" && DDPM_KERNELS_CUDA=1 DDPM_KERNELS_CPU_ISA=default TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-2} \
  "$py" setup.py -q build_ext --inplace)
build_s=$(( $(date +%s) - build_start ))
lib=$(ls "$work"/ddpm_kernels/_C"$py_tag")

# Load it against that torch and check every op has a CUDA kernel (no GPU needed to register them).
"$py" - "$lib" <<'PY'
import sys
import torch

torch.ops.load_library(sys.argv[1])
ops = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddpm_kernels::")})
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_kernels::{op}", "CUDA")
           and not op.startswith("inputs_ok")]
print(f"prebuild: {len(ops)} ddpm_kernels ops registered; without a CUDA kernel: {missing or 'none'}")
PY

rm -rf "$carry/prebuilt"
mkdir -p "$carry/prebuilt"
for f in "$work"/ddpm_kernels/_C*"$py_tag"; do
  cp "$f" "$carry/prebuilt/"
  strip --strip-debug "$carry/prebuilt/$(basename "$f")"
done
cat > "$carry/prebuilt/STAMP" <<STAMP
sources=$stamp
torch=$torch_version
suffix=$py_tag
arch=$arch
built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in ${build_s} s on $(nproc) cores, commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- setup.py csrc 2>/dev/null || echo ' plus uncommitted csrc/setup.py edits')
STAMP
echo "prebuild: built in ${build_s} s; stripped: $(cd "$carry/prebuilt" && du -h _C* | tr '\t\n' ' '); stamp $stamp"

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  mkdir -p "$carry/wheels"
  # One version of each, pure Python or cp312 manylinux: pip installs them there with --no-deps.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$carry/wheels" \
    diffusers==0.42.1 "importlib_metadata<9" pytest pluggy iniconfig packaging pytest-timeout pytest-xdist \
    execnet hypothesis pytest-benchmark py-cpuinfo 2>&1 | grep -v "is ignored" || true
  echo "prebuild: wheels $(du -sh "$carry/wheels" | cut -f1): $(ls "$carry/wheels" | tr '\n' ' ')"
fi
echo "prebuild: carry folder $(du -sh "$carry" | cut -f1) in all; done in $(( $(date +%s) - start )) s"
