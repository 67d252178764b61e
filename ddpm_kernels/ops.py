"""Public functional API: one validation/dispatch prologue, driven by the op table (``ddpm_kernels._spec``).

Every op checks its arguments before any kernel runs (``ddpm_kernels._checks``: ``ValueError`` for bad values,
shapes, devices or names, ``TypeError`` for bad dtypes, naming the argument and what was expected), then
``ddpm_kernels.backends.select`` picks the implementation. The plain valid case of a call's tensor arguments
is accepted by one C call (``ddpm_kernels._native.inputs_ok``, csrc/fast_checks.cpp); anything else takes the
Python checks, which keep every message and conversion. Validated scalar options are cached per distinct
value (a sampling loop repeats them every step). See docs/design.md, "Validation" and "Dispatch".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import torch

from . import _native, backends
from ._checks import (  # noqa: F401  (the checks are part of this module's surface for tests)
    BACKEND_NAMES,
    _check_backend,
    _check_data,
    _check_generator,
    _check_guidance,
    _check_learned_output,
    _check_like,
    _check_out,
    _check_schedule,
    _check_t,
    _check_t_prev,
    device_t_check,
    device_t_check_enabled,
    set_device_t_check,
)
from ._layout import dense_format, in_format
from ._spec import OPS as SPECS, OpSpec, step_options
from ._stream import check_sample_offset
from .schedule import DiffusionSchedule

__all__ = [
    "q_sample",
    "predict_start_from_noise",
    "predict_noise_from_start",
    "get_v",
    "predict_start_from_z_and_v",
    "predict_eps_from_z_and_v",
    "q_posterior",
    "p_mean_variance",
    "p_sample",
    "diffusion_loss",
    "dynamic_threshold",
    "ddim_step",
    "ddpm_step",
    "set_device_t_check",
    "device_t_check",
]

_BACKENDS = frozenset(BACKEND_NAMES)
_selected = backends._selected
_NO_T_PREV = object()  # ops without a t_prev argument (None is a bad t_prev of ddim_step/ddpm_step)
_OPTIONS = {}
_GUIDED = {}
_PROMOTED = {}  # promoted_dtype's answer per tuple of operand dtypes
_OPTIONS_LIMIT = 4096
# families whose options backends may decline (dispatch keys on them); options are usually a handful of constants,
# a sweep over floats must not grow the cache forever
_KEYED_FAMILIES = ("step", "flow", "sigma", "solver")
_KERNEL_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


# ----------------------------------------------------------------------------------------------- prologue
def _options(spec: OpSpec, values: tuple):
    """The validated options of a call (a `StepOptions` for the sampler-step family, else a tuple), cached per
    distinct values and their types (``True`` is not ``1``: the bool check must still see the int)."""
    key = (spec.name, values, tuple(map(type, values)))
    try:
        return _OPTIONS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value: validate it, which raises the documented error
        key = None
    checked = tuple(option.check(value) for option, value in zip(spec.options, values))
    if spec.family == "step":
        checked = step_options(spec, checked)
    if key is not None:
        if len(_OPTIONS) >= _OPTIONS_LIMIT:
            _OPTIONS.clear()
        _OPTIONS[key] = checked
    return checked


def _check_others(spec: OpSpec, x, others: tuple, learned, mixed) -> None:
    """The table's ``like`` and given ``optional`` tensors against the data ``x`` (any float dtype when
    ``mixed``); a ``learned`` variance's model output is checked apart (`_check_learned_output`)."""
    names = spec.like + spec.optional
    for i, y in enumerate(others):
        if (y is not None or i < len(spec.like)) and not (learned and i == 0):
            _check_like(names[i], y, spec.data, x, mixed=mixed is not None)


def _tensors(spec: OpSpec, x, others: tuple, schedule, t, t_prev=_NO_T_PREV, out=None, learned=None):
    """``(t, t_prev, out, mixed, grad_free)``: the first three as the kernels take them, after checking the
    call's tensors: ``x`` is the table's ``data``, ``others`` its ``like`` then ``optional`` tensors (an absent
    optional one is None). A ``learned`` variance type doubles ``model_output``'s channels (checked here, after
    the others). ``mixed``: the promoted dtype of float operands whose dtypes differ (`promoted_dtype`), which
    ``out`` must have; None for a call of one dtype. The plain valid call of one dtype is accepted by one C call,
    which also tells whether any operand asks for a gradient (``grad_free`` True when none does)."""
    present = others[:-1] if spec.optional and others[-1] is None else others
    if learned:
        present = present[1:]
    has_t_prev = t_prev is not _NO_T_PREV
    native = (
        _native.inputs_ok is not None
        and not torch.compiler.is_compiling()
        and isinstance(schedule, DiffusionSchedule)
        and not (has_t_prev and t_prev is None)
    )
    if native:
        table, steps, values = schedule._buffers["coefficients"], schedule.num_timesteps, device_t_check_enabled()
        t_prev_arg = t_prev if has_t_prev else None
        accepted = _native.inputs_ok(x, present, out, table, steps, t, t_prev_arg, values)
        if accepted and not learned:
            # every operand has x's dtype; 2: none of them asks for a gradient
            return t, t_prev, out, None, accepted == 2
        mixed = promoted_dtype(x, others)  # (a learned model output was not among the checked operands)
        if not accepted:
            # a mixed call's other operands and out differ from x in dtype: the C check takes them as float
            # tensors of x's shape and device, out's dtype checked here against their promotion
            native = mixed is not None and _native.inputs_ok(x, present, out, table, steps, t, t_prev_arg, values,
                                                             True)
            if native and (out is None or out.dtype == mixed) and not learned:
                return t, t_prev, out, mixed, native == 2
            native = mixed is not None and _native.inputs_ok(x, (), None, table, steps, t, t_prev_arg, values)
    else:
        mixed = promoted_dtype(x, others)
    if not native:
        _check_data(spec.data, x)
        _check_others(spec, x, others, learned, mixed)
        _check_schedule(schedule, x)
        if spec.timesteps:
            t = _check_t(t, x, spec.data, schedule)
        if has_t_prev:
            t_prev = _check_t_prev(t_prev, t, schedule)
        out = _check_out(out, x, spec.data, dtype=mixed)
    elif mixed is not None:
        _check_others(spec, x, others, learned, mixed)
        out = _check_out(out, x, spec.data, dtype=mixed)
    if learned:
        _check_learned_output(others[0], x, learned, mixed=mixed is not None)
    return t, t_prev, out, mixed, False


def _dispatch(spec: OpSpec, backend: str, x: torch.Tensor, opts, tensors: tuple, dtype=None, with_name=False,
              grad_free=False):
    """The function serving this call (``ddpm_kernels.backends.resolve``), told which tensors require grad
    (``grad_free``: none does, as the compiled check found); ``dtype``: the call's dtype when it is not ``x``'s
    (mixed operands); ``with_name``: ``(backend name, function)``."""
    grad = None
    if not grad_free and torch.is_grad_enabled():
        for a in tensors:  # (a plain loop: the common answer, no operand requiring grad, builds nothing)
            if a is not None and a.requires_grad:
                names = spec.tensors  # (a new tuple per read)
                grad = frozenset(names[i] for i, y in enumerate(tensors) if y is not None and y.requires_grad)
                break
    key = (spec.name, backend, x.device, dtype or x.dtype, opts if spec.family in _KEYED_FAMILIES else None, grad)
    hit = _selected.get(key)  # resolve()'s cache, read here first: this runs on every call
    hit = hit or backends.resolve(*key)
    return hit if with_name else hit[1]


def promoted_dtype(x, others: tuple):
    """The dtype a call with mixed float operands computes and returns in: torch's promotion of the operands'
    dtypes (docs/design.md, "Mixed precision"); None when they already agree (the common case: a few
    comparisons) or when a non-tensor operand or one outside the kernels' float dtypes is there for the checks
    to refuse."""
    dtype = getattr(x, "dtype", None)
    for y in others:  # (a plain loop: the common answer, one dtype, builds nothing)
        if y is not None and getattr(y, "dtype", dtype) != dtype:
            break
    else:
        return None
    dtypes = tuple(y.dtype if isinstance(y, torch.Tensor) else None for y in (x,) + tuple(others) if y is not None)
    promoted = _PROMOTED.get(dtypes, False)
    if promoted is False:
        if all(d in _KERNEL_DTYPES for d in dtypes):
            promoted = functools.reduce(torch.promote_types, dtypes)
        else:
            promoted = None  # (a non-tensor operand, or a float8 one: torch does not promote it)
        if len(_PROMOTED) < _OPTIONS_LIMIT:
            _PROMOTED[dtypes] = promoted
    return promoted


def cast_to(dtype, x, others: tuple):
    """``(x, others)`` with every float operand in ``dtype`` (autograd-tracked casts: gradients come back in
    each input's own dtype); ``dtype`` None leaves them as they are."""
    if dtype is None:
        return x, others
    cast = tuple(y if y is None or y.dtype == dtype else y.to(dtype) for y in (x,) + tuple(others))
    return cast[0], cast[1:]


def _with_guidance(opts):
    """``opts`` of a guided step (cached: a sampling loop repeats them every step)."""
    try:
        return _GUIDED[opts]
    except KeyError:
        if len(_GUIDED) >= _OPTIONS_LIMIT:
            _GUIDED.clear()
        guided = _GUIDED[opts] = dataclasses.replace(opts, guided=True)
        return guided


def _prologue(spec: OpSpec, backend, x, others: tuple, schedule, t, options: tuple = (), generator=None,
              guided=False, passengers: tuple = (), **tensors):
    """The one prologue: the backend name, the options, the tensors, the generator, then dispatch. Mixed float
    dtypes are cast to their promotion unless the serving backend reads them natively (`promoted_dtype`,
    ``backends.reads_mixed``); ``passengers`` (checked by the caller: a guided step's uncond, in the model
    output's dtype) are cast with them. Returns the serving function, the validated options, ``(t, t_prev,
    out)`` as the kernels take them, and the data and other tensors (then the passengers)."""
    if backend not in _BACKENDS:
        _check_backend(backend)
    opts = _options(spec, options) if options else ()
    if guided:
        opts = _with_guidance(opts)
    learned = opts.variance_type if spec.family == "step" and opts.learned else None
    t, t_prev, out, mixed, grad_free = _tensors(spec, x, others, schedule, t, learned=learned, **tensors)
    if generator is not None:
        _check_generator(generator, x)
    operands = (x,) + others + (t,)
    if mixed is None:
        fn = _dispatch(spec, backend, x, opts, operands, grad_free=grad_free)
        return fn, opts, t, t_prev, out, x, others + passengers
    noise = others[len(spec.like) + spec.optional.index("noise")] if "noise" in spec.optional else None
    fn, cast = serve(spec, backend, x, opts, operands, mixed, (x,) + others + passengers, noise)
    return fn, opts, t, t_prev, out, cast[0], cast[1:]


def step_server(spec, backend, x, opts, run, operands: int):
    """``step(*operands[, next_index])``: a step a caller repeats on operands it built and checked as the public op
    does (a drop-in scheduler's steps on one schedule; docs/design.md, "Host overhead"), on operands of ``x``'s
    dtype and device of which no gradient is asked, its serving function resolved once here (what dispatch gives
    each such call). A compiled backend's function serves through its bound operator
    (``extension.TABLE_SERVERS``); any other is called as ``run(fn, *operands)``. The step takes up to
    ``operands`` operands (trailing ones left out take ``run``'s defaults), the step index the fourth, then
    ``next_index``: when it is >= 0, written into the step index after the step (the caller's index advanced)."""
    if backend not in _BACKENDS:
        _check_backend(backend)
    name, fn = _dispatch(spec, backend, x, opts, (), grad_free=True, with_name=True)
    if name in ("cpu", "cuda"):  # a compiled backend (loaded by that dispatch): its operator, bound once
        from . import extension

        server = extension.TABLE_SERVERS.get(fn)
        if server is not None:
            return server(opts)

    def step(*args):
        result = run(fn, *args[:operands])
        if len(args) > operands and args[operands] >= 0:
            args[3].fill_(args[operands])
        return result

    return step


def serve(spec, backend, x, opts, tensors: tuple, mixed, operands: tuple, noise=None):
    """``(fn, operands)``: the function serving the call (dispatch on ``tensors``, keyed on ``mixed``, the
    promoted dtype of a call with mixed float operands, when given) and ``operands`` as it reads them: cast to
    ``mixed`` only when the serving backend does not read them natively (docs/design.md, "Mixed precision").
    ``noise``: the call's given noise, one of ``operands``. A step without a noise term (``opts.adds_noise``
    false) reads none, while its dtype still counts in the result's, as in the reference: when it alone widens
    the promotion, the operands are cast (a kernel reading them natively would return the narrower dtype)."""
    if mixed is None:
        return _dispatch(spec, backend, x, opts, tensors), operands
    name, fn = _dispatch(spec, backend, x, opts, tensors, dtype=mixed, with_name=True)
    if not backends.reads_mixed(name, spec.name) or _widened_by_unread(opts, noise, operands, mixed):
        first, rest = cast_to(mixed, operands[0], operands[1:])
        operands = (first,) + rest
    return fn, operands


def _widened_by_unread(opts, noise, operands: tuple, mixed) -> bool:
    """Whether ``noise``, unread by a step without a noise term, is what makes the promotion of ``operands``
    ``mixed``."""
    if noise is None or getattr(opts, "adds_noise", True):
        return False
    read = list(operands)
    del read[next(i for i, y in enumerate(read) if y is noise)]  # (once: noise may also be another operand)
    return functools.reduce(torch.promote_types, (y.dtype for y in read if y is not None)) != mixed


def row_major(draws: bool, x, *others):
    """In-kernel noise is indexed by each element's position in its sample's row-major order (docs/design.md,
    "Noise streams"), while the fused kernels walk data in storage order. A drawing call on data that is not
    contiguous (channels_last) therefore runs on contiguous copies: returns ``(fmt, x, others)`` with ``fmt``
    the format to give the results back in (None: nothing was changed)."""
    if not draws or x.is_contiguous():
        return None, x, others
    return dense_format(x), x.contiguous(), tuple(None if y is None else y.contiguous() for y in others)


def restore_format(result, fmt, out):
    """``result`` back in the memory format ``fmt`` (see `row_major`); ``out`` is written in its own."""
    if fmt is None:
        return result
    if isinstance(result, tuple):
        return tuple(r if r is out else in_format(r, fmt) for r in result)
    return result if result is out else in_format(result, fmt)


# --------------------------------------------------------------------------------------------------- ops
def _pair(name, backend, x, y, t, schedule):
    """A pair op (``a(t) x + b(t) y``): the prologue, then the backend function in the reference's argument
    order (``get_v`` takes ``t`` after both tensors, the others between them)."""
    fn, _, t, _, _, x, (y,) = _prologue(SPECS[name], backend, x, (y,), schedule, t)
    return fn(x, y, t, schedule) if name == "get_v" else fn(x, t, y, schedule)


def q_sample(x_start, t, noise, schedule, backend="auto", *, out=None):
    """Diffuse ``x_start`` to step ``t``: ``sqrt(ab_t) x_start + sqrt(1 - ab_t) noise``.

    ``noise=None`` draws ``torch.randn_like(x_start)`` as the seed does. ``out`` may be ``x_start`` itself.
    Differentiable w.r.t. ``x_start`` and ``noise``.
    """
    if noise is None:
        noise = torch.randn_like(_check_data("x_start", x_start))
    elif _plain("q_sample", backend, x_start, (noise,), schedule, t, (), out) is not None:
        return _extension._public_server(_extension.q_sample_server, ())(x_start, t, noise,
                                                                        schedule.table(x_start.dtype), out=out)
    fn, _, t, _, out, x_start, (noise,) = _prologue(
        SPECS["q_sample"], backend, x_start, (noise,), schedule, t, out=out
    )
    return fn(x_start, t, noise, schedule, out=out)


def predict_start_from_noise(x_t, t, noise, schedule, backend="auto"):
    """``x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) noise``."""
    return _pair("predict_start_from_noise", backend, x_t, noise, t, schedule)


def predict_noise_from_start(x_t, t, x0, schedule, backend="auto"):
    """The inverse of `predict_start_from_noise`: ``(sqrt(1/ab_t) x_t - x0) / sqrt(1/ab_t - 1)``."""
    return _pair("predict_noise_from_start", backend, x_t, x0, t, schedule)


def get_v(x_start, noise, t, schedule, backend="auto"):
    """The v-prediction target ``sqrt(ab_t) noise - sqrt(1 - ab_t) x_start`` (the seed's ``get_v``)."""
    return _pair("get_v", backend, x_start, noise, t, schedule)


def predict_start_from_z_and_v(x_t, t, v, schedule, backend="auto"):
    """``x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v``."""
    return _pair("predict_start_from_z_and_v", backend, x_t, v, t, schedule)


def predict_eps_from_z_and_v(x_t, t, v, schedule, backend="auto"):
    """``eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t``."""
    return _pair("predict_eps_from_z_and_v", backend, x_t, v, t, schedule)


def q_posterior(x_start, x_t, t, schedule, backend="auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``.

    The mean has ``x_t``'s dtype and shape; variance and log-variance are float32 (float64 for float64 data)
    and shaped ``(B, 1, ..., 1)`` as in CompVis.
    """
    fn, _, t, _, _, x_t, (x_start,) = _prologue(SPECS["q_posterior"], backend, x_t, (x_start,), schedule, t)
    return fn(x_start, x_t, t, schedule)


def p_mean_variance(x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True, backend="auto"):
    """Mean and variance of ``p(x_{t-1} | x_t)`` from a model output (eps, x0 or v), x0 clipped to [-1, 1]
    when ``clip_denoised``. Returns ``(mean, var, log_var)`` as `q_posterior`."""
    fn, opts, t, _, _, x_t, (model_output,) = _prologue(
        SPECS["p_mean_variance"], backend, x_t, (model_output,), schedule, t, (parameterization, clip_denoised)
    )
    return fn(x_t, t, model_output, schedule, *opts)


def p_sample(
    x_t, t, model_output, schedule, parameterization="eps", clip_denoised=True, noise=None, generator=None,
    backend="auto", *, out=None, sample_offset=0
):
    """One ancestral sampling step: ``x_{t-1} = mean + [t > 0] exp(0.5 log_var) z``.

    ``noise`` is ``z`` when given; with ``noise=None`` the backend draws it from ``generator`` (or torch's
    default generator), advancing that generator's state: rows ``sample_offset ..`` of the noise stream
    (``sample_offset``, the global index of the batch's first sample, makes a sharded batch draw what one
    device would; docs/design.md, "Noise streams"). ``out`` may be ``x_t`` (an in-place step).
    """
    if noise is not None and generator is None and type(sample_offset) is int and not sample_offset:
        plain = _plain("p_sample", backend, x_t, (model_output, noise), schedule, t, (parameterization, clip_denoised),
                       out)
        if plain is not None:
            server = _extension._public_server(_extension.p_sample_server, plain[0])
            return server(x_t, t, model_output, schedule.table(x_t.dtype), noise, out=out)
    if sample_offset:
        sample_offset = check_sample_offset(sample_offset)
    fn, opts, t, _, out, x_t, (model_output, noise) = _prologue(
        SPECS["p_sample"], backend, x_t, (model_output, noise), schedule, t, (parameterization, clip_denoised),
        generator, out=out,
    )
    fmt, x_t, (model_output,) = row_major(noise is None, x_t, model_output)
    result = fn(x_t, t, model_output, schedule, *opts, noise, generator, out=out, sample_offset=sample_offset)
    return restore_format(result, fmt, out)


def _plain(name, backend, x, others: tuple, schedule, t, options: tuple, out, t_prev=None):
    """``(opts,)`` when the call of op ``name`` is one its compiled operator serves with a bound call (its server
    in ``extension``, then imported as ``_extension``; docs/design.md, "Host overhead"), else None for the
    prologue: in eager mode, on a `DiffusionSchedule`, with contiguous operands ``x`` and ``others`` (and
    ``out``) that the compiled check accepts as of one dtype (``t``, and ``t_prev`` when given, with them), none
    asking for a gradient, no learned variance (its model output has twice the channels, which the prologue
    checks), and a compiled backend serving the call. The options are validated (and their errors
    raised) as the prologue validates them."""
    global _extension
    if not (_native.bind_op is not None and backend in _BACKENDS and isinstance(schedule, DiffusionSchedule)
            and not _native.traced()):
        return None
    spec = SPECS[name]
    opts = _options(spec, options) if options else ()
    if getattr(opts, "learned", False):  # (a learned variance's model output has twice the channels)
        return None
    if _native.inputs_ok(x, others, out, schedule._buffers["coefficients"], schedule.num_timesteps, t, t_prev,
                         device_t_check_enabled()) != 2 or not x.is_contiguous():
        return None
    for y in others:
        if not y.is_contiguous():
            return None
    if out is not None and not out.is_contiguous():
        return None
    backend_name, _ = _dispatch(spec, backend, x, opts, (), grad_free=True, with_name=True)
    if backend_name not in ("cpu", "cuda"):
        return None
    if _extension is None:
        from . import extension as _extension
    return (opts,)


_extension = None  # ddpm_kernels.extension, imported by the first served call (the compiled backends load it)


def diffusion_loss(
    model_output, x_start, noise, t, schedule, parameterization="eps", loss_type="l2", l_simple_weight=1.0,
    original_elbo_weight=0.0, backend="auto"
):
    """The seed's ``p_losses`` after the model call: ``(loss, loss_simple, loss_vlb)``, scalars in
    ``model_output``'s dtype, computed in float32 (float64 for float64 data).

    ``loss_simple`` is the mean over the batch of each sample's mean l1/l2 error against the target (noise,
    x_start or v); ``loss_vlb`` weights each sample by ``lvlb_weights[t]``; ``loss = l_simple_weight *
    loss_simple + original_elbo_weight * loss_vlb``. Differentiable w.r.t. ``model_output``.
    """
    if getattr(schedule, "sampling_only", False):
        raise ValueError(
            "schedule: built with sampling_only=True, whose training-only tables (lvlb weights) may be non-finite; "
            "build the schedule for training without it"
        )
    options = (parameterization, loss_type, l_simple_weight, original_elbo_weight)
    fn, opts, t, _, _, model_output, (x_start, noise) = _prologue(
        SPECS["diffusion_loss"], backend, model_output, (x_start, noise), schedule, t, options
    )
    return fn(model_output, x_start, noise, t, schedule, *opts)


def dynamic_threshold(x0, ratio=0.995, max_value=1.0, backend="auto"):
    """Imagen's dynamic thresholding of a predicted ``x0`` (diffusers' ``_threshold_sample``): per sample,
    ``s`` = the ``ratio`` quantile of ``|x0|`` over all non-batch elements (linear interpolation, as
    ``torch.quantile``), clamped to ``[1, max_value]``; returns ``clamp(x0, -s, s) / s``. Computed in float32
    (float64 for float64 data), returned in ``x0``'s dtype. No host synchronization.
    """
    spec = SPECS["dynamic_threshold"]
    if backend not in _BACKENDS:
        _check_backend(backend)
    _check_data("x0", x0)
    opts = _options(spec, (ratio, max_value))
    return _dispatch(spec, backend, x0, opts, (x0,))(x0, *opts)


# The sampler-step family (ddim_step, ddpm_step) lives in ddpm_kernels.sampler_steps, on this module's prologue.
from .sampler_steps import ddim_step, ddpm_step  # noqa: E402  (after the prologue it imports)
