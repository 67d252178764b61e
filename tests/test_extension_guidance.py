"""Classifier-free guidance fused into the compiled ``ddim_step`` / ``ddpm_step`` (csrc/guidance.h, the sampler
family's kernels in csrc/cpu and csrc/cuda) against the reference: on the CPU kernels always, on the CUDA kernels
when a GPU is present (those cases are marked ``gpu``).

The kernel reads the conditional output, the unconditional one and per-sample scales ``w`` and forms
``u + w (c - u)`` before the x0/eps conversion (a learned variance: the first C channels only, the variance
channels from the conditional output); ``guidance_rescale`` adds the flow step's reduction pass first.
Tolerances follow docs/design.md, "Tolerances" (helpers.assert_matches).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import backends
from ddpm_kernels import reference as R
from ddpm_kernels._spec import StepOptions
from helpers import DTYPES, assert_matches, assert_thread_independent, compiled_backends, make_inputs
from sampler_cases import (DDIM_OPTIONS, PARAMETERIZATIONS, VARIANCE_TYPES, backend_fixtures, learned_output,
                           make_steps)

extension, pytestmark, BACKENDS = compiled_backends()
backend, schedule = backend_fixtures(BACKENDS)
SCALES = [0.0, 1.0, 7.5, -0.5, 2.5]  # per sample: w = 0 is the unconditional step, w = 1 the conditional one
# (form of the guided output, guidance_rescale): batched [uncond; cond] or two tensors, rescale off and on
FORMS = [("batched", 0.0), ("two", 0.0), ("batched", 0.7), ("two", 1.0)]


def _scales(batch, device):
    return torch.tensor(SCALES[:batch], device=device)


def _outputs(shape, dtype, device, variance_type=None, seed=0):
    """(cond, uncond): (B, C, ...) each, or (B, 2C, ...) with a learned variance, uncond's variance channels NaN
    (never read: they are the conditional output's)."""
    if variance_type is None:
        c, u = make_inputs(shape, 2, dtype, seed=seed + 7, device=device)
        return c, u
    c = learned_output(shape, dtype, device, variance_type, seed=seed)
    u = learned_output(shape, dtype, device, variance_type, seed=seed + 1)
    u[:, shape[1]:] = float("nan")
    return c, u


def _guided_kwargs(form, c, u, w, rescale):
    if form == "batched":
        return dict(model_output=torch.cat([u, c]), guidance_scale=w, guidance_rescale=rescale)
    return dict(model_output=c, uncond=u, guidance_scale=w, guidance_rescale=rescale)


def _check(op, backend, kwargs, dtype):
    got = getattr(dk, op)(**kwargs, backend=backend)
    assert_matches(got, lambda **kw: getattr(dk, op)(**kw, backend="reference"), (), kwargs, dtype)
    return got


# ------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("form,rescale", FORMS)
@pytest.mark.parametrize("options", list(DDIM_OPTIONS))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_ddim_step(backend, schedule, dtype, parameterization, options, form, rescale):
    shape = (5, 3, 5, 7)
    x, z = make_inputs(shape, 2, dtype, seed=1, device=backend)
    c, u = _outputs(shape, dtype, backend, seed=1)
    t, t_prev = make_steps(shape[0], backend, seed=1)
    kwargs = dict(x_t=x, t=t, t_prev=t_prev, schedule=schedule, parameterization=parameterization, noise=z,
                  return_pred_x0=True, **DDIM_OPTIONS[options],
                  **_guided_kwargs(form, c, u, _scales(shape[0], backend), rescale))
    _check("ddim_step", backend, kwargs, dtype)


@pytest.mark.parametrize("form,rescale", FORMS)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_ddpm_step(backend, schedule, dtype, parameterization, variance_type, form, rescale):
    shape = (4, 2, 3, 8)
    x, z = make_inputs(shape, 2, dtype, seed=2, device=backend)
    learned = variance_type in ("learned", "learned_range")
    c, u = _outputs(shape, dtype, backend, variance_type if learned else None, seed=2)
    t, t_prev = make_steps(shape[0], backend, seed=2)
    kwargs = dict(x_t=x, t=t, t_prev=t_prev, schedule=schedule, parameterization=parameterization,
                  variance_type=variance_type, clip_denoised=parameterization != "eps", noise=z,
                  return_pred_x0=True, **_guided_kwargs(form, c, u, _scales(shape[0], backend), rescale))
    _check("ddpm_step", backend, kwargs, dtype)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (5, 1, 9), (2, 3, 40, 41)], ids=str)
@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_guided_shapes_and_a_number_scale(backend, schedule, shape, rescale):
    """Vector tails, one channel, and samples over several reduction pieces (40 * 41 * 3 > 4096); a number scale
    is the same scale for every sample."""
    x, z = make_inputs(shape, 2, torch.float32, seed=3, device=backend)
    c, u = _outputs(shape, torch.float32, backend, seed=3)
    t, t_prev = make_steps(shape[0], backend, seed=3)
    base = dict(x_t=x, t=t, t_prev=t_prev, schedule=schedule, eta=0.8, parameterization="v", noise=z)
    got = _check("ddim_step", backend, dict(base, model_output=c, uncond=u, guidance_scale=4.0,
                                            guidance_rescale=rescale), torch.float32)
    per_sample = dk.ddim_step(**base, model_output=c, uncond=u, guidance_rescale=rescale,
                              guidance_scale=torch.full((shape[0],), 4.0, device=backend), backend=backend)
    torch.testing.assert_close(got, per_sample, rtol=0, atol=0)


def test_scale_one_is_the_conditional_step_and_zero_the_unconditional(backend, schedule):
    shape = (4, 3, 6, 5)
    x, z = make_inputs(shape, 2, torch.float32, seed=4, device=backend)
    c, u = _outputs(shape, torch.float32, backend, seed=4)
    t, t_prev = make_steps(4, backend, seed=4)
    args = (x, t, t_prev)
    for w, plain in ((1.0, c), (0.0, u)):
        got = dk.ddpm_step(*args, c, schedule, noise=z, guidance_scale=w, uncond=u, backend=backend)
        torch.testing.assert_close(got, dk.ddpm_step(*args, plain, schedule, noise=z, backend=backend),
                                   rtol=1e-6, atol=1e-6)


def test_rescale_with_a_large_mean(backend, schedule):
    """The per-sample standard deviations are taken around a shift: a mean far larger than the spread loses
    nothing (raw sums of squares would lose every digit in float32)."""
    shape = (3, 4, 8, 8)
    x, c, u, z = make_inputs(shape, 4, torch.float32, seed=5, device=backend)
    c, u = 300.0 + 0.01 * c, 300.0 + 0.01 * u
    t, t_prev = make_steps(3, backend, seed=5)
    kwargs = dict(x_t=x, t=t, t_prev=t_prev, model_output=c, uncond=u, schedule=schedule, parameterization="x0",
                  noise=z, guidance_scale=3.0, guidance_rescale=1.0)
    got = dk.ddpm_step(**kwargs, backend=backend)
    k64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    torch.testing.assert_close(got.double(), dk.ddpm_step(**k64, backend="reference"), rtol=1e-4, atol=1e-4)


def test_rescale_independent_of_threads(schedule, backend):
    if backend != "cpu":
        pytest.skip("CPU thread count")
    shape = (3, 3, 48, 50)  # 7200 elements per sample: two reduction pieces
    x, z = make_inputs(shape, 2, torch.float32, seed=6, device="cpu")
    c, u = _outputs(shape, torch.float32, "cpu", seed=6)
    t, t_prev = make_steps(3, "cpu", seed=6)

    def run():
        return dk.ddim_step(x, t, t_prev, c, schedule, 0.5, noise=z, guidance_scale=5.0, uncond=u,
                            guidance_rescale=0.6, backend="cpu")

    assert_thread_independent(run)


# ---------------------------------------------------------------------------------------- in-kernel noise
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("case", ["ddim_eta", "ddpm_fixed_large", "ddpm_learned_range"])
def test_in_kernel_noise_is_the_unguided_steps(backend, schedule, case, rescale):
    """From the same generator state, a guided step draws the normals the unguided step on the combined output
    draws, and advances the generator the same way."""
    shape = (4, 3, 8, 8)
    (x,) = make_inputs(shape, 1, torch.float32, seed=8, device=backend)
    variance = "learned_range" if case == "ddpm_learned_range" else None
    c, u = _outputs(shape, torch.float32, backend, variance, seed=8)
    t, t_prev = make_steps(4, backend, seed=8)
    w = _scales(4, backend)
    if variance:
        mixed = torch.cat([R.guided_output(c[:, :3], u[:, :3], w, rescale, torch.float32), c[:, 3:]], 1)
    else:
        mixed = R.guided_output(c, u, w, rescale, torch.float32)
    if case == "ddim_eta":
        step = lambda mo, g, **kw: dk.ddim_step(x, t, t_prev, mo, schedule, 0.7, "v", generator=g,  # noqa: E731
                                                backend=backend, **kw)
    else:
        step = lambda mo, g, **kw: dk.ddpm_step(x, t, t_prev, mo, schedule, "eps",  # noqa: E731
                                                variance or "fixed_large", generator=g, backend=backend, **kw)
    gen = lambda: torch.Generator(device=backend).manual_seed(11)  # noqa: E731
    g1, g2 = gen(), gen()
    guided = step(c, g1, uncond=u, guidance_scale=w, guidance_rescale=rescale)
    plain = step(mixed, g2)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(g1.get_state(), g2.get_state())


# ------------------------------------------------------------------------------- out=, in place, layouts
@pytest.mark.parametrize("rescale", [0.0, 0.5])
@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_out_and_in_place(backend, schedule, op, rescale):
    shape = (4, 3, 5, 7)
    x, z = make_inputs(shape, 2, torch.float32, seed=9, device=backend)
    c, u = _outputs(shape, torch.float32, backend, seed=9)
    t, t_prev = make_steps(4, backend, seed=9)
    kw = dict(noise=z, guidance_scale=_scales(4, backend), guidance_rescale=rescale, backend=backend)
    step = getattr(dk, op)
    expected = step(x, t, t_prev, torch.cat([u, c]), schedule, **kw)
    out = torch.empty_like(x)
    assert step(x, t, t_prev, torch.cat([u, c]), schedule, out=out, **kw) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    y = x.clone()
    assert step(y, t, t_prev, c, schedule, uncond=u, out=y, **kw) is y
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    strided = torch.empty(shape + (2,), device=backend)[..., 0]  # an out the kernel cannot write: copied in
    step(x, t, t_prev, c, schedule, uncond=u, out=strided, **kw)
    torch.testing.assert_close(strided, expected, rtol=0, atol=0)


@pytest.mark.parametrize("uncond_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last(backend, schedule, dtype, uncond_layout):
    shape = (3, 4, 6, 5)
    cl = torch.channels_last
    x, z = (a.to(memory_format=cl) for a in make_inputs(shape, 2, dtype, seed=10, device=backend))
    c, u = _outputs(shape, dtype, backend, seed=10)
    c = c.to(memory_format=cl)
    u = u.to(memory_format=cl) if uncond_layout == "channels_last" else u.contiguous()
    t, t_prev = make_steps(3, backend, seed=10)
    for op, extra in (("ddim_step", dict(eta=0.4)), ("ddpm_step", {})):
        kwargs = dict(x_t=x, t=t, t_prev=t_prev, model_output=c, uncond=u, schedule=schedule, noise=z,
                      guidance_scale=_scales(3, backend), guidance_rescale=0.5, **extra)
        got = _check(op, backend, kwargs, dtype)
        assert got.is_contiguous(memory_format=cl)
        y = x.clone()
        getattr(dk, op)(**dict(kwargs, x_t=y), out=y, backend=backend)
        torch.testing.assert_close(y, got, rtol=0, atol=0)


def test_mixed_precision_scales(backend, schedule):
    """A float16 model output with float32 data (autocast) runs promoted; so does a float64 model output with
    float32 data, whose float32 scales the kernels then read in float64."""
    shape = (3, 2, 4, 4)
    x, z = make_inputs(shape, 2, torch.float32, seed=12, device=backend)
    c, u = _outputs(shape, torch.float16, backend, seed=12)
    t, t_prev = make_steps(3, backend, seed=12)
    w = torch.tensor([1.5, 0.0, 3.0], device=backend)
    got = dk.ddpm_step(x, t, t_prev, c, schedule, noise=z, guidance_scale=w, uncond=u, guidance_rescale=0.3,
                       backend=backend)
    ref = dk.ddpm_step(x, t, t_prev, c.float(), schedule, noise=z, guidance_scale=w, uncond=u.float(),
                       guidance_rescale=0.3, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got = dk.ddpm_step(x, t, t_prev, c.double(), schedule, noise=z, guidance_scale=w, uncond=u.double(),
                       guidance_rescale=0.3, backend=backend)
    ref = dk.ddpm_step(x.double(), t, t_prev, c.double(), schedule, noise=z.double(), guidance_scale=w.double(),
                       uncond=u.double(), guidance_rescale=0.3, backend="reference")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- dispatch
def test_guided_steps_are_served_by_the_kernels(backend):
    for opts in (StepOptions("ddim", eta=0.5, guided=True), StepOptions("ddpm", guided=True, guidance_rescale=0.7),
                 StepOptions("ddpm", variance_type="learned", guided=True, guidance_rescale=0.2)):
        assert extension.declines(opts.sampler + "_step", opts) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            name, _ = backends.resolve(opts.sampler + "_step", backend, torch.device(backend), torch.float32, opts,
                                       None)
        assert name == backend


# ------------------------------------------------------------------------------------ the operators' checks
# (torch.library.opcheck of the guided calls: tests/test_extension_sampler_ops.py, test_opcheck)
def _op_args(backend, schedule, dtype=torch.float32, learned=False, noise=True, rescale=0.5):
    shape = (2, 3, 5)
    x, z = make_inputs(shape, 2, dtype, seed=14, device=backend)
    c, u = _outputs(shape, dtype, backend, "learned" if learned else None, seed=14)
    t, t_prev = make_steps(2, backend, seed=14)
    w = torch.tensor([2.0, 0.0], device=backend, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, t, t_prev, c, u, w, schedule.table(torch.float64), (z if noise else None), rescale


def test_operator_argument_checks(backend, schedule):
    x, t, tp, c, u, w, tab, z, _ = _op_args(backend, schedule)
    ops = torch.ops.ddpm_kernels
    cases = [
        ((x, t, tp, c, u, None, tab, 0.5, "eps", False, 1.0, True, False, 0.0, z, None, 0, False), "together"),
        ((x, t, tp, c, None, w, tab, 0.5, "eps", False, 1.0, True, False, 0.0, z, None, 0, False), "together"),
        ((x, t, tp, c, None, None, tab, 0.5, "eps", False, 1.0, True, False, 0.5, z, None, 0, False), "needs a guided"),
        ((x, t, tp, c, u, w, tab, 0.5, "eps", False, 1.0, True, False, 1.5, z, None, 0, False), "must be in [0, 1]"),
        ((x, t, tp, c, u, w.double(), tab, 0.5, "eps", False, 1.0, True, False, 0.0, z, None, 0, False), "guidance"),
        ((x, t, tp, c, u[:1], w, tab, 0.5, "eps", False, 1.0, True, False, 0.0, z, None, 0, False), "uncond"),
        ((x, t, tp, c, u.half(), w, tab, 0.5, "eps", False, 1.0, True, False, 0.0, z, None, 0, False), "uncond"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ops.ddim_step(*args)


# ------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_guided_steps(backend, schedule):
    """Guided DDIM and DDPM steps (batched and two-tensor forms, rescale, learned variance, in place) compile with
    fullgraph=True and match eager exactly."""
    shape = (2, 3, 4, 4)
    x, z = make_inputs(shape, 2, torch.float32, seed=15, device=backend)
    c, u = _outputs(shape, torch.float32, backend, seed=15)
    cw, uw = _outputs(shape, torch.float32, backend, "learned", seed=15)
    t, t_prev = make_steps(2, backend, seed=15)
    w = torch.tensor([3.0, 1.0], device=backend)

    def steps(x_t, t, t_prev, c, u, cw, uw, w, noise, y):
        a, x0 = dk.ddim_step(x_t, t, t_prev, torch.cat([u, c]), schedule, 0.5, "v", True, noise=noise,
                             backend=backend, return_pred_x0=True, guidance_scale=w, guidance_rescale=0.7)
        b = dk.ddpm_step(x_t, t, t_prev, cw, schedule, "eps", "learned", noise=noise, backend=backend,
                         guidance_scale=w, uncond=uw, guidance_rescale=0.3)
        dk.ddpm_step(y, t, t_prev, c, schedule, noise=noise, backend=backend, out=y, guidance_scale=2.0, uncond=u)
        return a, x0, b, y

    eager = steps(x, t, t_prev, c, u, cw, uw, w, z, x.clone())
    torch._dynamo.reset()
    compiled = torch.compile(steps, fullgraph=True)(x, t, t_prev, c, u, cw, uw, w, z, x.clone())
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
