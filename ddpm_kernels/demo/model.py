"""The demo's model: a `UNet` inside a `GaussianDiffusion` on a CompVis linear schedule."""

from __future__ import annotations

from typing import Optional, Tuple

from ..diffusion import GaussianDiffusion
from ..schedule import DiffusionSchedule
from ..unet import UNet
from .defaults import DEFAULT_IMAGE_SIZE, DEFAULT_TIMESTEPS


def build_diffusion(
    image_size: int = DEFAULT_IMAGE_SIZE,
    timesteps: int = DEFAULT_TIMESTEPS,
    backend: str = "auto",
    base_channels: int = 32,
    beta_schedule: str = "linear",
    device="cpu",
    unet_config: Optional[dict] = None,
) -> GaussianDiffusion:
    """The demo's `GaussianDiffusion`: a `UNet` and a CompVis linear schedule.

    The schedule's ``linear_start``/``linear_end`` (CompVis' 1e-4 and 2e-2 at T=1000) are scaled by 1000/T,
    so alphas_cumprod still ends near 0 (data fully noised) with fewer steps; at T=1000 they are CompVis'.
    """
    scale = 1000.0 / timesteps
    schedule = DiffusionSchedule(
        beta_schedule, timesteps=timesteps, linear_start=1e-4 * scale, linear_end=min(2e-2 * scale, 0.5)
    )
    config = dict(unet_config) if unet_config else dict(in_channels=1, base_channels=base_channels)
    model = UNet(**config)
    diffusion = GaussianDiffusion(
        model,
        schedule,
        parameterization="eps",
        loss_type="l2",
        log_every_t=max(1, timesteps // 10),
        image_size=image_size,
        channels=config.get("in_channels", 1),
        backend=backend,
    )
    return diffusion.to(device)


def sample_shape(diffusion: GaussianDiffusion, n: int) -> Tuple[int, ...]:
    """The shape of ``n`` samples of ``diffusion``: (n, C, H, W)."""
    size = diffusion.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (n, diffusion.channels, *size)
