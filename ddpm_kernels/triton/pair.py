"""The pair family: every op ``out = A_t a + B_t b`` of two tensors ``a`` and ``b`` with per-sample
coefficients taken from the schedule table at ``t``, as one kernel (``pair_kernel``) that also writes both
input gradients ``(A_t grad, B_t grad)`` in one pass (``BACKWARD``). ``pair_coefficients`` says which rows
each op reads:

    q_sample                    x_t  = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    predict_start_from_noise    x_0  = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps
    predict_noise_from_start    eps  = (sqrt(1/ab_t) x_t - x_0) / sqrt(1/ab_t - 1)
    get_v                       v    = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0      (arguments: x_0, eps, t)
    predict_start_from_z_and_v  x_0  = sqrt(ab_t) x_t - sqrt(1 - ab_t) v
    predict_eps_from_z_and_v    eps  = sqrt(ab_t) v + sqrt(1 - ab_t) x_t
    (posterior mean)            mean = coef1_t x_0 + coef2_t x_t               (q_posterior's backward)

Every op is linear in both tensors, so each has autograd for both (the same kernel with ``BACKWARD``).
Each is registered as ``ddpm_kernels_triton::<op>`` with the compiled operators' argument order, and
``<op>_backward(grad, t, table)``; ``q_sample`` also as ``q_sample_out``. References: ``ddpm_kernels.reference``.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from .utils import (
    ROW_POSTERIOR_MEAN_COEF1, ROW_POSTERIOR_MEAN_COEF2, ROW_SQRT_ALPHAS_CUMPROD, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD,
    ROW_SQRT_RECIP_ALPHAS_CUMPROD, ROW_SQRT_RECIPM1_ALPHAS_CUMPROD, as_rows, call_op, custom_op_with_out, div_rn,
    empty_dense, gather_coefficient, launch_per_sample, like_dense, load_tile, register_linear_combination_autograd,
    result_dtype, sample_tile, store_tile, with_signature,
)

__all__ = ["PAIR_OPS", "POSTERIOR_MEAN", "pair_kernel", "pair_backward", "pair_backward_fake", "ENTRIES"]

# Each pair op's arguments in the reference's (and the compiled operators') order; its OP number is its place
# here. The first tensor named is the kernel's ``a``, the other its ``b``.
PAIR_OPS = {
    "q_sample": ("x_start", "t", "noise"),
    "predict_start_from_noise": ("x_t", "t", "noise"),
    "predict_noise_from_start": ("x_t", "t", "x0"),
    "get_v": ("x_start", "noise", "t"),
    "predict_start_from_z_and_v": ("x_t", "t", "v"),
    "predict_eps_from_z_and_v": ("x_t", "t", "v"),
}
_OP = {name: i for i, name in enumerate(PAIR_OPS)}
POSTERIOR_MEAN = len(PAIR_OPS)  # not an op of its own: the mean of q_posterior, for its backward

# OP numbers as constexprs for the kernel, in PAIR_OPS' order (Triton resolves module-level constexprs at compile
# time).
(Q_SAMPLE, PREDICT_START_FROM_NOISE, PREDICT_NOISE_FROM_START, GET_V, PREDICT_START_FROM_Z_AND_V,
 PREDICT_EPS_FROM_Z_AND_V) = map(tl.constexpr, _OP.values())


@triton.jit
def pair_coefficients(table_ptr, t, T, OP: tl.constexpr):
    """``(A_t, B_t)`` of op ``OP`` (module docstring), gathered in the table's dtype. For
    ``predict_noise_from_start`` these are ``sqrt(1/ab_t)`` and ``-1`` before the division by
    ``sqrt(1/ab_t - 1)`` the kernel does per element, as the reference does (so it rounds like the reference
    where ``sqrt(1/ab_t) x_t`` and ``x_0`` nearly cancel)."""
    if OP == Q_SAMPLE:
        a = gather_coefficient(table_ptr, ROW_SQRT_ALPHAS_CUMPROD, t, T)
        b = gather_coefficient(table_ptr, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, T)
    elif OP == PREDICT_START_FROM_NOISE:
        a = gather_coefficient(table_ptr, ROW_SQRT_RECIP_ALPHAS_CUMPROD, t, T)
        b = -gather_coefficient(table_ptr, ROW_SQRT_RECIPM1_ALPHAS_CUMPROD, t, T)
    elif OP == PREDICT_NOISE_FROM_START:
        a = gather_coefficient(table_ptr, ROW_SQRT_RECIP_ALPHAS_CUMPROD, t, T)
        b = tl.full((), -1.0, table_ptr.dtype.element_ty)
    elif OP == GET_V:
        a = -gather_coefficient(table_ptr, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, T)
        b = gather_coefficient(table_ptr, ROW_SQRT_ALPHAS_CUMPROD, t, T)
    elif OP == PREDICT_START_FROM_Z_AND_V:
        a = gather_coefficient(table_ptr, ROW_SQRT_ALPHAS_CUMPROD, t, T)
        b = -gather_coefficient(table_ptr, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, T)
    elif OP == PREDICT_EPS_FROM_Z_AND_V:
        a = gather_coefficient(table_ptr, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, T)
        b = gather_coefficient(table_ptr, ROW_SQRT_ALPHAS_CUMPROD, t, T)
    else:  # POSTERIOR_MEAN
        a = gather_coefficient(table_ptr, ROW_POSTERIOR_MEAN_COEF1, t, T)
        b = gather_coefficient(table_ptr, ROW_POSTERIOR_MEAN_COEF2, t, T)
    return a, b


@triton.jit
def pair_kernel(
    a_ptr, b_ptr, t_ptr, table_ptr, out_ptr, out_b_ptr, N, T, batch_start, OP: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr
):
    """Forward: ``out = A_t a + B_t b``. ``BACKWARD``: ``a`` is the incoming gradient, ``out = A_t a`` and
    ``out_b = B_t a`` (``b`` is not read)."""
    sample, _, _, mask, offs = sample_tile(N, batch_start, BLOCK)
    # Math in the table's dtype: float32 for 16/32-bit data, float64 for float64; one rounding at the store.
    cd: tl.constexpr = table_ptr.dtype.element_ty
    # Data loads first: they do not depend on t, so their latency overlaps the t -> coefficient load chain.
    x = load_tile(a_ptr, offs, mask, cd)
    if not BACKWARD:
        y = load_tile(b_ptr, offs, mask, cd)
    t = tl.load(t_ptr + sample)
    coef_a, coef_b = pair_coefficients(table_ptr, t, T, OP)
    if OP == PREDICT_NOISE_FROM_START:
        divisor = gather_coefficient(table_ptr, ROW_SQRT_RECIPM1_ALPHAS_CUMPROD, t, T)
    if BACKWARD:
        grad_a = coef_a * x
        grad_b = coef_b * x
        if OP == PREDICT_NOISE_FROM_START:
            grad_a = div_rn(grad_a, divisor)
            grad_b = div_rn(grad_b, divisor)
        store_tile(out_ptr, offs, grad_a, mask)
        store_tile(out_b_ptr, offs, grad_b, mask)
    else:
        out = coef_a * x + coef_b * y
        if OP == PREDICT_NOISE_FROM_START:
            out = div_rn(out, divisor)
        store_tile(out_ptr, offs, out, mask)


def _launch(a, b, t, table, out, out_b, op: int, backward: bool):
    a, batch, n = as_rows(a)
    if a.numel() == 0:
        return
    launch_per_sample(
        pair_kernel, a, n, batch, a, a if b is None else like_dense(a, b), t, table, out,
        out if out_b is None else out_b, n, table.shape[1], OP=op, BACKWARD=backward,
    )


def pair_backward(grad, t, table, op: int):
    """``(A_t grad, B_t grad)`` of pair ``op`` in one pass, shaped and typed like ``grad`` (its dense format)."""
    grad_a, grad_b = empty_dense(grad), empty_dense(grad)
    _launch(grad, None, t, table, grad_a, grad_b, op, True)
    return grad_a, grad_b


def pair_backward_fake(grad, t, table):
    return empty_dense(grad), empty_dense(grad)


def _register(name: str, order):
    """Register pair op ``name`` (arguments ``order`` and the table) with its backward op and autograd;
    returns ``(op, out_op or None)``."""
    op_number = _OP[name]
    tensors = [i for i, arg in enumerate(order) if arg != "t"]
    t_at, table_at = order.index("t"), len(order)

    def operands(args):
        return args[tensors[0]], args[tensors[1]], args[t_at], args[table_at]

    def launch(*args):
        *args, out = args
        a, b, t, table = operands(args)
        _launch(a, b, t, table, out, None, op_number, False)

    def fake(*args):
        a, b, _, _ = operands(args)
        return empty_dense(a, result_dtype(a, b))

    def functional(*args):
        out = fake(*args)
        launch(*args, out)
        return out

    schema = [(arg, torch.Tensor) for arg in order] + [("table", torch.Tensor)]
    with_signature(functional, schema, torch.Tensor)
    qualname = "ddpm_kernels_triton::" + name
    if name == "q_sample":
        # q_sample_out writes into out, which may alias x_start or noise.
        op, out_op = custom_op_with_out(qualname, functional, fake, launch)
    else:
        op, out_op = torch.library.custom_op(qualname, functional, mutates_args=()), None
        op.register_fake(fake)

    def backward(grad, t, table):
        return pair_backward(grad, t, table, op_number)

    with_signature(backward, [("grad", torch.Tensor), ("t", torch.Tensor), ("table", torch.Tensor)],
                   tuple[torch.Tensor, torch.Tensor])
    backward_op = torch.library.custom_op(qualname + "_backward", backward, mutates_args=())
    backward_op.register_fake(pair_backward_fake)
    register_linear_combination_autograd(op, backward_op, tensors[0], tensors[1], t_at, table_at)
    return op, out_op


def _entry(name: str, op):
    """The backend function of pair op ``name``: the reference's signature, the schedule's table by dtype."""
    order = PAIR_OPS[name]
    first = order[0]

    tensors = [i for i, arg in enumerate(order) if arg != "t"]

    def entry(*args):
        *args, schedule = args
        return op(*args, schedule.table(result_dtype(*(args[i] for i in tensors))))

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Backend entry with ``reference.{name}_ref``'s signature ({first} first)."
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    entry.__signature__ = inspect.Signature([inspect.Parameter(a, kind) for a in order + ("schedule",)])
    return entry


_REGISTERED = {name: _register(name, order) for name, order in PAIR_OPS.items()}


def q_sample(x_start, t, noise, schedule, out=None):
    """Backend entry with ``reference.q_sample_ref``'s signature (``out=`` included)."""
    op, out_op = _REGISTERED["q_sample"]
    table = schedule.table(result_dtype(x_start, noise))
    return call_op(op, out_op, (x_start, t, noise, table), out, differentiable=(x_start, noise))


ENTRIES = {name: _entry(name, op) for name, (op, _) in _REGISTERED.items()}
ENTRIES["q_sample"] = q_sample
