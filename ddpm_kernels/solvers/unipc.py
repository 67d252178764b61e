"""UniPC (Zhao et al. 2023) as a `solver_step` coefficient table: diffusers' ``UniPCMultistepScheduler`` (the
B(h) predictor UniP and corrector UniC, ``bh1`` / ``bh2``, any order with the warm-up and ``lower_order_final``,
``disable_corrector``, the data (x0) or noise (epsilon) form, every prediction type) on the scheduler's own
sigmas, built once per schedule in float64.

Step ``i`` of the table, with ``m`` the converted model output at ``sigmas[i]``, ``h_j`` the one of ``j`` steps
back (the history ring, ``solver_order`` slots) and ``l`` the last sample (the sample before the previous
predictor, the ``last_sample`` buffer):

* the corrector UniC (after the first step, unless ``i - 1`` is in ``disable_corrector``) replaces the sample
  by ``x_c = c_last l + c_m m + sum_j c_hist[j] h_j``: the previous step redone from ``sigmas[i - 1]`` to
  ``sigmas[i]`` with ``m`` as a new node;
* the predictor UniP gives ``x' = p_xc x_c + p_m m + sum_j p_hist[j] h_j`` at ``sigmas[i + 1]``.

The per-step linear solves for the rhos run here, once per row, in float64 (batched over the rows of one
order). Where diffusers' float32 arithmetic has no finite value — a zero final sigma makes ``lambda = inf`` —
the row holds the limit: see docs/design.md, "Multistep solvers", "UniPC".
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .._spec import SolverColumns
from ._columns import epsilon_columns, x0_columns

__all__ = ["unipc_coefficients", "unipc_orders"]

SOLVER_TYPES = ("bh1", "bh2")


def _alpha_sigma(sigma: float, flow: bool):
    """diffusers' ``_sigma_to_alpha_sigma_t``: the point ``x = alpha x0 + sigma_t eps`` of a scheduler sigma."""
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _log_snr(alpha: float, sigma: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sigma))


def unipc_orders(steps: int, solver_order: int, lower_order_final: bool, begin_index: int = 0) -> list:
    """The predictor's order at each step from ``begin_index`` on, as diffusers chooses it: the warm-up (one more
    per step until ``solver_order``) and, with ``lower_order_final``, at most the number of steps left."""
    orders = []
    for i in range(begin_index, steps):
        order = min(solver_order, steps - i) if lower_order_final else solver_order
        orders.append(min(order, i - begin_index + 1))
    return orders


def _final_update(point_t, point_s, lambdas, order, predict_x0):
    """`_update`'s h -> inf limit (``sigma_t = 0``, ``lambda_t = inf``), where it exists; see docs/design.md,
    "UniPC". First order: the data form gives ``x_t = alpha_t m0`` (``e^-h = 0``); the noise form's
    ``sigma_t (e^h - 1) -> E = alpha_t sigma_s / alpha_s`` (as ``sigma_t e^h = E``), DDIM's step to sigma 0.
    The noise form's solved orders (3 and up) keep their history terms: ``sigma_t B_h rho_k / r_k ->
    E / delta_k sum_i (W^-1)_ki i!`` with ``delta_k = lambda_k - lambda_s`` and ``W_ij = delta_j^(i-1)``
    (the Vandermonde matrix of the nodes before the ``1/h`` scaling), whatever B(h). The data form's higher
    orders, and the noise form's order 2 with its fixed rho = 1/2 and ``bh2``, grow without bound with h (a
    polynomial in lambda extrapolated to lambda = inf): no limit, and the step is the first-order one, which
    is also the noise form's order-2 ``bh1`` limit (its term vanishes)."""
    alpha_t, sigma_t, _ = point_t
    alpha_s, sigma_s, lambda_s = point_s
    if predict_x0:
        return sigma_t / sigma_s, alpha_t, [0.0] * (order - 1), 0.0
    extrapolated = alpha_t * sigma_s / alpha_s
    past = [0.0] * (order - 1)
    if order >= 3:
        deltas = np.array([lam - lambda_s for lam in lambdas])
        W = np.stack([deltas**i for i in range(order - 1)])
        factorials = np.cumprod(np.arange(1.0, order))  # 1!, 2!, ..., (order - 1)!
        past = list(-extrapolated * np.linalg.solve(W, factorials) / deltas)
    return alpha_t / alpha_s, -extrapolated - sum(past), past, 0.0


def _update(point_t, point_s, lambdas, order, predict_x0, solver_type, corrector):
    """`_update_distinct` on the earlier nodes whose log-SNR differs from ``point_s``'s and from each other's (a
    repeated sigma repeats a node: its divided difference is 0 / 0), the order lowered by the nodes left out;
    their coefficients are 0."""
    keep, seen = [], {point_s[2]}
    for k, lam in enumerate(lambdas):
        if lam not in seen:
            keep.append(k)
            seen.add(lam)
    x_coef, m0, past, m_t = _update_distinct(point_t, point_s, [lambdas[k] for k in keep], 1 + len(keep),
                                             predict_x0, solver_type, corrector)
    scattered = [0.0] * len(lambdas)
    for k, coef in zip(keep, past):
        scattered[k] = coef
    return x_coef, m0, scattered, m_t


def _update_distinct(point_t, point_s, lambdas, order, predict_x0, solver_type, corrector):
    """One UniP / UniC update from ``point_s`` to ``point_t`` (each ``(alpha, sigma_t, lambda)``) with earlier
    nodes at log-SNRs ``lambdas`` (1 back, 2 back, ...; ``order - 1`` of them) as coefficients:
    ``(x, m0, [m_k for each earlier node], m_t)`` of ``x_t = x_coef x + m0_coef m0 + sum_k m_k h_k + mt_coef m_t``
    where ``m0`` is the output at ``point_s`` and ``m_t`` the new one at ``point_t`` (corrector only). The
    limits first (a zero final sigma, a repeated sigma), then `_update_rows` on this one row."""
    if point_t[1] == 0.0 and not corrector:
        return _final_update(point_t, point_s, lambdas, order, predict_x0)
    if point_t[2] - point_s[2] == 0.0:
        # a repeated sigma (duplicate timesteps): no time passes, the update is the identity (every h -> 0 limit)
        x_coef = point_t[1] / point_s[1] if predict_x0 else point_t[0] / point_s[0]
        return x_coef, 0.0, [0.0] * (order - 1), 0.0
    rows = _update_rows(*(np.array([v]) for v in point_t + point_s), np.array([lambdas]).reshape(1, order - 1),
                        predict_x0, solver_type, corrector)
    return float(rows[0][0]), float(rows[1][0]), rows[2][0].tolist(), float(rows[3][0])


def _update_rows(alpha_t, sigma_t, lambda_t, alpha_s, sigma_s, lambda_s, lambdas, predict_x0, solver_type,
                 corrector):
    """`_update_distinct` for ``n`` rows at once, each argument an (n,) array and ``lambdas`` (n, order - 1), on
    rows without a limit (``h != 0``; ``sigma_t > 0`` for the predictor; distinct nodes): ``(x_coef, m0, past,
    m_t)``, ``past`` (n, order - 1). One batched linear solve for all rows."""
    n, order = lambdas.shape[0], lambdas.shape[1] + 1
    if predict_x0:
        scale, x_coef = alpha_t, sigma_t / sigma_s
    else:
        scale, x_coef = sigma_t, alpha_t / alpha_s
    h = lambda_t - lambda_s
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    base = -scale * h_phi_1
    n_solve = order if corrector else order - 1
    if n_solve == 0:
        return x_coef, base, np.zeros((n, 0)), np.zeros(n)
    rks = np.concatenate([(lambdas - lambda_s[:, None]) / h[:, None], np.ones((n, 1))], axis=1)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1.0
    R, b = [], []
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.stack(R, axis=1), np.stack(b, axis=1)  # R[:, i, j] = r_j^i
    if corrector:
        rhos = np.full((n, 1), 0.5) if order == 1 else np.linalg.solve(R, b[..., None])[..., 0]
    else:
        rhos = np.full((n, 1), 0.5) if order == 2 else np.linalg.solve(R[:, :-1, :-1], b[:, :-1, None])[..., 0]
    weight = scale * b_h
    # D_k = (m_k - m0) / r_k enters as -weight * rho_k * D_k; the corrector's D_t = m_t - m0 as -weight rho_last D_t
    past = -weight[:, None] * rhos[:, : order - 1] / rks[:, : order - 1]
    m_t = -weight * rhos[:, -1] if corrector else np.zeros(n)
    total = np.zeros(n)
    for k in range(order - 1):  # summed term by term, in order
        total = total + past[:, k]
    return x_coef, base - total - m_t, past, m_t


def _solve_updates(updates, points, predict_x0, solver_type):
    """The coefficients of ``updates`` ((row, t, s, order, corrector) each: from point ``s`` to point ``t`` with
    the ``order - 1`` points before ``s`` as earlier nodes), as ``(rows, x_coef, m0, past, m_t, corrector)``
    groups: the rows without a limit or a repeated node in one `_update_rows` per (order, corrector), the
    others one at a time (`_update`)."""
    lam = [p[2] for p in points]
    groups = {}
    for row, t, s, order, corrector in updates:
        nodes = [lam[s - k] for k in range(1, order)]
        regular = (corrector or points[t][1] != 0.0) and lam[t] - lam[s] != 0.0 and len(set(nodes + [lam[s]])) == order
        if regular:
            groups.setdefault((order, corrector), []).append((row, t, s))
            continue
        x_coef, m0, past, m_t = _update(points[t], points[s], nodes, order, predict_x0, solver_type, corrector)
        yield [row], x_coef, m0, np.array([past]).reshape(1, order - 1), m_t, corrector
    for (order, corrector), members in groups.items():
        rows, ts, ss = (np.array(v) for v in zip(*members))
        at, st, lt = (np.array([points[t][j] for t in ts]) for j in range(3))
        as_, ss_, ls = (np.array([points[s][j] for s in ss]) for j in range(3))
        nodes = np.array([[lam[s - k] for k in range(1, order)] for s in ss]).reshape(len(ss), order - 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate schedule's rows hold inf / NaN
            x_coef, m0, past, m_t = _update_rows(at, st, lt, as_, ss_, ls, nodes, predict_x0, solver_type,
                                                 corrector)
        yield rows, x_coef, m0, past, m_t, corrector


def unipc_coefficients(
    sigmas: Sequence[float], *, solver_order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
    prediction_type: str = "epsilon", lower_order_final: bool = True, disable_corrector: Iterable[int] = (),
    flow_sigmas: bool = False, begin_index: int = 0
) -> np.ndarray:
    """The float64 `solver_step` table of UniPC on the scheduler sigmas ``sigmas`` (``N + 1`` of them, the last
    the final sigma), ``N`` rows of ``SolverColumns(solver_order).width``: row ``i`` is step ``i`` of a loop that
    starts at ``begin_index`` (the warm-up counts from there; earlier rows are NaN). The options are diffusers'
    ``UniPCMultistepScheduler`` config; ``flow_sigmas``: the sigmas are rectified-flow sigmas (``alpha = 1 -
    sigma``) rather than variance-exploding ones (``alpha = 1 / sqrt(sigma^2 + 1)``). The sample and model
    output go in as they are (no input scaling); run with ``history`` of ``solver_order`` slots and a
    ``last_sample`` buffer, and dynamic thresholding in the data form when the scheduler thresholds."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    steps = sigmas.shape[0] - 1
    if sigmas.ndim != 1 or steps < 1:
        raise ValueError(f"sigmas: expected a 1-D sequence of at least 2 sigmas, got shape {sigmas.shape}")
    if not (isinstance(solver_order, (int, np.integer)) and solver_order >= 1):
        raise ValueError(f"solver_order: expected an int >= 1, got {solver_order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {', '.join(SOLVER_TYPES)}, got {solver_type!r}")
    if not (isinstance(begin_index, (int, np.integer)) and 0 <= begin_index < steps):
        raise ValueError(f"begin_index: expected an int in [0, {steps}), got {begin_index!r}")
    if not predict_x0 and epsilon_columns(prediction_type, 1.0, 1.0) is None:
        raise ValueError(f"prediction_type: {prediction_type!r} needs predict_x0=True (the data form)")
    disabled = set(disable_corrector)
    col = SolverColumns(solver_order)
    points = [_alpha_sigma(s, flow_sigmas) for s in sigmas.tolist()]
    points = [(a, s, _log_snr(a, s)) for a, s in points]
    table = np.full((steps, col.width), np.nan)
    orders = unipc_orders(steps, solver_order, lower_order_final, begin_index)
    # the updates, as (row, point t, point s, order, corrector); a row's corrector redoes step i - 1 to sigma_i
    updates = []
    for i in range(begin_index, steps):
        table[i] = 0.0
        alpha, sigma, _ = points[i]
        if predict_x0:
            table[i, col.x0_sample], table[i, col.x0_output] = x0_columns(prediction_type, alpha, sigma, sigmas[i])
            table[i, col.m_x0] = 1.0
        else:
            table[i, col.m_sample], table[i, col.m_x0], table[i, col.m_output] = epsilon_columns(
                prediction_type, alpha, sigma)
        if i > begin_index and i - 1 not in disabled:
            updates.append((i, i, i - 1, orders[i - 1 - begin_index], True))
        else:
            table[i, col.c_sample] = 1.0
        updates.append((i, i + 1, i, orders[i - begin_index], False))
    for rows, x_coef, m0, past, m_t, corrector in _solve_updates(updates, points, predict_x0, solver_type):
        if corrector:
            table[rows, col.c_last], table[rows, col.c_m], table[rows, col.c_hist] = x_coef, m_t, m0
            table[rows, col.c_hist + 1: col.c_hist + 1 + past.shape[1]] = past
        else:
            table[rows, col.p_xc], table[rows, col.p_m] = x_coef, m0
            table[rows, col.p_hist: col.p_hist + past.shape[1]] = past
    return table
