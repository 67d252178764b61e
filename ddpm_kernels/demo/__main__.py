"""``python -m ddpm_kernels.demo``, the same as ``python -m ddpm_kernels demo``."""

import sys

from .cli import main

sys.exit(main())
