"""The reference of the sigma-table samplers: flow matching (SD3 / Flux / Wan), Euler and Euler ancestral on a
sigma table, and the multistep solvers' affine step (DPM-Solver(++), UniPC, LCM). Part of the specification in
``ddpm_kernels.reference``, which re-exports every function here; same rules (validated arguments, float32 math
for half and float32 data, float64 for float64, one rounding at the end)."""

from __future__ import annotations

import math

import torch

from ._spec import SolverColumns
from .reference import _draw_noise, _dynamic_threshold, _store, compute_dtype, guided_output


# ------------------------------------------------------------------------------------------ flow matching
# Rectified flow (SD3 / Flux / Wan): x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0.
# Sigmas are ``ddpm_kernels._spec.SigmaOperand``s: ``full`` is the compute-dtype sigma broadcastable to the data.
def flow_interpolate_ref(x0, noise, sigma, out=None):
    """The forward process: ``(1 - sigma) x0 + sigma noise``."""
    cd = compute_dtype(x0.dtype)
    s = sigma.full.to(cd)
    return _store((1 - s) * x0.to(cd) + s * noise.to(cd), x0, out)


def _gather_sigmas(sigmas, step_index, ndim, cd):
    """``(sigmas[i], sigmas[i + 1])`` shaped (B, 1, ..., 1); an index outside [0, len - 1) gives NaN."""
    n = sigmas.shape[0]
    ok = (step_index >= 0) & (step_index < n - 1)
    i = step_index.clamp(0, max(n - 2, 0))
    pair = torch.stack((sigmas.index_select(0, i), sigmas.index_select(0, i + 1))).to(cd)
    pair = torch.where(ok, pair, torch.full_like(pair, float("nan")))
    shape = (step_index.shape[0],) + (1,) * (ndim - 1)
    return pair[0].reshape(shape), pair[1].reshape(shape)


def flow_step_ref(sample, model_output, uncond, guidance, sigmas, step_index, sigma, sigma_next, opts,
                  noise=None, generator=None, out=None, sample_offset=0):
    """One flow-matching Euler step (``opts`` a ``ddpm_kernels._spec.FlowStepOptions``): with ``v`` the model
    output (guided: `guided_output` of ``model_output`` as the conditional and ``uncond``),

        deterministic   x' = x + (sigma_next - sigma) v
        stochastic      x0 = x - sigma v;   x' = (1 - sigma_next) x0 + sigma_next z

    ``sigma``/``sigma_next`` are gathered from the table ``sigmas`` by ``step_index`` (per sample), or given
    (``SigmaOperand``s, per sample or per token) when ``sigmas`` is None. ``z`` is ``noise``, else drawn from
    ``generator`` (only when stochastic), samples ``sample_offset ..`` of the noise stream."""
    cd = compute_dtype(sample.dtype)
    if opts.guided:
        v = guided_output(model_output, uncond, guidance, opts.guidance_rescale, cd)
    else:
        v = model_output.to(cd)
    if sigmas is not None:
        s, s_next = _gather_sigmas(sigmas, step_index, sample.ndim, cd)
    else:
        s, s_next = sigma.full.to(cd), sigma_next.full.to(cd)
    x = sample.to(cd)
    if opts.stochastic:
        if noise is None:
            noise = _draw_noise(sample, generator, cd, sample_offset)
        prev = (1 - s_next) * (x - s * v) + s_next * noise.to(cd)
    else:
        prev = x + (s_next - s) * v
    return _store(prev, sample, out)


# ------------------------------------------------------------------------------------ Euler on a sigma table
# diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: the sample lives in Karras et al.'s sigma
# space (x = x0 + sigma eps); sigma = sigmas[i], sigma' = sigmas[i + 1] per sample.
def _euler_x0(x, v, sigma, sigma_hat, parameterization):
    """The x0 prediction and the ODE derivative (x - x0) / sigma_hat (for eps exactly the model output)."""
    if parameterization == "eps":
        return x - sigma_hat * v, v
    if parameterization == "x0":
        x0 = v
    else:  # "v": diffusers' c_out / c_skip at sigma (not sigma_hat)
        x0 = v * (-sigma / torch.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return x0, (x - x0) / sigma_hat


def euler_step_ref(sample, model_output, uncond, guidance, sigmas, step_index, opts, noise=None, generator=None,
                   out=None, sample_offset=0):
    """One step of the Euler family (``opts`` a ``ddpm_kernels._spec.EulerStepOptions``); the public
    ``euler_step`` / ``euler_ancestral_step`` document the math. ``x'`` in ``sample``'s dtype, or ``(x', x0)``
    with ``opts.return_pred_x0``."""
    cd = compute_dtype(sample.dtype)
    v = guided_output(model_output, uncond, guidance, opts.guidance_rescale, cd) if opts.guided else \
        model_output.to(cd)
    s, s_next = _gather_sigmas(sigmas, step_index, sample.ndim, cd)
    x = sample.to(cd)
    if opts.adds_noise and noise is None:
        noise = _draw_noise(sample, generator, cd, sample_offset)
    if opts.sampler == "euler":
        steps = sigmas.shape[0] - 1
        churn = min(opts.s_churn / steps, 2 ** 0.5 - 1)
        gamma = ((opts.s_tmin <= s) & (s <= opts.s_tmax)).to(cd) * churn
        s_hat = s * (gamma + 1)
        if opts.s_churn > 0:
            x = x + noise.to(cd) * opts.s_noise * torch.sqrt(s_hat * s_hat - s * s)
        x0, derivative = _euler_x0(x, v, s, s_hat, opts.parameterization)
        prev = x + derivative * (s_next - s_hat)
    else:  # "euler_ancestral"
        s_up = torch.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
        s_down = torch.sqrt(s_next * s_next - s_up * s_up)
        x0, derivative = _euler_x0(x, v, s, s, opts.parameterization)
        prev = x + derivative * (s_down - s) + noise.to(cd) * s_up
    result = _store(prev, sample, out)
    return (result, x0.to(sample.dtype)) if opts.return_pred_x0 else result


# --------------------------------------------------------------------------------------- multistep solvers
# DPM-Solver(++), UniPC, LCM, ...: per sample an affine combination whose coefficients are one row of a table
# built per schedule (``ddpm_kernels._spec.SolverColumns`` names the columns), gathered by the step index.
def _term(c, tensor):
    """``c * tensor``, exactly 0 where ``c`` is 0 whatever ``tensor`` holds (NaN, inf, an unwritten slot)."""
    return torch.where(c != 0, c * tensor, torch.zeros((), dtype=c.dtype, device=c.device))


def solver_step_ref(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample, opts,
                    noise=None, generator=None, out=None, sample_offset=0):
    """One multistep-solver step (``opts`` a ``ddpm_kernels._spec.SolverStepOptions``): row
    ``coefficients[step_index[b]]`` of sample ``b`` (NaN for an index outside the table) combines the sample,
    the model output (guided: `guided_output` with ``uncond``), the history ring ``history`` ((H, *sample.shape):
    entry ``j`` steps back is slot ``(step_index - j) % H``), the last-sample buffer and the noise as
    ``SolverColumns`` documents, in that order of operations. Writes the converted output into slot
    ``step_index % H`` of ``history`` and ``x_c`` into ``last_sample`` (both after every read), and returns
    ``x'`` in ``sample``'s dtype (into ``out`` when given). ``z`` is ``noise``, else drawn from ``generator``
    (only with ``opts.stochastic``), samples ``sample_offset ..`` of the noise stream."""
    cd = compute_dtype(sample.dtype)
    batch, ndim = sample.shape[0], sample.ndim
    slots = 0 if history is None else history.shape[0]
    col = SolverColumns(slots)
    n = coefficients.shape[0]
    ok = (step_index >= 0) & (step_index < n)
    rows = coefficients.index_select(0, step_index.clamp(0, max(n - 1, 0))).to(cd)
    rows = torch.where(ok[:, None], rows, torch.full_like(rows, float("nan")))
    rows = rows.reshape((batch, col.width) + (1,) * (ndim - 1))

    def c(k):
        return rows[:, k]

    y = guided_output(model_output, uncond, guidance, opts.guidance_rescale, cd) if opts.guided else \
        model_output.to(cd)
    x = sample.to(cd)
    x0 = _term(c(col.x0_sample), x) + _term(c(col.x0_output), y)
    if opts.threshold_ratio is not None:
        x0 = _dynamic_threshold(x0, opts.threshold_ratio, opts.threshold_max)
    elif opts.clip_range is not None:
        x0 = x0.clamp(-opts.clip_range, opts.clip_range)
    m = _term(c(col.m_sample), x) + _term(c(col.m_x0), x0) + _term(c(col.m_output), y)
    past = []
    if slots:
        rows_b = torch.arange(batch, device=sample.device)
        for j in range(1, slots + 1):
            past.append(history[torch.remainder(step_index - j, slots), rows_b].to(cd))
    x_c = _term(c(col.c_sample), x)
    if last_sample is not None:
        x_c = x_c + _term(c(col.c_last), last_sample.to(cd))
    x_c = x_c + _term(c(col.c_m), m)
    for j, h in enumerate(past):
        x_c = x_c + _term(c(col.c_hist + j), h)
    prev = _term(c(col.p_xc), x_c) + _term(c(col.p_m), m)
    for j, h in enumerate(past):
        prev = prev + _term(c(col.p_hist + j), h)
    if opts.stochastic:
        z = _draw_noise(sample, generator, cd, sample_offset) if noise is None else noise.to(cd)
        prev = prev + _term(c(col.p_noise), z)
    if slots:
        history[torch.remainder(step_index, slots), torch.arange(batch, device=sample.device)] = m.to(history.dtype)
    if last_sample is not None:
        last_sample.copy_(x_c)
    return _store(prev, sample, out)


def flow_loss_weight(sigma, weighting):
    """SD3's per-sample loss weighting (diffusers' ``compute_loss_weighting_for_sd3``): ``none`` 1,
    ``sigma_sqrt`` sigma^-2, ``cosmap`` 2 / (pi (1 - 2 sigma + 2 sigma^2))."""
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma * sigma))
    return torch.ones_like(sigma)


def flow_loss_ref(model_output, x0, noise, sigma, weighting="none", loss_type="l2"):
    """The rectified-flow training loss: the target ``noise - x0``, each element's l2 (or l1) error weighted by
    `flow_loss_weight` of its sigma, the mean over each sample's non-batch elements, then over the batch (SD3 /
    Flux training scripts). A 0-d tensor in float32 (float64 for float64 data), as those scripts' ``.float()``
    loss."""
    cd = compute_dtype(model_output.dtype)
    diff = model_output.to(cd) - (noise.to(cd) - x0.to(cd))
    per_elem = diff.abs() if loss_type == "l1" else diff * diff
    per_elem = flow_loss_weight(sigma.full.to(cd), weighting) * per_elem
    batch = per_elem.shape[0]
    return per_elem.reshape(batch, math.prod(per_elem.shape[1:])).mean(dim=1).mean()
