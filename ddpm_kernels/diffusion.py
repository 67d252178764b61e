"""GaussianDiffusion: the DDPM of CompVis ``ldm/models/diffusion/ddpm.py`` on top of the fused ops."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks, ops
from .flow import randn_stream
from .schedule import DiffusionSchedule

__all__ = ["GaussianDiffusion"]


class GaussianDiffusion(nn.Module):
    """DDPM training loss and ancestral sampling around any ``model(x, t)``.

    Same methods and semantics as the seed's ``DDPM`` (``q_sample``, ``p_losses`` -> ``(loss, loss_dict)``,
    ``p_mean_variance``, ``p_sample``, ``p_sample_loop``, ``sample``); the per-step math runs through
    ``ddpm_kernels``' ops on ``backend``. The model is kept as ``.model`` and the schedule as ``.schedule``
    (a submodule, so ``.to(device)`` moves its tables with the model).
    """

    def __init__(
        self, model: nn.Module, schedule: Optional[DiffusionSchedule] = None, parameterization: str = "eps",
        loss_type: str = "l2", clip_denoised: bool = True, log_every_t: int = 100, l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0, image_size: Union[int, Sequence[int]] = 256, channels: int = 3,
        backend: str = "auto"
    ):
        super().__init__()
        model = _checks._check_model(model)
        if schedule is None:
            schedule = DiffusionSchedule()
        if not isinstance(schedule, DiffusionSchedule):
            raise TypeError(f"schedule: expected a ddpm_kernels.DiffusionSchedule, got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.parameterization = _checks._check_parameterization(parameterization)
        self.loss_type = _checks._check_choice("loss_type", loss_type, _checks.LOSS_TYPES)
        self.clip_denoised = _checks._check_bool("clip_denoised", clip_denoised)
        if isinstance(log_every_t, bool) or not isinstance(log_every_t, int) or log_every_t < 1:
            raise ValueError(f"log_every_t: expected a positive int, got {log_every_t!r}")
        self.log_every_t = log_every_t
        self.l_simple_weight = _checks._check_weight("l_simple_weight", l_simple_weight)
        self.original_elbo_weight = _checks._check_weight("original_elbo_weight", original_elbo_weight)
        self.image_size = image_size
        self.channels = channels
        self.backend = _checks._check_backend(backend)

    # ------------------------------------------------------------------ schedule views
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def lvlb_weights(self) -> torch.Tensor:
        return self.schedule.lvlb_weights(self.parameterization)

    @property
    def device(self) -> torch.device:
        return self.schedule.device

    # ------------------------------------------------------------------ forward process / training
    def q_sample(self, x_start, t, noise=None, out=None):
        return ops.q_sample(x_start, t, noise, self.schedule, backend=self.backend, out=out)

    def predict_start_from_noise(self, x_t, t, noise):
        return ops.predict_start_from_noise(x_t, t, noise, self.schedule, backend=self.backend)

    def get_v(self, x, noise, t):
        return ops.get_v(x, noise, t, self.schedule, backend=self.backend)

    def q_posterior(self, x_start, x_t, t):
        return ops.q_posterior(x_start, x_t, t, self.schedule, backend=self.backend)

    def p_losses(self, x_start, t, noise=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start, t, noise)
        model_out = self.model(x_noisy, t)
        loss, loss_simple, loss_vlb = ops.diffusion_loss(
            model_out,
            x_start,
            noise,
            t,
            self.schedule,
            self.parameterization,
            self.loss_type,
            self.l_simple_weight,
            self.original_elbo_weight,
            backend=self.backend,
        )
        prefix = "train" if self.training else "val"
        loss_dict = {f"{prefix}/loss_simple": loss_simple, f"{prefix}/loss_vlb": loss_vlb, f"{prefix}/loss": loss}
        return loss, loss_dict

    def forward(self, x, noise=None):
        """The seed's training forward: a uniformly random timestep per sample, then `p_losses`."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device, dtype=torch.long)
        return self.p_losses(x, t, noise=noise)

    # ------------------------------------------------------------------ reverse process / sampling
    def p_mean_variance(self, x, t, clip_denoised: Optional[bool] = None):
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        model_out = self.model(x, t)
        return ops.p_mean_variance(x, t, model_out, self.schedule, self.parameterization, clip, backend=self.backend)

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised: Optional[bool] = None, noise=None, generator=None, out=None,
                 sample_offset: int = 0):
        """One step ``x_t -> x_{t-1}``: the model call, then one fused `ddpm_kernels.p_sample`. With
        ``noise=None`` the noise is drawn exactly as ``ddpm_kernels.p_sample(noise=None)`` draws it (rows
        ``sample_offset ..`` of the noise stream)."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        model_out = self.model(x, t)
        return ops.p_sample(
            x, t, model_out, self.schedule, self.parameterization, clip, noise, generator, backend=self.backend, out=out,
            sample_offset=sample_offset,
        )

    @torch.no_grad()
    def p_sample_loop(
        self, shape: Sequence[int], return_intermediates: bool = False, generator: Optional[torch.Generator] = None,
        progress: bool = True, dtype: torch.dtype = torch.float32, sample_offset: int = 0
    ):
        """Ancestral sampling from pure noise over all ``num_timesteps`` steps.

        The starting noise and every step's noise come from the noise stream (`ddpm_kernels.randn_stream`),
        rows ``sample_offset ..``: ``sample_offset`` is the global index of this batch's first sample, so a batch
        sharded over ranks (each passing ``rank * per_rank_batch`` and the same generator seed) reproduces the
        images one device makes for the whole batch.

        With ``return_intermediates``, also returns the initial noise, the first step's output and every
        ``log_every_t``-th step's output, as the seed does. Each step writes into the same buffer (``out=``),
        so the loop allocates nothing per step beyond the model's own work.
        """
        device = self.device
        b = shape[0]
        img = randn_stream(shape, generator, sample_offset, device=device, dtype=dtype, backend=self.backend)
        intermediates: List[torch.Tensor] = [img.clone()] if return_intermediates else []
        t = torch.empty((b,), device=device, dtype=torch.long)
        steps = tqdm(
            reversed(range(0, self.num_timesteps)), desc="Sampling t", total=self.num_timesteps, disable=not progress
        )
        for i in steps:
            t.fill_(i)
            self.p_sample(img, t, generator=generator, out=img, sample_offset=sample_offset)
            if return_intermediates and (i % self.log_every_t == 0 or i == self.num_timesteps - 1):
                intermediates.append(img.clone())
        if return_intermediates:
            return img, intermediates
        return img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False, generator=None, progress=True,
               sample_offset: int = 0):
        """`p_sample_loop` at ``(batch_size, channels, *image_size)``; ``sample_offset`` as there."""
        size = self.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return self.p_sample_loop(
            (batch_size, self.channels, *size),
            return_intermediates=return_intermediates,
            generator=generator,
            progress=progress,
            sample_offset=sample_offset,
        )
