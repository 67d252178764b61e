"""Triton backend: each per-timestep op as one fused kernel, registered as
``torch.library`` custom ops under ``ddpm_kernels_triton::`` so they work under ``torch.compile`` and
``torch.library.opcheck``.

Ops run on CUDA tensors (compiled) and, when ``TRITON_INTERPRET=1`` was set before triton was first imported,
on CPU tensors through Triton's interpreter (how the tests run without a GPU).

Registration is ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` around the Triton
launch. ``triton_op`` + ``wrap_triton`` (which would let inductor trace into the kernels) was tried: under the
interpreter it fails ``opcheck``'s fake-tensor test and ``torch.compile`` (the interpreter reads data pointers
of fake tensors), so the one registration that works on both CPU and GPU is used. Inductor treats the ops as
opaque calls, which loses nothing: each already is one fused pass.

The pair ops (``out = A_t a + B_t b``: q_sample, predict_start_from_noise, predict_noise_from_start, get_v,
predict_start_from_z_and_v, predict_eps_from_z_and_v) are one kernel, ``pair.pair_kernel``; q_posterior,
p_mean_variance and p_sample are another, ``posterior.posterior_kernel``; ddim_step and ddpm_step a third,
``sampler_step.sampler_step_kernel``, with a coefficient function per sampler.

Autograd: every pair op (both tensor inputs), ``q_posterior`` (mean
w.r.t. x_start, x_t) and ``diffusion_loss`` (model_output, and x_start / noise where the target depends on
them). ``p_mean_variance``, ``p_sample``, ``ddim_step`` and ``ddpm_step`` have no backward (sampling only).
"""

from __future__ import annotations

from typing import Optional

import torch

from .utils import INTERPRETED

from .loss import diffusion_loss
from .threshold import dynamic_threshold
from .pair import ENTRIES as PAIR_ENTRIES
from .posterior import p_mean_variance, p_sample, q_posterior
from .sampler_step import sampler_step

__all__ = ["BACKEND", "TritonBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TritonBackend:
    name = "triton"
    differentiable = {
        "q_sample": frozenset(("x_start", "noise")),
        "predict_start_from_noise": frozenset(("x_t", "noise")),
        "q_posterior": frozenset(("x_start", "x_t")),
        "diffusion_loss": frozenset(("model_output", "x_start", "noise")),
    }

    @staticmethod
    def declines(op, opts):
        return None

    ops = {
        **PAIR_ENTRIES,
        "q_posterior": q_posterior,
        "p_mean_variance": p_mean_variance,
        "p_sample": p_sample,
        "diffusion_loss": diffusion_loss,
        # one step kernel; with threshold_ratio, an x0 pass and a per-sample sort come first
        "ddim_step": sampler_step,
        "ddpm_step": sampler_step,
        "dynamic_threshold": dynamic_threshold,
    }

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if dtype not in _DTYPES:
            return f"the Triton kernels take float16, bfloat16, float32 or float64 data, not {dtype}"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if INTERPRETED:
                return None
            return (
                "Triton compiles for GPUs; CPU tensors run only through Triton's interpreter, enabled by setting "
                "TRITON_INTERPRET=1 before triton is first imported (slow: for tests)"
            )
        return f"the Triton backend runs CUDA tensors, not {device.type}"


BACKEND = TritonBackend()
