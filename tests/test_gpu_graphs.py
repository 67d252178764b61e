"""CUDA graphs and torch.compile(mode="reduce-overhead") around whole sampling loops, on every CUDA backend.

A 50-step loop replayed from one captured step must equal the eager loop given the same noise: that only
holds if every coefficient is gathered on the device from the current `t` (a coefficient passed as a Python
float would be baked into the graph and replayed stale).
"""

import pytest
import torch
from torch import nn

import ddpm_kernels as dk

pytestmark = pytest.mark.gpu

STEPS = 50


def cuda_backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda"]
    return [b for b in dk.available_backends("cuda") if b != "reference"] or ["reference"]


class _Eps(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * torch.cos(t.to(x.dtype) / STEPS).reshape(-1, 1, 1, 1)


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    shape = (4, 3, 16, 16)
    model = _Eps(3).cuda().to(dtype).eval()
    s = dk.DiffusionSchedule("linear", timesteps=STEPS, linear_start=1e-3, linear_end=0.2).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x_T = torch.randn(shape, device="cuda", generator=g).to(dtype)
    zs = [torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(STEPS)]
    return model, s, x_T, zs


@torch.no_grad()
def _eager(model, s, x_T, zs, backend):
    x = x_T.clone()
    for i in reversed(range(STEPS)):
        t = torch.full((x.shape[0],), i, device="cuda", dtype=torch.long)
        x = dk.p_sample(x, t, model(x, t), s, noise=zs[i], backend=backend)
    return x


@pytest.mark.parametrize("backend", cuda_backends())
@torch.no_grad()
def test_hand_captured_graph_loop_equals_eager(backend):
    model, s, x_T, zs = _setup()
    expected = _eager(model, s, x_T, zs, backend)

    static_x = x_T.clone()
    static_t = torch.full((x_T.shape[0],), STEPS - 1, device="cuda", dtype=torch.long)
    static_z = zs[-1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init) outside the capture
        for _ in range(3):
            dk.p_sample(static_x.clone(), static_t, model(static_x, static_t), s, noise=static_z, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mo = model(static_x, static_t)
        dk.p_sample(static_x, static_t, mo, s, noise=static_z, backend=backend, out=static_x)
    static_x.copy_(x_T)
    for i in reversed(range(STEPS)):
        static_t.fill_(i)
        static_z.copy_(zs[i])
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cuda_backends())
@torch.no_grad()
def test_compiled_reduce_overhead_loop_equals_eager(backend):
    model, s, x_T, zs = _setup()
    expected = _eager(model, s, x_T, zs, backend)

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def step(x, t, z):
        return dk.p_sample(x, t, model(x, t), s, noise=z, backend=backend)

    x = x_T.clone()
    for i in reversed(range(STEPS)):
        t = torch.full((x.shape[0],), i, device="cuda", dtype=torch.long)
        x = step(x, t, zs[i]).clone()
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cuda_backends())
@torch.no_grad()
def test_in_kernel_noise_is_fresh_on_every_replay(backend):
    _, s, x_T, _ = _setup()
    t = torch.full((x_T.shape[0],), STEPS // 2, device="cuda", dtype=torch.long)
    mo = torch.zeros_like(x_T)
    out = torch.empty_like(x_T)
    dk.p_sample(x_T, t, mo, s, backend=backend, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dk.p_sample(x_T, t, mo, s, backend=backend, out=out)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


@pytest.mark.parametrize("backend", cuda_backends())
@torch.no_grad()
def test_sampling_step_has_no_host_sync(backend):
    model, s, x_T, zs = _setup()
    t = torch.full((x_T.shape[0],), 7, device="cuda", dtype=torch.long)
    mo = model(x_T, t)
    dk.p_sample(x_T, t, mo, s, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dk.p_sample(x_T, t, mo, s, backend=backend)
        dk.p_sample(x_T, t, mo, s, noise=zs[0], backend=backend, out=x_T.clone())
        dk.q_sample(x_T, t, zs[0], s, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", cuda_backends())
def test_sampling_loop_allocates_nothing_per_step_on_cuda(backend):
    shape = (4, 3, 32, 32)

    class Prealloc(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("buf", torch.zeros(shape))

        def forward(self, x, t):
            torch.mul(x, 0.1, out=self.buf)
            return self.buf

    d = dk.GaussianDiffusion(Prealloc(), dk.DiffusionSchedule(timesteps=20), backend=backend, image_size=32,
                             channels=3).cuda()
    d.p_sample_loop(shape, progress=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    d.p_sample_loop(shape, progress=False)
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"] - before
    # the loop's initial noise and its timestep tensor; nothing per step
    assert allocations <= 4, allocations
