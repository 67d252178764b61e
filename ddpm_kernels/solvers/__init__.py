"""Multistep solvers as one fused step: DPM-Solver(++) (Lu et al. 2022), UniPC (Zhao et al. 2023), LCM (Luo et al.
2023), ...

Every step of these solvers is, per element, an affine combination of the sample, the model output converted
to the solver's form (an x0 or an epsilon prediction, optionally clipped or thresholded), up to a few earlier
converted outputs, the previous (corrected) sample and fresh noise. The coefficients depend only on the schedule
and the step, so a solver builds them once per schedule as a table (one row per step, columns named by
``SolverColumns``) and `solver_step` gathers each sample's row on the device by its step index. The earlier
outputs live in a ring of preallocated tensors (``history``, shape (H, *sample.shape)) that the step reads and
then overwrites in the same pass, so a multistep loop allocates nothing per step. See docs/design.md,
"Multistep solvers".
"""

from __future__ import annotations

import torch

from .._layout import CONTIGUOUS, dense_format
from .._checks import _check_like, _check_step_index
from .._spec import OPS as SPECS, SolverColumns, SolverStepOptions
from ..flow import cached_options, run_step, step_inputs, table_inputs_ok
from ..ops import _options, step_server

__all__ = ["SolverColumns", "solver_step", "new_history"]

_STEP_OPTIONS = {}
_WIDTHS = {}


def _step_options(values: tuple, guided: bool) -> SolverStepOptions:
    def build():
        spec = SPECS["solver_step"]
        return SolverStepOptions(**dict(zip(spec.option_names, _options(spec, values))), guided=guided)

    return cached_options(_STEP_OPTIONS, (values, tuple(map(type, values)), guided), build)


def _check_state_dtype(name: str, state, mixed) -> None:
    """A call with mixed float operands writes its state (``history``, ``last_sample``) in their promoted dtype
    ``mixed``, which the state must have (docs/design.md, "Mixed precision")."""
    if mixed is not None and isinstance(state, torch.Tensor) and state.dtype != mixed:
        raise TypeError(f"{name}: expected dtype {mixed} (the promoted dtype of the inputs), got {state.dtype}")


def _check_history(history, sample: torch.Tensor, mixed=None) -> int:
    if history is None:
        return 0
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"history: expected a tensor of shape (H, *sample.shape), got {type(history).__name__}")
    if mixed is not None:
        _check_state_dtype("history", history, mixed)
        if history.device != sample.device:
            raise ValueError(f"history: expected a tensor on {sample.device} (the device of sample), got "
                             f"{history.device}")
    elif history.dtype != sample.dtype or history.device != sample.device:
        raise ValueError(f"history: expected {sample.dtype} on {sample.device} (sample's dtype and device), got "
                         f"{history.dtype} on {history.device}")
    if history.ndim != sample.ndim + 1 or history.shape[1:] != sample.shape or history.shape[0] < 1:
        raise ValueError(f"history: expected shape (H, {', '.join(map(str, sample.shape))}) with H >= 1 slots, got "
                         f"{tuple(history.shape)}")
    return history.shape[0]


def _check_coefficients(coefficients, sample: torch.Tensor, slots: int) -> torch.Tensor:
    width = _WIDTHS.get(slots)
    if width is None:  # SolverColumns(slots).width, built once per ring size rather than every step
        width = _WIDTHS[slots] = SolverColumns(slots).width
    if not isinstance(coefficients, torch.Tensor) or not coefficients.is_floating_point():
        raise TypeError(f"coefficients: expected a float tensor (a solver's coefficient table), got "
                        f"{getattr(coefficients, 'dtype', type(coefficients).__name__)}")
    if coefficients.ndim != 2 or coefficients.shape[1] != width or coefficients.shape[0] < 1:
        raise ValueError(f"coefficients: expected shape (steps, {width}) (11 + 2 columns per history slot, "
                         f"{slots} slot{'s' if slots != 1 else ''}), got {tuple(coefficients.shape)}")
    if coefficients.device != sample.device:
        raise ValueError(f"coefficients: expected a tensor on {sample.device} (the device of sample), got "
                         f"{coefficients.device}")
    return coefficients if coefficients.is_contiguous() else coefficients.contiguous()


def new_history(sample: torch.Tensor, slots: int) -> torch.Tensor:
    """A zeroed history ring of ``slots`` entries for `solver_step` on tensors like ``sample`` (same dtype,
    device and memory format)."""
    fmt = dense_format(sample)
    if fmt is CONTIGUOUS:
        return torch.zeros((slots,) + tuple(sample.shape), dtype=sample.dtype, device=sample.device)
    # slots after one another, each a dense block in the sample's channels-last format
    flat = torch.empty((slots * sample.shape[0],) + tuple(sample.shape[1:]), dtype=sample.dtype,
                       device=sample.device, memory_format=fmt)
    return flat.zero_().view((slots,) + tuple(sample.shape))


def table_step_server(backend, sample, clip_range=None, stochastic=False):
    """``step(sample, model_output, coefficients, step_index, history, last_sample[, noise[, next_index]])``:
    `solver_step`'s call without guidance or thresholding (``clip_range`` as `solver_step` takes it; with
    ``stochastic`` the ``noise`` given to each call is read, no generator), resolved once for a caller that made
    the same call through `solver_step` and its checks before and repeats it on the same table, index tensor and
    state (`ddpm_kernels.ops.step_server`)."""
    spec = SPECS["solver_step"]
    opts = _step_options((bool(stochastic), clip_range, None, 1.0, 0.0), False)

    def run(fn, sample, model_output, coefficients, step_index, history, last_sample, noise=None):
        return fn(sample, model_output, None, None, coefficients, step_index, history, last_sample, opts, noise, None,
                  out=None, sample_offset=0)

    return step_server(spec, backend, sample, opts, run, 7)


def solver_step(
    sample, model_output, coefficients, step_index, history=None, last_sample=None, noise=None, generator=None,
    backend="auto", *, stochastic=False, clip_range=None, threshold_ratio=None, threshold_max=1.0, guidance_scale=None,
    uncond=None, guidance_rescale=0.0, out=None, sample_offset=0
):
    """One step of a multistep solver given as a coefficient table. Per sample ``b`` with ``r =
    coefficients[step_index[b]]`` (columns named by `SolverColumns`, an index outside the table gives NaN):

        x0  = r.x0_sample x + r.x0_output y      clamped to +-clip_range, or dynamically thresholded
        m   = r.m_sample x + r.m_x0 x0 + r.m_output y
        x_c = r.c_sample x + r.c_last l + r.c_m m + sum_j r.c_hist[j] h_j
        x'  = r.p_xc x_c + r.p_m m + sum_j r.p_hist[j] h_j + r.p_noise z

    ``x`` the sample, ``y`` the model output (guided as in `ddpm_kernels.flow_step` when ``guidance_scale`` is
    given), ``h_j = history[(step_index - j) % H]`` the converted output of ``j`` steps back, ``l`` the
    ``last_sample`` buffer, ``z`` the noise (``noise``, or drawn from ``generator`` with ``stochastic=True``; a
    step with neither has no noise term). A zero coefficient contributes exactly zero, whatever the tensor holds.

    Then, after every read, ``m`` is written into ``history[step_index % H]`` and ``x_c`` into ``last_sample``
    (each when given): the state a solver carries to its next step. Returns ``x'`` in ``sample``'s dtype (into
    ``out`` when given; ``out`` may be ``sample``). Computed in float32 (float64 for float64 data).
    ``sample_offset``: the global index of the batch's first sample in the noise stream (see
    `ddpm_kernels.p_sample`).
    """
    checked, mixed = (
        table_inputs_ok(backend, sample, (model_output, noise, last_sample), out, coefficients, coefficients.shape[0],
                        step_index)
        if (guidance_scale is None and uncond is None and not guidance_rescale and not sample_offset
            and type(coefficients) is torch.Tensor and coefficients.ndim == 2) else (0, None))
    if checked:
        # the common call, its tensors accepted by one C call (the last-sample buffer like the sample): the state's
        # dtype in a mixed call, the ring and the table, then the step
        _check_state_dtype("last_sample", last_sample, mixed)
        slots = _check_history(history, sample, mixed)
        coefficients = _check_coefficients(coefficients, sample, slots)
        stochastic = True if noise is not None else stochastic
        opts = _step_options((stochastic, clip_range, threshold_ratio, threshold_max, guidance_rescale), False)
        return run_step(SPECS["solver_step"], backend, opts, None, sample, model_output, None, None,
                        (coefficients, step_index, history, last_sample), (history, last_sample), noise, generator,
                        out, 0, mixed, checked)
    sample, model_output, uncond, noise, guidance, sample_offset, mixed = step_inputs(
        backend, sample, model_output, uncond, noise, guidance_scale, guidance_rescale, sample_offset
    )
    if noise is not None:
        stochastic = True
    if last_sample is not None:
        _check_state_dtype("last_sample", last_sample, mixed)
        _check_like("last_sample", last_sample, "sample", sample, mixed=mixed is not None)
    slots = _check_history(history, sample, mixed)
    coefficients = _check_coefficients(coefficients, sample, slots)
    step_index = _check_step_index(step_index, sample, coefficients.shape[0], "a row of the coefficient table")
    opts = _step_options((stochastic, clip_range, threshold_ratio, threshold_max, guidance_rescale),
                         guidance is not None)
    # the state is written in place in its own layout: no row-major copies (the kernels index noise themselves)
    return run_step(SPECS["solver_step"], backend, opts, None, sample, model_output, uncond, guidance,
                    (coefficients, step_index, history, last_sample), (history, last_sample), noise, generator, out,
                    sample_offset, mixed)
