"""Independent float64 math of the sampler steps, written the way diffusers' DDPMScheduler / DDIMScheduler and
Lin et al. 2023 (Algorithm 1) write it, not the way ddpm_kernels.reference does. Each function returns the
value and a bound on the magnitudes of the terms that produced it (the ``scale`` of helpers.allowed_error).

numpy float64 throughout; tensors are converted by the caller.
"""

import numpy as np


def _bcast(v, ndim):
    return np.asarray(v, dtype=np.float64).reshape((len(v),) + (1,) * (ndim - 1))


def alphas(abar, t, t_prev, final_alpha=1.0):
    t, t_prev = np.asarray(t).astype(np.int64), np.asarray(t_prev).astype(np.int64)
    ab_t = abar[t]
    ab_p = np.where(t_prev >= 0, abar[np.maximum(t_prev, 0)], final_alpha)
    return ab_t, ab_p


def threshold(x0, scale, ratio, max_value):
    """diffusers' _threshold_sample; clamp-and-divide by s >= 1 at most doubles an input error."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape), 2 * scale


def predict(ab_t, x, mo, parameterization):
    """(x0, x0 scale, eps, eps scale) from a model output, diffusers' formulas."""
    a, b = np.sqrt(ab_t), np.sqrt(1 - ab_t)
    if parameterization == "eps":
        return (x - b * mo) / a, (np.abs(x) + b * np.abs(mo)) / a, mo, np.abs(mo)
    if parameterization == "x0":
        return mo, np.abs(mo), (x - a * mo) / b, (np.abs(x) + a * np.abs(mo)) / b
    return a * x - b * mo, a * np.abs(x) + b * np.abs(mo), a * mo + b * x, a * np.abs(mo) + b * np.abs(x)


def clip_or_threshold(x0, scale, clip, clip_range, threshold_ratio, threshold_max):
    if threshold_ratio is not None:
        return threshold(x0, scale, threshold_ratio, threshold_max)
    if clip:
        # clamping is 1-Lipschitz: the error bound carries over unchanged
        return np.clip(x0, -clip_range, clip_range), scale
    return x0, scale


def ddim_step(abar, x, t, t_prev, mo, z, eta, parameterization, clip, final_alpha=1.0, use_clipped=False,
              clip_range=1.0, threshold_ratio=None, threshold_max=1.0):
    ab_t, ab_p = alphas(abar, t, t_prev, final_alpha)
    ab_t, ab_p = _bcast(ab_t, x.ndim), _bcast(ab_p, x.ndim)
    x0, x0_s, eps, eps_s = predict(ab_t, x, mo, parameterization)
    x0, x0_s = clip_or_threshold(x0, x0_s, clip, clip_range, threshold_ratio, threshold_max)
    if use_clipped:
        eps = (x - np.sqrt(ab_t) * x0) / np.sqrt(1 - ab_t)
        eps_s = (np.abs(x) + np.sqrt(ab_t) * x0_s) / np.sqrt(1 - ab_t)
    variance = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    std = eta * np.sqrt(variance)
    direction = np.sqrt(np.maximum(1 - ab_p - std**2, 0.0))
    prev = np.sqrt(ab_p) * x0 + direction * eps
    scale = np.sqrt(ab_p) * x0_s + direction * eps_s
    if eta > 0:
        prev = prev + std * z
        scale = scale + np.abs(std * z)
    return prev, scale, x0, x0_s


def ddpm_step(abar, x, t, t_prev, mo, z, parameterization, variance_type, clip, clip_range=1.0,
              threshold_ratio=None, threshold_max=1.0):
    if variance_type in ("learned", "learned_range"):
        c = x.shape[1]
        mo, v = mo[:, :c], mo[:, c:]
    ab_t, ab_p = alphas(abar, t, t_prev, 1.0)
    ab_t, ab_p = _bcast(ab_t, x.ndim), _bcast(ab_p, x.ndim)
    x0, x0_s, _, _ = predict(ab_t, x, mo, parameterization)
    x0, x0_s = clip_or_threshold(x0, x0_s, clip, clip_range, threshold_ratio, threshold_max)
    beta_prod_t, beta_prod_p = 1 - ab_t, 1 - ab_p
    current_alpha = ab_t / ab_p
    current_beta = 1 - current_alpha
    k0 = np.sqrt(ab_p) * current_beta / beta_prod_t
    kt = np.sqrt(current_alpha) * beta_prod_p / beta_prod_t
    mean = k0 * x0 + kt * x
    scale = k0 * x0_s + np.abs(kt * x)
    variance = np.maximum(beta_prod_p / beta_prod_t * current_beta, 1e-20)
    log_terms = 0.0
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = np.sqrt(variance)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = np.sqrt(current_beta)
    elif variance_type == "learned":
        std = np.exp(0.5 * v)
        log_terms = 0.5 * np.abs(v)
    else:
        frac = (v + 1) / 2
        log_var = frac * np.log(current_beta) + (1 - frac) * np.log(variance)
        std = np.exp(0.5 * log_var)
        # exp amplifies the rounding of its argument: relative error ~ |terms of the argument|
        log_terms = 0.5 * (np.abs(frac * np.log(current_beta)) + np.abs((1 - frac) * np.log(variance)))
    mask = _bcast(np.asarray(t) > 0, x.ndim)
    noise_term = mask * std * z
    return mean + noise_term, scale + np.abs(noise_term) * (1 + 2 * log_terms), x0, x0_s


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Algorithm 1, step by step."""
    alphas_bar = np.cumprod(1 - np.asarray(betas, dtype=np.float64))
    s = np.sqrt(alphas_bar)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    alphas_bar = s**2
    out = np.empty_like(alphas_bar)
    out[0] = alphas_bar[0]
    out[1:] = alphas_bar[1:] / alphas_bar[:-1]
    return 1 - out
