"""The direct step of the sigma-table drop-ins (flow matching, Euler, ancestral Euler), of the multistep ones
(DPM-Solver++, UniPC, LCM: with their checked solver call) and the served DDIM / DDPM step: a step that
continues the schedule of the last fused step on operands of the kind it checked skips the checks that step
made (docs/design.md, "Host overhead"). Whatever changes between two steps of a loop (the step index, the
dtypes, the config edited in place, the table edited in place, the batch, an integer timestep, a gradient
asked of the model output, the backend) must give what the fully checked step gives, bit for bit, and what
the stock scheduler gives (its result, dtype, error)."""

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler,
)

from ddpm_kernels.integrations.diffusers import (  # noqa: E402
    FusedDDIMScheduler, FusedDDPMScheduler, FusedDPMSolverMultistepScheduler, FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, FusedLCMScheduler, FusedUniPCMultistepScheduler,
)

SHAPE = (2, 4, 6, 5)
STEPS = 6
EVENT_AT = 3  # the loop step at which the event happens (after the direct path has taken steps 1 and 2)
FAMILIES = {
    "flow": (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    "euler": (EulerDiscreteScheduler, FusedEulerDiscreteScheduler, dict(beta_schedule="scaled_linear")),
    "ancestral": (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler,
                  dict(beta_schedule="scaled_linear")),
    "dpm": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear")),
    "unipc": (UniPCMultistepScheduler, FusedUniPCMultistepScheduler, dict(beta_schedule="scaled_linear")),
    "lcm": (LCMScheduler, FusedLCMScheduler, dict(beta_schedule="scaled_linear")),
    "ddim": (DDIMScheduler, FusedDDIMScheduler, dict(beta_schedule="scaled_linear")),
    "ddim_eta": (DDIMScheduler, FusedDDIMScheduler, dict(beta_schedule="scaled_linear")),
    "ddpm": (DDPMScheduler, FusedDDPMScheduler, dict(beta_schedule="scaled_linear")),
}
TAKES_GENERATOR = ("flow", "euler", "ancestral", "dpm", "lcm", "ddim", "ddim_eta", "ddpm")  # (not UniPC's step)
STEP_KWARGS = {"ddim_eta": dict(eta=0.5)}  # (a DDIM loop that draws noise)
DDPM_FAMILIES = ("ddim", "ddim_eta", "ddpm")  # (the timestep-indexed steps: integer timesteps, no step index)
# a config entry each step reads, edited in place: to a value the step takes, and to one the stock step refuses
# (the flow step reads no entry it could refuse)
CONFIG_EDITS = {
    "config_in_place": {"flow": ("stochastic_sampling", True), "euler": ("prediction_type", "v_prediction"),
                        "ancestral": ("prediction_type", "v_prediction"), "dpm": ("prediction_type", "v_prediction"),
                        "unipc": ("prediction_type", "v_prediction"), "lcm": ("prediction_type", "v_prediction")},
    "config_refused": {"flow": ("stochastic_sampling", True), "euler": ("prediction_type", "x0"),
                       "ancestral": ("prediction_type", "sample"), "dpm": ("prediction_type", "x0"),
                       "unipc": ("prediction_type", "x0"), "lcm": ("prediction_type", "x0")},
}


def model(x, t, dtype=None):
    t = torch.as_tensor(t, dtype=torch.float32)
    out = x.float() * (0.3 + t / 4000) - 0.2 * torch.cos(x.float() + t / 100)
    return out.to(dtype or x.dtype)


def event(name, family, scheduler, x, t):
    """Apply ``name`` to ``scheduler`` at a step; returns ``(sample, model_output, timestep)`` of that step."""
    mo = model(x, t)
    if name == "step_index_back":
        scheduler._step_index -= 2
    elif name == "past_the_end":
        scheduler._step_index = len(scheduler.timesteps)
    elif name == "half":
        x, mo = x.half(), mo.half()
    elif name == "mixed_bf16":
        mo = mo.bfloat16()
    elif name == "integer_sample":
        x = x.round().long()  # (not what the fused step takes: the stock code path)
    elif name == "float64":
        x, mo = x.double(), mo.double()
    elif name in CONFIG_EDITS:
        key, value = CONFIG_EDITS[name][family]
        setattr(scheduler.config, key, value)
    elif name == "sigmas_in_place":
        scheduler.sigmas.mul_(0.9)
    elif name == "sigmas_replaced":
        scheduler.sigmas = scheduler.sigmas * 0.9
    elif name == "batch":
        x, mo = x[:1], mo[:1]
    elif name == "channels_last":
        x, mo = x.contiguous(memory_format=torch.channels_last), mo.contiguous(memory_format=torch.channels_last)
    elif name == "int_timestep":
        t = int(t)
    elif name == "per_sample_timestep":  # (one timestep per sample, a tensor the DDPM / DDIM drop-ins take)
        t = torch.full((x.shape[0],), int(t))
    elif name == "float_timestep":  # (LCM's stock step indexes its table by the timestep: its error)
        t = float(t)
    elif name == "alphas_in_place":
        scheduler.alphas_cumprod.mul_(0.999)
    elif name == "alphas_replaced":
        scheduler.alphas_cumprod = scheduler.alphas_cumprod * 0.999
    elif name == "in_kernel_noise" and hasattr(scheduler, "fused_backend"):
        scheduler.in_kernel_noise = True
    elif name == "model_output_shape":
        mo = mo[..., :-1]
    elif name == "grad":
        mo = mo.detach().requires_grad_()
    elif name == "warmup_reset":  # (a multistep solver's history and warm-up restarted by hand)
        scheduler.model_outputs = [None] * scheduler.config.solver_order
        scheduler.lower_order_nums = 0
    elif name == "backend" and hasattr(scheduler, "fused_backend"):
        scheduler.fused_backend = "reference"
    return x, mo, t


def run(scheduler, family, name, full_checks=False):
    """A pipeline's loop with ``name`` happening at step `EVENT_AT`: each step's ``(prev_sample, dtype,
    step_index)``, or the exception the event step raised (the loop stops there). ``full_checks``: each step
    of the fused scheduler forgets the last step's lane, so it takes the fully checked path."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(SHAPE) * getattr(scheduler, "init_noise_sigma", 1.0)
    results = []
    timesteps = list(scheduler.timesteps)
    if name == "one_past_the_end":
        timesteps.append(timesteps[-1])  # a step after the last: the step index is past the table's steps
    for i, t in enumerate(timesteps):
        if i == EVENT_AT:
            x, mo, t = event(name, family, scheduler, x, t)
        else:
            mo = model(x, t)
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # (the Euler steps warn without it; its result is not needed)
        if full_checks:
            for key in scheduler._dk_transient:
                scheduler.__dict__.pop(key, None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the fused step names the stock path it takes)
                kwargs = dict(generator=g) if family in TAKES_GENERATOR else {}
                if i == EVENT_AT and name in GENERATOR_EVENTS and kwargs:
                    kwargs["generator"] = GENERATOR_EVENTS[name]()
                out = scheduler.step(mo, t, x, **kwargs, **STEP_KWARGS.get(family, {})).prev_sample
        except Exception as exc:  # noqa: BLE001  (the stock error must be the fused one)
            results.append((type(exc), str(exc)))
            break
        results.append((out.detach(), out.dtype, getattr(scheduler, "step_index", None)))
        x = out.detach().float() if name == "mixed_bf16" else out.detach()
        if name in ("half", "float64", "batch", "integer_sample") and i == EVENT_AT:
            x = x.float()  # (the event step alone has the other dtype or batch... and the next ones the first)
            if name == "batch":
                x = torch.cat([x, x])
    return results


def tolerance(name, step):
    """Against stock: float32 rounding, half precision's from a half-precision step on (the stock step rounds
    ``dt * model_output`` to it, the fused one once at the end: docs/design.md, "Tolerances")."""
    return 2e-2 if name in ("half", "mixed_bf16") and step >= EVENT_AT else 1e-4


# the step's generator replaced for one step: torch's default generator, another generator
GENERATOR_EVENTS = {"default_generator": lambda: None, "other_generator": lambda: torch.Generator().manual_seed(7)}
EVENTS = [
    *GENERATOR_EVENTS,
    "none", "step_index_back", "past_the_end", "one_past_the_end", "half", "mixed_bf16", "float64", "integer_sample",
    "config_in_place", "config_refused", "sigmas_in_place", "sigmas_replaced", "batch", "channels_last",
    "int_timestep", "model_output_shape", "grad", "backend",
]


# the solver drop-ins' events: those of a loop that continues after them as the sigma-table steps' do (a solver's
# stock step also takes integer timesteps, and its history of earlier outputs makes a changed dtype, batch or
# step index a different loop from there on)
SOLVER_EVENTS = ["none", "mixed_bf16", "config_in_place", "config_refused", "sigmas_in_place", "sigmas_replaced",
                 "channels_last", "model_output_shape", "backend"]
SOLVER_EVENTS = {
    "dpm": SOLVER_EVENTS + ["half", "float64", "warmup_reset", "step_index_back", "grad"],
    "unipc": SOLVER_EVENTS + ["step_index_back", "grad", "warmup_reset"],
    # (LCM's table is built from alphas_cumprod. Its stock step reads it at the timestep argument, so a float one
    # errs and a step index moved against the timesteps is another step than the fused one's, which reads it at
    # timesteps[step_index]; past the end the stock step runs, on the last timestep)
    "lcm": [e for e in SOLVER_EVENTS if not e.startswith("sigmas")] + [
        "alphas_in_place", "alphas_replaced", "half", "float64", "past_the_end", "one_past_the_end", "batch", "grad",
        "float_timestep", *GENERATOR_EVENTS],
}
# the DDPM / DDIM steps' events: what changes the served call (dtypes, batch, layout, backend), timesteps of the
# other forms they take (an int, one per sample: the checked op), and what the stock step refuses
SOLVER_EVENTS.update({family: ["none", "half", "mixed_bf16", "float64", "integer_sample", "batch", "channels_last",
                               "int_timestep", "per_sample_timestep", "model_output_shape", "grad", "backend",
                               *GENERATOR_EVENTS]
                      for family in DDPM_FAMILIES})
CASES = [(family, name) for family in FAMILIES for name in SOLVER_EVENTS.get(family, EVENTS)]


@pytest.mark.parametrize("family,name", CASES)
def test_direct_step_gives_the_checked_and_the_stock_result(family, name):
    stock_class, fused_class, config = FAMILIES[family]
    stock = stock_class(**config)
    fused, checked = (fused_class.from_config(stock.config) for _ in range(2))
    got = run(fused, family, name)
    reference = run(checked, family, name, full_checks=True)
    # (a timestep per sample is what the stock DDPM / DDIM steps do not take: the fused ones against themselves)
    expected = reference if name == "per_sample_timestep" else run(stock, family, name)
    assert len(got) == len(reference) == len(expected)
    for i, (g, r, e) in enumerate(zip(got, reference, expected)):
        if len(e) == 2:  # the stock error, and the fused one
            assert g[0] is r[0] is e[0], (i, g, e)
            assert g[1] == r[1] == e[1], (i, g, e)
            continue
        # the direct step is the checked step, bit for bit, with the stock dtype and step index
        assert torch.equal(g[0], r[0]) and g[1:] == r[1:], i
        assert g[1] == e[1] and g[2] == e[2], (i, g[1:], e[1:])
        scale = max(1.0, e[0].abs().max().item())
        tol = tolerance(name, i)
        torch.testing.assert_close(g[0].double(), e[0].double(), rtol=tol, atol=tol * scale, msg=f"step {i}")
    if (name == "int_timestep" and family not in DDPM_FAMILIES) or name in ("float_timestep", "model_output_shape") or (
            name in ("past_the_end", "one_past_the_end") and family != "lcm") or (
            name == "config_refused" and family != "flow"):
        assert len(got[-1]) == 2  # (the stock error: the event did happen)


@pytest.mark.parametrize("name", ["half", "float64"])
def test_unipc_step_in_another_precision_keeps_the_history(name):
    """A UniPC step whose sample and model output come in another precision in the middle of a loop moves the ring
    and the last sample into buffers of that dtype with their values: that step and the next ones are the stock
    values (the stock step's result dtype there follows its float32 state instead; the values are compared)."""
    stock_class, fused_class, config = FAMILIES["unipc"]
    stock = stock_class(**config)
    fused = fused_class.from_config(stock.config)
    expected, got = run(stock, "unipc", name), run(fused, "unipc", name)
    assert len(got) == len(expected) == STEPS
    for i, (g, e) in enumerate(zip(got, expected)):
        scale = max(1.0, e[0].abs().max().item())
        tol = tolerance(name, i)
        torch.testing.assert_close(g[0].double(), e[0].double(), rtol=tol, atol=tol * scale, msg=f"step {i}")
        assert g[2] == e[2]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_scheduler_mid_loop_pickles_and_copies(family):
    """A drop-in pickled or deep-copied in the middle of a loop (its lane and checked call, which hold serving
    functions, left out) continues that loop as the original does, bit for bit."""
    import copy
    import pickle

    stock_class, fused_class, config = FAMILIES[family]
    fused = fused_class(**config)
    fused.set_timesteps(STEPS)
    x = torch.randn(SHAPE) * getattr(fused, "init_noise_sigma", 1.0)
    timesteps = list(fused.timesteps)
    kwargs = {} if family == "unipc" else dict(generator=torch.Generator().manual_seed(1))
    for t in timesteps[:3]:
        fused.is_scale_input_called = True
        x = fused.step(model(x, t), t, x, **kwargs).prev_sample
    copies = [pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)]
    for c in copies:
        assert not any(key in c.__dict__ for key in fused_class._dk_transient)
    finals = []
    for s in [fused] + copies:
        y = x
        g = None if family == "unipc" else torch.Generator().manual_seed(2)
        for t in timesteps[3:]:
            s.is_scale_input_called = True
            y = s.step(model(y, t), t, y, **({} if g is None else dict(generator=g))).prev_sample
        finals.append(y)
    assert all(torch.equal(finals[0], f) for f in finals[1:])


def _loop(scheduler, x, steps, checked=False, **step_kwargs):
    """The loop's samples; ``checked``: every step without the caches of served calls (the fully checked path)."""
    out = []
    for t in list(scheduler.timesteps)[:steps]:
        if checked:
            for key in scheduler._dk_transient:
                scheduler.__dict__.pop(key, None)
        scheduler.is_scale_input_called = True
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("family,churn", [("ancestral", 0.0), ("euler", 1.0)])
def test_in_kernel_noise_of_a_channels_last_loop_is_the_checked_steps(family, churn):
    """A step drawing its noise in the kernel draws it in row-major order whatever the sample's layout: the served
    steps of a channels_last loop are the fully checked ones, bit for bit, and the contiguous loop's."""
    _, fused_class, config = FAMILIES[family]
    kwargs = dict(s_churn=churn) if family == "euler" else {}
    runs = []
    for fmt, checked in ((torch.channels_last, False), (torch.channels_last, True), (torch.contiguous_format, False)):
        s = fused_class(**config)
        s.in_kernel_noise = True
        s.set_timesteps(STEPS)
        torch.manual_seed(0)
        x = (torch.randn(SHAPE) * s.init_noise_sigma).contiguous(memory_format=fmt)
        runs.append(_loop(s, x, STEPS, checked, **kwargs))
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)


class _Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("family", ["flow", "euler", "ancestral", "dpm", "unipc", "ddim", "ddpm"])
def test_tensor_subclasses_keep_their_type(family):
    """A tensor subclass sample gives the type the stock step gives (the subclass: its ``__torch_function__``
    sees the operator), served or not."""
    stock_class, fused_class, config = FAMILIES[family]
    for cls in (stock_class, fused_class):
        s = cls(**config)
        s.set_timesteps(STEPS)
        x = torch.randn(SHAPE).as_subclass(_Tagged)
        kwargs = dict(generator=torch.Generator().manual_seed(0)) if family in TAKES_GENERATOR else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = _loop(s, x, 3, **kwargs)
        assert all(type(y) is _Tagged for y in samples), (cls.__name__, [type(y) for y in samples])


def test_sde_noise_that_requires_grad_gives_no_graph():
    """DPM-Solver's SDE step with a ``variance_noise`` that requires grad: every step (served or checked) gives
    a result without an autograd graph, as the first, fully checked one does."""
    _, fused_class, config = FAMILIES["dpm"]
    s = fused_class(algorithm_type="sde-dpmsolver++", **config)
    s.set_timesteps(STEPS)
    x = torch.randn(SHAPE)
    for t in list(s.timesteps)[:4]:
        noise = torch.randn(SHAPE).requires_grad_()
        x = s.step(model(x, t), t, x, variance_noise=noise).prev_sample
        assert not x.requires_grad and x.grad_fn is None


def test_a_torch_function_mode_sees_the_served_steps():
    """Under a TorchFunctionMode (as a tracer or profiler installs) the served steps call the operator through
    ``torch.ops``, so the mode sees each step's operator (a bound C call would pass it by)."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    for family, op in (("flow", "flow_step"), ("euler", "euler_step"), ("dpm", "solver_step"), ("ddim", "ddim_step"),
                       ("ddpm", "ddpm_step")):
        _, fused_class, config = FAMILIES[family]
        s = fused_class(**config)
        s.set_timesteps(STEPS)
        x = torch.randn(SHAPE)
        _loop(s, x, 2)  # (the served path set up)
        with Seen() as seen:
            _loop(s, x, 2)
        assert sum(op in str(n) for n in seen.names) >= 1, (family, seen.names[:20])


@pytest.mark.parametrize("family", ["euler", "lcm"])
def test_a_copy_made_in_inference_mode_runs_a_new_loop_outside_it(family):
    """The step-index tensor is refilled in place for a new loop, but a copy made under inference mode holds an
    inference tensor, which takes no in-place write outside it: the copy's next loop gets a new index tensor and
    gives the original's samples."""
    import copy

    _, fused_class, config = FAMILIES[family]
    fused = fused_class(**config)
    fused.set_timesteps(STEPS)
    x = torch.randn(SHAPE) * getattr(fused, "init_noise_sigma", 1.0)
    with torch.inference_mode():
        for t in list(fused.timesteps)[:2]:
            fused.is_scale_input_called = True
            fused.step(model(x, t), t, x, generator=torch.Generator().manual_seed(1))
        twin = copy.deepcopy(fused)
    finals = []
    for s in (fused, twin):
        s.set_timesteps(STEPS)
        y, g = x, torch.Generator().manual_seed(2)
        for t in s.timesteps:
            s.is_scale_input_called = True
            y = s.step(model(y, t), t, y, generator=g).prev_sample
        finals.append(y)
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("family", DDPM_FAMILIES)
def test_ddpm_ddim_steps_after_the_first_are_served(family, monkeypatch):
    """The DDPM / DDIM drop-ins make the public op's checked call on a loop's first step only: the next steps,
    with timesteps of ``scheduler.timesteps`` (or ints), are served on the checked call's operands; a timestep per
    sample (a tensor the drop-in did not build) and ``in_kernel_noise`` (a draw in the kernel runs on row-major
operands) take the public op."""
    import functools

    from ddpm_kernels import ops

    name = "ddpm_step" if family == "ddpm" else "ddim_step"
    calls = []
    public = getattr(ops, name)

    @functools.wraps(public)
    def counted(*args, **kwargs):
        calls.append(1)
        return public(*args, **kwargs)

    monkeypatch.setattr(ops, name, counted)
    _, fused_class, config = FAMILIES[family]
    kwargs = STEP_KWARGS.get(family, {})
    for timestep, in_kernel, expected in ((lambda t: t, False, 1), (int, False, 1),
                                          (lambda t: torch.full((SHAPE[0],), int(t)), False, STEPS),
                                          (lambda t: t, True, STEPS)):
        s = fused_class(**config)
        s.in_kernel_noise = in_kernel
        s.set_timesteps(STEPS)
        x, g = torch.randn(SHAPE), torch.Generator().manual_seed(0)
        calls.clear()
        for t in s.timesteps:
            x = s.step(model(x, t), timestep(t), x, generator=g, **kwargs).prev_sample
        assert len(calls) == expected, (timestep, in_kernel)


@pytest.mark.parametrize("family", ["euler", "ancestral"])
def test_a_mixed_precision_loop_keeps_its_lane_kind(family, monkeypatch):
    """A loop with a bfloat16 model output and a float32 sample takes the lane every step without remaking the
    tensor of the operands' kind its compiled check compares with (made for operands of one dtype only), and gives
    the fully checked steps' results."""
    from ddpm_kernels.integrations.diffusers import _common

    made = []
    real = _common.kind_of
    monkeypatch.setattr(_common, "kind_of", lambda *a: made.append(a) or real(*a))
    stock_class, fused_class, config = FAMILIES[family]
    fused, checked = (fused_class(**config) for _ in range(2))
    results = []
    for scheduler, full in ((fused, False), (checked, True)):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        scheduler.set_timesteps(STEPS)
        x = torch.randn(SHAPE) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            if full:
                for key in scheduler._dk_transient:
                    scheduler.__dict__.pop(key, None)
            x = scheduler.step(model(x, t, torch.bfloat16), t, x, generator=g).prev_sample.float()
        results.append(x)
        if not full:
            assert len(made) <= 1, made
    assert torch.equal(results[0], results[1])
