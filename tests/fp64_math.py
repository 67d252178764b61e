"""Independent float64 math of DDPM, written from the paper's formulas (Ho et al. 2020, eqs. 4, 7, 11, 15) in
the algebraic form diffusers uses, not the CompVis form the package uses, so a shared mistake is unlikely.

Everything here is numpy float64; tensors are converted by the caller.
"""

import math

import numpy as np


def betas(schedule, T, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    if schedule in ("linear", "scaled_linear"):
        return np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), T) ** 2
    if schedule in ("sqrt_linear",):
        return np.linspace(linear_start, linear_end, T)
    if schedule == "sqrt":
        return np.sqrt(np.linspace(linear_start, linear_end, T))
    if schedule in ("cosine", "squaredcos_cap_v2"):
        # diffusers' betas_for_alpha_bar: beta_i = 1 - abar((i+1)/T) / abar(i/T), capped at 0.999
        def abar(u):
            return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        return np.array([min(max(1 - abar((i + 1) / T) / abar(i / T), 0.0), 0.999) for i in range(T)])
    raise ValueError(schedule)


class Tables:
    def __init__(self, b, v_posterior=0.0):
        self.b = np.asarray(b, dtype=np.float64)
        self.T = len(self.b)
        self.abar = np.cumprod(1 - self.b)
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
        # posterior variance, eq. 7, interpolated towards beta_t by v_posterior (CompVis)
        self.var = (1 - v_posterior) * (1 - self.abar_prev) / (1 - self.abar) * self.b + v_posterior * self.b
        self.log_var = np.log(np.maximum(self.var, 1e-20))

    def at(self, t, ndim):
        t = np.asarray(t).astype(np.int64)
        shape = (len(t),) + (1,) * (ndim - 1)
        return {
            "abar": self.abar[t].reshape(shape),
            "abar_prev": self.abar_prev[t].reshape(shape),
            "beta": self.b[t].reshape(shape),
            "var": self.var[t].reshape(shape),
            "log_var": self.log_var[t].reshape(shape),
            "t": t.reshape(shape),
        }


def q_sample(tb, x0, t, eps):
    c = tb.at(t, x0.ndim)
    terms = (np.sqrt(c["abar"]) * x0, np.sqrt(1 - c["abar"]) * eps)
    return terms[0] + terms[1], np.abs(terms[0]) + np.abs(terms[1])


def predict_start_from_noise(tb, xt, t, eps):
    c = tb.at(t, xt.ndim)
    num = xt - np.sqrt(1 - c["abar"]) * eps
    scale = (np.abs(xt) + np.abs(np.sqrt(1 - c["abar"]) * eps)) / np.sqrt(c["abar"])
    return num / np.sqrt(c["abar"]), scale


def predict_noise_from_start(tb, xt, t, x0):
    c = tb.at(t, xt.ndim)
    out = (xt - np.sqrt(c["abar"]) * x0) / np.sqrt(1 - c["abar"])
    scale = (np.abs(xt) / np.sqrt(c["abar"]) + np.abs(x0)) / np.sqrt(1 / c["abar"] - 1)
    return out, scale


def v_target(tb, x0, t, eps):
    c = tb.at(t, x0.ndim)
    a, b = np.sqrt(c["abar"]) * eps, np.sqrt(1 - c["abar"]) * x0
    return a - b, np.abs(a) + np.abs(b)


def x0_from_v(tb, xt, t, v):
    c = tb.at(t, xt.ndim)
    a, b = np.sqrt(c["abar"]) * xt, np.sqrt(1 - c["abar"]) * v
    return a - b, np.abs(a) + np.abs(b)


def eps_from_v(tb, xt, t, v):
    c = tb.at(t, xt.ndim)
    a, b = np.sqrt(c["abar"]) * v, np.sqrt(1 - c["abar"]) * xt
    return a + b, np.abs(a) + np.abs(b)


def posterior(tb, x0, xt, t):
    c = tb.at(t, xt.ndim)
    alpha = 1 - c["beta"]
    k0 = np.sqrt(c["abar_prev"]) * c["beta"] / (1 - c["abar"])
    kt = np.sqrt(alpha) * (1 - c["abar_prev"]) / (1 - c["abar"])
    mean = k0 * x0 + kt * xt
    return mean, np.abs(k0 * x0) + np.abs(kt * xt), c["var"], c["log_var"]


def x0_prediction(tb, xt, t, model_output, parameterization, clip):
    if parameterization == "eps":
        x0, scale = predict_start_from_noise(tb, xt, t, model_output)
    elif parameterization == "x0":
        x0, scale = model_output.copy(), np.abs(model_output)
    else:
        x0, scale = x0_from_v(tb, xt, t, model_output)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
        scale = np.minimum(scale, 1.0)
    return x0, scale


def p_mean_variance(tb, xt, t, model_output, parameterization, clip):
    x0, x0_scale = x0_prediction(tb, xt, t, model_output, parameterization, clip)
    mean, _, var, log_var = posterior(tb, x0, xt, t)
    c = tb.at(t, xt.ndim)
    k0 = np.sqrt(c["abar_prev"]) * c["beta"] / (1 - c["abar"])
    kt = np.sqrt(1 - c["beta"]) * (1 - c["abar_prev"]) / (1 - c["abar"])
    return mean, k0 * x0_scale + np.abs(kt * xt), var, log_var


def p_sample(tb, xt, t, model_output, noise, parameterization, clip):
    mean, scale, _, log_var = p_mean_variance(tb, xt, t, model_output, parameterization, clip)
    c = tb.at(t, xt.ndim)
    sigma_z = (c["t"] > 0) * np.exp(0.5 * log_var) * noise
    return mean + sigma_z, scale + np.abs(sigma_z)


def lvlb_weights(tb, parameterization):
    alphas = 1 - tb.b
    if parameterization == "eps":
        with np.errstate(divide="ignore"):  # var[0] == 0: infinite weight, replaced below as CompVis does
            w = tb.b**2 / (2 * tb.var * alphas * (1 - tb.abar))
    elif parameterization == "x0":
        # CompVis writes `0.5 * sqrt(abar) / (2. * 1 - abar)`: the denominator is (2 - abar).
        w = 0.5 * np.sqrt(tb.abar) / (2.0 - tb.abar)
    else:
        w = np.ones_like(tb.b)
    w = w.copy()
    w[0] = w[1]
    return w


def diffusion_loss(tb, model_output, x0, eps, t, parameterization, loss_type, l_simple_weight, elbo_weight):
    if parameterization == "eps":
        target = eps
    elif parameterization == "x0":
        target = x0
    else:
        target = v_target(tb, x0, t, eps)[0]
    d = model_output - target
    per = np.abs(d) if loss_type == "l1" else d**2
    per_sample = per.reshape(per.shape[0], -1).mean(axis=1)
    simple = per_sample.mean()
    vlb = (lvlb_weights(tb, parameterization)[np.asarray(t).astype(np.int64)] * per_sample).mean()
    return l_simple_weight * simple + elbo_weight * vlb, simple, vlb
