"""The reference (the specification of every fused backend) against independent float64 math."""

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
import fp64_math as m
from helpers import DTYPES, SHAPES, assert_close_to_fp64, make, np64, timesteps

SCHEDULES = ["linear", "cosine", "sqrt_linear", "sqrt"]
PARAMS = ["eps", "x0", "v"]
T = 1000

_schedules = {}


def schedule_and_tables(name):
    if name not in _schedules:
        _schedules[name] = (dk.DiffusionSchedule(name, timesteps=T), m.Tables(m.betas(name, T)))
    return _schedules[name]


def inputs(shape, dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = timesteps(shape[0], T, g)
    return t, [make(shape, dtype, g) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES)
class TestForwardProcess:
    @pytest.mark.parametrize("op", ["q_sample", "predict_start_from_noise", "predict_noise_from_start"])
    def test_two_input_op(self, schedule, shape, dtype, op):
        """q_sample(x0, eps), predict_start_from_noise(xt, eps), predict_noise_from_start(xt, x0): one
        signature, ``op(first, t, second, schedule)``."""
        s, tb = schedule_and_tables(schedule)
        t, (first, second) = inputs(shape, dtype, 2)
        out = getattr(dk, op)(first, t, second, s, backend="reference")
        assert out.shape == first.shape
        expected = getattr(m, op)(tb, np64(first), np64(t), np64(second))
        assert_close_to_fp64(out, *expected, dtype, op)

    def test_v_helpers(self, schedule, shape, dtype):
        s, tb = schedule_and_tables(schedule)
        t, (x0, eps, v) = inputs(shape, dtype, 3)
        got = dk.get_v(x0, eps, t, s, backend="reference")
        assert_close_to_fp64(got, *m.v_target(tb, np64(x0), np64(t), np64(eps)), dtype, "get_v")
        got = dk.predict_start_from_z_and_v(x0, t, v, s, backend="reference")
        assert_close_to_fp64(got, *m.x0_from_v(tb, np64(x0), np64(t), np64(v)), dtype, "x0 from v")
        got = dk.predict_eps_from_z_and_v(x0, t, v, s, backend="reference")
        assert_close_to_fp64(got, *m.eps_from_v(tb, np64(x0), np64(t), np64(v)), dtype, "eps from v")

    def test_q_posterior(self, schedule, shape, dtype):
        s, tb = schedule_and_tables(schedule)
        t, (x0, xt) = inputs(shape, dtype, 2)
        mean, var, log_var = dk.q_posterior(x0, xt, t, s, backend="reference")
        e_mean, scale, e_var, e_log_var = m.posterior(tb, np64(x0), np64(xt), np64(t))
        assert_close_to_fp64(mean, e_mean, scale, dtype, "posterior mean")
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert var.shape == log_var.shape == (shape[0],) + (1,) * (len(shape) - 1)
        assert_close_to_fp64(var, e_var, e_var, table_dtype, "posterior variance")
        assert_close_to_fp64(log_var, e_log_var, np.abs(e_log_var), table_dtype, "posterior log variance")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
class TestReverseProcess:
    @pytest.mark.parametrize("schedule", ["linear", "cosine"])
    def test_p_mean_variance(self, schedule, shape, dtype, parameterization, clip):
        s, tb = schedule_and_tables(schedule)
        t, (xt, mo) = inputs(shape, dtype, 2, seed=1)
        mean, var, log_var = dk.p_mean_variance(xt, t, mo, s, parameterization, clip, backend="reference")
        e_mean, scale, e_var, e_log_var = m.p_mean_variance(tb, np64(xt), np64(t), np64(mo), parameterization, clip)
        assert_close_to_fp64(mean, e_mean, scale, dtype, "p_mean_variance mean")
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close_to_fp64(log_var, e_log_var, np.abs(e_log_var), table_dtype, "log variance")

    @pytest.mark.parametrize("schedule", SCHEDULES)
    def test_p_sample_given_noise(self, schedule, shape, dtype, parameterization, clip):
        s, tb = schedule_and_tables(schedule)
        t, (xt, mo, z) = inputs(shape, dtype, 3, seed=2)
        out = dk.p_sample(xt, t, mo, s, parameterization, clip, noise=z, backend="reference")
        expected = m.p_sample(tb, np64(xt), np64(t), np64(mo), np64(z), parameterization, clip)
        assert_close_to_fp64(out, *expected, dtype, "p_sample")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("loss_type", ["l1", "l2"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_loss(schedule, shape, dtype, parameterization, loss_type):
    s, tb = schedule_and_tables(schedule)
    t, (mo, x0, eps) = inputs(shape, dtype, 3, seed=3)
    weights = (0.7, 0.3)
    got = dk.diffusion_loss(mo, x0, eps, t, s, parameterization, loss_type, *weights, backend="reference")
    expected = m.diffusion_loss(tb, np64(mo), np64(x0), np64(eps), np64(t), parameterization, loss_type, *weights)
    for name, g, e in zip(("loss", "loss_simple", "loss_vlb"), got, expected):
        assert g.shape == ()
        # a mean of positive terms: float32 accumulation error stays within a few ulps of the result
        assert_close_to_fp64(g, e, 4 * abs(e), dtype, name)


def test_p_sample_no_noise_at_t0():
    s = dk.DiffusionSchedule(timesteps=10)
    g = torch.Generator().manual_seed(0)
    xt, mo = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 5])
    a = dk.p_sample(xt, t, mo, s, noise=torch.randn(2, 3, 4, 4, generator=g), backend="reference")
    b = dk.p_sample(xt, t, mo, s, noise=torch.randn(2, 3, 4, 4, generator=g), backend="reference")
    mean, _, _ = dk.p_mean_variance(xt, t, mo, s, backend="reference")
    torch.testing.assert_close(a[0], mean[0], rtol=0, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert not torch.allclose(a[1], b[1])


def test_p_sample_generator_noise_is_the_stream():
    """noise=None draws the noise stream of x's shape from the generator (docs/design.md, "Noise streams"): the
    same as passing `randn_stream` of the same generator state as noise."""
    s = dk.DiffusionSchedule(timesteps=50)
    x = torch.randn(3, 2, 5, 5)
    mo = torch.randn(3, 2, 5, 5)
    t = torch.tensor([0, 20, 49])
    g = torch.Generator().manual_seed(123)
    drawn = dk.p_sample(x, t, mo, s, generator=g, backend="reference")
    z = dk.randn_stream(x.shape, torch.Generator().manual_seed(123), backend="reference")
    key = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(123)))
    assert torch.equal(z, dk.reference.philox_normal(key, 0, 0, 3, 50).reshape(x.shape))
    given = dk.p_sample(x, t, mo, s, noise=z, backend="reference")
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)
    # the generator advanced: the next call draws fresh noise
    again = dk.p_sample(x, t, mo, s, generator=g, backend="reference")
    assert not torch.equal(drawn[1:], again[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_and_in_place(dtype):
    s = dk.DiffusionSchedule(timesteps=100)
    g = torch.Generator().manual_seed(0)
    x, mo, z = (make((2, 3, 4, 5), dtype, g) for _ in range(3))
    t = torch.tensor([3, 99])
    expected = dk.p_sample(x, t, mo, s, noise=z, backend="reference")
    out = torch.empty_like(x)
    assert dk.p_sample(x, t, mo, s, noise=z, backend="reference", out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x_inplace = x.clone()
    dk.p_sample(x_inplace, t, mo, s, noise=z, backend="reference", out=x_inplace)
    torch.testing.assert_close(x_inplace, expected, rtol=0, atol=0)
    q = dk.q_sample(x, t, z, s, backend="reference")
    q_out = x.clone()
    dk.q_sample(q_out, t, z, s, backend="reference", out=q_out)
    torch.testing.assert_close(q_out, q, rtol=0, atol=0)


def test_non_contiguous_inputs():
    s = dk.DiffusionSchedule(timesteps=100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, 3, generator=g).permute(0, 3, 1, 2)  # channels_last-like strides
    z = torch.randn(4, 3, 6, 16, generator=g)[..., ::2]  # strided
    t = torch.tensor([0, 1, 50, 99])
    got = dk.q_sample(x, t, z, s, backend="reference")
    expected = dk.q_sample(x.contiguous(), t, z.contiguous(), s, backend="reference")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_out_of_range_t_on_device_path_gives_nan_not_a_crash():
    """With the value check skipped (as for device tensors), the gather never reads outside the tables."""
    s = dk.DiffusionSchedule(timesteps=10)
    x, z = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([-1, 5, 10])
    out = dk.reference.q_sample_ref(x, t, z, s)
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[1]).all()


def test_nan_and_inf_propagate():
    s = dk.DiffusionSchedule(timesteps=10)
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 0.5]])
    z = torch.zeros(2, 2)
    t = torch.tensor([3, 4])
    out = dk.q_sample(x, t, z, s, backend="reference")
    assert torch.isnan(out[0, 0]) and torch.isinf(out[1, 0])
    out = dk.p_sample(x, t, z, s, parameterization="x0", clip_denoised=False, noise=z, backend="reference")
    assert torch.isnan(out[0, 0]) and torch.isinf(out[1, 0])
