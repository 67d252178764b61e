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
  the sample's device once per schedule and first index.
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

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ...solvers import _step_options, new_history, solver_step
from ...solvers.dpm import dpm_solver_coefficients, dpm_solver_slots
from ._common import _cached_tables, _device, _FusedBase, _host_copy, _output_maker, _randn, _start_tables, _StepIndex

__all__ = ["FusedDPMSolverMultistepScheduler"]

_PLUS = ("dpmsolver++", "sde-dpmsolver++")
_SDE = ("sde-dpmsolver", "sde-dpmsolver++")
_LEARNED = ("learned", "learned_range")


class _Tables:
    """The schedule as the fused step reads it: the ``timesteps`` and ``sigmas`` tensors it was built from (and
    their versions), host copies, why the fused step cannot take it (None when it can), and the coefficient
    table per (first step index, device)."""

    __slots__ = ("timesteps", "t_version", "sigmas", "s_version", "root", "host_timesteps", "host_array",
                 "host_sigmas", "sigma_values", "stock", "coefficients")


class FusedDPMSolverMultistepScheduler(_StepIndex, _FusedBase, DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.solvers.solver_step`; see the module docstring for what differs."""

    _dk_int_timesteps = True  # the stock timesteps are int64

    _make_output = staticmethod(_output_maker(SchedulerOutput))
    _stock_name = "DPMSolverMultistepScheduler"

    # ------------------------------------------------------------------ stock attributes
    @property
    def model_outputs(self):
        """The converted model outputs of the last steps, oldest first, as the stock list (views of the ring)."""
        if self.__dict__.get("_dk_ring_used") is not True:
            return self.__dict__.get("_dk_model_outputs")
        order, ring, last = self.config.solver_order, self.__dict__.get("_dk_ring_"), self.__dict__["_dk_last"]
        outputs = [None] * order
        if ring is None or ring[1][-1] != order - 1:  # the first order keeps no ring
            return outputs
        ring = ring[0]
        slots = ring.shape[0]
        for j in range(min(self.lower_order_nums, slots)):  # the output of the step j steps before the last
            outputs[order - 1 - j] = ring[(last - j) % slots]
        return outputs

    @model_outputs.setter
    def model_outputs(self, value):
        # the stock code resets it in __init__ / set_timesteps; a list set from outside is kept as it is (the
        # stock step never reads an entry older than its warm-up either, and neither does the fused one)
        self.__dict__["_dk_model_outputs"] = value
        self.__dict__["_dk_ring_used"] = False

    # ------------------------------------------------------------------ tables
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        for key in ("_dk_tables_", "_dk_start", "_dk_stock_loop", "_dk_last"):
            self.__dict__.pop(key, None)
        self._dk_tables()  # the host copies now (set_timesteps may read the device), so that steps never do

    def set_begin_index(self, begin_index: int = 0):
        super().set_begin_index(begin_index)
        self.__dict__.pop("_dk_start", None)

    def _dk_tables(self) -> _Tables:
        return _cached_tables(self) or self._dk_new_tables()

    def _dk_new_tables(self) -> _Tables:
        tables = _Tables()
        _start_tables(tables, self, _host_copy(self.timesteps), _host_copy(self.sigmas))
        tables.coefficients, tables.sigma_values = {}, None
        config = self.config
        if tables.stock is None and config.prediction_type == "flow_prediction" and config.algorithm_type not in _PLUS:
            tables.stock = f"prediction_type 'flow_prediction' is not one the stock {config.algorithm_type} step takes"
        if tables.stock is None:
            tables.sigma_values = tables.host_sigmas.tolist()  # the stock values, exactly
            if config.thresholding:
                try:
                    _step_options((False, None, config.dynamic_thresholding_ratio, config.sample_max_value, 0.0),
                                  False)
                except (TypeError, ValueError) as error:
                    tables.stock = f"the thresholding options are not ones the fused step takes ({error})"
        self.__dict__["_dk_tables_"] = tables
        return tables

    def _dk_coefficients(self, tables: _Tables, start: int, device: torch.device):
        """The coefficient table for a loop starting at step ``start`` on ``device`` (built and copied once), or a
        string saying why the fused step cannot take this schedule."""
        key = (start, device)
        table = tables.coefficients.get(key)
        if table is None:
            config = self.config
            try:
                table = dpm_solver_coefficients(
                    tables.sigma_values, algorithm_type=config.algorithm_type, solver_order=config.solver_order,
                    solver_type=config.solver_type, prediction_type=config.prediction_type,
                    thresholding=bool(config.thresholding), lower_order_final=bool(config.lower_order_final),
                    euler_at_final=bool(config.euler_at_final), final_sigmas_type=config.final_sigmas_type,
                    flow_sigmas=bool(config.use_flow_sigmas), begin_index=start,
                ).to(device)
            except ValueError as error:
                table = str(error)
            tables.coefficients[key] = table
        return table

    def _dk_ring(self, like: torch.Tensor, dtype: torch.dtype, slots: int):
        """The history ring for samples like ``like`` in ``dtype``: allocated once per shape, dtype, device and
        layout."""
        if not slots:
            return None
        key = (like.shape, dtype, like.device, like.stride(), slots)
        cached = self.__dict__.get("_dk_ring_")
        if cached is None or cached[1] != key:
            cached = self.__dict__["_dk_ring_"] = (new_history(like.to(dtype), slots), key)
        return cached[0]

    # ------------------------------------------------------------------ step
    def _dk_prepare(self, model_output, timestep, sample):
        """``(model_output, coefficients, index)`` for the fused step, or None when the stock step is to take the
        call (nothing changed then but a first step's index, which the stock step would set the same)."""
        if self.num_inference_steps is None:
            return None  # the stock error
        config = self.config
        if (isinstance(model_output, torch.Tensor) and model_output.ndim >= 2
                and config.variance_type in _LEARNED and config.prediction_type == "epsilon"):
            model_output = model_output[:, :3]  # the stock slice: the mean of a learned-variance output
        if not self._dk_inputs_ok(model_output, sample):
            return None
        tables = self._dk_tables()
        if tables.stock is not None:
            self._dk_stock("table", tables.stock)
            return None
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        steps = len(tables.sigma_values) - 1
        if not ((type(index) is int) and 0 <= index < steps):
            self._dk_stock("step_index", f"step index {index!r} is not a step of the {steps + 1}-sigma table")
            return None
        # the stock order follows lower_order_nums (the steps taken, capped at the order): the table of a loop
        # that started that many steps ago, kept while it gives the same order (a new one if the state was set
        # from outside)
        order = config.solver_order
        taken = min(self.lower_order_nums, order)
        slots = dpm_solver_slots(order)
        if slots and taken and (self.__dict__.get("_dk_ring_used") is not True
                                or (slots > 1 and index != self.__dict__.get("_dk_last", -2) + 1)):
            # the ring holds the outputs of the fused steps, entry j steps back in slot (index - j) % slots
            self._dk_stock("history", "the earlier outputs or the step index were set from outside the loop, so "
                           "the ring does not hold the outputs the stock step would read")
            return None
        start = self.__dict__.get("_dk_start")
        if start is None or min(index - start, order) != taken:
            start = self.__dict__["_dk_start"] = index - min(taken, index)
        coefficients = self._dk_coefficients(tables, start, _device(sample.device))
        if isinstance(coefficients, str):
            self._dk_stock("config", coefficients)
            return None
        return model_output, coefficients, index, slots

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """As ``DPMSolverMultistepScheduler.step``, fused and sync-free."""
        prepared = None if self.__dict__.get("_dk_stock_loop") else self._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            # the rest of this loop takes the stock path too: its history is the stock list from here on
            if self.num_inference_steps is not None and self.__dict__.get("_dk_stock_loop") is not True:
                self.__dict__["_dk_stock_loop"] = True
                self.model_outputs = list(self.model_outputs or [None] * self.config.solver_order)
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        model_output, coefficients, index, slots = prepared
        config = self.config
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)  # the stock upcast
        noise, generator_for_op, stochastic = None, None, False
        if config.algorithm_type in _SDE:
            if variance_noise is not None:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            else:
                stochastic, generator_for_op = self._dk_kernel_generator(generator)
                if not stochastic:
                    noise = _randn(model_output.shape, generator, model_output.device, torch.float32)
        ring = self._dk_ring(x, torch.promote_types(x.dtype, model_output.dtype), slots)
        threshold = dict(threshold_ratio=config.dynamic_thresholding_ratio,
                         threshold_max=config.sample_max_value) if config.thresholding else {}
        prev_sample = solver_step(
            x, model_output, coefficients, self._dk_index_tensor(index, sample.shape[0], sample.device),
            history=ring, noise=noise, generator=generator_for_op, backend=self.fused_backend,
            stochastic=stochastic, **threshold,
        )
        # the stock dtype: that of its converted output
        plus = config.algorithm_type in _PLUS
        if (plus and config.prediction_type == "sample") or (
                not plus and config.prediction_type == "epsilon" and not config.thresholding):
            dtype = model_output.dtype
        else:
            dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if prev_sample.dtype != dtype:
            prev_sample = prev_sample.to(dtype)
        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        self.__dict__["_dk_ring_used"] = True
        self.__dict__["_dk_last"] = index
        self._dk_advance()
        if not return_dict:
            return (prev_sample,)
        return self._make_output(prev_sample)
