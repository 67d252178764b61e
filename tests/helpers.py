"""Shared test utilities: the shapes and dtypes every table sweeps, input builders, the error bounds used against
float64 math, the rule of docs/design.md, "Tolerances", that checks a fused backend against the reference, and
small GPU and Triton helpers."""

import importlib.util
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 1 element; 1-D to 5-D data with odd sizes (3x3x17x19) and unit dims; batch 1 to 5 and 16; samples of a
# multiple of 16 elements (the 128-bit vector paths of the GPU kernels)
SHAPES = [
    (1,), (1, 1), (1, 1, 1, 1), (5, 7), (4, 2, 5), (2, 5, 7), (3, 3, 5, 7), (3, 3, 17, 19), (1, 4, 8, 8), (16, 3, 8, 8),
    (4, 4, 16, 16), (2, 3, 2, 3, 5), (2, 2, 3, 1, 5), (2, 3, 2, 3, 8),
]
# Triton's interpreter runs every program of a launch in numpy, one after the other (about 0.1 s for a p_sample of
# a few hundred elements): on CPU tensors the Triton backend takes these, one of each kind above.
TRITON_SHAPES = [(1,), (3, 3, 5, 7), (2, 5, 7), (2, 2, 3, 1, 5), (1, 4, 8, 8)]
T_SMALL = 1000


def timesteps(batch, T, generator=None, include=(0, None)):
    """Per-sample timesteps covering 0 and T-1 whenever the batch has room for both."""
    lo, hi = include[0], T - 1 if include[1] is None else include[1]
    if batch == 1:
        return torch.tensor([hi], dtype=torch.long)
    t = torch.randint(0, T, (batch,), generator=generator)
    t[0], t[-1] = lo, hi
    return t


def timestep_cases(batch, T, device="cpu", seed=0):
    """The per-sample ``t`` tensors a case runs with: t = 0 and t = T-1 in every case (both, one call each, for
    batch 1), t = 1 (the first step whose posterior variance is not clipped) from batch 3 on, seeded values
    between."""
    if batch == 1:
        return [torch.tensor([0], device=device), torch.tensor([T - 1], device=device)]
    t = torch.randint(0, T, (batch,), generator=torch.Generator().manual_seed(seed))
    t[0], t[-1] = 0, T - 1
    if batch > 2:
        t[1] = 1
    return [t.to(device)]


def make(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def np64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def allowed_error(expected, scale, dtype):
    """Error allowed for a result in ``dtype`` computed in float32 (float64 for float64) from inputs exactly
    representable in ``dtype``: a few float32 roundings of every term (``scale`` is the sum of the terms'
    magnitudes) plus the final rounding to ``dtype`` (half an ulp)."""
    expected, scale = np.abs(expected), np.abs(scale)
    if dtype == torch.float64:
        return 1e-12 * (scale + 1e-300)
    allowed = 8 * torch.finfo(torch.float32).eps * scale
    if dtype in (torch.float16, torch.bfloat16):
        fi = torch.finfo(dtype)
        allowed = allowed + 0.5 * fi.eps * expected + fi.tiny * fi.eps
    else:
        allowed = allowed + 1e-30
    return allowed


def assert_close_to_fp64(actual, expected, scale, dtype, what=""):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    a = np64(actual)
    expected = np.broadcast_to(expected, a.shape)
    err = np.abs(a - expected)
    allowed = np.broadcast_to(allowed_error(expected, scale, dtype), a.shape)
    bad = ~(err <= allowed)
    if dtype != torch.float64:
        # a true value beyond the dtype's range correctly rounds to an infinity of the same sign
        overflow = (np.abs(expected) > torch.finfo(dtype).max) & np.isinf(a) & (np.sign(a) == np.sign(expected))
        bad &= ~overflow
    if bad.any():
        i = np.argmax(np.where(bad, err - allowed, -np.inf))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.size} elements off; worst at flat index {i}: got {a.flat[i]!r}, "
            f"expected {expected.flat[i]!r}, error {err.flat[i]:.3g} > allowed {allowed.flat[i]:.3g}"
        )


# ------------------------------------------------------------------ fused backends against the reference
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(shape, n, dtype, seed=0, scale=1.0, device="cpu"):
    """``n`` tensors of standard normals times ``scale``, drawn in float64 on the CPU from ``seed`` (the same
    values on every device), then cast."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype) for _ in range(n)]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64)."""
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def assert_matches(got, ref_fn, args, kwargs, dtype, bf16_truncates=False):
    """``got`` (one tensor or a tuple) against ``ref_fn(*args, **kwargs)`` by the rule of docs/design.md,
    "Tolerances": float32 against the float32 reference at rtol=atol=1e-5, float64 at 1e-12; float16/bfloat16
    against the float64 reference (floating-point tensor arguments cast) with an error at most twice the
    reference's own error in that dtype plus one ulp, and within 2e-3 (fp16) / 1.6e-2 (bf16) relative.
    ``bf16_truncates`` allows one more bfloat16 ulp (Triton's interpreter truncates float32 -> bfloat16 where a
    GPU rounds)."""
    outs = got if isinstance(got, tuple) else (got,)

    def run(a, kw):
        r = ref_fn(*a, **kw)
        return r if isinstance(r, tuple) else (r,)

    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for o, r in zip(outs, run(args, kwargs), strict=True):
            assert o.dtype == r.dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=tol, atol=tol, equal_nan=True)
        return
    args64 = [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw64 = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()}
    for o, r64, rlp in zip(outs, run(args64, kw64), run(args, kwargs), strict=True):
        assert o.dtype == rlp.dtype and o.shape == rlp.shape
        if o.dtype != dtype:
            # an output kept in float32 for low-precision inputs (q_posterior's variances: table gathers)
            torch.testing.assert_close(o, rlp, rtol=0, atol=0, equal_nan=True)
            continue
        err = (o.to(torch.float64) - r64).abs()
        ref_err = (rlp.to(torch.float64) - r64).abs()
        extra = ulp(r64, dtype) if (dtype == torch.bfloat16 and bf16_truncates) else 0.0
        allowed = 2 * ref_err + ulp(r64, dtype) + extra
        assert bool((err <= allowed).all()), f"max excess {(err - allowed).max().item()}"
        assert bool((err <= LOW_PRECISION_TOL[dtype] * (1 + r64.abs())).all())


# ------------------------------------------------------------------------------------ compiled kernels
def compiled_backends():
    """For a module testing the compiled kernels: ``(extension, pytestmark, backends)``. ``pytestmark`` skips
    the module without the CPU extension; ``backends`` is "cpu", and "cuda" (marked ``gpu``) that runs where a
    GPU and the CUDA kernels are present. Skips the calling module when the extension cannot be imported."""
    extension = pytest.importorskip("ddpm_kernels.extension")
    mark = pytest.mark.skipif(
        extension.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
        reason=f"CPU extension not built: {extension.load_error}",
    )
    cuda = pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available()
                or extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32) is not None,
                reason="needs a GPU and the CUDA kernels",
            ),
        ],
    )
    return extension, mark, ["cpu", cuda]


# the devices of a compiled family's tests: "cpu", and "cuda" (marked ``gpu``; `device_backend` skips it where no
# GPU is present)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def compiled_family(operator: str, what: str):
    """For a module testing one family of compiled operators: ``(extension, pytestmark)``. ``pytestmark`` skips
    the module without the CPU extension or without ``torch.ops.ddpm_kernels.<operator>`` (``what`` names the
    family in the reason). Skips the calling module when the extension cannot be imported."""
    extension = pytest.importorskip("ddpm_kernels.extension")
    mark = pytest.mark.skipif(
        extension.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is not None
        or not hasattr(torch.ops.ddpm_kernels, operator),
        reason=f"CPU extension ({what}) not built: {extension.load_error}",
    )
    return extension, mark


def device_backend(device):
    """The compiled backend of a `DEVICES` entry (the device's name); skips the test for "cuda" without a GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return device


def assert_thread_independent(run):
    """``run()`` gives the same tensors, bit for bit, on one CPU thread as on the default count (the compiled
    CPU kernels split work by thread count; results must not depend on it). Returns the default run's result."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    many = run()
    for a, b in zip(*((r,) if isinstance(r, torch.Tensor) else r for r in (one, many))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return many


def assert_standard_normal(z, lags=(1, 2, 3, 4, 4096)):
    """The float64 values ``z`` (flat, in drawing order) look like independent N(0, 1) draws: mean and standard
    deviation within 4 standard errors, the Kolmogorov-Smirnov distance under its 0.1% critical value
    1.95 / sqrt(n), neighbours at ``lags`` uncorrelated within 4 standard errors."""
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 4 / math.sqrt(2 * n)
    zs = z.sort().values
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=z.device)
    assert torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item() < 1.95 / math.sqrt(n)
    for lag in lags:
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 4 / math.sqrt(n)


# ------------------------------------------------------------------------------------ Triton and GPU
def triton_device():
    """The device the Triton tests run on: the GPU, or the CPU through Triton's interpreter (tests/conftest.py
    sets TRITON_INTERPRET=1 when there is no GPU). Skips the calling test module when Triton cannot run."""
    pytest.importorskip("triton")
    pytest.importorskip("ddpm_kernels.triton")
    from ddpm_kernels.triton import utils

    if torch.cuda.is_available():
        return "cuda"
    if not utils.INTERPRETED:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return "cpu"


def assert_compiles_like_eager(run, args, exact=(), drawn=None):
    """``torch.compile(run, fullgraph=True)(*args)`` gives eager ``run``'s outputs: within float32 rounding
    (rtol 1.3e-6), bit for bit at the positions ``exact`` (in-place steps), and at ``drawn`` (noise drawn
    in-kernel: a later draw of the stream) a finite tensor of the first argument's shape. Returns
    ``(eager, compiled)``."""
    eager = run(*args)
    compiled = torch.compile(run, fullgraph=True)(*args)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        if i == drawn:
            assert b.shape == args[0].shape and bool(b.isfinite().all())
        else:
            torch.testing.assert_close(b, a, rtol=0 if i in exact else 1.3e-6, atol=0 if i in exact else 1e-6)
    return eager, compiled


def capture_cuda_graph(fn):
    """Warm up on a side stream (compiles the kernels), then capture ``fn`` into a CUDA graph; returns the graph
    and what ``fn`` returned while captured (the tensors each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cuda_kernel_names(fn):
    """Names of the CUDA kernels ``fn`` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernels_launched_without_sync(call):
    """Names of the CUDA kernels ``call`` launches, after a first call that compiles them, with any host
    synchronization an error (``torch.cuda.set_sync_debug_mode``)."""
    call()  # compile outside the profile
    torch.cuda.set_sync_debug_mode("error")
    try:
        return cuda_kernel_names(call)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# The reference form of the sampler steps with the public signature: the reference backend's sampler-step
# function takes StepOptions, the public ops build them.
def ddim_step_ref(*args, **kwargs):
    import ddpm_kernels as dk

    return dk.ddim_step(*args, backend="reference", **kwargs)


def ddpm_step_ref(*args, **kwargs):
    import ddpm_kernels as dk

    return dk.ddpm_step(*args, backend="reference", **kwargs)


# ------------------------------------------------------------------------------------------ parametrizing
def backend_params(*axes, where=lambda *values: True):
    """pytest params over the product of ``axes`` (the first is the backend), the CUDA ones marked ``gpu``."""
    params = []
    for values in itertools.product(*axes):
        if where(*values):
            marks = [pytest.mark.gpu] if values[0] == "cuda" else []
            params.append(pytest.param(*values, marks=marks, id="-".join(param_label(v) for v in values)))
    return params


def fused_backend(backend, device, op, dtype):
    """The backend object of ``backend`` when it runs ``dtype`` tensors on ``device`` and has a fused ``op``;
    else skip the test with the reason."""
    from ddpm_kernels import backends

    try:
        impl = backends.get_backend(backend, torch.device(device), dtype)
    except backends.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if op not in impl.ops:
        pytest.skip(f"{backend}: no fused {op}")
    return impl


def served_by(backend, device, op, dtype, opts=None, grad=None) -> str:
    """The name of the backend that serves ``op`` asked of ``backend`` (its fallback warning silenced)."""
    from ddpm_kernels import backends

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, _ = backends.resolve(op, backend, torch.device(device), dtype, opts, frozenset(grad) if grad else None)
    return name


def param_label(value):
    """A readable test id part: dtypes without ``torch.``, shapes as ``AxBxC``."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(param_label(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------------ host syncs
# Tensor methods that read values on the host: on a device tensor, each is a synchronization
SYNCING = ("item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "tolist", "numpy", "cpu")


def sync_guard(monkeypatch, allowed=()):
    """``arm()``: from then on every value-reading Tensor method raises, as reading a device tensor would sync,
    except when called from a ddpm_kernels function named in ``allowed`` (a range check done only where it is
    free, on CPU tensors). Tests of sync-free steps run CPU tensors with their host-detection patched off."""
    import inspect

    allowed = set(allowed)

    def guard(name, original):
        def method(self, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_name in allowed and "ddpm_kernels" in caller.f_code.co_filename:
                return original(self, *args, **kwargs)
            raise AssertionError(f"Tensor.{name} called: a host sync on a device")

        return method

    def arm():
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))

    return arm


# ------------------------------------------------------------------------------------ diffusers drop-ins
# diffusers' beta sigmas (use_beta_sigmas) need scipy
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="beta sigmas need scipy")


def _outcome(call, scheduler):
    try:
        return call(scheduler), None
    except Exception as e:  # noqa: BLE001  (whatever the stock step raises)
        return None, e


def check_same_as_stock(call, stock, fused, compare=None, check_warnings=None):
    """``call(fused)`` gives ``call(stock)``'s result or raises its error (same type and message).
    ``compare(got, expected)`` compares results (default: equal, NaN where the stock result has NaN);
    ``check_warnings(caught)`` checks the warnings the fused call raised."""
    expected, stock_error = _outcome(call, stock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, fused_error = _outcome(call, fused)
    if check_warnings is not None:
        check_warnings(caught)
    if stock_error is not None:
        assert type(fused_error) is type(stock_error) and str(fused_error) == str(stock_error), (fused_error, stock_error)
        return
    assert fused_error is None, fused_error
    if compare is None:
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    else:
        compare(got, expected)


def warned_stock_path(caught):
    """A drop-in warned that the stock code path took the call."""
    assert any("stock" in str(w.message) and issubclass(w.category, RuntimeWarning) for w in caught), caught


GENERATOR_FORMS = ["none", "one", "list_of_one", "per_sample"]


def generator_form(form, batch):
    """The generator argument of diffusers' ``randn_tensor`` in one of its ``GENERATOR_FORMS`` (fresh, seeded;
    "none" seeds the global RNG): None, a generator, a list of one, or one generator per sample."""
    if form == "none":
        torch.manual_seed(7)
        return None
    gs = [torch.Generator().manual_seed(7 + i) for i in range(batch)]
    return {"one": gs[0], "list_of_one": gs[:1], "per_sample": gs}[form]


def generator_state(generator):
    """The states of ``generator`` (a `generator_form`), or of the global RNG for None."""
    if generator is None:
        return [torch.get_rng_state()]
    return [g.get_state() for g in (generator if isinstance(generator, list) else [generator])]


@pytest.fixture
def fail_on_sync(monkeypatch):
    """Make every value-reading Tensor method raise, as a device tensor read would sync, and treat CPU tensors
    as device tensors in the diffusers drop-ins. The one exception is ddpm_kernels' index range check (of t,
    t_prev and step_index), which runs on CPU tensors only (where it is free) and is skipped for device
    tensors."""
    from ddpm_kernels.integrations.diffusers import _common

    monkeypatch.setattr(_common, "on_host", lambda tensor: False)
    return sync_guard(monkeypatch, {"_check_timesteps"})


def assert_stock_reads_the_device(arm, stock, *calls):
    """The sync guard is not vacuous: after ``stock.set_timesteps(5)`` and ``arm()`` (a `sync_guard`), each
    ``call(stock, t)`` with the second timestep ``t`` reads a tensor's values on the host (the guard raises)."""
    stock.set_timesteps(5)
    t = stock.timesteps[1]
    arm()
    for call in calls:
        with pytest.raises(AssertionError, match="host sync"):
            call(stock, t)


def assert_stock_step_errors(refused, fresh, steps, shape):
    """A drop-in's step raises the stock step's errors: ``refused`` (a config whose prediction type the step does
    not take), after ``set_timesteps(steps)``, the ``prediction_type`` ValueError (warnings silenced: the call
    takes the stock path), and ``fresh`` (no ``set_timesteps``) the ``set_timesteps`` one."""
    refused.set_timesteps(steps)
    x = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="prediction_type"):
            refused.step(x, refused.timesteps[0], x)
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(x, 10, x)


# ----------------------------------------------------------------------------------- drop-in scheduler loops
def scheduler_pair(stock_class, fused_class, config, steps, **set_kwargs):
    """A stock diffusers scheduler and its fused drop-in from the same config, both after ``set_timesteps``."""
    stock = stock_class(**config)
    fused = fused_class.from_config(stock.config)
    for s in (stock, fused):
        s.set_timesteps(steps, **set_kwargs)
    return stock, fused


def scheduler_model(x, t):
    """A model output for scheduler loops that depends on the sample and the timestep (in float32, returned in
    the sample's dtype)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return (x.float() * (0.3 + t / 4000) - 0.2 * torch.cos(x.float() + t / 100)).to(x.dtype)


def assert_close_to_stock(got, expected, what=""):
    """A drop-in's result against the stock scheduler's: the same dtype and shape, equal up to float32 rounding
    of the terms relative to the loop's scale."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=4e-6 * scale, msg=what)
