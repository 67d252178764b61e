"""Faults, huge tensors, zero-allocation steps and multi-process training, on every backend available here."""

import math
import os
import sys

import pytest
import torch
from torch import nn

import ddpm_kernels as dk

S = dk.DiffusionSchedule("linear", timesteps=100)


def backends_here(dtype=torch.float32):
    return [b for b in dk.available_backends("cpu", dtype)]


def _fused_cpu_backends():
    return [b for b in backends_here() if b not in ("reference", "triton")]


# ------------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("backend", backends_here())
def test_nan_and_inf_propagate(backend):
    x = torch.tensor([[float("nan"), 0.5, 0.1], [float("inf"), -float("inf"), 0.2]])
    z = torch.zeros(2, 3)
    t = torch.tensor([3, 40])
    out = dk.q_sample(x, t, z, S, backend=backend)
    assert torch.isnan(out[0, 0]) and out[1, 0] == float("inf") and out[1, 1] == -float("inf")
    # no clip: x0 = model output passes through unchanged, NaN/Inf included
    out = dk.p_sample(z, t, x, S, parameterization="x0", clip_denoised=False, noise=z, backend=backend)
    assert torch.isnan(out[0, 0]) and out[1, 0] == float("inf") and out[1, 1] == -float("inf")
    # the documented clip of x0 bounds +-inf, and NaN stays NaN (clamp keeps NaN)
    out = dk.p_sample(z, t, x, S, parameterization="x0", clip_denoised=True, noise=z, backend=backend)
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[1, :2]).all()
    loss = dk.diffusion_loss(x, z, z, t, S, parameterization="x0", backend=backend)[0]
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", backends_here())
def test_out_of_range_t_never_reads_outside_the_tables(backend):
    """The value check is skipped for device tensors; simulate that by calling the backend's op directly. A t
    far outside [0, T) must give NaN, not a read of other memory (or a crash)."""
    from ddpm_kernels import backends

    impl = backends.get_backend(backend, torch.device("cpu"), torch.float32)
    x, z = torch.randn(4, 5), torch.randn(4, 5)
    t = torch.tensor([-(2**40), -1, 100, 2**40], dtype=torch.long)
    out = impl.ops["q_sample"](x, t, z, S, out=None)
    assert torch.isnan(out).all()
    t_ok = torch.tensor([0, 99, 100, 5])
    out = impl.ops["p_sample"](x, t_ok, z, S, "eps", True, z, None, out=None)
    assert torch.isfinite(out[[0, 1, 3]]).all() and torch.isnan(out[2]).all()


# ------------------------------------------------------------------------------------------------ out=
class _PreallocatedModel(nn.Module):
    """A 'model' whose own work allocates nothing: it writes its output into one buffer."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("buf", torch.zeros(shape))

    def forward(self, x, t):
        torch.mul(x, 0.1, out=self.buf)
        return self.buf


@pytest.mark.parametrize("backend", _fused_cpu_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="no fused CPU backend built here"))])
def test_sampling_loop_allocates_nothing_per_step(backend):
    """Counted with the profiler's memory events: no allocation of the step's size inside the loop."""
    from torch.profiler import ProfilerActivity, profile

    shape = (4, 3, 32, 32)
    step_bytes = math.prod(shape) * 4
    d = dk.GaussianDiffusion(_PreallocatedModel(shape), dk.DiffusionSchedule(timesteps=10), backend=backend,
                             image_size=32, channels=3)
    d.p_sample_loop(shape, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        d.p_sample_loop(shape, progress=False)
    big = [e for e in prof.events() if e.cpu_memory_usage >= step_bytes // 2]
    # the loop's own initial noise (one tensor) is the only allocation of that size
    assert len(big) <= 2, [(e.name, e.cpu_memory_usage) for e in big]

    # the reference, by contrast, allocates temporaries every step
    d_ref = dk.GaussianDiffusion(_PreallocatedModel(shape), dk.DiffusionSchedule(timesteps=10),
                                 backend="reference", image_size=32, channels=3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        d_ref.p_sample_loop(shape, progress=False)
    assert len([e for e in prof.events() if e.cpu_memory_usage >= step_bytes // 2]) > 10


# ------------------------------------------------------------------------------------------------ 2^31
@pytest.mark.slow
@pytest.mark.parametrize("backend", _fused_cpu_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="no fused CPU backend built here"))])
def test_indexing_past_2_31_elements(backend):
    """The last elements of a (2^31 + 7)-element half tensor are right: 64-bit offsets in the kernel."""
    n = 2**31 + 7
    x = torch.empty(n, dtype=torch.float16)
    z = torch.empty(n, dtype=torch.float16)
    x[-1000:] = torch.linspace(-2, 2, 1000, dtype=torch.float16)
    z[-1000:] = torch.linspace(1, -1, 1000, dtype=torch.float16)
    x[:-1000].zero_()
    z[:-1000].zero_()
    xb, zb = x.view(1, n), z.view(1, n)
    t = torch.tensor([57])
    out = dk.q_sample(xb, t, zb, S, backend=backend)
    expected = dk.q_sample(xb[:, -1000:].clone(), t, zb[:, -1000:].clone(), S, backend="reference")
    torch.testing.assert_close(out[:, -1000:], expected, rtol=0, atol=0)
    assert out[0, 0] == 0


# ------------------------------------------------------------------------------------------------ DDP
class _ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 100)


class _LossStep(nn.Module):
    """DDP calls forward: route it to p_losses with fixed timesteps (GaussianDiffusion.forward draws them)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x0, t, noise):
        return self.diffusion.p_losses(x0, t, noise=noise)[0]


def _ddp_worker(rank, world, store_path, backend, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    # a file store: no TCP port to pick and lose to another process between choosing and binding it
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _ConvModel()
    d = dk.GaussianDiffusion(model, dk.DiffusionSchedule(timesteps=100), backend=backend, image_size=8, channels=3)
    ddp = DDP(_LossStep(d))
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    noise = torch.randn(8, 3, 8, 8, generator=g)
    shard = slice(rank * 4, rank * 4 + 4)
    ddp(x0[shard], t[shard], noise[shard]).backward()  # DDP's reducer averages the gradients over ranks
    # per-rank in-kernel noise: seeded per rank, reproducible, different between ranks
    gen = torch.Generator().manual_seed(1000 + rank)
    z = dk.p_sample(torch.zeros(2, 3, 8, 8), torch.full((2,), 50), torch.zeros(2, 3, 8, 8), d.schedule,
                    generator=gen, backend=backend)
    torch.save({"grads": [p.grad for p in model.parameters()], "z": z}, f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference"] + _fused_cpu_backends())
def test_ddp_gradients_equal_single_process(backend, tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), backend, path), nprocs=2, join=True)
    results = [torch.load(f"{path}.{r}") for r in range(2)]

    torch.manual_seed(0)
    model = _ConvModel()
    d = dk.GaussianDiffusion(model, dk.DiffusionSchedule(timesteps=100), backend=backend, image_size=8, channels=3)
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    noise = torch.randn(8, 3, 8, 8, generator=g)
    loss, _ = d.p_losses(x0, t, noise=noise)
    loss.backward()
    for r in results:
        for got, p in zip(r["grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0]["z"], results[1]["z"])
    again = dk.p_sample(torch.zeros(2, 3, 8, 8), torch.full((2,), 50), torch.zeros(2, 3, 8, 8), d.schedule,
                        generator=torch.Generator().manual_seed(1000), backend=backend)
    torch.testing.assert_close(results[0]["z"], again, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backends_here())
def test_sampling_step_independent_of_requires_grad(backend):
    """A model output that requires grad (a loop without no_grad) gets the same kernel and the same noise."""
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    t = torch.tensor([0, 60])
    a = dk.p_sample(x, t, mo, S, generator=torch.Generator().manual_seed(5), backend=backend)
    b = dk.p_sample(x, t, mo.clone().requires_grad_(), S, generator=torch.Generator().manual_seed(5), backend=backend)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", backends_here())
def test_empty_batch(backend):
    s = S
    x = torch.randn(0, 3, 4)
    t = torch.zeros(0, dtype=torch.long)
    assert dk.q_sample(x, t, x, s, backend=backend).shape == (0, 3, 4)
    assert dk.p_sample(x, t, x, s, noise=x, backend=backend).shape == (0, 3, 4)
    loss, simple, vlb = dk.diffusion_loss(x, x, x, t, s, backend=backend)
    assert torch.isnan(loss) and torch.isnan(simple) and torch.isnan(vlb)
