"""Triton flow-matching ops (``flow_interpolate``, ``flow_step``, ``flow_loss``) against the reference, on CPU
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU) or on a GPU.

What is Triton's own: sigma operands per sample, per token / frame and expanded (channels_last) as the kernels
index them; the step's in-kernel sigma gather (NaN for a bad step index), guidance and the two-pass rescale
(statistics partials merged in the step kernel, across launch configurations); in-kernel Philox noise (its
distribution, reproducibility from a generator state, the stream p_sample draws); in-place steps; opcheck of
the custom ops; torch.compile(fullgraph=True); fp64 gradcheck of the interpolant and the loss.

Tolerances are docs/design.md's "Tolerances" (tests/helpers.assert_matches). The loss is a float32 scalar for
16-bit data, computed in float32 by both sides from the same inputs: it is compared with the float64 reference
at the float32 tolerance.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import reference as R
from ddpm_kernels._spec import FlowStepOptions
from ddpm_kernels.flow import sigma_operand
from helpers import DTYPES, assert_compiles_like_eager, assert_standard_normal, triton_device

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import flow as tf  # noqa: E402
from ddpm_kernels.triton import guidance as tg  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)
ops = torch.ops.ddpm_kernels_triton
GRAD_TOL = {torch.float32: (1.3e-6, 1e-8), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-4),
            torch.float64: (1e-12, 1e-14)}

# (data shape, sigma shape, (period, repeat) the operand must take, memory format): per sample, per token of
# (B, L, C), per frame of (B, C, F, H, W), one sample of one element, channels_last per sample and per row (a
# varying dim that is not one block in NHWC storage: expanded to one sigma per element)
LAYOUTS = {
    "per_sample": ((3, 3, 5, 7), (3,), (1, 1), torch.contiguous_format),
    "tokens": ((2, 5, 3), (2, 5, 1), (5, 3), torch.contiguous_format),
    "frames": ((2, 3, 4, 3, 5), (2, 1, 4, 1, 1), (4, 15), torch.contiguous_format),
    "one_element": ((1,), (1,), (1, 1), torch.contiguous_format),
    "nhwc": ((2, 3, 5, 7), (2,), (1, 1), torch.channels_last),
    "nhwc_rows": ((2, 3, 5, 7), (2, 1, 5, 1), (105, 1), torch.channels_last),
}
# the same kinds, small: gradcheck perturbs every input element twice, each an interpreted launch on CPU
GRAD_LAYOUTS = {
    "per_sample": ((2, 5), (2,), (1, 1), torch.contiguous_format),
    "tokens": ((2, 3, 2), (2, 3, 1), (3, 2), torch.contiguous_format),
    "nhwc_rows": ((2, 2, 2, 3), (2, 1, 2, 1), (12, 1), torch.channels_last),
}


def _layout(layout):
    return GRAD_LAYOUTS[layout[5:]] if layout.startswith("grad_") else LAYOUTS[layout]


def _data(layout, n, dtype, seed):
    shape, _, _, fmt = _layout(layout)
    return [x.contiguous(memory_format=fmt) for x in make_inputs(shape, n, dtype, seed=seed)]


def _sigma(layout, seed, lo=0.05, hi=0.95):
    """Sigmas in [lo, hi] of the layout's sigma shape (float32: the public ops convert them)."""
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(_layout(layout)[1], generator=g)).to(DEVICE)


def _ref(op):
    def call(*args, **kwargs):
        return op(*args, backend="reference", **kwargs)

    return call


def test_sigma_operand_forms():
    """The layouts below exercise the kernels' per-token indexing in its block form and expanded."""
    for layout in [*LAYOUTS, *("grad_" + name for name in GRAD_LAYOUTS)]:
        shape, _, (period, repeat), fmt = _layout(layout)
        x = torch.zeros(shape, device=DEVICE).contiguous(memory_format=fmt)
        s = sigma_operand("sigma", _sigma(layout, 0), x)
        assert (s.period, s.repeat) == (period, repeat), layout


def test_registered_in_backend():
    import inspect

    for name in ("flow_interpolate", "flow_step", "flow_loss"):
        assert tk.BACKEND.ops[name].__module__ == "ddpm_kernels.triton.flow"
        assert inspect.signature(tk.BACKEND.ops[name]) == inspect.signature(R.OPS[name])
        assert tk.BACKEND.declines(name, FlowStepOptions(True, True, 0.5)) is None
    assert tk.BACKEND.differentiable["flow_interpolate"] == {"x0", "noise"}
    assert "flow_step" not in tk.BACKEND.differentiable


# ------------------------------------------------------------------------------------ flow_interpolate
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interpolate(dtype, layout):
    x0, noise = _data(layout, 2, dtype, seed=1)
    sigma = _sigma(layout, 1)
    got = dk.flow_interpolate(x0, noise, sigma, backend="triton")
    assert_matches(got, _ref(dk.flow_interpolate), (x0, noise, sigma), {}, dtype)
    assert got.stride() == x0.stride()


@pytest.mark.parametrize("layout", ["per_sample", "frames", "nhwc_rows"])
def test_interpolate_out_and_in_place(layout):
    x0, noise = _data(layout, 2, torch.float32, seed=2)
    sigma = _sigma(layout, 2)
    expected = dk.flow_interpolate(x0, noise, sigma, backend="reference")
    out = torch.empty_like(x0)
    assert dk.flow_interpolate(x0, noise, sigma, backend="triton", out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    contiguous_out = torch.empty(x0.shape, device=DEVICE)  # another format than the data's
    dk.flow_interpolate(x0, noise, sigma, backend="triton", out=contiguous_out)
    torch.testing.assert_close(contiguous_out, expected, rtol=1e-5, atol=1e-5)
    x = x0.clone()
    assert dk.flow_interpolate(x, noise, sigma, backend="triton", out=x) is x
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["per_sample", "tokens", "nhwc_rows"])
def test_interpolate_gradients(layout):
    """fp64 gradcheck w.r.t. x0 and noise, and fp32 gradients against the reference's autograd, including an
    incoming gradient in another memory format than the forward's (per-element sigmas are in its order)."""
    x0, noise = _data("grad_" + layout, 2, torch.float64, seed=3)
    sigma = _sigma("grad_" + layout, 3).double()
    x0.requires_grad_()
    noise.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dk.flow_interpolate(a, b, sigma, backend="triton"), (x0, noise))
    a, b = (t.detach().float().contiguous(memory_format=GRAD_LAYOUTS[layout][3]).requires_grad_()
            for t in (x0, noise))
    g = torch.randn(a.shape, dtype=torch.float32, device=DEVICE)  # contiguous, whatever the data's format
    got = torch.autograd.grad(dk.flow_interpolate(a, b, sigma.float(), backend="triton"), (a, b), g)
    ref = torch.autograd.grad(dk.flow_interpolate(a, b, sigma.float(), backend="reference"), (a, b), g)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=GRAD_TOL[torch.float32][0], atol=GRAD_TOL[torch.float32][1])


def test_interpolate_sigma_grad_falls_back():
    """A sigma that requires grad is differentiated by the reference (the kernels give no sigma gradient)."""
    x0, noise = make_inputs((2, 3), 2, torch.float64, seed=4)
    sigma = torch.tensor([0.3, 0.6], dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="sigma"):
        out = dk.flow_interpolate(x0, noise, sigma, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), sigma)
    torch.testing.assert_close(grad, (noise - x0).sum(1))


# ------------------------------------------------------------------------------------------- flow_step
STEP_OPTIONS = {
    "euler": {},
    "guided": dict(guidance_scale=4.5),
    "guided_rescale": dict(guidance_scale="per_sample", guidance_rescale=0.7),
    "stochastic": dict(stochastic=True),
    "stochastic_guided_rescale": dict(stochastic=True, guidance_scale=3.0, guidance_rescale=1.0),
}


def _step_kwargs(option, batch, uncond, noise):
    kw = dict(STEP_OPTIONS[option])
    if "guidance_scale" in kw:
        if kw["guidance_scale"] == "per_sample":
            kw["guidance_scale"] = torch.linspace(1.0, 7.5, batch, device=DEVICE)
        kw["uncond"] = uncond
    if kw.get("stochastic"):
        kw["noise"] = noise
    return kw


def _table(n=11):
    return torch.linspace(1.0, 0.0, n, device=DEVICE)


def _step_index(batch, n=11):
    """Per-sample steps covering the first and the last (sigma_next = 0)."""
    index = torch.arange(batch, device=DEVICE) * 3 % (n - 1)
    index[-1] = n - 2
    return index


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(STEP_OPTIONS))
def test_step_table(dtype, option):
    """Sigmas gathered in-kernel from the table by step_index."""
    x, c, u, z = _data("per_sample", 4, dtype, seed=5)
    sigmas, index = _table(), _step_index(x.shape[0])
    kw = _step_kwargs(option, x.shape[0], u, z)
    got = dk.flow_step(x, c, sigmas, index, backend="triton", **kw)
    assert_matches(got, _ref(dk.flow_step), (x, c, sigmas, index), kw, dtype)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "per_sample"])
@pytest.mark.parametrize("option", ["euler", "guided_rescale", "stochastic"])
def test_step_sigma_operands(layout, option):
    """Per-sample, per-token, per-frame and expanded sigma / sigma_next, each its own layout; the float16 run
    checks the rounding at the store."""
    for dtype in (torch.float32, torch.float16):
        x, c, u, z = _data(layout, 4, dtype, seed=6)
        sigma = _sigma(layout, 6, 0.5, 1.0)
        # sigma_next per sample while sigma is per token: the two operands index independently
        sigma_next = sigma * 0.8 if layout in ("one_element", "nhwc") else _sigma("per_sample", 7, 0.0, 0.4)[:2]
        kw = dict(_step_kwargs(option, x.shape[0], u, z), sigma=sigma, sigma_next=sigma_next)
        got = dk.flow_step(x, c, backend="triton", **kw)
        assert got.stride() == x.stride()
        if layout == "one_element" and "guidance_rescale" in kw:
            # the unbiased std of one element is NaN (0 / 0), as torch.std's
            assert bool(got.isnan().all())
            continue
        assert_matches(got, _ref(dk.flow_step), (x, c), kw, dtype)


def test_step_batched_cond_uncond():
    """A (2B, ...) [uncond; cond] model output is split into views (storage offsets), read in place."""
    x, = _data("nhwc", 1, torch.float32, seed=8)
    both = torch.cat(_data("nhwc", 2, torch.float32, seed=9)).contiguous(memory_format=torch.channels_last)
    sigmas, index = _table(), _step_index(2)
    kw = dict(guidance_scale=torch.tensor([2.0, 6.0], device=DEVICE), guidance_rescale=0.5)
    got = dk.flow_step(x, both, sigmas, index, backend="triton", **kw)
    torch.testing.assert_close(got, dk.flow_step(x, both, sigmas, index, backend="reference", **kw),
                               rtol=1e-5, atol=1e-5)


def test_step_bad_index_is_nan():
    """An index outside [0, len - 1) gives NaN for its sample only, never an out-of-bounds read (the public op
    rejects such indices on the CPU, so the kernel is called directly)."""
    x, c, z = make_inputs((5, 3, 4), 3, torch.float32, seed=10)
    sigmas = _table(6)
    index = torch.tensor([-1, 0, 5, 4, 2**40], device=DEVICE)
    for stochastic in (False, True):
        got = ops.flow_step(x, c, None, None, sigmas, sigmas, index, 1, 1, 1, 1, stochastic, 0.0, z, None, 0, 0, 0)
        expected = R.flow_step_ref(x, c, None, None, sigmas, index, None, None, FlowStepOptions(stochastic),
                                   noise=z)
        bad = torch.tensor([True, False, True, False, True], device=DEVICE)
        assert bool(got[bad].isnan().all()) and bool(got[~bad].isfinite().all())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("option", ["euler", "guided_rescale", "stochastic"])
def test_step_in_place(option):
    x, c, u, z = _data("nhwc", 4, torch.float32, seed=11)
    sigmas, index = _table(), _step_index(2)
    kw = _step_kwargs(option, 2, u, z)
    expected = dk.flow_step(x, c, sigmas, index, backend="reference", **kw)
    y = x.clone()
    assert dk.flow_step(y, c, sigmas, index, backend="triton", out=y, **kw) is y
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    other = torch.empty(x.shape, device=DEVICE)  # contiguous out for channels_last data
    assert dk.flow_step(x, c, sigmas, index, backend="triton", out=other, **kw) is other
    torch.testing.assert_close(other, expected, rtol=1e-5, atol=1e-5)


def test_step_non_contiguous_and_grad_inputs():
    """Strided data, model output and sigmas are read correctly; the step is sampling only: inputs that require
    grad run detached and ``out`` comes back itself."""
    x, c, u = (t[:, ::2] for t in make_inputs((3, 8, 5), 3, torch.float32, seed=24))
    sigma = torch.rand(3, 2, device=DEVICE)[:, 0]
    sigma_next = (sigma * 0.5).requires_grad_()
    kw = dict(sigma=sigma, sigma_next=sigma_next, guidance_scale=2.0, uncond=u, guidance_rescale=0.3)
    expected = dk.flow_step(x, c, backend="reference", **kw).detach()
    c = c.clone().requires_grad_()
    got = dk.flow_step(x, c, backend="triton", **kw)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = torch.empty(x.shape, device=DEVICE)
    assert dk.flow_step(x, c, backend="triton", out=out, **kw) is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_step_rescale_large_mean():
    """The rescale statistics stay accurate when a sample's mean is large against its spread (sums of x and x^2
    in float32 would lose every digit of the variance here): float32 against the float64 reference."""
    c, u = make_inputs((2, 4, 32), 2, torch.float64, seed=12)
    c, u = (1000.0 + 0.01 * c).float(), (1000.0 + 0.02 * u).float()
    x = torch.zeros_like(c)
    kw = dict(sigma=torch.ones(2, device=DEVICE), sigma_next=torch.zeros(2, device=DEVICE), guidance_scale=3.0,
              uncond=u, guidance_rescale=0.8)
    got = dk.flow_step(x, c, backend="triton", **kw).double()
    ref64 = dk.flow_step(x.double(), c.double(), backend="reference", **{**kw, "uncond": u.double()})
    torch.testing.assert_close(got, ref64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table, splits", [(((16, 1),), 3), (((16, 1),), 64), (((1024, 4),), 64)])
def test_step_rescale_launch_configs(monkeypatch, table, splits):
    """Rescale statistics over several tiles per split and several splits per sample (merged by the step
    kernel), and over one tile: the same result as the reference."""
    monkeypatch.setattr(tu, "LAUNCH_TABLE", table)
    monkeypatch.setattr(tg, "MAX_SPLITS", splits)
    x, c, u, z = make_inputs((3, 5, 41), 4, torch.float32, seed=13)
    n_splits, tiles_per_split = tg.stats_splits(205, 3, tu.launch_config(205, 3)[0])
    assert n_splits <= splits and (n_splits - 1) * tiles_per_split < math.ceil(205 / tu.launch_config(205, 3)[0])
    kw = dict(guidance_scale=torch.tensor([1.5, 4.0, 9.0], device=DEVICE), uncond=u, guidance_rescale=0.6,
              stochastic=True, noise=z)
    sigmas, index = _table(), _step_index(3)
    got = dk.flow_step(x, c, sigmas, index, backend="triton", **kw)
    torch.testing.assert_close(got, dk.flow_step(x, c, sigmas, index, backend="reference", **kw),
                               rtol=1e-5, atol=1e-5)


def test_batch_chunks_match_single_launch(monkeypatch):
    """Batches past the grid-y limit are launched in chunks; every chunk reads its own samples' sigmas and
    statistics."""
    x, c, u, z = make_inputs((5, 2, 9), 4, torch.float32, seed=14)
    sigmas, index = _table(), _step_index(5)
    kw = dict(guidance_scale=torch.linspace(1, 5, 5, device=DEVICE), uncond=u, guidance_rescale=0.5)
    whole = dk.flow_step(x, c, sigmas, index, backend="triton", **kw)
    sigma = _sigma("per_sample", 14)[:1].expand(5).contiguous() * torch.linspace(0.2, 1, 5, device=DEVICE)
    loss = dk.flow_loss(c, x, z, sigma, "cosmap", backend="triton")
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    assert len(tu.batch_chunks(5)) == 3
    torch.testing.assert_close(dk.flow_step(x, c, sigmas, index, backend="triton", **kw), whole, rtol=0, atol=0)
    torch.testing.assert_close(dk.flow_loss(c, x, z, sigma, "cosmap", backend="triton"), loss, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- in-kernel noise
def _drawn_noise(shape, generator=None, dtype=torch.float32):
    """z drawn by a stochastic step: zero sample and model output, sigma 0.5 -> sigma_next 1, so x' = z."""
    x = torch.zeros(shape, device=DEVICE, dtype=dtype)
    ones = torch.ones(shape[0], device=DEVICE)
    return dk.flow_step(x, x, sigma=ones * 0.5, sigma_next=ones, stochastic=True, generator=generator,
                        backend="triton")


def test_noise_is_standard_normal():
    z = _drawn_noise((4, 4096), torch.Generator(DEVICE).manual_seed(1234)).double().flatten()
    assert_standard_normal(z)


def test_noise_reproducible_from_generator_state():
    gen = torch.Generator(DEVICE).manual_seed(99)
    a = _drawn_noise((3, 7, 5), gen)
    b = _drawn_noise((3, 7, 5), gen)
    gen.manual_seed(99)
    torch.testing.assert_close(_drawn_noise((3, 7, 5), gen), a, rtol=0, atol=0)
    assert (a - b).abs().mean() > 0.5, "consecutive steps draw fresh noise"
    assert not torch.equal(a[0], a[1])
    torch.manual_seed(5)
    c = _drawn_noise((2, 33))
    torch.manual_seed(5)
    torch.testing.assert_close(_drawn_noise((2, 33)), c, rtol=0, atol=0)


def test_noise_is_p_sample_stream(monkeypatch):
    """The step draws the stream p_sample draws from the same generator state (one noise layout for the
    package), whatever the launch table."""
    schedule = dk.DiffusionSchedule(timesteps=1000).to(DEVICE)
    x = torch.zeros(3, 50, device=DEVICE)
    t = torch.full((3,), 500, device=DEVICE)
    gen = torch.Generator(DEVICE)
    p = dk.p_sample(x, t, x, schedule, "x0", False, generator=gen.manual_seed(3), backend="triton")
    z = p.double() / schedule.posterior_log_variance_clipped[500].double().mul(0.5).exp()
    monkeypatch.setattr(tu, "LAUNCH_TABLE", ((16, 1),))
    monkeypatch.setattr(tu, "MIN_PROGRAMS", 1)
    torch.testing.assert_close(_drawn_noise((3, 50), gen.manual_seed(3)).double(), z, rtol=1e-6, atol=1e-6)


def test_noise_in_place_same_as_out_of_place():
    x, c = make_inputs((2, 3, 17), 2, torch.float32, seed=15)
    sigmas, index = _table(), _step_index(2)
    gen = torch.Generator(DEVICE)
    a = dk.flow_step(x, c, sigmas, index, generator=gen.manual_seed(8), stochastic=True, backend="triton")
    y = x.clone()
    dk.flow_step(y, c, sigmas, index, generator=gen.manual_seed(8), stochastic=True, backend="triton", out=y)
    torch.testing.assert_close(y, a, rtol=0, atol=0)


def test_deterministic_step_leaves_generator_alone():
    x, c = make_inputs((2, 8), 2, torch.float32, seed=16)
    gen = torch.Generator(DEVICE).manual_seed(1)
    state = gen.get_state()
    dk.flow_step(x, c, _table(), _step_index(2), generator=gen, backend="triton")
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_noise_other_dtypes(dtype):
    z = _drawn_noise((2, 2048), torch.Generator(DEVICE).manual_seed(11), dtype=dtype).double()
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05


# ------------------------------------------------------------------------------------------- flow_loss
def _assert_loss(got, ref_fn, args, dtype):
    """Both compute in float32 (float64 for float64) from the same inputs; the 16-bit inputs are exact in
    float64, so the float64 reference is the truth the float32 sum approximates."""
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == ()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close(got.double(), ref_fn(*args64).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss(dtype, weighting, loss_type):
    for layout in ("per_sample", "frames"):
        mo, x0, noise = _data(layout, 3, dtype, seed=17)
        sigma = _sigma(layout, 17)
        got = dk.flow_loss(mo, x0, noise, sigma, weighting, loss_type, backend="triton")
        _assert_loss(got, _ref(dk.flow_loss), (mo, x0, noise, sigma, weighting, loss_type), dtype)
        m = mo.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(dk.flow_loss(m, x0, noise, sigma, weighting, loss_type, backend="triton"), m)
        (expected,) = torch.autograd.grad(dk.flow_loss(m, x0, noise, sigma, weighting, loss_type,
                                                       backend="reference"), m)
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", ["tokens", "nhwc", "nhwc_rows", "one_element"])
def test_loss_layouts(layout):
    mo, x0, noise = _data(layout, 3, torch.float32, seed=18)
    sigma = _sigma(layout, 18)
    for weighting in ("none", "cosmap", "sigma_sqrt"):
        got = dk.flow_loss(mo, x0, noise, sigma, weighting, backend="triton")
        _assert_loss(got, _ref(dk.flow_loss), (mo, x0, noise, sigma, weighting, "l2"), torch.float32)


def test_loss_reduction_loops(monkeypatch):
    """More samples than one reduction step holds, and more tiles per sample than one step reads."""
    monkeypatch.setattr(tf, "REDUCE_BLOCK_P", 2)
    monkeypatch.setattr(tu, "LAUNCH_TABLE", ((16, 1),))
    mo, x0, noise = make_inputs((37, 3, 23), 3, torch.float32, seed=19)
    sigma = _sigma("per_sample", 19)[:1] * torch.linspace(0.1, 1, 37, device=DEVICE)
    got = dk.flow_loss(mo, x0, noise, sigma, "sigma_sqrt", backend="triton")
    _assert_loss(got, _ref(dk.flow_loss), (mo, x0, noise, sigma, "sigma_sqrt", "l2"), torch.float32)


@pytest.mark.parametrize("weighting, loss_type", [("none", "l2"), ("sigma_sqrt", "l1"), ("cosmap", "l2")])
@pytest.mark.parametrize("layout", ["per_sample", "tokens", "nhwc_rows"])
def test_loss_gradcheck(weighting, loss_type, layout):
    """fp64 gradcheck w.r.t. model_output, x0 and noise (the backend differentiates all three)."""
    mo, x0, noise = (t.requires_grad_() for t in _data("grad_" + layout, 3, torch.float64, seed=20))
    sigma = _sigma("grad_" + layout, 20).double()

    def loss(m, a, b):
        return dk.flow_loss(m, a, b, sigma, weighting, loss_type, backend="triton")

    assert torch.autograd.gradcheck(loss, (mo, x0, noise))
    # a loss that is one term of a larger graph: the incoming gradient is read from memory
    got = torch.autograd.grad(3.0 * loss(mo, x0, noise), (mo, x0, noise))
    ref = torch.autograd.grad(3.0 * dk.flow_loss(mo, x0, noise, sigma, weighting, loss_type, backend="reference"),
                              (mo, x0, noise))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases(dtype):
    x, c, u, z = make_inputs((2, 3, 5), 4, dtype, seed=21)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor([0.3, 0.8], dtype=cd, device=DEVICE)
    per_token = torch.rand(2 * 3, dtype=cd, device=DEVICE)
    sigmas = torch.linspace(1, 0, 7, dtype=cd, device=DEVICE)
    index = torch.tensor([0, 5], device=DEVICE)
    w = torch.tensor([2.0, 5.0], dtype=cd, device=DEVICE)
    key = torch.tensor([123456789], device=DEVICE)
    return [
        (ops.flow_interpolate, (x, z, s, 1, 1)),
        (ops.flow_interpolate, (x, z, per_token, 3, 5)),
        (ops.flow_interpolate_out, (x, z, per_token, 3, 5, torch.empty_like(x))),
        (ops.flow_interpolate_backward, (c, per_token, 3, 5)),
        (ops.flow_step, (x, c, None, None, sigmas, sigmas, index, 1, 1, 1, 1, False, 0.0, None, None, 0, 0, 0)),
        (ops.flow_step, (x, c, u, w, s, per_token, None, 1, 1, 3, 5, True, 0.7, z, None, 0, 0, 0)),
        (ops.flow_step, (x, c, u, w, sigmas, sigmas, index, 1, 1, 1, 1, True, 0.0, None, key, 0, 0, 0)),
        (ops.flow_step, (x, c, None, None, s, s, None, 1, 1, 1, 1, True, 0.0, None, None, 2**62 + 3, 4 * 17, 9)),
        (ops.flow_step_out, (x, c, u, w, sigmas, sigmas, index, 1, 1, 1, 1, False, 0.5, None, None, 0, 0, 0,
                             torch.empty_like(x))),
        (ops.flow_loss, (c, x, z, s, 1, 1, 2, False)),
        (ops.flow_loss, (c, x, z, per_token, 3, 5, 1, True)),
        (ops.flow_loss_backward, (torch.tensor(2.0, dtype=cd, device=DEVICE), c, x, z, per_token, 3, 5, 2, False,
                                  True, True)),
        (ops.flow_loss_backward, (torch.tensor(0.5, dtype=cd, device=DEVICE), c, x, z, s, 1, 1, 0, True,
                                  False, False)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    for op, args in _opcheck_cases(dtype):
        torch.library.opcheck(op, args)


def test_opcheck_autograd():
    """The differentiable ops' autograd registrations, with inputs that require grad."""
    x, c, z = (t.requires_grad_() for t in make_inputs((2, 3, 5), 3, torch.float64, seed=22))
    s = torch.tensor([0.3, 0.8], dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ops.flow_interpolate, (x, z, s, 1, 1))
    torch.library.opcheck(ops.flow_loss, (c, x, z, s, 1, 1, 2, False))


def test_torch_compile():
    """The public ops compile with fullgraph=True and match eager (in-place steps exactly); the loss's
    backward runs through the compiled graph."""
    x, c, u, z = make_inputs((2, 3, 4, 4), 4, torch.float32, seed=23)
    sigmas, index = _table(), _step_index(2)
    per_frame = torch.rand(2, 1, 4, 1, device=DEVICE)

    def run(x, c, u, z):
        a = dk.flow_interpolate(x, z, per_frame, backend="triton")
        b = dk.flow_step(x, c, sigmas, index, backend="triton", guidance_scale=3.0, uncond=u, guidance_rescale=0.7)
        d = dk.flow_step(x, c, sigma=per_frame, sigma_next=per_frame * 0.5, stochastic=True, noise=z,
                         backend="triton")
        y = x.clone()
        dk.flow_step(y, c, sigmas, index, backend="triton", out=y)
        drawn = dk.flow_step(x, c, sigmas, index, stochastic=True, backend="triton")
        loss = dk.flow_loss(c, x, z, per_frame, "cosmap", backend="triton")
        return a, b, d, y, loss, drawn

    assert_compiles_like_eager(run, (x, c, u, z), exact=(3,), drawn=5)

    def loss_grad(m):
        return dk.flow_loss(m, x, z, per_frame, "sigma_sqrt", "l1", backend="triton")

    m = c.clone().requires_grad_()
    (eager_grad,) = torch.autograd.grad(loss_grad(m), m)
    (compiled_grad,) = torch.autograd.grad(torch.compile(loss_grad, fullgraph=True)(m), m)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1.3e-6, atol=1e-6)
