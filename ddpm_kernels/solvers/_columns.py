"""The model output's conversions as coefficient-table columns, shared by the solvers' table builders.

A diffusion model's output ``y`` at a point ``x = alpha x0 + sigma eps`` of the schedule is one of four
parameterizations; each solver step first turns it into an x0 prediction (the table's ``x0_sample`` /
``x0_output`` columns, before clipping or thresholding) or an epsilon prediction (``m_sample`` / ``m_x0`` /
``m_output``). Both are affine in ``(x, y)`` with coefficients that depend on the step alone. See
docs/design.md, "Multistep solvers".
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["PREDICTION_TYPES", "x0_columns", "epsilon_columns"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def x0_columns(prediction_type: str, alpha: float, sigma: float, flow_sigma: float) -> Tuple[float, float]:
    """``(x0_sample, x0_output)``: x0 = x0_sample x + x0_output y at the point ``(alpha, sigma)``.
    ``flow_sigma`` is the rectified-flow sigma that a ``flow_prediction`` (a velocity ``eps - x0``) is scaled by,
    ``x0 = x - flow_sigma y`` (diffusers uses the scheduler's raw sigma there whatever its schedule)."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "flow_prediction":
        return 1.0, -flow_sigma
    raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def epsilon_columns(prediction_type: str, alpha: float, sigma: float) -> Optional[Tuple[float, float, float]]:
    """``(m_sample, m_x0, m_output)`` of the epsilon prediction, read from the model output directly (an epsilon
    output as it is, no round trip through x0); None for a ``flow_prediction``, which diffusers' epsilon-form
    solvers refuse."""
    if prediction_type == "epsilon":
        return 0.0, 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / sigma, 0.0, -alpha / sigma
    if prediction_type == "v_prediction":
        return sigma, 0.0, alpha
    if prediction_type == "flow_prediction":
        return None
    raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
