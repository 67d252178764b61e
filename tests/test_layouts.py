"""Memory layouts on the fused backends: channels_last (4-D) and channels_last_3d (5-D) data runs in place.

Every sample of such a tensor is one dense block of storage, which is all the kernels need (they index storage
order, with sample ``b`` at ``[b * N, (b + 1) * N)``): inputs are read as they are, the result keeps the layout of
``x_t`` (``x_start`` for the training ops), and no copy is made. Operands in another layout are brought to that one;
layouts that are not dense per sample (transposed batch, slices) still run, through one copy, with a contiguous
result. Values are compared with the reference backend on the same inputs.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ddpm_kernels as dk
from ddpm_kernels import backends

S = dk.DiffusionSchedule("linear", timesteps=100)
FUSED = [b for b in dk.available_backends("cpu", torch.float32) if b != "reference"]
FORMATS = {
    "channels_last": (torch.channels_last, (3, 5, 4, 6)),
    "channels_last_3d": (torch.channels_last_3d, (2, 3, 4, 3, 5)),
}
COPY_OPS = ("aten::copy_", "aten::clone")


def _inputs(shape, fmt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).contiguous(memory_format=fmt) for _ in range(n)]


def _t(batch):
    return torch.linspace(0, 99, batch).long()


def _calls(x, y, z, t, schedule=S):
    """(name, call(backend)) for every op of the public API, all data operands in x's layout."""
    return [
        ("q_sample", lambda b: dk.q_sample(x, t, y, schedule, backend=b)),
        ("predict_start_from_noise", lambda b: dk.predict_start_from_noise(x, t, y, schedule, backend=b)),
        ("predict_noise_from_start", lambda b: dk.predict_noise_from_start(x, t, y, schedule, backend=b)),
        ("get_v", lambda b: dk.get_v(x, y, t, schedule, backend=b)),
        ("predict_start_from_z_and_v", lambda b: dk.predict_start_from_z_and_v(x, t, y, schedule, backend=b)),
        ("predict_eps_from_z_and_v", lambda b: dk.predict_eps_from_z_and_v(x, t, y, schedule, backend=b)),
        ("q_posterior", lambda b: dk.q_posterior(y, x, t, schedule, backend=b)),
        ("p_mean_variance", lambda b: dk.p_mean_variance(x, t, y, schedule, "v", True, backend=b)),
        ("p_sample", lambda b: dk.p_sample(x, t, y, schedule, "eps", True, noise=z, backend=b)),
        ("ddim_step", lambda b: dk.ddim_step(x, t, (t - 7).clamp(min=-1), y, schedule, eta=0.5, noise=z, backend=b)),
        ("ddpm_step", lambda b: dk.ddpm_step(x, t, t - 1, y, schedule, "x0", "fixed_large", noise=z, backend=b)),
        ("diffusion_loss", lambda b: dk.diffusion_loss(y, x, z, t, schedule, "v", "l1", 1.0, 0.5, backend=b)),
    ]


def _served(backend, calls, device="cpu"):
    """The calls whose op ``backend`` implements (the Triton backend has no kernels for the inverse helpers)."""
    ops = backends.get_backend(backend, torch.device(device), torch.float32).ops
    return [(name, call) for name, call in calls if name in ops]


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _copies(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages() if e.key in COPY_OPS]


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("backend", FUSED)
def test_dense_layouts_match_the_reference_and_keep_their_layout(backend, layout):
    fmt, shape = FORMATS[layout]
    x, y, z = _inputs(shape, fmt, 3)
    for name, call in _served(backend, _calls(x, y, z, _t(shape[0]))):
        expected, actual = call("reference"), call(backend)
        for e, a in zip(expected if isinstance(expected, tuple) else (expected,),
                        actual if isinstance(actual, tuple) else (actual,)):
            torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
        result = _first(actual)
        if result.ndim == len(shape):
            assert result.is_contiguous(memory_format=fmt), f"{name}: result lost the {layout} layout"


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.skipif("cpu" not in FUSED, reason="needs the compiled CPU kernels")
def test_dense_layouts_run_without_a_copy(layout):
    fmt, shape = FORMATS[layout]
    x, y, z = _inputs(shape, fmt, 3)
    for name, call in _calls(x, y, z, _t(shape[0])):
        call("cpu")  # warm-up: first-use imports and resolution stay out of the profile
        assert _copies(lambda: call("cpu")) == [], f"{name} copied its {layout} inputs"


@pytest.mark.skipif("cpu" not in FUSED, reason="needs the compiled CPU kernels")
def test_channels_last_out_is_written_in_place():
    x, m, z = _inputs((2, 3, 5, 4), torch.channels_last, 3)
    t = torch.tensor([0, 60])
    expected = dk.p_sample(x, t, m, S, noise=z, backend="reference")
    out = torch.empty_like(x)
    ptr = out.data_ptr()
    dk.p_sample(x, t, m, S, noise=z, backend="cpu", out=out)  # warm-up
    assert _copies(lambda: dk.p_sample(x, t, m, S, noise=z, backend="cpu", out=out)) == []
    assert out.data_ptr() == ptr and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    # in place on x_t itself, as GaussianDiffusion's sampling loop does
    x_copy = x.clone()
    dk.p_sample(x_copy, t, m, S, noise=z, backend="cpu", out=x_copy)
    torch.testing.assert_close(x_copy, expected, rtol=2e-5, atol=2e-5)
    # q_sample's out=
    out = torch.empty_like(x)
    dk.q_sample(x, t, z, S, backend="cpu", out=out)
    torch.testing.assert_close(out, dk.q_sample(x, t, z, S, backend="reference"), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_layouts_follow_x_t(backend):
    (x,) = _inputs((3, 4, 5, 2), torch.channels_last, 1)
    y, z = _inputs((3, 4, 5, 2), torch.contiguous_format, 2, seed=1)
    t = torch.tensor([99, 0, 42])
    for name, call in _served(backend, _calls(x, y, z, t)):
        expected, actual = call("reference"), call(backend)
        torch.testing.assert_close(_first(actual), _first(expected), rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{name}: {m}")
    out = dk.p_sample(x, t, y, S, noise=z, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # a contiguous x_t with channels_last operands: the result is contiguous
    out = dk.p_sample(y, t, x, S, noise=x, backend=backend)
    assert out.is_contiguous()
    torch.testing.assert_close(out, dk.p_sample(y, t, x, S, noise=x, backend="reference"), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_layouts_that_are_not_dense_per_sample_still_run(backend):
    g = torch.Generator().manual_seed(3)
    batch_inner = torch.randn(4, 3, 5, 6, generator=g).transpose(0, 1)  # batch is not the outer dim
    sliced = torch.randn(3, 4, 5, 8, generator=g)[..., ::2]
    for x in (batch_inner, sliced):
        m, z = torch.randn_like(x), torch.randn_like(x)
        t = torch.arange(x.shape[0]) * 30
        out = dk.p_sample(x, t, m, S, noise=z, backend=backend)
        torch.testing.assert_close(out, dk.p_sample(x, t, m, S, noise=z, backend="reference"), rtol=2e-5, atol=2e-5)
        assert out.is_contiguous()


@pytest.mark.parametrize("backend", FUSED)
def test_learned_variance_with_channels_last(backend):
    (x,) = _inputs((2, 3, 4, 5), torch.channels_last, 1)
    (mo,) = _inputs((2, 6, 4, 5), torch.channels_last, 1, seed=2)
    (z,) = _inputs((2, 3, 4, 5), torch.channels_last, 1, seed=4)
    t = torch.tensor([50, 1])
    for vt in ("learned", "learned_range"):
        expected = dk.ddpm_step(x, t, t - 1, mo, S, "eps", vt, noise=z, backend="reference")
        actual = dk.ddpm_step(x, t, t - 1, mo, S, "eps", vt, noise=z, backend=backend)
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_channels_last_gradients(backend):
    x, z = (a.requires_grad_() for a in _inputs((2, 3, 4, 5), torch.channels_last, 2))
    t = torch.tensor([10, 90])
    grads = {}
    for b in ("reference", backend):
        out = dk.q_sample(x, t, z, S, backend=b)
        loss = dk.diffusion_loss(out, x.detach(), z.detach(), t, S, backend=b)[0]
        grads[b] = torch.autograd.grad(loss, (x, z))
    for e, a in zip(grads["reference"], grads[backend]):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-7)


def _opcheck_cases(backend):
    """Raw operators on channels_last data: opcheck compares the fake kernels' output strides with the real."""
    x, y, z = _inputs((2, 3, 4, 5), torch.channels_last, 3, seed=5)
    t = torch.tensor([3, 97])
    tab, tab64 = S.table(torch.float32), S.table(torch.float64)
    one = torch.tensor(1.0)
    if backend == "cpu":
        ops = torch.ops.ddpm_kernels
        return [
            (ops.q_sample, (x, t, y, tab)),
            (ops.q_sample, (x.double().requires_grad_(), t, y.double().requires_grad_(), tab64)),
            (ops.q_sample_out, (x, t, y, tab, torch.empty_like(x))),
            (ops.q_sample_backward, (x, t, tab)),
            (ops.q_posterior, (x, y, t, tab)),
            (ops.p_mean_variance, (x, t, y, tab, "v", True)),
            (ops.p_sample, (x, t, y, tab, "eps", True, z, None, 0)),
            (ops.p_sample_out, (x, t, y, tab, "x0", False, z, None, 0, torch.empty_like(x))),
            (ops.diffusion_loss, (x.double().requires_grad_(), y.double(), z.double(), t, tab64, "v", "l1", 1.0, 0.5)),
            (ops.diffusion_loss_backward, (one, one, one, x, y, z, t, tab, "eps", "l2", 1.0, 0.5)),
            (ops.ddim_step, (x, t, t - 3, y, None, None, tab64, 1.0, "v", True, 1.5, False, True, 0.0, z, None, 0,
                             True)),
            (ops.ddpm_step_out, (x, t, t - 1, y, None, None, tab64, "x0", "fixed_large", True, 2.0, 0.0, z, None, 0,
                                 True, torch.empty_like(x))),
        ]
    ops = torch.ops.ddpm_kernels_triton
    return [
        (ops.q_sample, (x, t, y, tab)),
        (ops.q_sample_out, (x, t, y, tab, torch.empty_like(x))),
        (ops.q_sample_backward, (x, t, tab)),
        (ops.q_posterior, (x, y, t, tab)),
        (ops.p_mean_variance, (x, t, y, tab, 2, True)),
        (ops.p_sample, (x, t, y, tab, 0, True, z, None, 0, 0, 0)),
        (ops.p_sample_out, (x, t, y, tab, 1, False, z, None, 0, 0, 0, torch.empty_like(x))),
        (ops.diffusion_loss_backward, (one, one, one, x, y, z, t, tab, 2, True, 1.0, 0.5, True, True)),
    ]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_channels_last(backend):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", FORMATS)
def test_dense_layouts_on_cuda(layout):
    """The CUDA kernels and Triton on GPU tensors: same values as the reference, layout kept, no copy kernel."""
    schedule = dk.DiffusionSchedule("linear", timesteps=100).cuda()
    fmt, shape = FORMATS[layout]
    x, y, z = (a.cuda() for a in _inputs(shape, fmt, 3))
    t = _t(shape[0]).cuda()
    for backend in [b for b in dk.available_backends("cuda") if b != "reference"]:
        for name, call in _served(backend, _calls(x, y, z, t, schedule), "cuda"):
            expected, actual = call("reference"), call(backend)
            torch.testing.assert_close(_first(actual), _first(expected), rtol=2e-5, atol=2e-5,
                                       msg=lambda m: f"{backend} {name}: {m}")
            result = _first(actual)
            if result.ndim == len(shape):
                assert result.is_contiguous(memory_format=fmt), f"{backend} {name}: lost the {layout} layout"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dk.p_sample(x, t, y, schedule, noise=z, backend=backend)
            torch.cuda.synchronize()
        assert not [e.key for e in prof.key_averages() if e.key in COPY_OPS], f"{backend} copied {layout} data"
