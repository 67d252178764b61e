"""The DPM-Solver drop-in: ``FusedDPMSolverMultistepScheduler`` (DPM-Solver++ 2M and its kin, the default
scheduler of many Stable Diffusion pipelines).

It subclasses diffusers' ``DPMSolverMultistepScheduler`` with the same config; ``set_timesteps`` (every
``timestep_spacing``, Karras / exponential / beta / Lu / flow sigmas, ``final_sigmas_type``,
``lambda_min_clipped``, ``rescale_betas_zero_snr``, custom timesteps, dynamic shifting), ``add_noise``,
``scale_model_input`` and ``index_for_timestep`` are the stock code, so the sigma table and the timesteps are the
stock ones. ``step`` is one `ddpm_kernels.solvers.solver_step` on the `ddpm_kernels.solvers.dpm` coefficient
table of that sigma table (``backend="auto"``; the attribute ``fused_backend`` chooses another). What changes
against the stock class:

* ``step`` does not synchronize with the device. The step index is a Python int kept exactly as the stock
  scheduler keeps it (``step_index``, ``begin_index``, ``set_begin_index``), mirrored by an int64 (B,) tensor on
  the sample's device and advanced there; the first index is found from the host copy of the timesteps as
  `FusedEulerDiscreteScheduler` finds it. The coefficient table (float64 on the host, one row per step, the
  stock order choice with its warm-up counted from that first index) is built at the first step and copied to
  the sample's device once per schedule and first index, on the solver drop-ins' shared base (as
  `FusedUniPCMultistepScheduler`).
* The earlier converted model outputs live in a ring of ``solver_order - 1`` tensors on the device, allocated
  once per sample shape, dtype and device and reused by every later loop; the step reads it and writes the new
  output into it in the same pass. ``model_outputs`` lists the ring's entries in the stock order (the oldest
  entry, which no later step reads, is not kept: ``None`` there, as for entries not written yet);
  ``lower_order_nums`` counts as stock counts.
* The SDE forms draw their noise exactly as the stock step does (``randn_tensor`` of the converted output's
  shape in float32, from the same generator, every step; ``variance_noise`` when given), so the same generator
  gives the same images and ends in the same state. ``in_kernel_noise = True`` lets the backend generate it.
* The step computes in float32 (float64 for float64 data) from float64 coefficients and rounds once; the stock
  step rounds each coefficient to float32 and, for a half-precision model, keeps its converted outputs in that
  precision. ``prev_sample`` has the stock dtype.

Every stock argument is accepted. What the fused op does not take runs the stock code, with one warning per
scheduler and cause: a model output of another shape (after the stock slice of a learned variance) or device
than the sample, non-float tensors, a sigma table that is not a 1-D float32 tensor, a step index outside the
table (the stock error follows), a configuration the stock step refuses (``flow_prediction`` with a
noise-prediction algorithm, ``sde-dpmsolver`` reaching a third-order step), a ``sample_max_value`` that is not
positive, earlier outputs set from outside (``model_outputs`` assigned with ``lower_order_nums > 0``) or, with a
ring of two slots, a step index moved by hand mid-loop. The rest of such a loop stays on the stock path, with
the ring's outputs as its list.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ...solvers._columns import PREDICTION_TYPES
from ...solvers.dpm import ALGORITHMS, dpm_solver_slots, dpm_solver_table
from ._common import _device
from ._solver import _RingHistory, _SigmaSolverDropIn, threshold_unsupported

__all__ = ["FusedDPMSolverMultistepScheduler"]

_PLUS = ("dpmsolver++", "sde-dpmsolver++")
_SDE = ("sde-dpmsolver", "sde-dpmsolver++")
_LEARNED = ("learned", "learned_range")


class _StepConfig:
    """The config values a DPM-Solver step reads (kept per config, `_SolverDropIn._dk_config`): the order, whether
    the algorithm is an SDE form, the thresholding ``(ratio, max)`` (None without), and whether the result has
    the model output's dtype."""

    __slots__ = ("order", "sde", "threshold", "output_dtype")


class FusedDPMSolverMultistepScheduler(_RingHistory, _SigmaSolverDropIn, DPMSolverMultistepScheduler,
                                       output=SchedulerOutput):
    """diffusers' ``DPMSolverMultistepScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.solvers.solver_step`; see the module docstring for what differs."""


    # ------------------------------------------------------------------ the table
    @property
    def _dk_slots(self) -> int:
        return dpm_solver_slots(self.config.solver_order)

    def _dk_config_key(self) -> tuple:
        c = self.config
        return (c.algorithm_type, c.solver_order, c.solver_type, c.prediction_type, bool(c.thresholding),
                bool(c.lower_order_final), bool(c.euler_at_final), c.final_sigmas_type, bool(c.use_flow_sigmas))

    def _dk_step_config(self) -> _StepConfig:
        c = self.config
        step = _StepConfig()
        step.order, step.sde = c.solver_order, c.algorithm_type in _SDE
        step.threshold = (float(c.dynamic_thresholding_ratio), float(c.sample_max_value)) if c.thresholding else None
        # the stock result's dtype is the model output's where its converted output keeps that dtype
        plus = c.algorithm_type in _PLUS
        step.output_dtype = (plus and c.prediction_type == "sample") or (
            not plus and c.prediction_type == "epsilon" and not c.thresholding)
        return step

    def _dk_unsupported(self) -> Optional[str]:
        c = self.config
        if c.algorithm_type not in ALGORITHMS or c.solver_type not in ("midpoint", "heun"):
            return (f"algorithm_type {c.algorithm_type!r} / solver_type {c.solver_type!r} is not one the stock step "
                    "computes")
        if c.prediction_type not in PREDICTION_TYPES or (
                c.prediction_type == "flow_prediction" and c.algorithm_type not in _PLUS):
            return f"prediction_type {c.prediction_type!r} is not one the stock {c.algorithm_type} step takes"
        if not (type(c.solver_order) is int and 1 <= c.solver_order <= 3):
            return f"solver_order {c.solver_order!r} is not 1, 2 or 3"
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            return "the stock sde-dpmsolver has no third-order step"
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            return f"final_sigmas_type {c.final_sigmas_type!r} is not one the stock step takes"
        if c.thresholding:
            return threshold_unsupported(c)
        return None

    def _dk_sigma_table(self, sigmas: np.ndarray, **common) -> np.ndarray:
        c = self.config
        return dpm_solver_table(
            sigmas, algorithm_type=c.algorithm_type, solver_order=c.solver_order, solver_type=c.solver_type,
            prediction_type=c.prediction_type, thresholding=bool(c.thresholding),
            lower_order_final=bool(c.lower_order_final), euler_at_final=bool(c.euler_at_final),
            final_sigmas_type=c.final_sigmas_type, **common,
        )

    # ------------------------------------------------------------------ step
    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True
    ):
        """As ``DPMSolverMultistepScheduler.step``, fused and sync-free."""
        lane = self.__dict__.get("_dk_lane_")
        if lane is not None and self._dk_continues(lane, model_output, sample):
            prev_sample = self._dk_direct(lane, model_output, sample)
            return self._make_output(prev_sample) if return_dict else (prev_sample,)
        config = self.config
        output = model_output
        if (isinstance(output, torch.Tensor) and output.ndim >= 2 and config.variance_type in _LEARNED
                and config.prediction_type == "epsilon"):
            output = output[:, :3]  # the stock slice: the mean of a learned-variance output
        prepared = None if self.__dict__.get("_dk_stock_loop") else self._dk_prepare(output, timestep, sample)
        if prepared is None:
            # the rest of this loop takes the stock path too: its history is the stock list from here on
            if self.num_inference_steps is not None and self.__dict__.get("_dk_stock_loop") is not True:
                self.__dict__["_dk_stock_loop"] = True
                self._dk_hand_over()
                if self.model_outputs is None:
                    self.model_outputs = [None] * config.solver_order
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        schedule, index, begin = prepared
        checked = self.__dict__["_dk_config_"]  # set by _dk_prepare
        step = checked.extra
        noise, generator_for_op, stochastic = None, None, False
        if step.sde:
            if variance_noise is not None:
                noise = variance_noise.to(device=output.device, dtype=torch.float32)
            else:
                stochastic, generator_for_op = self._dk_kernel_generator(generator)
                if not stochastic:
                    noise = self._dk_randn(output.shape, generator, output.device, torch.float32)
        # the sample upcast to float32 as stock upcasts it (float64 with a float64 output); no corrector, so no
        # last-sample buffer
        work = torch.float64 if output.dtype == torch.float64 else torch.float32  # promote_types(float32, output)
        x = sample if sample.dtype == work else sample.to(work)
        slots = checked.slots
        ring = self._dk_buffers(x, slots)[0] if slots else None
        device = x.device
        options = {"stochastic": True} if stochastic else {}
        if step.threshold is not None:
            options.update(threshold_ratio=step.threshold[0], threshold_max=step.threshold[1])
        table = self._dk_table(schedule, begin, _device(device))
        prev_sample = self._dk_solve(x, output, table, index, ring, None, noise, generator_for_op, **options)
        # the stock dtype: that of its converted output
        dtype = output.dtype if step.output_dtype else torch.promote_types(sample.dtype, output.dtype)
        if prev_sample.dtype != dtype:
            prev_sample = prev_sample.to(dtype)
        if self.lower_order_nums < step.order:
            self.lower_order_nums += 1
        self.__dict__["_dk_ring_used"] = True
        self.__dict__["_dk_last"] = index
        if output is model_output and not options and noise is None and x is sample and output.dtype == sample.dtype:
            self._dk_keep_lane(index, schedule, begin, ring, None)
        if not return_dict:
            return (prev_sample,)
        return self._make_output(prev_sample)

    def _dk_direct(self, lane, model_output, sample):
        """The step `_dk_continues` accepted: the lane's solver call, and the stock host state updated as `step`
        updates it."""
        prev_sample = self._dk_served(lane, model_output, sample)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        return prev_sample
