"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) multistep,
ODE and SDE forms, as `solver_step` coefficient tables: the steps of diffusers' ``DPMSolverMultistepScheduler``.

A step from sigma ``s0 = sigmas[i]`` to ``t = sigmas[i + 1]`` with ``lambda = log(alpha) - log(sigma)`` and
``h = lambda_t - lambda_s0`` is ``x' = a x + b0 D0 + b1 D1 + b2 D2 (+ n z)``, where ``D0, D1, D2`` are divided
differences of the last one to three converted model outputs ``m0, m1, m2`` (x0 predictions for the ``++``
forms, noise predictions otherwise) over the lambda grid. Those are linear in ``m0, m1, m2``, so the whole step
is one row of coefficients: ``p_xc = a``, ``p_m`` on ``m0`` and ``p_hist[0]``, ``p_hist[1]`` on the outputs one
and two steps back (the ring of ``solver_order - 1`` slots). The model output is converted to the solver's form
by the row's ``x0_*`` / ``m_*`` columns; everything is computed here in float64 from the scheduler's sigma
table. See docs/design.md, "Multistep solvers" / "DPM-Solver".
"""

from __future__ import annotations

import numpy as np
import torch

from .._spec import SolverColumns
from ._columns import PREDICTION_TYPES, epsilon_columns, x0_columns

__all__ = ["ALGORITHMS", "dpm_solver_coefficients", "dpm_solver_orders", "dpm_solver_slots", "dpm_solver_table"]

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
_SOLVER_TYPES = ("midpoint", "heun")
_FINAL_SIGMAS = ("zero", "sigma_min")


def dpm_solver_slots(solver_order: int) -> int:
    """The history ring a DPM-Solver of ``solver_order`` needs: the ``solver_order - 1`` earlier outputs (none for
    the first order, whose table has no history columns)."""
    return solver_order - 1


def dpm_solver_orders(steps: int, *, solver_order: int = 2, lower_order_final: bool = True,
                      euler_at_final: bool = False, final_sigmas_type: str = "zero", begin_index: int = 0) -> list:
    """The order of each of ``steps`` steps, as ``DPMSolverMultistepScheduler.step`` chooses it: a warm-up of
    lower orders while the earlier outputs accumulate (counted from ``begin_index``), the first order at the last
    step with ``euler_at_final``, a zero final sigma, or ``lower_order_final`` under 15 steps, and at most the
    second order at the step before it in that last case. Steps before ``begin_index`` are given the orders of a
    start there (first order)."""
    orders = []
    short = lower_order_final and steps < 15
    for i in range(steps):
        taken = max(i - begin_index, 0)  # the stock lower_order_nums, capped below by the order anyway
        last = i == steps - 1 and (euler_at_final or short or final_sigmas_type == "zero")
        second_last = i == steps - 2 and short
        if solver_order == 1 or taken < 1 or last:
            orders.append(1)
        elif solver_order == 2 or taken < 2 or second_last:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _alpha_sigma(sigma: np.ndarray, flow_sigmas: bool) -> tuple:
    """The scheduler's (alpha_t, sigma_t) of each sigma: VP (alpha = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha) or
    flow matching (alpha = 1 - sigma, sigma_t = sigma)."""
    if flow_sigmas:
        return 1.0 - sigma, sigma
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _update(algorithm: str, solver_type: str, order: np.ndarray, h: np.ndarray, alpha_t: np.ndarray,
            sigma_t: np.ndarray, ratio: np.ndarray) -> tuple:
    """``(a, b0, b1, b2, n)`` per step: the weights of the sample, ``D0``, ``D1``, ``D2`` and the noise in the stock
    update of each step's order (``b1`` / ``b2`` unused where the order has no such term). ``ratio`` is
    ``sigma_t / sigma_s0`` for the ``++`` forms and ``alpha_t / alpha_s0`` otherwise. A final ``h = inf``
    (sigma_t = 0) takes the limits."""
    midpoint = (order == 2) & (solver_type == "midpoint")
    if algorithm in ("dpmsolver++", "sde-dpmsolver++"):
        sde = algorithm == "sde-dpmsolver++"
        g = 2.0 * h if sde else h  # the ODE form integrates over h, the SDE form over 2h
        e = -np.expm1(-g)  # 1 - exp(-g): 1 at g = inf
        a = ratio * np.exp(-h) if sde else ratio
        b0 = alpha_t * e
        b1 = np.where(midpoint, 0.5 * b0, alpha_t * (1.0 - e / g))
        # ODE: -alpha ((exp(-h) - 1 + h) / h^2 - 1/2); SDE: alpha ((1 - exp(-2h) - 2h) / (2h)^2 - 1/2); with
        # q = (g - e) / g^2 (-> 0 as g -> inf)
        q = np.where(np.isinf(g), 0.0, (g - e) / (g * g))
        b2 = -alpha_t * (0.5 + q) if sde else alpha_t * (0.5 - q)
        n = sigma_t * np.sqrt(e) if sde else np.zeros_like(h)
        return a, b0, b1, b2, n
    scale = 2.0 if algorithm == "sde-dpmsolver" else 1.0
    e = np.expm1(h)  # exp(h) - 1
    b0 = -scale * sigma_t * e
    b1 = np.where(midpoint, 0.5 * b0, -scale * sigma_t * (e / h - 1.0))
    b2 = -sigma_t * ((e - h) / (h * h) - 0.5)
    n = sigma_t * np.sqrt(np.expm1(2.0 * h)) if scale == 2.0 else np.zeros_like(h)
    return ratio, b0, b1, b2, n


def _weights(order: np.ndarray, b0, b1, b2, r0, r1) -> tuple:
    """The weights of ``m0, m1, m2`` in ``b0 D0 + b1 D1 + b2 D2`` with the stock divided differences
    (``D1 = (m0 - m1)/r0`` at the second order; at the third ``D1_0 = (m0 - m1)/r0``, ``D1_1 = (m1 - m2)/r1``,
    ``D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0 + r1)``); exactly 0 where the order
    has no such output."""
    k = (b1 * r0 + b2) / (r0 + r1)  # the weight of D1_0 - D1_1
    w0 = np.select([order == 1, order == 2], [b0, b0 + b1 / r0], b0 + b1 / r0 + k / r0)
    w1 = np.select([order == 1, order == 2], [0.0, -b1 / r0], -b1 / r0 - k * (1.0 / r0 + 1.0 / r1))
    w2 = np.where(order == 3, k / r1, 0.0)
    return w0, w1, w2


def _conversion(table: np.ndarray, col: SolverColumns, algorithm: str, prediction: str, thresholding: bool,
                sigma: np.ndarray, alpha_s: np.ndarray, sigma_s: np.ndarray) -> None:
    """The ``x0_*`` / ``m_*`` columns: the model output in the solver's form, as ``convert_model_output``."""
    # flow_prediction scales by the raw sigma, as the stock conversion reads it
    x0 = x0_columns(prediction, alpha_s, sigma_s, sigma)
    if algorithm in ("dpmsolver++", "sde-dpmsolver++"):
        table[:, col.x0_sample], table[:, col.x0_output] = x0
        table[:, col.m_x0] = 1.0
    elif thresholding:
        # the noise prediction back from the thresholded x0: eps = (x - alpha x0) / sigma
        table[:, col.x0_sample], table[:, col.x0_output] = x0
        table[:, col.m_sample], table[:, col.m_x0] = 1.0 / sigma_s, -alpha_s / sigma_s
    else:
        table[:, col.m_sample], table[:, col.m_x0], table[:, col.m_output] = epsilon_columns(
            prediction, alpha_s, sigma_s)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")


def dpm_solver_table(
    sigmas, *, algorithm_type: str = "dpmsolver++", solver_order: int = 2, solver_type: str = "midpoint",
    prediction_type: str = "epsilon", thresholding: bool = False, lower_order_final: bool = True,
    euler_at_final: bool = False, final_sigmas_type: str = "zero", flow_sigmas: bool = False, begin_index: int = 0
) -> np.ndarray:
    """The `solver_step` coefficient table of ``DPMSolverMultistepScheduler`` on the sigma table ``sigmas`` (the
    scheduler's ``sigmas`` after ``set_timesteps``: ``steps + 1`` values, the last one the final sigma): a float64
    array of shape ``(steps, SolverColumns(dpm_solver_slots(solver_order)).width)``, row ``i`` the step from
    ``sigmas[i]`` to ``sigmas[i + 1]`` at the order `dpm_solver_orders` gives it.

    Options as the scheduler's config: ``flow_sigmas`` is ``use_flow_sigmas`` (alpha = 1 - sigma); Karras /
    exponential / beta / Lu sigmas, timestep spacing and shifts only change ``sigmas``. ``thresholding`` makes the
    row compute an x0 to threshold (pass the step's ``threshold_ratio`` / ``threshold_max``); the ``++`` forms
    always do. ``begin_index``: the first step of the loop, where the warm-up starts."""
    _check("algorithm_type", algorithm_type, ALGORITHMS)
    _check("solver_type", solver_type, _SOLVER_TYPES)
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    _check("final_sigmas_type", final_sigmas_type, _FINAL_SIGMAS)
    if type(solver_order) is not int or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order: expected 1, 2 or 3, got {solver_order!r}")
    if prediction_type == "flow_prediction" and algorithm_type in ("dpmsolver", "sde-dpmsolver"):
        raise ValueError(f"prediction_type: 'flow_prediction' needs a DPM-Solver++ algorithm_type, got "
                         f"{algorithm_type!r}")
    if type(begin_index) is not int or begin_index < 0:
        raise ValueError(f"begin_index: expected an int >= 0, got {begin_index!r}")
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().to("cpu", torch.float64).reshape(-1).numpy()
    values = np.array(sigmas, dtype=np.float64).reshape(-1)
    if values.shape[0] < 2:
        raise ValueError(f"sigmas: expected at least 2 sigmas (steps + 1), got {values.shape[0]}")
    bad = ~(np.isfinite(values) & (values >= 0.0))
    if bad.any():
        raise ValueError(f"sigmas: expected finite sigmas >= 0, got {float(values[bad][0])!r} at index "
                         f"{int(np.flatnonzero(bad)[0])}")
    steps = len(values) - 1
    orders = dpm_solver_orders(steps, solver_order=solver_order, lower_order_final=lower_order_final,
                               euler_at_final=euler_at_final, final_sigmas_type=final_sigmas_type,
                               begin_index=begin_index)
    if algorithm_type == "sde-dpmsolver" and 3 in orders:
        raise ValueError("algorithm_type: 'sde-dpmsolver' has no third-order step (solver_order 3 reaches one)")
    col = SolverColumns(dpm_solver_slots(solver_order))
    # IEEE float64 throughout: a repeated sigma (h = 0) gives the stock step's infinities and NaNs, not an error
    with np.errstate(all="ignore"):
        return _table(values, np.array(orders), col, algorithm_type, solver_type, prediction_type, thresholding,
                      flow_sigmas)


def dpm_solver_coefficients(sigmas, **options) -> torch.Tensor:
    """`dpm_solver_table` as a float64 CPU tensor (what `solver_step` takes, after ``.to(device)``)."""
    return torch.from_numpy(dpm_solver_table(sigmas, **options))


def _table(values, orders, col, algorithm_type, solver_type, prediction_type, thresholding, flow_sigmas):
    alphas, sigma_ts = _alpha_sigma(values, flow_sigmas)
    lambdas = np.log(alphas) - np.log(sigma_ts)  # +inf at sigma = 0
    plus = algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    steps = len(orders)
    table = np.zeros((steps, col.width))
    s0, t = slice(0, steps), slice(1, steps + 1)
    _conversion(table, col, algorithm_type, prediction_type, thresholding, values[s0], alphas[s0], sigma_ts[s0])
    h = lambdas[t] - lambdas[s0]
    back = np.concatenate([[np.nan, np.nan], lambdas])  # lambda of the sigma 1 and 2 steps before each step
    r0 = (lambdas[s0] - back[1:steps + 1]) / h
    r1 = (back[1:steps + 1] - back[0:steps]) / h
    ratio = sigma_ts[t] / sigma_ts[s0] if plus else alphas[t] / alphas[s0]
    a, b0, b1, b2, n = _update(algorithm_type, solver_type, orders, h, alphas[t], sigma_ts[t], ratio)
    w0, w1, w2 = _weights(orders, b0, b1, b2, r0, r1)
    table[:, col.c_sample] = 1.0  # x_c is the sample (no corrector)
    table[:, col.p_xc], table[:, col.p_m], table[:, col.p_noise] = a, w0, n
    if col.slots >= 1:
        table[:, col.p_hist] = w1
    if col.slots >= 2:
        table[:, col.p_hist + 1] = w2
    return table
