"""Triton ``ddim_step``, ``ddpm_step`` and ``dynamic_threshold`` against the reference, on CPU through Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1 when there is no GPU) or on a GPU when one is present; GPU-only checks
(CUDA-graph replay, launch counts, eager generator state) are marked ``gpu``.

Tolerances follow DESIGN.md, as in tests/test_triton.py: float32 against the float32 reference at
rtol=atol=1e-5; float64 at 1e-12; float16/bfloat16 against the float64 reference with an error at most twice the
reference's own error in that dtype plus one ulp (plus one bfloat16 ulp under the interpreter, which truncates
float32 -> bfloat16 where a GPU rounds), and within 2e-3 (fp16) / 1.6e-2 (bf16) relative.

With ``threshold_ratio`` a step is an x0 pass, a per-sample sort (the reference's quantile) and the step kernel;
``dynamic_threshold`` is the same sort and one elementwise kernel.

The checks every fused backend shares (tables of dtype x shape x options, out=, strides, noise) are in
tests/sampler_cases.py; this module runs them on Triton and adds Triton's own.
"""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import reference as R
from ddpm_kernels._spec import StepOptions
from helpers import (DTYPES, capture_cuda_graph, ddim_step_ref, ddpm_step_ref, kernels_launched_without_sync,
                     triton_device)
from sampler_cases import PARAMETERIZATIONS, T, SamplerStepCases, learned_output, make_steps, replay_new_steps

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import noise as tn  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402
from ddpm_kernels.triton.sampler_step import SAMPLERS  # noqa: E402

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).to(DEVICE)


@pytest.fixture(scope="module")
def backend():
    return "triton"


@pytest.fixture(scope="module")
def device():
    return DEVICE


@pytest.fixture(scope="module")
def backend_ops():
    return tk.BACKEND.ops


class TestSamplerSteps(SamplerStepCases):
    """The checks shared with the C++/CUDA kernels (tests/sampler_cases.py), on the Triton kernels."""

    BF16_TRUNCATES = tu.INTERPRETED


def test_batch_chunks_match_single_launch(schedule, monkeypatch):
    x, y, z = make_inputs((5, 2, 9), 3, torch.float32, seed=9)
    t, t_prev = make_steps(5, DEVICE, seed=9)

    def run():
        return [
            tk.BACKEND.ops["ddim_step"](x, t, t_prev, y, schedule,
                                        StepOptions("ddim", "v", eta=0.5, clip_denoised=True), None,
                                        torch.Generator(DEVICE).manual_seed(3)),
            tk.BACKEND.ops["ddpm_step"](x, t, t_prev, torch.cat([y, z], 1), schedule,
                                        StepOptions("ddpm", "eps", "learned", clip_denoised=True), None,
                                        torch.Generator(DEVICE).manual_seed(4)),
        ]

    single = run()
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    chunked = run()
    for a, b in zip(single, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ thresholding
THRESHOLD_OPTIONS = {
    "ratio0.9_max2.5": dict(threshold_ratio=0.9, threshold_max=2.5),
    "ratio0.995_max1_clipped_output": dict(threshold_ratio=0.995, threshold_max=1.0, use_clipped_model_output=True),
    "ratio1_max3": dict(threshold_ratio=1.0, threshold_max=3.0),
}


@pytest.mark.parametrize("options", list(THRESHOLD_OPTIONS))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholded_steps(schedule, dtype, parameterization, options):
    """threshold_ratio: an x0 pass, a per-sample sort for the scale, then the step kernel applying it."""
    x_t, model_output, noise = make_inputs((3, 2, 5, 3), 3, dtype, seed=10, scale=2.0)
    t, t_prev = make_steps(3, DEVICE, seed=10)
    o = dict(THRESHOLD_OPTIONS[options])
    kw = dict(noise=noise, return_pred_x0=True, threshold_ratio=o["threshold_ratio"],
              threshold_max=o["threshold_max"])
    clipped = o.get("use_clipped_model_output", False)
    got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, parameterization, True, backend="triton",
                       use_clipped_model_output=clipped, **kw)
    assert_matches(got, ddim_step_ref, (x_t, t, t_prev, model_output, schedule, 1.0, parameterization, True),
                   dict(use_clipped_model_output=clipped, **kw), dtype)
    wide = learned_output((3, 2, 5, 3), dtype, DEVICE, "learned_range", seed=10)
    got = dk.ddpm_step(x_t, t, t_prev, wide, schedule, parameterization, "learned_range", backend="triton", **kw)
    assert_matches(got, ddpm_step_ref, (x_t, t, t_prev, wide, schedule, parameterization, "learned_range"), kw,
                   dtype)


@pytest.mark.parametrize("shape", [(1,), (3, 4, 5, 7), (2, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_threshold(dtype, shape):
    (x0,) = make_inputs(shape, 1, dtype, seed=16, scale=2.0)
    for ratio, max_value in ((0.995, 1.0), (0.9, 2.5), (0.0, 10.0), (1.0, 1.5)):
        got = dk.dynamic_threshold(x0, ratio, max_value, backend="triton")
        assert_matches(got, R.dynamic_threshold_ref, (x0, ratio, max_value), {}, dtype)


def test_dynamic_threshold_nan_sample():
    (x0,) = make_inputs((3, 40), 1, torch.float32, seed=17, scale=2.0)
    x0[1, 7] = float("nan")
    got = dk.dynamic_threshold(x0, 0.9, 2.0, backend="triton")
    assert bool(got[1].isnan().all()) and bool(got[[0, 2]].isfinite().all())
    torch.testing.assert_close(got, R.dynamic_threshold_ref(x0, 0.9, 2.0), equal_nan=True)


# ------------------------------------------------------------------------------ torch.library / compile
UNGUIDED = (None, None, None, 0.0)  # uncond, guidance, stats, guidance_rescale


def _opcheck_cases(schedule, dtype):
    x, y, z = make_inputs((2, 3, 5), 3, dtype, seed=14)
    t, t_prev = make_steps(2, DEVICE, seed=14)
    ab = schedule.coefficients64[1]
    wide = torch.cat([y, z], 1)
    seed = tn.draw_seed(None, x.device)
    scale = torch.tensor([1.0, 1.7], dtype=R.compute_dtype(dtype), device=DEVICE)
    ops = torch.ops.ddpm_kernels_triton
    ddim, ddpm = SAMPLERS["ddim"][0], SAMPLERS["ddpm"][0]
    # (x_t, t, t_prev, model_output, alphas_cumprod, sampler, parameterization, variance, eta, clip_denoised,
    #  clip_range, set_alpha_to_one, use_clipped_model_output, add_noise, noise, seed, philox_seed,
    #  philox_offset, sample_offset, return_pred_x0, scale, uncond, guidance, stats, guidance_rescale); guided cases are in
    # tests/test_triton_guidance.py
    return [
        (ops.sampler_step, (x, t, t_prev, y, ab, ddim, 0, 0, 0.0, False, 1.0, True, False, False, None, None, 0, 0, 0,
                            False, None) + UNGUIDED),
        (ops.sampler_step, (x, t, t_prev, y, ab, ddim, 2, 0, 1.0, True, 1.5, False, True, True, z, None, 0, 0, 0,
                            True, None) + UNGUIDED),
        (ops.sampler_step, (x, t, t_prev, y, ab, ddim, 1, 0, 0.5, True, 1.0, True, False, True, None, seed, 0, 0, 0,
                            True, scale) + UNGUIDED),
        (ops.sampler_step_out, (x, t, t_prev, y, ab, ddim, 0, 0, 0.5, True, 1.0, True, False, True, None, None,
                                2**62 + 3, 68, 0, True, None) + UNGUIDED + (torch.empty_like(x),)),
        (ops.sampler_step_x0, (x, t, t_prev, y, ab, 2, 0) + UNGUIDED),
        (ops.sampler_step, (x, t, t_prev, y, ab, ddpm, 0, 0, 0.0, True, 1.0, True, False, True, z, None, 0, 0, 0,
                            True, None) + UNGUIDED),
        (ops.sampler_step, (x, t, t_prev, wide, ab, ddpm, 2, 3, 0.0, False, 1.0, True, False, True, None, seed, 0,
                            0, 0, False, scale) + UNGUIDED),
        (ops.sampler_step_out, (x, t, t_prev, wide, ab, ddpm, 1, 2, 0.0, True, 2.0, True, False, True, z, None, 0,
                                0, 0, False, None) + UNGUIDED + (torch.empty_like(x),)),
        (ops.sampler_step_x0, (x, t, t_prev, wide, ab, 0, 2) + UNGUIDED),
        (ops.dynamic_threshold_apply, (x, scale)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(schedule, dtype):
    for op, args in _opcheck_cases(schedule, dtype):
        torch.library.opcheck(op, args)


def test_torch_compile_steps(schedule):
    """DDIM and DDPM steps (given noise, in-kernel noise, in place) compile with fullgraph=True and match
    eager."""
    x_t, model_output, noise = make_inputs((2, 3, 4, 4), 3, torch.float32, seed=15)
    wide = torch.cat([model_output, -noise.abs()], 1)
    t, t_prev = make_steps(2, DEVICE, seed=15)

    def steps(x_t, t, t_prev, model_output, wide, noise):
        a, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.5, "v", True, noise=noise,
                             backend="triton", return_pred_x0=True)
        b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "eps", "learned", noise=noise, backend="triton")
        drawn = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, backend="triton")
        x = x_t.clone()
        dk.ddpm_step(x, t, t_prev, model_output, schedule, noise=noise, backend="triton", out=x)
        thresholded = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, "eps", backend="triton",
                                   threshold_ratio=0.9, threshold_max=2.0)
        scaled = dk.dynamic_threshold(model_output, 0.8, 1.5, backend="triton")
        return a, x0, b, x, thresholded, scaled, drawn

    eager = steps(x_t, t, t_prev, model_output, wide, noise)
    compiled = torch.compile(steps, fullgraph=True)(x_t, t, t_prev, model_output, wide, noise)
    for a, b in zip(eager[:6], compiled[:6]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled[6].shape == x_t.shape and bool(compiled[6].isfinite().all())


def test_registered_in_backend():
    """Both sampler steps are the one sampler-step entry, with the reference's signature (StepOptions)."""
    assert tk.BACKEND.ops["ddim_step"].__module__ == "ddpm_kernels.triton.sampler_step"
    assert tk.BACKEND.ops["ddpm_step"].__module__ == "ddpm_kernels.triton.sampler_step"
    assert tk.BACKEND.ops["dynamic_threshold"].__module__ == "ddpm_kernels.triton.threshold"
    for name in ("ddim_step", "ddpm_step", "dynamic_threshold"):
        assert inspect.signature(tk.BACKEND.ops[name]) == inspect.signature(R.OPS[name])


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_cuda_graph_replay_thresholded_step(schedule):
    """The thresholded step (x0 pass, per-sample sort, step kernel) reads t and t_prev from the captured
    tensors too."""
    x_t, model_output = make_inputs((4, 4, 16, 16), 2, torch.float32, seed=20)
    t = torch.full((4,), 999, device="cuda", dtype=torch.int64)
    t_prev = torch.full((4,), 979, device="cuda", dtype=torch.int64)
    graph, out = capture_cuda_graph(
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, "eps", backend="triton",
                             threshold_ratio=0.9, threshold_max=3.0))
    for _ in replay_new_steps(graph, t, t_prev):
        torch.testing.assert_close(
            out, ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.0, "eps", threshold_ratio=0.9,
                                 threshold_max=3.0),
            rtol=1e-5, atol=1e-5,
        )


@pytest.mark.gpu
def test_cuda_graph_in_kernel_noise_fresh_each_replay(schedule):
    zeros = torch.zeros(2, 4, 64, 64, device="cuda")
    t = torch.full((2,), 500, device="cuda", dtype=torch.int64)
    graph, out = capture_cuda_graph(
        lambda: dk.ddpm_step(zeros, t, t - 20, zeros, schedule, "x0", "fixed_large", False, backend="triton"))
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.gpu
def test_one_launch_per_step_and_generator_state(schedule):
    """Each step is one kernel with given or in-kernel noise (eager: the generator's Philox state as kernel
    arguments), with learned variances and return_pred_x0; no host sync."""
    x_t, model_output, noise = make_inputs((16, 4, 32, 32), 3, torch.float32, seed=21)
    wide = torch.cat([model_output, -noise.abs()], 1)
    t = torch.randint(1, T, (16,), device="cuda")
    t_prev = t - 1
    out = torch.empty_like(x_t)
    calls = [
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, noise=noise, backend="triton"),
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, backend="triton", return_pred_x0=True),
        lambda: dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, backend="triton", out=out),
        lambda: dk.ddpm_step(x_t, t, t_prev, model_output, schedule, noise=noise, backend="triton"),
        lambda: dk.ddpm_step(x_t, t, t_prev, wide, schedule, "v", "learned", backend="triton"),
    ]
    for call in calls:
        kernels = kernels_launched_without_sync(call)
        assert len(kernels) == 1 and "step_kernel" in kernels[0], kernels
    gen = torch.Generator("cuda").manual_seed(21)
    a = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend="triton")
    assert gen.get_offset() == 4 * 16 * (4 * 32 * 32 // 4)
    gen.manual_seed(21)
    torch.testing.assert_close(a, dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen,
                                               backend="triton"), rtol=0, atol=0)
