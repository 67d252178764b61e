"""What only the Triton backend has, on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU) or on a GPU when one is present: the loss's reduction tiles, batch
chunks past CUDA's grid-y limit, the launch table, split-float coefficients, its Philox noise stream (statistics,
reproducibility, counter layout, the generator-state key), its registry entries and dispatch.

The checks every fused backend shares (values against the reference over op x dtype x shape x layout, out=,
strided inputs, out-of-range t, gradients, opcheck, torch.compile) are in tests/test_conformance.py.
Tolerances follow docs/design.md, "Tolerances" (helpers.assert_matches, one more bfloat16 ulp under the
interpreter, which truncates float32 -> bfloat16 where a GPU rounds).
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

import ddpm_kernels as dk
import helpers
from ddpm_kernels import reference as R
from ddpm_kernels._spec import StepOptions
from ddpm_kernels._stream import CUDA_OFFSET_STEP, take_philox_state
from helpers import DTYPES, assert_standard_normal, timestep_cases, triton_device

DEVICE = triton_device()
from ddpm_kernels import triton as tk  # noqa: E402
from ddpm_kernels.triton import noise as tn  # noqa: E402
from ddpm_kernels.triton import utils as tu  # noqa: E402

T = 1000

make_inputs = partial(helpers.make_inputs, device=DEVICE)
assert_matches = partial(helpers.assert_matches, bf16_truncates=tu.INTERPRETED)


@pytest.fixture(scope="module")
def schedule():
    return dk.DiffusionSchedule(timesteps=T).to(DEVICE)


def make_t(batch):
    (t,) = timestep_cases(batch, T, DEVICE)
    return t


# ------------------------------------------------------------------------------------ reductions, launches
def test_diffusion_loss_reduction_loops(schedule, monkeypatch):
    """The reduction kernel loops over batch chunks and partial-sum tiles (forced with small tiles)."""
    loss_module = importlib.import_module("ddpm_kernels.triton.loss")
    monkeypatch.setattr(loss_module, "REDUCE_BLOCK_B", 4)
    monkeypatch.setattr(loss_module, "REDUCE_BLOCK_P", 2)
    model_output, x_start, noise = make_inputs((9, 2, 300), 3, torch.float32)
    t = make_t(9)
    args = (model_output, x_start, noise, t, schedule, "v", "l2", 1.0, 0.5)
    out = tk.BACKEND.ops["diffusion_loss"](*args)
    assert_matches(out, R.diffusion_loss_ref, args, {}, torch.float32)


def test_batch_chunks_match_single_launch(schedule, monkeypatch):
    """Batches beyond CUDA's grid-y limit launch in chunks; forced here with a tiny limit."""
    x, y, z = make_inputs((5, 2, 9), 3, torch.float32)
    t = make_t(5)

    def run():
        gen = torch.Generator(DEVICE).manual_seed(3)
        return [
            tk.BACKEND.ops["q_sample"](x, t, y, schedule),
            tk.BACKEND.ops["predict_start_from_noise"](x, t, y, schedule),
            *tk.BACKEND.ops["q_posterior"](x, y, t, schedule),
            *tk.BACKEND.ops["p_mean_variance"](x, t, y, schedule, "v", True),
            tk.BACKEND.ops["p_sample"](x, t, y, schedule, "eps", True, None, gen),
            *tk.BACKEND.ops["diffusion_loss"](x, y, z, t, schedule, "v", "l2", 1.0, 0.5),
        ]

    single = run()
    monkeypatch.setattr(tu, "MAX_GRID_Y", 2)
    assert len(tu.batch_chunks(5)) == 3
    chunked = run()
    for a, b in zip(single, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_launch_config_table():
    for n, batch in [(1, 1), (7, 3), (16384, 1), (65536, 64), (2**31 + 5, 1)]:
        block, warps = tu.launch_config(n, batch)
        assert block & (block - 1) == 0 and 16 <= block <= 1024 and warps in (1, 2, 4)
    assert tu.launch_config(65536, 64) == (1024, 4)  # large: the bandwidth-bound default
    assert tu.launch_config(16384, 1)[0] < 1024  # small latent: more, smaller programs


def test_split_float_is_exact_to_float64():
    for v in (0.1, 1.0, 0.0, 1 / 3, 12345.678):
        hi, lo = tu.split_float(v)
        assert abs((hi + lo) - v) <= 1e-14 * max(1.0, abs(v))


# ---------------------------------------------------------------------------------- in-kernel noise
def _standard_noise(schedule, shape, generator=None, dtype=torch.float32):
    """z drawn in-kernel, recovered exactly: with x0 parameterization, zero inputs and t > 0, the step is
    sigma_t z."""
    x_t = torch.zeros(shape, device=DEVICE, dtype=dtype)
    t = torch.full((shape[0],), 500, device=DEVICE)
    out = dk.p_sample(x_t, t, x_t, schedule, "x0", False, generator=generator, backend="triton")
    sigma = schedule.posterior_log_variance_clipped[500].double().mul(0.5).exp()
    return out.double() / sigma


def test_noise_is_standard_normal(schedule):
    gen = torch.Generator(DEVICE).manual_seed(1234)
    z = _standard_noise(schedule, (4, 4096), gen).flatten()
    # neighbours at lags 1-4 share a Philox call or are the other Box-Muller pair; 4096 is the next sample
    assert_standard_normal(z)
    # Tails: a truncated or mis-scaled transform shows here first.
    # P(|z| > 2.5) = 0.01242; +-0.003 is 5 standard errors at this n.
    assert 0.0094 < (z.abs() > 2.5).double().mean().item() < 0.0154
    assert z.abs().max().item() > 3.0


def test_noise_deterministic_from_generator_state(schedule):
    gen = torch.Generator(DEVICE).manual_seed(99)
    a = _standard_noise(schedule, (3, 7, 5), gen)
    b = _standard_noise(schedule, (3, 7, 5), gen)
    gen.manual_seed(99)
    a2 = _standard_noise(schedule, (3, 7, 5), gen)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b), "consecutive calls must draw fresh noise"
    assert (a - b).abs().mean() > 0.5
    # Samples of one batch differ from each other.
    assert not torch.equal(a[0], a[1])


def test_noise_default_generator_follows_manual_seed(schedule):
    torch.manual_seed(5)
    a = _standard_noise(schedule, (2, 33))
    torch.manual_seed(5)
    b = _standard_noise(schedule, (2, 33))
    c = _standard_noise(schedule, (2, 33))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(b, c)


def test_noise_independent_of_launch_table(schedule, monkeypatch):
    """Noise depends on (seed, sample, element) only, so retuning block sizes keeps samples reproducible."""
    gen = torch.Generator(DEVICE)
    a = _standard_noise(schedule, (3, 1000), gen.manual_seed(4))
    monkeypatch.setattr(tu, "LAUNCH_TABLE", ((64, 1),))
    monkeypatch.setattr(tu, "MIN_PROGRAMS", 1)
    assert tu.launch_config(1000, 3)[0] == 64
    b = _standard_noise(schedule, (3, 1000), gen.manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _generator_state_noise(schedule, shape, key, offset, sample_offset=0):
    """z from the eager-CUDA noise source (a generator's Philox key and offset as kernel arguments), run
    through the op directly so the interpreter covers it on CPU."""
    x_t = torch.zeros(shape, device=DEVICE)
    t = torch.full((shape[0],), 500, device=DEVICE)
    table = schedule.table(torch.float32)
    out = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, None, key, offset, sample_offset)
    return out.double() / schedule.posterior_log_variance_clipped[500].double().mul(0.5).exp()


def test_generator_state_noise(schedule):
    z = _generator_state_noise(schedule, (2, 4096), 12345, 0)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.02
    torch.testing.assert_close(z, _generator_state_noise(schedule, (2, 4096), 12345, 0), rtol=0, atol=0)
    # A key past 2**63 arrives as a negative int64 with the same bits, and is a different stream.
    other = _generator_state_noise(schedule, (2, 4096), -(2**63) + 12345, 0)
    assert (z - other).abs().mean() > 0.5
    # Counter layout: sample b + sample_offset is its own counter word, so a batch started one sample later
    # draws the same rows shifted by one; the offset is another word (a different stream).
    a = _generator_state_noise(schedule, (3, 10), 7, 0)
    b = _generator_state_noise(schedule, (3, 10), 7, 0, sample_offset=1)
    torch.testing.assert_close(a[1:], b[:-1], rtol=0, atol=0)
    assert (a - _generator_state_noise(schedule, (3, 10), 7, 4)).abs().mean() > 0.5
    # Both key sources run one kernel: a key tensor k with zero arguments equals the argument k.
    x_t = torch.zeros(2, 50, device=DEVICE)
    t = torch.full((2,), 500, device=DEVICE)
    table = schedule.table(torch.float32)
    key = torch.tensor([2**62 + 99], device=DEVICE)
    from_tensor = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, key, 0, 0, 0)
    from_args = torch.ops.ddpm_kernels_triton.p_sample(x_t, t, x_t, table, 1, False, None, None, 2**62 + 99, 0, 0)
    torch.testing.assert_close(from_tensor, from_args, rtol=0, atol=0)


def test_take_philox_state():
    class PhiloxGenerator:  # the three methods torch's CUDA generator has
        def __init__(self, seed, offset):
            self.seed, self.offset = seed, offset

        def initial_seed(self):
            return self.seed

        def get_offset(self):
            return self.offset

        def set_offset(self, offset):
            self.offset = offset

    # One draw advances the offset by a fixed 4, whatever its size (docs/design.md, "Noise streams").
    gen = PhiloxGenerator(2**64 - 1, 8)
    assert take_philox_state(gen) == (-1, 8)
    assert gen.offset == 8 + CUDA_OFFSET_STEP == 12
    assert take_philox_state(gen) == (-1, 12)
    # CPU tensors take a key tensor drawn from the CPU generator (one 64-bit draw), offset 0.
    g = torch.Generator().manual_seed(3)
    key, key_arg, offset = tn.noise_key(g, torch.zeros(1))
    assert key_arg == 0 and offset == 0
    assert int(key) == int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_noise_other_dtypes(schedule, dtype):
    gen = torch.Generator(DEVICE).manual_seed(11)
    z = _standard_noise(schedule, (2, 2048), gen, dtype=dtype)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05


def test_opcheck_generator_state_key(schedule):
    """The eager-CUDA noise source (a generator's Philox key and offset as scalar arguments, no seed tensor),
    called directly so that the interpreter covers it on CPU."""
    for dtype in (torch.float32, torch.float64):
        x, y = make_inputs((2, 3, 5), 2, dtype)
        args = (x, make_t(2), y, schedule.table(dtype), 2, True, None, None, 2**62 + 3, 4 * 17, 5)
        torch.library.opcheck(torch.ops.ddpm_kernels_triton.p_sample, args)


# ---------------------------------------------------------------------------------------- dispatch
def test_backend_availability():
    assert tk.BACKEND.name == "triton"
    assert set(tk.BACKEND.ops) == set(R.OPS)  # every op has a Triton kernel
    assert set(tk.BACKEND.differentiable) <= set(tk.BACKEND.ops)
    assert tk.BACKEND.differentiable["q_sample"] == {"x_start", "noise"}
    assert tk.BACKEND.differentiable["get_v"] == {"x_start", "noise"}
    assert "p_sample" not in tk.BACKEND.differentiable and "ddim_step" not in tk.BACKEND.differentiable
    assert tk.BACKEND.declines("q_sample", None) is None
    assert tk.BACKEND.declines("ddim_step", StepOptions("ddim", eta=0.5)) is None
    assert tk.BACKEND.declines("ddim_step", StepOptions("euler")) is not None
    assert tk.BACKEND.unavailable_reason(torch.device(DEVICE), torch.float32) is None
    assert tk.BACKEND.unavailable_reason(torch.device(DEVICE), torch.int32) is not None
    assert tk.BACKEND.unavailable_reason(torch.device("meta"), torch.float32) is not None
    assert "triton" in dk.backends.available_backends(DEVICE)


def test_unfused_op_raises_for_explicit_backend(schedule, monkeypatch):
    """An op the backend has no kernel for (every op has one now: one is taken away here) raises for an explicit
    backend="triton" instead of running something else."""
    monkeypatch.delitem(tk.BACKEND.ops, "get_v")
    for key in list(dk.backends._selected):  # the dispatch cache (the public ops hold the same dict)
        monkeypatch.delitem(dk.backends._selected, key)
    x, y = make_inputs((2, 3), 2, torch.float32)
    with pytest.raises(dk.backends.BackendUnavailableError):
        dk.get_v(x, y, make_t(2), schedule, backend="triton")
