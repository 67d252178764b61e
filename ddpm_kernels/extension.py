"""The compiled backends, ``"cpu"`` and ``"cuda"``: C++/CUDA kernels behind one ``ddpm_kernels::`` schema.

The libraries are loaded by ``ddpm_kernels._native``; this module is the backends over them, and the Python
parts of the schema registered once: fake (meta) kernels generated from the op table (``ddpm_kernels._spec``)
and vmap rules. The autograd formulas of ``q_sample`` and ``diffusion_loss`` are C++ (``csrc/autograd.cpp``, at
the Autograd key). (``csrc/ops.cpp`` names this module as the operators' Python module, so torch imports it
when a fake kernel is first needed.)

Each backend's ``ops`` maps an op name to a function with the reference signature (``ddpm_kernels.reference``);
``differentiable`` and ``declines`` tell ``ddpm_kernels.backends`` which calls they serve: gradients w.r.t.
``q_sample``'s inputs and ``diffusion_loss``'s ``model_output`` only, and no dynamic thresholding (a
per-sample quantile is a sort, not one elementwise pass). The dispatcher serves the rest with the reference.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Optional

import torch

from . import _native
from ._layout import CONTIGUOUS, dense_format, in_format, is_in_format
from ._native import REBUILD_HINT, ExtensionUnavailableWarning, cpu_capability, inputs_ok, load_error  # noqa: F401
from ._native import traced as _traced
from ._spec import OPS as SPECS

__all__ = ["CPU_BACKEND", "CUDA_BACKEND", "ExtensionUnavailableWarning", "cpu_capability", "load_error", "REBUILD_HINT"]

_schema_lib, _cpu_lib = _native.schema_lib, _native.cpu_lib
if load_error is not None:
    # without _C nothing compiled runs; with _C but no CPU library (a GPU-only build) only the CPU kernels are missing
    _missing = "backend='cpu'/'cuda' cannot run" if _schema_lib is None else "backend='cpu' cannot run"
    warnings.warn(
        f"ddpm_kernels: the compiled kernels are not available ({load_error}); {_missing} and backend='auto' "
        f"uses another backend or the pure-PyTorch reference. To get them, {REBUILD_HINT}.",
        ExtensionUnavailableWarning,
        stacklevel=2,
    )
_HAS_SCHEMA = _schema_lib is not None
_HAS_CUDA_KERNELS = _native.has_cuda_kernels
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ helpers
# Each operator's OpOverload (``torch.ops.ddpm_kernels.<name>.default``), looked up once: calling an overload
# skips the packet's overload resolution, which is a measurable part of a small sampling step. The names are
# the op table's compiled ops, their ``_out`` forms and the two backward kernels.
_KERNELS = tuple(name for name, spec in SPECS.items() if spec.schema) + tuple(
    name + "_out" for name, spec in SPECS.items() if spec.schema and spec.has_out
) + ("q_sample_backward", "diffusion_loss_backward", "flow_interpolate_backward", "flow_loss_backward")
_OVERLOADS = (
    types.SimpleNamespace(**{name: getattr(torch.ops.ddpm_kernels, name).default for name in _KERNELS})
    if _HAS_SCHEMA
    else None
)


def _ops():
    return _OVERLOADS


def _fits(out: Optional[torch.Tensor], fmt: torch.memory_format) -> bool:
    """Whether a kernel can write into ``out`` directly (else it writes a new tensor that is copied in)."""
    return out is not None and is_in_format(out, fmt)


def _store(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _per_sample(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=dtype)


# ---------------------------------------------------------------------------------------------------- ops
# ------------------------------------------------------------------------------------------- mixed dtypes
# The CPU and CUDA kernels of MIXED_OPS read float32, float16 and bfloat16 operands of one call each in its own
# dtype (csrc/mixed.h; docs/design.md, "Mixed precision"), so the prologue does not cast them; a mix they
# do not read (float64 with another dtype) is cast here, to the promoted dtype, as the prologue would have.
MIXED_OPS = frozenset({"q_sample", "predict_start_from_noise", "predict_noise_from_start", "get_v",
                       "predict_start_from_z_and_v", "predict_eps_from_z_and_v", "q_posterior", "p_mean_variance",
                       "p_sample", "diffusion_loss", "ddim_step", "ddpm_step", "flow_interpolate", "flow_step",
                       "euler_step", "euler_ancestral_step", "flow_loss", "solver_step"})
_MIXABLE = (torch.float32, torch.float16, torch.bfloat16)


def _operands(*tensors):
    """``(tensors, compute dtype)``: the operands as the kernels read them, and the dtype the schedule table is
    taken in."""
    dtype = tensors[0].dtype
    for x in tensors:
        if x is not None and x.dtype != dtype:
            break
    else:
        return tensors, dtype  # one dtype (every single-dtype call: no set built on the sampling path)
    dtypes = {x.dtype for x in tensors if x is not None}
    if all(d in _MIXABLE for d in dtypes):
        return tensors, torch.float32
    promoted = functools.reduce(torch.promote_types, dtypes)
    return tuple(None if x is None else x.to(promoted) for x in tensors), promoted


def _prepare(*tensors, lead: int = 0):
    """``(fmt, tensors, dtype)``: the call's memory format (``tensors[lead]``'s, `dense_format`), the operands
    in it as the kernels read them (`_operands`; None stays None) and the dtype the schedule table is taken in.
    The common calls, every operand contiguous and of one dtype or of float32 / float16 / bfloat16, cost a few
    attribute reads."""
    dtype = tensors[lead].dtype
    mixed = False
    for y in tensors:
        if y is not None:
            if not y.is_contiguous():
                break
            if y.dtype != dtype:
                mixed = True
    else:
        if not mixed:
            return CONTIGUOUS, tensors, dtype
        if all(y is None or y.dtype in _MIXABLE for y in tensors):
            return CONTIGUOUS, tensors, torch.float32  # (what `_operands` gives a mix the kernels read)
    fmt = dense_format(tensors[lead])
    tensors, dtype = _operands(*tensors)
    return fmt, tuple(in_format(y, fmt) for y in tensors), dtype


def _step_operands(opts, sample, model_output, uncond, guidance, noise):
    """``(fmt, leading, noise)`` of a step on a sigma table or a solver table: its leading arguments ``(sample,
    model_output, uncond, guidance)`` as the kernels take them (`_prepare`; uncond and guidance None unguided) and
    its noise (None when the step has no noise term, ``opts.adds_noise``: nothing is read or drawn)."""
    guided = opts.guided
    fmt, (sample, model_output, uncond, noise), _ = _prepare(
        sample, model_output, uncond if guided else None, noise if opts.adds_noise else None
    )
    return fmt, (sample, model_output, uncond, guidance if guided else None), noise


def _run_out(op: str, args: tuple, fmt, out):
    """``op`` on ``args``: its ``_out`` form writing ``out`` when ``out`` fits ``fmt``, else the functional form
    (its result copied into ``out`` when one is given)."""
    if _fits(out, fmt):
        getattr(_ops(), op + "_out")(*args, out)
        return out
    return _store(getattr(_ops(), op)(*args), out)


def q_sample(x_start, t, noise, schedule, out=None):
    fmt, (x_start, noise), dtype = _prepare(x_start, noise)
    args = (x_start, t, noise, schedule.table(dtype))
    # out= cannot carry a graph: a call that needs one runs the functional kernel (out is then refused by the
    # public checks whenever it would itself require grad)
    if not _fits(out, fmt) or (torch.is_grad_enabled() and (x_start.requires_grad or noise.requires_grad)):
        return _store(_ops().q_sample(*args), out)
    _ops().q_sample_out(*args, out)
    return out


def _pair(name):
    """A pair op ``a(t) x + b(t) y`` with the reference's argument order ``(x, t, y, schedule)``."""

    def op(x, t, y, schedule):
        _, (x, y), dtype = _prepare(x, y)
        return getattr(_ops(), name)(x, t, y, schedule.table(dtype))

    op.__name__ = name
    return op


predict_start_from_noise = _pair("predict_start_from_noise")
predict_noise_from_start = _pair("predict_noise_from_start")
predict_start_from_z_and_v = _pair("predict_start_from_z_and_v")
predict_eps_from_z_and_v = _pair("predict_eps_from_z_and_v")


def get_v(x_start, noise, t, schedule):
    _, (x_start, noise), dtype = _prepare(x_start, noise)
    return _ops().get_v(x_start, noise, t, schedule.table(dtype))


def q_posterior(x_start, x_t, t, schedule):
    _, (x_start, x_t), dtype = _prepare(x_start, x_t, lead=1)
    return _ops().q_posterior(x_start, x_t, t, schedule.table(dtype))


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True):
    _, (x_t, model_output), dtype = _prepare(x_t, model_output)
    return _ops().p_mean_variance(x_t, t, model_output, schedule.table(dtype), parameterization, clip_denoised)


def p_sample(x_t, t, model_output, schedule, parameterization, clip_denoised, noise=None, generator=None, out=None,
             sample_offset=0):
    fmt, (x_t, model_output, noise), dtype = _prepare(x_t, model_output, noise)
    args = (x_t, t, model_output, schedule.table(dtype), parameterization, clip_denoised, noise, generator,
            sample_offset)
    return _run_out("p_sample", args, fmt, out)


def _with_out_server(name, args):
    """``call(*tensors, out=None)``: the operator ``name`` bound with ``args`` (`bound_op`), or its ``_out`` form
    bound with them writing ``out`` (returned), for operands the public op checked (``ops._plain``;
    docs/design.md, "Host overhead")."""
    fast, fast_out = bound_op(name, args), bound_op(name + "_out", (*args, ...))

    def call(*tensors, out=None):
        if out is None:
            return fast(*tensors)
        fast_out(*tensors, out)
        return out

    return call


def q_sample_server(opts=()):
    """``q(x_start, t, noise, table, out=None)``: `q_sample` for contiguous operands of one dtype of which no
    gradient is asked, ``table`` the schedule's table in their dtype (`_with_out_server`)."""
    return _with_out_server("q_sample", (..., ..., ..., ...))


def p_sample_server(opts):
    """``step(x_t, t, model_output, table, noise, out=None)``: `p_sample` with ``opts`` (parameterization,
    clip_denoised) and given noise, for contiguous operands of one dtype, ``table`` the schedule's table in their
    dtype (`_with_out_server`)."""
    # (x_t, t, model_output, table, parameterization, clip_denoised, noise, generator, sample_offset)
    return _with_out_server("p_sample", (..., ..., ..., ..., *opts, ..., None, 0))


def diffusion_loss(model_output, x_start, noise, t, schedule, *options):
    # options: parameterization, loss_type, l_simple_weight, original_elbo_weight (validated, as the schema)
    _, (model_output, x_start, noise), dtype = _prepare(model_output, x_start, noise)
    return _ops().diffusion_loss(model_output, x_start, noise, t, schedule.table(dtype), *options)


# ---------------------------------------------------------------------------------------------- sampler steps
# The sampler-step family: one fused pass with the per-sample coefficients derived in float64 inside the
# kernels from the float64 table (csrc/sampler_coefficients.h); each sampler's options map onto its
# operator's scalar arguments here.
def _step_scalars(opts):
    if opts.sampler == "ddim":
        return (opts.eta, opts.parameterization, opts.clip_denoised, opts.clip_range, opts.set_alpha_to_one,
                opts.use_clipped_model_output)
    return (opts.parameterization, opts.variance_type, opts.clip_denoised, opts.clip_range)


def sampler_step(x_t, t, t_prev, model_output, schedule, opts, noise=None, generator=None, out=None, uncond=None,
                 guidance=None, sample_offset=0):
    # No noise is read or drawn by a step without a noise term (ddim_step with eta = 0): a given one is dropped,
    # as by the other steps (`_step_operands`). Its dtype still counts in the result's: a call it alone widens
    # reaches this backend cast to the promoted dtype (ops.serve).
    noise = noise if opts.adds_noise else None
    if opts.guided:
        uncond = uncond.detach() if uncond.requires_grad else uncond
    else:
        uncond = guidance = None
    if opts.learned:  # learned variances read model_output's two channel halves by index: contiguous data only
        fmt = CONTIGUOUS
        tensors, _ = _operands(x_t, model_output, uncond, noise)
        x_t, model_output, uncond, noise = (in_format(y) for y in tensors)
    else:
        fmt, (x_t, model_output, uncond, noise), _ = _prepare(x_t, model_output, uncond, noise)
    if opts.guided:
        # guidance is mixed in the kernel (csrc/guidance.h), uncond in model_output's layout, the scales in the
        # compute dtype (a mixed-precision call may have promoted the data past the scales' dtype)
        compute = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if guidance.dtype != compute:
            guidance = guidance.to(compute)
        if guidance.requires_grad:
            guidance = guidance.detach()
    leading = (x_t, t, t_prev, model_output, uncond, guidance, schedule.table(torch.float64), *_step_scalars(opts))
    return _run_step(opts.sampler + "_step", leading, opts, noise, generator, sample_offset, fmt, out)


def sampler_step_server(opts):
    """``step(x_t, t, t_prev, model_output, schedule, noise=None)``: `sampler_step` (``ddim_step`` /
    ``ddpm_step`` by ``opts.sampler``) with ``opts`` (unguided, not thresholded; ``noise`` read when the step has a
    noise term, no generator) as `flow_table_server` serves `flow_step`: bound once on contiguous operands in eager
    mode, through `sampler_step` otherwise. Returns what the public op returns with these options."""
    name = opts.sampler + "_step"
    tail = (0.0, ..., None, 0, opts.return_pred_x0)  # (guidance_rescale, noise, generator, sample_offset, x0)
    fast = bound_op(name, (..., ..., ..., ..., None, None, ..., *_step_scalars(opts), *tail))
    adds_noise, return_pred_x0 = opts.adds_noise, opts.return_pred_x0

    def step(x_t, t, t_prev, model_output, schedule, noise=None):
        if not adds_noise:
            noise = None
        if (fast is not None and x_t.is_contiguous() and model_output.is_contiguous()
                and (noise is None or noise.is_contiguous()) and not _traced()):
            result = fast(x_t, t, t_prev, model_output, schedule._buffers["coefficients64"], noise)
            return result if return_pred_x0 else result[0]
        return sampler_step(x_t, t, t_prev, model_output, schedule, opts, noise)

    return step


def _run_step(op, leading, opts, noise, generator, sample_offset, fmt, out):
    """A step operator returning ``(x', x0)`` (``op``, or ``op_out`` writing ``out`` when it fits ``fmt``) on its
    ``leading`` arguments and the tail every such schema ends with (guidance_rescale, noise, generator,
    sample_offset, return_pred_x0): ``x'``, or ``(x', x0)`` with ``opts.return_pred_x0``."""
    return_pred_x0 = opts.return_pred_x0
    args = (*leading, opts.guidance_rescale if opts.guided else 0.0, noise, generator, sample_offset, return_pred_x0)
    if _fits(out, fmt):
        x0 = getattr(_ops(), op + "_out")(*args, out)
        result = out
    else:
        result, x0 = getattr(_ops(), op)(*args)
        result = _store(result, out)
    return (result, x0) if return_pred_x0 else result


# ---------------------------------------------------------------------------------------------- flow matching
# The flow-matching family (csrc/flow.h). A SigmaOperand travels as (flat, period, repeat), built by the public
# layer against the data in the memory format the call runs in.
def _sigma(s):
    flat = s.flat
    # sampling ops run on detached inputs (ddpm_kernels.backends); a sigma operand is not a tensor argument
    return (flat.detach() if flat.requires_grad else flat), s.period, s.repeat


_NO_SIGMA = (None, 1, 1)


def flow_interpolate(x0, noise, sigma, out=None):
    fmt, (x0, noise), _ = _prepare(x0, noise)
    args = (x0, noise, sigma.flat, sigma.period, sigma.repeat)
    # as q_sample: a call that builds a graph runs the functional kernel
    if not _fits(out, fmt) or (torch.is_grad_enabled() and (x0.requires_grad or noise.requires_grad)):
        return _store(_ops().flow_interpolate(*args), out)
    _ops().flow_interpolate_out(*args, out)
    return out


def flow_step(sample, model_output, uncond, guidance, sigmas, step_index, sigma, sigma_next, opts, noise=None,
              generator=None, out=None, sample_offset=0):
    if sigmas is not None and not opts.stochastic and _plain_call(opts, out, generator, sample_offset,
                                                                  (sigmas, step_index), sample, model_output):
        return _public_server(flow_table_server, opts)(sample, model_output, sigmas, step_index)
    fmt, leading, noise = _step_operands(opts, sample, model_output, uncond, guidance, noise)
    args = (
        *leading,
        sigmas,
        step_index,
        *(_NO_SIGMA if sigma is None else _sigma(sigma)),
        *(_NO_SIGMA if sigma_next is None else _sigma(sigma_next)),
        opts.stochastic,
        opts.guidance_rescale,
        noise,
        generator,
        sample_offset,
    )
    return _run_out("flow_step", args, fmt, out)


# The bound servers of the public table-form steps' plain calls, per server kind and options (`_public_server`).
_PUBLIC_SERVERS = {}


def _plain_call(opts, out, generator, sample_offset, tables: tuple, *operands) -> bool:
    """Whether a table-form step's call can take its bound server (`_public_server`): unguided, without ``out``,
    a generator or a sample offset, in eager mode with the compiled library's bound calls, its ``tables`` (the
    table and step index) plain tensors and its ``operands`` (None: absent) plain contiguous tensors of one dtype
    or a mix the kernels read (float32 / float16 / bfloat16; other mixes are cast by `_prepare`). A tensor
    subclass keeps the ``torch.ops`` call, whose ``__torch_function__`` it sees; the server's own fallback for
    other layouts is this module's step."""
    if not (out is None and generator is None and not sample_offset and not opts.guided
            and _native.bind_op is not None and not _traced()):
        return False
    for y in tables:
        if type(y) is not torch.Tensor:
            return False
    dtype, mixable = operands[0].dtype, True
    for y in operands:
        if y is not None:
            if type(y) is not torch.Tensor or not y.is_contiguous():
                return False
            mixable = mixable and y.dtype in _MIXABLE
            if y.dtype != dtype and not mixable:
                return False
    return True


def _public_server(make, opts):
    """``make(opts)`` (a table server: `flow_table_server`, `euler_table_server`, `solver_table_server`), built
    once per kind and options: the public steps' plain calls make one bound call of the operator, whose
    constant arguments were converted once, instead of converting the whole schema's arguments every call
    (docs/design.md, "Host overhead")."""
    key = (make, opts)
    server = _PUBLIC_SERVERS.get(key)
    if server is None:
        if len(_PUBLIC_SERVERS) >= 256:
            _PUBLIC_SERVERS.clear()
        server = _PUBLIC_SERVERS[key] = make(opts)
    return server


def _advanced(result, step_index, next_index):
    """A server's result after writing ``next_index`` into ``step_index`` when it is >= 0 (the bound calls do it
    in the call)."""
    if next_index >= 0:
        step_index.fill_(next_index)
    return result


def bound_op(name, args, advance=-1):
    """``call(*per_call_args[, next_index])``: the operator ``name`` with its constant arguments converted once
    (``_C.bind_op``, csrc/fast_calls.cpp) — ``args`` holds one entry per schema argument, ``...`` for a tensor
    given per call — or None without the compiled library. With ``advance`` (the position of a per-call int64
    tensor) the call takes a last ``next_index`` and, when it is >= 0, writes it into that tensor after the op.
    The call goes through the dispatcher as ``torch.ops`` does, without converting the constants every time
    (docs/design.md, "Host overhead"); it is for eager calls: while torch.compile traces or a TorchFunctionMode is
    active (`_traced`) call the operator itself."""
    if _native.bind_op is None:
        return None
    return functools.partial(_native.call_bound, _native.bind_op("ddpm_kernels::" + name, args, advance))


def flow_table_server(opts):
    """``step(sample, model_output, sigmas, step_index, next_index=-1)``: `flow_step` on a sigma table with
    ``opts`` (unguided, no noise term), for operands a caller checked as the public op does
    (`ddpm_kernels.ops.step_server`), then, when ``next_index >= 0``, ``step_index.fill_(next_index)``.
    Contiguous operands go to the operator with its arguments besides the four fixed: bound once (`bound_op`) in
    eager mode, through ``torch.ops`` while torch.compile traces or a TorchFunctionMode is active (what a drop-in
    scheduler's step costs the host; docs/design.md, "Host overhead"); others take `flow_step`."""
    op, tail = _ops().flow_step, (*_NO_SIGMA, *_NO_SIGMA, opts.stochastic, opts.guidance_rescale, None, None, 0)
    fast = bound_op("flow_step", (..., ..., None, None, ..., ..., *tail), advance=5)

    def step(sample, model_output, sigmas, step_index, next_index=-1):
        if sample.is_contiguous() and model_output.is_contiguous():
            if fast is not None and not _traced():
                return fast(sample, model_output, sigmas, step_index, next_index)
            result = op(sample, model_output, None, None, sigmas, step_index, *tail)
        else:
            result = flow_step(sample, model_output, None, None, sigmas, step_index, None, None, opts)
        return _advanced(result, step_index, next_index)

    return step


# ------------------------------------------------------------------------------------------ multistep solvers
def solver_step(sample, model_output, uncond, guidance, coefficients, step_index, history, last_sample, opts,
                noise=None, generator=None, out=None, sample_offset=0):
    """The multistep-solver step (csrc/solver.h); the kernels write ``history`` and ``last_sample`` in place
    (through copies written back when they are laid out otherwise than the sample). Thresholded options are
    declined (``declines``)."""
    read_noise = noise if opts.adds_noise else None
    if _plain_call(opts, out, generator, sample_offset, (coefficients, step_index), sample, model_output, history,
                   last_sample, read_noise):
        return _public_server(solver_table_server, opts)(sample, model_output, coefficients, step_index, history,
                                                         last_sample, read_noise)
    fmt, leading, noise = _step_operands(opts, sample, model_output, uncond, guidance, noise)
    args = (
        *leading,
        coefficients,
        step_index,
        history,
        last_sample,
        opts.stochastic,
        opts.clip_range,
        opts.guidance_rescale if opts.guided else 0.0,
        noise,
        generator,
        sample_offset,
    )
    return _run_out("solver_step", args, fmt, out)


def solver_table_server(opts):
    """``step(sample, model_output, coefficients, step_index, history, last_sample, noise=None, next_index=-1)``:
    `solver_step` with ``opts`` (unguided, not thresholded; ``noise`` read when ``opts.stochastic``, no generator)
    as `flow_table_server` serves `flow_step`: bound once on contiguous operands in eager mode, then
    ``step_index.fill_(next_index)`` when ``next_index >= 0``."""
    head, tail = (opts.stochastic, opts.clip_range, 0.0), (None, 0)
    fast = bound_op("solver_step", (..., ..., None, None, ..., ..., ..., ..., *head, ..., *tail), advance=5)

    def step(sample, model_output, coefficients, step_index, history, last_sample, noise=None, next_index=-1):
        if (fast is not None and sample.is_contiguous() and model_output.is_contiguous()
                and (history is None or history.is_contiguous()) and (last_sample is None or last_sample.is_contiguous())
                and (noise is None or noise.is_contiguous()) and not _traced()):
            return fast(sample, model_output, coefficients, step_index, history, last_sample, noise, next_index)
        result = solver_step(sample, model_output, None, None, coefficients, step_index, history, last_sample, opts,
                             noise)
        return _advanced(result, step_index, next_index)

    return step


def euler_step(sample, model_output, uncond, guidance, sigmas, step_index, opts, noise=None, generator=None,
               out=None, sample_offset=0):
    """``euler_step`` and ``euler_ancestral_step`` (``opts.sampler``): the flow step's kernels with an Euler
    sampler (csrc/flow.h), on the sigma table."""
    read_noise = noise if opts.adds_noise else None
    if _plain_call(opts, out, generator, sample_offset, (sigmas, step_index), sample, model_output, read_noise):
        return _public_server(euler_table_server, opts)(sample, model_output, sigmas, step_index, read_noise)
    churn = (opts.s_churn, opts.s_tmin, opts.s_tmax, opts.s_noise) if opts.sampler == "euler" else ()
    fmt, leading, noise = _step_operands(opts, sample, model_output, uncond, guidance, noise)
    return _run_step(opts.sampler + "_step", (*leading, sigmas, step_index, opts.parameterization, *churn), opts,
                     noise, generator, sample_offset, fmt, out)


def euler_table_server(opts):
    """``step(sample, model_output, sigmas, step_index, noise=None, next_index=-1)``: `euler_step` /
    `euler_ancestral_step` with ``opts`` (unguided, no generator; ``noise`` read when the step has a noise term)
    as `flow_table_server` serves `flow_step`: bound once on contiguous operands in eager mode, then
    ``step_index.fill_(next_index)`` when ``next_index >= 0``."""
    name = opts.sampler + "_step"
    churn = (opts.s_churn, opts.s_tmin, opts.s_tmax, opts.s_noise) if opts.sampler == "euler" else ()
    leading = (opts.parameterization, *churn, 0.0)
    tail = (None, 0, opts.return_pred_x0)  # (generator, sample_offset, return_pred_x0)
    op, fast = getattr(_ops(), name), bound_op(name, (..., ..., None, None, ..., ..., *leading, ..., *tail), advance=5)

    def step(sample, model_output, sigmas, step_index, noise=None, next_index=-1):
        if sample.is_contiguous() and model_output.is_contiguous() and (noise is None or noise.is_contiguous()):
            if fast is not None and not _traced():
                result = fast(sample, model_output, sigmas, step_index, noise, next_index)
                return result if opts.return_pred_x0 else result[0]
            result = op(sample, model_output, None, None, sigmas, step_index, *leading, noise, *tail)
            result = result if opts.return_pred_x0 else result[0]
        else:
            result = euler_step(sample, model_output, None, None, sigmas, step_index, opts, noise)
        return _advanced(result, step_index, next_index)

    return step


# the bound servers of the drop-ins' repeated steps, by the backend function dispatch gives (`ops.step_server`)
TABLE_SERVERS = {flow_step: flow_table_server, solver_step: solver_table_server, euler_step: euler_table_server,
                 sampler_step: sampler_step_server}


def flow_loss(model_output, x0, noise, sigma, weighting="none", loss_type="l2"):
    _, (model_output, x0, noise), _ = _prepare(model_output, x0, noise)
    return _ops().flow_loss(model_output, x0, noise, sigma.flat, sigma.period, sigma.repeat, weighting, loss_type)


# Every op with a compiled schema (the table's `schema`) is served by this module's function of its name, or,
# for the ops sharing one operator family, by the family's function.
_FAMILY_FUNCTIONS = {"ddim_step": sampler_step, "ddpm_step": sampler_step, "euler_ancestral_step": euler_step}
OPS = {name: _FAMILY_FUNCTIONS.get(name) or globals()[name] for name, spec in SPECS.items() if spec.schema}
# Gradients the compiled kernels give (csrc/autograd.cpp); other inputs that need one take the reference.
DIFFERENTIABLE = {
    "q_sample": frozenset(("x_start", "noise")),
    "diffusion_loss": frozenset(("model_output",)),
    "flow_interpolate": frozenset(("x0", "noise")),
    "flow_loss": frozenset(("model_output",)),
}


def declines(op: str, opts) -> Optional[str]:
    if op == "dynamic_threshold" or getattr(opts, "thresholded", False):
        return "dynamic thresholding needs a per-sample quantile (a sort), which no compiled kernel computes"
    return None


# -------------------------------------------------------------------------------------------- fake and vmap
def _fake_output(kind: str, x: torch.Tensor, table: torch.Tensor, return_pred_x0: bool, scalar_dtype, dtype):
    if kind == "like":  # as the kernels allocate: a dense input's strides are preserved
        return torch.empty_like(x, dtype=dtype)
    if kind == "per_sample":
        return _per_sample(x, table.dtype)
    if kind == "scalar":
        return x.new_empty((), dtype=scalar_dtype or dtype)
    return torch.empty_like(x, dtype=dtype) if return_pred_x0 else x.new_empty(0, dtype=dtype)  # "pred_x0"


def _result_dtype(operands) -> torch.dtype:
    """The dtype of a compiled op's outputs: its operands' one dtype, float32 for float32 / float16 / bfloat16
    operands read together (MIXED_OPS; other mixes are refused by the kernels)."""
    dtypes = {x.dtype for x in operands if x is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _make_fake(spec, out_form: bool):
    """The fake kernel of ``spec``'s operator (its ``_out`` form with ``out_form``), from the op table: the
    outputs' kinds, the data argument and, for the step family, ``return_pred_x0``. The flow-matching family
    has no schedule table: its scalars (the loss) come in the compute dtype of its first sigma operand."""
    names = [a.name for a in getattr(torch.ops.ddpm_kernels, spec.name).default._schema.arguments]
    data = names.index(spec.data)
    table = next((names.index(n) for n in ("table64", "table") + spec.sigmas if n in names), None)
    flag = names.index("return_pred_x0") if "return_pred_x0" in names else None
    kinds = spec.outputs[1:] if out_form else spec.outputs
    flow = bool(spec.sigmas)
    # a guided step's uncond counts in the result dtype too (the steps on a sigma or solver table take it in any
    # float dtype; the DDIM/DDPM steps in the model output's)
    operands = [names.index(n) for n in (spec.data,) + spec.like + spec.optional + ("uncond",) if n in names]

    def fake(*args):
        pred = flag is not None and bool(args[flag])
        ref = None if table is None else args[table]
        scalar_dtype = ref.dtype if flow and ref is not None else None
        dtype = _result_dtype([args[i] for i in operands])
        results = tuple(_fake_output(kind, args[data], ref, pred, scalar_dtype, dtype) for kind in kinds)
        return results[0] if len(results) == 1 else (results or None)

    return fake


def _register_python_parts() -> None:
    lib = "ddpm_kernels::"
    for name, spec in SPECS.items():
        if spec.schema:
            torch.library.register_fake(lib + name)(_make_fake(spec, False))
            if spec.has_out:
                torch.library.register_fake(lib + name + "_out")(_make_fake(spec, True))

    @torch.library.register_fake(lib + "q_sample_backward")
    def _(grad, t, table):
        return torch.empty_like(grad), torch.empty_like(grad)

    @torch.library.register_fake(lib + "diffusion_loss_backward")
    def _(g_loss, g_simple, g_vlb, model_output, *rest):
        return torch.empty_like(model_output)

    @torch.library.register_fake(lib + "flow_interpolate_backward")
    def _(grad, sigma, period, repeat):
        return torch.empty_like(grad), torch.empty_like(grad)

    @torch.library.register_fake(lib + "flow_loss_backward")
    def _(g_loss, model_output, *rest):
        return torch.empty_like(model_output)

    _register_vmap(lib)


# vmap rules. Without them functorch runs an operator once per vmapped slice through its generic fallback (and
# warns); the q_sample family is elementwise per sample, so the vmapped dim folds into the batch dim and one
# kernel call serves every slice. The autograd formulas are C++ (csrc/autograd.cpp), at the Autograd key.
def _batched(x: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    """``x`` with its vmapped dim ``dim`` moved first, or broadcast to ``size`` slices when it has none."""
    return x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)


def _fold_vmap(op, data: tuple):
    """The vmap rule of a per-sample elementwise op with data tensors (B, ...) at positions ``data``, ``t`` at
    position 1, the table last, and results shaped like the data: (V, B, ...) data with t of (B,) or (V, B)
    run as one call on (V * B, ...) data and t repeated (or flattened)."""

    def rule(info, in_dims, *args):
        table_dim = in_dims[-1]
        if table_dim is not None:  # a schedule per slice: no single table to gather from
            return _loop_vmap(op)(info, in_dims, *args)
        size = info.batch_size
        args = list(args)
        folded = []
        for i in data:
            x = _batched(args[i], in_dims[i], size)
            folded.append(x.reshape((-1,) + tuple(x.shape[2:])).contiguous())
            batch = x.shape[1]
        t, t_dim = args[1], in_dims[1]
        args[1] = t.repeat(size) if t_dim is None else t.movedim(t_dim, 0).reshape(-1).contiguous()
        for i, x in zip(data, folded):
            args[i] = x
        out = op(*args)
        unfold = lambda r: r.reshape((size, batch) + tuple(r.shape[1:]))  # noqa: E731
        if isinstance(out, tuple):
            return tuple(unfold(r) for r in out), (0,) * len(out)
        return unfold(out), 0

    return rule


def _loop_vmap(op):
    """The vmap rule of an op whose results are not per-sample (the loss is a mean over the batch): one call per
    vmapped slice, stacked. Each slice is made dense, as the kernels need."""

    def rule(info, in_dims, *args):
        results = []
        for v in range(info.batch_size):
            sliced = [
                a if d is None else a.select(d, v).contiguous() for a, d in zip(args, in_dims)
            ]
            results.append(op(*sliced))
        if isinstance(results[0], tuple):
            return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
        return torch.stack(results), 0

    return rule


def _register_vmap(lib: str) -> None:
    ops = torch.ops.ddpm_kernels
    torch.library.register_vmap(lib + "q_sample", _fold_vmap(ops.q_sample.default, (0, 2)))
    torch.library.register_vmap(lib + "q_sample_backward", _fold_vmap(ops.q_sample_backward.default, (0,)))
    # Each slice's loss is the mean over its own batch: folding the slices into one batch would average across
    # them, so the loss ops take one call per slice.
    torch.library.register_vmap(lib + "diffusion_loss", _loop_vmap(ops.diffusion_loss.default))
    torch.library.register_vmap(lib + "diffusion_loss_backward", _loop_vmap(ops.diffusion_loss_backward.default))


if _HAS_SCHEMA:
    _register_python_parts()


# ------------------------------------------------------------------------------------------------ backends
class _CompiledBackend:
    """A backend per the protocol of ``ddpm_kernels.backends``."""

    ops = OPS
    differentiable = DIFFERENTIABLE
    declines = staticmethod(declines)

    def __init__(self, name: str, device_type: str, mixed_dtypes=frozenset()):
        self.name = name
        self.device_type = device_type
        # the ops whose kernels read float operands of different dtypes (backends.reads_mixed)
        self.mixed_dtypes = mixed_dtypes

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name} backend runs {self.device_type} tensors only"
        if dtype not in _FLOAT_DTYPES:
            return f"the {self.name} kernels support float16, bfloat16, float32 and float64, not {dtype}"
        if not _HAS_SCHEMA:
            return f"the compiled kernels are not available ({load_error}); {REBUILD_HINT}"
        if self.device_type == "cpu" and _cpu_lib is None:
            return f"{load_error}; {REBUILD_HINT}"
        if self.device_type == "cuda" and not _HAS_CUDA_KERNELS:
            return (
                "ddpm_kernels._C was built without CUDA kernels; rebuild with a CUDA build of torch and nvcc "
                "(DDPM_KERNELS_CUDA=1 forces it): " + REBUILD_HINT
            )
        return None

    def __repr__(self) -> str:
        return f"<ddpm_kernels {self.name} backend>"


CPU_BACKEND = _CompiledBackend("cpu", "cpu", MIXED_OPS)
CUDA_BACKEND = _CompiledBackend("cuda", "cuda", MIXED_OPS)
