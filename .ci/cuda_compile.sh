#!/usr/bin/env bash
# Compile the CUDA kernels (csrc/cuda) against a CUDA build of torch, with no GPU needed, and check that the
# built library loads and registers a CUDA kernel for every ddpm_kernels operator. A CUDA compile error fails
# this script.
#
# The project's own venv has a CPU torch, which cannot build CUDA code (torch clears CUDA_HOME and ships no
# CUDA libraries), so this uses a separate venv with a CUDA 13.0 build of torch (installed from local disk,
# kept between runs) and builds a copy of the sources outside the checkout, leaving the checkout's build alone.
#
# Knobs: CUDA_TORCH (default torch==2.14.1), CUDA_VENV (default ${TMPDIR:-/tmp}/ddpm-kernels-cuda-venv),
#        TORCH_CUDA_ARCH_LIST (default 9.0: one arch keeps it lean), MAX_JOBS (default 2), CUDA_HOME.
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CUDA_VENV:-${TMPDIR:-/tmp}/ddpm-kernels-cuda-venv}
torch_spec=${CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

command -v nvcc >/dev/null || { echo "cuda_compile: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
nvcc --version | tail -1

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$py" -m pip install -q "$torch_spec" setuptools wheel ninja
fi
"$py" -c "import torch; print('cuda_compile: torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "cuda_compile: venv ready after $(( $(date +%s) - start )) s"

# A private copy of the sources: the build writes ddpm_kernels/_C*.so next to them.
work=$(mktemp -d "${TMPDIR:-/tmp}/ddpm-kernels-cuda-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r "$repo/setup.py" "$repo/pyproject.toml" "$repo/csrc" "$work/"
mkdir -p "$work/ddpm_kernels"
cp "$repo"/ddpm_kernels/*.py "$work/ddpm_kernels/"

build_start=$(date +%s)
(cd "$work" && DDPM_KERNELS_CUDA=1 DDPM_KERNELS_CPU_ISA=none "$py" setup.py -q build_ext --inplace)
echo "cuda_compile: build took $(( $(date +%s) - build_start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"

# Load the library directly (no package import: the CUDA venv has only torch) and check the registrations.
"$py" - "$work" <<'PY'
import glob, sys
import torch

(lib,) = glob.glob(f"{sys.argv[1]}/ddpm_kernels/_C.*.so")
torch.ops.load_library(lib)
ops = [
    "q_sample", "q_sample_out", "q_sample_backward", "predict_start_from_noise", "predict_noise_from_start",
    "get_v", "predict_start_from_z_and_v", "predict_eps_from_z_and_v", "q_posterior", "p_mean_variance",
    "p_sample", "p_sample_out", "diffusion_loss", "diffusion_loss_backward", "ddim_step", "ddim_step_out",
    "ddpm_step", "ddpm_step_out", "flow_interpolate", "flow_interpolate_out", "flow_interpolate_backward",
    "flow_step", "flow_step_out", "flow_loss", "flow_loss_backward", "euler_step", "euler_step_out",
    "euler_ancestral_step", "euler_ancestral_step_out",
]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_kernels::{op}", "CUDA")]
if missing:
    sys.exit(f"cuda_compile: no CUDA kernel registered for {missing}")
print(f"cuda_compile: {lib.rsplit('/', 1)[-1]} loads; CUDA kernels registered for all {len(ops)} ops")
PY
echo "cuda_compile: OK in $(( $(date +%s) - start )) s"
