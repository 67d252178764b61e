"""Pieces every Triton kernel family here shares. In the kernels (``@triton.jit`` helpers, which Triton
inlines): a program's tile of its sample (``sample_tile``) and its per-sample index gather (``sample_index``,
``checked_index``: the range mask and clamped address every gather by ``t`` or a step index uses), loads upcast
to the compute dtype and stores rounded once, the gather of a schedule coefficient, correctly rounded division
and square root, NaN-preserving clipping (in-kernel noise: ``noise.py``). On the host: the result dtype of mixed
operands, the launch table and the chunked launch, the flattening of inputs, and the registration of an op with
its ``out=`` form, of a linear combination's autograd and of a loss backward's own autograd (gradients of
gradients).

Layout. Every op is elementwise over ``(B, N)`` where ``B`` is the batch and ``N`` the product of the other
dims, in storage order: contiguous and channels_last(_3d) data runs as it is (each sample is one dense block;
``ddpm_kernels._layout``), other strides are made contiguous first, so any ndim >= 1 works. The grid is
``(cdiv(N, BLOCK), B)``: a program owns ``BLOCK`` consecutive elements of one sample, so it gathers its
sample's coefficients once, as scalars, instead of once per element (and never divides an element index by
``N``). Offsets are int64 from the first multiplication on, so tensors past 2**31 elements are addressed
correctly.

Vectorization. Triton specializes integer arguments divisible by 16 and pointers aligned to 16 bytes; when
``N`` is divisible by 16 the compiler knows each program's tile starts 16-byte aligned and emits 128-bit
loads/stores (``BLOCK / (32 * num_warps)`` contiguous elements per thread). Odd ``N`` still runs, with
narrower accesses.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import typing
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .._layout import dense_format, empty_in_format, in_format, is_in_format
from ..schedule import TABLE_ROW

__all__ = [
    "INTERPRETED",
    "PARAMETERIZATION_ID",
    "ROW",
    "MAX_GRID_Y",
    "result_dtype",
    "compute_dtype",
    "launch_config",
    "batch_chunks",
    "device_of",
    "as_rows",
    "launch_per_sample",
    "loss_partials",
    "launch_reduce",
    "empty_dense",
    "empty_dense_if",
    "like_dense",
    "launch_into",
    "parameters_of",
    "with_signature",
    "annotated",
    "custom_op_with_out",
    "register_linear_combination_autograd",
    "register_loss_backward_autograd",
    "loss_backward_op",
    "split_float",
    "split_float3",
    "extract_rows",
    "sample_means",
    "sample_tile",
    "sigma_at",
    "load_tile",
    "store_tile",
    "clamp_symmetric",
    "div_rn",
    "sqrt_rn",
    "checked_index",
    "sample_index",
    "gather_coefficient",
    "split_scalar",
    "exact_scalar",
]

ROW = TABLE_ROW
PARAMETERIZATION_ID = {"eps": 0, "x0": 1, "v": 2}

# Table rows the jit helpers below read, as module-level constexprs (Triton resolves these globals at compile
# time; a plain dict lookup is not allowed inside a kernel).
ROW_SQRT_ALPHAS_CUMPROD = tl.constexpr(TABLE_ROW["sqrt_alphas_cumprod"])
ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD = tl.constexpr(TABLE_ROW["sqrt_one_minus_alphas_cumprod"])
ROW_SQRT_RECIP_ALPHAS_CUMPROD = tl.constexpr(TABLE_ROW["sqrt_recip_alphas_cumprod"])
ROW_SQRT_RECIPM1_ALPHAS_CUMPROD = tl.constexpr(TABLE_ROW["sqrt_recipm1_alphas_cumprod"])
ROW_POSTERIOR_MEAN_COEF1 = tl.constexpr(TABLE_ROW["posterior_mean_coef1"])
ROW_POSTERIOR_MEAN_COEF2 = tl.constexpr(TABLE_ROW["posterior_mean_coef2"])


def result_dtype(*operands: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of an op's results: torch's promotion of its float operands' dtypes (None: absent). Operands
    of different dtypes (a bf16 model output with fp32 data) are each read in their own dtype by the kernels,
    which compute in ``compute_dtype`` of this and store rounded to it (docs/design.md, "Mixed precision")."""
    dtype = None
    for y in operands:
        if y is not None:
            dtype = y.dtype if dtype is None else torch.promote_types(dtype, y.dtype)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float64 for float64 data, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# CUDA caps gridDim.y at 65535; batches larger than that are launched in chunks along the batch.
MAX_GRID_Y = 65535

# Launch table: (BLOCK, num_warps) candidates, largest first.
#
# NOT MEASURED: this table was written on a machine without a GPU, so it is a reasoned starting point, not a
# tuned result. It must be swept on hardware (triton.testing.do_bench over candidate (BLOCK, num_warps) pairs,
# e.g. by monkeypatching LAUNCH_TABLE) and this comment replaced by the measured numbers.
# Reasoning: these ops are bandwidth-bound streams (2-4 tensors in, 1-2 out, ~10 flops/element), for which
# torch inductor's pointwise heuristics (and Triton's vector-add tutorial) settle on BLOCK=1024 with
# 4 warps: 8 elements per thread, i.e. two 128-bit accesses per tensor for fp32 and one for fp16/bf16, enough
# bytes in flight per SM to cover HBM latency without register pressure. Smaller tensors get smaller blocks
# so the grid still has about two waves of programs on a 132-SM H100 (a 64x64x4 latent is only 16 blocks of
# 1024); below that the op is launch-latency bound and the block size no longer matters.
LAUNCH_TABLE = ((1024, 4), (512, 4), (256, 2), (128, 1))
MIN_PROGRAMS = 264  # two waves of 132 SMs (H100 SXM)


def launch_config(n_per_sample: int, batch: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) for ``batch`` samples of ``n_per_sample`` elements (see LAUNCH_TABLE)."""
    for block, warps in LAUNCH_TABLE:
        if triton.cdiv(n_per_sample, block) * batch >= MIN_PROGRAMS:
            return block, warps
    block, warps = LAUNCH_TABLE[-1]
    # A 1-element sample should not launch 128-wide programs that mask off 127 lanes.
    return min(block, max(16, triton.next_power_of_2(n_per_sample))), warps


def batch_chunks(batch: int):
    """(first sample, samples) of each launch: one launch unless the batch exceeds CUDA's grid-y limit."""
    return [(b0, min(MAX_GRID_Y, batch - b0)) for b0 in range(0, batch, MAX_GRID_Y)]


def device_of(x: torch.Tensor):
    """Make ``x``'s GPU the current device for a launch: Triton launches on the current device (and its
    current stream), which for a tensor on cuda:1 under a cuda:0 default would be the wrong GPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def as_rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """``x`` in its dense format (``ddpm_kernels._layout``: itself when contiguous or channels_last, else a
    contiguous copy), with its batch size and per-sample element count."""
    x = in_format(x, dense_format(x))
    batch = x.shape[0]
    return x, batch, (x.numel() // batch if batch else 0)


def launch_per_sample(kernel, like: torch.Tensor, n: int, batch: int, *args, config=None, **kwargs):
    """Launch ``kernel`` over ``batch`` samples of ``n`` elements on ``like``'s device: the
    ``(cdiv(n, BLOCK), samples)`` grid of the module docstring, in chunks of at most ``MAX_GRID_Y`` samples.

    ``args`` and ``kwargs`` are the kernel's arguments but ``batch_start`` (each chunk's first sample, passed
    by name), ``BLOCK`` and ``num_warps`` (from ``config``, else ``launch_config``)."""
    block, warps = launch_config(n, batch) if config is None else config
    with device_of(like):
        for b0, nb in batch_chunks(batch):
            kernel[(triton.cdiv(n, block), nb)](*args, **kwargs, batch_start=b0, BLOCK=block, num_warps=warps)


def loss_partials(like: torch.Tensor, n: int, batch: int, dtype: torch.dtype):
    """``(config, n_tiles, partial)`` of a loss's forward pass over ``batch`` samples of ``n`` elements: its
    ``launch_config``, the tiles per sample, and their uninitialized ``(batch, n_tiles)`` partial sums in
    ``dtype`` (``store_partial_sum``) on ``like``'s device."""
    config = launch_config(n, batch)
    n_tiles = triton.cdiv(n, config[0])
    return config, n_tiles, torch.empty((batch, n_tiles), dtype=dtype, device=like.device)


def launch_reduce(kernel, like: torch.Tensor, batch: int, n_tiles: int, block_b: int, block_p: int, *args,
                  **kwargs):
    """Launch a loss's one-program reduce ``kernel`` (arguments ``args`` and ``kwargs``) on ``like``'s device,
    reading ``loss_partials``' ``(batch, n_tiles)`` sums in tiles of at most ``block_b`` x ``block_p``
    (``sample_means``)."""
    with device_of(like):
        kernel[(1,)](*args, **kwargs, BLOCK_B=min(block_b, triton.next_power_of_2(batch)),
                     BLOCK_P=min(block_p, triton.next_power_of_2(n_tiles)), num_warps=4)


def empty_dense(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialized tensor of ``x``'s shape and device in ``x``'s dense format, which kernels launched on
    ``as_rows(x)`` write in storage order (also for fake tensors; ``dtype``: default ``x``'s)."""
    return empty_in_format(x, dense_format(x), dtype)


def empty_dense_if(needed: bool, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``empty_dense(x, dtype)`` when ``needed``, else zero elements of that dtype on ``x``'s device: an optional
    output (a step's x0, an input's gradient), written only when asked for."""
    dtype = x.dtype if dtype is None else dtype
    return empty_dense(x, dtype) if needed else x.new_empty(0, dtype=dtype)


def like_dense(x: torch.Tensor, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Operand ``y`` of a call whose data tensor is ``x``, in ``x``'s dense format."""
    return in_format(y, dense_format(x))


def launch_into(out: torch.Tensor, fmt: torch.memory_format, launch):
    """``launch(target)`` with the kernel writing ``out`` in memory format ``fmt`` (its data's): ``out`` itself
    when in that format, else a temporary copied into it. Every element is read and written by the same
    thread, so ``out`` may alias an input (an in-place step). Returns what ``launch`` returns."""
    target = out if is_in_format(out, fmt) else empty_in_format(out, fmt)
    result = launch(target)
    if target is not out:
        out.copy_(target)
    return result


def parameters_of(fn) -> list:
    """``fn``'s parameters as ``(name, type)`` pairs (string annotations resolved): an op's schema, for an op
    whose arguments extend another's (``with_signature``)."""
    hints = typing.get_type_hints(fn)
    return [(name, hints[name]) for name in inspect.signature(fn).parameters]


def with_signature(fn, parameters: Sequence[Tuple[str, object]], returns):
    """``fn`` (taking ``*args``, or the parameters by these names in this order) given the signature
    ``(name: type, ...) -> returns``, so that ``torch.library.custom_op`` reads it as the op's schema: one
    function serves ops whose arguments differ only in name and order, and an op whose arguments extend
    another's (a backward's, ``parameters_of``) is typed where the other is."""
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    if names and names != [name for name, _ in parameters]:
        raise TypeError(f"{fn.__name__} takes {names}, not the signature's {[name for name, _ in parameters]}")
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, annotation=a) for n, a in parameters], return_annotation=returns
    )
    fn.__annotations__ = {**dict(parameters), "return": returns}
    return fn


def annotated(fn, parameters: Sequence[Tuple[str, object]]):
    """``fn`` with the parameters it names unannotated among ``parameters`` (``(name, type)`` pairs) given
    those types: an argument group several ops take (``noise.NOISE_PARAMETERS``) is typed in one place."""
    declared = inspect.signature(fn).parameters
    for name, annotation in parameters:
        if declared[name].annotation is not inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: {name} is typed by the shared group")
        fn.__annotations__[name] = annotation
    return fn


def custom_op_with_out(name: str, functional, fake, launch, out_returns=None, data_format=None, mutates_args=()):
    """Register the custom op ``name`` from ``functional`` (its annotated signature is the schema) with
    ``fake``, and its ``out=`` form ``name + "_out"``: the same arguments followed by a mutated
    ``out: Tensor``, its schema derived from the same signature so the two cannot drift apart.

    The out op runs ``launch(*arguments, out)`` through ``launch_into`` and returns the result, annotated
    ``out_returns`` (None: nothing); the kernel writes in the format ``data_format(*arguments)`` gives (default:
    the first argument's dense format, as ``launch`` runs it). Its fake returns ``fake``'s outputs after the
    first (the one ``out`` replaces). ``mutates_args``: arguments both forms write in place (a solver's state).
    Returns ``(op, out_op)``."""
    op = torch.library.custom_op(name, functional, mutates_args=tuple(mutates_args))
    op.register_fake(fake)

    signature = inspect.signature(functional)
    hints = typing.get_type_hints(functional)  # annotations may be strings in the op's module
    parameters = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]
    parameters.append(inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor))

    def run_out(*args):
        *inputs, out = args
        fmt = dense_format(inputs[0]) if data_format is None else data_format(*inputs)
        return launch_into(out, fmt, lambda target: launch(*inputs, target))

    def fake_out(*args):
        outputs = fake(*args[:-1])
        rest = outputs[1:] if isinstance(outputs, tuple) else ()
        return rest[0] if len(rest) == 1 else (rest or None)

    run_out.__signature__ = signature.replace(parameters=parameters, return_annotation=out_returns)
    out_op = torch.library.custom_op(name + "_out", run_out, mutates_args=tuple(mutates_args) + ("out",))
    out_op.register_fake(fake_out)
    return op, out_op


def register_linear_combination_autograd(op, backward_op, a: int, b: int, t: int, table: int):
    """Autograd of ``op``, whose first output is a linear combination ``A_t a + B_t b`` of its arguments at
    positions ``a`` and ``b`` (``t`` and ``table`` at theirs): both gradients from one ``backward_op(grad, t,
    table)`` pass. Other outputs (table gathers) pass no gradient; other arguments get none.

    ``backward_op`` is linear in ``grad``: its own backward, the adjoint ``(gg_a, gg_b) -> A_t gg_a + B_t
    gg_b``, is ``op`` itself (differentiable again), so gradients of gradients run the same kernels."""
    num_inputs = len(op._opoverload._schema.arguments)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[t], inputs[table])

    def backward(ctx, grad, *_):
        grads = [None] * num_inputs
        grads[a], grads[b] = backward_op(grad, *ctx.saved_tensors)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)

    def backward_setup_context(ctx, inputs, output):
        grad, t_tensor, table_tensor = inputs
        ctx.save_for_backward(grad, t_tensor, table_tensor)

    def backward_backward(ctx, gg_a, gg_b):
        grad, t_tensor, table_tensor = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (gg_a is None and gg_b is None):
            return None, None, None
        args = [None] * num_inputs
        args[a] = torch.zeros_like(grad) if gg_a is None else gg_a
        args[b] = torch.zeros_like(grad) if gg_b is None else gg_b
        args[t], args[table] = t_tensor, table_tensor
        result = op(*args)
        return (result[0] if isinstance(result, tuple) else result), None, None

    backward_op.register_autograd(backward_backward, setup_context=backward_setup_context)


def register_loss_backward_autograd(backward_op, n_grads: int, loss_l1: int):
    """Autograd of a loss's backward op ``backward_op(*grads, model_output, a, b, *config, a_needed,
    b_needed) -> (grad_model_output, grad_a, grad_b)`` (``n_grads`` incoming scalar gradients; ``a`` and ``b``
    the target's inputs, their gradients zero-element when not written; argument ``loss_l1`` the l1 flag).

    The gradients are ``G = g * w * loss_term_grad(model_output - target(a, b)) * (1, -dtarget/da,
    -dtarget/db)`` per sample, with ``target`` linear in ``(a, b)`` and ``g * w`` linear in the incoming
    gradients. For the l2 loss (``loss_term_grad(e) = 2 e``), ``<gg, G>`` is then the backward itself with
    ``(model_output, a, b)`` replaced by the cotangents ``(gg_model_output, gg_a, gg_b)``: its derivatives
    w.r.t. ``(model_output, a, b)`` are ``backward_op(*grads, *gg, ...)`` (one launch), and for l1 zero
    (torch's abs backward is ``sign``, whose derivative is zero). W.r.t. each incoming gradient, ``G`` is
    linear: ``<gg, backward_op(unit gradient, model_output, a, b, ...)>``."""
    first = n_grads  # model_output's position; a and b follow

    def setup_context(ctx, inputs, output):
        at = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in at))
        ctx.at, ctx.inputs = at, [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def backward(ctx, *gg):
        inputs = list(ctx.inputs)
        for i, x in zip(ctx.at, ctx.saved_tensors):
            inputs[i] = x
        operands = inputs[first:first + 3]
        written = [g is not None and g.numel() == x.numel() for g, x in zip(gg, operands)]
        gg = [g if w else torch.zeros_like(x) for g, w, x in zip(gg, written, operands)]
        config, needs = inputs[first + 3:-2], ctx.needs_input_grad
        result = [None] * len(inputs)
        if not inputs[loss_l1] and any(needs[first:first + 3]):
            d = backward_op(*inputs[:n_grads], *gg, *config, needs[first + 1], needs[first + 2])
            for k, x in enumerate(operands):
                if needs[first + k] and d[k].numel() == x.numel():
                    result[first + k] = d[k]
        for j in range(n_grads):
            if needs[j]:
                units = [torch.ones_like(g) if i == j else torch.zeros_like(g) for i, g in enumerate(inputs[:n_grads])]
                u = backward_op(*units, *operands, *config, written[1], written[2])
                dot = sum((g * v).sum(dtype=compute_dtype(v.dtype)) for g, v, w in zip(gg, u, written) if w)
                result[j] = dot.to(inputs[j].dtype).reshape(inputs[j].shape)
        return tuple(result)

    backward_op.register_autograd(backward, setup_context=setup_context)


def loss_backward_op(name: str, backward, forward, grads: Sequence[str], needed: Sequence[str]):
    """Register ``backward`` as the loss backward op ``name``, its schema derived from the forward op function
    ``forward``'s (so the two cannot drift apart): the incoming gradients ``grads``, ``forward``'s arguments,
    then the flags ``needed`` of the target inputs' gradients, returning ``(grad_model_output, grad_a,
    grad_b)``; with its own autograd (``register_loss_backward_autograd``). Returns the op."""
    parameters = [(g, torch.Tensor) for g in grads] + parameters_of(forward) + [(n, bool) for n in needed]
    with_signature(backward, parameters, tuple[torch.Tensor, torch.Tensor, torch.Tensor])
    op = torch.library.custom_op(name, backward, mutates_args=())
    names = [n for n, _ in parameters]
    register_loss_backward_autograd(op, n_grads=len(grads), loss_l1=names.index("loss_l1"))
    return op


def call_op(op, out_op, args: tuple, out=None, differentiable=()):
    """A backend entry's call of a ``custom_op_with_out`` pair: ``op(*args)``, or ``out_op(*args, out)``
    writing the first result into ``out``, then ``out`` in its place (followed by what ``out_op`` returns, if
    anything). The out op has no autograd: when one of the tensors ``differentiable`` requires grad (and grad
    mode is on), ``op``'s result is copied into ``out`` instead, so ``out`` stays differentiable as the
    reference's does (one extra pass, in this rare case)."""
    if out is None:
        return op(*args)
    if differentiable and torch.is_grad_enabled() and any(x.requires_grad for x in differentiable):
        return out.copy_(op(*args))
    rest = out_op(*args, out)
    return out if rest is None else (out, rest)


def split_float(value: float) -> Tuple[float, float]:
    """``value`` as two float32s whose float64 sum is ``value`` to ~48 bits.

    Triton passes Python floats to kernels as float32; loss weights, eta and the clip range reach the kernels
    as hi + lo so float64 results keep float64 accuracy.
    """
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def split_float3(value: float) -> Tuple[float, float, float]:
    """``value`` as three float32s whose float64 sum is exactly ``value`` (``exact_scalar`` reads them), for
    options that must compare exactly: a bound such as ``s_tmax`` set to one of a float64 table's sigmas
    includes that sigma. ``hi`` alone is ``value`` rounded to float32, as torch rounds a Python scalar against
    float32 tensors. Infinite or beyond float32's range: ``(+-inf, 0, 0)``; below about 1e-30 the low parts
    may underflow."""
    if not abs(value) <= _FLOAT32_MAX:
        return math.copysign(math.inf, value), 0.0, 0.0
    hi = float(np.float32(value))
    mid = float(np.float32(value - hi))
    return hi, mid, float(np.float32(value - hi - mid))


def extract_rows(table: torch.Tensor, names, t: torch.Tensor, ndim: int):
    """Host-side gather of table rows at ``t`` shaped ``(B, 1, ..., 1)``, NaN outside [0, T).

    Only for zero-element samples, where no program runs to write the per-sample variances.
    """
    T = table.shape[1]
    cols = table.index_select(1, t.clamp(0, T - 1))
    cols = torch.where((t >= 0) & (t < T), cols, torch.full_like(cols, float("nan")))
    shape = (t.shape[0],) + (1,) * (ndim - 1)
    return tuple(cols[ROW[name]].reshape(shape).clone() for name in names)


@triton.jit
def loss_terms(err, LOSS_L1: tl.constexpr):
    """Each element's loss of the error ``err``: ``|err|`` (``LOSS_L1``) or ``err^2``."""
    if LOSS_L1:
        per_element = tl.abs(err)
    else:
        per_element = err * err
    return per_element


@triton.jit
def loss_term_grad(err, cd: tl.constexpr, LOSS_L1: tl.constexpr):
    """``d loss_terms / d err``: torch's abs backward, sign(err) with 0 at 0 (``LOSS_L1``), or ``2 err``."""
    if LOSS_L1:
        d_err = tl.where(err > 0, 1.0, tl.where(err < 0, -1.0, 0.0)).to(cd)
    else:
        d_err = 2.0 * err
    return d_err


@triton.jit
def store_partial_sum(partial_ptr, per_element, mask, sample, n_tiles):
    """This tile's sum of ``per_element`` where ``mask`` (whatever the lanes outside hold, NaN included) into
    row-major (B, n_tiles) partial sums (``sample_means``)."""
    per_element = tl.where(mask, per_element, 0.0)
    tl.store(partial_ptr + sample.to(tl.int64) * n_tiles + tl.program_id(0), tl.sum(per_element, axis=0))


@triton.jit
def sample_means(partial_ptr, b0, B, N, n_tiles, cd: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """``(samples, in_batch, means)`` of the ``BLOCK_B`` samples from ``b0`` (``in_batch``: those below ``B``): each
    sample's mean over its ``N`` elements, the sum of its ``n_tiles`` partial sums in ``partial_ptr`` (row-major
    (B, n_tiles)) taken in a fixed order (the reductions of the losses are deterministic) and divided by ``N``.
    A ``while`` loop, not ``range()``: Triton's interpreter (how CI runs kernels) cannot take a runtime bound in
    ``range()`` with numpy 2, while compiled Triton handles both the same way."""
    samples = b0 + tl.arange(0, BLOCK_B)
    in_batch = samples < B
    sample_sum = tl.zeros((BLOCK_B,), dtype=cd)
    p0 = 0
    while p0 < n_tiles:
        tiles = p0 + tl.arange(0, BLOCK_P)
        ptrs = partial_ptr + samples.to(tl.int64)[:, None] * n_tiles + tiles[None, :]
        sample_sum += tl.sum(tl.load(ptrs, mask=in_batch[:, None] & (tiles < n_tiles)[None, :], other=0.0), axis=1)
        p0 += BLOCK_P
    return samples, in_batch, div_rn(sample_sum, tl.cast(N, cd))


@triton.jit
def sample_tile(N, batch_start, BLOCK: tl.constexpr):
    """This program's place in the ``(cdiv(N, BLOCK), samples)`` grid: ``(sample, tile_start, offs_in_sample,
    mask, offs)``, the sample, the first element of its tile within the sample, the tile's element indices
    within the sample, which of them exist, and their flat offsets (int64 from the first multiplication on)."""
    sample = tl.program_id(1) + batch_start
    tile_start = tl.program_id(0).to(tl.int64) * BLOCK
    offs_in_sample = tile_start + tl.arange(0, BLOCK)
    mask = offs_in_sample < N
    offs = sample.to(tl.int64) * N + offs_in_sample
    return sample, tile_start, offs_in_sample, mask, offs


@triton.jit
def sigma_at(sigma_ptr, sample, offs_in_sample, mask, period, repeat, PER_TOKEN: tl.constexpr):
    """The tile's sigma (``flow.py``, "Sigmas"): one scalar per sample, or one value per element."""
    if PER_TOKEN:
        index = sample.to(tl.int64) * period + (offs_in_sample // repeat) % period
        s = tl.load(sigma_ptr + index, mask=mask, other=0.0)
    else:
        s = tl.load(sigma_ptr + sample)
    return s


@triton.jit
def load_tile(ptr, offs, mask, dtype: tl.constexpr):
    """The elements at ``offs`` (0 where masked off) in ``dtype``, the compute dtype."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(dtype)


@triton.jit
def store_tile(ptr, offs, value, mask):
    """``value`` stored at ``offs``, rounded to the pointer's dtype. float64 goes to bfloat16 through float32, as
    torch converts it (Triton's interpreter reads a direct float64 -> bfloat16 truncation as integer bits)."""
    if ptr.dtype.element_ty == tl.bfloat16 and value.dtype == tl.float64:
        value = value.to(tl.float32)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def clamp_symmetric(x, bound):
    """``clamp(x, -bound, bound)``; where, not minimum/maximum: a NaN stays NaN as under torch.clamp."""
    return tl.where(x < -bound, -bound, tl.where(x > bound, bound, x))


@triton.jit
def div_rn(x, y):
    """``x / y`` correctly rounded. Triton compiles a float32 ``/`` to an approximate division on NVIDIA GPUs
    (``div.full.f32``, up to 2 ulp) while its interpreter divides exactly; ``div_rn`` makes the GPU give the
    interpreter's (and the float32 reference's) numbers. float64 division is always correctly rounded."""
    if y.dtype == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def sqrt_rn(x):
    """``sqrt(x)`` correctly rounded (``tl.sqrt`` on float32 is ``sqrt.approx`` on NVIDIA GPUs; see div_rn)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.math.sqrt_rn(x)


@triton.jit
def checked_index(i, n):
    """``(in_range, i_safe)`` of a per-sample index ``i`` (a timestep, a step index) into ``n`` rows: whether it
    addresses one, and ``i`` clamped to 0 outside them, so that a load masked by ``in_range`` (NaN there) keeps
    its address inside the table even if a backend ignores the mask. Every gather by a per-sample index goes
    through it: kernels never read outside the tables, whatever the index holds."""
    in_range = (i >= 0) & (i < n)
    return in_range, tl.where(in_range, i, 0)


@triton.jit
def sample_index(index_ptr, sample, n):
    """``(i, in_range, i_safe)``: the sample's index ``index[sample]`` into ``n`` rows, and `checked_index` of
    it (the gather half of a kernel's prologue, after `sample_tile`)."""
    i = tl.load(index_ptr + sample)
    in_range, i_safe = checked_index(i, n)
    return i, in_range, i_safe


@triton.jit
def gather_coefficient(table_ptr, row: tl.constexpr, t, T):
    """``table[row, t]`` in the table's dtype; NaN (and no memory access) when ``t`` is outside [0, T)."""
    in_range, t_safe = checked_index(t, T)
    return tl.load(table_ptr + row * T + t_safe, mask=in_range, other=float("nan"))


@triton.jit
def split_scalar(hi, lo, dtype: tl.constexpr):
    """A host float given as ``split_float``'s two float32s, in ``dtype`` (the compute dtype): ``hi + lo``."""
    return tl.cast(hi, dtype) + tl.cast(lo, dtype)


@triton.jit
def exact_scalar(hi, mid, lo, dtype: tl.constexpr):
    """A host float given as ``split_float3``'s three float32s, in ``dtype`` (the compute dtype): exact in
    float64, ``hi`` (the float32 rounding of the value) in float32."""
    if dtype == tl.float64:
        value = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        value = tl.cast(hi, tl.float32)
    return value


# Triton decides when a function is decorated whether it is compiled or interpreted (TRITON_INTERPRET=1 at
# decoration makes an InterpretedFunction, which runs on CPU tensors). Read from a decorated kernel, the ground
# truth, so the backend says truthfully whether CPU tensors can run here.
INTERPRETED = type(gather_coefficient).__name__ == "InterpretedFunction"
