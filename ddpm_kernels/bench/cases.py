"""Benchmark cases, derived from the op table (``ddpm_kernels._spec.OPS``).

Every op gets a case at its option defaults with given noise; an op that draws noise at those defaults gets a
second case, ``<op>_rng``, that leaves ``noise`` None so the backend draws it; a loss (an op whose outputs are
all scalars) is timed forward plus the gradient w.r.t. its data tensor, ``<op>_fwd_bwd``, because training
never runs one without the other. ``flow_step`` also gets its stochastic cases and ``flow_step_guided``:
classifier-free guidance inside the step, on the (2B, ...) output of a batched ``[uncond; cond]`` forward with
one guidance scale per sample. Inputs come from the declared tensor roles, so an op added to the table is
benchmarked without a line here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import euler, flow, ops as dk, solvers
from .._spec import OPS, OpSpec, SolverColumns, step_options
from ..schedule import DiffusionSchedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Mixed precision as under torch.autocast: fp32 data with the model output in a lower precision (the cases whose
# op takes a model output; a loss's is its data). Their fused backends also get a "+cast" row: the model output
# cast to fp32 first, then the call, as a backend without native mixed reads runs it.
MIXED_DTYPES = {"fp32+bf16": torch.bfloat16, "fp32+fp16": torch.float16}


def dtype_pair(name: str):
    """``(data dtype, model output dtype or None)`` of a ``--dtypes`` name."""
    if name in MIXED_DTYPES:
        return torch.float32, MIXED_DTYPES[name]
    return DTYPES[name], None


def takes_model_output(case: str) -> bool:
    spec = CASES[case].spec
    return "model_output" in (spec.data,) + spec.like
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One benchmarked call of an op: ``name`` is the row's ``op`` column."""

    name: str
    spec: OpSpec
    in_kernel_noise: bool = False
    backward: bool = False
    overrides: tuple = ()  # (name, value) pairs replacing option defaults
    guided: bool = False  # flow_step with guidance: a (2B, ...) [uncond; cond] model output, a scale per sample

    @property
    def options(self) -> Dict[str, object]:
        return {**{o.name: o.default for o in self.spec.options}, **dict(self.overrides)}

    @property
    def step_options(self):
        """The validated `StepOptions` of a sampler step at its defaults (what dispatch keys on), else None."""
        if self.spec.family != "step":
            return None
        return step_options(self.spec, tuple(o.check(o.default) for o in self.spec.options))

    @property
    def noise_read(self) -> bool:
        """Whether a given ``noise`` is read: DDIM at ``eta == 0`` (its default) adds none."""
        opts = self.step_options
        options = self.options
        if opts is not None:
            adds_noise = opts.adds_noise
        elif "s_churn" in options:  # the Euler step draws only with churn
            adds_noise = options["s_churn"] > 0
        else:
            adds_noise = options.get("stochastic", True)
        return not self.in_kernel_noise and adds_noise


def _cases(spec: OpSpec) -> List[CaseSpec]:
    if all(kind == "scalar" for kind in spec.outputs):
        return [CaseSpec(spec.name + "_fwd_bwd", spec, backward=True)]
    base = CaseSpec(spec.name, spec)
    if spec.name == "flow_step":  # deterministic by default: its noise cases are the stochastic step's
        stochastic = (("stochastic", True),)
        return [base, CaseSpec(spec.name + "_stochastic", spec, overrides=stochastic),
                CaseSpec(spec.name + "_stochastic_rng", spec, in_kernel_noise=True, overrides=stochastic),
                CaseSpec(spec.name + "_guided", spec, guided=True)]
    if spec.name == "euler_step":  # no noise at its defaults (no churn)
        return [base]
    if spec.family == "solver":  # deterministic by default (no noise given, none drawn); then the SDE form
        stochastic = (("stochastic", True),)
        return [CaseSpec(spec.name, spec, in_kernel_noise=True), CaseSpec(spec.name + "_sde", spec, overrides=stochastic)]
    opts = base.step_options
    if spec.draws_noise and (opts is None or opts.adds_noise):
        return [base, CaseSpec(spec.name + "_rng", spec, in_kernel_noise=True)]
    return [base]


CASES: Dict[str, CaseSpec] = {case.name: case for spec in OPS.values() for case in _cases(spec)}
"""Every case by name, in the op table's order."""


def select_cases(names: Optional[Sequence[str]]) -> List[str]:
    """Case names for ``--ops``: a case's name selects it, an op's name every case of that op."""
    if not names:
        return list(CASES)
    chosen = []
    for name in names:
        matches = [name] if name in CASES else [c.name for c in CASES.values() if c.spec.name == name]
        chosen += [m for m in matches if m not in chosen]
    return chosen


def op_choices() -> List[str]:
    return sorted(set(CASES) | set(OPS))


def _first(result):
    """The loss of a loss op's ``(loss, ...)``."""
    return result[0] if isinstance(result, (tuple, list)) else result


# ----------------------------------------------------------------------------------------- diffusers
# diffusers has no per-op API: these are the scheduler calls that do a case's work, by case name. A case without
# one gets no diffusers row. diffusers looks its tables up with one host-side timestep per call.
def _ddim_given_noise(scheduler, tensors, step):
    # DDIM at eta = 1 with t_prev = t - 1 is the ancestral step, and the stock call that takes given noise
    return scheduler.step(tensors["model_output"], step, tensors["x_t"], eta=1.0,
                          variance_noise=tensors["noise"]).prev_sample


def _stock_step(scheduler, tensors, step):
    return scheduler.step(tensors["model_output"], step, tensors["x_t"]).prev_sample


def _flow_stock_step(scheduler, model_output, sample, step):
    # The stock step advances its own step index after each call; the case times one step at a fixed index, as
    # every step of a pipeline's loop after the first runs (the first also looks its index up on the host).
    scheduler._step_index = step
    return scheduler.step(model_output, scheduler.timesteps[step], sample).prev_sample


def _flow_step_stock(scheduler, tensors, step):
    return _flow_stock_step(scheduler, tensors["model_output"], tensors["sample"], step)


def _cfg_then_flow_step(scheduler, tensors, step):
    # what diffusers' pipelines do: chunk the batched output, guide in eager PyTorch, then the stock step
    uncond, cond = tensors["model_output"].chunk(2)
    w = tensors["guidance_scale"].reshape((-1,) + (1,) * (cond.ndim - 1))
    return _flow_stock_step(scheduler, uncond + w * (cond - uncond), tensors["sample"], step)


def _scale_noise(scheduler, tensors, step):
    # per-sample timesteps: the stock call looks each one's index up on the host
    return scheduler.scale_noise(tensors["x0"], scheduler.timesteps, tensors["noise"])


def _dpm_stock_step(scheduler, tensors, step):
    # One second-order step at a fixed index, as every step of a DPM-Solver++ 2M loop after its warm-up; the
    # stock list of earlier outputs carries from call to call (see `stock_dpm_scheduler`).
    scheduler._step_index = step
    scheduler.lower_order_nums = scheduler.config.solver_order
    return scheduler.step(tensors["model_output"], scheduler.timesteps[step], tensors["sample"],
                          variance_noise=tensors["noise"]).prev_sample


_DIFFUSERS = {  # case -> (provider label, stock scheduler, call)
    "q_sample": ("diffusers", "ddpm", lambda s, ts, step: s.add_noise(ts["x_start"], ts["noise"], ts["t"])),
    "p_sample": ("diffusers_ddim", "ddim", _ddim_given_noise),
    "p_sample_rng": ("diffusers", "ddpm", _stock_step),
    "ddim_step": ("diffusers", "ddim", _stock_step),
    "ddpm_step_rng": ("diffusers", "ddpm", _stock_step),
    # flow matching: FlowMatchEulerDiscreteScheduler on the case's own sigmas (see `stock_flow_scheduler`)
    "flow_interpolate": ("diffusers", "flow_per_sample", _scale_noise),
    "flow_step": ("diffusers", "flow", _flow_step_stock),
    "flow_step_stochastic_rng": ("diffusers", "flow_stochastic", _flow_step_stock),
    "flow_step_guided": ("diffusers", "flow", _cfg_then_flow_step),
    # multistep solvers: DPMSolverMultistepScheduler's 2M step (ODE; SDE with the case's noise)
    "solver_step": ("diffusers", "dpm", _dpm_stock_step),
    "solver_step_sde": ("diffusers", "dpm_sde", _dpm_stock_step),
}
_DIFFUSERS_NOTES = {
    "flow_interpolate": "host index lookup per sample",
    "flow_step_guided": "eager CFG, then the stock step; scalar timestep",
}


def diffusers_installed() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def has_diffusers_counterpart(case: str) -> bool:
    return case in _DIFFUSERS and diffusers_installed()


def stock_scheduler(kind: str, schedule: DiffusionSchedule, device: torch.device):
    """diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` on ``schedule``'s betas, with every timestep kept (so a
    DDIM step from t goes to t - 1) and its tables on ``device``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    T = schedule.num_timesteps
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    scheduler = cls(num_train_timesteps=T, trained_betas=schedule.betas.detach().cpu().tolist())
    scheduler.set_timesteps(T)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


def stock_flow_scheduler(kind: str, tensors: Dict[str, Optional[torch.Tensor]], device: torch.device):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1, so sigmas are used as given) on a case's sigmas:
    the step's table without its final 0 (the scheduler appends it), or, for ``scale_noise``
    (``flow_per_sample``), one inference step per sample at that sample's sigma, so that ``scheduler.timesteps``
    are the per-sample timesteps of the same values. ``flow_stochastic``: ``stochastic_sampling=True``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, stochastic_sampling=kind == "flow_stochastic")
    sigmas = tensors["sigma"] if kind == "flow_per_sample" else tensors["sigmas"][:-1]
    scheduler.set_timesteps(sigmas=sigmas.detach().cpu().tolist(), device=device)
    return scheduler


def stock_dpm_scheduler(kind: str, tensors: Dict[str, Optional[torch.Tensor]]):
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, ``sde-dpmsolver++`` for ``dpm_sde``) with 50
    steps, its list of earlier outputs holding the case's ring (the stock class keeps its sigmas on the CPU)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if kind == "dpm_sde" else "dpmsolver++",
                                            solver_order=2)
    scheduler.set_timesteps(50)
    scheduler.model_outputs = [tensors["history"][0], tensors["history"][1]]
    return scheduler


# --------------------------------------------------------------------------------------------- inputs
class Case:
    """Inputs of one case x shape x dtype on a device, the bytes it must move, and the callables each provider
    times."""

    def __init__(self, case, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 schedule: DiffusionSchedule, memory_format: torch.memory_format = torch.contiguous_format,
                 model_dtype: Optional[torch.dtype] = None):
        self.case = CASES[case] if isinstance(case, str) else case
        spec = self.case.spec
        self.op, self.spec = self.case.name, spec
        self.shape, self.dtype, self.device, self.s = tuple(shape), dtype, device, schedule
        self.model_dtype = model_dtype  # the model output's dtype when it differs from the data's (MIXED_DTYPES)
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(shape, dtype=dtype):
            x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            return x.contiguous(memory_format=memory_format)

        opts = self.case.step_options
        self.tensors: Dict[str, Optional[torch.Tensor]] = {
            spec.data: rand(self.shape, model_dtype if spec.data == "model_output" and model_dtype else dtype)}
        for i, name in enumerate(spec.like):
            # a learned variance rides in a second half of model_output's channels (the first like tensor); a
            # guided step's model output is the batched [uncond; cond] output, twice the batch
            doubled = i == 0 and opts is not None and opts.learned
            shape = self.shape[:1] + (2 * self.shape[1],) + self.shape[2:] if doubled else self.shape
            if i == 0 and self.case.guided:
                shape = (2 * self.shape[0],) + self.shape[1:]
            self.tensors[name] = rand(shape, model_dtype if name == "model_output" and model_dtype else dtype)
        for name in spec.optional:
            self.tensors[name] = None if self.case.in_kernel_noise else rand(self.shape)
        t = torch.randint(0, schedule.num_timesteps, (self.shape[0],), generator=g)
        steps = {"t": t, "t_prev": (t - 1).clamp(min=-1)}
        self.tensors.update({name: steps[name].to(device) for name in spec.timesteps})
        if spec.name == "flow_step":  # the table form: a 50-step sigma table, a step index per sample
            self.tensors["sigmas"] = torch.linspace(1.0, 0.0, 51).to(device)
            self.tensors["step_index"] = torch.randint(0, 50, (self.shape[0],), generator=g).to(device)
        elif spec.family == "sigma":  # a Karras-like table from 14.6 down to 0.03, then 0
            self.tensors["sigmas"] = torch.cat([torch.logspace(1.164, -1.5, 50), torch.zeros(1)]).to(device)
            self.tensors["step_index"] = torch.randint(0, 50, (self.shape[0],), generator=g).to(device)
        elif spec.sigmas:
            self.tensors["sigma"] = (0.02 + 0.96 * torch.rand(self.shape[0], generator=g)).to(device)
        elif spec.family == "solver":
            self._solver_state(g, rand)
        self.out = torch.empty_like(self.tensors[spec.data]) if spec.has_out else None
        module = {"sigma": euler, "flow": flow, "solver": solvers}.get(spec.family, dk)
        self.fn = getattr(module, spec.name)
        # ops without timesteps (dynamic_threshold) take no schedule
        self.static = dict(self.case.options, **({"schedule": schedule} if spec.timesteps else {}))
        if self.case.guided:  # one scale per sample, in [1, 8) as pipelines use
            self.static["guidance_scale"] = (1 + 7 * torch.rand(self.shape[0], generator=g)).to(device)
        self.numel = self.tensors[spec.data].numel()
        self.bytes = self._bytes(opts)

    def _solver_state(self, g, rand):
        """A second-order multistep step (DPM-Solver++ 2M's shape): x0 from an epsilon output, one earlier output
        read from a ring of two, the new one written into it; 50 rows of coefficients, a row per sample."""
        col = SolverColumns(2)
        table = torch.zeros((50, col.width), dtype=torch.float64)
        sigma = torch.logspace(0.0, -1.5, 50, dtype=torch.float64)
        alpha = (1 - sigma ** 2).sqrt()
        table[:, col.x0_sample], table[:, col.x0_output] = 1 / alpha, -sigma / alpha
        table[:, col.m_x0] = table[:, col.c_sample] = 1.0
        table[:, col.p_xc], table[:, col.p_m] = 0.9 + 0.05 * torch.rand(50, generator=g, dtype=torch.float64), 0.2
        table[:, col.p_hist], table[:, col.p_noise] = -0.1, 0.3
        self.tensors["coefficients"] = table.to(self.device)
        self.tensors["step_index"] = torch.randint(1, 50, (self.shape[0],), generator=g).to(self.device)
        self.tensors["history"] = torch.stack([rand(self.shape), rand(self.shape)])

    def _bytes(self, opts) -> int:
        """Bytes the op must move: data, like and read optional tensors in; ``like`` outputs (and a returned
        ``pred_x0``) out. Forward and backward: the backward kernels save nothing, so they read the forward's
        tensors again, and write one gradient."""
        spec, ts = self.spec, self.tensors
        size = lambda n: ts[n].numel() * ts[n].element_size()
        read = sum(size(n) for n in (spec.data,) + spec.like)  # a guided output counts twice
        if self.case.noise_read:
            read += sum(size(n) for n in spec.optional)
        returns_x0 = opts is not None and opts.return_pred_x0
        # outputs in the promoted dtype (the data's, fp32 in a mixed case); a loss gradient in its input's
        out_size = torch.promote_types(self.dtype, self.model_dtype or self.dtype).itemsize
        written = self.numel * out_size * sum(k == "like" or (k == "pred_x0" and returns_x0) for k in spec.outputs)
        if spec.family == "solver":  # the earlier output read from the ring and the new one written into it
            read, written = read + self.numel * out_size, written + self.numel * out_size
        if self.case.backward:
            read, written = 2 * read, written + size(spec.data)
        return read + written

    @property
    def grad_inputs(self) -> Optional[frozenset]:
        return frozenset((self.spec.data,)) if self.case.backward else None

    def _bind(self, fn: Callable, **kwargs) -> Callable[[], object]:
        """``fn`` on this case's tensors: a forward call, or forward + gradient of a loss w.r.t. its data."""
        names = [n for n, v in self.tensors.items() if v is not None]
        given = [self.tensors[n] for n in names]
        absent = {n: None for n, v in self.tensors.items() if v is None}
        call = functools.partial(fn, **absent, **kwargs)
        if not self.case.backward:
            return lambda: call(*given)
        i = names.index(self.spec.data)
        leaf = given[i].detach().requires_grad_(True)
        given[i] = leaf
        return lambda: torch.autograd.grad(_first(call(*given)), leaf)

    def _public(self, backend: str, out=None, cast: bool = False) -> Callable:
        names = [n for n, v in self.tensors.items() if v is not None]
        extra = {"out": out} if out is not None else {}

        def call(*given, **absent):
            tensors = dict(zip(names, given))
            if cast:  # the low-precision model output cast to the data's dtype first (autograd-tracked)
                tensors["model_output"] = tensors["model_output"].to(self.dtype)
            return self.fn(**tensors, **absent, **self.static, backend=backend, **extra)

        return call

    def call(self, backend: str, out: bool = False, cast: bool = False) -> Callable[[], object]:
        """The public op on ``backend`` (``out=``: into a preallocated tensor; ``cast``: a mixed case's model
        output cast to the data's dtype before the call, the cast timed with it)."""
        return self._bind(self._public(backend, self.out if out else None, cast))

    def compiled(self) -> Callable[[], object]:
        """``torch.compile`` of the reference call; shapes are fixed, so no dynamic-shape guards."""
        forward = self._public("reference")
        loss = (lambda *a, **k: _first(forward(*a, **k))) if self.case.backward else forward
        # Every case compiles the same wrapper code, and dynamo keeps its compiled entries per code object: past
        # the recompile limit (8) it silently runs eager. A case is compiled just before it is timed, so the
        # earlier cases' entries are no longer needed.
        torch._dynamo.reset()
        return self._bind(torch.compile(loss, dynamic=False))

    @property
    def diffusers_note(self) -> str:
        return _DIFFUSERS_NOTES.get(self.op, "scalar timestep")

    def diffusers_calls(self) -> Dict[str, Callable[[], object]]:
        if not has_diffusers_counterpart(self.op):
            return {}
        label, kind, step_call = _DIFFUSERS[self.op]
        tensors = dict(self.tensors)
        if kind.startswith("dpm"):
            scheduler = stock_dpm_scheduler(kind, tensors)
            step = 25
        elif kind.startswith("flow"):
            scheduler = stock_flow_scheduler(kind, tensors, self.device)
            step = int(tensors["step_index"][0]) if "step_index" in tensors else 0
            if self.case.guided:
                tensors["guidance_scale"] = self.static["guidance_scale"]
        else:
            scheduler = stock_scheduler(kind, self.s, self.device)
            step = self.s.num_timesteps // 2
        return {label: lambda: step_call(scheduler, tensors, step)}

