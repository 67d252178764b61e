"""compvis.patch / unpatch against a faithful stand-in for ldm's DDPM and LatentDiffusion.

The stand-in below is written from the public behaviour of CompVis' ``ldm/models/diffusion/ddpm.py`` and
``ldm/modules/diffusionmodules/util.py`` (Stability-AI's version for the v parameterization): the same
``register_schedule`` (float64 numpy, float32 buffers), ``extract_into_tensor``, ``noise_like``, ``q_sample``,
``p_mean_variance``, ``p_sample``, ``get_loss`` and ``p_losses`` (LatentDiffusion's with ``logvar``), with an
``nn.Module`` in place of the Lightning module and a tiny network in place of the UNet.
"""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import ddpm_kernels as dk
from ddpm_kernels.integrations import compvis

# the stand-in keeps ldm's np.sqrt(torch.Tensor(...)) verbatim
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


# ---------------------------------------------------------------------------------------------- the stand-in
def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = timesteps / (1 + cosine_s) * np.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = np.clip(betas, a_min=0, a_max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    else:
        raise ValueError(schedule)
    return betas.numpy()


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape, device, repeat=False):
    repeat_noise = lambda: torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))  # noqa: E731
    noise = lambda: torch.randn(shape, device=device)  # noqa: E731
    return repeat_noise() if repeat else noise()


def default(val, d):
    return val if val is not None else (d() if callable(d) else d)


class TinyNet(nn.Module):
    def __init__(self, channels=3, out_channels=None, context_dim=0):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.temb = nn.Embedding(1000, out_channels or channels)
        self.ctx = nn.Linear(context_dim, out_channels or channels) if context_dim else None

    def forward(self, x, t, context=None):
        h = self.conv(x) + self.temb(t)[:, :, None, None]
        if context is not None:
            h = h + self.ctx(context)[:, :, None, None]
        return torch.tanh(h)


class DDPM(nn.Module):
    def __init__(self, timesteps=1000, beta_schedule="linear", loss_type="l2", image_size=8, channels=3,
                 log_every_t=100, clip_denoised=True, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
                 given_betas=None, original_elbo_weight=0.0, v_posterior=0.0, l_simple_weight=1.0,
                 parameterization="eps", learn_logvar=False, logvar_init=0.0):
        super().__init__()
        assert parameterization in ["eps", "x0", "v"]
        self.parameterization = parameterization
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.image_size = image_size
        self.channels = channels
        self.model = self.make_model()
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        self.logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)

    def make_model(self):
        return TinyNet(self.channels)

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
        if given_betas is not None:
            betas = given_betas
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        (timesteps,) = betas.shape
        self.num_timesteps = int(timesteps)
        self.linear_start = linear_start
        self.linear_end = linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod) + self.v_posterior * betas
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1", to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2", to_torch(
            (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)))
        if self.parameterization == "eps":
            lvlb_weights = self.betas**2 / (2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb_weights = 0.5 * np.sqrt(torch.Tensor(alphas_cumprod)) / (2.0 * 1 - torch.Tensor(alphas_cumprod))
        else:
            lvlb_weights = torch.ones_like(self.betas**2 / (
                2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod)))
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def q_posterior(self, x_start, x_t, t):
        posterior_mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(self, x, t, clip_denoised: bool):
        model_out = self.model(x, t)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        elif self.parameterization == "x0":
            x_recon = model_out
        if clip_denoised:
            x_recon.clamp_(-1.0, 1.0)
        model_mean, posterior_variance, posterior_log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return model_mean, posterior_variance, posterior_log_variance

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True, repeat_noise=False):
        b, *_, device = *x.shape, x.device
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        noise = noise_like(x.shape, device, repeat_noise)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, shape, return_intermediates=False):
        device = self.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device)
        intermediates = [img]
        for i in reversed(range(0, self.num_timesteps)):
            img = self.p_sample(img, torch.full((b,), i, device=device, dtype=torch.long),
                                clip_denoised=self.clip_denoised)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        if return_intermediates:
            return img, intermediates
        return img

    def q_sample(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x, noise, t):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            if mean:
                loss = loss.mean()
        elif self.loss_type == "l2":
            if mean:
                loss = torch.nn.functional.mse_loss(target, pred)
            else:
                loss = torch.nn.functional.mse_loss(target, pred, reduction="none")
        else:
            raise NotImplementedError(f"unknown loss type '{self.loss_type}'")
        return loss

    def loss_target(self, x_start, noise, t):
        """The regression target of both ``p_losses`` by parameterization (ldm writes this chain in each)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        if self.parameterization == "v":
            return self.get_v(x_start, noise, t)
        raise NotImplementedError(f"unknown parameterization '{self.parameterization}'")

    def p_losses(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_out = self.model(x_noisy, t)
        loss_dict = {}
        target = self.loss_target(x_start, noise, t)
        loss = self.get_loss(model_out, target, mean=False).mean(dim=[1, 2, 3])
        log_prefix = "train" if self.training else "val"
        loss_dict.update({f"{log_prefix}/loss_simple": loss.mean()})
        loss_simple = loss.mean() * self.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * loss).mean()
        loss_dict.update({f"{log_prefix}/loss_vlb": loss_vlb})
        loss = loss_simple + self.original_elbo_weight * loss_vlb
        loss_dict.update({f"{log_prefix}/loss": loss})
        return loss, loss_dict

    def forward(self, x, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        return self.p_losses(x, t, *args, **kwargs)


class DiffusionWrapper(nn.Module):
    def __init__(self, channels, context_dim):
        super().__init__()
        self.diffusion_model = TinyNet(channels, context_dim=context_dim)
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class LatentDiffusion(DDPM):
    def __init__(self, *args, context_dim=5, **kwargs):
        self.context_dim = context_dim
        super().__init__(*args, **kwargs)

    def make_model(self):
        return DiffusionWrapper(self.channels, self.context_dim)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def p_losses(self, x_start, cond, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        loss_dict = {}
        prefix = "train" if self.training else "val"
        target = self.loss_target(x_start, noise, t)
        loss_simple = self.get_loss(model_output, target, mean=False).mean([1, 2, 3])
        loss_dict.update({f"{prefix}/loss_simple": loss_simple.mean()})
        logvar_t = self.logvar[t].to(x_start.device)
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict.update({f"{prefix}/loss_gamma": loss.mean()})
            loss_dict.update({"logvar": self.logvar.data.mean()})
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        loss_vlb = (self.lvlb_weights[t] * loss_vlb).mean()
        loss_dict.update({f"{prefix}/loss_vlb": loss_vlb})
        loss += self.original_elbo_weight * loss_vlb
        loss_dict.update({f"{prefix}/loss": loss})
        return loss, loss_dict

    def p_mean_variance(self, x, c, t, clip_denoised: bool, return_codebook_ids=False, quantize_denoised=False,
                        return_x0=False, score_corrector=None, corrector_kwargs=None):
        model_out = self.apply_model(x, t, c, return_ids=return_codebook_ids)
        if score_corrector is not None:
            assert self.parameterization == "eps"
            model_out = score_corrector.modify_score(self, model_out, x, t, c, **corrector_kwargs)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        elif self.parameterization == "x0":
            x_recon = model_out
        else:
            raise NotImplementedError()
        if clip_denoised:
            x_recon.clamp_(-1.0, 1.0)
        if quantize_denoised:
            x_recon = torch.round(x_recon * 4) / 4  # stands in for first_stage_model.quantize
        model_mean, posterior_variance, posterior_log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        if return_x0:
            return model_mean, posterior_variance, posterior_log_variance, x_recon
        return model_mean, posterior_variance, posterior_log_variance

    @torch.no_grad()
    def p_sample(self, x, c, t, clip_denoised=False, repeat_noise=False, return_codebook_ids=False,
                 quantize_denoised=False, return_x0=False, temperature=1.0, noise_dropout=0.0,
                 score_corrector=None, corrector_kwargs=None):
        b, *_, device = *x.shape, x.device
        outputs = self.p_mean_variance(x=x, c=c, t=t, clip_denoised=clip_denoised,
                                       return_codebook_ids=return_codebook_ids, quantize_denoised=quantize_denoised,
                                       return_x0=return_x0, score_corrector=score_corrector,
                                       corrector_kwargs=corrector_kwargs)
        if return_x0:
            model_mean, _, model_log_variance, x0 = outputs
        else:
            model_mean, _, model_log_variance = outputs
        noise = noise_like(x.shape, device, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))
        if return_x0:
            return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise, x0
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(ddim_discr_method)
    steps_out = ddim_timesteps + 1
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


class DDIMSampler(object):
    """ldm/models/diffusion/ddim.py (Stability-AI's version), without encode / stochastic_encode / decode."""

    def __init__(self, model, schedule="linear", device=torch.device("cpu"), **kwargs):
        super().__init__()
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device

    def register_buffer(self, name, attr):
        if type(attr) == torch.Tensor:
            if attr.device != self.device:
                attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=ddim_discretize, num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps, verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        to_torch = lambda x: x.clone().detach().to(torch.float32).to(self.model.betas.device)  # noqa: E731
        self.register_buffer("betas", to_torch(self.model.betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(self.model.alphas_cumprod_prev))
        ddim_sigmas, ddim_alphas, ddim_alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod.cpu(), ddim_timesteps=self.ddim_timesteps, eta=ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", ddim_sigmas)
        self.register_buffer("ddim_alphas", ddim_alphas)
        self.register_buffer("ddim_alphas_prev", ddim_alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", np.sqrt(1.0 - ddim_alphas))

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, eta=0.0, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, verbose=False, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None):
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        C, H, W = shape
        size = (batch_size, C, H, W)
        return self.ddim_sampling(conditioning, size, noise_dropout=noise_dropout, temperature=temperature,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs, x_T=x_T,
                                  log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning,
                                  dynamic_threshold=dynamic_threshold)

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, log_every_t=100, temperature=1.0, noise_dropout=0.0,
                      score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
                      unconditional_conditioning=None, dynamic_threshold=None):
        device = self.model.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device) if x_T is None else x_T
        timesteps = self.ddim_timesteps
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        for i, step in enumerate(time_range):
            index = total_steps - i - 1
            ts = torch.full((b,), step, device=device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(img, cond, ts, index=index, temperature=temperature,
                                              noise_dropout=noise_dropout, score_corrector=score_corrector,
                                              corrector_kwargs=corrector_kwargs,
                                              unconditional_guidance_scale=unconditional_guidance_scale,
                                              unconditional_conditioning=unconditional_conditioning,
                                              dynamic_threshold=dynamic_threshold)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None):
        b, *_, device = *x.shape, x.device
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            model_output = self.model.apply_model(x, t, c)
        else:
            x_in = torch.cat([x] * 2)
            t_in = torch.cat([t] * 2)
            c_in = torch.cat([unconditional_conditioning, c])
            model_uncond, model_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
            model_output = model_uncond + unconditional_guidance_scale * (model_t - model_uncond)
        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, model_output)
        else:
            e_t = model_output
        if score_corrector is not None:
            assert self.model.parameterization == "eps", "not implemented"
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **corrector_kwargs)
        alphas = self.model.alphas_cumprod if use_original_steps else self.ddim_alphas
        alphas_prev = self.model.alphas_cumprod_prev if use_original_steps else self.ddim_alphas_prev
        sqrt_one_minus_alphas = (self.model.sqrt_one_minus_alphas_cumprod if use_original_steps
                                 else self.ddim_sqrt_one_minus_alphas)
        sigmas = self.model.ddim_sigmas_for_original_num_steps if use_original_steps else self.ddim_sigmas
        a_t = torch.full((b, 1, 1, 1), alphas[index], device=device)
        a_prev = torch.full((b, 1, 1, 1), alphas_prev[index], device=device)
        sigma_t = torch.full((b, 1, 1, 1), sigmas[index], device=device)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), sqrt_one_minus_alphas[index], device=device)
        if self.model.parameterization != "v":
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        else:
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        if quantize_denoised:
            pred_x0 = torch.round(pred_x0 * 4) / 4  # stands in for first_stage_model.quantize
        if dynamic_threshold is not None:
            raise NotImplementedError()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * noise_like(x.shape, device, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0


# ---------------------------------------------------------------------------------------------- helpers
TOL = dict(rtol=1e-5, atol=1e-5)


def twins(cls=DDPM, seed=0, **kw):
    """Two identical models: one stays stock, the other is patched."""
    torch.manual_seed(seed)
    stock = cls(**kw)
    fused = cls(**kw)
    fused.load_state_dict(stock.state_dict())
    if hasattr(stock, "logvar"):
        fused.logvar = stock.logvar.detach().clone() if not kw.get("learn_logvar") else fused.logvar
    compvis.patch(fused)
    return stock, fused


def same_seed(fn, seed=123):
    torch.manual_seed(seed)
    return fn()


def assert_close_tree(a, b, **tol):
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_tree(x, y, **tol)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_close_tree(a[k], b[k], **tol)
    else:
        torch.testing.assert_close(a, b, **(tol or TOL))


def data(b=3, c=3, hw=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, hw, hw, generator=g, dtype=dtype)
    t = torch.randint(0, 100, (b,), generator=g)
    t[0] = 0
    t[-1] = 99
    return x, t, torch.randn(b, c, hw, hw, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule,v_posterior", [("linear", 0.0), ("cosine", 0.3), ("sqrt_linear", 0.0)])
def test_ddpm_forward_helpers(parameterization, schedule, v_posterior):
    stock, fused = twins(timesteps=100, beta_schedule=schedule, v_posterior=v_posterior,
                         parameterization=parameterization)
    x, t, noise = data()
    for name, args in (("q_sample", (x, t, noise)), ("predict_start_from_noise", (x, t, noise)),
                       ("q_posterior", (noise, x, t)), ("get_v", (x, noise, t)),
                       ("predict_start_from_z_and_v", (x, t, noise)), ("predict_eps_from_z_and_v", (x, t, noise))):
        assert_close_tree(getattr(fused, name)(*args), getattr(stock, name)(*args))
    # q_sample's default noise is torch.randn_like, drawn from the same generator
    assert_close_tree(same_seed(lambda: fused.q_sample(x, t)), same_seed(lambda: stock.q_sample(x, t)))


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("repeat_noise", [False, True])
def test_ddpm_sampling(parameterization, clip, repeat_noise):
    stock, fused = twins(timesteps=100, parameterization=parameterization, v_posterior=0.1)
    x, t, _ = data()
    assert_close_tree(fused.p_mean_variance(x, t, clip), stock.p_mean_variance(x, t, clip))
    got = same_seed(lambda: fused.p_sample(x, t, clip_denoised=clip, repeat_noise=repeat_noise))
    expected = same_seed(lambda: stock.p_sample(x, t, clip_denoised=clip, repeat_noise=repeat_noise))
    assert_close_tree(got, expected)


def test_ddpm_sample_loop_end_to_end():
    stock, fused = twins(timesteps=60, log_every_t=20)
    got = same_seed(lambda: fused.p_sample_loop((2, 3, 8, 8), return_intermediates=True))
    expected = same_seed(lambda: stock.p_sample_loop((2, 3, 8, 8), return_intermediates=True))
    assert_close_tree(got, expected, rtol=1e-4, atol=1e-4)


def test_v_parameterization_sampling_is_computed():
    """ldm's DDPM.p_mean_variance has no v branch (it fails); the patched one computes x0 = sqrt(ab) x - ..."""
    stock, fused = twins(timesteps=100, parameterization="v")
    x, t, _ = data()
    with pytest.raises(UnboundLocalError):
        stock.p_mean_variance(x, t, True)
    mean, var, log_var = fused.p_mean_variance(x, t, True)
    x0 = stock.predict_start_from_z_and_v(x, t, stock.model(x, t)).clamp(-1, 1)
    assert_close_tree((mean, var, log_var), stock.q_posterior(x0, x, t))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 0.1)])
@pytest.mark.parametrize("training", [True, False])
def test_ddpm_p_losses_and_gradients(parameterization, loss_type, weights, training):
    stock, fused = twins(timesteps=100, parameterization=parameterization, loss_type=loss_type,
                         l_simple_weight=weights[0], original_elbo_weight=weights[1])
    stock.train(training)
    fused.train(training)
    x, t, noise = data()
    results = []
    for model in (stock, fused):
        model.zero_grad()
        loss, loss_dict = same_seed(lambda: model.p_losses(x, t))
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in loss_dict.items()},
                        [p.grad.clone() for p in model.parameters()]))
    assert_close_tree(results[1], results[0])
    # the training forward draws t then noise as the seed does
    assert_close_tree(same_seed(lambda: fused(x))[0], same_seed(lambda: stock(x))[0])


# ------------------------------------------------------------------------------------------ LatentDiffusion
def cond(b=3, seed=2):
    return torch.randn(b, 5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("logvar", ["zero", "init", "learned"])
def test_latent_p_losses(parameterization, logvar):
    kw = dict(timesteps=100, parameterization=parameterization, original_elbo_weight=0.2)
    if logvar == "init":
        kw["logvar_init"] = 0.5
    if logvar == "learned":
        kw["learn_logvar"] = True
    stock, fused = twins(LatentDiffusion, **kw)
    x, t, noise = data()
    c = cond()
    results = []
    for model in (stock, fused):
        model.zero_grad()
        loss, loss_dict = same_seed(lambda: model.p_losses(x, c, t))
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in loss_dict.items()},
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert_close_tree(results[1], results[0])


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
@pytest.mark.parametrize("options", [
    dict(), dict(clip_denoised=True), dict(repeat_noise=True), dict(temperature=0.7),
    dict(noise_dropout=0.3), dict(return_x0=True, clip_denoised=True), dict(return_x0=True),
    dict(quantize_denoised=True),
], ids=["plain", "clip", "repeat", "temperature", "dropout", "x0_clip", "x0", "quantize_fallback"])
def test_latent_sampling(parameterization, options):
    stock, fused = twins(LatentDiffusion, timesteps=100, parameterization=parameterization)
    x, t, _ = data()
    c = cond()
    pmv_opts = {k: v for k, v in options.items() if k in ("return_x0", "quantize_denoised")}
    clip = options.get("clip_denoised", False)
    assert_close_tree(fused.p_mean_variance(x, c, t, clip, **pmv_opts), stock.p_mean_variance(x, c, t, clip, **pmv_opts))
    got = same_seed(lambda: fused.p_sample(x, c, t, **options))
    expected = same_seed(lambda: stock.p_sample(x, c, t, **options))
    assert_close_tree(got, expected)


def test_latent_score_corrector():
    class Corrector:
        def modify_score(self, model, e_t, x, t, c, scale=1.0):
            return e_t + scale * 0.1 * x

    stock, fused = twins(LatentDiffusion, timesteps=100)
    x, t, _ = data()
    kw = dict(score_corrector=Corrector(), corrector_kwargs={"scale": 2.0})
    assert_close_tree(same_seed(lambda: fused.p_sample(x, cond(), t, **kw)),
                      same_seed(lambda: stock.p_sample(x, cond(), t, **kw)))


# ---------------------------------------------------------------------------------------------- patching
def test_patch_routes_through_the_ops(monkeypatch):
    _, fused = twins(timesteps=100)
    calls = []
    from ddpm_kernels import ops

    for name in ("q_sample", "p_sample", "p_mean_variance", "diffusion_loss"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    x, t, noise = data()
    fused.p_sample(x, t)
    fused.p_mean_variance(x, t, True)
    fused.p_losses(x, t, noise)
    assert calls == ["p_sample", "p_mean_variance", "q_sample", "diffusion_loss"]


def test_unpatch_restores_and_state_dict_is_untouched():
    torch.manual_seed(0)
    model = DDPM(timesteps=50)
    keys = list(model.state_dict())
    original = model.p_sample
    compvis.patch(model)
    assert compvis.is_patched(model) and model.p_sample != original
    assert list(model.state_dict()) == keys
    assert list(model.children()) == [model.model]
    compvis.patch(model, backend="reference")  # re-patching replaces the patch
    assert compvis.schedule_of(model) is not None
    compvis.unpatch(model)
    assert not compvis.is_patched(model) and model.p_sample == original
    assert "p_sample" not in model.__dict__
    compvis.unpatch(model)  # no-op
    with pytest.raises(ValueError, match="not patched"):
        compvis.schedule_of(model)


def test_schedule_follows_buffer_changes():
    stock, fused = twins(timesteps=100)
    x, t, noise = data()
    for model in (stock, fused):
        model.register_schedule(beta_schedule="cosine", timesteps=100)
    assert_close_tree(fused.q_sample(x, t, noise), stock.q_sample(x, t, noise))
    # in-place change (as a checkpoint load does)
    for model in (stock, fused):
        model.load_state_dict({k: v * 1.01 if k == "sqrt_alphas_cumprod" else v for k, v in model.state_dict().items()})
    assert_close_tree(fused.q_sample(x, t, noise), stock.q_sample(x, t, noise))
    # a dtype move: float64 data through float64 buffers
    for model in (stock, fused):
        model.double()
    x64, noise64 = x.double(), noise.double()
    torch.testing.assert_close(fused.q_sample(x64, t, noise64), stock.q_sample(x64, t, noise64), rtol=1e-12, atol=1e-12)
    # every table the ops read is the model's own, float32 and float64 alike
    schedule = compvis.schedule_of(fused)
    for name in dk.schedule.TABLE_NAMES:
        if hasattr(stock, name):
            row = dk.schedule.TABLE_ROW[name]
            assert torch.equal(schedule.coefficients64[row], getattr(stock, name)), name
            assert torch.equal(schedule.coefficients[row], getattr(stock, name).float()), name
    assert torch.equal(schedule.lvlb_weights_eps, stock.lvlb_weights.float())


def test_inputs_the_ops_do_not_take_fall_back():
    stock, fused = twins(timesteps=100)
    x, t, noise = data()
    # broadcast noise, a 0-d t: the original method handles them
    assert_close_tree(fused.q_sample(x, t, noise[:1]), stock.q_sample(x, t, noise[:1]))
    fused.loss_type = stock.loss_type = "l1"
    assert_close_tree(same_seed(lambda: fused.p_losses(x, t))[0], same_seed(lambda: stock.p_losses(x, t))[0])


def test_patch_rejects_what_is_not_a_ddpm():
    with pytest.raises(TypeError, match="lacks"):
        compvis.patch(nn.Linear(2, 2))
    model = DDPM(timesteps=10)
    model.parameterization = "mu"
    with pytest.raises(ValueError, match="parameterization"):
        compvis.patch(model)
    model.parameterization = "eps"
    with pytest.raises(ValueError, match="backend"):
        compvis.patch(model, backend="mps")
    assert not compvis.is_patched(model)


# ---------------------------------------------------------------------------------------------- DDIMSampler
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("options", [
    dict(), dict(unconditional_guidance_scale=3.0), dict(temperature=0.8, noise_dropout=0.2),
], ids=["plain", "guidance", "temperature_dropout"])
def test_ddim_sampler(parameterization, eta, options):
    torch.manual_seed(0)
    model = LatentDiffusion(timesteps=200, parameterization=parameterization, beta_schedule="linear",
                            linear_start=0.00085, linear_end=0.012)
    stock, fused = DDIMSampler(model), compvis.patch(DDIMSampler(model))
    c = cond(2)
    if "unconditional_guidance_scale" in options:
        options = dict(options, unconditional_conditioning=torch.zeros(2, 5))
    run = lambda s: same_seed(lambda: s.sample(10, 2, (3, 8, 8), conditioning=c, eta=eta, log_every_t=3,  # noqa: E731
                                                 **options))
    got, expected = run(fused), run(stock)
    assert_close_tree(got, expected, rtol=1e-4, atol=1e-4)


def test_ddim_sampler_score_corrector_fallbacks_and_unpatch(monkeypatch):
    class Corrector:
        def modify_score(self, model, e_t, x, t, c, scale=1.0):
            return e_t + scale * 0.1 * x

    torch.manual_seed(0)
    model = LatentDiffusion(timesteps=100)
    stock, fused = DDIMSampler(model), compvis.patch(DDIMSampler(model))
    kw = dict(score_corrector=Corrector(), corrector_kwargs={"scale": 2.0}, eta=0.5)
    assert_close_tree(same_seed(lambda: fused.sample(5, 2, (3, 8, 8), conditioning=cond(2), **kw)),
                      same_seed(lambda: stock.sample(5, 2, (3, 8, 8), conditioning=cond(2), **kw)), rtol=1e-4, atol=1e-4)
    # the step runs the fused op
    from ddpm_kernels import ops

    calls = []
    real = ops.ddim_step
    monkeypatch.setattr(ops, "ddim_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused.sample(4, 2, (3, 8, 8), conditioning=cond(2))
    assert len(calls) == 4
    # quantize_denoised falls back to the original; dynamic_threshold raises there, as in ldm
    stock.make_schedule(4, ddim_eta=0.0, verbose=False)  # as fused.sample(4, ...) left it
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), int(fused.ddim_timesteps[2]))
    assert_close_tree(same_seed(lambda: fused.p_sample_ddim(x, cond(2), t, 2, quantize_denoised=True)),
                      same_seed(lambda: stock.p_sample_ddim(x, cond(2), t, 2, quantize_denoised=True)))
    with pytest.raises(NotImplementedError):
        fused.p_sample_ddim(x, cond(2), t, 2, dynamic_threshold=0.9)
    compvis.unpatch(fused)
    assert "p_sample_ddim" not in fused.__dict__ and not compvis.is_patched(fused)
