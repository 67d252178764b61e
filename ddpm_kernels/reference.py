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

The sigma-table samplers (flow matching, Euler, the multistep solvers) are in ``ddpm_kernels._reference_sigma``
and the noise stream's specification (``philox_normal``) in ``ddpm_kernels._stream``; both are re-exported here.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ._spec import LEARNED_VARIANCE_TYPES, VARIANCE_TYPES, SolverColumns  # noqa: F401  (re-exported)
from ._stream import philox4x32_10, philox_normal, stream_state  # noqa: F401  (the stream's specification)
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
    "dynamic_threshold_ref",
    "sampler_step_ref",
    "flow_interpolate_ref",
    "flow_step_ref",
    "flow_loss_ref",
    "euler_step_ref",
    "solver_step_ref",
    "guided_output",
    "flow_loss_weight",
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


def _draw_noise(x_t, generator, cd, sample_offset=0):
    """The in-kernel noise of a call on ``x_t``: the stream's normals of samples ``sample_offset ..`` (element
    index = position in the sample's row-major order, whatever x_t's memory format), with (key, offset) taken
    from ``generator`` as every backend takes it (``ddpm_kernels._stream``); float32, cast to ``cd``."""
    # a CPU key stays a tensor: reading it into a Python int would be a host read inside a sampling step
    key, offset = stream_state(generator, x_t.device, as_tensor=not x_t.is_cuda)
    batch = x_t.shape[0]
    per_sample = x_t.numel() // batch if batch else 0
    z = philox_normal(key, offset, sample_offset, batch, per_sample, device=x_t.device)
    return z.reshape(x_t.shape).to(cd)


def p_sample_ref(
    x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True, noise=None, generator=None, out=None,
    sample_offset=0
):
    cd = compute_dtype(x_t.dtype)
    x0 = _x0_pred(x_t, t, model_output, schedule, parameterization, clip_denoised, cd)
    mean, _, log_var = _posterior(x0, x_t, t, schedule, cd)
    if noise is None:
        noise = _draw_noise(x_t, generator, cd, sample_offset)
    nonzero_mask = (t != 0).to(cd).reshape((t.shape[0],) + (1,) * (x_t.ndim - 1))
    return _store(mean + nonzero_mask * torch.exp(0.5 * log_var) * noise.to(cd), x_t, out)


def diffusion_loss_ref(
    model_output, x_start, noise, t, schedule, parameterization="eps", loss_type="l2", l_simple_weight=1.0,
    original_elbo_weight=0.0
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
    # explicit row length: reshape(B, -1) cannot infer it for an empty batch
    per_sample = per_elem.reshape(per_elem.shape[0], math.prod(per_elem.shape[1:])).mean(dim=1)
    (w,) = extract(schedule, ("lvlb_weights_" + parameterization,), t, 1, cd)
    loss_simple = per_sample.mean()
    loss_vlb = (w * per_sample).mean()
    loss = l_simple_weight * loss_simple + original_elbo_weight * loss_vlb
    dt = model_output.dtype
    return loss.to(dt), loss_simple.to(dt), loss_vlb.to(dt)


# ------------------------------------------------------------------------------------------ sampler steps
# The ops below step between arbitrary timesteps (t -> t_prev, as DDIM and diffusers' spaced DDPM do), so their
# coefficients are not rows of the table: they are derived per sample from alphas_cumprod[t] and
# alphas_cumprod[t_prev]. The derivation runs in float64 on (B,) values gathered from the float64 table and is
# rounded once to the compute dtype, exactly as the tables themselves are built; the elementwise math then
# runs in the compute dtype. (1 - ab_t / ab_prev cancels in float32 when t_prev = t - 1 near t = 0; a fused
# kernel computing it in float32 registers should use (ab_prev - ab_t) / ab_prev, which is exact there.)



def _alphas_cumprod64(schedule, t, t_prev, set_alpha_to_one=True):
    """(ab_t, ab_prev) in float64, shape (B,). ``t_prev == -1`` means "after the last step": ab_prev = 1 when
    ``set_alpha_to_one`` else alphas_cumprod[0] (diffusers' ``final_alpha_cumprod``). Out of range: NaN."""
    ab = schedule.coefficients64[TABLE_ROW["alphas_cumprod"]]
    T = ab.shape[0]
    nan = torch.full((), float("nan"), dtype=ab.dtype, device=ab.device)
    ab_t = torch.where((t >= 0) & (t < T), ab.index_select(0, t.clamp(0, T - 1)), nan)
    final = torch.ones((), dtype=ab.dtype, device=ab.device) if set_alpha_to_one else ab[0]
    ab_prev = torch.where(t_prev == -1, final, ab.index_select(0, t_prev.clamp(0, T - 1)))
    ab_prev = torch.where((t_prev >= -1) & (t_prev < T), ab_prev, nan)
    return ab_t, ab_prev


def _per_sample(values, ndim, cd):
    """float64 (B,) coefficients -> compute dtype, shaped (B, 1, ..., 1)."""
    return tuple(v.to(cd).reshape((v.shape[0],) + (1,) * (ndim - 1)) for v in values)


def _quantile_linear(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation, NaN rows give NaN) by sort + gather: the same
    numbers, without torch.quantile's input-size limit and with no host synchronization."""
    n = rows.shape[1]
    ordered = rows.sort(dim=1).values
    # torch.quantile forms the rank as q * (n - 1) in the data's dtype
    if rows.dtype == torch.float64:
        rank = float(q) * (n - 1)
    else:
        rank = float(np.float32(q) * np.float32(n - 1))
    lo = int(math.floor(rank))
    hi = min(int(math.ceil(rank)), n - 1)
    value = torch.lerp(ordered[:, lo], ordered[:, hi], rank - lo)
    return torch.where(rows.isnan().any(dim=1), torch.full_like(value, float("nan")), value)


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding, diffusers' ``_threshold_sample`` semantics: per sample, s = the ``ratio``
    quantile of |x0| over every non-batch element, clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s."""
    if x0.numel() == 0:
        return x0
    flat = x0.reshape(x0.shape[0], -1)
    s = _quantile_linear(flat.abs(), ratio).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _clip_or_threshold(x0, opts):
    if opts.threshold_ratio is not None:
        return _dynamic_threshold(x0, opts.threshold_ratio, opts.threshold_max)
    if opts.clip_denoised:
        return x0.clamp(-opts.clip_range, opts.clip_range)
    return x0


def dynamic_threshold_ref(x0, ratio=0.995, max_value=1.0):
    cd = compute_dtype(x0.dtype)
    return _store(_dynamic_threshold(x0.to(cd), ratio, max_value), x0)


def _ddim(x_t, t, t_prev, model_output, schedule, opts, noise, generator, cd, sample_offset=0):
    """One DDIM step (Song et al. 2021, eq. 12), diffusers ``DDIMScheduler.step`` semantics: (x_prev, x0)."""
    ab_t, ab_p = _alphas_cumprod64(schedule, t, t_prev, opts.set_alpha_to_one)
    sqrt_ab_t, sqrt_1m_t = ab_t.sqrt(), (1 - ab_t).sqrt()
    var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    sigma = opts.eta * var.sqrt()
    # 1 - ab_prev - sigma^2 >= 0 for eta <= 1; clamped so eta > 1 degrades to no direction term, not NaN
    dir_coef = (1 - ab_p - sigma * sigma).clamp(min=0).sqrt()
    a_t, s_t, r_a, r_s, a_p, d, sg = _per_sample(
        (sqrt_ab_t, sqrt_1m_t, 1 / sqrt_ab_t, sqrt_1m_t / sqrt_ab_t, ab_p.sqrt(), dir_coef, sigma), x_t.ndim, cd
    )
    x, mo = x_t.to(cd), model_output.to(cd)
    if opts.parameterization == "eps":
        x0, eps = r_a * x - r_s * mo, mo
    elif opts.parameterization == "x0":
        x0, eps = mo, (x - a_t * mo) / s_t
    else:  # "v"
        x0, eps = a_t * x - s_t * mo, a_t * mo + s_t * x
    x0 = _clip_or_threshold(x0, opts)
    if opts.use_clipped_model_output:
        eps = (x - a_t * x0) / s_t
    prev = a_p * x0 + d * eps
    if opts.eta > 0:
        if noise is None:
            noise = _draw_noise(x_t, generator, cd, sample_offset)
        prev = prev + sg * noise.to(cd)
    return prev, x0


def _ddpm(x_t, t, t_prev, model_output, schedule, opts, noise, generator, cd, sample_offset=0):
    """One ancestral step t -> t_prev (Ho et al. 2020 eqs. 6-7 on the respaced chain), diffusers
    ``DDPMScheduler.step`` semantics, with the variance of ``variance_type``: (x_prev, x0)."""
    variance_type = opts.variance_type
    if opts.learned:
        channels = x_t.shape[1]
        model_output, model_var = model_output[:, :channels], model_output[:, channels:]
    ab_t, ab_p = _alphas_cumprod64(schedule, t, t_prev, set_alpha_to_one=True)
    alpha = ab_t / ab_p
    beta = 1 - alpha
    coef_x0 = ab_p.sqrt() * beta / (1 - ab_t)
    coef_xt = alpha.sqrt() * (1 - ab_p) / (1 - ab_t)
    # diffusers clamps before taking any log; CompVis' posterior_log_variance_clipped is the same clamp
    var = ((1 - ab_p) / (1 - ab_t) * beta).clamp(min=1e-20)
    a_t, s_t, r_a, r_s, c0, ct, mask = _per_sample(
        (ab_t.sqrt(), (1 - ab_t).sqrt(), 1 / ab_t.sqrt(), ((1 - ab_t) / ab_t).sqrt(), coef_x0, coef_xt, (t > 0).to(ab_t.dtype)),
        x_t.ndim,
        cd,
    )
    x, mo = x_t.to(cd), model_output.to(cd)
    if opts.parameterization == "eps":
        x0 = r_a * x - r_s * mo
    elif opts.parameterization == "x0":
        x0 = mo
    else:  # "v"
        x0 = a_t * x - s_t * mo
    x0 = _clip_or_threshold(x0, opts)
    mean = c0 * x0 + ct * x
    if variance_type in ("fixed_small", "fixed_small_log"):
        (std,) = _per_sample((var.sqrt(),), x_t.ndim, cd)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        # fixed_large_log is log(beta) as a log-variance: the same standard deviation, sqrt(beta)
        (std,) = _per_sample((beta.sqrt(),), x_t.ndim, cd)
    elif variance_type == "learned":
        # the model's extra channels are the log-variance itself (improved DDPM / guided-diffusion)
        std = torch.exp(0.5 * model_var.to(cd))
    else:  # "learned_range": interpolate between log(var) and log(beta) by (v + 1) / 2
        min_log, max_log = _per_sample((var.log(), beta.log()), x_t.ndim, cd)
        frac = (model_var.to(cd) + 1) / 2
        std = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
    if noise is None:
        noise = _draw_noise(x_t, generator, cd, sample_offset)
    return mean + mask * std * noise.to(cd), x0


# The sampler-step family: one per-sample coefficient/combination function per sampler (StepOptions.sampler).
_SAMPLERS = {"ddim": _ddim, "ddpm": _ddpm}


def guided_output(cond, uncond, scale, rescale, cd):
    """Classifier-free guidance ``u + w (c - u)`` with a per-sample ``w`` (``scale``, shape (B,)), then, when
    ``rescale > 0``, Lin et al. 2023's std-rescale as diffusers' ``rescale_noise_cfg``: ``g <- rescale · g ·
    std(c) / std(g) + (1 - rescale) · g`` with per-sample (unbiased) standard deviations over the non-batch
    dims."""
    c = cond.to(cd)
    w = scale.to(cd).reshape((c.shape[0],) + (1,) * (c.ndim - 1))
    g = uncond.to(cd) + w * (c - uncond.to(cd))
    if rescale > 0:
        dims = list(range(1, c.ndim))
        ratio = c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
        g = rescale * (g * ratio) + (1 - rescale) * g
    return g


def sampler_step_ref(x_t, t, t_prev, model_output, schedule, opts, noise=None, generator=None, out=None,
                     uncond=None, guidance=None, sample_offset=0):
    """One step ``x_t -> x_{t_prev}`` of the sampler ``opts.sampler`` (a ``ddpm_kernels._spec.StepOptions``):
    ``x_{t_prev}`` in ``x_t``'s dtype, or ``(x_{t_prev}, x0)`` with ``opts.return_pred_x0``. The public
    ``ddim_step`` / ``ddpm_step`` document each sampler's math. ``opts.guided``: ``model_output`` is the
    conditional output, combined with ``uncond`` by the per-sample scales ``guidance`` (`guided_output`); a
    learned variance's channels come from the conditional output, as diffusers pipelines split them."""
    cd = compute_dtype(x_t.dtype)
    if opts.guided:
        if opts.learned:
            c = x_t.shape[1]
            mixed = guided_output(model_output[:, :c], uncond[:, :c], guidance, opts.guidance_rescale, cd)
            model_output = torch.cat([mixed, model_output[:, c:].to(cd)], dim=1)
        else:
            model_output = guided_output(model_output, uncond, guidance, opts.guidance_rescale, cd)
    prev, x0 = _SAMPLERS[opts.sampler](x_t, t, t_prev, model_output, schedule, opts, noise, generator, cd,
                                       sample_offset)
    result = _store(prev, x_t, out)
    return (result, x0.to(x_t.dtype)) if opts.return_pred_x0 else result


# The sigma-table samplers (flow matching, Euler, multistep solvers): ddpm_kernels._reference_sigma, on the
# helpers above.
from ._reference_sigma import (  # noqa: E402  (after the helpers it imports)
    euler_step_ref,
    flow_interpolate_ref,
    flow_loss_ref,
    flow_loss_weight,
    flow_step_ref,
    solver_step_ref,
)
from ._reference_sigma import _euler_x0, _gather_sigmas, _term  # noqa: E402,F401  (tests read them here)

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
    "dynamic_threshold": dynamic_threshold_ref,
    "ddim_step": sampler_step_ref,
    "ddpm_step": sampler_step_ref,
    "flow_interpolate": flow_interpolate_ref,
    "flow_step": flow_step_ref,
    "flow_loss": flow_loss_ref,
    "euler_step": euler_step_ref,
    "euler_ancestral_step": euler_step_ref,
    "solver_step": solver_step_ref,
}
