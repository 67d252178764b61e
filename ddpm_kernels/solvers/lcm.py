"""LCM (Luo et al. 2023) multistep consistency sampling as a `solver_step` coefficient table: diffusers'
``LCMScheduler.step``, built once per schedule in float64.

Step ``i`` at timestep ``t = timesteps[i]`` with the next one ``s`` (``alphas_cumprod`` the training schedule's
cumulative alphas):

    x0       = x0 from the model output at t             (then clipped or thresholded: the step's options)
    denoised = c_out(t) x0 + c_skip(t) x                  the consistency function's boundary condition
    x'       = sqrt(abar_s) denoised + sqrt(1 - abar_s) z (the last step: x' = denoised, no noise)

with ``c_skip = sigma_data^2 / (T^2 + sigma_data^2)``, ``c_out = T / sqrt(T^2 + sigma_data^2)``, ``T = t *
timestep_scaling`` and ``sigma_data = 0.5``. On the table's columns: ``m = denoised`` (``m_sample = c_skip``,
``m_x0 = c_out``), ``x_c = m`` (``c_m = 1``), written into the last-sample buffer — the step's ``denoised``
output — and ``x' = p_xc x_c + p_noise z``. No history ring. See docs/design.md, "Multistep solvers", "LCM".
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .._spec import SolverColumns
from ._columns import x0_columns

__all__ = ["lcm_coefficients", "SIGMA_DATA"]

SIGMA_DATA = 0.5


def lcm_coefficients(
    alphas_cumprod: Sequence[float], timesteps: Sequence[int], *, prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0, num_inference_steps: Optional[int] = None
) -> np.ndarray:
    """The float64 `solver_step` table of LCM sampling over ``timesteps`` (integer training timesteps, one row
    each; the history ring has 0 slots). ``num_inference_steps``: the row without noise is row
    ``num_inference_steps - 1`` (default: the last); a step has the next row's timestep, the last its own.
    Options as diffusers' ``LCMScheduler`` config; ``prediction_type`` epsilon, sample or v_prediction."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    timesteps = np.asarray(timesteps)
    if alphas_cumprod.ndim != 1 or alphas_cumprod.shape[0] < 1:
        raise ValueError(f"alphas_cumprod: expected a 1-D sequence, got shape {alphas_cumprod.shape}")
    if timesteps.ndim != 1 or timesteps.shape[0] < 1 or not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f"timesteps: expected a 1-D sequence of integers, got {timesteps.dtype} of shape "
                         f"{timesteps.shape}")
    if timesteps.min() < 0 or timesteps.max() >= alphas_cumprod.shape[0]:
        raise ValueError(f"timesteps: expected values in [0, {alphas_cumprod.shape[0]}), got min {timesteps.min()}, "
                         f"max {timesteps.max()}")
    if prediction_type == "flow_prediction":
        raise ValueError("prediction_type: expected epsilon, sample or v_prediction, got 'flow_prediction'")
    steps = timesteps.shape[0]
    last = steps - 1 if num_inference_steps is None else num_inference_steps - 1
    col = SolverColumns(0)
    table = np.zeros((steps, col.width))
    for i, t in enumerate(timesteps.tolist()):
        abar = alphas_cumprod[t]
        table[i, col.x0_sample], table[i, col.x0_output] = x0_columns(
            prediction_type, np.sqrt(abar), np.sqrt(1.0 - abar), 0.0)
        scaled = t * timestep_scaling
        table[i, col.m_sample] = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        table[i, col.m_x0] = scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)
        table[i, col.c_m] = 1.0
        if i == last:
            table[i, col.p_xc] = 1.0
        else:
            abar_prev = alphas_cumprod[timesteps[i + 1] if i + 1 < steps else t]
            table[i, col.p_xc], table[i, col.p_noise] = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
    return table
