"""Build script: the pure-Python package always; the compiled operators from ``csrc/`` when torch is present.

Libraries built (all optional at runtime; ddpm_kernels/extension.py loads them):
  ddpm_kernels._C                 operator schemas (csrc/ops.cpp), the autograd formulas (csrc/autograd.cpp) +
                                  the CUDA kernels (csrc/cuda/*.cu, *.cpp) when CUDA is built
  ddpm_kernels._C_cpu             CPU kernels (csrc/cpu/*.cpp) for the baseline instruction set
  ddpm_kernels._C_cpu_avx2        the same sources built for AVX2+FMA   (x86-64 only)
  ddpm_kernels._C_cpu_avx512      the same sources built for AVX-512    (x86-64 only)
At import the widest CPU library that torch.backends.cpu.get_cpu_capability() allows is loaded, as PyTorch
does with its own per-ISA kernels: a package built anywhere uses the vector width of the machine it runs on.

Environment knobs (see README, "Building the extension"):
  DDPM_KERNELS_NO_EXTENSION=1    skip the compiled libraries entirely (pure Python + Triton)
  DDPM_KERNELS_CUDA=0|1          skip / force the CUDA kernels (default: build them when torch is a CUDA build
                                 and nvcc is found)
  DDPM_KERNELS_CPU_ISA=LIST      CPU builds to make, comma-separated from default,avx2,avx512, or "none"
                                 (default: all three on x86-64, "default" elsewhere)
  TORCH_CUDA_ARCH_LIST           CUDA architectures to build for (torch's own knob), e.g. "8.0;9.0"
  MAX_JOBS                       parallel compile jobs for ninja (torch's own knob)
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Flags per CPU build, as PyTorch builds its own kernels for each capability. -fno-trapping-math lets GCC
# vectorize compare-and-select code it would otherwise keep scalar.
CPU_ISAS = {
    "default": ("_C_cpu", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]),
    "avx2": ("_C_cpu_avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "avx512": (
        "_C_cpu_avx512",
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    ),
}
COMMON_CXX = ["-O3", "-fno-trapping-math", "-fvisibility=hidden"]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cpu_isas():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    value = os.environ.get("DDPM_KERNELS_CPU_ISA", "").strip()
    if not value:
        return ["default", "avx2", "avx512"] if x86 else ["default"]
    if value == "none":
        return []
    isas = [v.strip() for v in value.split(",") if v.strip()]
    for isa in isas:
        if isa not in CPU_ISAS:
            sys.exit(f"setup.py: DDPM_KERNELS_CPU_ISA: unknown {isa!r}; expected a list of {sorted(CPU_ISAS)} or 'none'")
        if isa != "default" and not x86:
            sys.exit(f"setup.py: DDPM_KERNELS_CPU_ISA: {isa!r} is an x86-64 build; this machine is {platform.machine()}")
    return isas


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = _env_flag("DDPM_KERNELS_CUDA")
    if forced is False:
        return False
    have_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if forced and (torch.version.cuda is None or not have_nvcc):
        sys.exit(
            "setup.py: DDPM_KERNELS_CUDA=1 but "
            + ("torch is a CPU-only build (install a CUDA build of torch)" if torch.version.cuda is None
               else "nvcc was not found (set CUDA_HOME)")
        )
    # A CUDA build of torch plus a toolkit, whether or not a GPU is visible (build machines often have none).
    return torch.version.cuda is not None and have_nvcc


def extension_kwargs():
    if os.environ.get("DDPM_KERNELS_NO_EXTENSION", "0") == "1":
        return {}
    if not os.path.exists(os.path.join(ROOT, "csrc", "ops.cpp")):
        return {}
    # Imported only when there is something to compile. Without torch in the build environment (pip's default
    # build isolation) the package installs pure-Python and says how to get the kernels.
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        print(
            f"setup.py: torch is not importable here ({exc}); building without the compiled kernels. "
            "Install torch first and build with `pip install --no-build-isolation .` to get them.",
            file=sys.stderr,
        )
        return {}

    class BuildExtensionPerTarget(BuildExtension):
        # The CPU libraries compile the same sources with different flags: give each its own object directory
        # (and ninja file) so the builds never share or overwrite objects.
        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_modules = []
    # the autograd formulas sit with the schemas: one Autograd-key registration serves the CPU and CUDA kernels
    ops_sources = [f"csrc/{name}.cpp" for name in ("ops", "fast_checks", "fast_calls", "autograd")]
    if _want_cuda():
        cu_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        # pip-installed CUDA torch ships some CUDA headers (e.g. cusparse/cublas used by ATen/cuda headers)
        # in site-packages/nvidia/cu13/include rather than in the toolkit.
        extra_inc = []
        site = os.path.dirname(os.path.dirname(torch.__file__))
        for cand in sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include"))):
            extra_inc.append(cand)
        ext_modules.append(
            CUDAExtension(
                "ddpm_kernels._C",
                ops_sources + cu_sources,
                include_dirs=include_dirs + extra_inc,
                extra_compile_args={
                    "cxx": COMMON_CXX + ["-DDDPM_WITH_CUDA"],
                    "nvcc": ["-O3", "-DDDPM_WITH_CUDA", "--expt-relaxed-constexpr"],
                },
            )
        )
    else:
        ext_modules.append(
            CppExtension("ddpm_kernels._C", ops_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": COMMON_CXX})
        )
    cpu_sources = _sources("csrc/cpu/*.cpp")
    # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop in the extension
    # even though torch itself is threaded. libgomp resolves to the copy torch has already loaded (same soname).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    for isa in _cpu_isas() if cpu_sources else []:
        name, flags = CPU_ISAS[isa]
        ext_modules.append(
            CppExtension(
                "ddpm_kernels." + name,
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": COMMON_CXX + flags + openmp},
                extra_link_args=openmp,
            )
        )
    return {"ext_modules": ext_modules, "cmdclass": {"build_ext": BuildExtensionPerTarget}}


setup(**extension_kwargs())
