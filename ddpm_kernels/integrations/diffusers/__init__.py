"""diffusers schedulers whose per-step math runs through ddpm_kernels' fused ops.

Each ``Fused<Name>`` subclasses diffusers' ``<Name>`` with the same config, so ``from_config``,
``save_pretrained`` and pipelines take it unchanged::

    from ddpm_kernels.integrations.diffusers import FusedFlowMatchEulerDiscreteScheduler
    pipe.scheduler = FusedFlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

* `FusedDDPMScheduler`, `FusedDDIMScheduler` (``ddpm_kernels.integrations.diffusers.ddpm``): ``step`` is one
  `ddpm_kernels.ddpm_step` / `ddpm_kernels.ddim_step`, ``add_noise`` one `ddpm_kernels.q_sample`.
* `FusedFlowMatchEulerDiscreteScheduler` (``ddpm_kernels.integrations.diffusers.flow``): ``step`` is one
  `ddpm_kernels.flow_step`, ``scale_noise`` one `ddpm_kernels.flow_interpolate`.
* `FusedEulerDiscreteScheduler`, `FusedEulerAncestralDiscreteScheduler` (``ddpm_kernels.integrations.diffusers.euler``):
  ``step`` is one `ddpm_kernels.euler_step` / `ddpm_kernels.euler_ancestral_step`; ``scale_model_input`` reads no
  device value.
* `FusedDPMSolverMultistepScheduler` (``ddpm_kernels.integrations.diffusers.dpm``): ``step`` is one
  `ddpm_kernels.solvers.solver_step` on the DPM-Solver(++) coefficient table of the stock sigma table
  (`ddpm_kernels.solvers.dpm`), its earlier outputs in a ring on the device.
* `FusedUniPCMultistepScheduler` (``ddpm_kernels.integrations.diffusers.unipc``): ``step`` is one
  `ddpm_kernels.solvers.solver_step` on UniPC's coefficient table, with the history ring on the device.
* `FusedLCMScheduler` (``ddpm_kernels.integrations.diffusers.lcm``): ``step`` is one
  `ddpm_kernels.solvers.solver_step` on LCM's coefficient table, ``denoised`` its last-sample output.

Common to all: ``step`` does not synchronize with the device; noise is drawn from the generator exactly as the
stock scheduler draws it (same images, same generator state) unless ``in_kernel_noise = True``; the attribute
``fused_backend`` picks the ops' backend (``"auto"``); whatever the fused ops do not take runs the stock code
path with one warning per scheduler and cause. Each module's docstring says what differs from stock.
"""

from .ddpm import FusedDDIMScheduler, FusedDDPMScheduler
from .dpm import FusedDPMSolverMultistepScheduler
from .euler import FusedEulerAncestralDiscreteScheduler, FusedEulerDiscreteScheduler
from .flow import FusedFlowMatchEulerDiscreteScheduler
from .lcm import FusedLCMScheduler
from .unipc import FusedUniPCMultistepScheduler

__all__ = [
    "FusedDDPMScheduler",
    "FusedDDIMScheduler",
    "FusedFlowMatchEulerDiscreteScheduler",
    "FusedEulerDiscreteScheduler",
    "FusedEulerAncestralDiscreteScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedUniPCMultistepScheduler",
    "FusedLCMScheduler",
]
