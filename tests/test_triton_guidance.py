"""Classifier-free guidance fused into the Triton ``ddim_step`` / ``ddpm_step`` kernel, on CPU through Triton's
interpreter (tests/conftest.py) or on a GPU: ``g = u + w[b] (c - u)`` formed in registers before the x0/eps
conversion (for learned variances only the prediction channels, the variance channels from the conditional
output), and with ``guidance_rescale`` the statistics pass first (``ddpm_kernels/triton/guidance.py``, shared with
the flow step).

Against the reference (``reference.sampler_step_ref``, ``guided_output``) by docs/design.md, "Tolerances": every
sampler, variance type and parameterization, clipping and thresholding, rescale on and off, per-sample scales
including 0 and 1, both forms of the model output; the noise (given, or drawn from a generator: the same as the
unguided step on the pre-combined output); out= and in-place; channels_last; several statistics partials per
sample; opcheck and torch.compile. GPU-only checks (launch count, no host sync, CUDA-graph replay) are marked
``gpu``.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import backends
from ddpm_kernels import reference as R
from ddpm_kernels._spec import OPS, StepOptions, step_options
from helpers import (DTYPES, capture_cuda_graph, ddim_step_ref, ddpm_step_ref, kernels_launched_without_sync,
                     triton_device)
from sampler_cases import PARAMETERIZATIONS, T, VARIANCE_TYPES, learned_output, make_steps

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import guidance as tg  # noqa: E402
from ddpm_kernels.triton import noise as tn  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402
from ddpm_kernels.triton.sampler_step import SAMPLERS, VARIANCE_ID  # noqa: E402

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)
SHAPE = (3, 2, 5, 3)
# per-sample scales: unguided-unconditional (0), conditional (1), and a strong one
SCALES = (0.0, 1.0, 6.5)


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).to(DEVICE)


def _scales(dtype=torch.float32):
    return torch.tensor(SCALES, dtype=dtype, device=DEVICE)


def _guided_inputs(dtype, seed, variance_type=None, shape=SHAPE):
    """``(x_t, cond, uncond, noise)``; with a learned variance type the two outputs have the variance channels."""
    x, c, u, z = make_inputs(shape, 4, dtype, seed=seed)
    if variance_type is not None and variance_type.startswith("learned"):
        c = learned_output(shape, dtype, DEVICE, variance_type, seed=seed)
        u = learned_output(shape, dtype, DEVICE, variance_type, seed=seed + 1)
    return x, c, u, z


# ----------------------------------------------------------------------------------------- against the reference
DDIM_BOUNDS = {
    "none": dict(),
    "clip_clipped_output": dict(clip_denoised=True, clip_range=1.5, use_clipped_model_output=True),
    "threshold": dict(threshold_ratio=0.9, threshold_max=2.5),
}


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("bound", list(DDIM_BOUNDS))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_ddim(schedule, dtype, parameterization, bound, rescale):
    """The batched ``[uncond; cond]`` output with per-sample scales, eta > 0 with given noise, and x0."""
    x, c, u, z = _guided_inputs(dtype, seed=1)
    t, t_prev = make_steps(3, DEVICE, seed=1)
    kw = dict(noise=z, return_pred_x0=True, guidance_scale=_scales(), guidance_rescale=rescale,
              **DDIM_BOUNDS[bound])
    args = (x, t, t_prev, torch.cat([u, c]), schedule, 0.7, parameterization)
    got = dk.ddim_step(*args, backend="triton", **kw)
    assert_matches(got, ddim_step_ref, args, kw, dtype)


@pytest.mark.parametrize("rescale", [0.0, 0.6])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_guided_ddpm(schedule, parameterization, variance_type, rescale):
    """Every variance type (learned ones: the variance channels from the conditional output) and
    parameterization, two tensors, float32."""
    x, c, u, z = _guided_inputs(torch.float32, seed=2, variance_type=variance_type)
    t, t_prev = make_steps(3, DEVICE, seed=2)
    kw = dict(noise=z, return_pred_x0=True, guidance_scale=_scales(), uncond=u, guidance_rescale=rescale)
    args = (x, t, t_prev, c, schedule, parameterization, variance_type, parameterization != "x0")
    got = dk.ddpm_step(*args, backend="triton", **kw)
    assert_matches(got, ddpm_step_ref, args, kw, torch.float32)


@pytest.mark.parametrize("bound", ["clip", "threshold"])
@pytest.mark.parametrize("variance_type", ["fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_ddpm_dtypes(schedule, dtype, variance_type, bound):
    """Rescaled, in every dtype, clipped or thresholded (the statistics feed the x0 pass and the step), batched."""
    x, c, u, z = _guided_inputs(dtype, seed=3, variance_type=variance_type)
    t, t_prev = make_steps(3, DEVICE, seed=3)
    extra = dict(threshold_ratio=0.95, threshold_max=2.0) if bound == "threshold" else {}
    kw = dict(noise=z, return_pred_x0=True, guidance_scale=_scales(), guidance_rescale=0.8, **extra)
    args = (x, t, t_prev, torch.cat([u, c]), schedule, "v", variance_type, bound == "clip")
    got = dk.ddpm_step(*args, backend="triton", **kw)
    assert_matches(got, ddpm_step_ref, args, kw, dtype)


def test_served_without_fallback(schedule):
    """Guided and rescaled steps run on Triton itself: not declined, no fallback warning."""
    for name in ("ddim_step", "ddpm_step"):
        base = step_options(OPS[name], tuple(o.default for o in OPS[name].options))
        for rescale in (0.0, 0.5):
            opts = dataclasses.replace(base, guided=True, guidance_rescale=rescale, threshold_ratio=0.9)
            assert tk.BACKEND.declines(name, opts) is None
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                served, fn = backends.resolve(name, "triton", torch.device(DEVICE), torch.float32, opts, None)
            assert served == "triton" and fn is tk.BACKEND.ops[name]


# ------------------------------------------------------------------------------------------- forms and scales
def test_batched_and_two_tensor_forms_agree(schedule):
    """``[uncond; cond]`` (split into views) and two tensors give the same numbers, also with variance channels
    and rescale; a number equals a per-sample tensor of it and a 0-d tensor."""
    x, c, u, z = _guided_inputs(torch.float32, seed=4, variance_type="learned_range")
    t, t_prev = make_steps(3, DEVICE, seed=4)
    run = partial(dk.ddpm_step, x, t, t_prev, schedule=schedule, variance_type="learned_range", noise=z,
                  backend="triton", guidance_rescale=0.5)
    two = run(model_output=c, uncond=u, guidance_scale=_scales())
    torch.testing.assert_close(run(model_output=torch.cat([u, c]), guidance_scale=_scales()), two, rtol=0, atol=0)
    x, c, u, z = _guided_inputs(torch.float32, seed=5)
    run = partial(dk.ddim_step, x, t, t_prev, schedule=schedule, eta=0.5, noise=z, backend="triton")
    number = run(model_output=c, uncond=u, guidance_scale=4.0)
    torch.testing.assert_close(run(model_output=c, uncond=u, guidance_scale=torch.full((3,), 4.0, device=DEVICE)),
                               number, rtol=0, atol=0)
    torch.testing.assert_close(run(model_output=torch.cat([u, c]), guidance_scale=torch.tensor(4.0, device=DEVICE)),
                               number, rtol=0, atol=0)
    torch.testing.assert_close(number, run(model_output=c, uncond=u, guidance_scale=4.0, backend="reference"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
def test_scale_zero_is_uncond_and_one_is_cond(schedule, op):
    """Per sample: w = 0 steps on the unconditional output exactly (u + 0 (c - u) = u), w = 1 on the
    conditional one (to rounding), the other sample on u + w (c - u)."""
    variance_type = "learned" if op == "ddpm_step" else None
    x, c, u, z = _guided_inputs(torch.float32, seed=6, variance_type=variance_type)
    t, t_prev = make_steps(3, DEVICE, seed=6)
    kw = dict(noise=z, backend="triton", **({"eta": 1.0} if op == "ddim_step" else {"variance_type": "learned"}))
    fn = getattr(dk, op)
    got = fn(x, t, t_prev, c, schedule, uncond=u, guidance_scale=_scales(), **kw)
    # the unconditional step keeps the conditional output's variance channels
    u_step = u if variance_type is None else torch.cat([u[:, :2], c[:, 2:]], 1)
    torch.testing.assert_close(got[0], fn(x, t, t_prev, u_step, schedule, **kw)[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], fn(x, t, t_prev, c, schedule, **kw)[1], rtol=1e-6, atol=1e-6)
    mixed = u + 6.5 * (c - u)
    if variance_type is not None:
        mixed = torch.cat([mixed[:, :2], c[:, 2:]], 1)
    torch.testing.assert_close(got[2], fn(x, t, t_prev, mixed, schedule, **kw)[2], rtol=1e-5, atol=1e-5)


def test_mixed_precision_outputs(schedule):
    """bfloat16 model outputs with float32 data (autocast) are promoted as unguided steps are."""
    x, c, u, z = _guided_inputs(torch.float32, seed=7)
    t, t_prev = make_steps(3, DEVICE, seed=7)
    kw = dict(noise=z, guidance_scale=_scales(), uncond=u.bfloat16(), guidance_rescale=0.4)
    got = dk.ddpm_step(x, t, t_prev, c.bfloat16(), schedule, backend="triton", **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ddpm_step_ref(x, t, t_prev, c.bfloat16(), schedule, **kw), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------------ noise
def _pre_combined(c, u, rescale, variance_type):
    """The guided model output as the reference forms it (float32), variance channels from ``c``."""
    if variance_type is None or not variance_type.startswith("learned"):
        return R.guided_output(c, u, _scales(), rescale, torch.float32)
    mixed = R.guided_output(c[:, :2], u[:, :2], _scales(), rescale, torch.float32)
    return torch.cat([mixed, c[:, 2:]], 1)


@pytest.mark.parametrize("given", [True, False], ids=["given", "in_kernel"])
@pytest.mark.parametrize("rescale", [0.0, 0.9])
@pytest.mark.parametrize("op, variance_type", [("ddim_step", None), ("ddpm_step", "fixed_small"),
                                               ("ddpm_step", "learned_range")])
def test_same_noise_as_unguided_step_on_pre_combined_output(schedule, op, variance_type, rescale, given):
    """Guidance changes only the model output: from the same generator state (or the same given noise) the
    guided step is the unguided step on ``guided_output(c, u, w)``, and both leave the generator in the same
    state."""
    x, c, u, z = _guided_inputs(torch.float32, seed=8, variance_type=variance_type)
    t, t_prev = make_steps(3, DEVICE, seed=8)
    kw = {"eta": 1.0} if op == "ddim_step" else {"variance_type": variance_type}
    fn = partial(getattr(dk, op), x, t, t_prev, schedule=schedule, backend="triton", **kw)
    g1, g2 = torch.Generator(DEVICE).manual_seed(11), torch.Generator(DEVICE).manual_seed(11)
    noise = z if given else None
    guided = fn(model_output=c, uncond=u, guidance_scale=_scales(), guidance_rescale=rescale, noise=noise,
                generator=g1)
    plain = fn(model_output=_pre_combined(c, u, rescale, variance_type), noise=noise, generator=g2)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(g1.get_state(), g2.get_state())
    if not given:  # the noise was drawn: a different generator state gives a different step
        other = fn(model_output=c, uncond=u, guidance_scale=_scales(), guidance_rescale=rescale,
                   generator=torch.Generator(DEVICE).manual_seed(12))
        assert not torch.allclose(guided[1:], other[1:])


# ---------------------------------------------------------------------------------------- out=, layouts, sizes
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned"])
def test_out_in_place_and_channels_last(schedule, variance_type):
    """channels_last data and outputs (mixed with contiguous ones), out= and in place: the out-of-place result
    exactly, and the reference's."""
    x, c, u, z = _guided_inputs(torch.float32, seed=9, variance_type=variance_type, shape=(3, 2, 4, 5))
    x, c = x.to(memory_format=torch.channels_last), c.to(memory_format=torch.channels_last)
    t, t_prev = make_steps(3, DEVICE, seed=9)
    kw = dict(noise=z, guidance_scale=_scales(), uncond=u, guidance_rescale=0.5, return_pred_x0=True)
    args = (x, t, t_prev, c, schedule, "eps", variance_type)
    expected, expected_x0 = dk.ddpm_step(*args, backend="triton", **kw)
    assert_matches((expected, expected_x0), ddpm_step_ref, args, kw, torch.float32)
    if variance_type == "fixed_small":
        assert expected.is_contiguous(memory_format=torch.channels_last)
    xi = x.clone()
    result, x0 = dk.ddpm_step(xi, *args[1:], backend="triton", out=xi, **kw)
    assert result is xi
    torch.testing.assert_close(xi, expected, rtol=0, atol=0)
    torch.testing.assert_close(x0, expected_x0, rtol=0, atol=0)
    out = torch.empty(x.shape, device=DEVICE)  # contiguous
    assert dk.ddpm_step(*args, backend="triton", out=out, **kw)[0] is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # in place with in-kernel noise equals the out-of-place step from the same generator state
    kw.update(noise=None, return_pred_x0=False)
    g = torch.Generator(DEVICE)
    expected = dk.ddpm_step(*args, backend="triton", generator=g.manual_seed(3), **kw)
    xi = x.clone()
    dk.ddpm_step(xi, *args[1:], backend="triton", generator=g.manual_seed(3), out=xi, **kw)
    torch.testing.assert_close(xi, expected, rtol=0, atol=0)


@pytest.mark.parametrize("table, splits", [(((16, 1),), 3), (((16, 1),), 64), (((1024, 4),), 64)])
@pytest.mark.parametrize("variance_type", ["fixed_large", "learned_range"])
def test_rescale_statistics_partials(schedule, monkeypatch, variance_type, table, splits):
    """Statistics over several tiles per split and several splits per sample (with variance channels, every
    sample's guided elements at a stride of twice their count), merged by the step kernel, and over one tile."""
    monkeypatch.setattr(tu, "LAUNCH_TABLE", table)
    monkeypatch.setattr(tg, "MAX_SPLITS", splits)
    shape = (3, 5, 41)
    n_splits, chunk, _ = tg.stats_layout(205, 3)
    assert n_splits <= splits and (n_splits > 1) == (table[0][0] == 16)
    assert (n_splits - 1) * chunk < 205 <= n_splits * chunk
    x, c, u, z = _guided_inputs(torch.float32, seed=10, variance_type=variance_type, shape=shape)
    t, t_prev = make_steps(3, DEVICE, seed=10)
    kw = dict(noise=z, guidance_scale=torch.tensor([1.5, 4.0, 9.0], device=DEVICE), uncond=u, guidance_rescale=0.6)
    args = (x, t, t_prev, c, schedule, "eps", variance_type)
    torch.testing.assert_close(dk.ddpm_step(*args, backend="triton", **kw), ddpm_step_ref(*args, **kw),
                               rtol=1e-5, atol=1e-5)


def test_rescale_large_mean(schedule):
    """The statistics stay accurate when a sample's mean is large against its spread: float32 against the
    float64 reference."""
    c, u = make_inputs((2, 4, 32), 2, torch.float64, seed=12)
    c, u = (1000.0 + 0.01 * c).float(), (1000.0 + 0.02 * u).float()
    x = torch.zeros_like(c)
    t, t_prev = torch.tensor([400, 300], device=DEVICE), torch.tensor([380, 250], device=DEVICE)
    kw = dict(guidance_scale=3.0, guidance_rescale=0.8, noise=torch.zeros_like(c))
    got = dk.ddpm_step(x, t, t_prev, c, schedule, "x0", clip_denoised=False, uncond=u, backend="triton", **kw)
    ref64 = ddpm_step_ref(x.double(), t, t_prev, c.double(), schedule, "x0", clip_denoised=False, uncond=u.double(),
                          **{**kw, "noise": kw["noise"].double()})
    torch.testing.assert_close(got.double(), ref64, rtol=1e-5, atol=1e-5)


def test_batch_chunks_match_single_launch(schedule, monkeypatch):
    """Batches past the grid-y limit are launched in chunks; every chunk reads its own samples' scales and
    statistics."""
    x, c, u, z = _guided_inputs(torch.float32, seed=13, shape=(5, 2, 9))
    t, t_prev = make_steps(5, DEVICE, seed=13)
    kw = dict(noise=z, guidance_scale=torch.linspace(0, 5, 5, device=DEVICE), uncond=u, guidance_rescale=0.5)
    whole = dk.ddim_step(x, t, t_prev, c, schedule, 0.5, "v", backend="triton", **kw)
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    torch.testing.assert_close(dk.ddim_step(x, t, t_prev, c, schedule, 0.5, "v", backend="triton", **kw), whole,
                               rtol=0, atol=0)


def test_zero_elements(schedule):
    for shape in ((0, 3, 4), (2, 0, 3)):
        x = torch.empty(shape, device=DEVICE)
        t = torch.full((shape[0],), 5, device=DEVICE)
        out, x0 = dk.ddim_step(x, t, t - 1, torch.cat([x, x]), schedule, 1.0, backend="triton", guidance_scale=2.0,
                               guidance_rescale=0.5, return_pred_x0=True, threshold_ratio=0.9)
        assert out.shape == x.shape and x0.shape == x.shape


# ------------------------------------------------------------------------------ torch.library / compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(schedule, dtype):
    x, c, u, z = make_inputs((2, 3, 5), 4, dtype, seed=14)
    wide_c, wide_u = torch.cat([c, z], 1), torch.cat([u, -z], 1)
    t, t_prev = make_steps(2, DEVICE, seed=14)
    ab = schedule.coefficients64[1]
    seed = tn.draw_seed(None, x.device)
    w = torch.tensor([0.0, 3.5], dtype=R.compute_dtype(dtype), device=DEVICE)
    scale = torch.tensor([1.0, 1.7], dtype=R.compute_dtype(dtype), device=DEVICE)
    ops = torch.ops.ddpm_kernels_triton
    stats = ops.sampler_step_guidance_stats(x, c, u, w, 0)
    wide_stats = ops.sampler_step_guidance_stats(x, wide_c, wide_u, w, 3)
    ddim, ddpm = SAMPLERS["ddim"][0], SAMPLERS["ddpm"][0]
    cases = [
        (ops.sampler_step_guidance_stats, (x, c, u, w, 0)),
        (ops.sampler_step_guidance_stats, (x, wide_c, wide_u, w, 3)),
        (ops.sampler_step, (x, t, t_prev, c, ab, ddim, 0, 0, 0.5, True, 1.0, True, False, True, z, None, 0, 0, 0, True,
                            None, u, w, None, 0.0)),
        (ops.sampler_step, (x, t, t_prev, c, ab, ddim, 2, 0, 1.0, False, 1.0, True, True, True, None, seed, 0, 0, 0,
                            False, scale, u, w, stats, 0.7)),
        (ops.sampler_step_out, (x, t, t_prev, wide_c, ab, ddpm, 1, 3, 0.0, True, 1.0, True, False, True, z, None, 0,
                                0, 0, True, None, wide_u, w, wide_stats, 0.4, torch.empty_like(x))),
        (ops.sampler_step_x0, (x, t, t_prev, c, ab, 0, 0, u, w, stats, 0.7)),
        (ops.sampler_step_x0, (x, t, t_prev, wide_c, ab, 2, 2, wide_u, w, None, 0.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile(schedule):
    """Guided steps (rescaled, thresholded, learned variances in place, in-kernel noise) compile with
    fullgraph=True and match eager (the in-place step exactly)."""
    x, c, u, z = _guided_inputs(torch.float32, seed=15, shape=(2, 3, 4, 4))
    wide_c, wide_u = torch.cat([c, -z.abs()], 1), torch.cat([u, -z.abs() / 2], 1)
    t, t_prev = make_steps(2, DEVICE, seed=15)
    w = torch.tensor([2.0, 7.5], device=DEVICE)

    def steps(x, c, u, wide_c, wide_u, z, w):
        a, x0 = dk.ddim_step(x, t, t_prev, torch.cat([u, c]), schedule, 0.5, "v", True, noise=z, backend="triton",
                             return_pred_x0=True, guidance_scale=w, guidance_rescale=0.7)
        thresholded = dk.ddim_step(x, t, t_prev, c, schedule, 0.0, "eps", backend="triton", uncond=u,
                                   guidance_scale=w, guidance_rescale=0.3, threshold_ratio=0.9, threshold_max=2.0)
        xi = x.clone()
        dk.ddpm_step(xi, t, t_prev, wide_c, schedule, "eps", "learned", noise=z, backend="triton", out=xi,
                     uncond=wide_u, guidance_scale=3.0, guidance_rescale=0.5)
        drawn = dk.ddpm_step(x, t, t_prev, c, schedule, backend="triton", uncond=u, guidance_scale=w)
        return a, x0, thresholded, xi, drawn

    eager = steps(x, c, u, wide_c, wide_u, z, w)
    compiled = torch.compile(steps, fullgraph=True)(x, c, u, wide_c, wide_u, z, w)
    for a, b in zip(eager[:3], compiled[:3]):
        torch.testing.assert_close(b, a, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(compiled[3], eager[3], rtol=0, atol=0)
    assert compiled[4].shape == x.shape and bool(compiled[4].isfinite().all())


def test_variance_ids_cover_the_options():
    assert set(VARIANCE_ID) == set(VARIANCE_TYPES)
    assert StepOptions("ddpm", guided=True, guidance_rescale=0.5).rescaled


# ------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_launches_and_no_host_sync(schedule):
    """A guided step is one kernel; with rescale, the statistics pass and the step: two. No host sync."""
    x, c, u, z = _guided_inputs(torch.float32, seed=20, variance_type="learned", shape=(8, 4, 32, 32))
    t = torch.randint(1, T, (8,), device="cuda")
    w = torch.linspace(0, 8, 8, device="cuda")
    calls = [
        (1, lambda: dk.ddim_step(x, t, t - 1, c[:, :4], schedule, 1.0, noise=z, backend="triton", uncond=u[:, :4],
                                 guidance_scale=w)),
        (1, lambda: dk.ddpm_step(x, t, t - 1, c, schedule, "v", "learned", backend="triton", uncond=u,
                                 guidance_scale=w)),
        (2, lambda: dk.ddpm_step(x, t, t - 1, torch.cat([u, c]), schedule, "eps", "learned", backend="triton",
                                 guidance_scale=w, guidance_rescale=0.7)),
        (2, lambda: dk.ddim_step(x, t, t - 1, c[:, :4], schedule, 0.0, backend="triton", out=x.clone(),
                                 uncond=u[:, :4], guidance_scale=4.0, guidance_rescale=0.7)),
    ]
    for launches, call in calls:
        kernels = [k for k in kernels_launched_without_sync(call) if "step_kernel" in k or "stats_kernel" in k]
        assert len(kernels) == launches, kernels


@pytest.mark.gpu
def test_cuda_graph_replay_reads_new_steps_and_scales(schedule):
    """A captured rescaled step reads t, t_prev and the scales from the captured tensors on every replay."""
    x, c, u, z = _guided_inputs(torch.float32, seed=21, shape=(4, 4, 16, 16))
    t = torch.full((4,), 999, device="cuda", dtype=torch.int64)
    t_prev = torch.full((4,), 979, device="cuda", dtype=torch.int64)
    w = torch.full((4,), 2.0, device="cuda")
    kw = dict(noise=z, uncond=u, guidance_scale=w, guidance_rescale=0.7)
    graph, out = capture_cuda_graph(lambda: dk.ddim_step(x, t, t_prev, c, schedule, 0.5, backend="triton", **kw))
    for step, scale in ((999, 2.0), (500, 7.5), (20, 0.0)):
        t.fill_(step)
        t_prev.fill_(step - 20)
        w.fill_(scale)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ddim_step_ref(x, t, t_prev, c, schedule, 0.5, **kw), rtol=1e-5, atol=1e-5)
