"""Public flow-matching ops (rectified flow, as SD3 / Flux / Wan / LTX use it): the forward process, the Euler
step of diffusers' ``FlowMatchEulerDiscreteScheduler`` with fused classifier-free guidance, and the training
loss.

Convention: ``x_sigma = (1 - sigma) x0 + sigma eps``; the model predicts ``v = eps - x0``. Sigmas are float
tensors given per sample, shape (B,), or per token / frame, a tensor with the data's leading batch dim that
broadcasts to the data once trailing 1s are added ((B, L, 1) for (B, L, C) tokens, (B, 1, F, 1, 1) for
(B, C, F, H, W) video). The step gathers its per-sample sigmas on the device from the scheduler's sigma table
by a step-index tensor, so nothing is baked into a captured CUDA graph. Arguments are checked as every op's
are (docs/design.md, "Validation"); see docs/design.md, "Flow matching".
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _checks, _layout, _native
from ._checks import (
    _check_backend, _check_data, _check_float_tensor, _check_generator, _check_guidance, _check_like, _check_out,
)
from ._spec import OPS as SPECS, FlowStepOptions, SigmaOperand
from ._stream import check_sample_offset
from .ops import _BACKENDS, _dispatch, _options, promoted_dtype, restore_format, row_major, serve, step_server
from .reference import compute_dtype

__all__ = ["flow_interpolate", "flow_step", "flow_loss", "sigma_operand"]

_CHANNELS_LAST_ORDER = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


# ------------------------------------------------------------------------------------------------ checks
def sigma_operand(name: str, sigma, data: torch.Tensor, dtype: Optional[torch.dtype] = None) -> SigmaOperand:
    """Check a per-sample or per-token sigma against ``data`` and give it in the forms the backends read
    (``ddpm_kernels._spec.SigmaOperand``), in the compute dtype of ``dtype`` (default ``data``'s: the promoted
    dtype of a call with mixed float operands)."""
    cd = compute_dtype(dtype or data.dtype)
    if (type(sigma) is torch.Tensor and sigma.dtype == cd and sigma.ndim == 1 and data.ndim >= 1
            and sigma.shape[0] == data.shape[0] and sigma.device == data.device and sigma.is_contiguous()):
        # one sigma per sample, as the kernels read it (a training step's every call): what the checks below
        # give for it, without them
        return SigmaOperand(sigma.reshape((sigma.shape[0],) + (1,) * (data.ndim - 1)), sigma, 1, 1)
    _check_float_tensor(name, sigma, f"a float tensor of shape ({data.shape[0]},) or broadcastable to "
                        f"{tuple(data.shape)}", data, "the data")
    shape = tuple(sigma.shape)
    if not 1 <= len(shape) <= data.ndim or shape[0] != data.shape[0]:
        raise ValueError(
            f"{name}: expected shape ({data.shape[0]},) (one sigma per sample) or a shape with the batch dim "
            f"{data.shape[0]} first that broadcasts to {tuple(data.shape)} (per token / frame), got {shape}"
        )
    shape = shape + (1,) * (data.ndim - len(shape))
    for j in range(1, data.ndim):
        if shape[j] not in (1, data.shape[j]):
            raise ValueError(
                f"{name}: shape {tuple(sigma.shape)} does not broadcast to the data's {tuple(data.shape)} "
                f"(dim {j}: {shape[j]} vs {data.shape[j]})"
            )
    full = sigma.reshape(shape) if len(shape) != sigma.ndim else sigma
    if full.dtype != cd:
        full = full.to(cd)
    batch = data.shape[0]
    varying = [j for j in range(1, data.ndim) if shape[j] != 1]
    if not varying:
        flat = full.reshape(batch)
        return SigmaOperand(full, flat if flat.is_contiguous() else flat.contiguous(), 1, 1)
    first, last = varying[0], varying[-1]
    fmt = _layout.dense_format(data)
    if fmt is _layout.CONTIGUOUS and all(shape[j] == data.shape[j] for j in range(first, last + 1)):
        period = math.prod(data.shape[first:last + 1])
        repeat = math.prod(data.shape[last + 1:])
        return SigmaOperand(full, full.detach().reshape(batch * period).contiguous(), period, repeat)
    # varying dims that are not one block, or a layout other than contiguous: one sigma per element, in the
    # memory order the call runs in
    dense = _layout.empty_in_format(data, fmt, dtype=cd).copy_(full.detach().expand(data.shape))
    if fmt is not _layout.CONTIGUOUS:
        dense = dense.permute(_CHANNELS_LAST_ORDER[data.ndim])
    per_sample = data.numel() // batch if batch else 0
    return SigmaOperand(full, dense.reshape(-1), max(per_sample, 1), 1)


def _check_table(sigmas, data: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The sigma table in the compute dtype of ``dtype`` (default ``data``'s), contiguous."""
    cd = compute_dtype(dtype or data.dtype)
    if (type(sigmas) is torch.Tensor and sigmas.dtype == cd and sigmas.ndim == 1
            and sigmas.shape[0] >= 2 and sigmas.device == data.device and sigmas.is_contiguous()):
        return sigmas  # the table as the kernels read it (a sampling loop's every step)
    _check_float_tensor("sigmas", sigmas, "the scheduler's 1-D float sigma table", data, "sample")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas: expected a 1-D table of at least 2 sigmas (the last is the final one), "
                         f"got shape {tuple(sigmas.shape)}")
    sigmas = sigmas if sigmas.dtype == cd else sigmas.to(cd)
    return sigmas if sigmas.is_contiguous() else sigmas.contiguous()


def _check_step_index(step_index, data: torch.Tensor, steps: int) -> torch.Tensor:
    return _checks._check_step_index(step_index, data, steps, "a step of the sigma table, which ends with the "
                                     "final sigma")


_STEP_OPTIONS = {}


def cached_options(cache: dict, key, build):
    """``build()``, the validated options of a step, cached in ``cache`` per ``key`` (the distinct values and
    their types: a sampling loop repeats them every step). A key that cannot be hashed is not cached."""
    try:
        return cache[key]
    except (KeyError, TypeError):
        pass
    opts = build()
    if len(cache) < 1024:
        try:
            cache[key] = opts
        except TypeError:  # an unhashable value that validates (an exotic real): not cached
            pass
    return opts


def _step_options(spec, stochastic, guidance_rescale, guided) -> FlowStepOptions:
    """The validated `FlowStepOptions` of a step (cached, `cached_options`)."""
    def build():
        checked_stochastic, checked_rescale = _options(spec, (stochastic, guidance_rescale))
        return FlowStepOptions(checked_stochastic, guided, checked_rescale)

    key = (stochastic, guidance_rescale, guided, type(stochastic), type(guidance_rescale))
    return cached_options(_STEP_OPTIONS, key, build)


def _prologue(spec, backend, data, like, mixed=None):
    """The backend name, ``data`` and the ``like`` tensors (any float dtype when ``mixed``, the promoted dtype
    of a call with mixed float operands)."""
    if backend not in _BACKENDS:
        _check_backend(backend)
    _check_data(spec.data, data)
    for name, y in zip(spec.like, like):
        _check_like(name, y, spec.data, data, mixed=mixed is not None)


def step_inputs(backend, sample, model_output, uncond, noise, guidance_scale, guidance_rescale, sample_offset):
    """The checks every sampler step on a sigma table starts with (`flow_step`, the Euler steps): the promoted
    dtype of mixed float operands, the backend name, ``sample``, guidance (docs/design.md, "Flow matching"),
    ``model_output`` and ``noise`` like ``sample`` (any float dtype in a mixed call), and ``sample_offset``.
    Returns ``(sample, model_output, uncond, noise, guidance, sample_offset, mixed)`` with ``model_output``
    the conditional output, ``guidance`` the per-sample scale (None unguided) and ``mixed`` the promoted
    dtype (None when the float operands agree)."""
    if sample_offset:
        sample_offset = check_sample_offset(sample_offset)
    mixed = None
    dtype = getattr(sample, "dtype", None)
    if uncond is not None or noise is not None or getattr(model_output, "dtype", None) != dtype:
        # (else one dtype and no other operand, a sampling loop's every step: nothing to promote)
        mixed = promoted_dtype(sample, (model_output, uncond, noise))
    if backend not in _BACKENDS:
        _check_backend(backend)
    _check_data("sample", sample)
    guidance = None
    if guidance_scale is not None or uncond is not None or guidance_rescale:
        model_output, uncond, guidance = _check_guidance(
            model_output, uncond, guidance_scale, guidance_rescale, sample, "sample", mixed
        )
    _check_like("model_output", model_output, "sample", sample, mixed=mixed is not None)
    if noise is not None:
        _check_like("noise", noise, "sample", sample, mixed=mixed is not None)
    return sample, model_output, uncond, noise, guidance, sample_offset, mixed


def table_inputs_ok(backend, sample, operands: tuple, out, table, steps: int, step_index,
                    promoted: int = 2) -> tuple:
    """``(checked, mixed)``: the compiled check of a table-form step's tensors (`_native.inputs_ok`,
    csrc/fast_checks.cpp), for a call without guidance or a sample offset. ``checked`` is nonzero when
    ``backend`` is a backend name, ``sample`` a floating tensor with a batch dimension, ``operands`` (None:
    absent) and ``out`` (or None) like it — of its dtype, or ``mixed``, the promoted dtype of float operands of
    the kernels' dtypes that differ (the first ``promoted`` operands' promotion with the sample's; a state
    operand after them is the caller's to check against it), with ``out`` of that dtype — ``table`` a tensor on
    its device and ``step_index`` int64 (B,), contiguous, on its device, with values in ``[0, steps)`` (CPU
    tensors; a device tensor's values where `set_device_t_check` asks for it); 2 when, besides, no operand asks
    for a gradient.
    ``(0, None)`` (the Python checks run, with their messages and conversions) for anything else, and while
    torch.compile traces."""
    if _native.inputs_ok is None or backend not in _BACKENDS or torch.compiler.is_compiling():
        return 0, None
    present = tuple(y for y in operands if y is not None)
    device_check = _checks._device_t_check
    mixed = None
    ok = _native.inputs_ok(sample, present, out, table, steps, step_index, None, device_check)
    if not ok:
        mixed = promoted_dtype(sample, operands[:promoted])
        if mixed is None or (out is not None and getattr(out, "dtype", None) != mixed):
            return 0, None
        ok = _native.inputs_ok(sample, present, out, table, steps, step_index, None, device_check, True)
        if not ok:
            return 0, None
    # (the compiled check looks at the data operands' gradients: a table that asks for one is named by dispatch)
    return (1 if ok == 2 and table.requires_grad and torch.is_grad_enabled() else ok), mixed


def run_step(spec, backend, opts, fmt, sample, model_output, uncond, guidance, sigma_args, sigma_tensors, noise,
             generator, out, sample_offset, mixed=None, checked=0):
    """The rest of a sampler step after its sigma checks: ``out`` (in the promoted dtype ``mixed`` of a call with
    mixed float operands) and ``generator``, dispatch on ``(sample, model_output, noise) + sigma_tensors``
    (`serve`: the operands cast only for a backend that does not read them natively), the backend call
    ``fn(sample, model_output, uncond, guidance, *sigma_args, opts, noise, generator, out=, sample_offset=)``,
    and the result back in ``fmt`` (`row_major`). ``checked``: what `table_inputs_ok` answered for the call's
    tensors (``out`` among them, of the dtype ``mixed`` of a mixed call; 2: none asks for a gradient), 0 when
    they took the Python checks."""
    if out is not None and not checked:
        out = _check_out(out, sample, "sample", dtype=mixed)
    if generator is not None:
        _check_generator(generator, sample)
    tensors = (sample, model_output, noise) + sigma_tensors
    if mixed is None:
        fn = _dispatch(spec, backend, sample, opts, tensors, grad_free=checked == 2)
    else:
        fn, (sample, model_output, uncond, noise) = serve(spec, backend, sample, opts, tensors, mixed,
                                                          (sample, model_output, uncond, noise), noise)
    result = fn(sample, model_output, uncond, guidance, *sigma_args, opts, noise, generator, out=out,
                sample_offset=sample_offset)
    return result if fmt is None else restore_format(result, fmt, out)


def checked_step(spec, backend, opts, draws: bool, sample, model_output, sigma_args, sigma_tensors, noise, generator,
                 mixed=None):
    """`run_step` unguided, without ``out`` or a sample offset, for a caller that built its operands as the kernels
    read them and checked them as the public step does (the fused schedulers' step): ``sample``, ``model_output``
    (and ``noise``) float tensors of the kernels' dtypes, of one shape and device, of one dtype unless ``mixed``
    (their promoted dtype) is given; the sigma operands as the step's own checks give them, in the compute dtype
    of the call. Only the backend name and the generator are checked here. ``draws``: whether the step draws its
    noise when ``noise`` is None (then it runs on row-major operands, `row_major`)."""
    if backend not in _BACKENDS:
        _check_backend(backend)
    fmt = None
    if draws and noise is None and not sample.is_contiguous():
        fmt, sample, (model_output,) = row_major(True, sample, model_output)
    return run_step(spec, backend, opts, fmt, sample, model_output, None, None, sigma_args, sigma_tensors, noise,
                    generator, None, 0, mixed)


def checked_table_step(backend, sample, model_output, sigmas, step_index, stochastic=False, noise=None,
                       generator=None):
    """`flow_step`'s table form, unguided, for a caller that built its operands as the kernels read them and
    checked them as `flow_step` does (the fused scheduler's step), `checked_step`: ``sample``, ``model_output``
    (and ``noise``) float tensors of one dtype, shape and device; ``sigmas`` the contiguous 1-D table in their
    compute dtype on that device; ``step_index`` int64 (B,) there, its values steps of the table. The step's
    Python costs less than `flow_step`'s full checks."""
    spec = SPECS["flow_step"]
    opts = _step_options(spec, stochastic, 0.0, False)
    return checked_step(spec, backend, opts, opts.stochastic, sample, model_output, (sigmas, step_index, None, None),
                        (sigmas, sigmas), noise, generator)


def table_step_server(backend, sample):
    """``step(sample, model_output, sigmas, step_index[, next_index])``: `checked_table_step`'s deterministic call
    (no noise, no generator), resolved once for a caller that repeats it (`ddpm_kernels.ops.step_server`)."""
    spec = SPECS["flow_step"]
    opts = _step_options(spec, False, 0.0, False)

    def run(fn, sample, model_output, sigmas, step_index):
        return fn(sample, model_output, None, None, sigmas, step_index, None, None, opts, None, None, out=None,
                  sample_offset=0)

    return step_server(spec, backend, sample, opts, run, 4)


# --------------------------------------------------------------------------------------------------- ops
def flow_interpolate(x0, noise, sigma, backend="auto", *, out=None):
    """The flow-matching forward process ``(1 - sigma) x0 + sigma noise`` (diffusers' ``scale_noise``, the
    noisy input of SD3 / Flux training), in ``x0``'s dtype, computed in float32 (float64 for float64 data).

    ``sigma``: shape (B,), or per token / frame (see the module docstring). ``out`` may be ``x0`` itself.
    Differentiable w.r.t. ``x0`` and ``noise`` (and ``sigma``, through the reference).
    """
    spec = SPECS["flow_interpolate"]
    mixed = promoted_dtype(x0, (noise,))
    _prologue(spec, backend, x0, (noise,), mixed)
    s = sigma_operand("sigma", sigma, x0, mixed)
    out = _check_out(out, x0, "x0", dtype=mixed)
    fn, (x0, noise) = serve(spec, backend, x0, (), (x0, noise, s.full), mixed, (x0, noise))
    return fn(x0, noise, s, out=out)


def flow_step(
    sample, model_output, sigmas=None, step_index=None, noise=None, generator=None, backend="auto", *, sigma=None,
    sigma_next=None, stochastic=False, guidance_scale=None, uncond=None, guidance_rescale=0.0, out=None, sample_offset=0
):
    """One flow-matching Euler step (diffusers' ``FlowMatchEulerDiscreteScheduler.step``), with ``v`` the
    model's velocity prediction:

        deterministic               x' = x + (sigma_next - sigma) v
        stochastic (stochastic=True) x0 = x - sigma v;   x' = (1 - sigma_next) x0 + sigma_next z

    The sigmas come either from the scheduler's table, ``sigma = sigmas[step_index]`` and ``sigma_next =
    sigmas[step_index + 1]`` per sample (``step_index``: int64 (B,), gathered inside the kernel), or are given as
    ``sigma=`` and ``sigma_next=`` tensors of shape (B,) or per token / frame (then ``sigmas`` and
    ``step_index`` are None).

    Guidance: with ``guidance_scale`` (a number, or a float tensor (B,) per sample), ``v = u + w (c - u)`` is
    formed inside the step from the conditional output ``c`` and the unconditional ``u``: ``model_output`` is
    either the (2B, ...) output of a batched ``[uncond; cond]`` forward (as diffusers pipelines ``chunk(2)`` it)
    or ``c`` with ``uncond=`` given. ``guidance_rescale`` in [0, 1] applies diffusers' ``rescale_noise_cfg``
    (per-sample standard deviations: a reduction pass before the step).

    ``z`` is ``noise`` when given, else drawn from ``generator`` (only with ``stochastic``): rows
    ``sample_offset ..`` of the noise stream (the global index of the batch's first sample; see
    `ddpm_kernels.p_sample`). Returns ``x'`` in
    ``sample``'s dtype; ``out`` may be ``sample`` (an in-place step). Computed in float32 (float64 for float64).
    """
    spec = SPECS["flow_step"]
    checked, mixed = (
        table_inputs_ok(backend, sample, (model_output, noise), out, sigmas, sigmas.shape[0] - 1, step_index)
        if (guidance_scale is None and uncond is None and not guidance_rescale and not sample_offset and sigma is None
            and sigma_next is None and type(sigmas) is torch.Tensor and sigmas.ndim == 1) else (0, None))
    if checked:
        # the common call (the table form), its tensors accepted by one C call: the table's own check, then the step
        opts = _step_options(spec, stochastic, guidance_rescale, False)
        sigmas = _check_table(sigmas, sample, mixed)
        fmt, sample, (model_output,) = row_major(opts.stochastic and noise is None, sample, model_output)
        return run_step(spec, backend, opts, fmt, sample, model_output, None, None, (sigmas, step_index, None, None),
                        (sigmas, sigmas), noise, generator, out, 0, mixed, checked)
    sample, model_output, uncond, noise, guidance, sample_offset, mixed = step_inputs(
        backend, sample, model_output, uncond, noise, guidance_scale, guidance_rescale, sample_offset
    )
    opts = _step_options(spec, stochastic, guidance_rescale, guidance is not None)
    # before the sigma operands, which are built against the memory format the call runs in
    fmt, sample, (model_output, uncond) = row_major(opts.stochastic and noise is None, sample, model_output, uncond)
    if sigmas is not None or step_index is not None:
        if sigma is not None or sigma_next is not None:
            raise ValueError("sigma, sigma_next: give either the table (sigmas, step_index) or sigma and sigma_next")
        if sigmas is None or step_index is None:
            missing = "sigmas" if sigmas is None else "step_index"
            raise ValueError(f"{missing}: expected a tensor (the table form takes both sigmas and step_index)")
        sigmas = _check_table(sigmas, sample, mixed)
        step_index = _check_step_index(step_index, sample, sigmas.shape[0] - 1)
        s = s_next = None
        sigma_tensors = (sigmas, sigmas)
    else:
        if sigma is None or sigma_next is None:
            missing = "sigma" if sigma is None else "sigma_next"
            raise ValueError(f"{missing}: expected a tensor (or the table form: sigmas and step_index)")
        s, s_next = sigma_operand("sigma", sigma, sample, mixed), sigma_operand("sigma_next", sigma_next, sample, mixed)
        sigma_tensors = (s.full, s_next.full)
    return run_step(spec, backend, opts, fmt, sample, model_output, uncond, guidance, (sigmas, step_index, s, s_next),
                    sigma_tensors, noise, generator, out, sample_offset, mixed)


def randn_stream(shape, generator=None, sample_offset=0, device=None, dtype=torch.float32, backend="auto"):
    """Standard normals of the noise stream (docs/design.md, "Noise streams") shaped ``shape``: exactly the
    ``z`` a noise-drawing op (`ddpm_kernels.p_sample`, the sampler steps, a stochastic `flow_step`) draws in-kernel
    on a tensor of that shape from the same generator state, and the generator advances as by one such call.
    Row ``b`` is global sample ``sample_offset + b``, so ranks that each draw their own rows with
    ``sample_offset = rank * per_rank_batch`` together hold what one device draws for the whole batch.

    ``device``: default ``generator``'s device, else the CPU. Drawn by ``backend``'s kernels (the stochastic flow
    step at sigma = 0 -> sigma_next = 1, whose output is ``0 * x0 + 1 * z``): float32 normals, rounded once to
    ``dtype`` (float64 holds them exactly)."""
    shape = tuple(int(n) for n in shape)
    if not shape or shape[0] < 0:
        raise ValueError(f"shape: expected a batch dimension first, got {shape}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a float dtype, got {dtype}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    x = torch.zeros(shape, device=device, dtype=dtype)
    cd = compute_dtype(dtype)
    # in place: the one allocation is the result (every element is read, then written, by the same thread)
    return flow_step(x, x, noise=None, generator=generator, backend=backend, sigma=torch.zeros(shape[0], device=device,
                     dtype=cd), sigma_next=torch.ones(shape[0], device=device, dtype=cd), stochastic=True,
                     sample_offset=sample_offset, out=x)


def flow_loss(model_output, x0, noise, sigma, weighting="none", loss_type="l2", backend="auto"):
    """The rectified-flow training loss after the model call (SD3 / Flux training scripts): the target
    ``noise - x0``, each element's l2 (``loss_type="l1"``: absolute) error weighted by its sigma's
    ``weighting`` (``"none"``: 1, ``"sigma_sqrt"``: sigma^-2, ``"cosmap"``: 2 / (pi (1 - 2 sigma + 2
    sigma^2)), diffusers' ``compute_loss_weighting_for_sd3``), averaged over each sample, then over the batch.

    ``sigma``: the (B,) sigmas the noisy input was made with (`flow_interpolate`), or per token / frame.
    Returns a 0-d float32 tensor (float64 for float64 data), differentiable w.r.t. ``model_output`` (and, through
    the reference, ``x0``, ``noise`` and ``sigma``).
    """
    spec = SPECS["flow_loss"]
    mixed = promoted_dtype(model_output, (x0, noise))
    _prologue(spec, backend, model_output, (x0, noise), mixed)
    opts = _options(spec, (weighting, loss_type))
    s = sigma_operand("sigma", sigma, model_output, mixed)
    fn, (model_output, x0, noise) = serve(spec, backend, model_output, opts, (model_output, x0, noise, s.full),
                                          mixed, (model_output, x0, noise))
    return fn(model_output, x0, noise, s, *opts)
