"""Build script: the pure-Python package always; the compiled extension ``ddpm_kernels._C`` from ``csrc/``.

Environment knobs (see README, "Building the extension"):
  DDPM_KERNELS_NO_EXTENSION=1   skip the compiled extension entirely (pure Python + Triton)
  DDPM_KERNELS_CUDA=0|1         skip / force the CUDA kernels (default: build them when torch is a CUDA build
                                and nvcc is found)
  TORCH_CUDA_ARCH_LIST          CUDA architectures to build for (torch's own knob)
  MAX_JOBS                      parallel compile jobs for ninja (torch's own knob)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension_kwargs():
    if os.environ.get("DDPM_KERNELS_NO_EXTENSION", "0") == "1":
        return {}
    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpp_sources:
        return {}
    # Imported only when there is something to compile, so a plain install needs no torch at build time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("ddpm_kernels._C", cpp_sources, extra_compile_args={"cxx": ["-O3"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_kwargs())
