"""Every fused backend (``cpu``, ``cuda``, ``triton``) against the reference, in tables generated from the op
table (``ddpm_kernels._spec.OPS``; docs/design.md, "The op table").

Each op's inputs come from its declared roles: ``data``, ``like`` and ``optional`` tensors (the optional noise
given) of standard normals, per-sample ``t`` with 0 and T-1 in every case (helpers.timestep_cases) and
``t_prev = t - 7`` (-1 at t = 0). Its options come from ``SWEEPS`` and ``FIXED`` below; its checks from its
declarations: ``outputs`` (layout kept, NaN rows), ``has_out`` (out= and in place), ``draws_noise`` (in-kernel
noise), ``differentiable`` with the backend's own ``differentiable`` (gradients, gradcheck) and ``sampling``
(detached). A backend that cannot run a case here is skipped with the reason ``ddpm_kernels.backends`` gives;
the CUDA cases are marked ``gpu``; without a GPU the Triton cases run on CPU tensors through Triton's
interpreter (tests/conftest.py) on helpers.TRITON_SHAPES.

Results are held to docs/design.md, "Tolerances" (helpers.assert_matches); gradients and compiled results to
the bounds given where they are checked.

The sampler steps have their value, out=, strided-input and out-of-range tables in tests/sampler_cases.py and
``dynamic_threshold`` in tests/test_triton_sampler_ops.py (with the options that matter to them); here they add
what those lack: channels_last data, and detached sampling. What only one backend has (its noise stream,
launch configuration, library loading, CUDA graphs) is tested in that backend's own module.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels import reference as R
from ddpm_kernels._spec import OPS, step_options
from helpers import DTYPES, SHAPES, TRITON_SHAPES, assert_matches, backend_params, make_inputs, timestep_cases

T = 1000
GPU = torch.cuda.is_available()
BACKENDS = ("cpu", "cuda", "triton")
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if GPU else "cpu"}
# Without a GPU, Triton runs through its interpreter, which truncates float32 -> bfloat16 where a GPU rounds
INTERPRETED = {"triton": not GPU}
BACKEND_SHAPES = {"cpu": SHAPES, "cuda": SHAPES, "triton": TRITON_SHAPES if INTERPRETED["triton"] else SHAPES}
# One 4-D shape with odd sizes for the checks that do not sweep shapes (out=, strided inputs, gradients)
CHECK_SHAPE = {"cpu": (3, 3, 17, 19), "cuda": (3, 3, 17, 19),
               "triton": (3, 3, 5, 7) if INTERPRETED["triton"] else (3, 3, 17, 19)}
# gradcheck perturbs every input element twice: about 60 interpreted launches for (2, 5)
GRADCHECK_SHAPE = {"cpu": (3, 2, 5), "cuda": (3, 2, 5), "triton": (2, 5) if INTERPRETED["triton"] else (3, 2, 5)}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# Options whose values take different code in a family's kernels: every combination is a case.
SWEEPS = {"parameterization": ("eps", "x0", "v"), "clip_denoised": (True, False), "loss_type": ("l1", "l2")}
# Values other than the default where the default would leave a term out or repeat another op: the loss's vlb
# term (weight 0), DDIM's noise term (eta 0), the step's x0 output, DDPM's variance (fixed_small is p_sample's),
# a threshold that is not the clip to [-1, 1] (max_value 1).
FIXED = {
    "l_simple_weight": 0.7, "original_elbo_weight": 0.3, "eta": 0.5, "return_pred_x0": True,
    "variance_type": "fixed_large", "ratio": 0.9, "max_value": 1.5,
}
# Families whose options are swept, and whose values, out= and out-of-range t are checked, in their own modules
# (see the module docstring)
ELSEWHERE = ("step", "threshold", "flow")
# Fused gradients against the reference's autograd on the same inputs: float32 within a few ulps of each term
# (both evaluate the same closed-form derivative; a wrong coefficient is off by far more); float16 within about
# two ulps of the gradient's magnitude
GRAD_TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-8), torch.float16: dict(rtol=2e-3, atol=1e-5)}


# ------------------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One op with one combination of its options (``(name, value)`` pairs in table order)."""

    op: str
    options: tuple

    @property
    def spec(self):
        return OPS[self.op]

    @property
    def opts(self):
        """What the dispatcher keys on: the step's `StepOptions`, None for other ops."""
        if self.spec.family != "step":
            return None
        return step_options(self.spec, tuple(v for _, v in self.options))

    def __str__(self):
        swept = [(n, v) for n, v in self.options if n in SWEEPS and self.spec.family not in ELSEWHERE]
        labels = [("clip" if v else "noclip") if n == "clip_denoised" else str(v) for n, v in swept]
        return "-".join([self.op] + labels)


def _cases(spec):
    swept = [o.name for o in spec.options if o.name in SWEEPS and spec.family not in ELSEWHERE]
    fixed = {o.name: FIXED.get(o.name, o.default) for o in spec.options}
    for values in itertools.product(*(SWEEPS[name] for name in swept)):
        options = {**fixed, **dict(zip(swept, values))}
        yield Case(spec.name, tuple(options.items()))


# the families on sigmas or a solver's coefficient table instead of t and a schedule have their own suites:
# tests/test_flow.py, tests/test_euler.py, tests/test_solver_step.py and tests/test_solver_kernels.py
CASES = [case for spec in OPS.values() if spec.family not in ("flow", "sigma", "solver") for case in _cases(spec)]
TABLE_CASES = [c for c in CASES if c.spec.family not in ELSEWHERE]
# options take no part in an operator's registration (schema, fake, autograd): one combination per op, the one
# with the most terms (v: both coefficients)
OPCHECK_CASES = {c.op: c for c in TABLE_CASES}


# ------------------------------------------------------------------------------------------ building calls
@functools.lru_cache(maxsize=None)
def _schedule(device):
    return dk.DiffusionSchedule("linear", timesteps=T).to(device)


def _inputs(case, shape, dtype, device, t, layout="contiguous", seed=0):
    """The keyword arguments of ``case``'s public call: its tensors by role, t (and t_prev), the schedule and the
    options. ``layout`` "transposed" builds each tensor with its last two dims swapped, then swaps them back."""
    spec = case.spec
    names = (spec.data,) + spec.like + spec.optional
    if layout == "transposed":
        base = make_inputs(shape[:-2] + shape[:-3:-1], len(names), dtype, seed=seed, device=device)
        tensors = [x.transpose(-1, -2) for x in base]
    else:
        tensors = [x.contiguous(memory_format=FORMATS[layout])
                   for x in make_inputs(shape, len(names), dtype, seed=seed, device=device)]
    kwargs = dict(zip(names, tensors))
    if spec.timesteps:
        kwargs["t"] = t.to(device)
        kwargs["schedule"] = _schedule(device)
    if "t_prev" in spec.timesteps:
        kwargs["t_prev"] = (kwargs["t"] - 7).clamp(min=-1)
    kwargs.update(case.options)
    return kwargs


def _call(case, kwargs, backend):
    return getattr(dk, case.op)(**kwargs, backend=backend)


def _reference(case):
    return functools.partial(getattr(dk, case.op), backend="reference")


def _positional(case, kwargs):
    """``kwargs`` in the order of the reference function's signature: how backend functions are called (the
    backend protocol of ddpm_kernels.backends), which bypasses the public checks."""
    args = []
    for name in inspect.signature(R.OPS[case.op]).parameters:
        if name not in kwargs:
            break
        args.append(kwargs[name])
    return args


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _check(got, case, kwargs, dtype, backend):
    """``got`` against the reference's call on ``kwargs`` (helpers.assert_matches)."""
    assert_matches(got, _reference(case), (), kwargs, dtype, bf16_truncates=INTERPRETED.get(backend, False))


def _backend(backend, dtype):
    """The backend object when it runs ``dtype`` tensors here, else skip with the reason it gives."""
    device = torch.device(DEVICE[backend])
    if backend not in dk.available_backends(device, dtype):
        try:
            backends.get_backend(backend, device, dtype)
        except backends.BackendUnavailableError as exc:
            pytest.skip(str(exc))
    return backends.get_backend(backend, device, dtype)


def _serving(backend, case, dtype, grad=None):
    """The backend object when it serves ``case`` itself (no fallback to the reference) in ``dtype`` with
    gradients w.r.t. ``grad``, else skip with the reason."""
    impl = _backend(backend, dtype)
    reason = impl.declines(case.op, case.opts)
    if reason is None and case.op not in impl.ops:
        reason = f"no fused {case.op}"
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    grad = frozenset(grad) if grad else None
    served, _ = backends.resolve(case.op, backend, torch.device(DEVICE[backend]), dtype, case.opts, grad)
    assert served == backend, f"{case.op} on {backend} fell back to {served}"
    return impl


def _differentiated(backend, case, dtype):
    """The table's differentiable inputs of ``case`` that ``backend``'s kernels differentiate (else skip)."""
    impl = _serving(backend, case, dtype)
    wrt = [name for name in case.spec.differentiable if name in impl.differentiable.get(case.op, ())]
    if not wrt:
        pytest.skip(f"the {backend} kernels give no gradient for {case.op} (the dispatcher runs the reference)")
    _serving(backend, case, dtype, grad=wrt)
    return wrt


# ------------------------------------------------------------------------------------ values and layouts
def _layouts(case, shape):
    layouts = [] if case.spec.family in ELSEWHERE else ["contiguous"]
    return layouts + (["channels_last"] if len(shape) == 4 else [])


VALUE_PARAMS = [
    param
    for backend in BACKENDS
    for param in backend_params(
        [backend], CASES, DTYPES, BACKEND_SHAPES[backend], FORMATS,
        where=lambda b, case, dtype, shape, layout: layout in _layouts(case, shape),
    )
]


@pytest.mark.parametrize("backend,case,dtype,shape,layout", VALUE_PARAMS)
def test_matches_reference(backend, case, dtype, shape, layout):
    """Every output against the reference on the same inputs; outputs shaped like the data keep its layout."""
    _serving(backend, case, dtype)
    for t in timestep_cases(shape[0], T):
        kwargs = _inputs(case, shape, dtype, DEVICE[backend], t, layout)
        got = _call(case, kwargs, backend)
        _check(got, case, kwargs, dtype, backend)
        for out, kind in zip(_as_tuple(got), case.spec.outputs):
            if kind in ("like", "pred_x0"):
                assert out.is_contiguous(memory_format=FORMATS[layout]), f"{kind} output lost the {layout} layout"


@pytest.mark.parametrize("backend,case", backend_params(BACKENDS, TABLE_CASES))
def test_non_contiguous_inputs(backend, case):
    """Strided (transposed) views of every tensor argument give the reference's result."""
    _serving(backend, case, torch.float32)
    shape = CHECK_SHAPE[backend]
    for t in timestep_cases(shape[0], T):
        kwargs = _inputs(case, shape, torch.float32, DEVICE[backend], t, "transposed")
        assert not kwargs[case.spec.data].is_contiguous()
        _check(_call(case, kwargs, backend), case, kwargs, torch.float32, backend)


# ------------------------------------------------------------------------------------------- out= / in place
@pytest.mark.parametrize("backend,case", backend_params(BACKENDS, [c for c in TABLE_CASES if c.spec.has_out]))
def test_out_and_in_place(backend, case):
    """out= is written and returned; a strided out too; in place (out= the data tensor) equals the out-of-place
    result, with given noise and with in-kernel noise from the same generator state; a differentiable op's out=
    keeps autograd."""
    impl = _serving(backend, case, torch.float32)
    device, shape, data = DEVICE[backend], CHECK_SHAPE[backend], case.spec.data
    wrt = [name for name in case.spec.differentiable if name in impl.differentiable.get(case.op, ())]
    for t in timestep_cases(shape[0], T):
        kwargs = _inputs(case, shape, torch.float32, device, t)
        out = torch.empty_like(kwargs[data])
        assert _call(case, {**kwargs, "out": out}, backend) is out
        _check(out, case, kwargs, torch.float32, backend)
        strided = torch.empty(shape[:-2] + shape[:-3:-1], device=device).transpose(-1, -2)
        assert _call(case, {**kwargs, "out": strided}, backend) is strided
        _check(strided, case, kwargs, torch.float32, backend)
        x = kwargs[data].clone()
        assert _call(case, {**kwargs, data: x, "out": x}, backend) is x
        torch.testing.assert_close(x, _call(case, kwargs, backend), rtol=0, atol=0)
        _check(x, case, kwargs, torch.float32, backend)
        if case.spec.draws_noise:
            g = torch.Generator(device)
            drawn = _call(case, {**kwargs, "noise": None, "generator": g.manual_seed(4)}, backend)
            x = kwargs[data].clone()
            _call(case, {**kwargs, "noise": None, "generator": g.manual_seed(4), data: x, "out": x}, backend)
            torch.testing.assert_close(x, drawn, rtol=0, atol=0)
        if wrt:
            weights = _weights(case, kwargs)
            fused, expected = (_grads(case, {**kwargs, "out": torch.empty_like(out)}, b, wrt, weights)
                               for b in (backend, "reference"))
            for name, g, r in zip(wrt, fused, expected):
                torch.testing.assert_close(g, r, **GRAD_TOL[torch.float32], msg=lambda m: f"d/d{name}: {m}")


# ------------------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("backend,case", backend_params(BACKENDS, [c for c in TABLE_CASES if c.spec.timesteps]))
def test_out_of_range_t_gives_nan(backend, case):
    """The backend function called directly (no validation): a sample whose t is outside [0, T) comes out NaN,
    the others are untouched, as in the reference; nothing is read outside the table."""
    impl = _serving(backend, case, torch.float32)
    device = DEVICE[backend]
    t = torch.tensor([-1, 3, T, 2**40])
    bad = torch.tensor([True, False, True, True], device=device)
    kwargs = _inputs(case, (4, 3, 5), torch.float32, device, t)
    variants = [kwargs] + ([{**kwargs, "noise": None}] if case.spec.draws_noise else [])
    for kw in variants:
        got = _as_tuple(impl.ops[case.op](*_positional(case, kw)))
        expected = _as_tuple(R.OPS[case.op](*_positional(case, kw)))
        for g, e, kind in zip(got, expected, case.spec.outputs, strict=True):
            assert torch.equal(g.isnan(), e.isnan()), kind
            if kind != "scalar":
                rows = g.reshape(4, -1)
                assert bool(rows[bad].isnan().all()) and bool(rows[~bad].isfinite().all()), kind


@pytest.mark.parametrize("backend,case,dtype", backend_params(BACKENDS, [c for c in TABLE_CASES if c.spec.draws_noise],
                                                       DTYPES))
def test_no_noise_at_t0(backend, case, dtype):
    """At t = 0 the in-kernel noise is not added: the result is the reference's noise-free one."""
    _serving(backend, case, dtype)
    device, shape = DEVICE[backend], CHECK_SHAPE[backend]
    kwargs = _inputs(case, shape, dtype, device, torch.zeros(shape[0], dtype=torch.long))
    got = _call(case, {**kwargs, "noise": None, "generator": torch.Generator(device).manual_seed(0)}, backend)
    _check(got, case, {**kwargs, "noise": torch.zeros_like(kwargs["noise"])}, dtype, backend)


# ----------------------------------------------------------------------------------------------- autograd
def _weights(case, kwargs):
    """A random upstream gradient per output (so every output's backward, and every element of it, counts)."""
    outs = _as_tuple(_reference(case)(**kwargs))
    g = torch.Generator().manual_seed(7)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]


def _grads(case, kwargs, backend, wrt, weights):
    """Gradients of sum(output * weight) w.r.t. the inputs named ``wrt`` (None where it does not depend on
    one)."""
    leaves = {name: kwargs[name].detach().clone().requires_grad_() for name in wrt}
    outs = _as_tuple(_call(case, {**kwargs, **leaves}, backend))
    differentiated = [(o * w).sum() for o, w in zip(outs, weights) if o.requires_grad]
    if not differentiated:  # no output depends on these inputs (x_start alone for an eps loss)
        return [None] * len(leaves)
    return torch.autograd.grad(sum(differentiated), list(leaves.values()), allow_unused=True)


@pytest.mark.parametrize("backend,case,dtype", backend_params(
    BACKENDS, [c for c in CASES if c.spec.differentiable], list(GRAD_TOL)))
def test_gradients_match_reference(backend, case, dtype):
    """Every input the backend differentiates gets the reference's gradient (or none, where the reference has
    none: x_start of an eps loss), in the input's dtype: all of them at once, and each alone (a backward that
    skips the gradients nobody asked for)."""
    wrt = _differentiated(backend, case, dtype)
    shape = CHECK_SHAPE[backend]
    subsets = [wrt] + ([[name] for name in wrt] if len(wrt) > 1 else [])
    for t, subset in itertools.product(timestep_cases(shape[0], T), subsets):
        kwargs = _inputs(case, shape, dtype, DEVICE[backend], t)
        weights = _weights(case, kwargs)
        fused = _grads(case, kwargs, backend, subset, weights)
        expected = _grads(case, kwargs, "reference", subset, weights)
        for name, g, r in zip(subset, fused, expected):
            assert (g is None) == (r is None), f"d/d{name}: {g is None=} vs the reference's {r is None=}"
            if r is not None:
                assert g.dtype == dtype
                torch.testing.assert_close(g, r, **GRAD_TOL[dtype], msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("backend,case", backend_params(BACKENDS, [c for c in CASES if c.spec.differentiable]))
def test_gradcheck(backend, case):
    """float64 gradcheck of every output w.r.t. every input the backend differentiates."""
    wrt = _differentiated(backend, case, torch.float64)
    shape = GRADCHECK_SHAPE[backend]
    for t in timestep_cases(shape[0], T):
        kwargs = _inputs(case, shape, torch.float64, DEVICE[backend], t)

        def fn(*leaves):
            return _call(case, {**kwargs, **dict(zip(wrt, leaves))}, backend)

        assert torch.autograd.gradcheck(fn, [kwargs[name].clone().requires_grad_() for name in wrt])


@pytest.mark.parametrize("backend,case", backend_params(BACKENDS, [c for c in CASES if c.spec.sampling]))
def test_sampling_ops_run_detached(backend, case):
    """A sampling op is served by the fused kernels even when an input requires grad, with no autograd history
    (backward raises), and the reference's values; the reference keeps autograd for differentiating a step."""
    names = (case.spec.data,) + case.spec.like + case.spec.optional
    _serving(backend, case, torch.float64, grad=names)
    shape = CHECK_SHAPE[backend]
    for t in timestep_cases(shape[0], T):
        kwargs = _inputs(case, shape, torch.float64, DEVICE[backend], t)
        kwargs.update({name: kwargs[name].requires_grad_() for name in names})
        got = _as_tuple(_call(case, kwargs, backend))
        assert not any(o.requires_grad for o in got)
        with pytest.raises(RuntimeError):
            got[0].sum().backward()
        _check(got, case, kwargs, torch.float64, backend)
        expected = _as_tuple(_reference(case)(**kwargs))
        (model_output_grad,) = torch.autograd.grad(expected[0].sum(), [kwargs[case.spec.like[0]]])
        assert model_output_grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- torch.library checks
class _Recorder(TorchDispatchMode):
    """Every call of the library's operators (``ddpm_kernels::``, ``ddpm_kernels_triton::``) with a copy of its
    arguments as they were before the call (out= and in-place operators write theirs). ``backward``: calls made
    by a backward pass whose operators are not differentiated again (their inputs recorded without grad)."""

    NAMESPACES = ("ddpm_kernels", "ddpm_kernels_triton")

    def __init__(self):
        super().__init__()
        self.calls = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.NAMESPACES:

            def copy(a):
                if not isinstance(a, torch.Tensor):
                    return a
                return a.detach().clone().requires_grad_(a.requires_grad and not self.backward)

            self.calls.append((func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)


def _draws_from_generator(func, args, kwargs):
    """The operator draws its noise from a Generator inside the kernel: two runs differ."""
    names = [a.name for a in func._schema.arguments]
    bound = {**dict(zip(names, args)), **kwargs}
    return "generator" in names and bound.get("noise") is None


@pytest.mark.parametrize("backend,op,dtype", backend_params(BACKENDS, list(OPCHECK_CASES), DTYPES))
def test_opcheck(backend, op, dtype):
    """``torch.library.opcheck`` of every operator the backend runs for ``op``: the functional call (with
    differentiated inputs and its backward where the backend differentiates it), its out= form and in-kernel
    noise. A call whose noise comes from a Generator inside the kernel gets the checks that do not compare two
    runs."""
    case = OPCHECK_CASES[op]
    impl = _serving(backend, case, dtype)
    device, spec = DEVICE[backend], case.spec
    wrt = [name for name in spec.differentiable if name in impl.differentiable.get(op, ())]
    (t,) = timestep_cases(2, T)
    kwargs = _inputs(case, (2, 3, 5), dtype, device, t)
    with _Recorder() as recorder:
        if wrt:
            leaves = {name: kwargs[name].detach().clone().requires_grad_() for name in wrt}
            outs = _as_tuple(_call(case, {**kwargs, **leaves}, backend))
            # the Triton backward operators are differentiable again (docs/design.md, "Dispatch and fallbacks")
            recorder.backward = backend != "triton"
            torch.autograd.grad(sum(o.sum() for o in outs if o.requires_grad), list(leaves.values()))
            recorder.backward = False
        else:
            _call(case, kwargs, backend)
        if spec.has_out:
            _call(case, {**kwargs, "out": torch.empty_like(kwargs[spec.data])}, backend)
        if spec.draws_noise:
            _call(case, {**kwargs, "noise": None, "generator": torch.Generator(device).manual_seed(0)}, backend)
    assert recorder.calls, f"{op} on {backend} called no registered operator"
    for func, args, kw in recorder.calls:
        utils = ("test_schema", "test_faketensor") if _draws_from_generator(func, args, kw) else None
        torch.library.opcheck(func, args, kw, **({"test_utils": utils} if utils else {}))


# ------------------------------------------------------------------------------------------- torch.compile
@dataclasses.dataclass
class _Traced:
    """One op's call as a compiled function makes it: everything but its tensors fixed outside the trace."""

    case: Case
    fn: object
    names: tuple  # the tensor roles, in the order they take the compiled function's tensors
    static: dict  # options and schedule

    def __call__(self, tensors, t, **extra):
        kwargs = {**dict(zip(self.names, tensors)), **self.static, **extra}
        if self.case.spec.timesteps:
            kwargs["t"] = t
        return _as_tuple(self.fn(**kwargs))


def _traced(case, backend):
    spec = case.spec
    static = dict(case.options, backend=backend)
    if spec.timesteps:
        static["schedule"] = _schedule(DEVICE[backend])
    return _Traced(case, getattr(dk, case.op), (spec.data,) + spec.like + spec.optional, static)


def _recording(compiler, graphs):
    """``compiler`` (a torch.compile backend name), keeping each graph dynamo traces in ``graphs``."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    return backend


@pytest.mark.parametrize("backend,compiler", backend_params(BACKENDS, ["aot_eager", "inductor"]))
def test_torch_compile(backend, compiler):
    """Every op under torch.compile(fullgraph=True) (no graph break), the backend's operators in the traced
    graph: eager's values, in-kernel noise drawn, out= in place on an input as in eager. A training step through
    every op the backend differentiates gives eager's loss and gradients (the registered backward under
    AOTAutograd, and inductor)."""
    impl = _backend(backend, torch.float32)
    calls = [_traced(c, backend) for c in OPCHECK_CASES.values()
             if c.op in impl.ops and impl.declines(c.op, None) is None]
    graphs = []
    compile_backend = _recording(compiler, graphs)
    device = DEVICE[backend]
    x, y, z = make_inputs((2, 3, 4, 4), 3, torch.float32, device=device)
    (t,) = timestep_cases(2, T, device)

    def sampling(x, y, z, t):
        results = []
        for call in calls:
            results.append(call((x, y, z), t))
            if call.case.spec.draws_noise:
                results.append(call((x, y, z), t, noise=None))
        return results

    def in_place(x, y, z, t):
        for call in calls:
            if call.case.spec.has_out:
                call((x, y, z), t, out=x)
        return x

    eager = sampling(x, y, z, t)  # first: loads the backend outside the traced region
    compiled = torch.compile(sampling, backend=compile_backend, fullgraph=True)(x, y, z, t)
    compiled, eager = iter(compiled), iter(eager)
    for call in calls:
        torch.testing.assert_close(next(compiled), next(eager), rtol=1.3e-6, atol=1e-6,
                                   msg=lambda m: f"{call.case.op}: {m}")
        if call.case.spec.draws_noise:
            (drawn,), _ = next(compiled), next(eager)
            assert drawn.shape == x.shape and bool(drawn.isfinite().all()), call.case.op
    expected = in_place(x.clone(), y, z, t)
    got = torch.compile(in_place, backend=compile_backend, fullgraph=True)(x.clone(), y, z, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    namespace = "ddpm_kernels_triton" if backend == "triton" else "ddpm_kernels"
    targets = {tuple(str(n.target).split(".")[:2]) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for call in calls:
        for name in [call.case.op] + ([call.case.op + "_out"] if call.case.spec.has_out else []):
            assert (namespace, name) in targets, (name, targets)

    trained = [c for c in calls if impl.differentiable.get(c.case.op)]

    def training(x, y, z, t, w):
        total = 0
        for call in trained:
            wrt = impl.differentiable[call.case.op]
            tensors = [a * w if name in wrt else a.detach() for name, a in zip(call.names, (x, y, z))]
            outs = call(tensors, t)
            total = total + sum(o.sum() * (k + 1) for k, o in enumerate(outs) if o.requires_grad)
        return total

    leaves = [a.clone().requires_grad_() for a in (x, y, z)]
    leaves.append(torch.tensor(0.5, device=device, requires_grad=True))
    loss_eager = training(*leaves[:3], t, leaves[3])
    grads_eager = torch.autograd.grad(loss_eager, leaves, allow_unused=True)
    loss = torch.compile(training, backend=compile_backend, fullgraph=True)(*leaves[:3], t, leaves[3])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    torch.testing.assert_close(loss, loss_eager, rtol=1.3e-6, atol=1e-6)
    for g, e in zip(grads, grads_eager):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1.3e-6, atol=1e-6)
