"""Training the demo's model: the seed's ``p_losses`` (or the rectified-flow loss) under AdamW, with an EMA of
the weights."""

from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .defaults import DEFAULT_BATCH_SIZE
from .model import Generative, is_flow


class EMA:
    """Exponential moving average of a model's weights (CompVis ``LitEma``: decay warms up as (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: a short linear warm-up, then a cosine decay to zero at ``steps``."""
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return lr_at


def _batch_loss(diffusion: Generative, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One batch's loss, its randomness drawn from ``g`` (CPU) and moved to the data's device: a timestep and
    noise per sample for DDPM, a sigma (SD3's draw, `FlowMatching.sample_sigmas`) and noise for flow matching."""
    device = x.device
    if is_flow(diffusion):
        sigma = diffusion.sample_sigmas(x.shape[0], generator=g)
        noise = torch.randn(x.shape, generator=g).to(device)
        return diffusion.training_loss(x, noise=noise, sigma=sigma)[0]
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    return diffusion.p_losses(x, t, noise=noise)[0]


def train(
    diffusion: Generative, images: torch.Tensor, steps: int, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = 2e-3,
    seed: int = 0, progress: bool = True, ema: Optional[EMA] = None
) -> List[float]:
    """Train ``diffusion.model`` for ``steps`` steps, with the seed's ``p_losses`` for a `GaussianDiffusion` or
    `FlowMatching.training_loss` for a rectified flow; returns the losses.

    AdamW with a short linear warm-up and a cosine decay to zero (a short run ends at its best weights).
    ``ema``, when given, is updated after every step.
    """
    device = diffusion.device
    model = diffusion.model
    model.train()
    diffusion.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    g = torch.Generator().manual_seed(seed)
    data = images.to(device)
    losses: List[float] = []
    bar = tqdm(range(steps), desc="Training", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g).to(device)
        loss = _batch_loss(diffusion, data[idx], g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.4f}")
    model.eval()
    diffusion.eval()
    return losses
