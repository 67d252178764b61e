"""``python -m ddpm_kernels info``: versions and backend availability."""

from __future__ import annotations

import argparse
import platform

import torch

from . import __version__, backends


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_kernels info")
    parser.parse_args(argv)
    print(f"ddpm_kernels {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        print(f"cuda device: {torch.cuda.get_device_name()}")
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            names = backends.available_backends(device, dtype)
            print(f"{device:5s} {str(dtype):15s} backends: {', '.join(names)}")
    for name, error in backends._load_errors.items():
        print(f"{name}: unavailable ({error})")
    return 0
