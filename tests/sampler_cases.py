"""The ``ddim_step`` / ``ddpm_step`` checks every fused backend must pass, written once.

tests/test_extension_sampler_ops.py (the C++/CUDA kernels) and tests/test_triton_sampler_ops.py subclass
``SamplerStepCases`` as ``TestSamplerSteps`` and provide the fixtures ``backend`` (the name passed as
``backend=``), ``device``, ``schedule`` (a linear schedule of ``T`` steps on ``device``) and ``backend_ops`` (the
backend's op table, for calls that bypass validation). Each module keeps the checks only its backend has.

Tolerances follow docs/design.md, "Tolerances" (helpers.assert_matches).
"""

from __future__ import annotations

import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels._spec import StepOptions
from ddpm_kernels import reference as R
from helpers import DTYPES, assert_matches, capture_cuda_graph, ddim_step_ref, ddpm_step_ref, make_inputs

T = 1000
# 1 element (batch 1); odd 4-D; 3-D with one channel; 16-divisible samples (the 128-bit vector paths on a GPU)
SHAPES = [(1,), (4, 3, 5, 7), (5, 1, 9), (3, 4, 8, 8)]
PARAMETERIZATIONS = ["eps", "x0", "v"]
VARIANCE_TYPES = list(R.VARIANCE_TYPES)
DDIM_OPTIONS = {
    "eta0": dict(eta=0.0),
    "eta1_clip_clipped_output": dict(eta=1.0, clip_denoised=True, use_clipped_model_output=True),
    "eta0.3_clip_range_final_alpha": dict(eta=0.3, clip_denoised=True, clip_range=1.5, set_alpha_to_one=False),
}


def backend_fixtures(backends):
    """The module-scoped fixtures ``backend`` (one per entry of ``backends``) and ``schedule`` (a linear
    schedule of ``T`` steps on the backend's device, named as the backend) of a compiled-kernel test module:
    ``backend, schedule = backend_fixtures(BACKENDS)``."""

    @pytest.fixture(scope="module", params=backends)
    def backend(request):
        return request.param

    @pytest.fixture(scope="module")
    def schedule(backend):
        return dk.DiffusionSchedule(timesteps=T).to(backend)

    return backend, schedule


def opcheck_cases(backend, schedule, dtype, guided, in_kernel_noise=False):
    """``(op, args)`` for ``torch.library.opcheck`` of the compiled ``ddpm_kernels::ddim_step`` / ``ddpm_step``
    (and ``_out``): each option path once, unguided or ``guided`` (an unconditional output and per-sample scales
    with rescale on and off). ``in_kernel_noise``: the noise-drawing calls instead (``noise=None``)."""
    x, y, z, u = make_inputs((2, 3, 5), 4, dtype, seed=14, device=backend)
    t, tp = make_steps(2, backend, seed=14)
    tab = schedule.table(torch.float64)
    wide, wide_u = torch.cat([y, z], 1), torch.cat([u, z], 1)
    w, phi = None, 0.0
    if guided:
        w = torch.tensor([2.0, 0.0], device=backend, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        phi = 0.5
    else:
        u = wide_u = None
    ops = torch.ops.ddpm_kernels
    if in_kernel_noise:
        return [
            (ops.ddim_step, (x, t, tp, y, u, w, tab, 1.0, "eps", True, 1.0, True, False, phi, None, None, 5, True)),
            (ops.ddpm_step, (x, t, tp, y, u, w, tab, "eps", "fixed_large", True, 1.0, phi, None, None, 7, False)),
        ]
    return [
        (ops.ddim_step, (x, t, tp, y, u, w, tab, 0.0, "eps", False, 1.0, True, False, phi, None, None, 0, False)),
        (ops.ddim_step, (x, t, tp, y, u, w, tab, 1.0, "v", True, 1.5, False, True, 0.0, z, None, 3, True)),
        (ops.ddim_step_out, (x, t, tp, y, u, w, tab, 0.5, "x0", True, 1.0, True, False, phi, z, None, 0, True,
                             torch.empty_like(x))),
        (ops.ddpm_step, (x, t, tp, y, u, w, tab, "eps", "fixed_small", True, 1.0, phi, z, None, 0, True)),
        (ops.ddpm_step, (x, t, tp, wide, wide_u, w, tab, "v", "learned_range", False, 1.0, phi, z, None, 2, False)),
        (ops.ddpm_step_out, (x, t, tp, wide, wide_u, w, tab, "x0", "learned", True, 2.0, 0.0, z, None, 0, False,
                             torch.empty_like(x))),
    ]


def make_steps(batch, device, seed=0):
    """Per-sample (t, t_prev): sample 0 is the last step (0 -> -1), the last sample starts the chain
    (T-1 -> T-21), sample 1 is the plain chain (1 -> 0), the others respaced jumps (some to -1)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (batch,), generator=g)
    t_prev = (t - torch.randint(1, 60, (batch,), generator=g)).clamp(min=-1)
    if batch > 1:
        t[-1] = T - 1
        t_prev[-1] = T - 21
    if batch > 2:
        t[1] = 1
        t_prev[1] = 0
    t[0], t_prev[0] = 0, -1
    return t.to(device), t_prev.to(device)


def learned_output(shape, dtype, device, variance_type, seed=0):
    """``(B, 2C, ...)``: a prediction, then log-variances in [-12, 0] (``learned``) or values in [-1, 1]
    (``learned_range``)."""
    pred, extra = make_inputs(shape, 2, torch.float64, seed=seed + 50, device=device)
    extra = -3.0 * extra.abs() if variance_type == "learned" else extra.clamp(-1, 1)
    return torch.cat([pred, extra], dim=1).to(dtype)


def ddpm_noise(backend, device, schedule, shape, generator=None):
    """z from ddpm_step's in-kernel draw: x0 parameterization with x_t = x0 = 0 makes the mean 0, so the
    output is std * z."""
    zeros = torch.zeros(shape, device=device)
    t = torch.full((shape[0],), 500, device=device)
    out = dk.ddpm_step(zeros, t, t - 20, zeros, schedule, "x0", "fixed_large", False, generator=generator,
                       backend=backend)
    ab = schedule.coefficients64[1]
    beta = 1 - ab[500] / ab[480]
    return out.double() / beta.sqrt()


def ddim_noise(backend, device, schedule, shape, generator=None):
    """z from ddim_step's in-kernel draw (eta 1, x0 parameterization, zero inputs: the output is sigma * z)."""
    zeros = torch.zeros(shape, device=device)
    t = torch.full((shape[0],), 500, device=device)
    out = dk.ddim_step(zeros, t, t - 20, zeros, schedule, 1.0, "x0", generator=generator, backend=backend)
    ab = schedule.coefficients64[1]
    a, p = ab[500], ab[480]
    sigma = ((1 - p) / (1 - a) * (1 - a / p)).sqrt()
    return out.double() / sigma


def replay_new_steps(graph, t, t_prev):
    """Write new steps into the captured ``t`` / ``t_prev`` (the last step and the chain's start among them),
    replay ``graph`` and yield, for two sets of steps."""
    for new_t, new_prev in (([500, 1, 0, 998], [480, 0, -1, 978]), ([3, 700, 250, 0], [-1, 650, 249, -1])):
        t.copy_(torch.tensor(new_t))
        t_prev.copy_(torch.tensor(new_prev))
        graph.replay()
        torch.cuda.synchronize()
        yield


class SamplerStepCases:
    # Triton's interpreter truncates float32 -> bfloat16 where a GPU rounds: one more bfloat16 ulp allowed
    BF16_TRUNCATES = False

    def check(self, got, ref_fn, args, kwargs, dtype):
        assert_matches(got, ref_fn, args, kwargs, dtype, bf16_truncates=self.BF16_TRUNCATES)

    # ------------------------------------------------------------------------------------------ DDIM
    @pytest.mark.parametrize("options", list(DDIM_OPTIONS))
    @pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_ddim_step(self, backend, device, schedule, dtype, shape, parameterization, options):
        o = dict(DDIM_OPTIONS[options])
        eta, clip = o.pop("eta"), o.pop("clip_denoised", False)
        x_t, model_output, noise = make_inputs(shape, 3, dtype, seed=1, device=device)
        t, t_prev = make_steps(shape[0], device, seed=1)
        got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, eta, parameterization, clip, noise=noise,
                           backend=backend, return_pred_x0=True, **o)
        self.check(got, ddim_step_ref, (x_t, t, t_prev, model_output, schedule, eta, parameterization, clip),
                   dict(noise=noise, return_pred_x0=True, **o), dtype)

    # ------------------------------------------------------------------------------------------ DDPM
    @pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
    @pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
    @pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_ddpm_step(self, backend, device, schedule, dtype, shape, parameterization, variance_type):
        x_t, noise, model_output = make_inputs(shape, 3, dtype, seed=2, device=device)
        if variance_type.startswith("learned"):
            model_output = learned_output(shape, dtype, device, variance_type, seed=2)
        t, t_prev = make_steps(shape[0], device, seed=2)
        clip = parameterization != "x0"
        got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip,
                           noise=noise, backend=backend, return_pred_x0=True)
        self.check(
            got, ddpm_step_ref, (x_t, t, t_prev, model_output, schedule, parameterization, variance_type, clip),
            dict(noise=noise, return_pred_x0=True), dtype,
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
    def test_ddpm_step_cosine_clip_range(self, backend, device, dtype):
        cosine = dk.DiffusionSchedule("cosine", timesteps=T).to(device)
        x_t, model_output, noise = make_inputs((4, 3, 9, 5), 3, dtype, seed=4, scale=3.0, device=device)
        t, t_prev = make_steps(4, device, seed=4)
        got = dk.ddpm_step(x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True, noise=noise,
                           backend=backend, clip_range=2.0)
        self.check(got, ddpm_step_ref, (x_t, t, t_prev, model_output, cosine, "v", "fixed_large", True),
                   dict(noise=noise, clip_range=2.0), dtype)

    def test_ddpm_step_on_the_full_chain_is_p_sample(self, backend, device, schedule):
        """t_prev = t - 1 with fixed_small is p_sample, for given noise and for in-kernel noise from the same
        generator state (both ops key Philox the same way)."""
        x_t, model_output, noise = make_inputs((4, 3, 5, 5), 3, torch.float32, seed=5, device=device)
        t = torch.tensor([0, 1, 500, 999], device=device)
        for kwargs in (dict(noise=noise), dict(generator=torch.Generator(device).manual_seed(11))):
            got = dk.ddpm_step(x_t, t, t - 1, model_output, schedule, "v", "fixed_small", True, backend=backend,
                               **kwargs)
            if "generator" in kwargs:
                kwargs = dict(generator=torch.Generator(device).manual_seed(11))
            expected = dk.p_sample(x_t, t, model_output, schedule, "v", True, backend=backend, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def test_learned_variance_non_contiguous_model_output(self, backend, device, schedule):
        x_t, noise = make_inputs((3, 2, 4, 5), 2, torch.float32, seed=6, device=device)
        model_output = learned_output((3, 2, 5, 4), torch.float32, device, "learned_range", seed=6).transpose(2, 3)
        assert not model_output.is_contiguous()
        t, t_prev = make_steps(3, device, seed=6)
        got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise,
                           backend=backend)
        expected = ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "learned_range", noise=noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("schedule_kind", ["linear", "cosine", "zero_terminal_snr"])
    def test_steps_across_the_chain_float32(self, backend, device, schedule_kind):
        """Steps across the chain in one batch, for the plain chain (t_prev = t - 1: ``1 - ab_t / ab_prev`` is
        ~1e-4 near t = 0, where a float32 subtraction would cancel) and a respaced one (t_prev = t - 37), eta 0
        and 1, against the float32 reference at 1e-5."""
        if schedule_kind == "zero_terminal_snr":
            s = dk.DiffusionSchedule(timesteps=T, zero_terminal_snr=True).to(device)
            parameterization = "v"  # eps is undefined where ab_t = 0
        else:
            s = dk.DiffusionSchedule(schedule_kind, timesteps=T).to(device)
            parameterization = "eps"
        # the first 20 steps (where the cancellation is worst), the last 8, and a spread between
        t = torch.cat([torch.arange(20), torch.linspace(20, T - 9, 20).long(), torch.arange(T - 8, T)]).to(device)
        x_t, model_output, noise = make_inputs((t.shape[0], 3), 3, torch.float32, seed=3, device=device)
        for k in (1, 37):
            t_prev = (t - k).clamp(min=-1)
            for eta in (0.0, 1.0):
                got = dk.ddim_step(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                                   backend=backend, return_pred_x0=True)
                ref = ddim_step_ref(x_t, t, t_prev, model_output, s, eta, parameterization, noise=noise,
                                      return_pred_x0=True)
                for a, b in zip(got, ref):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            for variance_type in ("fixed_small", "fixed_large", "learned_range"):
                mo = model_output
                if variance_type == "learned_range":
                    mo = torch.cat([model_output, noise.clamp(-1, 1)], 1)
                got = dk.ddpm_step(x_t, t, t_prev, mo, s, parameterization, variance_type, False, noise=noise,
                                   backend=backend)
                ref = ddpm_step_ref(x_t, t, t_prev, mo, s, parameterization, variance_type, False, noise=noise)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # ------------------------------------------------------------------------------------ out= / x0
    @pytest.mark.parametrize("op", ["ddim_step", "ddpm_step"])
    def test_out_in_place_and_non_contiguous(self, backend, device, schedule, op):
        x_t, model_output, noise = make_inputs((3, 4, 5), 3, torch.float32, seed=7, device=device)
        t, t_prev = make_steps(3, device, seed=7)
        fn = getattr(dk, op)
        extra = (1.0,) if op == "ddim_step" else ()  # eta: exercise the noise term
        expected, expected_x0 = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend,
                                   return_pred_x0=True)
        x = x_t.clone()
        result, x0 = fn(x, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=x,
                        return_pred_x0=True)
        assert result is x
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        torch.testing.assert_close(x0, expected_x0, rtol=0, atol=0)
        out = torch.empty_like(x_t)
        assert fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=out) is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out = torch.empty(3, 5, 4, device=device).transpose(1, 2)
        result = fn(x_t, t, t_prev, model_output, schedule, *extra, noise=noise, backend=backend, out=out)
        assert result is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # in place with in-kernel noise equals the out-of-place result from the same generator state
        g = torch.Generator(device)
        expected = fn(x_t, t, t_prev, model_output, schedule, *extra, generator=g.manual_seed(8), backend=backend)
        x = x_t.clone()
        fn(x, t, t_prev, model_output, schedule, *extra, generator=g.manual_seed(8), backend=backend, out=x)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)

    def test_strided_inputs(self, backend, device, schedule):
        """Non-contiguous x_t, model_output, noise and strided t / t_prev views give the reference's result."""
        inputs = make_inputs((3, 5, 4), 3, torch.float32, seed=18, device=device)
        x_t, model_output, noise = (a.transpose(1, 2) for a in inputs)
        steps = torch.tensor([[5, 4, 900], [500, 480, 7], [999, 979, 3]], device=device)
        t, t_prev = steps[:, 0], steps[:, 1]
        assert not t.is_contiguous() and not x_t.is_contiguous()
        got = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise, backend=backend)
        ref = ddim_step_ref(x_t, t, t_prev, model_output, schedule, 1.0, "v", True, noise=noise)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        got = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise,
                           backend=backend)
        ref = ddpm_step_ref(x_t, t, t_prev, model_output, schedule, "eps", "fixed_large", noise=noise)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    def test_out_of_range_steps_give_nan(self, device, schedule, backend_ops):
        """Validation bypassed (backend functions called directly): t outside [0, T) or t_prev outside [-1, T)
        gives NaN for that sample only; nothing is read outside the table."""
        x, y, z = make_inputs((5, 3, 4), 3, torch.float32, seed=8, device=device)
        t = torch.tensor([-1, 3, T, 2**40, 10], device=device)
        t_prev = torch.tensor([-1, 2, 5, 1, -2], device=device)
        bad = torch.tensor([True, False, True, True, True], device=device)
        ops = backend_ops
        prev, x0 = ops["ddim_step"](
            x, t, t_prev, y, schedule, StepOptions("ddim", "eps", eta=1.0, clip_denoised=True, return_pred_x0=True), z
        )
        results = [
            prev,
            ops["ddim_step"](x, t, t_prev, y, schedule, StepOptions("ddim", "v")),
            ops["ddpm_step"](x, t, t_prev, y, schedule, StepOptions("ddpm", "x0", clip_denoised=True), z),
            ops["ddpm_step"](
                x, t, t_prev, torch.cat([y, z], 1), schedule, StepOptions("ddpm", "eps", "learned_range"), None
            ),
        ]
        for r in results:
            flat = r.reshape(5, -1)
            assert bool(flat[bad].isnan().all())
            assert bool(flat[~bad].isfinite().all())
        # the predicted x0 depends on t only
        t_bad = torch.tensor([True, False, True, True, False], device=device)
        assert bool(x0.reshape(5, -1)[t_bad].isnan().all()) and bool(x0.reshape(5, -1)[~t_bad].isfinite().all())

    def test_ddim_last_step_with_alpha_one_returns_x0(self, backend, device, schedule):
        x_t, model_output, noise = make_inputs((2, 4), 3, torch.float32, seed=13, device=device)
        t, t_prev = torch.tensor([3, 0], device=device), torch.tensor([-1, -1], device=device)
        out, x0 = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 1.0, noise=noise, backend=backend,
                               return_pred_x0=True)
        torch.testing.assert_close(out, x0, rtol=0, atol=0)

    def test_zero_elements(self, backend, device, schedule):
        x = torch.empty(2, 0, 3, device=device)
        t, t_prev = torch.tensor([5, 1], device=device), torch.tensor([4, -1], device=device)
        out, x0 = dk.ddim_step(x, t, t_prev, x, schedule, 1.0, backend=backend, return_pred_x0=True)
        assert out.shape == x.shape and x0.shape == x.shape
        assert dk.ddpm_step(x, t, t_prev, x, schedule, backend=backend).shape == x.shape

    # ---------------------------------------------------------------------------------------- noise
    @pytest.mark.parametrize("draw", [ddpm_noise, ddim_noise], ids=["ddpm", "ddim"])
    def test_in_kernel_noise(self, backend, device, schedule, draw):
        """Standard normal, reproducible from the generator state, fresh on every call, different per sample."""
        gen = torch.Generator(device).manual_seed(99)
        a = draw(backend, device, schedule, (2, 4096), gen)
        b = draw(backend, device, schedule, (2, 4096), gen)
        a2 = draw(backend, device, schedule, (2, 4096), gen.manual_seed(99))
        torch.testing.assert_close(a, a2, rtol=0, atol=0)
        assert (a - b).abs().mean() > 0.5
        assert not torch.equal(a[0], a[1])
        for z in (a, b):
            assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03
        torch.manual_seed(5)
        c = draw(backend, device, schedule, (2, 33))
        torch.manual_seed(5)
        torch.testing.assert_close(c, draw(backend, device, schedule, (2, 33)), rtol=0, atol=0)

    def test_ddim_eta0_draws_nothing(self, backend, device, schedule):
        x_t, model_output, noise = make_inputs((2, 3, 4), 3, torch.float32, seed=12, device=device)
        t, t_prev = make_steps(2, device, seed=12)
        gen = torch.Generator(device).manual_seed(0)
        state = gen.get_state()
        a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, generator=gen, backend=backend)
        assert torch.equal(gen.get_state(), state)
        b = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.0, noise=noise, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_ddpm_step_advances_the_generator(self, backend, device, schedule):
        x_t, model_output = make_inputs((2, 3, 4), 2, torch.float32, seed=19, device=device)
        t, t_prev = make_steps(2, device, seed=19)
        gen = torch.Generator(device).manual_seed(0)
        a = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend=backend)
        b = dk.ddpm_step(x_t, t, t_prev, model_output, schedule, generator=gen, backend=backend)
        assert not torch.equal(a[1:], b[1:])  # sample 0 is t = 0: no noise there
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)

    # ------------------------------------------------------------------------------------- GPU only
    @pytest.mark.gpu
    def test_cuda_graph_replay_reads_new_steps(self, backend, device, schedule):
        """t and t_prev are read in-kernel from the captured tensors: new values and a replay give the new
        step."""
        if device != "cuda":
            pytest.skip("CUDA graphs")
        x_t, model_output, noise = make_inputs((4, 4, 16, 16), 3, torch.float32, seed=20, device=device)
        wide = torch.cat([model_output, noise.clamp(-1, 1)], 1)
        t = torch.full((4,), 999, device=device, dtype=torch.int64)
        t_prev = torch.full((4,), 979, device=device, dtype=torch.int64)

        def step():
            a = dk.ddim_step(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise, backend=backend)
            b = dk.ddpm_step(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise, backend=backend)
            return a, b

        graph, (a, b) = capture_cuda_graph(step)
        for _ in replay_new_steps(graph, t, t_prev):
            torch.testing.assert_close(
                a, ddim_step_ref(x_t, t, t_prev, model_output, schedule, 0.7, "eps", True, noise=noise),
                rtol=1e-5, atol=1e-5,
            )
            torch.testing.assert_close(
                b, ddpm_step_ref(x_t, t, t_prev, wide, schedule, "v", "learned_range", noise=noise),
                rtol=1e-5, atol=1e-5,
            )
