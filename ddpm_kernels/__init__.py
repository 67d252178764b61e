"""ddpm_kernels: fused kernels for the per-timestep math of DDPM (Ho et al. 2020), CompVis ldm style.

    import ddpm_kernels as dk
    s = dk.DiffusionSchedule("linear", timesteps=1000)
    x_t = dk.q_sample(x_start, t, noise, s)
    x_prev = dk.p_sample(x_t, t, model_output, s)

    fm = dk.FlowMatching(model, image_size=16, channels=1)       # rectified flow: fm.training_loss, fm.sample
"""

from . import reference
from .backends import BackendUnavailableError, available_backends
from .diffusion import GaussianDiffusion
from .euler import euler_ancestral_step, euler_step
from .flow import flow_interpolate, flow_loss, flow_step, randn_stream
from .flow_matching import FlowMatching, flow_sigmas
from .ops import (
    ddim_step, ddpm_step, device_t_check, diffusion_loss, dynamic_threshold, get_v, p_mean_variance, p_sample,
    predict_eps_from_z_and_v, predict_noise_from_start, predict_start_from_noise, predict_start_from_z_and_v,
    q_posterior, q_sample, set_device_t_check,
)
from .solvers import solver_step
from .schedule import DiffusionSchedule, make_beta_schedule, rescale_zero_terminal_snr

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DiffusionSchedule",
    "FlowMatching",
    "GaussianDiffusion",
    "available_backends",
    "ddim_step",
    "ddpm_step",
    "device_t_check",
    "diffusion_loss",
    "dynamic_threshold",
    "euler_ancestral_step",
    "euler_step",
    "flow_interpolate",
    "flow_loss",
    "flow_sigmas",
    "flow_step",
    "get_v",
    "make_beta_schedule",
    "p_mean_variance",
    "p_sample",
    "predict_eps_from_z_and_v",
    "predict_noise_from_start",
    "predict_start_from_noise",
    "predict_start_from_z_and_v",
    "q_posterior",
    "q_sample",
    "randn_stream",
    "reference",
    "rescale_zero_terminal_snr",
    "set_device_t_check",
    "solver_step",
]
