"""The compiled CUDA backend against the reference (needs a GPU and a CUDA build of the extension)."""

import pytest
import torch

import ddpm_kernels as dk

pytestmark = pytest.mark.gpu

T = 1000
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# 1 element, odd sizes (scalar path), 128-bit-aligned sizes (vector path), 3-D and 5-D.
SHAPES = [(1,), (3, 3, 17, 19), (4, 4, 16, 16), (2, 5, 7), (2, 3, 2, 3, 8)]


@pytest.fixture(scope="module")
def schedule():
    from ddpm_kernels import extension

    reason = extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    return dk.DiffusionSchedule("linear", timesteps=T).cuda()


def _inputs(shape, dtype, n=3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=g, device="cuda", dtype=torch.float64).to(dtype) for _ in range(n)]


def _t(B):
    t = torch.randint(0, T, (B,), device="cuda")
    t[0] = 0
    if B > 1:
        t[-1] = T - 1
    return t


def _close(a, b, dtype):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_match_reference(schedule, dtype, shape):
    x, y, z = _inputs(shape, dtype)
    t = _t(shape[0])
    s = schedule
    for backend_call in (
        lambda b: dk.q_sample(x, t, y, s, backend=b),
        lambda b: dk.predict_start_from_noise(x, t, y, s, backend=b),
        lambda b: dk.predict_noise_from_start(x, t, y, s, backend=b),
        lambda b: dk.get_v(x, y, t, s, backend=b),
        lambda b: dk.predict_start_from_z_and_v(x, t, y, s, backend=b),
        lambda b: dk.predict_eps_from_z_and_v(x, t, y, s, backend=b),
        lambda b: dk.q_posterior(x, y, t, s, backend=b),
    ):
        _close(backend_call("cuda"), backend_call("reference"), dtype)
    for param in ("eps", "x0", "v"):
        for clip in (True, False):
            _close(
                dk.p_mean_variance(x, t, y, s, param, clip, backend="cuda"),
                dk.p_mean_variance(x, t, y, s, param, clip, backend="reference"),
                dtype,
            )
            _close(
                dk.p_sample(x, t, y, s, param, clip, noise=z, backend="cuda"),
                dk.p_sample(x, t, y, s, param, clip, noise=z, backend="reference"),
                dtype,
            )
        for loss_type in ("l1", "l2"):
            _close(
                dk.diffusion_loss(y, x, z, t, s, param, loss_type, 0.7, 0.3, backend="cuda"),
                dk.diffusion_loss(y, x, z, t, s, param, loss_type, 0.7, 0.3, backend="reference"),
                dtype,
            )


def test_unaligned_views_take_the_scalar_path(schedule):
    base = _inputs((4 * 8 * 8 + 1,), torch.float32)
    x, y, z = (b[1:].view(4, 8, 8) for b in base)  # 4-byte offset: not 16-byte aligned
    t = _t(4)
    _close(
        dk.p_sample(x, t, y, schedule, noise=z, backend="cuda"),
        dk.p_sample(x, t, y, schedule, noise=z, backend="reference"),
        torch.float32,
    )


def test_out_of_range_t_gives_nan(schedule):
    from ddpm_kernels import extension

    x, y, z = _inputs((3, 4, 8), torch.float32)
    t = torch.tensor([-1, 5, T], device="cuda")
    out = extension.OPS["p_sample"](x, t, y, schedule, "eps", True, None)
    torch.cuda.synchronize()
    assert out[0].isnan().all() and out[2].isnan().all() and out[1].isfinite().all()


def test_in_kernel_noise(schedule):
    x, mo = _inputs((16, 4, 64, 64), torch.float32, n=2)
    t = torch.full((16,), 400, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = dk.p_sample(x, t, mo, schedule, generator=g, backend="cuda")
    b = dk.p_sample(x, t, mo, schedule, generator=g, backend="cuda")
    assert not torch.equal(a, b)
    g.manual_seed(0)
    torch.testing.assert_close(dk.p_sample(x, t, mo, schedule, generator=g, backend="cuda"), a, rtol=0, atol=0)
    mean, _, log_var = dk.p_mean_variance(x, t, mo, schedule, backend="reference")
    z = ((a - mean) / torch.exp(0.5 * log_var)).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / n**0.5
    # t == 0: no noise.
    t0 = torch.zeros(16, dtype=torch.long, device="cuda")
    torch.testing.assert_close(
        dk.p_sample(x, t0, mo, schedule, backend="cuda"), dk.p_mean_variance(x, t0, mo, schedule)[0]
    )


def test_out_in_place_and_current_stream(schedule):
    x, mo, nz = _inputs((4, 4, 16, 16), torch.float32)
    t = _t(4)
    want = dk.p_sample(x, t, mo, schedule, noise=nz, backend="reference")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x_in = x.clone()
        dk.p_sample(x_in, t, mo, schedule, noise=nz, backend="cuda", out=x_in)
    stream.synchronize()
    torch.testing.assert_close(x_in, want)


def test_cuda_graph_replay_reads_current_t_and_fresh_noise(schedule):
    x, mo = _inputs((4, 4, 16, 16), torch.float32, n=2)
    t = torch.full((4,), 500, device="cuda")
    out = torch.empty_like(x)
    for _ in range(2):  # warm up on a side stream, as torch.cuda.graphs requires
        dk.p_sample(x, t, mo, schedule, backend="cuda", out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dk.p_sample(x, t, mo, schedule, backend="cuda", out=out)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)  # fresh Philox offset per replay
    t.fill_(0)  # coefficients are gathered in the kernel: a new t changes the result
    graph.replay()
    torch.testing.assert_close(out, dk.p_mean_variance(x, t, mo, schedule)[0])


def test_autograd_and_opcheck(schedule):
    x, n, mo = _inputs((2, 3, 8), torch.float64)
    t = torch.tensor([0, T - 1], device="cuda")
    x.requires_grad_()
    n.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dk.q_sample(a, t, b, schedule, backend="cuda"), (x, n))
    mo.requires_grad_()
    xs, nz = x.detach(), n.detach()
    assert torch.autograd.gradcheck(
        lambda m: dk.diffusion_loss(m, xs, nz, t, schedule, "v", "l2", 1.0, 0.5, backend="cuda"), (mo,)
    )
    tab = schedule.table(torch.float32)
    a, b, c = (v.detach().float() for v in (x, n, mo))
    torch.library.opcheck(torch.ops.ddpm_kernels.p_sample, (a, t, b, tab, "eps", True, c, None))
    torch.library.opcheck(torch.ops.ddpm_kernels.diffusion_loss, (a, b, c, t, tab, "eps", "l2", 1.0, 0.5))
