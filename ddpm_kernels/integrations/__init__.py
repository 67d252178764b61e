"""Drop-in integrations for existing diffusion code.

* `ddpm_kernels.integrations.diffusers`: ``FusedDDPMScheduler``, ``FusedDDIMScheduler`` and
  ``FusedFlowMatchEulerDiscreteScheduler``, subclasses of diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` /
  ``FlowMatchEulerDiscreteScheduler`` whose ``step`` and ``add_noise`` / ``scale_noise`` run the fused ops.
* `ddpm_kernels.integrations.compvis`: ``patch(model)`` / ``unpatch(model)`` for CompVis / Stability-AI ldm
  ``DDPM`` and ``LatentDiffusion`` objects.

Each is imported on demand (``import ddpm_kernels.integrations.diffusers``), so neither diffusers nor ldm is
needed to use the rest of the package.
"""
