"""Triton backend: one kernel per family of ops, specialised by constexpr flags, registered as
``torch.library`` custom ops under ``ddpm_kernels_triton::`` so they work under ``torch.compile`` and
``torch.library.opcheck``.

Families (one module each): ``pair`` (``out = A_t a + B_t b``: q_sample, predict_start_from_noise,
predict_noise_from_start, get_v, predict_start_from_z_and_v, predict_eps_from_z_and_v, and every pair's
backward), ``posterior`` (q_posterior, p_mean_variance, p_sample), ``sampler_step`` (ddim_step, ddpm_step:
one kernel, a coefficient function per sampler, guidance fused), ``loss`` (diffusion_loss and its backward),
``threshold`` (dynamic_threshold), ``flow`` (flow matching: flow_interpolate, flow_step with fused guidance,
flow_loss, and their backwards), ``euler`` (the step kernel on sigmas that flow_step runs and that serves
euler_step and euler_ancestral_step, the Euler steps on a Karras sigma table, with their own coefficient
function) and ``solver`` (solver_step: the multistep solvers' step on a coefficient table, with its history
ring). ``guidance`` holds the guided steps' rescale statistics pass, ``noise`` the in-kernel Philox noise and its
key; ``utils`` what they all share: tiles, loads and stores, the coefficient gather, the launch table,
registration.

Ops run on CUDA tensors (compiled) and, when ``TRITON_INTERPRET=1`` was set before triton was first imported,
on CPU tensors through Triton's interpreter (how the tests run without a GPU).

Registration is ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` around the Triton
launch; the backward operators have autograd of their own (gradients of gradients; ``utils``). Float operands
of different dtypes are read each in its own dtype by the ops in ``TritonBackend.mixed_dtypes``. ``triton_op`` + ``wrap_triton`` (which would let inductor trace into the kernels) was tried: under the
interpreter it fails ``opcheck``'s fake-tensor test and ``torch.compile`` (the interpreter reads data pointers
of fake tensors), so the one registration that works on both CPU and GPU is used. Inductor treats the ops as
opaque calls, which loses nothing: each already is one fused pass.

The backend never runs the reference itself: what it does not serve it says (``declines``,
``unavailable_reason``), and the dispatcher (``ddpm_kernels.backends``) picks the reference.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Optional

import torch

from .._spec import EulerStepOptions
from .euler import euler_step
from .flow import flow_interpolate, flow_loss, flow_step
from .loss import diffusion_loss
from .pair import ENTRIES as PAIR_ENTRIES
from .pair import PAIR_OPS
from .posterior import p_mean_variance, p_sample, q_posterior
from .sampler_step import SAMPLERS, VARIANCE_ID, sampler_step
from .solver import solver_step
from .threshold import dynamic_threshold
from .utils import INTERPRETED

__all__ = ["BACKEND", "TritonBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TritonBackend:
    """The backend object ``ddpm_kernels.backends`` dispatches to.

    * ``ops``: op name -> function with the reference's signature, except the sampler steps, which take
      ``(x_t, t, t_prev, model_output, schedule, opts, noise=None, generator=None, out=None, uncond=None,
      guidance=None)`` with ``opts`` a ``ddpm_kernels._spec.StepOptions`` (guided: ``uncond`` and the per-sample
      ``guidance`` given).
    * ``differentiable``: op name -> the tensor arguments its kernels give gradients for; ops not listed are
      sampling only (the dispatcher detaches their inputs).
    * ``declines(op, opts)``: None when the backend serves ``op`` with these options (``opts``: the step's
      ``StepOptions``; other ops' options are all served), else why not: a sampler without a coefficient
      function here.
    * ``unavailable_reason(device, dtype)``: None when it runs tensors of that device and dtype, else why not.
    """

    name = "triton"
    ops = {
        **PAIR_ENTRIES,
        "q_posterior": q_posterior,
        "p_mean_variance": p_mean_variance,
        "p_sample": p_sample,
        "diffusion_loss": diffusion_loss,
        # one step kernel (guidance fused); with guidance_rescale, a per-sample statistics pass comes first, with
        # threshold_ratio an x0 pass and a per-sample sort
        "ddim_step": sampler_step,
        "ddpm_step": sampler_step,
        "dynamic_threshold": dynamic_threshold,
        # one step kernel; with guidance_rescale, a per-sample statistics pass comes first
        "flow_interpolate": flow_interpolate,
        "flow_step": flow_step,
        "flow_loss": flow_loss,
        # the flow step's kernel with the Euler samplers' coefficients; with guidance_rescale, a per-sample
        # statistics pass comes first
        "euler_step": euler_step,
        "euler_ancestral_step": euler_step,
        # one step kernel gathering the solver's coefficient row, reading and writing the history ring; with
        # guidance_rescale a statistics pass first, with threshold_ratio an x0 pass and a per-sample sort
        "solver_step": solver_step,
    }
    differentiable: Dict[str, FrozenSet[str]] = {
        **{name: frozenset(args) - {"t"} for name, args in PAIR_OPS.items()},
        # the mean; the variances are table gathers
        "q_posterior": frozenset({"x_start", "x_t"}),
        # x_start and noise where the target depends on them (x0 / v, eps / v); None otherwise, as the reference
        "diffusion_loss": frozenset({"model_output", "x_start", "noise"}),
        # sigma gradients are left to the reference
        "flow_interpolate": frozenset({"x0", "noise"}),
        "flow_loss": frozenset({"model_output", "x0", "noise"}),
    }

    # ops whose kernels read each float operand in its own dtype (a bf16 model output with fp32 data): results in
    # the promoted dtype, computed in its compute dtype, gradients in each input's dtype; no cast pass first
    # (docs/design.md, "Mixed precision")
    mixed_dtypes: FrozenSet[str] = frozenset({*PAIR_OPS, "q_posterior", "p_mean_variance", "p_sample", "diffusion_loss",
                                            "ddim_step", "ddpm_step", "flow_interpolate", "flow_step", "flow_loss",
                                            "euler_step", "euler_ancestral_step", "solver_step"})

    @staticmethod
    def declines(op: str, opts=None) -> Optional[str]:
        # an op without a kernel is not declined but missing (`ops`): the dispatcher tells the two apart
        # the DDIM/DDPM step family's options are the ones it checks; the Euler steps serve all of theirs
        if opts is None or not hasattr(opts, "sampler") or isinstance(opts, EulerStepOptions):
            return None
        if opts.sampler not in SAMPLERS:
            return f"the Triton sampler step has no coefficient function for sampler={opts.sampler!r}"
        if opts.sampler == "ddpm" and opts.variance_type not in VARIANCE_ID:
            return f"the Triton DDPM step has no variance_type={opts.variance_type!r}"
        return None

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
