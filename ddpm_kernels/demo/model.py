"""The demo's model: a `UNet` inside a `GaussianDiffusion` on a CompVis linear schedule, or inside a
`FlowMatching` (``--objective flow``); and what the rest of the demo asks of either."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from ..diffusion import GaussianDiffusion
from ..flow_matching import FlowMatching
from ..schedule import DiffusionSchedule
from ..unet import UNet
from .defaults import DEFAULT_FLOW_STEPS, DEFAULT_IMAGE_SIZE, DEFAULT_TIMESTEPS

OBJECTIVES = ("ddpm", "flow")

Generative = Union[GaussianDiffusion, FlowMatching]


def build_diffusion(
    image_size: int = DEFAULT_IMAGE_SIZE, timesteps: int = DEFAULT_TIMESTEPS, backend: str = "auto",
    base_channels: int = 32, beta_schedule: str = "linear", device="cpu", unet_config: Optional[dict] = None
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


def build_flow_matching(
    image_size: int = DEFAULT_IMAGE_SIZE, num_steps: int = DEFAULT_FLOW_STEPS, backend: str = "auto",
    base_channels: int = 32, device="cpu", unet_config: Optional[dict] = None
) -> FlowMatching:
    """The demo's `FlowMatching`: the same `UNet`, trained as a rectified flow (SD3's logit-normal sigmas,
    unweighted l2 on the velocity) and sampled with ``num_steps`` Euler steps on a linear sigma table."""
    config = dict(unet_config) if unet_config else dict(in_channels=1, base_channels=base_channels)
    flow = FlowMatching(
        UNet(**config),
        timestep_sampling="logit_normal",
        weighting="none",
        loss_type="l2",
        num_inference_steps=num_steps,
        log_every_t=max(1, num_steps // 10),
        image_size=image_size,
        channels=config.get("in_channels", 1),
        backend=backend,
    )
    return flow.to(device)


def build_model(objective: str, image_size: int, steps: int, backend: str = "auto", base_channels: int = 32,
                device="cpu", unet_config: Optional[dict] = None) -> Generative:
    """`build_diffusion` (``objective="ddpm"``, ``steps`` = T) or `build_flow_matching` (``"flow"``, ``steps`` =
    Euler sampling steps)."""
    if objective == "flow":
        return build_flow_matching(image_size, steps, backend, base_channels, device=device, unet_config=unet_config)
    return build_diffusion(image_size, steps, backend, base_channels, device=device, unet_config=unet_config)


def is_flow(model: Generative) -> bool:
    return isinstance(model, FlowMatching)


def objective_of(model: Generative) -> str:
    return "flow" if is_flow(model) else "ddpm"


def sampling_steps(model: Generative) -> int:
    """Model calls per sample: T for DDPM, the Euler steps for flow matching."""
    return model.num_inference_steps if is_flow(model) else model.num_timesteps


def step_op(model: Generative) -> str:
    """The fused op a sampling step runs: ``p_sample`` or ``flow_step``."""
    return "flow_step" if is_flow(model) else "p_sample"


def sample_shape(diffusion: Generative, n: int) -> Tuple[int, ...]:
    """The shape of ``n`` samples of ``diffusion``: (n, C, H, W)."""
    size = diffusion.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (n, diffusion.channels, *size)
