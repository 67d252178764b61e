"""The flow-matching family (rectified flow: ``x_sigma = (1 - sigma) x0 + sigma eps``, the model predicts
``v = eps - x0``): ``flow_interpolate`` and its backward, the Euler step ``flow_step`` with fused
classifier-free guidance, and ``flow_loss`` with its backward. The step runs ``euler.py``'s kernel, which also
serves the Euler steps on a Karras sigma table, with ``SAMPLER`` flow or flow_stochastic. References:
``ddpm_kernels.reference``'s ``flow_interpolate_ref``, ``flow_step_ref`` (``guided_output``) and
``flow_loss_ref``.

Sigmas. A sigma reaches a kernel as a ``SigmaOperand``'s flat form (``ddpm_kernels._spec``): the element at
offset ``i`` of sample ``b``'s dense block reads ``flat[b * period + (i // repeat) % period]``, in the compute
dtype (``utils.sigma_at``). ``period == 1`` (one sigma per sample, the common case) is a constexpr branch that
loads one scalar per program; per-token sigmas (``SIGMA_PER_TOKEN``) cost one integer division and one cached
load per element.

Kernels, one launch each unless said:

    flow_interpolate_kernel      out = (1 - s) x0 + s noise;  BACKWARD: (1 - s) g and s g in one pass
    flow_step_kernel             ``euler.py`` (after ``guidance.py``'s statistics pass with guidance rescale)
    flow_loss_kernel             one partial sum of weight(s) * err^2 (or |err|) per (sample, tile)
    flow_loss_reduce_kernel      one program: each sample's mean, then the batch mean (fixed order, no atomics)
    flow_loss_backward_kernel    grad * weight(s) * d loss / d err / (B N) for model_output (and +/- for x0 and
                                 noise when they need it), one pass

Autograd: ``flow_interpolate`` w.r.t. ``x0`` and ``noise``; ``flow_loss`` w.r.t. ``model_output``, ``x0`` and
``noise`` (the target ``noise - x0`` is linear, so their gradients are the model output's, negated for noise).
Sigma gradients are left to the reference (the dispatcher sends such calls there). The step is sampling only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._layout import dense_format, in_format
from .euler import NO_OPTIONS, SAMPLER_ID, launch_step
from .guidance import guided_step
from .noise import step_noise, takes_noise
from .utils import (
    sample_means, as_rows, call_op, custom_op_with_out, div_rn, empty_dense, empty_dense_if, launch_reduce,
    launch_per_sample, like_dense, load_tile, loss_term_grad, loss_partials, loss_terms, loss_backward_op, result_dtype,
    sample_tile, sigma_at, split_float, split_scalar, store_partial_sum, store_tile,
)

__all__ = [
    "WEIGHTING_ID",
    "flow_interpolate_kernel",
    "flow_loss_kernel",
    "flow_loss_reduce_kernel",
    "flow_loss_backward_kernel",
    "flow_interpolate",
    "flow_step",
    "flow_loss",
]

WEIGHTING_ID = {"none": 0, "sigma_sqrt": 1, "cosmap": 2}
# cosmap's 2 / pi as two float32s (``split_float``) so float64 data keeps float64 accuracy
_TWO_OVER_PI = split_float(2.0 / math.pi)


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def weighted(value, sigma_ptr, sample, offs_in_sample, mask, period, repeat, two_over_pi_hi, two_over_pi_lo,
             SIGMA_PER_TOKEN: tl.constexpr, WEIGHTING: tl.constexpr):
    """``value`` times SD3's loss weighting of the tile's sigma ``s``: ``sigma_sqrt`` s^-2, ``cosmap``
    2 / (pi (1 - 2 s + 2 s^2)); ``none`` (``WEIGHTING`` 0) is ``value`` itself, no sigma read."""
    if WEIGHTING != 0:
        s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
        if WEIGHTING == 1:
            w = div_rn(1.0, s * s)
        else:
            w = div_rn(split_scalar(two_over_pi_hi, two_over_pi_lo, s.dtype), 1.0 - 2.0 * s + 2.0 * s * s)
        value = w * value
    return value


@triton.jit
def flow_loss_error(model_output_ptr, x0_ptr, noise_ptr, offs, mask, cd: tl.constexpr):
    """The tile's error ``model_output - (noise - x0)`` (the target is the velocity), in ``cd``."""
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    noise = load_tile(noise_ptr, offs, mask, cd)
    x0 = load_tile(x0_ptr, offs, mask, cd)
    return model_output - (noise - x0)


# -------------------------------------------------------------------------------------------------- kernels
@triton.jit
def flow_interpolate_kernel(
    x0_ptr, noise_ptr, sigma_ptr, out_ptr, out_b_ptr, N, period, repeat, batch_start, SIGMA_PER_TOKEN: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK: tl.constexpr
):
    """Forward: ``out = (1 - s) x0 + s noise``. ``BACKWARD``: ``x0`` is the incoming gradient ``g``, ``out =
    (1 - s) g`` and ``out_b = s g`` (``noise`` is not read)."""
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    # math in the sigma's dtype (the compute dtype: float32, float64 for float64 data); one rounding at the store
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    x = load_tile(x0_ptr, offs, mask, cd)
    if not BACKWARD:
        y = load_tile(noise_ptr, offs, mask, cd)
    s = sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, SIGMA_PER_TOKEN)
    if BACKWARD:
        store_tile(out_ptr, offs, (1.0 - s) * x, mask)
        store_tile(out_b_ptr, offs, s * x, mask)
    else:
        store_tile(out_ptr, offs, (1.0 - s) * x + s * y, mask)


@triton.jit
def flow_loss_kernel(
    model_output_ptr, x0_ptr, noise_ptr, sigma_ptr, partial_ptr, period, repeat, two_over_pi_hi, two_over_pi_lo, N,
    n_tiles, batch_start, WEIGHTING: tl.constexpr, SIGMA_PER_TOKEN: tl.constexpr, LOSS_L1: tl.constexpr,
    BLOCK: tl.constexpr
):
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    per_element = loss_terms(flow_loss_error(model_output_ptr, x0_ptr, noise_ptr, offs, mask, cd), LOSS_L1)
    per_element = weighted(per_element, sigma_ptr, sample, offs_in_sample, mask, period, repeat, two_over_pi_hi,
                           two_over_pi_lo, SIGMA_PER_TOKEN, WEIGHTING)
    store_partial_sum(partial_ptr, per_element, mask, sample, n_tiles)


@triton.jit
def flow_loss_reduce_kernel(
    partial_ptr, loss_ptr, B, N, n_tiles, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr
):
    cd: tl.constexpr = partial_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_B,), dtype=cd)
    b0 = 0
    while b0 < B:
        _, in_batch, per_sample = sample_means(partial_ptr, b0, B, N, n_tiles, cd, BLOCK_B, BLOCK_P)
        acc += tl.where(in_batch, per_sample, 0.0)
        b0 += BLOCK_B
    tl.store(loss_ptr, div_rn(tl.sum(acc, axis=0), tl.cast(B, cd)).to(loss_ptr.dtype.element_ty))


@triton.jit
def flow_loss_backward_kernel(
    model_output_ptr, x0_ptr, noise_ptr, sigma_ptr, grad_loss_ptr, grad_model_output_ptr, grad_x0_ptr, grad_noise_ptr,
    period, repeat, two_over_pi_hi, two_over_pi_lo, B, N, batch_start, WEIGHTING: tl.constexpr,
    SIGMA_PER_TOKEN: tl.constexpr, LOSS_L1: tl.constexpr, GRAD_X0: tl.constexpr, GRAD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr
):
    sample, _, offs_in_sample, mask, offs = sample_tile(N, batch_start, BLOCK)
    cd: tl.constexpr = sigma_ptr.dtype.element_ty
    err = flow_loss_error(model_output_ptr, x0_ptr, noise_ptr, offs, mask, cd)
    # the two means' 1 / (B N), with the incoming gradient read from device memory (no host sync)
    grad_scale = div_rn(tl.load(grad_loss_ptr).to(cd), tl.cast(B, cd) * tl.cast(N, cd))
    d_err = loss_term_grad(err, cd, LOSS_L1)
    grad_scale = weighted(grad_scale, sigma_ptr, sample, offs_in_sample, mask, period, repeat, two_over_pi_hi,
                          two_over_pi_lo, SIGMA_PER_TOKEN, WEIGHTING)
    grad = grad_scale * d_err
    store_tile(grad_model_output_ptr, offs, grad, mask)
    # err = model_output - noise + x0
    if GRAD_X0:
        store_tile(grad_x0_ptr, offs, grad, mask)
    if GRAD_NOISE:
        store_tile(grad_noise_ptr, offs, -grad, mask)


# ------------------------------------------------------------------------------------------ flow_interpolate
def _interpolate_launch(x0, noise, sigma, period, repeat, out, out_b=None):
    """Forward (``out_b`` None) into ``out``, or backward of the gradient ``x0`` into ``out`` and ``out_b``."""
    x0, batch, n = as_rows(x0)
    if x0.numel() == 0:
        return
    backward = out_b is not None
    launch_per_sample(
        flow_interpolate_kernel, x0, n, batch, x0, x0 if backward else like_dense(x0, noise), sigma, out,
        out_b if backward else out, n, period, repeat, SIGMA_PER_TOKEN=period > 1, BACKWARD=backward,
    )


def _flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, period: int,
                      repeat: int) -> torch.Tensor:
    """``(1 - s) x0 + s noise`` with ``sigma`` a ``SigmaOperand``'s flat form of ``x0``'s layout, in the
    promoted dtype of ``x0`` and ``noise`` (each read in its own)."""
    out = empty_dense(x0, result_dtype(x0, noise))
    _interpolate_launch(x0, noise, sigma, period, repeat, out)
    return out


def _flow_interpolate_fake(x0, noise, sigma, period, repeat):
    return empty_dense(x0, result_dtype(x0, noise))


# flow_interpolate_out writes into out, which may alias x0 or noise.
flow_interpolate_op, flow_interpolate_out_op = custom_op_with_out(
    "ddpm_kernels_triton::flow_interpolate", _flow_interpolate, _flow_interpolate_fake,
    lambda x0, noise, sigma, period, repeat, out: _interpolate_launch(x0, noise, sigma, period, repeat, out),
)


@torch.library.custom_op("ddpm_kernels_triton::flow_interpolate_backward", mutates_args=())
def flow_interpolate_backward_op(
    grad: torch.Tensor, sigma: torch.Tensor, period: int, repeat: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - s) grad, s grad)`` in one pass, in ``grad``'s dense format (which must be the forward's)."""
    grad_x0, grad_noise = empty_dense(grad), empty_dense(grad)
    _interpolate_launch(grad, None, sigma, period, repeat, grad_x0, grad_noise)
    return grad_x0, grad_noise


@flow_interpolate_backward_op.register_fake
def _(grad, sigma, period, repeat):
    return empty_dense(grad), empty_dense(grad)


def _interpolate_setup_context(ctx, inputs, output):
    x0, _, sigma, period, repeat = inputs
    ctx.save_for_backward(sigma)
    ctx.period, ctx.repeat = period, repeat
    # a per-element sigma is laid out in the forward's storage order: the gradient must be read in it
    ctx.memory_format = dense_format(x0)


def _interpolate_backward(ctx, grad):
    (sigma,) = ctx.saved_tensors
    grad_x0, grad_noise = flow_interpolate_backward_op(in_format(grad, ctx.memory_format), sigma, ctx.period,
                                                       ctx.repeat)
    return (grad_x0 if ctx.needs_input_grad[0] else None, grad_noise if ctx.needs_input_grad[1] else None,
            None, None, None)


flow_interpolate_op.register_autograd(_interpolate_backward, setup_context=_interpolate_setup_context)


def _interpolate_backward_setup_context(ctx, inputs, output):
    grad, sigma, period, repeat = inputs
    ctx.save_for_backward(sigma)
    ctx.period, ctx.repeat, ctx.memory_format = period, repeat, dense_format(grad)


def _interpolate_backward_backward(ctx, gg_x0, gg_noise):
    """The backward is linear in ``grad``: its adjoint ``(1 - s) gg_x0 + s gg_noise`` is the forward, read in
    the layout the per-element sigma was laid out in."""
    if not ctx.needs_input_grad[0] or (gg_x0 is None and gg_noise is None):
        return None, None, None, None
    (sigma,) = ctx.saved_tensors
    like = gg_noise if gg_x0 is None else gg_x0
    gg_x0 = torch.zeros_like(like) if gg_x0 is None else gg_x0
    gg_noise = torch.zeros_like(like) if gg_noise is None else gg_noise
    grad = flow_interpolate_op(in_format(gg_x0, ctx.memory_format), in_format(gg_noise, ctx.memory_format), sigma,
                               ctx.period, ctx.repeat)
    return grad, None, None, None


flow_interpolate_backward_op.register_autograd(_interpolate_backward_backward,
                                              setup_context=_interpolate_backward_setup_context)


def flow_interpolate(x0, noise, sigma, out=None):
    """Backend entry with ``reference.flow_interpolate_ref``'s signature (``sigma`` a ``SigmaOperand``)."""
    args = (x0, noise, sigma.flat.detach(), sigma.period, sigma.repeat)
    return call_op(flow_interpolate_op, flow_interpolate_out_op, args, out, differentiable=(x0, noise))


# ------------------------------------------------------------------------------------------------ flow_step

def _step_launch(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, stochastic, guidance_rescale, noise, seed, philox_seed, philox_offset, sample_offset,
                 out):
    """``flow_step_op``'s arguments and ``out``."""
    sampler = SAMPLER_ID["flow_stochastic" if stochastic else "flow"]
    launch_step(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                repeat_next, sampler, 0, NO_OPTIONS, guidance_rescale, noise, seed, philox_seed, philox_offset,
                sample_offset, out)


@takes_noise
@guided_step
def _flow_step(
    sample, model_output, uncond, guidance, sigma: torch.Tensor, sigma_next: torch.Tensor,
    step_index: Optional[torch.Tensor], period: int, repeat: int, period_next: int, repeat_next: int, stochastic: bool,
    guidance_rescale: float, noise, seed, philox_seed, philox_offset, sample_offset
) -> torch.Tensor:
    """One Euler step. ``step_index`` given: ``sigma`` is the sigma table (``sigma_next`` too, unread) and each
    sample gathers its pair; else ``sigma`` / ``sigma_next`` are ``SigmaOperand`` flat forms with their
    ``period`` and ``repeat``. ``guidance`` (B,) given: ``model_output`` is the conditional output and
    ``uncond`` the unconditional one. Noise keyed as in ``p_sample`` (``noise.py``). The result has the
    promoted dtype of the float operands, each read in its own (``sigma``: the compute dtype)."""
    out = empty_dense(sample, result_dtype(sample, model_output, uncond, noise))
    _step_launch(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat, period_next,
                 repeat_next, stochastic, guidance_rescale, noise, seed, philox_seed, philox_offset, sample_offset, out)
    return out


def _flow_step_fake(sample, model_output, uncond, guidance, sigma, sigma_next, step_index, period, repeat,
                    period_next, repeat_next, stochastic, guidance_rescale, noise, *_):
    return empty_dense(sample, result_dtype(sample, model_output, uncond, noise))


# flow_step_out writes into out, which may be sample itself (an in-place step).
flow_step_op, flow_step_out_op = custom_op_with_out(
    "ddpm_kernels_triton::flow_step", _flow_step, _flow_step_fake, _step_launch
)


def flow_step(sample, model_output, uncond, guidance, sigmas, step_index, sigma, sigma_next, opts, noise=None,
              generator=None, out=None, sample_offset=0):
    """Backend entry with ``reference.flow_step_ref``'s signature (``opts`` a ``FlowStepOptions``)."""
    if sigmas is not None:
        sigma_args = (sigmas, sigmas, step_index, 1, 1, 1, 1)
    else:
        sigma_args = (sigma.flat.detach(), sigma_next.flat.detach(), None, sigma.period, sigma.repeat,
                      sigma_next.period, sigma_next.repeat)
    noise_args = step_noise(opts.stochastic, generator, sample, noise)
    guided = opts.guided
    args = (
        sample, model_output, uncond if guided else None, guidance if guided else None, *sigma_args,
        opts.stochastic, float(opts.guidance_rescale) if guided else 0.0, *noise_args, sample_offset,
    )
    return call_op(flow_step_op, flow_step_out_op, args, out)


# ------------------------------------------------------------------------------------------------ flow_loss
REDUCE_BLOCK_B = 32
REDUCE_BLOCK_P = 128


def _flow_loss(
    model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, period: int, repeat: int,
    weighting: int, loss_l1: bool
) -> torch.Tensor:
    """The 0-d loss in the sigma's dtype (the compute dtype)."""
    model_output, batch, n = as_rows(model_output)
    x0, noise = like_dense(model_output, x0), like_dense(model_output, noise)
    device = model_output.device
    if model_output.numel() == 0:
        # a mean over nothing: NaN, as torch's mean gives
        return torch.full((), float("nan"), dtype=sigma.dtype, device=device)
    loss = torch.empty((), dtype=sigma.dtype, device=device)
    config, n_tiles, partial = loss_partials(model_output, n, batch, sigma.dtype)
    launch_per_sample(
        flow_loss_kernel, model_output, n, batch, model_output, x0, noise, sigma, partial, period, repeat,
        *_TWO_OVER_PI, n, n_tiles, WEIGHTING=weighting, SIGMA_PER_TOKEN=period > 1, LOSS_L1=loss_l1, config=config,
    )
    launch_reduce(flow_loss_reduce_kernel, model_output, batch, n_tiles, REDUCE_BLOCK_B, REDUCE_BLOCK_P, partial,
                  loss, batch, n, n_tiles)
    return loss


flow_loss_op = torch.library.custom_op("ddpm_kernels_triton::flow_loss", _flow_loss, mutates_args=())


@flow_loss_op.register_fake
def _(model_output, x0, noise, sigma, period, repeat, weighting, loss_l1):
    return sigma.new_empty(())


def _loss_gradients(model_output, x0, noise, grad_x0_needed: bool, grad_noise_needed: bool) -> tuple:
    """The loss backward's outputs: each gradient in its input's dtype (a mixed call's bf16 model output gets a
    bf16 gradient, stored once), in ``model_output``'s dense format; one not needed has zero elements."""
    return (empty_dense(model_output), empty_dense_if(grad_x0_needed, model_output, x0.dtype),
            empty_dense_if(grad_noise_needed, model_output, noise.dtype))


def _flow_loss_backward(grad_loss, model_output, x0, noise, sigma, period, repeat, weighting, loss_l1,
                        grad_x0_needed, grad_noise_needed):
    """(grad_model_output, grad_x0, grad_noise), in ``model_output``'s dense format, each in its input's dtype;
    a gradient not needed comes back as an empty tensor."""
    model_output, batch, n = as_rows(model_output)
    x0, noise = like_dense(model_output, x0), like_dense(model_output, noise)
    grad_model_output, grad_x0, grad_noise = _loss_gradients(model_output, x0, noise, grad_x0_needed,
                                                             grad_noise_needed)
    if model_output.numel() == 0:
        return grad_model_output, grad_x0, grad_noise
    launch_per_sample(
        flow_loss_backward_kernel, model_output, n, batch, model_output, x0, noise, sigma, grad_loss.contiguous(),
        grad_model_output, grad_x0 if grad_x0_needed else grad_model_output,
        grad_noise if grad_noise_needed else grad_model_output, period, repeat, *_TWO_OVER_PI, batch, n,
        WEIGHTING=weighting, SIGMA_PER_TOKEN=period > 1, LOSS_L1=loss_l1, GRAD_X0=grad_x0_needed,
        GRAD_NOISE=grad_noise_needed,
    )
    return grad_model_output, grad_x0, grad_noise


# the backward takes the incoming gradient, the forward's arguments and which input gradients are needed;
# gradients of its gradients are registered with it
flow_loss_backward_op = loss_backward_op("ddpm_kernels_triton::flow_loss_backward", _flow_loss_backward, _flow_loss,
                                         ("grad_loss",), ("grad_x0_needed", "grad_noise_needed"))


@flow_loss_backward_op.register_fake
def _(grad_loss, model_output, x0, noise, sigma, period, repeat, weighting, loss_l1, grad_x0_needed,
      grad_noise_needed):
    return _loss_gradients(model_output, x0, noise, grad_x0_needed, grad_noise_needed)


def _loss_setup_context(ctx, inputs, output):
    model_output, x0, noise, sigma, period, repeat, weighting, loss_l1 = inputs
    ctx.save_for_backward(model_output, x0, noise, sigma)
    ctx.config = (period, repeat, weighting, loss_l1)


def _loss_backward(ctx, grad_loss):
    model_output, x0, noise, sigma = ctx.saved_tensors
    need_x0, need_noise = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_model_output, grad_x0, grad_noise = flow_loss_backward_op(
        grad_loss, model_output, x0, noise, sigma, *ctx.config, need_x0, need_noise
    )
    return (grad_model_output if ctx.needs_input_grad[0] else None, grad_x0 if need_x0 else None,
            grad_noise if need_noise else None, None, None, None, None, None)


flow_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def flow_loss(model_output, x0, noise, sigma, weighting="none", loss_type="l2"):
    """Backend entry with ``reference.flow_loss_ref``'s signature (``sigma`` a ``SigmaOperand``)."""
    return flow_loss_op(model_output, x0, noise, sigma.flat.detach(), sigma.period, sigma.repeat,
                        WEIGHTING_ID[weighting], loss_type == "l1")
