"""The Euler drop-ins: ``FusedEulerDiscreteScheduler`` and ``FusedEulerAncestralDiscreteScheduler`` (SDXL's and
ComfyUI's default samplers).

They subclass diffusers' ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` with the same config;
``set_timesteps`` (every ``timestep_spacing``, Karras / exponential / beta sigmas, ``final_sigmas_type``,
``timestep_type``, ``rescale_betas_zero_snr``, custom sigmas or timesteps), ``add_noise``, ``get_velocity`` and
``index_for_timestep`` are the stock code, so the sigma table and the timesteps are the stock ones, bit for bit.
``step`` is one `ddpm_kernels.euler_step` / `ddpm_kernels.euler_ancestral_step` on ``backend="auto"`` (the
attribute ``fused_backend`` chooses another). What changes against the stock classes:

* ``step`` and ``scale_model_input`` do not synchronize with the device. The step index is a Python int kept
  exactly as the stock scheduler keeps it (``step_index``, ``begin_index``, ``set_begin_index``), plus an int64
  (B,) tensor on the sample's device, advanced on the device after each step, from which the op gathers
  ``sigmas[i]`` and ``sigmas[i + 1]`` out of a device copy of the table (the stock table stays on the CPU). The
  first step index is found as `FusedFlowMatchEulerDiscreteScheduler` finds it: from the host copy of the
  timesteps when the timestep is a view of ``scheduler.timesteps`` (what iterating it yields), a Python number
  or a CPU tensor; another device timestep is looked up by the stock ``index_for_timestep`` once.
* ``scale_model_input`` divides by the stock ``(sigma**2 + 1) ** 0.5``, computed once per schedule on the host
  with the stock float32 arithmetic, so its result is the stock one bit for bit.
* Karras's churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``): whether a step churns is the stock host
  decision (``s_tmin <= sigma <= s_tmax`` in float32, ``gamma > 0``), made from the host copy of the table; a
  churning step draws its noise exactly as the stock step does (``randn_tensor`` of the model output's shape
  and dtype, from the same generator), so the same generator gives the same images and ends in the same state.
  The ancestral step draws its noise as the stock one does, every step. ``in_kernel_noise = True`` (an attribute,
  off by default) lets the backend generate the noise instead (a different noise stream).
* The step computes in float32 (float64 for a float64 model output) and rounds once: ``prev_sample`` in the model
  output's dtype and ``pred_original_sample`` in float32 promoted with it, as stock returns them
  (``prediction_type="sample"``: the model output itself, as stock). For a bf16 / fp16 model output the stock
  step rounds ``sigma * model_output`` (and the noise terms) to the model dtype first; the fused step is closer
  to the float64 computation.

Every stock argument is accepted. What the fused op does not take runs the stock code, with one warning per
scheduler and cause: a model output of another shape or device than the sample, a sigma table that is not a 1-D
float32 tensor, a step index outside the table (the stock error follows), a prediction type the stock step
refuses (its error follows), churn arguments that are not real numbers, a negative or NaN ``s_churn``, a
non-finite ``s_noise``. Integer timesteps get the stock error.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete as _stock_ancestral
from diffusers.schedulers import scheduling_euler_discrete as _stock_euler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from ... import euler as euler_ops
from ._common import (_DIRECT_DTYPES, _device, _FusedBase, _is_real, _stock_timestep, _StepIndex, lane_randn,
                      SigmaTables)

__all__ = ["FusedEulerDiscreteScheduler", "FusedEulerAncestralDiscreteScheduler"]

# the stock prediction types and their name in the fused op
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample", "original_sample": "sample"}
_SQRT2_MINUS_1 = 2**0.5 - 1
_NO_CHURN = (0.0, 0.0, math.inf, 1.0)  # (s_churn, s_tmin, s_tmax, s_noise) of a step without churn: the op's defaults
_SCALE_WARNING = (
    "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
    "See `StableDiffusionPipeline` for a usage example."
)


class _Tables(SigmaTables):
    """`SigmaTables` with the sigmas as float32 numbers and the stock ``scale_model_input`` divisors."""

    __slots__ = ("sigma_values", "divisors")


def _float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a Python number compared with a float32 tensor."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


class _FusedEulerMixin(_StepIndex, _FusedBase):
    """What both Euler drop-ins share: the tables, the sync-free step index, ``scale_model_input``."""

    # ------------------------------------------------------------------ tables
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        # the host copies now (set_timesteps may read the device), so that steps never do
        tables = self._dk_tables()
        if tables.stock is None and isinstance(self.timesteps, torch.Tensor):
            self._dk_device_sigmas(tables, _device(self.timesteps.device))

    _dk_table_class = _Tables

    def _dk_fill_tables(self, tables: _Tables) -> None:
        tables.sigma_values, tables.divisors = None, None
        if tables.stock is None:
            tables.sigma_values = tables.host_sigmas.tolist()  # float32 values, exactly
            # the stock scale_model_input divisor (sigma**2 + 1) ** 0.5, the same float32 operations per sigma, as
            # the float32 values (a floating sample of at least one dim divided by one is divided by the float32
            # 0-d tensor stock divides by: the scalar operand's value is the same float32 number; a list, not 0-d
            # tensors, so that a 1000-step schedule builds no thousand views)
            tables.divisors = ((tables.host_sigmas**2 + 1) ** 0.5).tolist()

    def _dk_device_sigmas(self, tables: _Tables, device: torch.device) -> torch.Tensor:
        """The sigma table on ``device``, copied there once per schedule."""
        sigmas = tables.devices.get(device)
        if sigmas is None:
            source = self.sigmas if self.sigmas.device == device else tables.host_sigmas.to(device)
            sigmas = tables.devices[device] = source.contiguous()
        return sigmas

    # ------------------------------------------------------------------ step index
    @staticmethod
    def _dk_valid_index(index, size: int) -> bool:
        return (type(index) is int or isinstance(index, np.integer)) and 0 <= index < size

    # ------------------------------------------------------------------ scale_model_input
    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """As the stock ``scale_model_input`` (the same numbers), without reading the device."""
        if self.step_index is None:
            self._init_step_index(timestep)
        tables = self._dk_tables()
        index = self.step_index
        # (a 0-d sample divided by stock's 0-d float32 divisor promotes to float32: the stock code)
        if (tables.stock is None and isinstance(sample, torch.Tensor) and sample.is_floating_point() and sample.ndim
                and self._dk_valid_index(index, len(tables.divisors))):
            sample = sample / tables.divisors[int(index)]
            self.is_scale_input_called = True
            return sample
        return super().scale_model_input(sample, timestep)

    # ------------------------------------------------------------------ step
    def _dk_prepare(self, model_output, timestep, sample):
        """``(tables, sigmas, step index tensor, index, prediction)`` for the fused step (the device sigma table,
        the index as the op reads it and as a Python int), or None when the stock step is to take the call
        (nothing changed then but a first step's index, which the stock step would set the same). A call that
        continues the last fused step's schedule on the operands it checked (`_dk_lane`) skips the checks that
        step made."""
        prediction = _PREDICTIONS.get(self.config.prediction_type)
        lane = self._dk_lane(model_output, timestep, sample)
        if (lane is not None and self.is_scale_input_called and prediction in self._dk_predictions
                and sample.is_floating_point() and model_output.is_floating_point()):
            return lane.tables, lane.sigmas, lane.index[0], self._step_index, prediction
        if _stock_timestep(timestep):
            return None  # the stock step's error
        if not self._dk_inputs_ok(model_output, sample):
            return None
        if prediction is None or prediction not in self._dk_predictions:
            self._dk_stock("prediction_type", f"prediction_type {self.config.prediction_type!r} is not one the "
                           "stock step computes")
            return None
        tables = self._dk_fused_tables()
        if tables is None:
            return None
        if not self.is_scale_input_called:
            self._dk_logger.warning(_SCALE_WARNING)
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        size = len(tables.sigma_values)
        if not self._dk_valid_index(index, size - 1):
            self._dk_stock("step_index", f"step index {index!r} is not a step of the {size}-sigma table")
            return None
        index = int(index)
        sigmas = self._dk_device_sigmas(tables, sample.device)
        return tables, sigmas, self._dk_table_index(index, sample, tables, sigmas), index, prediction

    def _dk_noise(self, model_output, generator):
        """``(noise, generator for the op)``: the stock draw (``randn_tensor`` of the model output's shape and
        dtype on its device), or the generator handed to the op with ``in_kernel_noise``."""
        in_kernel, generator_for_op = self._dk_kernel_generator(generator)
        if in_kernel:
            return None, generator_for_op
        return self._dk_randn(model_output.shape, generator, model_output.device, model_output.dtype), None

    def _dk_call(self, name, model_output, sample, sigmas, step_index, prediction, noise, generator, churn=()):
        """The fused op ``name`` on the stock step's operands: the sample upcast to float32 as stock upcasts it,
        the model output in its dtype (``churn``: `euler_step`'s churn options); returns ``(prev_sample,
        pred_original_sample)`` in the stock dtypes. A float16 / bfloat16 / float32 model output, what the
        float32 table serves, takes the op without its argument checks (the scheduler built and checked the
        operands); another (float64) the checked op."""
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)
        want_x0 = prediction != "sample"
        values = (prediction,) + churn + (want_x0, 0.0)
        out_dtype = model_output.dtype
        lane = self.__dict__.get("_dk_lane_")
        if (generator is None and x is sample and out_dtype == torch.float32 and lane is not None
                and type(sample) is torch.Tensor and type(model_output) is torch.Tensor
                and lane.sigmas is sigmas and lane.index[0] is step_index and lane.index[1] == self._step_index
                and (noise.dtype == out_dtype and type(noise) is torch.Tensor if noise is not None
                     # a step drawing in the kernel draws in row-major order: `checked_table_step` lays it out so
                     else (name == "euler_step" and not churn[0]) or sample.is_contiguous())):
            # a float32 step on the lane's table, its noise (if any) given (docs/design.md, "Host overhead"): the
            # server resolved once per lane, backend, op and options, which also advances the index tensor
            return self._dk_served(lane, name, values, model_output, x, noise, want_x0)
        if out_dtype in _DIRECT_DTYPES:
            result = euler_ops.checked_table_step(name, self.fused_backend, x, model_output, sigmas, step_index,
                                                  values, noise, generator,
                                                  None if out_dtype == torch.float32 else torch.float32)
        else:
            result = euler_ops._step(name, x, model_output, sigmas, step_index, noise, generator, self.fused_backend,
                                     values, None, None, None, 0.0, 0)
        prev_sample, x0 = result if want_x0 else (result, model_output)
        if prev_sample.dtype != out_dtype:
            prev_sample = prev_sample.to(out_dtype)
        self._dk_advance()
        return prev_sample, x0


    def _dk_served(self, lane, name, values, model_output, sample, noise, want_x0):
        """`_dk_call`'s result on `_dk_call`'s fast case, through `euler.table_step_server` kept on ``lane`` (one
        per backend, op and options: a churning loop alternates two)."""
        servers = lane.server
        if servers is None:
            servers = lane.server = {}
        key = (self.fused_backend, name, values)
        server = servers.get(key)
        if server is None:
            server = servers[key] = euler_ops.table_step_server(name, key[0], sample, values)
        entry = lane.index
        index = entry[1] + 1
        result = server(sample, model_output, lane.sigmas, entry[0], noise, index)
        self._step_index = entry[1] = index
        return result if want_x0 else (result, model_output)


class FusedEulerDiscreteScheduler(_FusedEulerMixin, EulerDiscreteScheduler, output=EulerDiscreteSchedulerOutput):
    """diffusers' ``EulerDiscreteScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.euler_step`; see the module docstring for what differs."""

    _dk_logger = _stock_euler.logger
    _dk_predictions = ("epsilon", "v_prediction", "sample")

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
        s_tmax: float = float("inf"), s_noise: float = 1.0, generator: Optional[torch.Generator] = None,
        return_dict: bool = True
    ):
        """As ``EulerDiscreteScheduler.step``, fused and sync-free."""
        if (type(s_churn) is float and s_churn == 0.0 and type(s_tmin) is float and type(s_tmax) is float
                and type(s_noise) is float and math.isfinite(s_noise)):
            lane = self._dk_lane(model_output, timestep, sample)
            if (lane is not None and self.is_scale_input_called and sample.dtype is torch.float32
                    and model_output.dtype is torch.float32):
                prediction = _PREDICTIONS.get(self.config.prediction_type)
                if prediction in self._dk_predictions:
                    # the next float32 step of the lane's schedule without churn (what `_dk_step` serves after
                    # `_dk_prepare`, without its layers): the lane's server
                    want_x0 = prediction != "sample"
                    result = self._dk_served(lane, "euler_step", (prediction, *_NO_CHURN, want_x0, 0.0), model_output,
                                             sample, None, want_x0)
                    return self._dk_output(result, return_dict)
        result = self._dk_step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator)
        if result is None:
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, return_dict=return_dict)
        return self._dk_output(result, return_dict)

    def _dk_step(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator):
        if not (type(s_churn) is float and type(s_tmin) is float and type(s_tmax) is float  # (the defaults)
                and type(s_noise) is float) and not all(_is_real(v) for v in (s_churn, s_tmin, s_tmax, s_noise)):
            self._dk_stock("churn", "s_churn, s_tmin, s_tmax and s_noise are not all real numbers")
            return None
        if not s_churn >= 0 or not math.isfinite(s_noise):
            self._dk_stock("churn", f"s_churn={s_churn!r}, s_noise={s_noise!r}: the fused step takes s_churn >= 0 "
                           "and a finite s_noise")
            return None
        prepared = self._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            return None
        tables, sigmas, step_index, index, prediction = prepared
        # the stock decision, on the host: sigma is a float32 tensor there, so the bounds compare in float32
        sigma = tables.sigma_values[index]
        churns = (
            s_churn > 0
            and _float32(s_tmin) <= sigma <= _float32(s_tmax)
            and min(s_churn / (len(tables.sigma_values) - 1), _SQRT2_MINUS_1) > 0
        )
        noise, generator_for_op = None, None
        if churns:
            noise, generator_for_op = self._dk_noise(model_output, generator)
            # the step churns: every sample, whatever the op would decide from the bounds in its own precision
            # (an s_churn above the step count gives the same capped gamma as an infinite one, which the op refuses)
            churn = (min(float(s_churn), float(len(tables.sigma_values) - 1)), -math.inf, math.inf, float(s_noise))
        else:
            churn = _NO_CHURN
        return self._dk_call("euler_step", model_output, sample, sigmas, step_index, prediction, noise,
                             generator_for_op, churn)


class FusedEulerAncestralDiscreteScheduler(
    _FusedEulerMixin, EulerAncestralDiscreteScheduler, output=EulerAncestralDiscreteSchedulerOutput
):
    """diffusers' ``EulerAncestralDiscreteScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.euler_ancestral_step`; see the module docstring for what differs."""

    _dk_logger = _stock_ancestral.logger
    # the stock ancestral step refuses "sample" (NotImplementedError): that call takes the stock path
    _dk_predictions = ("epsilon", "v_prediction")

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Optional[torch.Generator] = None,
        return_dict: bool = True
    ):
        """As ``EulerAncestralDiscreteScheduler.step``, fused and sync-free."""
        lane = self._dk_lane(model_output, timestep, sample)
        if (lane is not None and self.is_scale_input_called and sample.dtype is torch.float32
                and model_output.dtype is torch.float32 and not self.in_kernel_noise):
            prediction = _PREDICTIONS.get(self.config.prediction_type)
            if prediction in self._dk_predictions:
                # the next float32 step of the lane's schedule (what `_dk_call` serves after `_dk_prepare` and
                # `_dk_noise`, without their dispatch): the stock draw, then the lane's server
                noise = lane_randn(self, lane, generator, model_output, torch.float32)
                result = self._dk_served(lane, "euler_ancestral_step", (prediction, True, 0.0), model_output, sample,
                                         noise, True)
                return self._make_output(*result) if return_dict else result
        prepared = self._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        _, sigmas, step_index, _, prediction = prepared
        noise, generator_for_op = self._dk_noise(model_output, generator)
        result = self._dk_call("euler_ancestral_step", model_output, sample, sigmas, step_index, prediction, noise,
                               generator_for_op)
        return self._dk_output(result, return_dict)
