"""Mixed float dtypes (docs/design.md, "Mixed precision"): a bf16/fp16 model output (or noise) with fp32 data,
as under ``torch.autocast``, gives torch's type promotion of the inputs — the call with every operand in the
promoted dtype — on every backend; gradients come back in each input's own dtype; GaussianDiffusion trains
and samples under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddpm_kernels as dk
from ddpm_kernels import backends

T = 50
S = dk.DiffusionSchedule("linear", timesteps=T)
LOW = (torch.bfloat16, torch.float16)


def _backends():
    names = ["reference"] + [b for b in dk.available_backends("cpu") if b in ("cpu", "triton")]
    return names


def _inputs(shape=(3, 2, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(4)], torch.tensor([0, 17, T - 1])


# (name, call(x, y, z, t, backend)) where y is the operand whose dtype differs (the model output or noise)
CALLS = {
    "q_sample": lambda x, y, z, t, b: dk.q_sample(x, t, y, S, backend=b),
    "predict_start_from_noise": lambda x, y, z, t, b: dk.predict_start_from_noise(x, t, y, S, backend=b),
    "get_v": lambda x, y, z, t, b: dk.get_v(x, y, t, S, backend=b),
    "q_posterior": lambda x, y, z, t, b: dk.q_posterior(y, x, t, S, backend=b),
    "p_mean_variance": lambda x, y, z, t, b: dk.p_mean_variance(x, t, y, S, "v", backend=b),
    "p_sample": lambda x, y, z, t, b: dk.p_sample(x, t, y, S, noise=z, backend=b),
    "p_sample_low_noise": lambda x, y, z, t, b: dk.p_sample(x, t, z, S, noise=y, backend=b),
    "diffusion_loss": lambda x, y, z, t, b: dk.diffusion_loss(y, x, z, t, S, "v", original_elbo_weight=0.5, backend=b),
    "ddim_step": lambda x, y, z, t, b: dk.ddim_step(x, t, t - 1, y, S, eta=0.5, noise=z, backend=b),
    "ddpm_step": lambda x, y, z, t, b: dk.ddpm_step(x, t, t - 1, y, S, noise=z, backend=b),
    "flow_interpolate": lambda x, y, z, t, b: dk.flow_interpolate(x, y, t.float() / T, backend=b),
    "flow_step": lambda x, y, z, t, b: dk.flow_step(x, y, torch.linspace(1, 0, T + 1), t, noise=z,
                                                    stochastic=True, backend=b),
    "flow_step_guided": lambda x, y, z, t, b: dk.flow_step(x, y, torch.linspace(1, 0, T + 1), t, backend=b,
                                                           guidance_scale=3.0, uncond=z, guidance_rescale=0.5),
    "flow_loss": lambda x, y, z, t, b: dk.flow_loss(y, x, z, (t.float() + 1) / (T + 1), "cosmap", backend=b),
}


def _tuple(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("name", list(CALLS))
def test_low_precision_operand_promotes(name, low, backend):
    """The low-precision operand is read as float32: exactly the all-float32 call (the cast is exact), results in
    float32."""
    op = next(o for o in backends.reference.OPS if name.startswith(o))
    if backend != "reference" and op not in backends.get_backend(backend, torch.device("cpu"), torch.float32).ops:
        pytest.skip(f"{backend}: no fused {op}")
    (x, y, z, _), t = _inputs((3, 2, 3, 5) if backend == "triton" else (3, 2, 5, 7))
    y_low = y.to(low)
    got = _tuple(CALLS[name](x, y_low, z, t, backend))
    expected = _tuple(CALLS[name](x, y_low.float(), z, t, backend))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32 == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_promotion_follows_torch():
    """float64 with float32 gives float64; bf16 with fp16 gives float32; every output kind follows."""
    (x, y, z, _), t = _inputs()
    assert dk.q_sample(x, t, y.double(), S, backend="reference").dtype == torch.float64
    out = dk.q_sample(x.bfloat16(), t, y.half(), S)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dk.q_sample(x.bfloat16().float(), t, y.half().float(), S), rtol=0, atol=0)
    mean, var, log_var = dk.q_posterior(y.bfloat16(), x, t, S)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


def test_in_place_step_with_low_precision_model_output():
    """An fp32 sampling buffer stepped in place with a bf16 model output (the autocast sampling loop)."""
    (x, y, z, _), t = _inputs()
    expected = dk.p_sample(x, t, y.bfloat16().float(), S, noise=z)
    buf = x.clone()
    assert dk.p_sample(buf, t, y.bfloat16(), S, noise=z, out=buf) is buf
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="out: expected dtype torch.float32"):  # the promoted result does not fit a bf16 out
        dk.p_sample(x.bfloat16(), t, y, S, noise=z, out=torch.empty_like(x, dtype=torch.bfloat16))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", _backends())
def test_gradients_in_each_inputs_dtype(backend):
    (x, y, z, _), t = _inputs((3, 2, 3, 5))
    for low in LOW:
        mo = y.to(low).requires_grad_()
        loss, _, _ = dk.diffusion_loss(mo, x, z, t, S, backend=backend)
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, mo)
        assert g.dtype == low
        mo32 = y.to(low).float().requires_grad_()
        (g32,) = torch.autograd.grad(dk.diffusion_loss(mo32, x, z, t, S, backend=backend)[0], mo32)
        torch.testing.assert_close(g, g32.to(low), rtol=0, atol=0)
        noise = z.to(low).requires_grad_()
        x_start = x.clone().requires_grad_()
        gx, gn = torch.autograd.grad(dk.q_sample(x_start, t, noise, S, backend=backend).sum(), (x_start, noise))
        assert gx.dtype == torch.float32 and gn.dtype == low
        flow_backend = backend if backend == "reference" or "flow_loss" in backends.get_backend(
            backend, torch.device("cpu"), torch.float32).ops else "reference"
        fl = dk.flow_loss(mo, x, z, (t.float() + 1) / (T + 1), backend=flow_backend)
        (gf,) = torch.autograd.grad(fl, mo)
        assert fl.dtype == torch.float32 and gf.dtype == low


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, tt], dim=1))


def test_gaussian_diffusion_trains_and_samples_under_autocast():
    """Under CPU autocast (bf16) the model returns bf16 while the data stays fp32: the loss is fp32 and
    differentiable into the model's parameters, and the sampling loop runs in fp32 in place."""
    torch.manual_seed(0)
    diffusion = dk.GaussianDiffusion(_Tiny(), S, image_size=6, channels=2)
    x0 = torch.randn(4, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert diffusion.model(x0, torch.zeros(4, dtype=torch.long)).dtype == torch.bfloat16
        loss, logs = diffusion(x0)
    assert loss.dtype == torch.float32 and bool(loss.isfinite())
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in diffusion.model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        samples = diffusion.sample(batch_size=2, progress=False, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float32 and samples.shape == (2, 2, 6, 6) and bool(samples.isfinite().all())


def test_auto_serves_mixed_calls_with_the_fused_backend():
    """Promotion happens before dispatch: a mixed call is a plain float32 call to the backends."""
    if "cpu" not in dk.available_backends("cpu"):
        pytest.skip("the compiled CPU backend is not built")
    name, _ = backends.resolve("p_sample", "auto", torch.device("cpu"), torch.float32, None, None)
    assert name == "cpu"
