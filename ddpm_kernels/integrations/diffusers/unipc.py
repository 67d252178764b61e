"""The UniPC drop-in: ``FusedUniPCMultistepScheduler`` (a common default of Stable Diffusion, SDXL, Wan and
other pipelines).

It subclasses diffusers' ``UniPCMultistepScheduler`` with the same config; ``set_timesteps`` (every
``timestep_spacing``, Karras / exponential / beta / flow sigmas, dynamic shifting, ``final_sigmas_type``,
``rescale_betas_zero_snr``), ``add_noise`` and ``index_for_timestep`` are the stock code, so the sigmas and
timesteps are the stock ones, bit for bit. ``step`` is one `ddpm_kernels.solvers.solver_step` on the UniPC
coefficient table (`ddpm_kernels.solvers.unipc.unipc_coefficients`: corrector and predictor, ``bh1`` / ``bh2``,
every order with its warm-up, ``lower_order_final``, ``disable_corrector``, ``predict_x0`` True or False, every
prediction type, dynamic thresholding), on ``backend="auto"`` (the attribute ``fused_backend`` chooses
another). What changes against the stock class:

* ``step`` does not synchronize with the device. The table is built in float64 on the host once per schedule
  and first step index (the warm-up counts from there, as the stock ``lower_order_nums`` does) and copied to
  the sample's device once; the step index is a Python int kept exactly as stock keeps it, mirrored by an int64
  (B,) device tensor advanced in place, found on the first step as `FusedEulerDiscreteScheduler` finds it.
* The converted model outputs live in a ring of ``solver_order`` preallocated tensors and the corrector's last
  sample in a preallocated buffer (``last_sample`` is that buffer, overwritten by the next step); a loop
  allocates nothing per step but its results. ``model_outputs`` and ``timestep_list`` list the ring's entries
  and their timesteps as stock lists them (views of the ring), and ``lower_order_nums`` and ``this_order`` are
  kept as stock keeps them; a step the fused op does not take (a gradient asked of the model output, say), a
  step index moved by hand in the middle of a loop or outputs set from outside hand the rest of the loop to the
  stock step with that history.
* The coefficients (the rhos' linear solves included) are float64, not float32, and the step computes in
  float32 (float64 for float64 data) and rounds once to the sample's dtype: the results agree with stock
  within float32 rounding, and for bf16 / fp16 samples or model outputs they are closer to the float64
  computation (stock rounds ``sigma * model_output`` to the output's dtype, and at order 3 fails on a float16
  sample with a float32 output: its float16 rhos meet float32 differences in one einsum).
* Where the stock step has no finite result the fused step gives the limit (docs/design.md, "UniPC"): with a
  zero final sigma, ``bh1`` and ``predict_x0=False`` give NaN at the last step in stock and
  ``lower_order_final=False`` gives an infinite sample (order 2) or a singular ``linalg.solve`` (order 3); the
  fused last step is the first-order step to sigma 0 (x0 in the data form, DDIM's step in the noise form).

Every stock argument is accepted. What the fused op does not take runs the stock code, with one warning per
scheduler and cause: ``solver_p`` (another predictor), a prediction type or solver type the stock step
refuses (its error follows), thresholding options outside the op's range, a model output of another shape or
device than the sample, a step index outside the schedule (the stock error follows).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ...solvers._columns import PREDICTION_TYPES
from ...solvers.unipc import SOLVER_TYPES, unipc_coefficients
from ._solver import _RingHistory, _SigmaSolverDropIn, threshold_unsupported

__all__ = ["FusedUniPCMultistepScheduler"]


def _step_list(steps) -> tuple:
    """``disable_corrector`` as a tuple of its entries (a list, a numpy array or a tensor of step indices, as
    stock's ``step_index - 1 not in disable_corrector`` takes them; None for none)."""
    if steps is None:
        return ()
    return tuple(steps.tolist() if isinstance(steps, (np.ndarray, torch.Tensor)) else steps)


class FusedUniPCMultistepScheduler(_RingHistory, _SigmaSolverDropIn, UniPCMultistepScheduler, output=SchedulerOutput):
    """diffusers' ``UniPCMultistepScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.solvers.solver_step`; see the module docstring for what differs."""

    @property
    def timestep_list(self):
        """The timesteps of the steps whose outputs `model_outputs` lists (the stock list after fused steps)."""
        if self.__dict__.get("_dk_ring_used") is not True:
            return self.__dict__.get("_dk_timestep_list")
        timesteps = self.timesteps
        return self._dk_history(lambda slot, index: timesteps[index])

    @timestep_list.setter
    def timestep_list(self, value):
        self.__dict__["_dk_timestep_list"] = value


    def _dk_hand_over(self) -> None:
        if self.__dict__.get("_dk_ring_used") is True:
            self.timestep_list = list(self.timestep_list)
        super()._dk_hand_over()

    def _dk_prepare(self, model_output, timestep, sample):
        """`_RingHistory._dk_prepare`, and None too when the stock corrector would read outputs set from outside
        (a last sample kept while ``model_outputs`` was assigned): the stock step takes the rest of the loop."""
        prepared = super()._dk_prepare(model_output, timestep, sample)
        if prepared is not None and self.__dict__.get("_dk_ring_used") is not True and self.last_sample is not None:
            self._dk_stock("history", "the earlier outputs were set from outside the loop, so the ring does not hold "
                           "the outputs the stock corrector would read")
            return None
        return prepared

    @property
    def _dk_slots(self) -> int:
        return self.config.solver_order

    def _dk_config_key(self) -> tuple:
        c = self.config
        return (c.solver_order, c.solver_type, bool(self.predict_x0), c.prediction_type, bool(c.lower_order_final),
                _step_list(self.disable_corrector), bool(c.use_flow_sigmas))

    def _dk_settings(self) -> tuple:
        disabled = self.disable_corrector
        try:
            disabled = _step_list(disabled)
        except (TypeError, ValueError, RuntimeError):
            pass  # refused by _dk_unsupported
        return (self.predict_x0, self.solver_p, disabled)

    def _dk_unsupported(self) -> Optional[str]:
        c = self.config
        if self.solver_p is not None:
            return "solver_p (another scheduler's predictor) is not a coefficient table"
        flow_as_epsilon = c.prediction_type == "flow_prediction" and not self.predict_x0
        if c.prediction_type not in PREDICTION_TYPES or flow_as_epsilon:
            return (f"prediction_type {c.prediction_type!r} with predict_x0={self.predict_x0!r} is not one the stock "
                    "step computes")
        if c.solver_type not in SOLVER_TYPES:
            return f"solver_type {c.solver_type!r} is not one the stock step computes"
        if not (type(c.solver_order) is int and c.solver_order >= 1):
            return f"solver_order {c.solver_order!r} is not an int >= 1"
        try:
            disabled = _step_list(self.disable_corrector)
            hash(disabled)
        except (TypeError, ValueError, RuntimeError):
            return f"disable_corrector {self.disable_corrector!r} is not a list of step indices"
        if c.thresholding and self.predict_x0:
            return threshold_unsupported(c)
        return None

    def _dk_sigma_table(self, sigmas: np.ndarray, **common) -> np.ndarray:
        c = self.config
        return unipc_coefficients(
            sigmas, solver_order=c.solver_order, solver_type=c.solver_type, predict_x0=bool(self.predict_x0),
            prediction_type=c.prediction_type, lower_order_final=bool(c.lower_order_final),
            disable_corrector=_step_list(self.disable_corrector), **common,
        )

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """As ``UniPCMultistepScheduler.step``, fused and sync-free."""
        lane = self.__dict__.get("_dk_lane_")
        if lane is not None and self._dk_continues(lane, model_output, sample):
            index = self._step_index
            prev = self._dk_served(lane, model_output, sample)
            self._dk_count_step(lane.schedule, index)
            return self._make_output(prev) if return_dict else (prev,)
        prepared = None if self.__dict__.get("_dk_stock_loop") else self._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            # the rest of this loop takes the stock path too: its history is the stock lists from here on
            if self.num_inference_steps is not None and self.__dict__.get("_dk_stock_loop") is not True:
                self.__dict__["_dk_stock_loop"] = True
                self._dk_hand_over()
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        schedule, index, begin = prepared
        c = self.config
        options = {}
        if c.thresholding and self.predict_x0:
            options = dict(threshold_ratio=float(c.dynamic_thresholding_ratio),
                           threshold_max=float(c.sample_max_value))
        prev, last = self._dk_solver_step(schedule, index, begin, model_output, sample, **options)
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        self._dk_count_step(schedule, index)
        self.last_sample = last
        self.__dict__["_dk_ring_used"] = True
        self.__dict__["_dk_last"] = index
        if not options and model_output.dtype == sample.dtype:
            self._dk_keep_lane(index, schedule, begin, self.__dict__["_dk_buffers_"][1], last)
        if not return_dict:
            return (prev,)
        return self._make_output(prev)

    def _dk_count_step(self, schedule, index: int) -> None:
        """The stock host state of the warm-up after the step at ``index`` (the table's orders are the same)."""
        c = self.config
        order = min(c.solver_order, schedule.steps - index) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
