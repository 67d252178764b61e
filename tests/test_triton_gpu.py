"""Triton backend checks that need a CUDA device (skipped without one; tests/test_triton.py also runs on the
GPU when one is present): CUDA-graph capture and replay, launch counts and host syncs, torch.compile with
CUDA graphs, shapes of benchmark size and tensors past 2**31 elements."""

from __future__ import annotations

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels import reference as R
from helpers import capture_cuda_graph, cuda_kernel_names

pytestmark = pytest.mark.gpu

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).cuda()


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


def test_cuda_graph_replay_reads_new_t(schedule):
    """Coefficients are gathered in-kernel from the captured t tensor: writing a new t and replaying gives the
    new step's result (a coefficient passed as a kernel argument would replay the captured step)."""
    x_t, model_output, noise, x_start = (randn(4, 4, 16, 16, seed=i) for i in range(4))
    t = torch.full((4,), 999, device="cuda", dtype=torch.int64)

    def step():
        x_prev = dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")
        x_noisy = dk.q_sample(x_start, t, noise, schedule, backend="triton")
        mean = dk.p_mean_variance(x_t, t, model_output, schedule, "v", True, backend="triton")[0]
        return x_prev, x_noisy, mean

    graph, (x_prev, x_noisy, mean) = capture_cuda_graph(step)
    for new_t in ([500, 1, 0, 998], [3, 700, 250, 0]):
        t.copy_(torch.tensor(new_t))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(x_prev, R.p_sample_ref(x_t, t, model_output, schedule, noise=noise))
        torch.testing.assert_close(x_noisy, R.q_sample_ref(x_start, t, noise, schedule))
        torch.testing.assert_close(mean, R.p_mean_variance_ref(x_t, t, model_output, schedule, "v", True)[0])


def test_cuda_graph_in_kernel_noise_fresh_each_replay(schedule):
    """The Philox seed is read from a device tensor refilled by the captured randint, so every replay draws
    new noise; a seed baked in as a kernel argument would repeat it."""
    shape = (2, 4, 64, 64)
    zeros = torch.zeros(shape, device="cuda")
    t = torch.full((2,), 500, device="cuda", dtype=torch.int64)

    graph, out = capture_cuda_graph(lambda: dk.p_sample(zeros, t, zeros, schedule, "x0", False, backend="triton"))
    sigma = schedule.posterior_log_variance_clipped[500].mul(0.5).exp()
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append((out / sigma).clone())
    for z in draws:
        assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_cuda_graph_in_place_sampling_loop(schedule):
    """A captured in-place step (out=x_t), replayed over t = T-1 ... 0 with t written before each replay,
    equals the eager loop given the same noise."""
    steps = 5
    x0 = randn(2, 3, 8, 8)
    noises = [randn(2, 3, 8, 8, seed=10 + i) for i in range(steps)]
    model_output = randn(2, 3, 8, 8, seed=99)

    x = x0.clone()
    t = torch.zeros(2, dtype=torch.int64, device="cuda")
    noise = torch.zeros_like(x)
    graph, _ = capture_cuda_graph(
        lambda: dk.p_sample(x, t, model_output, schedule, noise=noise, backend="triton", out=x))
    x.copy_(x0)
    expected = x0.clone()
    for i, step in enumerate(range(steps - 1, -1, -1)):
        t.fill_(step)
        noise.copy_(noises[i])
        graph.replay()
        expected = R.p_sample_ref(expected, t.clone(), model_output, schedule, noise=noises[i])
    torch.cuda.synchronize()
    torch.testing.assert_close(x, expected)


def test_eager_noise_uses_generator_philox_state(schedule):
    """Eager CUDA noise is keyed by the generator's own (seed, offset), reproducible after manual_seed, and
    advances the offset past the counters it used (so the next torch or ddpm_kernels draw is fresh)."""
    zeros = torch.zeros(3, 1000, device="cuda")
    t = torch.full((3,), 500, device="cuda", dtype=torch.int64)
    gen = torch.Generator("cuda").manual_seed(21)
    a = dk.p_sample(zeros, t, zeros, schedule, "x0", False, generator=gen, backend="triton")
    assert gen.get_offset() == 4 * 3 * 250
    b = dk.p_sample(zeros, t, zeros, schedule, "x0", False, generator=gen, backend="triton")
    gen.manual_seed(21)
    a2 = dk.p_sample(zeros, t, zeros, schedule, "x0", False, generator=gen, backend="triton")
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b)
    torch.cuda.manual_seed(5)
    c = dk.p_sample(zeros, t, zeros, schedule, "x0", False, backend="triton")
    torch.cuda.manual_seed(5)
    torch.testing.assert_close(c, dk.p_sample(zeros, t, zeros, schedule, "x0", False, backend="triton"))


def test_launch_counts_and_no_host_sync(schedule):
    """p_sample is one kernel, with given or in-kernel noise (eager: the generator's Philox state is passed as
    kernel arguments). No op synchronizes with the host (sync debug mode raises on a sync)."""
    x_t, model_output, noise = (randn(16, 4, 64, 64, seed=i) for i in range(3))
    t = torch.randint(0, T, (16,), device="cuda")
    dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")  # compile outside the profile
    dk.p_sample(x_t, t, model_output, schedule, backend="triton")
    dk.q_sample(x_t, t, noise, schedule, backend="triton")

    kernels = cuda_kernel_names(lambda: dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton"))
    assert len(kernels) == 1 and "posterior_kernel" in kernels[0], kernels
    kernels = cuda_kernel_names(lambda: dk.p_sample(x_t, t, model_output, schedule, backend="triton"))
    assert len(kernels) == 1 and "posterior_kernel" in kernels[0], kernels
    kernels = cuda_kernel_names(lambda: dk.q_sample(x_t, t, noise, schedule, backend="triton"))
    assert len(kernels) == 1 and "pair_kernel" in kernels[0], kernels

    mo = model_output.clone().requires_grad_()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")
        dk.p_sample(x_t, t, model_output, schedule, backend="triton", out=x_t.clone())
        dk.q_sample(x_t, t, noise, schedule, backend="triton")
        dk.p_mean_variance(x_t, t, model_output, schedule, backend="triton")
        loss = dk.diffusion_loss(mo, x_t, noise, t, schedule, "v", "l2", 1.0, 0.1, backend="triton")[0]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_benchmark_shapes_match_reference(schedule, dtype):
    shape = (64, 4, 128, 128)
    x_t, model_output, noise = (randn(*shape, dtype=dtype, seed=i) for i in range(3))
    t = torch.randint(0, T, (64,), device="cuda")
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    cases = [
        (dk.p_sample, R.p_sample_ref, (x_t, t, model_output, schedule, "eps", True, noise)),
        (dk.q_sample, R.q_sample_ref, (x_t, t, noise, schedule)),
        (dk.p_mean_variance, R.p_mean_variance_ref, (x_t, t, model_output, schedule, "v", False)),
        (dk.diffusion_loss, R.diffusion_loss_ref, (model_output, x_t, noise, t, schedule, "eps", "l2", 1.0, 0.1)),
    ]
    for fused, ref, args in cases:
        out = fused(*args, backend="triton")
        expected = ref(*args)
        out = out if isinstance(out, tuple) else (out,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for a, b in zip(out, expected):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_int64_offsets_past_2_31_elements(schedule):
    """One sample of 2**31 + 4096 bfloat16 elements (4 GiB per tensor): int32 offsets would wrap."""
    n = 2**31 + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2:
        pytest.skip("needs ~22 GB of free GPU memory")
    x = torch.ones((1, n), device="cuda", dtype=torch.bfloat16)
    noise = torch.full_like(x, 0.5)
    x[:, -4096:] = randn(1, 4096, dtype=torch.bfloat16)
    t = torch.tensor([321], device="cuda")
    out = dk.q_sample(x, t, noise, schedule, backend="triton")
    tail = R.q_sample_ref(x[:, -4096:], t, noise[:, -4096:], schedule)
    torch.testing.assert_close(out[:, -4096:], tail, rtol=0, atol=0)
    head = R.q_sample_ref(x[:, :4096], t, noise[:, :4096], schedule)
    torch.testing.assert_close(out[:, :4096], head, rtol=0, atol=0)


def test_torch_compile_reduce_overhead(schedule):
    """torch.compile with CUDA graphs (mode="reduce-overhead") around a sampling step: matches eager with given
    noise and draws fresh noise per call without it."""
    x_t, model_output, noise = (randn(2, 4, 32, 32, seed=i) for i in range(3))
    t = torch.tensor([10, 999], device="cuda")

    def step(x_t, t, model_output, noise):
        return dk.p_sample(x_t, t, model_output, schedule, noise=noise, backend="triton")

    def step_drawn(x_t, t, model_output):
        return dk.p_sample(x_t, t, model_output, schedule, backend="triton")

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    compiled_drawn = torch.compile(step_drawn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # cudagraph trees record on the second/third call
        got = compiled(x_t, t, model_output, noise).clone()
        torch.testing.assert_close(got, step(x_t, t, model_output, noise))
    draws = [compiled_drawn(x_t, t, model_output).clone() for _ in range(4)]
    assert not torch.equal(draws[-1], draws[-2])
