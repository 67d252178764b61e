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

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ._spec import LEARNED_VARIANCE_TYPES, VARIANCE_TYPES, SolverColumns  # noqa: F401  (re-exported)
from ._stream import stream_state
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


# ------------------------------------------------------------------------------------------ the noise stream
# The in-kernel noise as a pure function of (key, call offset, global sample index, element index within the
# sample): Philox4x32-10 (Salmon et al., SC'11; the generator of curand and torch's CUDA RNG) at the counter
# (q, sample, offset_lo, offset_hi) with q = element // 4, keyed by (key_lo, key_hi); its four 32-bit outputs
# become four uniforms u = ((x >> 8) + 0.5) * 2**-24 in (0, 1), and the pairs (u0, u1), (u2, u3) four normals
# by Box-Muller, sqrt(-2 ln u_even) * (cos, sin)(2 pi u_odd), element 4q + k taking output k. Nothing depends
# on the grid, the thread count or the other samples of the batch. See docs/design.md, "Noise streams".
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """``(hi, lo)`` 32-bit words of ``a * b`` for a 32-bit constant ``a`` and uint32 values held in int64 (16-bit
    halves keep every product below 2**49)."""
    lo_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, key):
    """Philox4x32-10 of the counters (uint32 values in int64 tensors) under the 64-bit ``key`` (an int, or a
    one-element int64 tensor holding its bits)."""
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def philox_normal(key, offset: int, first_sample: int, batch: int, per_sample: int, device="cpu"):
    """The noise stream's standard normals for samples ``first_sample .. first_sample + batch - 1`` of one draw,
    shape (batch, per_sample), float32: the specification every backend's in-kernel noise follows. ``key``: an
    int or a one-element int64 tensor (a key that stays on the device, as under CUDA-graph capture)."""
    groups = (per_sample + 3) // 4
    q = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    sample = (first_sample + torch.arange(batch, dtype=torch.int64, device=device))[:, None].expand(batch, groups)
    c2 = torch.full_like(q, offset & _U32)
    c3 = torch.full_like(q, (offset >> 32) & _U32)
    words = philox4x32_10(q & _U32, sample & _U32, c2, c3, key)
    u = [((w >> 8).to(torch.float32) + 0.5) * 5.9604644775390625e-08 for w in words]
    two_pi = torch.tensor(6.283185307179586, dtype=torch.float32)
    normals = []
    for even, odd in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(even))
        theta = two_pi * odd
        normals += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(normals, dim=-1).reshape(batch, groups * 4)[:, :per_sample]


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
    x_t,
    t,
    model_output,
    schedule,
    parameterization="eps",
    clip_denoised=True,
    noise=None,
    generator=None,
    out=None,
    sample_offset=0,
):
    cd = compute_dtype(x_t.dtype)
    x0 = _x0_pred(x_t, t, model_output, schedule, parameterization, clip_denoised, cd)
    mean, _, log_var = _posterior(x0, x_t, t, schedule, cd)
    if noise is None:
        noise = _draw_noise(x_t, generator, cd, sample_offset)
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


# ------------------------------------------------------------------------------------------ flow matching
# Rectified flow (SD3 / Flux / Wan): x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0.
# Sigmas are ``ddpm_kernels._spec.SigmaOperand``s: ``full`` is the compute-dtype sigma broadcastable to the data.
def flow_interpolate_ref(x0, noise, sigma, out=None):
    """The forward process: ``(1 - sigma) x0 + sigma noise``."""
    cd = compute_dtype(x0.dtype)
    s = sigma.full.to(cd)
    return _store((1 - s) * x0.to(cd) + s * noise.to(cd), x0, out)


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
