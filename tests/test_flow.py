"""The flow-matching family (``flow_interpolate``, ``flow_step``, ``flow_loss``): the reference against
independent float64 math, the argument checks, and every fused backend that implements an op against the
reference (docs/design.md, "Flow matching" and "Tolerances").

Sigmas come per sample ((B,)) or per token / frame ((B, L, 1) of (B, L, C) tokens, (B, 1, F, 1, 1) of video, and
a pattern whose varying dims are not one block); the step takes them from a sigma table by a per-sample step
index or as given tensors, guided or not (batched [uncond; cond] output or two tensors, per-sample scales, with
and without std-rescale), deterministic or stochastic (given or in-kernel noise). A backend without the op is
skipped with the reason ``ddpm_kernels.backends`` gives; the CUDA cases are marked ``gpu``; without a GPU the
Triton cases run on CPU tensors through Triton's interpreter on small shapes.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels import reference as R
from helpers import DTYPES, assert_matches, backend_params, fused_backend, make_inputs, served_by

GPU = torch.cuda.is_available()
BACKENDS = ("cpu", "cuda", "triton")
DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if GPU else "cpu"}
INTERPRETED = {"triton": not GPU}
# (data shape, sigma shape): per sample; per token (B, L, 1); per frame (B, 1, F, 1, 1); per channel and width
# (varying dims that are not one block: expanded); odd sizes; one element
SIGMA_LAYOUTS = [
    ((3, 3, 17, 19), (3,)),
    ((2, 33, 8), (2, 33, 1)),
    ((2, 3, 4, 5, 6), (2, 1, 4, 1, 1)),
    ((2, 3, 5, 7), (2, 3, 1, 7)),
    ((5, 7), (5, 7)),
    ((1,), (1,)),
]
SMALL_LAYOUTS = [((3, 3, 5, 7), (3,)), ((2, 7, 4), (2, 7, 1)), ((2, 3, 4, 2, 3), (2, 1, 4, 1, 1)),
                 ((2, 3, 5, 7), (2, 3, 1, 7))]
STEPS = 10  # a sigma table of STEPS + 1 entries


def _layouts(backend):
    return SMALL_LAYOUTS if INTERPRETED.get(backend) else SIGMA_LAYOUTS


def _sigmas(shape, device, seed=1, lo=0.02, hi=0.98):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)).to(device, torch.float32)


def _table(device):
    """A shifted flow-matching table (shift 3, as SD3), descending to the final 0."""
    s = torch.linspace(1.0, 1.0 / STEPS, STEPS, dtype=torch.float64)
    s = 3 * s / (1 + 2 * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(device, torch.float32)


def _step_index(batch, device, seed=2):
    i = torch.randint(0, STEPS, (batch,), generator=torch.Generator().manual_seed(seed))
    if batch > 1:
        i[0], i[-1] = 0, STEPS - 1  # the first step and the step onto the final sigma
    return i.to(device)


def _backend(backend, op, dtype):
    """Skip unless ``backend`` runs ``dtype`` tensors here and has a fused ``op``."""
    return fused_backend(backend, DEVICE[backend], op, dtype)


def _served(backend, op, dtype, opts=None, grad=None):
    return served_by(backend, DEVICE[backend], op, dtype, opts, grad)


# ------------------------------------------------------------------------------------ reference vs float64
def _f64(x):
    return x.detach().cpu().to(torch.float64).numpy()


def _broadcast(sigma, ndim):
    s = _f64(sigma)
    return s.reshape(s.shape + (1,) * (ndim - s.ndim))


def _guided64(c, u, w, rescale):
    c, u = _f64(c), _f64(u)
    w = _f64(w).reshape((-1,) + (1,) * (c.ndim - 1))
    g = u + w * (c - u)
    if rescale > 0:
        axes = tuple(range(1, c.ndim))
        ratio = c.std(axis=axes, ddof=1, keepdims=True) / g.std(axis=axes, ddof=1, keepdims=True)
        g = rescale * g * ratio + (1 - rescale) * g
    return g


@pytest.mark.parametrize("shape,sigma_shape", SIGMA_LAYOUTS)
def test_reference_interpolate_and_loss_match_float64(shape, sigma_shape):
    x0, noise, mo = make_inputs(shape, 3, torch.float32, seed=3)
    sigma = _sigmas(sigma_shape, "cpu")
    s = _broadcast(sigma, len(shape))
    expected = (1 - s) * _f64(x0) + s * _f64(noise)
    got = dk.flow_interpolate(x0, noise, sigma, backend="reference")
    np.testing.assert_allclose(_f64(got), expected, rtol=2e-6, atol=2e-6)
    err = _f64(mo) - (_f64(noise) - _f64(x0))
    weights = {"none": np.ones_like(s), "sigma_sqrt": s ** -2.0, "cosmap": 2 / (np.pi * (1 - 2 * s + 2 * s * s))}
    for (weighting, w), loss_type in itertools.product(weights.items(), ("l1", "l2")):
        per = np.abs(err) if loss_type == "l1" else err * err
        expected = (w * per).reshape(shape[0], -1).mean(axis=1).mean()
        got = dk.flow_loss(mo, x0, noise, sigma, weighting, loss_type, backend="reference")
        assert got.dtype == torch.float32 and got.ndim == 0
        np.testing.assert_allclose(got.item(), expected, rtol=1e-5)


@pytest.mark.parametrize("stochastic,guided,rescale", [(False, False, 0.0), (True, False, 0.0), (False, True, 0.0),
                                                       (False, True, 0.7), (True, True, 0.7)])
def test_reference_step_matches_float64(stochastic, guided, rescale):
    shape = (4, 3, 6, 5)
    x, c, u, z = make_inputs(shape, 4, torch.float32, seed=5)
    w = torch.tensor([1.0, 3.5, 7.0, 0.0])
    table, index = _table("cpu"), _step_index(4, "cpu")
    kw = dict(guidance_scale=w, uncond=u, guidance_rescale=rescale) if guided else {}
    got = dk.flow_step(x, c, table, index, noise=z, stochastic=stochastic, backend="reference", **kw)
    v = _guided64(c, u, w, rescale) if guided else _f64(c)
    t64 = _f64(table)
    s = t64[index.numpy()].reshape(4, 1, 1, 1)
    s_next = t64[index.numpy() + 1].reshape(4, 1, 1, 1)
    if stochastic:
        expected = (1 - s_next) * (_f64(x) - s * v) + s_next * _f64(z)
    else:
        expected = _f64(x) + (s_next - s) * v
    np.testing.assert_allclose(_f64(got), expected, rtol=1e-5, atol=1e-5)
    # the same step with the sigmas given per sample, and per token
    given = dk.flow_step(x, c, noise=z, sigma=table[index], sigma_next=table[index + 1], stochastic=stochastic,
                         backend="reference", **kw)
    torch.testing.assert_close(given, got, rtol=0, atol=0)


def test_reference_per_token_sigmas_match_float64():
    x, v = make_inputs((2, 9, 4), 2, torch.float32, seed=6)
    s, s_next = _sigmas((2, 9, 1), "cpu", seed=7), _sigmas((2, 9, 1), "cpu", seed=8, hi=0.5)
    got = dk.flow_step(x, v, sigma=s, sigma_next=s_next, backend="reference")
    np.testing.assert_allclose(_f64(got), _f64(x) + (_f64(s_next) - _f64(s)) * _f64(v), rtol=1e-5, atol=1e-5)


def test_batched_guidance_output_is_uncond_then_cond():
    x, c, u = make_inputs((3, 2, 4, 4), 3, torch.float32, seed=9)
    table, index = _table("cpu"), _step_index(3, "cpu")
    two = dk.flow_step(x, c, table, index, guidance_scale=4.0, uncond=u, backend="reference")
    batched = dk.flow_step(x, torch.cat([u, c]), table, index, guidance_scale=4.0, backend="reference")
    torch.testing.assert_close(batched, two, rtol=0, atol=0)
    # w = 1 is the conditional output alone, w = 0 the unconditional
    cond = dk.flow_step(x, c, table, index, backend="reference")
    torch.testing.assert_close(dk.flow_step(x, c, table, index, guidance_scale=1.0, uncond=u, backend="reference"),
                               cond, rtol=1e-6, atol=1e-6)


def test_bad_step_index_gives_nan_rows():
    x, v = make_inputs((4, 3, 5), 2, torch.float32)
    table = _table("cpu")
    index = torch.tensor([-1, 3, STEPS, 2**40])
    got = R.flow_step_ref(x, v, None, None, table, index, None, None, dk._spec.FlowStepOptions())
    rows = got.reshape(4, -1)
    assert bool(rows[[0, 2, 3]].isnan().all()) and bool(rows[1].isfinite().all())


# --------------------------------------------------------------------------------------------- checks
def test_argument_checks():
    x, v = make_inputs((2, 3, 4), 2, torch.float32)
    table, index = _table("cpu"), _step_index(2, "cpu")
    cases = [
        (lambda: dk.flow_interpolate(x, v, torch.rand(3)), ValueError, "sigma: expected shape (2,)"),
        (lambda: dk.flow_interpolate(x, v, torch.rand(2, 4)), ValueError, "does not broadcast"),
        (lambda: dk.flow_interpolate(x, v, torch.ones(2, dtype=torch.long)), TypeError, "sigma: expected a floating"),
        (lambda: dk.flow_interpolate(x, v.int(), torch.rand(2)), TypeError, "noise: expected a floating-point"),
        (lambda: dk.flow_interpolate(x, v, 0.5), TypeError, "sigma: expected a float tensor"),
        (lambda: dk.flow_step(x, v, table, index.float()), TypeError, "step_index: expected an integer"),
        (lambda: dk.flow_step(x, v, table, torch.tensor([0, STEPS])), ValueError, "step_index: expected values"),
        (lambda: dk.flow_step(x, v, table, index[:1]), ValueError, "step_index: expected shape (2,)"),
        (lambda: dk.flow_step(x, v, table[None], index), ValueError, "sigmas: expected a 1-D table"),
        (lambda: dk.flow_step(x, v, table), ValueError, "step_index: expected a tensor"),
        (lambda: dk.flow_step(x, v), ValueError, "sigma: expected a tensor"),
        (lambda: dk.flow_step(x, v, table, index, sigma=torch.rand(2)), ValueError, "give either the table"),
        (lambda: dk.flow_step(x, v, table, index, guidance_scale=2.0), ValueError, "batched [uncond; cond]"),
        (lambda: dk.flow_step(x, v, table, index, uncond=v), ValueError, "uncond: given without"),
        (lambda: dk.flow_step(x, v, table, index, guidance_rescale=0.5), ValueError, "needs guidance_scale"),
        (lambda: dk.flow_step(x, v, table, index, guidance_scale=2.0, uncond=v, guidance_rescale=1.5), ValueError,
         "guidance_rescale: expected a number in [0.0, 1.0]"),
        (lambda: dk.flow_step(x, v, table, index, guidance_scale=torch.ones(3), uncond=v), ValueError,
         "guidance_scale: expected shape (2,)"),
        (lambda: dk.flow_step(x, v, table, index, guidance_scale=float("nan"), uncond=v), ValueError, "finite"),
        (lambda: dk.flow_step(x, v, table, index, stochastic=1), TypeError, "stochastic: expected a bool"),
        (lambda: dk.flow_step(x, v, table, index, backend="tpu"), ValueError, "backend: expected one of"),
        (lambda: dk.flow_loss(v, x, v, torch.rand(2), weighting="logit"), ValueError, "weighting: expected one of"),
        (lambda: dk.flow_loss(v, x, v, torch.rand(2), loss_type="huber"), ValueError, "loss_type: expected one of"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


# ------------------------------------------------------------------------------------ fused vs reference
def _close(got, expected, dtype, backend):
    assert_matches(got, lambda **kw: expected(**kw), (), {}, dtype, bf16_truncates=INTERPRETED.get(backend, False))


def _check(got, fn, kwargs, dtype, backend):
    assert_matches(got, lambda **kw: fn(**kw, backend="reference"), (), kwargs, dtype,
                   bf16_truncates=INTERPRETED.get(backend, False))


@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, DTYPES))
def test_interpolate_matches_reference(backend, dtype):
    _backend(backend, "flow_interpolate", dtype)
    device = DEVICE[backend]
    for shape, sigma_shape in _layouts(backend):
        x0, noise = make_inputs(shape, 2, dtype, seed=11, device=device)
        kwargs = dict(x0=x0, noise=noise, sigma=_sigmas(sigma_shape, device))
        got = dk.flow_interpolate(**kwargs, backend=backend)
        _check(got, dk.flow_interpolate, kwargs, dtype, backend)
        assert _served(backend, "flow_interpolate", dtype) == backend


def _step_kwargs(shape, sigma_shape, dtype, device, form, guidance, stochastic, seed=13):
    x, c, u, z = make_inputs(shape, 4, dtype, seed=seed, device=device)
    kwargs = dict(sample=x, model_output=c, noise=z, stochastic=stochastic)
    if form == "table":
        kwargs.update(sigmas=_table(device), step_index=_step_index(shape[0], device))
    else:
        kwargs.update(sigma=_sigmas(sigma_shape, device, seed=seed),
                      sigma_next=_sigmas(sigma_shape, device, seed=seed + 1, hi=0.6))
    if guidance == "batched":
        kwargs.update(model_output=torch.cat([u, c]), guidance_scale=4.5)
    elif guidance in ("two", "rescaled"):
        w = torch.linspace(0.0, 7.5, shape[0]).to(device)
        kwargs.update(uncond=u, guidance_scale=w, guidance_rescale=0.7 if guidance == "rescaled" else 0.0)
    return kwargs


GUIDANCE = ("none", "batched", "two", "rescaled")


@pytest.mark.parametrize("backend,dtype,guidance", backend_params(BACKENDS, DTYPES, GUIDANCE))
def test_step_matches_reference(backend, dtype, guidance):
    """Both sigma forms, deterministic and stochastic with given noise, every layout; out= and in place."""
    _backend(backend, "flow_step", dtype)
    device = DEVICE[backend]
    for (shape, sigma_shape), form, stochastic in itertools.product(_layouts(backend), ("table", "given"),
                                                                     (False, True)):
        if guidance == "rescaled" and math.prod(shape[1:]) < 2:
            continue  # a standard deviation over one element is NaN (as in diffusers' rescale_noise_cfg)
        kwargs = _step_kwargs(shape, sigma_shape, dtype, device, form, guidance, stochastic)
        got = dk.flow_step(**kwargs, backend=backend)
        _check(got, dk.flow_step, kwargs, dtype, backend)
    opts = dk._spec.FlowStepOptions(False, guidance != "none", 0.7 if guidance == "rescaled" else 0.0)
    assert _served(backend, "flow_step", dtype, opts) == backend


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_step_out_in_place_and_channels_last(backend):
    _backend(backend, "flow_step", torch.float32)
    device = DEVICE[backend]
    shape = (3, 3, 5, 7)
    for guidance, stochastic in itertools.product(("none", "rescaled"), (False, True)):
        kwargs = _step_kwargs(shape, (3,), torch.float32, device, "table", guidance, stochastic)
        expected = dk.flow_step(**kwargs, backend="reference")
        out = torch.empty_like(kwargs["sample"])
        assert dk.flow_step(**kwargs, backend=backend, out=out) is out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        x = kwargs["sample"].clone()
        assert dk.flow_step(**{**kwargs, "sample": x}, backend=backend, out=x) is x
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
        # NHWC data stays NHWC; a per-(channel, width) sigma in NHWC order
        fmt = torch.channels_last
        nhwc = {k: v.contiguous(memory_format=fmt) if isinstance(v, torch.Tensor) and v.ndim == 4 else v
                for k, v in kwargs.items()}
        got = dk.flow_step(**nhwc, backend=backend)
        assert got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        given = _step_kwargs(shape, (3, 3, 1, 7), torch.float32, device, "given", guidance, stochastic)
        nhwc = {k: v.contiguous(memory_format=fmt) if isinstance(v, torch.Tensor) and v.ndim == 4
                and v.shape[1:] == shape[1:] else v for k, v in given.items()}
        torch.testing.assert_close(dk.flow_step(**nhwc, backend=backend),
                                   dk.flow_step(**given, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, DTYPES))
def test_table_step_server_matches_flow_step(backend, dtype):
    """The drop-in scheduler's resolved step (`flow.table_step_server`; the compiled backends call their
    operator directly on contiguous operands, bound once in eager mode) equals `flow_step`, on contiguous and
    channels_last operands, advancing the step index when given the next one, and under torch.compile."""
    from ddpm_kernels import flow

    _backend(backend, "flow_step", dtype)
    device = DEVICE[backend]
    kwargs = _step_kwargs((3, 3, 5, 7), (3,), dtype, device, "table", "none", False)
    sample, model_output, sigmas, index = (kwargs[k] for k in ("sample", "model_output", "sigmas", "step_index"))
    sigmas = sigmas.to(R.compute_dtype(dtype))  # the server's table: in the compute dtype, as the drop-in keeps it
    server = flow.table_step_server(backend, sample)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x, v = sample.contiguous(memory_format=fmt), model_output.contiguous(memory_format=fmt)
        got = server(x, v, sigmas, index)
        assert got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got, dk.flow_step(x, v, sigmas, index, backend=backend), rtol=0, atol=0)
        # with the next index: the same step, then that index written into step_index in place
        expected, moved = dk.flow_step(x, v, sigmas, index, backend=backend), index.clone()
        assert torch.equal(server(x, v, sigmas, moved, STEPS - 1), expected)
        assert moved.tolist() == [STEPS - 1] * moved.shape[0]
    if backend == "cpu":  # traced whole by torch.compile (the bound call is for eager mode: the operator there)
        compiled = torch.compile(server, backend="eager", fullgraph=True)
        moved = index.clone()
        assert torch.equal(compiled(sample, model_output, sigmas, moved, STEPS - 1), expected)
        assert moved.tolist() == [STEPS - 1] * moved.shape[0]


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_step_bad_step_index_gives_nan(backend):
    """The backend function called directly (no validation): a sample whose step index is outside the table
    comes out NaN, the others are the reference's; nothing is read outside the table."""
    impl = _backend(backend, "flow_step", torch.float32)
    device = DEVICE[backend]
    x, v = make_inputs((4, 3, 5), 2, torch.float32, device=device)
    index = torch.tensor([-1, 3, STEPS, 2**40], device=device)
    table = _table(device)
    for stochastic in (False, True):
        opts = dk._spec.FlowStepOptions(stochastic)
        args = (x, v, None, None, table, index, None, None, opts, torch.randn_like(x))
        got, expected = impl.ops["flow_step"](*args), R.flow_step_ref(*args)
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_step_in_kernel_noise(backend):
    """noise=None draws standard normals in the kernel: reproducible from the same generator state, different
    for the next draw, and a stochastic step onto sigma_next = 0 is the deterministic x0 (no noise term)."""
    _backend(backend, "flow_step", torch.float32)
    device = DEVICE[backend]
    shape = (2, 4, 16, 16) if not INTERPRETED.get(backend) else (2, 3, 8, 8)
    x, v = make_inputs(shape, 2, torch.float32, device=device)
    table, index = _table(device), torch.tensor([0, STEPS - 1], device=device)
    g = torch.Generator(device)

    def step(**kw):
        return dk.flow_step(x, v, table, index, stochastic=True, backend=backend, **kw)

    a, b = step(generator=g.manual_seed(5)), step(generator=g.manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = step(generator=g)
    assert not torch.equal(a[0], c[0])
    # recover z from the first sample: x' = (1 - s') x0 + s' z
    s, s_next = table[0].double(), table[1].double()
    x0 = x[0].double() - s * v[0].double()
    z = (a[0].double() - (1 - s_next) * x0) / s_next
    assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.2
    torch.testing.assert_close(a[1], step(noise=torch.zeros_like(x))[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, DTYPES))
def test_loss_matches_reference(backend, dtype):
    """The loss against the reference on the same inputs: both accumulate float32 (float64) sums of the same
    terms in different orders, a few ulps each."""
    _backend(backend, "flow_loss", dtype)
    device = DEVICE[backend]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for (shape, sigma_shape), weighting, loss_type in itertools.product(
            _layouts(backend), ("none", "sigma_sqrt", "cosmap"), ("l1", "l2")):
        mo, x0, noise = make_inputs(shape, 3, dtype, seed=17, device=device)
        sigma = _sigmas(sigma_shape, device)
        got = dk.flow_loss(mo, x0, noise, sigma, weighting, loss_type, backend=backend)
        expected = dk.flow_loss(mo, x0, noise, sigma, weighting, loss_type, backend="reference")
        assert got.dtype == expected.dtype and got.shape == ()
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def _grads(fn, kwargs, wrt, weight=None):
    leaves = {k: kwargs[k].detach().clone().requires_grad_() for k in wrt}
    out = fn(**{**kwargs, **leaves})
    total = (out * weight).sum() if weight is not None else out
    return torch.autograd.grad(total, list(leaves.values()))


@pytest.mark.parametrize("backend,dtype", backend_params(BACKENDS, (torch.float32, torch.float16)))
def test_gradients_match_reference(backend, dtype):
    device = DEVICE[backend]
    tol = dict(rtol=1.3e-6, atol=1e-8) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-5)
    for op, wrt in (("flow_interpolate", ("x0", "noise")), ("flow_loss", ("model_output",))):
        impl = _backend(backend, op, dtype)
        if not set(wrt) <= set(impl.differentiable.get(op, ())):
            continue
        assert _served(backend, op, dtype, grad=wrt) == backend
        for shape, sigma_shape in _layouts(backend)[:3]:
            a, b, c = make_inputs(shape, 3, dtype, seed=19, device=device)
            sigma = _sigmas(sigma_shape, device)
            if op == "flow_interpolate":
                kwargs, weight = dict(x0=a, noise=b, sigma=sigma), torch.randn(shape).to(device, dtype)
            else:
                kwargs, weight = dict(model_output=a, x0=b, noise=c, sigma=sigma, weighting="cosmap"), None
            fn = getattr(dk, op)
            got = _grads(lambda **kw: fn(**kw, backend=backend), kwargs, wrt, weight)
            expected = _grads(lambda **kw: fn(**kw, backend="reference"), kwargs, wrt, weight)
            for name, g, e in zip(wrt, got, expected):
                assert g.dtype == dtype
                torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{op} d/d{name}: {m}")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_gradcheck(backend):
    device = DEVICE[backend]
    for op, wrt in (("flow_interpolate", ("x0", "noise")), ("flow_loss", ("model_output",))):
        impl = _backend(backend, op, torch.float64)
        wrt = [n for n in wrt if n in impl.differentiable.get(op, ())]
        if not wrt:
            continue
        shape = (2, 3, 2)
        a, b, c = make_inputs(shape, 3, torch.float64, device=device)
        sigma = _sigmas((2, 3, 1), device).double()
        base = dict(x0=a, noise=b, sigma=sigma) if op == "flow_interpolate" else \
            dict(model_output=a, x0=b, noise=c, sigma=sigma, weighting="sigma_sqrt")

        def fn(*leaves, op=op, base=base, wrt=wrt):
            return getattr(dk, op)(**{**base, **dict(zip(wrt, leaves))}, backend=backend)

        assert torch.autograd.gradcheck(fn, [base[n].clone().requires_grad_() for n in wrt])


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_torch_compile_fullgraph(backend):
    """The three ops under torch.compile(fullgraph=True): eager's values, the in-place step in place."""
    impl = _backend(backend, "flow_step", torch.float32)
    device = DEVICE[backend]
    x, v, u, x0 = make_inputs((2, 3, 4, 4), 4, torch.float32, device=device)
    table, index, sigma = _table(device), _step_index(2, device), _sigmas((2,), device)
    have = {op for op in ("flow_interpolate", "flow_loss") if op in impl.ops}

    def run(x, v, u, x0, index):
        outs = [dk.flow_step(x, v, table, index, backend=backend),
                dk.flow_step(x, v, table, index, guidance_scale=3.0, uncond=u, guidance_rescale=0.5, backend=backend)]
        if "flow_interpolate" in have:
            outs.append(dk.flow_interpolate(x0, v, sigma, backend=backend))
        if "flow_loss" in have:
            outs.append(dk.flow_loss(v, x0, u, sigma, "cosmap", backend=backend))
        dk.flow_step(x, v, table, index, backend=backend, out=x)
        return outs

    eager = run(x.clone(), v, u, x0, index)
    xc = x.clone()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(xc, v, u, x0, index)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(xc, eager[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_sampling_step_runs_detached(backend):
    """The step is a sampling op: inputs that require grad do not change the kernel; no autograd history."""
    _backend(backend, "flow_step", torch.float64)
    device = DEVICE[backend]
    x, v = (t.requires_grad_() for t in make_inputs((2, 3, 4), 2, torch.float64, device=device))
    table, index = _table(device).double(), _step_index(2, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dk.flow_step(x, v, table, index, backend=backend)
    assert not got.requires_grad
    torch.testing.assert_close(got, dk.flow_step(x, v, table, index, backend="reference").detach())


def test_auto_serves_cpu_with_the_cpu_backend():
    """On CPU, ``auto`` runs each flow op with the compiled CPU backend when it has it (else the reference, with
    one warning naming why)."""
    impl = backends._load("cpu")
    if impl is None:
        pytest.skip("the compiled CPU backend is not built")
    for op in ("flow_interpolate", "flow_step", "flow_loss"):
        expected = "cpu" if op in impl.ops else "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served, _ = backends.resolve(op, "auto", torch.device("cpu"), torch.float32, None, None)
        assert served == expected, op


def test_sigma_operand_forms():
    """The flat form the kernels read: element i of sample b reads flat[b * period + (i // repeat) % period]."""
    from ddpm_kernels.flow import sigma_operand

    for shape, sigma_shape in SIGMA_LAYOUTS + [((2, 3, 5, 7), (2, 3, 5, 1))]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            if fmt is torch.channels_last and len(shape) != 4:
                continue
            x = torch.randn(shape).contiguous(memory_format=fmt)
            sigma = torch.rand(sigma_shape)
            op = sigma_operand("sigma", sigma, x)
            full = op.full.expand(shape)
            storage = full.contiguous(memory_format=fmt)
            if fmt is torch.channels_last:
                storage = storage.permute(0, 2, 3, 1)
            per = storage.reshape(shape[0], -1)
            i = torch.arange(per.shape[1])
            for b in range(shape[0]):
                expected = op.flat[b * op.period + (i // op.repeat) % op.period]
                torch.testing.assert_close(per[b], expected, rtol=0, atol=0)
            assert op.flat.is_contiguous() and op.flat.numel() == shape[0] * op.period
            if len(sigma_shape) == 1:
                assert op.period == 1
    # (B, L, 1) of (B, L, C) tokens and (B, 1, F, 1, 1) video frames are read without expanding
    tokens = sigma_operand("s", torch.rand(2, 33, 1), torch.randn(2, 33, 8))
    frames = sigma_operand("s", torch.rand(2, 1, 4, 1, 1), torch.randn(2, 3, 4, 5, 6))
    assert (tokens.period, tokens.repeat) == (33, 8) and (frames.period, frames.repeat) == (4, 30)
