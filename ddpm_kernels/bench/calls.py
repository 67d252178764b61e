"""Every public op once, as a call: the coverage list of compute-sanitizer's script
(``benchmarks/gpu/sanitize.py``) and of the GPU tests that watch every call (no host synchronization).

Each op is called with noise given and drawn in the kernel, in place and not, guided and not, with the options
that take a kernel's other paths (thresholding and guidance rescale run a reduction first), on one backend,
dtype and shape.
"""

from __future__ import annotations

import torch

__all__ = ["calls"]


def calls(backend, dtype, shape, s, unaligned=False, device="cuda", low=None):
    """(pointwise, reductions): name -> call of every op, noise given and drawn in-kernel, on one backend,
    dtype and shape; with ``low``, the model outputs and the noise in that dtype (a mixed call)."""
    import ddpm_kernels as dk
    from ddpm_kernels.solvers import SolverColumns, new_history, solver_step

    def randn(*sh, dtype=dtype):
        if unaligned:  # a view 1 element into its storage: not 16-byte aligned
            n = 1
            for d in sh:
                n *= d
            return torch.randn(n + 1, device=device, dtype=dtype)[1:].view(sh)
        return torch.randn(sh, device=device, dtype=dtype)

    B = shape[0]
    x, mo, z = randn(*shape), randn(*shape, dtype=low or dtype), randn(*shape, dtype=low or dtype)
    wide = torch.cat([mo, z.clamp(-1, 1)], 1)
    T = s.num_timesteps
    t = torch.randint(0, T, (B,), device=device)
    t[0] = 0
    t[-1] = T - 1
    t_prev = (t - 20).clamp(min=-1)
    buf = x.clone()
    b = backend

    def loss_backward(param, loss_type):
        m = mo.detach().clone().requires_grad_(True)
        loss = dk.diffusion_loss(m, x, z, t, s, param, loss_type, 0.7, 0.3, backend=b)[0]
        return torch.autograd.grad(loss, m)

    def q_sample_backward():
        a, n = x.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
        return torch.autograd.grad(dk.q_sample(a, t, n, s, backend=b).sum(), (a, n))

    pointwise = {
        "q_sample": lambda: dk.q_sample(x, t, z, s, backend=b),
        "q_sample out=": lambda: dk.q_sample(x, t, z, s, backend=b, out=buf),
        "q_sample backward": q_sample_backward,
        "predict_start_from_noise": lambda: dk.predict_start_from_noise(x, t, z, s, backend=b),
        "predict_noise_from_start": lambda: dk.predict_noise_from_start(x, t, z, s, backend=b),
        "get_v": lambda: dk.get_v(x, z, t, s, backend=b),
        "predict_start_from_z_and_v": lambda: dk.predict_start_from_z_and_v(x, t, z, s, backend=b),
        "predict_eps_from_z_and_v": lambda: dk.predict_eps_from_z_and_v(x, t, z, s, backend=b),
        "q_posterior": lambda: dk.q_posterior(x, z, t, s, backend=b),
        "p_mean_variance eps": lambda: dk.p_mean_variance(x, t, mo, s, "eps", True, backend=b),
        "p_mean_variance v": lambda: dk.p_mean_variance(x, t, mo, s, "v", False, backend=b),
        "p_sample noise": lambda: dk.p_sample(x, t, mo, s, "x0", True, z, backend=b),
        "p_sample in-kernel noise": lambda: dk.p_sample(x, t, mo, s, backend=b),
        "p_sample in place": lambda: dk.p_sample(buf, t, mo, s, backend=b, out=buf),
        "ddpm_step fixed_small": lambda: dk.ddpm_step(x, t, t_prev, mo, s, backend=b),
        "ddpm_step learned_range": lambda: dk.ddpm_step(x, t, t_prev, wide, s, "v", "learned_range", noise=z,
                                                        backend=b),
        "ddpm_step out= pred_x0": lambda: dk.ddpm_step(x, t, t_prev, mo, s, backend=b, out=buf, return_pred_x0=True),
        "ddim_step eta=0": lambda: dk.ddim_step(x, t, t_prev, mo, s, 0.0, backend=b),
        "ddim_step eta=1": lambda: dk.ddim_step(x, t, t_prev, mo, s, 1.0, "eps", True, backend=b),
    }
    # the flow family: table and per-token sigmas, guidance (one kernel) and its rescale (a reduction first)
    sigmas = torch.linspace(1.0, 0.0, 29, device=device)
    index = torch.randint(0, 28, (B,), device=device)
    sigma = torch.rand(B, device=device) * 0.9 + 0.05
    per_token = (torch.rand(shape[:2], device=device) * 0.9 + 0.05).reshape(shape[:2] + (1,) * (len(shape) - 2))
    both = torch.cat([z, mo])
    karras = torch.cat([torch.logspace(1.16, -1.5, 28, device=device), torch.zeros(1, device=device)])
    table3 = torch.randn((28, SolverColumns(3).width), device=device, dtype=torch.float64) * 0.3
    table0 = torch.randn((28, SolverColumns(0).width), device=device, dtype=torch.float64) * 0.3
    ring3, last = new_history(x, 3).normal_(), torch.randn_like(x)
    pointwise.update({
        "flow_interpolate": lambda: dk.flow_interpolate(x, z, sigma, backend=b),
        "flow_interpolate per token out=": lambda: dk.flow_interpolate(x, z, per_token, backend=b, out=buf),
        "flow_interpolate backward": lambda: _flow_interpolate_backward(dk, x, z, sigma, b),
        "flow_step": lambda: dk.flow_step(x, mo, sigmas, index, backend=b),
        "flow_step in place": lambda: dk.flow_step(buf, mo, sigmas, index, backend=b, out=buf),
        "flow_step per token stochastic": lambda: dk.flow_step(x, mo, sigma=per_token, sigma_next=per_token * 0.8,
                                                               stochastic=True, backend=b),
        "flow_step guided": lambda: dk.flow_step(x, both, sigmas, index, guidance_scale=4.0, backend=b),
        "ddim_step guided": lambda: dk.ddim_step(x, t, t_prev, both, s, 0.5, guidance_scale=3.0, backend=b),
        "euler_step churn in-kernel noise": lambda: dk.euler_step(x, mo, karras, index, s_churn=2.0, backend=b),
        "euler_step v out= pred_x0": lambda: dk.euler_step(x, mo, karras, index, "v_prediction", backend=b, out=buf,
                                                          return_pred_x0=True),
        "euler_ancestral_step guided": lambda: dk.euler_ancestral_step(x, both, karras, index, guidance_scale=4.0,
                                                                       backend=b),
        # the solver step: a ring of 3 (slot reads and the write in one pass), the last-sample buffer, noise
        "solver_step ring": lambda: solver_step(x, mo, table3, index, ring3, last, backend=b),
        "solver_step ring in place sde": lambda: solver_step(buf, mo, table3, index, ring3, last, stochastic=True,
                                                             backend=b, out=buf),
        "solver_step no ring noise": lambda: solver_step(x, mo, table0, index, None, None, noise=z, backend=b),
        "solver_step guided": lambda: solver_step(x, both, table3, index, ring3, None, guidance_scale=3.0,
                                                  backend=b),
    })
    reductions = {
        "solver_step guided rescale": lambda: solver_step(x, both, table3, index, ring3, last, guidance_scale=3.0,
                                                          guidance_rescale=0.7, backend=b),
        "solver_step threshold": lambda: solver_step(x, mo, table3, index, ring3, last, threshold_ratio=0.9,
                                                     backend=b),
        "flow_step guided rescale": lambda: dk.flow_step(x, both, sigmas, index, guidance_scale=4.0,
                                                         guidance_rescale=0.7, backend=b),
        "ddpm_step guided rescale": lambda: dk.ddpm_step(x, t, t_prev, both, s, guidance_scale=3.0,
                                                         guidance_rescale=0.7, backend=b),
        "flow_loss cosmap l2": lambda: dk.flow_loss(mo, x, z, sigma, "cosmap", backend=b),
        "flow_loss backward per token l1": lambda: _flow_loss_backward(dk, mo, x, z, per_token, b),
        "diffusion_loss eps l2": lambda: dk.diffusion_loss(mo, x, z, t, s, "eps", "l2", backend=b),
        "diffusion_loss v l1": lambda: dk.diffusion_loss(mo, x, z, t, s, "v", "l1", 0.7, 0.3, backend=b),
        "diffusion_loss backward eps l2": lambda: loss_backward("eps", "l2"),
        "diffusion_loss backward x0 l1": lambda: loss_backward("x0", "l1"),
        "dynamic_threshold": lambda: dk.dynamic_threshold(x * 3, 0.9, 2.0, backend=b),
        "ddim_step threshold": lambda: dk.ddim_step(x, t, t_prev, mo, s, 0.5, "x0", threshold_ratio=0.9, backend=b),
        "ddpm_step threshold": lambda: dk.ddpm_step(x, t, t_prev, mo, s, threshold_ratio=0.9, backend=b),
    }
    return pointwise, reductions


def _flow_interpolate_backward(dk, x, z, sigma, backend):
    a, n = x.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    return torch.autograd.grad(dk.flow_interpolate(a, n, sigma, backend=backend).sum(), (a, n))


def _flow_loss_backward(dk, mo, x, z, sigma, backend):
    m = mo.detach().clone().requires_grad_(True)
    return torch.autograd.grad(dk.flow_loss(m, x, z, sigma, "sigma_sqrt", "l1", backend=backend), m)
