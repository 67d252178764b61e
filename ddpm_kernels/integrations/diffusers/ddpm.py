"""The DDPM / DDIM drop-ins: ``FusedDDPMScheduler`` and ``FusedDDIMScheduler``.

``FusedDDPMScheduler`` and ``FusedDDIMScheduler`` subclass diffusers' ``DDPMScheduler`` and ``DDIMScheduler``
with the same config, so ``from_config``, ``save_pretrained`` and pipelines take them unchanged::

    from ddpm_kernels.integrations.diffusers import FusedDDIMScheduler
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

``step`` is one `ddpm_kernels.ddpm_step` / `ddpm_kernels.ddim_step` call and ``add_noise`` one
`ddpm_kernels.q_sample` (``get_velocity``: `ddpm_kernels.get_v`), on ``backend="auto"`` (set the attribute
``fused_backend`` to choose another). What changes against the stock schedulers:

* ``timestep`` may be a per-sample tensor of shape (B,) as well as an int or a 0-d tensor.
* ``step`` never synchronizes with the device: no ``.item()``, ``nonzero()`` or Python branch on a device
  tensor's value. A timestep taken from ``scheduler.timesteps`` (what pipelines pass, on any device) is
  recognized as a view of that tensor, so its value is known on the host without reading the device; the
  ``(B,)`` timestep tensors the op takes are built once per timestep and batch size and kept until the next
  ``set_timesteps``. Any other device timestep is looked up on the device (the DDPM scheduler's previous
  timestep comes from a device table built by ``set_timesteps``, not from the stock ``nonzero()`` search).
* Noise is drawn exactly as the stock scheduler draws it (same shape, dtype, device and generator), so the same
  generator gives the same images. The stock DDPM step draws no noise at ``t == 0``; neither does this one when
  the timestep's value is known on the host (an int, a CPU tensor, a view of ``scheduler.timesteps``). For
  another device tensor it draws and masks in the kernel: the images are the same, the generator ends one draw
  further on.
* ``in_kernel_noise = True`` (an attribute, off by default) lets the backend generate the noise itself
  (Philox in the fused kernels): fastest, but a different noise stream than the stock scheduler.
* Coefficients are float64-derived and applied in float32 whatever the sample dtype; the stock schedulers
  cast ``alphas_cumprod`` to the sample dtype first, which costs bf16/fp16 samples accuracy.
* Where diffusers 0.42.1's ``DDPMScheduler.step`` returns NaN it gives the intended result: for
  ``variance_type="fixed_large_log"`` (stock takes the square root of ``log(beta)``) the noise scale is
  ``sqrt(beta)``, as ``fixed_large``; for ``variance_type="learned"`` (stock takes the square root of the
  predicted log-variance) it is ``exp(0.5 * predicted log-variance)``, as in improved DDPM / guided-diffusion.

Everything else the stock classes accept is accepted, with the stock result or the stock error. What the fused
ops do not cover takes the stock code path, with one warning per scheduler and cause: a schedule whose tables
are not finite in float32 or whose betas leave (0, 1) (e.g. ``beta_end=2``), an unknown ``prediction_type``, a
non-positive ``clip_sample_range`` or ``sample_max_value``, a ``dynamic_thresholding_ratio`` outside [0, 1], a
negative or non-finite ``eta``, a timestep outside ``[0, num_train_timesteps)``, a non-integer timestep, a model
output or ``variance_noise`` of another shape or device than the sample (a learned variance without its
channels included). A ``variance_type`` the stock scheduler does not name (e.g. ``"other"``) is computed as
``"fixed_small"``, which is what the stock ``_get_variance`` does with it, with one warning.
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from ... import ops
from ...sampler_steps import sampler_step_server, step_options
from ...schedule import DiffusionSchedule
from ._common import _device, _FusedBase, _is_real, tracked

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler"]

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# the variance types the stock DDPMScheduler._get_variance names; it computes any other value as fixed_small
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
_LEARNED = ("learned", "learned_range")
# bound on the per-(timestep, batch, device) tensors kept between set_timesteps calls
_STEP_CACHE_LIMIT = 4096


def _host_timesteps(timestep) -> Optional[List[int]]:
    """The timestep values when reading them costs no device synchronization (a Python int or a CPU tensor),
    else None. Never reads a device tensor."""
    if isinstance(timestep, (int, np.integer)):
        return [int(timestep)]
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu":
        return [timestep.item()] if timestep.numel() == 1 else timestep.reshape(-1).tolist()
    return None


class _Plan:
    """What a step needs that depends only on the scheduler's config (frozen once constructed): the fused
    ops' options, or why the config takes the stock code path; the schedule tables per device."""

    __slots__ = ("stock", "key", "parameterization", "clip", "clip_range", "threshold_ratio", "threshold_max",
                 "variance_type", "learned", "set_alpha_to_one", "schedules")


class _Steps:
    """What a step needs that depends on the timesteps set by ``set_timesteps``: their values on the host, the
    previous timestep of each value, the ``(t, t_prev, value)`` triples built so far per (value, batch, device)
    in ``tensors`` and, for timesteps that are views of ``timesteps``, per (address, shape, dtype, batch,
    device) in ``views``; the previous-timestep table per device."""

    __slots__ = ("timesteps", "root", "version", "key", "host", "prev", "tensors", "views", "prev_tables")


class _FusedSchedulerMixin(_FusedBase):
    """The DDPM / DDIM machinery: the plan, the schedule per device, timestep tensors, add_noise /
    get_velocity."""

    # ------------------------------------------------------------------ plan
    def _dk_plan_key(self):
        """Scheduler state outside the frozen config that the plan depends on."""
        return None

    def _dk_plan(self) -> _Plan:
        plan = self.__dict__.get("_dk_plan_")
        if plan is None or plan.key != self._dk_plan_key():
            plan = self.__dict__["_dk_plan_"] = self._dk_build_plan()
        return plan

    def _dk_build_plan(self) -> _Plan:
        config = self.config
        plan = _Plan()
        plan.key = self._dk_plan_key()
        plan.stock = None
        plan.schedules = {}
        plan.variance_type = "fixed_small"
        plan.learned = False
        plan.set_alpha_to_one = bool(config.get("set_alpha_to_one", True))
        prediction_type = config.prediction_type
        plan.parameterization = _PREDICTION.get(prediction_type) if isinstance(prediction_type, str) else None
        if plan.parameterization is None:
            plan.stock = ("prediction_type", f"prediction_type={prediction_type!r} is not one of {sorted(_PREDICTION)}")
        # options the fused ops would reject are ones the stock step computes something (or fails) with
        plan.threshold_ratio, plan.threshold_max = None, 1.0
        plan.clip, plan.clip_range = False, 1.0
        if config.thresholding:
            ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
            if not (_is_real(ratio) and 0.0 <= ratio <= 1.0):
                plan.stock = ("thresholding", f"dynamic_thresholding_ratio={ratio!r} is not in [0, 1]")
            elif not (_is_real(max_value) and max_value > 0):
                plan.stock = ("thresholding", f"sample_max_value={max_value!r} is not positive")
            else:
                plan.threshold_ratio, plan.threshold_max = float(ratio), float(max_value)
        elif config.clip_sample:
            clip_range = config.clip_sample_range
            if not (_is_real(clip_range) and clip_range > 0):
                plan.stock = ("clip_sample_range", f"clip_sample_range={clip_range!r} is not positive")
            else:
                plan.clip, plan.clip_range = True, float(clip_range)
        self._dk_plan_variance(plan)
        if plan.stock is None:
            try:
                # from the scheduler's own float32 betas, so both compute with the same numbers; sampling_only:
                # the training-only lvlb weights need not be finite (a one-step schedule)
                plan.schedules[torch.device("cpu")] = DiffusionSchedule.from_diffusers(self, sampling_only=True)
            except (ValueError, TypeError) as e:
                plan.stock = ("schedule", f"the fused ops cannot take this schedule ({e})")
        if plan.stock is not None:
            self._dk_stock(*plan.stock)
        return plan

    def _dk_plan_variance(self, plan: _Plan) -> None:
        pass

    def _dk_schedule(self, device: torch.device) -> DiffusionSchedule:
        schedules = self._dk_plan().schedules
        schedule = schedules.get(device)
        if schedule is None:
            device = _device(device)
            schedule = schedules.get(device)
            if schedule is None:
                schedule = schedules[device] = schedules[torch.device("cpu")].to(device)
        return schedule

    def _prepare_device(self, device) -> None:
        """Move what ``step`` reads to ``device`` ahead of time (from ``set_timesteps(device=...)``), so the
        first step does no host-to-device copy."""
        if device is not None and self._dk_plan().stock is None:
            self._dk_schedule(_device(device))

    # ------------------------------------------------------------------ timesteps
    def _dk_steps_key(self):
        """Scheduler state besides ``timesteps`` that the previous timesteps depend on."""
        return self.num_inference_steps

    def _dk_steps(self) -> _Steps:
        """The `_Steps` of the current timesteps, rebuilt when they were set or replaced since."""
        steps = self.__dict__.get("_dk_steps_")
        timesteps = tracked(self, "timesteps")
        if (
            steps is None
            or steps.timesteps is not timesteps
            or steps.version != timesteps._version
            or steps.key != self._dk_steps_key()
        ):
            # timesteps replaced outside set_timesteps are read once (a sync if they are on a device)
            steps = self._dk_new_steps([int(v) for v in timesteps.tolist()])
        return steps

    def _dk_new_steps(self, host: List[int]) -> _Steps:
        steps = _Steps()
        steps.timesteps = tracked(self, "timesteps")
        # what the _base of every view of timesteps is (views of a view point at the viewed tensor's base)
        steps.root = self.timesteps if self.timesteps._base is None else self.timesteps._base
        steps.version = self.timesteps._version
        steps.key = self._dk_steps_key()
        steps.host = host
        steps.prev = self._dk_previous_values(host)
        steps.tensors = {}
        steps.views = {}
        steps.prev_tables = {}
        self.__dict__["_dk_steps_"] = steps
        return steps

    def _dk_previous_values(self, host: List[int]):
        raise NotImplementedError

    def _dk_previous_value(self, steps: _Steps, value: int) -> int:
        raise NotImplementedError

    def _dk_previous_tensor(self, steps: _Steps, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dk_value(self, timestep, steps: _Steps):
        """``(value, view)``: the one timestep value of a call when known on the host without a device read (an
        int, a view of ``self.timesteps`` -- what iterating it yields, on any device: its offset into the storage
        gives its index -- or a one-element CPU tensor), None when it is not known, False when the stock step is
        to take the call (not an integer timestep, or not one per sample); ``view``: it is such a view."""
        if isinstance(timestep, torch.Tensor):
            if (
                timestep.ndim > 1
                or timestep.is_floating_point()
                or timestep.dtype == torch.bool
                or timestep.is_complex()
            ):
                return False, False  # the stock step broadcasts (or rejects) these its own way
            if timestep.numel() != 1:
                return None, False
            if timestep._base is steps.root:
                timesteps = steps.timesteps
                if timestep.dtype == timesteps.dtype:
                    stride = timesteps.stride(0)
                    if stride > 0:
                        index, rest = divmod(timestep.storage_offset() - timesteps.storage_offset(), stride)
                        if not rest and 0 <= index < len(steps.host):
                            return steps.host[index], True
            host = _host_timesteps(timestep)
            return (None if host is None else host[0]), False
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            return int(timestep), False
        return False, False

    def _dk_timesteps(self, timestep, batch: int, device: torch.device):
        """``(t, t_prev, value)`` for the op: ``t`` and ``t_prev`` int64 of shape (B,) on the sample's device,
        ``value`` the one timestep value when known on the host (else None); None for the stock step."""
        steps = self._dk_steps()
        # the two forms of a sampling loop, one dict lookup each: a view of self.timesteps (a view of the same
        # storage, which steps keeps alive: its address tells the element, shape and dtype tell it from the whole
        # tensor or another dtype's view of it) and a Python int
        if type(timestep) is torch.Tensor:
            found = (
                steps.views.get((timestep.data_ptr(), timestep.shape, timestep.dtype, batch, device))
                if timestep._base is steps.root
                else None
            )
        elif type(timestep) is int:
            found = steps.tensors.get((timestep, batch, device))
        else:
            found = None
        return found if found is not None else self._dk_timesteps_first(timestep, batch, device, steps)

    def _dk_timesteps_first(self, timestep, batch: int, device: torch.device, steps: _Steps):
        """`_dk_timesteps` for a timestep not seen before in this form."""
        value, view = self._dk_value(timestep, steps)
        if value is False:
            self._dk_stock("timestep", f"timestep {timestep!r} is neither an integer nor one per sample")
            return None
        if value is not None:
            if not 0 <= value < self.config.num_train_timesteps:
                self._dk_stock("timestep", f"timestep {value} is outside [0, {self.config.num_train_timesteps})")
                return None
            if len(steps.tensors) + len(steps.views) >= _STEP_CACHE_LIMIT:
                steps.tensors.clear()
                steps.views.clear()
            key = (value, batch, device)
            found = steps.tensors.get(key)
            if found is None:
                found = steps.tensors[key] = (
                    torch.full((batch,), value, dtype=torch.long, device=device),
                    torch.full((batch,), self._dk_previous_value(steps, value), dtype=torch.long, device=device),
                    value,
                )
            if view:
                steps.views[(timestep.data_ptr(), timestep.shape, timestep.dtype, batch, device)] = found
            return found
        # a device tensor, or one timestep per sample: looked up on the device, nothing read
        if timestep.numel() != 1 and timestep.shape[0] != batch:
            self._dk_stock("timestep", f"timestep of shape {tuple(timestep.shape)} is not one per sample of {batch}")
            return None
        t = timestep.reshape(-1).to(device=device, dtype=torch.long)
        if t.shape[0] != batch:
            t = t.expand(batch).contiguous()
        return t, self._dk_previous_tensor(steps, t), None

    def _dk_fused(self, model_output, timestep, sample):
        """What the fused op needs for this call, ``(plan, schedule, t, t_prev, value)`` (see `_dk_timesteps`),
        or None when the stock step takes it."""
        plan = self.__dict__.get("_dk_plan_")
        if plan is None or plan.key != self._dk_plan_key():
            plan = self._dk_plan()
        if plan.stock is not None or not self._dk_inputs(model_output, sample, plan):
            return None
        device = sample.device
        found = self._dk_timesteps(timestep, sample.shape[0], device)
        if found is None:
            return None
        schedule = plan.schedules.get(device)
        if schedule is None:
            schedule = self._dk_schedule(device)
        return plan, schedule, found[0], found[1], found[2]

    def _dk_inputs(self, model_output, sample, plan: _Plan) -> bool:
        """Whether the fused op takes these tensors as the stock step would (else the stock step does)."""
        if not plan.learned:
            return self._dk_inputs_ok(model_output, sample)

        def learned_shape(x):  # the sample's channels twice: the mean's and the variance's
            return torch.Size((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:])) if x.ndim >= 2 else None

        return self._dk_inputs_ok(model_output, sample, expected_shape=learned_shape,
                                  expected="the model output of the sample's shape with twice its channels")

    def _dk_run(self, op, plan: _Plan, sample, t, t_prev, model_output, schedule, noise, generator, return_dict,
                trusted: bool = False, **options):
        """The fused step ``op`` (`ops.ddpm_step` or `ops.ddim_step`, named ``_dk_op_name``) with the plan's
        parameterization, clipping and thresholding and the step's own ``options``, returned as the stock step
        returns. A plain call (``trusted``: ``t`` and ``t_prev`` are this scheduler's own tensors of values it
        checked, `_dk_timesteps`; no generator, no thresholding, plain tensors of one dtype, the noise like the
        sample, none of which asks for a gradient) that repeats the last plain call's plan, schedule, options, backend and its operands'
        shapes, dtype and device skips the checks the op made on that call: the server resolved for it
        (`sampler_steps.sampler_step_server`; docs/design.md, "Host overhead")."""
        backend = self.fused_backend
        plain = (
            trusted
            and generator is None
            and plan.threshold_ratio is None
            and type(sample) is torch.Tensor
            and type(model_output) is torch.Tensor
            and model_output.dtype == sample.dtype
            and (noise is None and not self.in_kernel_noise  # (an in-kernel draw runs on row-major operands)
                 or type(noise) is torch.Tensor and noise.dtype == sample.dtype and noise.shape == sample.shape
                 and noise.device == sample.device and not noise.requires_grad)
        )
        if plain:
            variant = (op, backend, tuple(options.values()), sample.shape, model_output.shape, sample.dtype,
                       sample.device, noise is None)
            checked = self.__dict__.get("_dk_checked_")
            if checked is not None and checked[0] is plan and checked[1] is schedule and checked[2] == variant:
                return self._dk_output(checked[3](sample, t, t_prev, model_output, schedule, noise), return_dict)
        values = dict(parameterization=plan.parameterization, clip_denoised=plan.clip, clip_range=plan.clip_range,
                      threshold_ratio=plan.threshold_ratio, threshold_max=plan.threshold_max, return_pred_x0=True,
                      **options)
        result = op(sample, t, t_prev, model_output, schedule, noise=noise, generator=generator, backend=backend,
                    **values)
        if plain:
            name = self._dk_op_name
            server = sampler_step_server(name, backend, sample, step_options(name, **values))
            self.__dict__["_dk_checked_"] = (plan, schedule, variant, server)
        return self._dk_output(result, return_dict)

    @staticmethod
    def _dk_common_dtype(model_output: torch.Tensor, sample: torch.Tensor):
        """Sample and model output in one dtype, the one the stock step's arithmetic promotes them to."""
        if model_output.dtype == sample.dtype:
            return model_output, sample
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        return model_output.to(dtype), sample.to(dtype)

    # ------------------------------------------------------------------ forward process
    def _timesteps_like(self, timesteps, samples: torch.Tensor) -> Optional[torch.Tensor]:
        """``timesteps`` as the fused op takes them for ``samples`` (shape (B,), on their device), or None for
        the stock code."""
        t = torch.as_tensor(timesteps)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            return None
        host = _host_timesteps(t)
        if host and (min(host) < 0 or max(host) >= self.config.num_train_timesteps):
            return None  # the stock code indexes with the values (a negative one wraps around, T raises)
        t = t.to(samples.device).reshape(-1)
        if samples.ndim == 0:
            return None
        if t.shape[0] == 1 and samples.shape[0] != 1:
            t = t.expand(samples.shape[0])
        return t if t.shape[0] == samples.shape[0] else None

    def _dk_forward_ok(self, x, noise, t) -> bool:
        """Whether the fused op takes add_noise / get_velocity's arguments as the stock code would."""
        if not (
            t is not None
            and isinstance(x, torch.Tensor)
            and isinstance(noise, torch.Tensor)
            and x.is_floating_point()
            and noise.shape == x.shape
            and noise.dtype == x.dtype
            and noise.device == x.device
            and self._dk_plan().stock is None
        ):
            return False
        return True

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(ab_t) x + sqrt(1 - ab_t) noise`` as one fused `ddpm_kernels.q_sample`. Inputs outside what
        the op takes (broadcast shapes, mixed dtypes, a schedule the fused ops do not take) go to the stock
        implementation."""
        t = self._timesteps_like(timesteps, original_samples)
        if not self._dk_forward_ok(original_samples, noise, t):
            return super().add_noise(original_samples, noise, timesteps)
        schedule = self._dk_schedule(original_samples.device)
        return ops.q_sample(original_samples, t, noise, schedule, backend=self.fused_backend)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(ab_t) noise - sqrt(1 - ab_t) sample`` as one fused `ddpm_kernels.get_v`."""
        t = self._timesteps_like(timesteps, sample)
        if not self._dk_forward_ok(sample, noise, t):
            return super().get_velocity(sample, noise, timesteps)
        return ops.get_v(sample, noise, t, self._dk_schedule(sample.device), backend=self.fused_backend)


class FusedDDPMScheduler(_FusedSchedulerMixin, DDPMScheduler, output=DDPMSchedulerOutput):
    """diffusers' ``DDPMScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.ddpm_step`; see the module docstring for what differs."""

    _dk_op_name = "ddpm_step"

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
    ):
        # computed on the host, so the previous-timestep table is built without reading a device tensor
        super().set_timesteps(num_inference_steps=num_inference_steps, device=None, timesteps=timesteps)
        host = self.timesteps.tolist()
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        steps = self._dk_new_steps(host)
        if device is not None and steps.prev is not None:
            # the previous-timestep table for timesteps looked up on the device, copied here rather than in a step
            device = _device(device)
            steps.prev_tables[device] = torch.tensor(steps.prev, dtype=torch.long).to(device)
        self._prepare_device(device)

    def _dk_plan_key(self):
        return self.variance_type

    def _dk_plan_variance(self, plan: _Plan) -> None:
        variance_type = self.variance_type
        if variance_type not in _VARIANCE_TYPES:
            self._dk_warn(
                "variance_type",
                f"variance_type={variance_type!r} is not one of {list(_VARIANCE_TYPES)}; computed as "
                "'fixed_small', as the stock scheduler does",
            )
            variance_type = "fixed_small"
        plan.variance_type = variance_type
        plan.learned = variance_type in _LEARNED

    def _dk_steps_key(self):
        return (self.num_inference_steps, self.custom_timesteps)

    def _dk_previous_values(self, host: List[int]):
        if not (self.custom_timesteps or self.num_inference_steps):
            return None  # t -> t - 1
        T = self.config.num_train_timesteps
        # previous timestep of each listed timestep (the first occurrence wins, as the stock nonzero() search);
        # a timestep not in the list steps to t - 1 (the stock scheduler raises there)
        table = list(range(-1, T - 1))
        for i in reversed(range(len(host))):
            if 0 <= host[i] < T:
                table[host[i]] = host[i + 1] if i + 1 < len(host) else -1
        return table

    def _dk_previous_value(self, steps: _Steps, value: int) -> int:
        return value - 1 if steps.prev is None else steps.prev[value]

    def _dk_previous_tensor(self, steps: _Steps, t: torch.Tensor) -> torch.Tensor:
        if steps.prev is None:
            return t - 1
        table = steps.prev_tables.get(t.device)
        if table is None:
            table = steps.prev_tables[t.device] = torch.tensor(steps.prev, dtype=torch.long, device=t.device)
        # clamped gather: an out-of-range t is reported by the op's own check (or gives NaN), never a bad read
        return table.index_select(0, t.clamp(0, table.shape[0] - 1))

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True
    ):
        """As ``DDPMScheduler.step``, fused and sync-free; ``timestep`` may be per sample, shape (B,)."""
        fused = self._dk_fused(model_output, timestep, sample)
        if fused is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        plan, schedule, t, t_prev, value = fused
        model_dtype = model_output.dtype
        if model_dtype != sample.dtype:
            model_output, sample = self._dk_common_dtype(model_output, sample)
        in_kernel, generator_for_op = self._dk_kernel_generator(generator)
        if in_kernel:
            noise = None
        else:
            if value is not None:
                draw = value > 0
            else:
                host = _host_timesteps(timestep)
                draw = host is None or any(v > 0 for v in host)
            if not draw:
                # the stock step draws nothing at t == 0; neither do we (the noise is masked out anyway)
                noise = torch.zeros_like(sample)
            else:
                # the stock draw: the model output's (variance-split) shape, dtype and device
                noise = self._dk_randn(sample.shape, generator, sample.device, model_dtype, sample.dtype)
        return self._dk_run(ops.ddpm_step, plan, sample, t, t_prev, model_output, schedule, noise, generator_for_op,
                            return_dict, value is not None, variance_type=plan.variance_type)


class FusedDDIMScheduler(_FusedSchedulerMixin, DDIMScheduler, output=DDIMSchedulerOutput):
    """diffusers' ``DDIMScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.ddim_step`; see the module docstring for what differs.

    ``DDIMPipeline.__init__`` converts any scheduler it is given to a stock ``DDIMScheduler``; set
    ``pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)`` after building the pipeline.
    """

    _dk_op_name = "ddim_step"

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        # computed on the host, so their values are known without reading a device tensor
        super().set_timesteps(num_inference_steps, device=None)
        host = self.timesteps.tolist()
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self._dk_new_steps(host)
        self._prepare_device(device)

    def _dk_previous_values(self, host: List[int]):
        return None

    def _dk_previous_value(self, steps: _Steps, value: int) -> int:
        # the stock step's previous timestep, whatever the spacing; every negative one means "final alpha"
        return max(value - self.config.num_train_timesteps // self.num_inference_steps, -1)

    def _dk_previous_tensor(self, steps: _Steps, t: torch.Tensor) -> torch.Tensor:
        return (t - self.config.num_train_timesteps // self.num_inference_steps).clamp(min=-1)

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
        use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True
    ):
        """As ``DDIMScheduler.step``, fused and sync-free; ``timestep`` may be per sample, shape (B,)."""
        fused = fused_eta = None
        if self.num_inference_steps is not None:
            fused_eta = eta if type(eta) is float and 0.0 <= eta < math.inf and variance_noise is None else (
                self._dk_eta(eta, variance_noise, generator, sample))
            if fused_eta is not None:
                fused = self._dk_fused(model_output, timestep, sample)
        if fused is None:
            # the stock step, also for its own errors (no set_timesteps, generator with variance_noise)
            return super().step(
                model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                generator=generator, variance_noise=variance_noise, return_dict=return_dict,
            )
        plan, schedule, t, t_prev, value = fused
        eta = fused_eta
        model_dtype = model_output.dtype
        if model_dtype != sample.dtype:
            model_output, sample = self._dk_common_dtype(model_output, sample)
        noise, generator_for_op = None, None
        if eta > 0:
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=sample.dtype)
            else:
                in_kernel, generator_for_op = self._dk_kernel_generator(generator)
                if not in_kernel:
                    noise = self._dk_randn(model_output.shape, generator, model_output.device, model_dtype, sample.dtype)
        return self._dk_run(ops.ddim_step, plan, sample, t, t_prev, model_output, schedule, noise, generator_for_op,
                            return_dict, value is not None, eta=eta, set_alpha_to_one=plan.set_alpha_to_one,
                            use_clipped_model_output=bool(use_clipped_model_output))

    def _dk_eta(self, eta, variance_noise, generator, sample) -> Optional[float]:
        """``eta`` as a float when the fused step takes the call, else None (the stock step does)."""
        if type(eta) is not float:
            cpu_scalar = isinstance(eta, torch.Tensor) and eta.numel() == 1 and eta.device.type == "cpu"
            if not (_is_real(eta) or cpu_scalar):
                self._dk_stock("eta", f"eta={eta!r} is not a real number")
                return None
            eta = float(eta)
        if not 0.0 <= eta < math.inf:
            self._dk_stock("eta", f"eta={eta!r} is not a finite number >= 0")
            return None
        if eta > 0 and variance_noise is not None:
            if generator is not None:
                return None  # the stock step raises its error for both
            if not (
                isinstance(variance_noise, torch.Tensor)
                and isinstance(sample, torch.Tensor)
                and variance_noise.shape == sample.shape
                and variance_noise.device == sample.device
            ):
                self._dk_stock("variance_noise", "variance_noise is not a tensor of the sample's shape and device")
                return None
        return eta
