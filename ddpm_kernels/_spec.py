"""The op table: every public op declared once.

An :class:`OpSpec` names an op's tensor arguments and their roles, its scalar options with their validators,
its outputs and whether it draws noise. ``ddpm_kernels.ops`` builds its one validation/dispatch prologue
from it, ``ddpm_kernels._native`` generates the fake (meta) kernels of the compiled operators from it, the
schema test pins the registered operators to it, and the benchmark CLI takes its cases from it.
See docs/design.md, "The op table".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
SAMPLERS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The scalar options of one sampler step (the sampler-step family), validated and canonical.

    One frozen, hashable object travels from the public op to every backend instead of a dozen positional
    arguments; backends cache per-options decisions (which kernel specialisation, whether they serve it) on it.
    ``sampler`` selects the per-sample coefficient function of the family: ``"ddim"`` (Song et al. 2021,
    eq. 12; ``eta``, ``set_alpha_to_one``, ``use_clipped_model_output``) or ``"ddpm"`` (ancestral step on a
    respaced chain; ``variance_type``). ``parameterization`` is canonical (``"eps"``, ``"x0"`` or ``"v"``).
    """

    sampler: str
    parameterization: str = "eps"
    variance_type: str = "fixed_small"
    eta: float = 0.0
    clip_denoised: bool = False
    clip_range: float = 1.0
    set_alpha_to_one: bool = True
    use_clipped_model_output: bool = False
    threshold_ratio: Optional[float] = None
    threshold_max: float = 1.0
    return_pred_x0: bool = False

    @property
    def learned(self) -> bool:
        """The model output carries the variance in a second half of its channels (B, 2C, ...)."""
        return self.sampler == "ddpm" and self.variance_type in LEARNED_VARIANCE_TYPES

    @property
    def adds_noise(self) -> bool:
        """The step has a noise term (DDIM only with ``eta > 0``)."""
        return self.sampler == "ddpm" or self.eta > 0

    @property
    def thresholded(self) -> bool:
        """x0 is dynamically thresholded (a per-sample quantile first) instead of clipped."""
        return self.threshold_ratio is not None
