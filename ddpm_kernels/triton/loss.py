"""The loss family: ``diffusion_loss``, the seed's ``p_losses`` after the model call, ``(loss, loss_simple, loss_vlb)``,
and its backward. Reference: ``ddpm_kernels.reference.diffusion_loss_ref``.

Forward is two launches: ``diffusion_loss_kernel`` streams ``model_output`` and the target inputs once and
writes one partial sum per (sample, tile); ``diffusion_loss_reduce_kernel`` (a single program) sums each
sample's partials in a fixed order, weights samples by ``lvlb_weights[t]`` and writes the three scalars. A
grid-wide reduction needs either this second launch or atomics; atomics would make the loss depend on
program scheduling (float addition is not associative), and a fixed-order loss is worth a one-program launch.

Backward is one launch that writes the gradient for ``model_output`` and, when they require grad, for the
target inputs (``noise`` for eps, ``x_start`` for x0, both for v): all are a per-sample scale of the same
per-element derivative, so the extra gradients cost one store each and no extra reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pair import GET_V, pair_coefficients
from .utils import (
    sample_means, div_rn, empty_dense, empty_dense_if, like_dense, loss_backward_op, result_dtype, PARAMETERIZATION_ID,
    ROW, as_rows, gather_coefficient, launch_reduce, launch_per_sample, load_tile, loss_partials, loss_term_grad,
    loss_terms, sample_tile, split_float, split_scalar, store_partial_sum, store_tile,
)

__all__ = ["diffusion_loss_kernel", "diffusion_loss_reduce_kernel", "diffusion_loss_backward_kernel", "diffusion_loss"]


@triton.jit
def _target(x_start_ptr, noise_ptr, offs, mask, t, table_ptr, T, PARAMETERIZATION: tl.constexpr, cd: tl.constexpr):
    if PARAMETERIZATION == 0:  # eps: the model predicts the noise
        target = load_tile(noise_ptr, offs, mask, cd)
    elif PARAMETERIZATION == 1:  # x0
        target = load_tile(x_start_ptr, offs, mask, cd)
    else:  # v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, the pair op get_v
        noise = load_tile(noise_ptr, offs, mask, cd)
        x_start = load_tile(x_start_ptr, offs, mask, cd)
        coef_x_start, coef_noise = pair_coefficients(table_ptr, t, T, GET_V)
        target = coef_noise * noise + coef_x_start * x_start
    return target


@triton.jit
def loss_tile(model_output_ptr, t_ptr, N, batch_start, cd: tl.constexpr, BLOCK: tl.constexpr):
    """The prologue of both elementwise loss kernels: ``(sample, mask, offs, t, model_output)``, this program's
    tile (``sample_tile``), its sample's ``t`` and the tile of ``model_output`` in ``cd``."""
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    # Data loads before the t -> coefficient chain (see pair_kernel).
    model_output = load_tile(model_output_ptr, offs, mask, cd)
    t = tl.load(t_ptr + sample)
    return sample, mask, offs, t, model_output


@triton.jit
def diffusion_loss_kernel(
    model_output_ptr, x_start_ptr, noise_ptr, t_ptr, table_ptr, partial_ptr, N, T, batch_start, n_tiles,
    PARAMETERIZATION: tl.constexpr, LOSS_L1: tl.constexpr, BLOCK: tl.constexpr
):
    cd: tl.constexpr = table_ptr.dtype.element_ty
    sample, mask, offs, t, model_output = loss_tile(model_output_ptr, t_ptr, N, batch_start, cd, BLOCK)
    target = _target(x_start_ptr, noise_ptr, offs, mask, t, table_ptr, T, PARAMETERIZATION, cd)
    store_partial_sum(partial_ptr, loss_terms(model_output - target, LOSS_L1), mask, sample, n_tiles)


@triton.jit
def diffusion_loss_reduce_kernel(
    partial_ptr, t_ptr, table_ptr, loss_ptr, loss_simple_ptr, loss_vlb_ptr, B, N, T, n_tiles, l_simple_weight_hi,
    l_simple_weight_lo, original_elbo_weight_hi, original_elbo_weight_lo, ROW_LVLB: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr
):
    cd: tl.constexpr = table_ptr.dtype.element_ty
    simple_acc = tl.zeros((BLOCK_B,), dtype=cd)
    vlb_acc = tl.zeros((BLOCK_B,), dtype=cd)
    b0 = 0
    while b0 < B:  # while, not range(): see sample_means
        samples, in_batch, per_sample = sample_means(partial_ptr, b0, B, N, n_tiles, cd, BLOCK_B, BLOCK_P)
        t = tl.load(t_ptr + samples, mask=in_batch, other=0)
        t_in_range = (t >= 0) & (t < T)
        lvlb_weight = tl.load(
            table_ptr + ROW_LVLB * T + tl.where(t_in_range, t, 0), mask=in_batch & t_in_range, other=float("nan")
        )
        simple_acc += tl.where(in_batch, per_sample, 0.0)
        vlb_acc += tl.where(in_batch, lvlb_weight * per_sample, 0.0)
        b0 += BLOCK_B
    loss_simple = div_rn(tl.sum(simple_acc, axis=0), tl.cast(B, cd))
    loss_vlb = div_rn(tl.sum(vlb_acc, axis=0), tl.cast(B, cd))
    l_simple_weight = split_scalar(l_simple_weight_hi, l_simple_weight_lo, cd)
    original_elbo_weight = split_scalar(original_elbo_weight_hi, original_elbo_weight_lo, cd)
    loss = l_simple_weight * loss_simple + original_elbo_weight * loss_vlb
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(loss_simple_ptr, loss_simple.to(loss_simple_ptr.dtype.element_ty))
    tl.store(loss_vlb_ptr, loss_vlb.to(loss_vlb_ptr.dtype.element_ty))


@triton.jit
def diffusion_loss_backward_kernel(
    model_output_ptr, x_start_ptr, noise_ptr, t_ptr, table_ptr, grad_loss_ptr, grad_loss_simple_ptr, grad_loss_vlb_ptr,
    grad_model_output_ptr, grad_x_start_ptr, grad_noise_ptr, B, N, T, batch_start, l_simple_weight_hi,
    l_simple_weight_lo, original_elbo_weight_hi, original_elbo_weight_lo, PARAMETERIZATION: tl.constexpr,
    LOSS_L1: tl.constexpr, GRAD_X_START: tl.constexpr, GRAD_NOISE: tl.constexpr, ROW_LVLB: tl.constexpr,
    BLOCK: tl.constexpr
):
    cd: tl.constexpr = table_ptr.dtype.element_ty
    sample, mask, offs, t, model_output = loss_tile(model_output_ptr, t_ptr, N, batch_start, cd, BLOCK)
    lvlb_weight = gather_coefficient(table_ptr, ROW_LVLB, t, T)
    l_simple_weight = split_scalar(l_simple_weight_hi, l_simple_weight_lo, cd)
    original_elbo_weight = split_scalar(original_elbo_weight_hi, original_elbo_weight_lo, cd)
    # d(loss, loss_simple, loss_vlb) / d(per_sample[b]), contracted with the incoming gradients (read from
    # device memory: no host sync), and the two means' 1 / (B N).
    grad_per_sample = div_rn(
        tl.load(grad_loss_ptr).to(cd) * (l_simple_weight + original_elbo_weight * lvlb_weight)
        + tl.load(grad_loss_simple_ptr).to(cd)
        + tl.load(grad_loss_vlb_ptr).to(cd) * lvlb_weight,
        tl.cast(B, cd) * tl.cast(N, cd),
    )
    target = _target(x_start_ptr, noise_ptr, offs, mask, t, table_ptr, T, PARAMETERIZATION, cd)
    grad_model_output = grad_per_sample * loss_term_grad(model_output - target, cd, LOSS_L1)
    store_tile(grad_model_output_ptr, offs, grad_model_output, mask)
    grad_target = -grad_model_output
    if PARAMETERIZATION == 0:
        if GRAD_NOISE:
            store_tile(grad_noise_ptr, offs, grad_target, mask)
    elif PARAMETERIZATION == 1:
        if GRAD_X_START:
            store_tile(grad_x_start_ptr, offs, grad_target, mask)
    else:
        # the target is get_v's pair: its coefficients are the target's derivatives
        coef_x_start, coef_noise = pair_coefficients(table_ptr, t, T, GET_V)
        if GRAD_NOISE:
            store_tile(grad_noise_ptr, offs, coef_noise * grad_target, mask)
        if GRAD_X_START:
            store_tile(grad_x_start_ptr, offs, coef_x_start * grad_target, mask)


# The reduction is one program over a (B, n_tiles) array of partial sums, read in (BLOCK_B, BLOCK_P) tiles:
# at most 32 x 128 values per step keeps a 4-warp program's registers small; its cost is a few microseconds
# against a forward pass that streams whole tensors.
REDUCE_BLOCK_B = 32
REDUCE_BLOCK_P = 128

_LVLB_ROW = {0: ROW["lvlb_weights_eps"], 1: ROW["lvlb_weights_x0"], 2: ROW["lvlb_weights_v"]}


def _diffusion_loss(
    model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
    parameterization: int, loss_l1: bool, l_simple_weight: float, original_elbo_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model_output, batch, n = as_rows(model_output)
    x_start, noise = like_dense(model_output, x_start), like_dense(model_output, noise)
    dtype, device = result_dtype(model_output, x_start, noise), model_output.device
    loss, loss_simple, loss_vlb = (torch.empty((), dtype=dtype, device=device) for _ in range(3))
    if model_output.numel() == 0:
        # Mean over nothing: NaN, as torch's mean gives.
        return tuple(torch.full((), float("nan"), dtype=dtype, device=device) for _ in range(3))
    config, n_tiles, partial = loss_partials(model_output, n, batch, table.dtype)
    ls_hi, ls_lo = split_float(l_simple_weight)
    elbo_hi, elbo_lo = split_float(original_elbo_weight)
    launch_per_sample(
        diffusion_loss_kernel, model_output, n, batch, model_output, x_start, noise, t, table, partial, n,
        table.shape[1], n_tiles=n_tiles, PARAMETERIZATION=parameterization, LOSS_L1=loss_l1, config=config,
    )
    launch_reduce(
        diffusion_loss_reduce_kernel, model_output, batch, n_tiles, REDUCE_BLOCK_B, REDUCE_BLOCK_P, partial, t,
        table, loss, loss_simple, loss_vlb, batch, n, table.shape[1], n_tiles, ls_hi, ls_lo, elbo_hi, elbo_lo,
        ROW_LVLB=_LVLB_ROW[parameterization],
    )
    return loss, loss_simple, loss_vlb


diffusion_loss_op = torch.library.custom_op("ddpm_kernels_triton::diffusion_loss", _diffusion_loss, mutates_args=())


@diffusion_loss_op.register_fake
def _(model_output, x_start, noise, t, table, parameterization, loss_l1, l_simple_weight, original_elbo_weight):
    return tuple(model_output.new_empty((), dtype=result_dtype(model_output, x_start, noise)) for _ in range(3))


def _diffusion_loss_backward(grad_loss, grad_loss_simple, grad_loss_vlb, model_output, x_start, noise, t, table,
                             parameterization, loss_l1, l_simple_weight, original_elbo_weight, grad_x_start_needed,
                             grad_noise_needed):
    """(grad_model_output, grad_x_start, grad_noise), each in its input's dtype; a gradient not needed, or not
    depending on the loss for this parameterization, comes back as an empty tensor."""
    model_output, batch, n = as_rows(model_output)
    x_start, noise = like_dense(model_output, x_start), like_dense(model_output, noise)
    grad_model_output, grad_x_start, grad_noise = _backward_outputs(
        model_output, x_start, noise, parameterization, grad_x_start_needed, grad_noise_needed
    )
    write_x_start, write_noise = grad_x_start.numel() > 0, grad_noise.numel() > 0
    if model_output.numel() == 0:
        return grad_model_output, grad_x_start, grad_noise
    ls_hi, ls_lo = split_float(l_simple_weight)
    elbo_hi, elbo_lo = split_float(original_elbo_weight)
    launch_per_sample(
        diffusion_loss_backward_kernel, model_output, n, batch,
        model_output, x_start, noise, t, table,
        grad_loss.contiguous(), grad_loss_simple.contiguous(), grad_loss_vlb.contiguous(),
        grad_model_output, grad_x_start if write_x_start else grad_model_output,
        grad_noise if write_noise else grad_model_output, batch, n, table.shape[1],
        l_simple_weight_hi=ls_hi, l_simple_weight_lo=ls_lo, original_elbo_weight_hi=elbo_hi,
        original_elbo_weight_lo=elbo_lo, PARAMETERIZATION=parameterization, LOSS_L1=loss_l1,
        GRAD_X_START=write_x_start, GRAD_NOISE=write_noise, ROW_LVLB=_LVLB_ROW[parameterization],
    )
    return grad_model_output, grad_x_start, grad_noise


# the backward takes the three incoming gradients, the forward's arguments and which input gradients are needed;
# gradients of its gradients are registered with it
diffusion_loss_backward_op = loss_backward_op(
    "ddpm_kernels_triton::diffusion_loss_backward", _diffusion_loss_backward, _diffusion_loss,
    ("grad_loss", "grad_loss_simple", "grad_loss_vlb"), ("grad_x_start_needed", "grad_noise_needed"),
)


@diffusion_loss_backward_op.register_fake
def _(grad_loss, grad_loss_simple, grad_loss_vlb, model_output, x_start, noise, t, table, parameterization,
      loss_l1, l_simple_weight, original_elbo_weight, grad_x_start_needed, grad_noise_needed):
    return _backward_outputs(model_output, x_start, noise, parameterization, grad_x_start_needed, grad_noise_needed)


def _backward_outputs(model_output, x_start, noise, parameterization, grad_x_start_needed, grad_noise_needed):
    """The backward's gradients, uninitialized: each like ``model_output`` (its dense format, which the kernel
    writes) in its input's dtype; zero elements where not written (not needed, or the target does not depend
    on the input: x_start for eps, noise for x0)."""
    write_x_start = grad_x_start_needed and parameterization != 0
    write_noise = grad_noise_needed and parameterization != 1
    return (
        empty_dense(model_output),
        empty_dense_if(write_x_start, model_output, x_start.dtype),
        empty_dense_if(write_noise, model_output, noise.dtype),
    )


def _setup_context(ctx, inputs, output):
    model_output, x_start, noise, t, table, parameterization, loss_l1, l_simple_weight, original_elbo_weight = inputs
    ctx.save_for_backward(model_output, x_start, noise, t, table)
    ctx.config = (parameterization, loss_l1, l_simple_weight, original_elbo_weight)


def _backward(ctx, grad_loss, grad_loss_simple, grad_loss_vlb):
    model_output, x_start, noise, t, table = ctx.saved_tensors
    parameterization, loss_l1, l_simple_weight, original_elbo_weight = ctx.config
    zero = None
    grads = []
    for g in (grad_loss, grad_loss_simple, grad_loss_vlb):
        if g is None:
            zero = model_output.new_zeros(()) if zero is None else zero
            g = zero
        grads.append(g)
    need_x_start, need_noise = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_model_output, grad_x_start, grad_noise = diffusion_loss_backward_op(
        *grads, model_output, x_start, noise, t, table, parameterization, loss_l1, l_simple_weight,
        original_elbo_weight, need_x_start, need_noise,
    )
    if not ctx.needs_input_grad[0]:
        grad_model_output = None
    # The target does not depend on x_start for eps, nor on noise for x0: no gradient, as in the reference.
    grad_x_start = grad_x_start if need_x_start and parameterization != 0 else None
    grad_noise = grad_noise if need_noise and parameterization != 1 else None
    return grad_model_output, grad_x_start, grad_noise, None, None, None, None, None, None


diffusion_loss_op.register_autograd(_backward, setup_context=_setup_context)


def diffusion_loss(model_output, x_start, noise, t, schedule, *options):
    """Backend entry: the reference's arguments, the options validated as the op table lists them."""
    parameterization, loss_type, l_simple_weight, original_elbo_weight = options
    return diffusion_loss_op(
        model_output, x_start, noise, t, schedule.table(result_dtype(model_output, x_start, noise)),
        PARAMETERIZATION_ID[parameterization],
        loss_type == "l1", float(l_simple_weight), float(original_elbo_weight),
    )
