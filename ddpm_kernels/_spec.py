"""The op table: every public op declared once.

An :class:`OpSpec` names an op's tensor arguments and their roles, its scalar options with their validators,
its outputs and whether it draws noise. ``ddpm_kernels.ops`` builds its one validation/dispatch prologue
from it, ``ddpm_kernels._native`` generates the fake (meta) kernels of the compiled operators from it, the
schema test pins the registered operators to it, and the benchmark CLI takes its cases from it.
See docs/design.md, "The op table".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

from . import _checks as _c

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
SAMPLERS = ("ddim", "ddpm")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class _Guided:
    """The guidance properties shared by the step options (``guided``, ``guidance_rescale`` fields)."""

    @property
    def rescaled(self) -> bool:
        """Lin et al. 2023's std-rescale of the guided output applies (``guided`` and ``guidance_rescale > 0``)."""
        return self.guided and self.guidance_rescale > 0


class _Thresholded(_Guided):
    """`_Guided`, and the dynamic-thresholding property of the options with a ``threshold_ratio`` field."""

    @property
    def thresholded(self) -> bool:
        """x0 is dynamically thresholded (a per-sample quantile first) instead of clipped."""
        return self.threshold_ratio is not None


@dataclasses.dataclass(frozen=True)
class StepOptions(_Thresholded):
    """The scalar options of one sampler step (the sampler-step family), validated and canonical.

    One frozen, hashable object travels from the public op to every backend instead of a dozen positional
    arguments; backends cache per-options decisions (which kernel specialisation, whether they serve it) on it.
    ``sampler`` selects the per-sample coefficient function of the family: ``"ddim"`` (Song et al. 2021,
    eq. 12; ``eta``, ``set_alpha_to_one``, ``use_clipped_model_output``) or ``"ddpm"`` (ancestral step on a
    respaced chain; ``variance_type``). ``parameterization`` is canonical (``"eps"``, ``"x0"`` or ``"v"``).
    """

    sampler: str
    parameterization: str = "eps"
    variance_type: str = "fixed_small"
    eta: float = 0.0
    clip_denoised: bool = False
    clip_range: float = 1.0
    set_alpha_to_one: bool = True
    use_clipped_model_output: bool = False
    threshold_ratio: Optional[float] = None
    threshold_max: float = 1.0
    return_pred_x0: bool = False
    guidance_rescale: float = 0.0
    guided: bool = False

    def __post_init__(self):
        # hashed on every dispatch-cache lookup: once here, not field by field per call
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def learned(self) -> bool:
        """The model output carries the variance in a second half of its channels (B, 2C, ...)."""
        return self.sampler == "ddpm" and self.variance_type in LEARNED_VARIANCE_TYPES

    @property
    def adds_noise(self) -> bool:
        """The step has a noise term (DDIM only with ``eta > 0``)."""
        return self.sampler == "ddpm" or self.eta > 0


@dataclasses.dataclass(frozen=True)
class FlowStepOptions(_Guided):
    """The scalar options of one flow-matching Euler step (``flow_step``), validated and canonical.

    ``stochastic``: re-noise to ``sigma_next`` (``x0 = x - sigma v; x' = (1 - sigma_next) x0 + sigma_next z``)
    instead of the deterministic Euler step. ``guided``: the model output is combined with an unconditional one
    (``u + w (c - u)``) inside the step; ``guidance_rescale``: Lin et al. 2023's std-rescale of the guided output
    (0 disables it; needs ``guided``).
    """

    stochastic: bool = False
    guided: bool = False
    guidance_rescale: float = 0.0

    @property
    def adds_noise(self) -> bool:
        return self.stochastic


@dataclasses.dataclass(frozen=True)
class EulerStepOptions(_Guided):
    """The scalar options of one Euler-family step on a sigma table (``euler_step``, ``euler_ancestral_step``;
    diffusers' ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``), validated and canonical.

    ``sampler``: ``"euler"`` or ``"euler_ancestral"``; ``parameterization``: canonical (``"eps"``, ``"x0"``,
    ``"v"``); ``s_churn`` .. ``s_noise``: Karras et al.'s stochastic churn of the Euler step (``s_churn = 0``: none);
    ``guided`` / ``guidance_rescale`` as in `StepOptions`.
    """

    sampler: str
    parameterization: str = "eps"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    return_pred_x0: bool = False
    guidance_rescale: float = 0.0
    guided: bool = False

    @property
    def adds_noise(self) -> bool:
        return self.sampler == "euler_ancestral" or self.s_churn > 0


@dataclasses.dataclass(frozen=True)
class SolverStepOptions(_Thresholded):
    """The scalar options of one step of the multistep-solver family (``solver_step``: DPM-Solver(++), UniPC,
    LCM, ... as rows of a coefficient table), validated and canonical.

    ``stochastic``: the step has a noise term (given noise, or drawn in-kernel from the noise stream);
    ``clip_range``: the x0 prediction is clamped to ``[-clip_range, clip_range]`` (None: not clipped);
    ``threshold_ratio`` / ``threshold_max``: Imagen's dynamic thresholding of the x0 prediction instead (None:
    off); ``guided`` / ``guidance_rescale`` as in `StepOptions`. See docs/design.md, "Multistep solvers".
    """

    stochastic: bool = False
    clip_range: Optional[float] = None
    threshold_ratio: Optional[float] = None
    threshold_max: float = 1.0
    guidance_rescale: float = 0.0
    guided: bool = False

    @property
    def adds_noise(self) -> bool:
        return self.stochastic


@dataclasses.dataclass(frozen=True)
class SolverColumns:
    """The columns of a multistep solver's coefficient table (one row per step, ``width`` columns) for a history
    ring of ``slots`` tensors. Per sample, with ``x`` the sample, ``y`` the (guided) model output, ``l`` the
    last-sample buffer, ``h_j`` the history entry written ``j`` steps ago and ``z`` the noise:

        x0  = x0_sample x + x0_output y                     then clipped / thresholded (the step's options)
        m   = m_sample x + m_x0 x0 + m_output y             the solver's form of the output (x0 or eps)
        x_c = c_sample x + c_last l + c_m m + sum_j c_hist[j] h_j
        x'  = p_xc x_c + p_m m + sum_j p_hist[j] h_j + p_noise z

    ``m`` goes into the ring's slot ``step_index % slots`` and ``x_c`` into the last-sample buffer; ``x'`` is
    the step's result. A coefficient that is exactly 0 contributes exactly 0, whatever its tensor holds (an
    unwritten ring slot may hold anything). ``c_hist`` / ``p_hist`` start at ``j = 1``."""

    slots: int

    x0_sample = 0
    x0_output = 1
    m_sample = 2
    m_x0 = 3
    m_output = 4
    c_sample = 5
    c_last = 6
    c_m = 7
    c_hist = 8

    @property
    def p_xc(self) -> int:
        return 8 + self.slots

    @property
    def p_m(self) -> int:
        return 9 + self.slots

    @property
    def p_hist(self) -> int:
        return 10 + self.slots

    @property
    def p_noise(self) -> int:
        return 10 + 2 * self.slots

    @property
    def width(self) -> int:
        return 11 + 2 * self.slots


@dataclasses.dataclass(frozen=True, eq=False)
class SigmaOperand:
    """A flow-matching sigma given per sample or per token / frame, in the forms each backend reads.

    ``full``: the sigma in the compute dtype with the data's number of dims (trailing 1s added to a (B,) or
    shorter tensor), broadcastable to the data: what the reference computes with. ``flat``, ``period``,
    ``repeat``: the same values as a contiguous ``(B * period,)`` tensor such that the element at offset ``i``
    of sample ``b``'s dense block (in the memory format the call runs in, ``ddpm_kernels._layout``) reads
    ``flat[b * period + (i // repeat) % period]``: ``period = 1`` for a per-sample sigma, ``period = L`` and
    ``repeat = C`` for a (B, L, 1) sigma of (B, L, C) tokens, ``period = F`` and ``repeat = H * W`` for a
    (B, 1, F, 1, 1) sigma of (B, C, F, H, W) video; a sigma whose varying dims are not one block is expanded
    (``period`` = the sample's size, ``repeat = 1``). See docs/design.md, "Flow matching".
    """

    full: object
    flat: object
    period: int
    repeat: int


# ------------------------------------------------------------------------------------------------ the table
@dataclasses.dataclass(frozen=True)
class Option:
    """A scalar option: its name, default and validator (``check(value) -> canonical value``, raising the
    documented error; see ``ddpm_kernels._checks``)."""

    name: str
    default: object
    check: Callable[[object], object]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One public op.

    Tensor roles: ``data`` is the primary tensor (its dtype, shape and device are the call's, and its memory
    format is the one the fused backends run in); ``like`` are required tensors with ``data``'s dtype, shape
    and device; ``optional`` likewise but may be None (given noise); ``timesteps`` are the per-sample index
    tensors (``t`` in [0, T), ``t_prev`` in [-1, T)). ``options`` are the scalar options in signature order.
    ``outputs`` are the kinds of the results: ``like`` (data's dtype, shape, format), ``per_sample`` ((B, 1, ...)
    in the table's dtype), ``scalar`` (0-d, data's dtype), ``pred_x0`` (``like`` when ``return_pred_x0``, else
    zero elements). ``draws_noise``: takes ``generator`` and draws in-kernel noise when ``noise`` is None, and
    the keyword ``sample_offset`` (the global index of the batch's first sample in the noise stream; the
    compiled schema's ``int sample_offset`` follows ``Generator? generator``).
    ``has_out``: takes ``out=``. ``differentiable``: the inputs the training path differentiates (an op with
    none is a sampling op: fused backends run it on detached inputs, see docs/design.md, "Dispatch").
    ``schema``: the compiled operator's schema (``ddpm_kernels::<name>``), pinned by tests/test_op_table.py.
    ``state``: tensors the op reads and then overwrites in place (the multistep family's history ring and
    last-sample buffer), not differentiable.
    ``sigmas``: the flow-matching family's sigma operands (float tensors of shape (B,) or broadcastable to the
    data per token / frame, see `SigmaOperand`), which take the place of ``t`` and the schedule.
    """

    name: str
    family: str
    data: str
    like: Tuple[str, ...] = ()
    optional: Tuple[str, ...] = ()
    timesteps: Tuple[str, ...] = ("t",)
    options: Tuple[Option, ...] = ()
    outputs: Tuple[str, ...] = ("like",)
    draws_noise: bool = False
    has_out: bool = False
    differentiable: Tuple[str, ...] = ()
    schema: Optional[str] = None
    sigmas: Tuple[str, ...] = ()
    state: Tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return not self.differentiable

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def tensors(self) -> Tuple[str, ...]:
        """Every tensor argument's name: data, like, optional, then timesteps, sigmas and state."""
        return (self.data,) + self.like + self.optional + self.timesteps + self.sigmas + self.state


def _flag(name, default):
    return Option(name, default, functools.partial(_c._check_bool, name))


def _real_in(name, default, lo, hi, lo_open=False):
    return Option(name, default, functools.partial(_c._check_range, name, lo=lo, hi=hi, lo_open=lo_open))


def _optional_real_in(name, default, lo, hi, lo_open=False):
    def check(value):
        return None if value is None else _c._check_range(name, value, lo, hi, lo_open=lo_open)

    return Option(name, default, check)


_INF = float("inf")
PARAMETERIZATION = Option("parameterization", "eps", _c._check_parameterization)
PREDICTION_TYPE = Option(
    "prediction_type", "epsilon",
    lambda value: _c.PARAMETERIZATIONS[_c._check_choice("prediction_type", value, _c.PARAMETERIZATIONS)],
)
CLIP_DENOISED = _flag("clip_denoised", True)
# the scalar options every sampler step of the family shares, after its own
def _guided_schema(name: str, head: str, options: str, pred_x0: bool = False) -> str:
    """The schema of a guided step: ``head`` operands, the model output with its guidance operands (uncond and
    the per-sample scales, absent for an unguided step), the step's tables and ``options``, then the tail every
    step ends with (guidance_rescale, noise, generator, sample_offset; return_pred_x0 and the x0 prediction as a
    second result with ``pred_x0``)."""
    tail = ", bool return_pred_x0) -> (Tensor, Tensor)" if pred_x0 else ") -> Tensor"
    return (f"{name}({head}, Tensor model_output, Tensor? uncond, Tensor? guidance, {options}, "
            f"float guidance_rescale, Tensor? noise, Generator? generator, int sample_offset{tail}")


_STEP_TAIL = (
    _real_in("clip_range", 1.0, 0.0, _INF, lo_open=True),
    _optional_real_in("threshold_ratio", None, 0.0, 1.0),
    _real_in("threshold_max", 1.0, 0.0, _INF, lo_open=True),
    _flag("return_pred_x0", False),
    _real_in("guidance_rescale", 0.0, 0.0, 1.0),
)

_POSTERIOR_OUTPUTS = ("like", "per_sample", "per_sample")


def _pair_row(name: str, data: str, other: str, t_last: bool = False, has_out: bool = False) -> OpSpec:
    """A pair op's row, ``a(t) data + b(t) other`` (``t_last``: ``t`` after both tensors, as ``get_v`` takes it)."""
    tensors = (data, other, "t") if t_last else (data, "t", other)
    return OpSpec(name, "pair", data, like=(other,), has_out=has_out, differentiable=(data, other),
                  schema=f"{name}({', '.join('Tensor ' + n for n in tensors)}, Tensor table) -> Tensor")


_TABLE = (
    _pair_row("q_sample", "x_start", "noise", has_out=True),
    _pair_row("predict_start_from_noise", "x_t", "noise"),
    _pair_row("predict_noise_from_start", "x_t", "x0"),
    _pair_row("get_v", "x_start", "noise", t_last=True),
    _pair_row("predict_start_from_z_and_v", "x_t", "v"),
    _pair_row("predict_eps_from_z_and_v", "x_t", "v"),
    OpSpec(
        "q_posterior", "posterior", "x_t", like=("x_start",), outputs=_POSTERIOR_OUTPUTS,
        differentiable=("x_start", "x_t"),
        schema="q_posterior(Tensor x_start, Tensor x_t, Tensor t, Tensor table) -> (Tensor, Tensor, Tensor)",
    ),
    OpSpec(
        "p_mean_variance", "posterior", "x_t", like=("model_output",), options=(PARAMETERIZATION, CLIP_DENOISED),
        outputs=_POSTERIOR_OUTPUTS,
        schema="p_mean_variance(Tensor x_t, Tensor t, Tensor model_output, Tensor table, str parameterization, "
        "bool clip_denoised) -> (Tensor, Tensor, Tensor)",
    ),
    OpSpec(
        "p_sample", "posterior", "x_t", like=("model_output",), optional=("noise",),
        options=(PARAMETERIZATION, CLIP_DENOISED), draws_noise=True, has_out=True,
        schema="p_sample(Tensor x_t, Tensor t, Tensor model_output, Tensor table, str parameterization, "
        "bool clip_denoised, Tensor? noise, Generator? generator, int sample_offset) -> Tensor",
    ),
    OpSpec(
        "diffusion_loss", "loss", "model_output", like=("x_start", "noise"),
        options=(
            PARAMETERIZATION,
            Option("loss_type", "l2", functools.partial(_c._check_choice, "loss_type", choices=_c.LOSS_TYPES)),
            Option("l_simple_weight", 1.0, functools.partial(_c._check_weight, "l_simple_weight")),
            Option("original_elbo_weight", 0.0, functools.partial(_c._check_weight, "original_elbo_weight")),
        ),
        outputs=("scalar", "scalar", "scalar"), differentiable=("model_output", "x_start", "noise"),
        schema="diffusion_loss(Tensor model_output, Tensor x_start, Tensor noise, Tensor t, Tensor table, "
        "str parameterization, str loss_type, float l_simple_weight, float original_elbo_weight) "
        "-> (Tensor, Tensor, Tensor)",
    ),
    OpSpec(
        "dynamic_threshold", "threshold", "x0", timesteps=(),
        options=(_real_in("ratio", 0.995, 0.0, 1.0), _real_in("max_value", 1.0, 0.0, _INF, lo_open=True)),
        differentiable=("x0",),
    ),
    OpSpec(
        "ddim_step", "step", "x_t", like=("model_output",), optional=("noise",), timesteps=("t", "t_prev"),
        options=(
            _real_in("eta", 0.0, 0.0, _INF), PARAMETERIZATION, _flag("clip_denoised", False),
            _flag("set_alpha_to_one", True), _flag("use_clipped_model_output", False),
        ) + _STEP_TAIL,
        outputs=("like", "pred_x0"), draws_noise=True, has_out=True,
        schema=_guided_schema("ddim_step", "Tensor x_t, Tensor t, Tensor t_prev", "Tensor table64, float eta, "
                              "str parameterization, bool clip_denoised, float clip_range, bool set_alpha_to_one, "
                              "bool use_clipped_model_output", pred_x0=True),
    ),
    OpSpec(
        "ddpm_step", "step", "x_t", like=("model_output",), optional=("noise",), timesteps=("t", "t_prev"),
        options=(
            PARAMETERIZATION,
            Option("variance_type", "fixed_small",
                   functools.partial(_c._check_choice, "variance_type", choices=VARIANCE_TYPES)),
            CLIP_DENOISED,
        ) + _STEP_TAIL,
        outputs=("like", "pred_x0"), draws_noise=True, has_out=True,
        schema=_guided_schema("ddpm_step", "Tensor x_t, Tensor t, Tensor t_prev", "Tensor table64, "
                              "str parameterization, str variance_type, bool clip_denoised, float clip_range",
                              pred_x0=True),
    ),
)

# The flow-matching family (rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0). Its ops take
# sigmas (per sample or per token) instead of t and a DiffusionSchedule; flow_step gathers sigma and sigma_next
# from the scheduler's sigma table by a per-sample step index, or reads them per token.
_FLOW_TABLE = (
    OpSpec(
        "flow_interpolate", "flow", "x0", like=("noise",), timesteps=(), sigmas=("sigma",), has_out=True,
        differentiable=("x0", "noise"),
        schema="flow_interpolate(Tensor x0, Tensor noise, Tensor sigma, int sigma_period, int sigma_repeat) -> Tensor",
    ),
    OpSpec(
        "flow_step", "flow", "sample", like=("model_output",), optional=("noise",), timesteps=(),
        sigmas=("sigma", "sigma_next"), options=(_flag("stochastic", False),
                                                 _real_in("guidance_rescale", 0.0, 0.0, 1.0)),
        draws_noise=True, has_out=True,
        schema=_guided_schema("flow_step", "Tensor sample", "Tensor? sigmas, Tensor? step_index, Tensor? sigma, "
                              "int sigma_period, int sigma_repeat, Tensor? sigma_next, int sigma_next_period, "
                              "int sigma_next_repeat, bool stochastic"),
    ),
    OpSpec(
        "flow_loss", "flow", "model_output", like=("x0", "noise"), timesteps=(), sigmas=("sigma",),
        options=(
            Option("weighting", "none",
                   functools.partial(_c._check_choice, "weighting", choices=FLOW_WEIGHTINGS)),
            Option("loss_type", "l2", functools.partial(_c._check_choice, "loss_type", choices=_c.LOSS_TYPES)),
        ),
        outputs=("scalar",), differentiable=("model_output", "x0", "noise"),
        schema="flow_loss(Tensor model_output, Tensor x0, Tensor noise, Tensor sigma, int sigma_period, "
        "int sigma_repeat, str weighting, str loss_type) -> Tensor",
    ),
)

# Euler-family steps on a sigma table (Karras et al. 2022's sigma space, as diffusers' Euler schedulers keep it:
# x = x0 + sigma eps): per-sample sigmas gathered from the table by a step index, as flow_step does.
_EULER_TAIL = (_flag("return_pred_x0", False), _real_in("guidance_rescale", 0.0, 0.0, 1.0))
_EULER_TABLE = (
    OpSpec(
        "euler_step", "sigma", "sample", like=("model_output",), optional=("noise",), timesteps=(),
        sigmas=("sigmas",),
        options=(
            PREDICTION_TYPE,
            _real_in("s_churn", 0.0, 0.0, _INF),
            Option("s_tmin", 0.0, functools.partial(_c._check_real_or_inf, name="s_tmin")),
            Option("s_tmax", _INF, functools.partial(_c._check_real_or_inf, name="s_tmax")),
            Option("s_noise", 1.0, functools.partial(_c._check_weight, "s_noise")),
        ) + _EULER_TAIL,
        outputs=("like", "pred_x0"), draws_noise=True, has_out=True,
        schema=_guided_schema("euler_step", "Tensor sample", "Tensor sigmas, Tensor step_index, "
                              "str parameterization, float s_churn, float s_tmin, float s_tmax, float s_noise",
                              pred_x0=True),
    ),
    OpSpec(
        "euler_ancestral_step", "sigma", "sample", like=("model_output",), optional=("noise",), timesteps=(),
        sigmas=("sigmas",), options=(PREDICTION_TYPE,) + _EULER_TAIL,
        outputs=("like", "pred_x0"), draws_noise=True, has_out=True,
        schema=_guided_schema("euler_ancestral_step", "Tensor sample", "Tensor sigmas, Tensor step_index, "
                              "str parameterization", pred_x0=True),
    ),
)

# The multistep-solver family: each step an affine combination of the sample, the converted model output, a
# history ring of earlier outputs, a last-sample buffer and noise, with per-sample coefficients gathered from a
# table (one row per step, built once per schedule) by a step index. See `SolverColumns`.
_SOLVER_TABLE = (
    OpSpec(
        "solver_step", "solver", "sample", like=("model_output",), optional=("noise",), timesteps=(),
        state=("history", "last_sample"),
        options=(
            _flag("stochastic", False),
            _optional_real_in("clip_range", None, 0.0, _INF, lo_open=True),
            _optional_real_in("threshold_ratio", None, 0.0, 1.0),
            _real_in("threshold_max", 1.0, 0.0, _INF, lo_open=True),
            _real_in("guidance_rescale", 0.0, 0.0, 1.0),
        ),
        draws_noise=True, has_out=True,
        schema=_guided_schema("solver_step", "Tensor sample", "Tensor coefficients, Tensor step_index, "
                              "Tensor(b!)? history, Tensor(c!)? last_sample, bool stochastic, float? clip_range"),
    ),
)

OPS: Dict[str, OpSpec] = {spec.name: spec for spec in _TABLE + _FLOW_TABLE + _EULER_TABLE + _SOLVER_TABLE}
"""Every public op by name, in the order the README lists them."""


def step_options(spec: OpSpec, values: Tuple) -> StepOptions:
    """The validated `StepOptions` of a sampler step from its option values in table order."""
    return StepOptions(spec.name[: -len("_step")], **dict(zip(spec.option_names, values)))
