"""FlowMatching: rectified-flow training and Euler sampling (SD3 / Flux style) on top of the fused flow ops.

The flow-matching counterpart of `ddpm_kernels.GaussianDiffusion`: ``x_sigma = (1 - sigma) x0 + sigma eps``
(`ddpm_kernels.flow_interpolate`), the model predicts the velocity ``v = eps - x0`` from ``model(x_sigma,
sigma * num_train_timesteps)``, the loss is `ddpm_kernels.flow_loss`, and sampling integrates from pure noise at
sigma = 1 to sigma = 0 with the fused Euler step `ddpm_kernels.flow_step` (optionally with classifier-free
guidance folded into the step).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks
from ._spec import FLOW_WEIGHTINGS
from .flow import flow_interpolate, flow_loss, flow_step, randn_stream

__all__ = ["FlowMatching", "TIMESTEP_SAMPLINGS", "flow_sigmas", "shift_sigmas", "timestep_density"]

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "mode")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``shift * s / (1 + (shift - 1) * s)`` (diffusers' static ``shift``): ``shift > 1``
    spends more of the schedule at high noise. Keeps 0 and 1 fixed."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """The sampling table: ``num_steps + 1`` float32 sigmas, ``linspace(1, 0)`` shifted by `shift_sigmas`, the
    last one exactly 0 (step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``). Built in float64.

    diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` instead stops the linspace at the shifted
    ``1 / num_train_timesteps`` and appends the 0; its ``scheduler.sigmas`` can be passed to
    `FlowMatching.sample_loop` as ``sigmas=`` to sample on exactly its table.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    s = shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    return s.to(device=device, dtype=torch.float32)


def timestep_density(
    timestep_sampling: str, batch_size: int, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
    device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``u`` in [0, 1), shape (batch_size,), drawn as diffusers' ``compute_density_for_timestep_sampling`` draws
    it (the same calls on the same generator, so the same values): ``logit_normal`` ``sigmoid(normal(mean,
    std))``; ``mode`` ``1 - u - mode_scale (cos(pi u / 2)^2 - 1 + u)`` with ``u`` uniform; ``uniform``."""
    if timestep_sampling == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(size=(batch_size,), device=device, generator=generator)
    if timestep_sampling == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class FlowMatching(nn.Module):
    """Rectified-flow training loss and Euler sampling around any ``model(x, t)`` (or ``model(x, t, cond)``).

    Training (`training_loss`) follows diffusers' SD3 / Flux training scripts: per sample a ``u`` from
    ``timestep_sampling`` (`timestep_density`), the training timestep ``timesteps[int(u * T)]`` of a
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)`` and its sigma (the buffer
    ``train_sigmas``), then `flow_interpolate`, ``model(x_sigma, sigma * T)`` and `flow_loss` with
    ``weighting`` (``compute_loss_weighting_for_sd3``) and ``loss_type``.

    Sampling (`sample_loop`, `sample`) runs the Euler steps of ``FlowMatchEulerDiscreteScheduler.step`` with the
    fused `flow_step` on a device sigma table (`flow_sigmas`), one step index per sample on the device, writing
    every step into the same buffer. With ``guidance_scale``, the model runs once on the batched ``[uncond;
    cond]`` input and the guidance ``u + w (c - u)`` is formed inside the step.

    The model is kept as ``.model``; ``backend`` is the flow ops' backend.
    """

    def __init__(
        self, model, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
        mode_scale: float = 1.29, weighting: str = "none", loss_type: str = "l2", shift: float = 1.0,
        num_train_timesteps: int = 1000, num_inference_steps: int = 50, log_every_t: int = 10,
        image_size: Union[int, Sequence[int]] = 256, channels: int = 3, backend: str = "auto"
    ):
        super().__init__()
        model = _checks._check_model(model)
        self.model = model
        self.timestep_sampling = _checks._check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        self.logit_mean = _checks._check_weight("logit_mean", logit_mean)
        self.logit_std = _checks._check_weight("logit_std", logit_std)
        if self.logit_std <= 0:
            raise ValueError(f"logit_std: expected a positive number, got {self.logit_std}")
        self.mode_scale = _checks._check_weight("mode_scale", mode_scale)
        self.weighting = _checks._check_choice("weighting", weighting, FLOW_WEIGHTINGS)
        self.loss_type = _checks._check_choice("loss_type", loss_type, _checks.LOSS_TYPES)
        self.shift = _checks._check_weight("shift", shift)
        if self.shift <= 0:
            raise ValueError(f"shift: expected a positive number, got {self.shift}")
        self.num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
        self.num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
        self.log_every_t = _check_positive_int("log_every_t", log_every_t)
        self.image_size = image_size
        self.channels = channels
        self.backend = _checks._check_backend(backend)
        T = self.num_train_timesteps
        # The training scheduler's sigmas, T/T down to 1/T, shifted (diffusers builds them the same way at init;
        # here in float64, stored as float32). A buffer, so `.to(device)` moves it with the model and a training
        # step gathers its sigmas on the device.
        train = shift_sigmas(torch.arange(T, 0, -1, dtype=torch.float64) / T, self.shift)
        self.register_buffer("train_sigmas", train.to(torch.float32), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.train_sigmas.device

    # ------------------------------------------------------------------ training
    def sample_sigmas(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Per-sample training sigmas, shape (batch_size,), as the SD3 / Flux scripts draw them: ``u`` from
        `timestep_density` (on ``generator``'s device, default this module's), then the training sigma at index
        ``int(u * T)``."""
        device = torch.device(device) if device is not None else (generator.device if generator is not None
                                                                   else self.device)
        u = timestep_density(self.timestep_sampling, batch_size, self.logit_mean, self.logit_std, self.mode_scale,
                             device=device, generator=generator)
        indices = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        return self.train_sigmas[indices.to(self.device)]

    def model_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is called with: ``sigma * num_train_timesteps``."""
        return sigma * self.num_train_timesteps

    def _call_model(self, x, t, cond):
        return self.model(x, t) if cond is None else self.model(x, t, cond)

    def training_loss(
        self, x0, noise=None, sigma=None, cond=None, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The rectified-flow training loss on a batch of data ``x0``: ``(loss, loss_dict)``.

        ``noise``: default ``randn`` (from ``generator``); ``sigma``: per-sample (B,) (or per token / frame)
        sigmas, default `sample_sigmas` (from ``generator``); ``cond``: passed to the model as its third argument.
        ``loss_dict`` holds ``train/loss`` (``val/loss`` in eval mode).
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if sigma is None:
            sigma = self.sample_sigmas(x0.shape[0], generator=generator)
        x_sigma = flow_interpolate(x0, noise, sigma, backend=self.backend)
        model_out = self._call_model(x_sigma, self.model_timesteps(sigma), cond)
        loss = flow_loss(model_out, x0, noise, sigma, self.weighting, self.loss_type, backend=self.backend)
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss": loss}

    def forward(self, x0, noise=None, cond=None):
        """The training forward: `training_loss` with sigmas drawn per sample."""
        return self.training_loss(x0, noise=noise, cond=cond)

    # ------------------------------------------------------------------ sampling
    def sigma_table(self, num_steps: Optional[int] = None) -> torch.Tensor:
        """`flow_sigmas` for ``num_steps`` (default ``num_inference_steps``) with this module's shift, on its
        device."""
        return flow_sigmas(num_steps or self.num_inference_steps, self.shift, self.device)

    def _check_sigmas(self, sigmas) -> torch.Tensor:
        if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point() or sigmas.ndim != 1 \
                or sigmas.shape[0] < 2:
            raise ValueError("sigmas: expected a 1-D float tensor of at least 2 sigmas, from 1 (noise) down to the "
                             "final sigma")
        return sigmas.to(self.device)

    @torch.no_grad()
    def sample_loop(
        self, shape: Sequence[int], num_steps: Optional[int] = None, guidance_scale=None, cond=None, uncond=None,
        generator: Optional[torch.Generator] = None, sigmas: Optional[torch.Tensor] = None, stochastic: bool = False,
        guidance_rescale: float = 0.0, return_intermediates: bool = False, progress: bool = True,
        dtype: torch.dtype = torch.float32, x_init: Optional[torch.Tensor] = None, sample_offset: int = 0
    ):
        """Euler sampling from pure noise (sigma = 1) to sigma = 0.

        ``sigmas``: the table to step on (default `sigma_table` of ``num_steps``); step ``i`` goes from
        ``sigmas[i]`` to ``sigmas[i + 1]``. ``cond``: the model's condition (``model(x, t, cond)``).
        ``guidance_scale`` (a number, or a float tensor (B,) per sample): classifier-free guidance with
        ``uncond`` the unconditional condition (e.g. the null class), the model called once per step on the
        ``[uncond; cond]`` batch; ``guidance_rescale`` as diffusers' ``rescale_noise_cfg``. ``stochastic``:
        diffusers' ``stochastic_sampling`` (re-noise to the next sigma with noise from ``generator``).
        ``x_init``: the starting noise (default `ddpm_kernels.randn_stream` of ``shape`` from ``generator``; it is
        not modified). ``sample_offset``: the global index of this batch's first sample in the noise stream (the
        starting noise and the stochastic steps' noise), so a batch sharded over ranks (each passing ``rank *
        per_rank_batch`` and the same generator seed) reproduces one device's samples.

        Every step writes into one buffer (``out=``), and the step index, the model's timesteps and the guided
        model input live in buffers made once, so the loop allocates nothing per step beyond the model's own
        work. With ``return_intermediates`` also returns the starting noise and every ``log_every_t``-th step's
        output (and the last).
        """
        device = self.device
        sigmas = self.sigma_table(num_steps) if sigmas is None else self._check_sigmas(sigmas)
        n = sigmas.shape[0] - 1
        b = shape[0]
        guided = guidance_scale is not None
        if guided and (cond is None or uncond is None):
            missing = "cond" if cond is None else "uncond"
            raise ValueError(f"{missing}: classifier-free guidance (guidance_scale) needs both the condition cond "
                             f"and the unconditional condition uncond")
        if x_init is None:
            img = randn_stream(shape, generator, sample_offset, device=device, dtype=dtype, backend=self.backend)
        else:
            if tuple(x_init.shape) != tuple(shape):
                raise ValueError(f"x_init: expected shape {tuple(shape)}, got {tuple(x_init.shape)}")
            img = x_init.to(device=device, dtype=dtype, copy=True)
        intermediates: List[torch.Tensor] = [img.clone()] if return_intermediates else []
        timesteps = self.model_timesteps(sigmas[:-1])
        step_index = torch.zeros((b,), device=device, dtype=torch.long)
        if guided:
            model_in = torch.empty((2 * b,) + tuple(shape[1:]), device=device, dtype=dtype)
            t = torch.empty((2 * b,), device=device, dtype=timesteps.dtype)
            model_cond = torch.cat([uncond, cond])
        else:
            model_in = img
            t = torch.empty((b,), device=device, dtype=timesteps.dtype)
            model_cond = cond
        step_kw = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale) if guided else {}
        for i in tqdm(range(n), desc="Sampling sigma", total=n, disable=not progress):
            step_index.fill_(i)
            t.copy_(timesteps[i])  # a broadcast device copy: no host sync
            if guided:
                model_in[:b].copy_(img)
                model_in[b:].copy_(img)
            model_out = self._call_model(model_in, t, model_cond)
            flow_step(img, model_out, sigmas, step_index, None, generator, self.backend, stochastic=stochastic,
                      out=img, sample_offset=sample_offset, **step_kw)
            if return_intermediates and ((i + 1) % self.log_every_t == 0 or i == n - 1):
                intermediates.append(img.clone())
        if return_intermediates:
            return img, intermediates
        return img

    @torch.no_grad()
    def sample(
        self, batch_size: int = 16, num_steps: Optional[int] = None, guidance_scale=None, cond=None, uncond=None,
        generator: Optional[torch.Generator] = None, return_intermediates: bool = False, progress: bool = True, **kwargs
    ):
        """`sample_loop` at ``(batch_size, channels, *image_size)``."""
        size = self.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return self.sample_loop(
            (batch_size, self.channels, *size), num_steps=num_steps, guidance_scale=guidance_scale, cond=cond,
            uncond=uncond, generator=generator, return_intermediates=return_intermediates, progress=progress,
            **kwargs,
        )

    def logged_steps(self, num_steps: Optional[int] = None) -> List[int]:
        """The step counts after which `sample_loop` logs an intermediate (0: the starting noise)."""
        n = num_steps or self.num_inference_steps
        return [0] + [i + 1 for i in range(n) if (i + 1) % self.log_every_t == 0 or i == n - 1]
