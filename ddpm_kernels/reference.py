"""Plain PyTorch form of every op: the specification the fused backends are tested against, and the fallback.

Each function takes already-validated arguments (see ``ddpm_kernels.ops``), computes in float32 for
float16/bfloat16/float32 inputs and in float64 for float64 inputs, and rounds once to the input dtype at the
end. Coefficients are gathered on the tensors' device from the schedule's packed table by the per-sample
``t``; an out-of-range ``t`` yields NaN coefficients instead of an out-of-bounds read.

The formulas are CompVis ``ldm/models/diffusion/ddpm.py`` (DDPM, Ho et al. 2020):

    q_sample             x_t  = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    predict_start        x_0  = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps
    q_posterior          mean = coef1_t x_0 + coef2_t x_t, var_t, log(max(var_t, 1e-20))
    p_sample             x_{t-1} = mean + [t > 0] exp(0.5 log_var_t) z
    v                    v    = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .schedule import TABLE_ROW, DiffusionSchedule

__all__ = [
    "compute_dtype",
    "extract",
    "q_sample_ref",
    "predict_start_from_noise_ref",
    "predict_noise_from_start_ref",
    "get_v_ref",
    "predict_start_from_z_and_v_ref",
    "predict_eps_from_z_and_v_ref",
    "q_posterior_ref",
    "p_mean_variance_ref",
    "p_sample_ref",
    "diffusion_loss_ref",
    "OPS",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 data; float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def extract(
    schedule: DiffusionSchedule, names: Sequence[str], t: torch.Tensor, ndim: int, dtype: torch.dtype
) -> Tuple[torch.Tensor, ...]:
    """Gather table rows ``names`` at ``t``, each shaped ``(B, 1, ..., 1)`` with ``ndim`` dims.

    One gather for all rows; out-of-range ``t`` gives NaN (never an out-of-bounds read, which on CUDA would
    be a device-side assert that kills the process).
    """
    table = schedule.table(dtype)
    T = table.shape[1]
    # index_select with a device index and basic row indexing: no host-built index tensor, so no
    # host-to-device copy and nothing a CUDA graph capture would reject.
    cols = table.index_select(1, t.clamp(0, T - 1))
    cols = torch.where((t >= 0) & (t < T), cols, torch.full_like(cols, float("nan")))
    shape = (t.shape[0],) + (1,) * (ndim - 1)
    return tuple(cols[TABLE_ROW[n]].reshape(shape) for n in names)


def _store(result: torch.Tensor, like: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if out is None:
        return result.to(like.dtype)
    out.copy_(result)
    return out


def q_sample_ref(x_start, t, noise, schedule, out=None):
    cd = compute_dtype(x_start.dtype)
    a, b = extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, x_start.ndim, cd)
    return _store(a * x_start.to(cd) + b * noise.to(cd), x_start, out)


def predict_start_from_noise_ref(x_t, t, noise, schedule):
    cd = compute_dtype(x_t.dtype)
    a, b = extract(schedule, ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"), t, x_t.ndim, cd)
    return _store(a * x_t.to(cd) - b * noise.to(cd), x_t)


def predict_noise_from_start_ref(x_t, t, x0, schedule):
    cd = compute_dtype(x_t.dtype)
    a, b = extract(schedule, ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"), t, x_t.ndim, cd)
    return _store((a * x_t.to(cd) - x0.to(cd)) / b, x_t)


def _v(x_start, noise, t, schedule, cd):
    a, b = extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, x_start.ndim, cd)
    return a * noise.to(cd) - b * x_start.to(cd)


def get_v_ref(x_start, noise, t, schedule):
    return _store(_v(x_start, noise, t, schedule, compute_dtype(x_start.dtype)), x_start)


def _x0_from_v(x_t, t, v, schedule, cd):
    a, b = extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, x_t.ndim, cd)
    return a * x_t.to(cd) - b * v.to(cd)


def predict_start_from_z_and_v_ref(x_t, t, v, schedule):
    return _store(_x0_from_v(x_t, t, v, schedule, compute_dtype(x_t.dtype)), x_t)


def predict_eps_from_z_and_v_ref(x_t, t, v, schedule):
    cd = compute_dtype(x_t.dtype)
    a, b = extract(schedule, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, x_t.ndim, cd)
    return _store(a * v.to(cd) + b * x_t.to(cd), x_t)


def _posterior(x_start, x_t, t, schedule, cd):
    c1, c2, var, log_var = extract(
        schedule,
        ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "posterior_log_variance_clipped"),
        t,
        x_t.ndim,
        cd,
    )
    return c1 * x_start.to(cd) + c2 * x_t.to(cd), var, log_var


def q_posterior_ref(x_start, x_t, t, schedule):
    """(mean, variance, log_variance); the last two float32 (float64 for float64 data), shaped (B,1,...,1)."""
    mean, var, log_var = _posterior(x_start, x_t, t, schedule, compute_dtype(x_t.dtype))
    return mean.to(x_t.dtype), var, log_var


def _x0_pred(x_t, t, model_output, schedule, parameterization, clip_denoised, cd):
    if parameterization == "eps":
        a, b = extract(schedule, ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"), t, x_t.ndim, cd)
        x0 = a * x_t.to(cd) - b * model_output.to(cd)
    elif parameterization == "x0":
        x0 = model_output.to(cd)
    else:  # "v"
        x0 = _x0_from_v(x_t, t, model_output, schedule, cd)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    return x0


def p_mean_variance_ref(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    cd = compute_dtype(x_t.dtype)
    x0 = _x0_pred(x_t, t, model_output, schedule, parameterization, clip_denoised, cd)
    mean, var, log_var = _posterior(x0, x_t, t, schedule, cd)
    return mean.to(x_t.dtype), var, log_var


def p_sample_ref(
    x_t,
    t,
    model_output,
    schedule,
    parameterization="eps",
    clip_denoised=True,
    noise=None,
    generator=None,
    out=None,
):
    cd = compute_dtype(x_t.dtype)
    x0 = _x0_pred(x_t, t, model_output, schedule, parameterization, clip_denoised, cd)
    mean, _, log_var = _posterior(x0, x_t, t, schedule, cd)
    if noise is None:
        # The seed's noise_like: a standard normal of x's shape (float32; float64 for float64 data).
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=cd)
    nonzero_mask = (t != 0).to(cd).reshape((t.shape[0],) + (1,) * (x_t.ndim - 1))
    return _store(mean + nonzero_mask * torch.exp(0.5 * log_var) * noise.to(cd), x_t, out)


def diffusion_loss_ref(
    model_output,
    x_start,
    noise,
    t,
    schedule,
    parameterization="eps",
    loss_type="l2",
    l_simple_weight=1.0,
    original_elbo_weight=0.0,
):
    """The seed's ``p_losses`` after the model call: ``(loss, loss_simple, loss_vlb)``.

    ``loss_simple`` is the unweighted mean (what the seed logs as ``loss_simple``); ``loss`` is
    ``l_simple_weight * loss_simple + original_elbo_weight * loss_vlb``. The per-sample loss is the mean over
    every non-batch dim.
    """
    cd = compute_dtype(model_output.dtype)
    if parameterization == "eps":
        target = noise.to(cd)
    elif parameterization == "x0":
        target = x_start.to(cd)
    else:  # "v"
        target = _v(x_start, noise, t, schedule, cd)
    diff = model_output.to(cd) - target
    per_elem = diff.abs() if loss_type == "l1" else diff * diff
    per_sample = per_elem.reshape(per_elem.shape[0], -1).mean(dim=1)
    (w,) = extract(schedule, ("lvlb_weights_" + parameterization,), t, 1, cd)
    loss_simple = per_sample.mean()
    loss_vlb = (w * per_sample).mean()
    loss = l_simple_weight * loss_simple + original_elbo_weight * loss_vlb
    dt = model_output.dtype
    return loss.to(dt), loss_simple.to(dt), loss_vlb.to(dt)


# Backend table: the public dispatch looks ops up here by name (see ddpm_kernels.backends).
OPS = {
    "q_sample": q_sample_ref,
    "predict_start_from_noise": predict_start_from_noise_ref,
    "predict_noise_from_start": predict_noise_from_start_ref,
    "get_v": get_v_ref,
    "predict_start_from_z_and_v": predict_start_from_z_and_v_ref,
    "predict_eps_from_z_and_v": predict_eps_from_z_and_v_ref,
    "q_posterior": q_posterior_ref,
    "p_mean_variance": p_mean_variance_ref,
    "p_sample": p_sample_ref,
    "diffusion_loss": diffusion_loss_ref,
}
