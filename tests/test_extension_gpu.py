"""What only the compiled CUDA backend has (needs a GPU and a CUDA build of the extension): the scalar path for
views that are not 16-byte aligned, in-kernel noise from the CUDA generator's Philox state, the current stream,
CUDA-graph replay.

The checks every fused backend shares (values against the reference over op x dtype x shape x layout, out=,
out-of-range t, gradients, opcheck, torch.compile) run on this backend in tests/test_conformance.py.
"""

import pytest
import torch

import ddpm_kernels as dk
from helpers import assert_matches, make_inputs, timestep_cases

pytestmark = pytest.mark.gpu

T = 1000


@pytest.fixture(scope="module")
def schedule():
    from ddpm_kernels import extension

    reason = extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    return dk.DiffusionSchedule("linear", timesteps=T).cuda()


def test_unaligned_views_take_the_scalar_path(schedule):
    base = make_inputs((4 * 8 * 8 + 1,), 3, torch.float32, device="cuda")
    x, y, z = (b[1:].view(4, 8, 8) for b in base)  # 4-byte offset: not 16-byte aligned
    (t,) = timestep_cases(4, T, "cuda")
    assert_matches(dk.p_sample(x, t, y, schedule, noise=z, backend="cuda"), dk.p_sample, (x, t, y, schedule),
                   dict(noise=z, backend="reference"), torch.float32)


def test_in_kernel_noise(schedule):
    x, mo = make_inputs((16, 4, 64, 64), 2, torch.float32, device="cuda")
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
    x, mo, nz = make_inputs((4, 4, 16, 16), 3, torch.float32, device="cuda")
    (t,) = timestep_cases(4, T, "cuda")
    want = dk.p_sample(x, t, mo, schedule, noise=nz, backend="reference")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x_in = x.clone()
        dk.p_sample(x_in, t, mo, schedule, noise=nz, backend="cuda", out=x_in)
    stream.synchronize()
    torch.testing.assert_close(x_in, want)


def test_cuda_graph_replay_reads_current_t_and_fresh_noise(schedule):
    x, mo = make_inputs((4, 4, 16, 16), 2, torch.float32, device="cuda")
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
