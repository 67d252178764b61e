"""Command line: ``python -m ddpm_kernels {info,demo,bench} ...``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module has main(argv) -> int.
COMMANDS = {
    "info": ("ddpm_kernels._info", "versions and which backends can run here"),
    "demo": ("ddpm_kernels.demo", "train a tiny DDPM on handwritten digits and sample it with the fused ops"),
    "bench": ("ddpm_kernels.bench", "benchmark every backend against eager and torch.compile"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ddpm_kernels", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
