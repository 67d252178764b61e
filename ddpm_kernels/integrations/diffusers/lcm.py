"""The LCM drop-in: ``FusedLCMScheduler`` (latent consistency models and LCM-LoRA pipelines).

It subclasses diffusers' ``LCMScheduler`` with the same config; ``set_timesteps`` (``original_inference_steps``,
``strength``, custom timesteps, every spacing), ``add_noise``, ``get_velocity`` and ``index_for_timestep`` are
the stock code. ``step`` is one `ddpm_kernels.solvers.solver_step` on the LCM coefficient table
(`ddpm_kernels.solvers.lcm.lcm_coefficients`: x0 from every prediction type, clipping or dynamic thresholding,
the boundary-condition scalings ``c_skip`` / ``c_out`` with ``timestep_scaling``, the noise to the next
timestep), on ``backend="auto"`` (the attribute ``fused_backend`` chooses another), and returns
``LCMSchedulerOutput(prev_sample, denoised)`` as stock. What changes against the stock class:

* ``step`` does not synchronize with the device: the table (one float64 row per step) is built once per
  schedule on the host and copied to the device once, and the step index is a Python int kept as stock keeps it
  plus an int64 (B,) device tensor advanced in place (see `FusedEulerDiscreteScheduler`).
* The coefficients of a step are those of ``timesteps[step_index]`` (stock reads the table at the ``timestep``
  argument: the same in a loop over ``scheduler.timesteps``).
* The noise of every step but the last is drawn exactly as the stock step draws it (``randn_tensor`` of the
  model output's shape in the step's dtype, from the same generator): the same generator gives the same images
  and ends in the same state. ``in_kernel_noise = True`` lets the backend generate it instead.
* The step computes in float32 (float64 for float64 data) and rounds once: for bf16 / fp16 inputs the result
  is closer to the float64 computation than stock's. ``denoised`` is written by the step into a tensor of its
  own (the op's last-sample output), one per step as stock returns it.

Every stock argument is accepted. What the fused op does not take runs the stock code, with one warning per
scheduler and cause: a prediction type the stock step refuses (its error follows), clipping or thresholding
options outside the op's range, a model output of another shape or device than the sample, a step index
outside the schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ...solvers.lcm import lcm_coefficients
from ._common import _is_real, lane_randn
from ._solver import _Schedule, _SolverDropIn, threshold_unsupported

__all__ = ["FusedLCMScheduler"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction")


class FusedLCMScheduler(_SolverDropIn, LCMScheduler, output=LCMSchedulerOutput):
    """diffusers' ``LCMScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.solvers.solver_step`; see the module docstring for what differs."""

    # diffusers finds a scheduler's compatibles by class name, its own included: the stock list is empty, so
    # the fused class names the stock one
    _compatibles = ["LCMScheduler"]
    _dk_source_names = ("alphas_cumprod",)

    def _dk_config_key(self) -> tuple:
        c = self.config
        return (c.prediction_type, float(c.timestep_scaling), self.num_inference_steps)

    def _dk_settings(self) -> tuple:
        return (self.num_inference_steps,)

    def _dk_unsupported(self) -> Optional[str]:
        c = self.config
        if c.prediction_type not in _PREDICTIONS:
            return f"prediction_type {c.prediction_type!r} is not one the stock step computes"
        if not (_is_real(c.timestep_scaling) and math.isfinite(c.timestep_scaling)):
            return f"timestep_scaling {c.timestep_scaling!r} is not a finite number"
        if c.thresholding:
            return threshold_unsupported(c)
        elif c.clip_sample and not (_is_real(c.clip_sample_range) and 0 < c.clip_sample_range < math.inf):
            return f"clip_sample_range {c.clip_sample_range!r} is not a positive finite number"
        return None

    def _dk_steps(self, schedule: _Schedule) -> int:
        array = schedule.host_array
        if not (np.issubdtype(array.dtype, np.integer) and array.min() >= 0
                and array.max() < schedule.host_sources[0].shape[0]):
            return 0  # not training timesteps: every step takes the stock path
        return array.shape[0]

    def _dk_build(self, schedule: _Schedule, begin: int) -> np.ndarray:
        c = self.config
        return lcm_coefficients(schedule.host_sources[0], schedule.host_array, prediction_type=c.prediction_type,
                                timestep_scaling=float(c.timestep_scaling),
                                num_inference_steps=self.num_inference_steps)

    def _dk_options(self) -> dict:
        c = self.config
        if c.thresholding:
            return dict(threshold_ratio=float(c.dynamic_thresholding_ratio), threshold_max=float(c.sample_max_value))
        if c.clip_sample:
            return dict(clip_range=float(c.clip_sample_range))
        return {}

    def _dk_continues(self, lane, model_output, timestep, sample) -> bool:
        """Whether this step can take the last plain fused step's `_DirectLane` (`_dk_lane_holds`): an integer
        timestep (a float one gets the stock error), the step index a Python int, and the step's noise drawn as
        the stock step draws it (every step but the last draws; with ``in_kernel_noise`` the kernel would)."""
        index = self._step_index
        return (
            type(index) is int
            and (type(timestep) is int or (type(timestep) is torch.Tensor and not timestep.is_floating_point()))
            and not self.in_kernel_noise
            and self._dk_lane_holds(lane, model_output, sample, index)
        )

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """As ``LCMScheduler.step``, fused and sync-free."""
        lane = self.__dict__.get("_dk_lane_")
        if lane is not None and self._dk_continues(lane, model_output, timestep, sample):
            # the next step of the last plain fused step's loop: its noise drawn as stock draws it, a new
            # ``denoised`` as stock returns one per step, the lane's solver call
            noise = None
            if self._step_index != self.num_inference_steps - 1:
                noise = lane_randn(self, lane, generator, model_output, model_output.dtype)
            denoised = torch.empty_like(sample)
            prev = self._dk_served(lane, model_output, sample, denoised, noise)
            return self._make_output(prev, denoised) if return_dict else (prev, denoised)
        if isinstance(timestep, (float, np.floating)) or (
                isinstance(timestep, torch.Tensor) and timestep.is_floating_point()):
            # stock indexes alphas_cumprod by the timestep: a float one gets its IndexError
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        prepared = self._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        schedule, index, _ = prepared
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        options = self._dk_options()
        noise, generator_for_op = None, None
        if index != self.num_inference_steps - 1:
            in_kernel, generator_for_op = self._dk_kernel_generator(generator)
            if in_kernel:
                options["stochastic"] = True
            else:
                noise = self._dk_randn(model_output.shape, generator, model_output.device, dtype)
        denoised = torch.empty_like(sample, dtype=dtype)
        prev, denoised = self._dk_solver_step(schedule, index, 0, model_output, sample, last=denoised, noise=noise,
                                              generator=generator_for_op, **options)
        self._dk_keep_lane(index, schedule, 0, None, None)
        if not return_dict:
            return (prev, denoised)
        return self._make_output(prev, denoised)
