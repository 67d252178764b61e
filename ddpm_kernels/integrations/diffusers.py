"""diffusers schedulers whose per-step math runs through ddpm_kernels' fused ops.

``FusedDDPMScheduler`` and ``FusedDDIMScheduler`` subclass diffusers' ``DDPMScheduler`` and ``DDIMScheduler``
with the same config, so ``from_config``, ``save_pretrained`` and pipelines take them unchanged::

    from ddpm_kernels.integrations.diffusers import FusedDDIMScheduler
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

``step`` is one `ddpm_kernels.ddpm_step` / `ddpm_kernels.ddim_step` call and ``add_noise`` one
`ddpm_kernels.q_sample` (``get_velocity``: `ddpm_kernels.get_v`), on ``backend="auto"`` (set the attribute
``fused_backend`` to choose another). What changes against the stock schedulers:

* ``timestep`` may be a per-sample tensor of shape (B,) as well as an int or a 0-d tensor.
* ``step`` never synchronizes with the device: no ``.item()``, ``nonzero()`` or Python branch on a device
  tensor's value. The DDPM scheduler's previous timestep comes from a device lookup table built by
  ``set_timesteps`` instead of the stock ``nonzero()`` search.
* Noise is drawn exactly as the stock scheduler draws it (``randn_tensor`` with the same shape, dtype, device
  and generator), so the same generator gives the same images. The stock DDPM step draws no noise at
  ``t == 0``; that is known without a sync when the timestep is a Python int or a CPU tensor (what pipelines
  pass), and then the fused scheduler skips the draw too. For a timestep tensor on the GPU it draws and masks
  in the kernel: the images are the same, the generator ends one draw further on.
* ``in_kernel_noise = True`` (an attribute, off by default) lets the backend generate the noise itself
  (Philox in the fused kernels): fastest, but a different noise stream than the stock scheduler.
* Coefficients are float64-derived and applied in float32 whatever the sample dtype; the stock schedulers
  cast ``alphas_cumprod`` to the sample dtype first, which costs bf16/fp16 samples accuracy.
* Where diffusers 0.42.1's ``DDPMScheduler.step`` returns NaN it gives the intended result: for
  ``variance_type="fixed_large_log"`` (stock takes the square root of ``log(beta)``) the noise scale is
  ``sqrt(beta)``, as ``fixed_large``; for ``variance_type="learned"`` (stock takes the square root of the
  predicted log-variance) it is ``exp(0.5 * predicted log-variance)``, as in improved DDPM / guided-diffusion.
* With ``variance_type`` learned / learned_range the model output must carry the variance channels
  (2C channels); the stock scheduler silently drops to a crash later when it does not, this one raises
  ``ValueError``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import ops
from ..schedule import DiffusionSchedule

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler"]

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _device(device) -> torch.device:
    """A cache key for a device: "cuda" and "cuda:0" (what tensors report) are the same device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _host_timesteps(timestep) -> Optional[List[int]]:
    """The timestep values when reading them costs no device synchronization (a Python int or a CPU tensor),
    else None. Never reads a device tensor."""
    if isinstance(timestep, (int, np.integer)):
        return [int(timestep)]
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu":
        return [int(v) for v in timestep.reshape(-1).tolist()]
    return None


class _FusedSchedulerMixin:
    """Shared machinery: the ddpm_kernels schedule per device, timestep tensors, add_noise / get_velocity."""

    #: backend for the fused ops ("auto", "reference", "triton", "cuda", "cpu")
    fused_backend: str = "auto"
    #: let the backend generate the step noise in-kernel instead of drawing it as the stock scheduler does
    in_kernel_noise: bool = False

    # ------------------------------------------------------------------ schedule
    def _dk_schedule(self, device: torch.device) -> DiffusionSchedule:
        cache: Dict[torch.device, DiffusionSchedule] = self.__dict__.setdefault("_dk_schedules", {})
        device = _device(device)
        schedule = cache.get(device)
        if schedule is None:
            base = cache.get(torch.device("cpu"))
            if base is None:
                # from the scheduler's own float32 betas, so both compute with the same numbers
                base = cache[torch.device("cpu")] = DiffusionSchedule.from_diffusers(self)
            schedule = cache[device] = base if device.type == "cpu" else DiffusionSchedule.from_diffusers(self).to(device)
        return schedule

    def _prepare_device(self, device) -> None:
        """Move what ``step`` reads to ``device`` ahead of time (from ``set_timesteps(device=...)``), so the
        first step does no host-to-device copy."""
        if device is not None:
            self._dk_schedule(device)

    # ------------------------------------------------------------------ timesteps
    @staticmethod
    def _timestep_tensor(timestep, sample: torch.Tensor) -> torch.Tensor:
        """``timestep`` as an int64 tensor of shape (B,) on the sample's device, without reading a device
        tensor: an int (or a CPU scalar, whose value is free to read) becomes a device fill; a (B,) tensor is
        used as it is."""
        batch, device = sample.shape[0], sample.device
        if isinstance(timestep, (int, np.integer)):
            return torch.full((batch,), int(timestep), dtype=torch.long, device=device)
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep: expected an int or an integer tensor, got {type(timestep).__name__}")
        if timestep.dtype.is_floating_point or timestep.dtype == torch.bool:
            raise TypeError(f"timestep: expected an integer tensor, got {timestep.dtype}")
        if timestep.numel() == 1:
            if timestep.device != device and timestep.device.type == "cpu":
                return torch.full((batch,), int(timestep), dtype=torch.long, device=device)
            return timestep.reshape(1).to(device=device, dtype=torch.long).expand(batch)
        if timestep.ndim != 1 or timestep.shape[0] != batch:
            raise ValueError(
                f"timestep: expected an int, a 0-d tensor or a tensor of shape ({batch},) (one per sample), "
                f"got shape {tuple(timestep.shape)}"
            )
        return timestep.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ forward process
    def _timesteps_like(self, timesteps, samples: torch.Tensor) -> Optional[torch.Tensor]:
        t = torch.as_tensor(timesteps)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            return None
        t = t.to(samples.device).reshape(-1)
        if samples.ndim == 0:
            return None
        if t.shape[0] == 1 and samples.shape[0] != 1:
            t = t.expand(samples.shape[0])
        return t if t.shape[0] == samples.shape[0] else None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(ab_t) x + sqrt(1 - ab_t) noise`` as one fused `ddpm_kernels.q_sample`. Inputs outside what
        the op takes (broadcast shapes, mixed dtypes) go to the stock implementation."""
        t = self._timesteps_like(timesteps, original_samples)
        if (
            t is None
            or not original_samples.is_floating_point()
            or noise.shape != original_samples.shape
            or noise.dtype != original_samples.dtype
        ):
            return super().add_noise(original_samples, noise, timesteps)
        schedule = self._dk_schedule(original_samples.device)
        return ops.q_sample(original_samples, t, noise, schedule, backend=self.fused_backend)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(ab_t) noise - sqrt(1 - ab_t) sample`` as one fused `ddpm_kernels.get_v`."""
        t = self._timesteps_like(timesteps, sample)
        if t is None or not sample.is_floating_point() or noise.shape != sample.shape or noise.dtype != sample.dtype:
            return super().get_velocity(sample, noise, timesteps)
        return ops.get_v(sample, noise, t, self._dk_schedule(sample.device), backend=self.fused_backend)

    def _noise_generator(self, generator):
        """The generator handed to the op for in-kernel noise (one torch.Generator or None)."""
        if isinstance(generator, list):
            if len(generator) != 1:
                return None
            generator = generator[0]
        return generator


class FusedDDPMScheduler(_FusedSchedulerMixin, DDPMScheduler):
    """diffusers' ``DDPMScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.ddpm_step`; see the module docstring for what differs."""

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
    ):
        # computed on the host, so the previous-timestep table is built without reading a device tensor
        super().set_timesteps(num_inference_steps=num_inference_steps, device=None, timesteps=timesteps)
        self._build_previous_table(self.timesteps.tolist())
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self._dk_prev_source = self.timesteps
            self._previous_table(device)
            self._prepare_device(device)

    def _build_previous_table(self, host: List[int]) -> None:
        T = self.config.num_train_timesteps
        # previous timestep of each listed timestep (the first occurrence wins, as the stock nonzero() search);
        # a timestep not in the list steps to t - 1 (the stock scheduler raises there)
        table = np.arange(-1, T - 1, dtype=np.int64)
        for i in reversed(range(len(host))):
            if 0 <= host[i] < T:
                table[host[i]] = host[i + 1] if i + 1 < len(host) else -1
        self._dk_prev_host = torch.from_numpy(table)
        self._dk_prev = {}
        self._dk_prev_source = self.timesteps

    def _previous_table(self, device: torch.device) -> Optional[torch.Tensor]:
        if not (self.custom_timesteps or self.num_inference_steps):
            return None
        if getattr(self, "_dk_prev_source", None) is not self.timesteps:
            # timesteps replaced outside set_timesteps: rebuild once (reads them; a sync if on a device)
            self._build_previous_table([int(v) for v in self.timesteps.tolist()])
        cache = self.__dict__.setdefault("_dk_prev", {})
        device = _device(device)
        table = cache.get(device)
        if table is None:
            table = cache[device] = self._dk_prev_host.to(device)
        return table

    def _previous_timestep_tensor(self, t: torch.Tensor) -> torch.Tensor:
        table = self._previous_table(t.device)
        if table is None:
            return t - 1
        # clamped gather: an out-of-range t is reported by the op's own check (or gives NaN), never a bad read
        return table.index_select(0, t.clamp(0, table.shape[0] - 1))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
    ):
        """As ``DDPMScheduler.step``, fused and sync-free; ``timestep`` may be per sample, shape (B,)."""
        t = self._timestep_tensor(timestep, sample)
        t_prev = self._previous_timestep_tensor(t)
        variance_type = self.variance_type
        if variance_type in ("learned", "learned_range") and model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(
                f"model_output: variance_type={variance_type!r} needs the model's variance channels "
                f"({2 * sample.shape[1]} channels for a sample of {sample.shape[1]}), got shape "
                f"{tuple(model_output.shape)}"
            )
        model_dtype = model_output.dtype
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        schedule = self._dk_schedule(sample.device)
        generator_for_op = None
        if self.in_kernel_noise and (generator is None or self._noise_generator(generator) is not None):
            noise, generator_for_op = None, self._noise_generator(generator)
        else:
            host = _host_timesteps(timestep)
            if host is not None and all(v <= 0 for v in host):
                # the stock step draws nothing at t == 0; neither do we (the noise is masked out anyway)
                noise = torch.zeros_like(sample)
            else:
                # the stock draw: the model output's (variance-split) shape, dtype and device
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=model_dtype)
                noise = noise.to(sample.dtype)
        prev_sample, pred_original_sample = ops.ddpm_step(
            sample,
            t,
            t_prev,
            model_output,
            schedule,
            _PREDICTION[self.config.prediction_type],
            variance_type,
            bool(self.config.clip_sample),
            noise,
            generator_for_op,
            backend=self.fused_backend,
            clip_range=float(self.config.clip_sample_range),
            threshold_ratio=float(self.config.dynamic_thresholding_ratio) if self.config.thresholding else None,
            threshold_max=float(self.config.sample_max_value),
            return_pred_x0=True,
        )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class FusedDDIMScheduler(_FusedSchedulerMixin, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` (same config, same results) with ``step`` as one fused
    `ddpm_kernels.ddim_step`; see the module docstring for what differs.

    ``DDIMPipeline.__init__`` converts any scheduler it is given to a stock ``DDIMScheduler``; set
    ``pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)`` after building the pipeline.
    """

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        super().set_timesteps(num_inference_steps, device=device)
        self._prepare_device(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """As ``DDIMScheduler.step``, fused and sync-free; ``timestep`` may be per sample, shape (B,)."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        eta = float(eta)
        t = self._timestep_tensor(timestep, sample)
        # the stock step's previous timestep, whatever the spacing; every negative one means "final alpha"
        t_prev = (t - self.config.num_train_timesteps // self.num_inference_steps).clamp(min=-1)
        model_dtype = model_output.dtype
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        noise, generator_for_op = None, None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=sample.dtype)
            elif self.in_kernel_noise and (generator is None or self._noise_generator(generator) is not None):
                generator_for_op = self._noise_generator(generator)
            else:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_dtype
                ).to(sample.dtype)
        prev_sample, pred_original_sample = ops.ddim_step(
            sample,
            t,
            t_prev,
            model_output,
            self._dk_schedule(sample.device),
            eta,
            _PREDICTION[self.config.prediction_type],
            bool(self.config.clip_sample),
            noise,
            generator_for_op,
            backend=self.fused_backend,
            set_alpha_to_one=bool(self.config.set_alpha_to_one),
            use_clipped_model_output=bool(use_clipped_model_output),
            clip_range=float(self.config.clip_sample_range),
            threshold_ratio=float(self.config.dynamic_thresholding_ratio) if self.config.thresholding else None,
            threshold_max=float(self.config.sample_max_value),
            return_pred_x0=True,
        )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
