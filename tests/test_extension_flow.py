"""What is specific to the compiled backends' flow-matching kernels (csrc/flow.h, csrc/cpu/flow.cpp,
csrc/cuda/flow.cu): their operators under opcheck (functional, out= and backward forms), fp64 gradcheck through
the C++ autograd kernels, torch.compile(fullgraph=True) with the operators in the graph, the sigma operand's
layouts (per sample, per token (B, L, 1) of (B, L, C), per frame (B, 1, F, 1, 1) of (B, C, F, H, W),
channels_last), an out-of-range step index (NaN, no read outside the table), in-place steps, the guidance
rescale's reduction and the in-kernel noise stream.

Values are compared with ``ddpm_kernels.reference`` through the public ops (docs/design.md, "Tolerances").
"""

import pytest
import torch

import ddpm_kernels as dk
from helpers import DEVICES, DTYPES, assert_matches, compiled_family, device_backend, make_inputs, ulp

extension, pytestmark = compiled_family("flow_step", "with the flow-matching kernels")


def _sigmas(shape, layout, generator, device, lo=0.05, hi=0.95):
    """A sigma of the given layout for data of `shape`: "sample" (B,), "token" (B, L, 1) of (B, L, C),
    "frame" (B, 1, F, 1, 1) of (B, C, F, H, W), "channel" (B, C, 1, 1) of (B, C, H, W)."""
    B = shape[0]
    sig_shape = {
        "sample": (B,),
        "token": (B, shape[1], 1),
        "frame": (B, 1, shape[2], 1, 1) if len(shape) == 5 else None,
        "channel": (B, shape[1]) + (1,) * (len(shape) - 2),
    }[layout]
    return (lo + (hi - lo) * torch.rand(sig_shape, generator=generator, dtype=torch.float64)).to(device)


# (shape, sigma layout, memory format)
LAYOUTS = [
    ((3, 5, 7), "sample", torch.contiguous_format),
    ((2, 1), "sample", torch.contiguous_format),
    ((3, 17, 40), "token", torch.contiguous_format),  # (B, L, C) tokens, sigma (B, L, 1)
    ((2, 6, 3), "token", torch.contiguous_format),  # C smaller than a vector: lanes of several tokens
    ((2, 3, 4, 5, 6), "frame", torch.contiguous_format),  # (B, C, F, H, W) video, sigma (B, 1, F, 1, 1)
    ((2, 3, 4, 5, 6), "frame", torch.channels_last_3d),
    ((2, 3, 9, 11), "sample", torch.channels_last),
    ((2, 3, 9, 11), "channel", torch.channels_last),  # per-channel sigma of NHWC data: one sigma per element
    ((2, 3, 9, 11), "channel", torch.contiguous_format),
]


def _data(shape, n, dtype, fmt, device, seed=0, scale=1.0):
    return [x.contiguous(memory_format=fmt) for x in make_inputs(shape, n, dtype, seed=seed, scale=scale,
                                                                  device=device)]


def _ids(layouts):
    return [f"{'x'.join(map(str, s))}-{lay}-{str(f).split('.')[-1]}" for s, lay, f in layouts]


# --------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout,fmt", LAYOUTS, ids=_ids(LAYOUTS))
def test_interpolate_matches_reference(device, dtype, shape, layout, fmt):
    backend = device_backend(device)
    g = torch.Generator().manual_seed(1)
    x0, noise = _data(shape, 2, dtype, fmt, device)
    sigma = _sigmas(shape, layout, g, device)
    got = dk.flow_interpolate(x0, noise, sigma, backend=backend)
    assert got.is_contiguous(memory_format=fmt)
    assert_matches(got, dk.flow_interpolate, (x0, noise, sigma), {"backend": "reference"}, dtype)


def _step_kwargs(shape, layout, dtype, fmt, device, guided, rescale, stochastic, table, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    B = shape[0]
    sample, cond, uncond, noise = _data(shape, 4, dtype, fmt, device, seed=seed)
    kwargs = {"stochastic": stochastic}
    if table:
        sigmas = torch.linspace(1.0, 0.0, 11, dtype=torch.float64).to(device)
        step_index = torch.randint(0, 10, (B,), generator=g)
        step_index[0] = 0
        kwargs.update(sigmas=sigmas, step_index=step_index.to(device))
    else:
        kwargs.update(sigma=_sigmas(shape, layout, g, device, 0.5, 0.95),
                      sigma_next=_sigmas(shape, layout, g, device, 0.05, 0.45))
    if guided:
        kwargs.update(guidance_scale=(1 + 6 * torch.rand(B, generator=g, dtype=torch.float64)).to(device),
                      uncond=uncond, guidance_rescale=rescale)
    if stochastic:
        kwargs.update(noise=noise)
    return sample, cond, kwargs


STEP_OPTIONS = [
    # guided, guidance_rescale, stochastic, table
    (False, 0.0, False, True),
    (True, 0.0, False, True),
    (True, 0.7, False, True),
    (True, 0.7, True, True),
    (False, 0.0, True, True),
    (False, 0.0, False, False),
    (True, 0.0, True, False),
    (True, 1.0, False, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guided,rescale,stochastic,table", STEP_OPTIONS)
@pytest.mark.parametrize("shape,layout,fmt", LAYOUTS, ids=_ids(LAYOUTS))
def test_step_matches_reference(device, dtype, guided, rescale, stochastic, table, shape, layout, fmt):
    backend = device_backend(device)
    if table and layout != "sample":
        pytest.skip("the table form gives one sigma per sample")
    if rescale and shape[1:] == (1,):
        pytest.skip("the std of one element is NaN")
    sample, cond, kwargs = _step_kwargs(shape, layout, dtype, fmt, device, guided, rescale, stochastic, table)
    got = dk.flow_step(sample, cond, backend=backend, **kwargs)
    assert got.is_contiguous(memory_format=fmt)
    assert_matches(got, dk.flow_step, (sample, cond), dict(kwargs, backend="reference"), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("shape,layout,fmt", LAYOUTS[:1] + LAYOUTS[2:6] + LAYOUTS[7:8], ids=_ids(LAYOUTS[:1] + LAYOUTS[2:6] + LAYOUTS[7:8]))
def test_loss_and_gradient_match_reference(device, dtype, weighting, loss_type, shape, layout, fmt):
    backend = device_backend(device)
    g = torch.Generator().manual_seed(3)
    mo, x0, noise = _data(shape, 3, dtype, fmt, device)
    sigma = _sigmas(shape, layout, g, device)

    def run(backend, *tensors):
        leaf = tensors[0].detach().clone().requires_grad_()
        loss = dk.flow_loss(leaf, *tensors[1:], sigma, weighting, loss_type, backend=backend)
        (loss * 3).backward()
        return loss.detach(), leaf.grad

    loss, grad = run(backend, mo, x0, noise)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.is_contiguous(memory_format=fmt)
    if dtype in (torch.float32, torch.float64):
        ref_loss, ref_grad = run("reference", mo, x0, noise)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, ref_grad, rtol=1.3e-6 if dtype == torch.float32 else 1e-12, atol=1e-8)
        return
    # float16/bfloat16 inputs: the loss is float32 math on exact inputs, so it is within float32 summation error
    # of the float64 loss; the gradient within one ulp of the dtype (subnormal ones included) of the float64 one
    ref_loss, ref_grad = run("reference", *(t.to(torch.float64) for t in (mo, x0, noise)))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert bool(((grad.double() - ref_grad).abs() <= ulp(ref_grad, dtype)).all())


# --------------------------------------------------------------------------------- step edge cases
def _raw_step(sample, model_output, sigmas, step_index, stochastic=False, noise=None, generator=None):
    return torch.ops.ddpm_kernels.flow_step(sample, model_output, None, None, sigmas, step_index, None, 1, 1,
                                            None, 1, 1, stochastic, 0.0, noise, generator, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_step_index_out_of_range_gives_nan(device):
    """The public op refuses a CPU step index out of range; the kernels themselves give NaN for that sample and
    never read outside the table, whatever the index."""
    device_backend(device)
    sample, cond = make_inputs((5, 3, 33), 2, torch.float32, device=device)
    sigmas = torch.linspace(1, 0, 5, device=device)
    step_index = torch.tensor([0, -1, 4, 3, 2**62], device=device)
    got = _raw_step(sample, cond, sigmas, step_index)
    assert bool(got[[1, 2, 4]].isnan().all())
    assert bool(got[[0, 3]].isfinite().all())
    good = step_index.clamp(0, 3)
    expected = dk.flow_step(sample, cond, sigmas, good, backend="reference")
    torch.testing.assert_close(got[[0, 3]], expected[[0, 3]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="step_index"):
        dk.flow_step(sample.cpu(), cond.cpu(), sigmas.cpu(), step_index.cpu(), backend="cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_step_in_place(device, fmt):
    backend = device_backend(device)
    sample, cond, kwargs = _step_kwargs((2, 3, 8, 9), "sample", torch.float32, fmt, device, True, 0.5, True, True)
    expected = dk.flow_step(sample, cond, backend=backend, **kwargs)
    x = sample.clone()
    assert dk.flow_step(x, cond, backend=backend, out=x, **kwargs) is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    # an out of another layout is written through a copy
    out = torch.empty_like(sample, memory_format=torch.contiguous_format if fmt != torch.contiguous_format
                           else torch.channels_last)
    assert dk.flow_step(sample, cond, backend=backend, out=out, **kwargs) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_in_place_and_out(device):
    backend = device_backend(device)
    x0, noise = make_inputs((3, 4, 17), 2, torch.float32, device=device)
    sigma = torch.rand(3, 4, 1, device=device)
    expected = dk.flow_interpolate(x0, noise, sigma, backend="reference")
    out = torch.empty_like(x0)
    assert dk.flow_interpolate(x0, noise, sigma, backend=backend, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    x = x0.clone()
    assert dk.flow_interpolate(x, noise, sigma, backend=backend, out=x) is x
    torch.testing.assert_close(x, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_guidance_from_a_batched_output(device):
    """A (2B, ...) model output is [uncond; cond]: the same step as uncond= given separately."""
    backend = device_backend(device)
    sample, cond, uncond = make_inputs((3, 4, 20), 3, torch.float32, device=device)
    sigmas = torch.linspace(1, 0, 8, device=device)
    step_index = torch.tensor([0, 3, 6], device=device)
    batched = torch.cat([uncond, cond])
    a = dk.flow_step(sample, batched, sigmas, step_index, guidance_scale=4.5, guidance_rescale=0.3, backend=backend)
    b = dk.flow_step(sample, cond, sigmas, step_index, guidance_scale=4.5, uncond=uncond, guidance_rescale=0.3,
                     backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_guidance_rescale_with_a_large_mean(device):
    """The per-sample std of the rescale is taken around a shift, not from raw sums of squares: a mean a
    thousand times the spread still gives the reference's factor."""
    backend = device_backend(device)
    shape = (2, 4, 64, 64)
    sample, cond, uncond = make_inputs(shape, 3, torch.float64, device=device)
    cond, uncond = cond * 0.01 + 30.0, uncond * 0.01 + 30.0
    sample, cond, uncond = (t.float() for t in (sample, cond, uncond))
    kwargs = dict(sigma=torch.full((2,), 0.6, device=device), sigma_next=torch.full((2,), 0.4, device=device),
                  guidance_scale=5.0, uncond=uncond, guidance_rescale=1.0)
    got = dk.flow_step(sample, cond, backend=backend, **kwargs)
    expected = dk.flow_step(*(t.double() for t in (sample, cond)), backend="reference",
                            **dict(kwargs, uncond=uncond.double()))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ noise
def _pure_noise(shape, device, generator):
    """z from a stochastic step that returns it: x = 0, v = 0, sigma = 0, sigma_next = 1."""
    B = shape[0]
    zeros = torch.zeros(shape, device=device)
    return dk.flow_step(zeros, zeros, sigma=torch.zeros(B, device=device), sigma_next=torch.ones(B, device=device),
                        stochastic=True, generator=generator, backend=device)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_reproducible_from_generator_state(device):
    device_backend(device)
    shape = (3, 4, 33, 17)
    g = torch.Generator(device).manual_seed(11)
    a = _pure_noise(shape, device, g)
    b = _pure_noise(shape, device, g)
    g.manual_seed(11)
    a2 = _pure_noise(shape, device, g)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b)  # the generator advanced
    for z in (a, b):
        assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    # the default generator
    torch.manual_seed(5) if device == "cpu" else torch.cuda.manual_seed(5)
    c = _pure_noise(shape, device, None)
    torch.manual_seed(5) if device == "cpu" else torch.cuda.manual_seed(5)
    torch.testing.assert_close(_pure_noise(shape, device, None), c, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_the_sampler_steps_stream(device):
    """A stochastic flow step draws exactly the normals p_sample (and the sampler steps) draw from the same
    generator state, and advances the generator as they do."""
    backend = device_backend(device)
    shape = (2, 3, 8, 8)
    schedule = dk.DiffusionSchedule("linear", 100).to(device)
    x = torch.zeros(shape, device=device)
    t = torch.tensor([50, 70], device=device)
    g = torch.Generator(device).manual_seed(3)
    z = _pure_noise(shape, device, g)
    after_flow = _pure_noise(shape, device, g)
    g.manual_seed(3)
    out = dk.p_sample(x, t, x, schedule, clip_denoised=False, generator=g, backend=backend)
    after_p_sample = _pure_noise(shape, device, g)
    mean, _, log_var = dk.p_mean_variance(x, t, x, schedule, clip_denoised=False, backend=backend)
    torch.testing.assert_close((out - mean) / torch.exp(0.5 * log_var), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_p_sample, after_flow, rtol=0, atol=0)


def test_deterministic_step_draws_nothing():
    g = torch.Generator().manual_seed(0)
    sample, cond = make_inputs((2, 9), 2, torch.float32)
    state = g.get_state()
    dk.flow_step(sample, cond, torch.linspace(1, 0, 4), torch.tensor([0, 1]), generator=g, backend="cpu")
    assert torch.equal(g.get_state(), state)


# --------------------------------------------------------------------------------- operators
def _operator_cases(device, dtype=torch.float32):
    x0, noise, mo = make_inputs((2, 3, 5), 3, dtype, device=device)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor([0.3, 0.8], dtype=cd, device=device)
    s_tok = torch.rand(2 * 3, dtype=cd, device=device)  # (B, 3, 1) of (B, 3, 5): period 3, repeat 5
    sigmas = torch.linspace(1, 0, 6, dtype=cd, device=device)
    idx = torch.tensor([1, 4], device=device)
    w = torch.tensor([2.0, 5.0], dtype=cd, device=device)
    ops = torch.ops.ddpm_kernels
    return [
        (ops.flow_interpolate.default, (x0, noise, s, 1, 1)),
        (ops.flow_interpolate.default, (x0, noise, s_tok, 3, 5)),
        (ops.flow_interpolate_out.default, (x0, noise, s_tok, 3, 5, torch.empty_like(x0))),
        (ops.flow_interpolate_backward.default, (mo, s_tok, 3, 5)),
        (ops.flow_step.default, (x0, mo, noise, w, sigmas, idx, None, 1, 1, None, 1, 1, False, 0.5, None, None, 0)),
        (ops.flow_step.default, (x0, mo, None, None, None, None, s_tok, 3, 5, s, 1, 1, True, 0.0, noise, None, 0)),
        (ops.flow_step_out.default,
         (x0, mo, noise, w, None, None, s, 1, 1, s_tok, 3, 5, True, 0.2, noise, None, 3, torch.empty_like(x0))),
        (ops.flow_loss.default, (mo, x0, noise, s, 1, 1, "cosmap", "l2")),
        (ops.flow_loss.default, (mo, x0, noise, s_tok, 3, 5, "sigma_sqrt", "l1")),
        (ops.flow_loss_backward.default, (torch.tensor(1.5, dtype=cd, device=device), mo, x0, noise, s_tok, 3, 5,
                                          "none", "l2")),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck(device, dtype):
    device_backend(device)
    for op, args in _operator_cases(device, dtype):
        if op in (torch.ops.ddpm_kernels.flow_interpolate.default, torch.ops.ddpm_kernels.flow_loss.default):
            differentiable = (0, 1) if op is torch.ops.ddpm_kernels.flow_interpolate.default else (0,)
            args = tuple(a.detach().clone().requires_grad_() if i in differentiable else a
                         for i, a in enumerate(args))
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["sample", "token"])
def test_gradcheck_fp64(device, layout):
    backend = device_backend(device)
    shape = (2, 3, 5)
    x0, noise, mo = (t.requires_grad_() for t in make_inputs(shape, 3, torch.float64, device=device))
    sigma = _sigmas(shape, layout, torch.Generator().manual_seed(0), device)
    f = lambda a, b: dk.flow_interpolate(a, b, sigma, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x0, noise))
    assert torch.autograd.gradgradcheck(f, (x0, noise))
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        for loss_type in ("l2", "l1"):
            g = lambda m: dk.flow_loss(m, x0.detach(), noise.detach(), sigma, weighting, loss_type,  # noqa: E731
                                       backend=backend)
            assert torch.autograd.gradcheck(g, (mo,))


def test_grad_of_sigma_is_refused_by_the_operator_and_served_by_the_reference():
    x0, noise = make_inputs((2, 7), 2, torch.float32)
    sigma = torch.tensor([0.2, 0.9], requires_grad=True)
    with pytest.raises(RuntimeError, match="sigma"):
        torch.ops.ddpm_kernels.flow_interpolate(x0.requires_grad_(), noise, sigma, 1, 1).sum().backward()
    out = dk.flow_interpolate(x0, noise, sigma, backend="cpu")  # the dispatcher sends it to the reference
    out.sum().backward()
    torch.testing.assert_close(sigma.grad, (noise - x0).sum(1).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, compiler):
    """The public flow ops under torch.compile(fullgraph=True): the compiled backend's operators in the graph,
    eager's values, the step in place, and a training step through the interpolant and the loss."""
    backend = device_backend(device)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    sample, cond, uncond, noise = make_inputs((2, 3, 8, 8), 4, torch.float32, device=device)
    sigmas = torch.linspace(1, 0, 9, device=device)
    step_index = torch.tensor([2, 5], device=device)

    def sampling(x, c, u, z, idx):
        a = dk.flow_step(x, c, sigmas, idx, guidance_scale=3.0, uncond=u, guidance_rescale=0.5, backend=backend)
        b = dk.flow_step(x, c, sigmas, idx, noise=z, stochastic=True, backend=backend)
        dk.flow_step(x, c, sigmas, idx, out=x, backend=backend)
        return a, b, x

    eager = sampling(sample.clone(), cond, uncond, noise, step_index)
    compiled = torch.compile(sampling, backend=recording, fullgraph=True)(sample.clone(), cond, uncond, noise,
                                                                          step_index)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1.3e-6, atol=1e-6)

    def training(x0, z, m, s):
        xt = dk.flow_interpolate(x0, z, s, backend=backend)
        return dk.flow_loss(m * xt, x0.detach(), z.detach(), s, "cosmap", backend=backend)

    s = torch.tensor([0.3, 0.7], device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (sample, noise, cond)]
    eager_loss = training(*leaves, s)
    eager_loss.backward()
    eager_grads = [t.grad for t in leaves]
    leaves = [t.detach().clone().requires_grad_() for t in (sample, noise, cond)]
    loss = torch.compile(training, backend=recording, fullgraph=True)(*leaves, s)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1.3e-6, atol=1e-6)
    for got, expected in zip((t.grad for t in leaves), eager_grads):
        torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-6)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for name in ("flow_step", "flow_step_out", "flow_interpolate", "flow_loss"):
        assert any(t.startswith(f"ddpm_kernels.{name}.") for t in targets), (name, targets)
