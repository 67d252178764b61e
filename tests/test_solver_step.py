"""The multistep-solver step (``ddpm_kernels.solvers.solver_step``): the reference against independent float64
math written from the column definitions (docs/design.md, "Multistep solvers"), the history ring and
last-sample state, the zero-coefficient rule, per-sample rows, thresholding, guidance, noise and the argument
checks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import ddpm_kernels as dk
from ddpm_kernels.reference import solver_step_ref
from ddpm_kernels.solvers import SolverColumns, _step_options, new_history, solver_step
from helpers import DTYPES, allowed_error, make_inputs

SHAPE = (3, 2, 5, 7)
SLOTS = 3
STEPS = 6


def _table(slots=SLOTS, steps=STEPS, seed=0, density=0.7):
    """Random coefficients, about a third of them exactly zero (the unread terms)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn((steps, SolverColumns(slots).width), generator=g, dtype=torch.float64)
    return table * (torch.rand(table.shape, generator=g, dtype=torch.float64) < density)


def _np(x):
    return x.detach().cpu().double().numpy()


def _threshold64(x0, ratio, max_value):
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def _step64(x, y, table, index, history, last, z, clip=None, threshold=None):
    """The step per sample in float64 from the column definitions; returns (x', history', last')."""
    slots = 0 if history is None else history.shape[0]
    col = SolverColumns(slots)
    history = None if history is None else history.copy()
    prev = np.empty_like(x)
    x_c = np.empty_like(x)
    for b, i in enumerate(index):
        r = table[i] if 0 <= i < table.shape[0] else np.full(col.width, np.nan)

        def term(k, tensor):
            return 0.0 if r[k] == 0 else r[k] * tensor

        x0 = term(col.x0_sample, x[b]) + term(col.x0_output, y[b])
        if threshold is not None:
            x0 = _threshold64(x0[None], *threshold)[0]
        elif clip is not None:
            x0 = np.clip(x0, -clip, clip)
        m = term(col.m_sample, x[b]) + term(col.m_x0, x0) + term(col.m_output, y[b])
        past = [history[(i - j) % slots, b] for j in range(1, slots + 1)]
        x_c[b] = term(col.c_sample, x[b]) + (0.0 if last is None else term(col.c_last, last[b])) + term(col.c_m, m)
        x_c[b] += sum((term(col.c_hist + j, h) for j, h in enumerate(past)), 0.0)
        prev[b] = term(col.p_xc, x_c[b]) + term(col.p_m, m) + sum(
            (term(col.p_hist + j, h) for j, h in enumerate(past)), 0.0)
        if z is not None:
            prev[b] += term(col.p_noise, z[b])
        if slots:
            history[i % slots, b] = m
    return prev, history, x_c


def _state(dtype, seed=1, slots=SLOTS):
    x, y, z, last = make_inputs(SHAPE, 4, dtype, seed=seed)
    history = torch.stack(make_inputs(SHAPE, slots, dtype, seed=seed + 1)) if slots else None
    return x, y, z, last, history


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_reference_matches_float64(dtype, stochastic):
    x, y, z, last, history = _state(dtype)
    table = _table()
    index = torch.tensor([0, 4, 2])
    expected, history64, last64 = _step64(_np(x), _np(y), _np(table), index.tolist(), _np(history), _np(last),
                                          _np(z) if stochastic else None)
    got = solver_step(x, y, table, index, history=history, last_sample=last, noise=z if stochastic else None,
                      backend="reference")
    assert got.dtype == dtype and history.dtype == dtype and last.dtype == dtype
    # every term is at most 3 roundings away; the magnitudes bound them (docs/design.md, "Tolerances")
    scale = np.abs(_np(table)).max() * 8 * max(np.abs(_np(t)).max() for t in (x, y, z, last, history))
    for name, actual, exact in (("x'", got, expected), ("history", history, history64), ("last", last, last64)):
        err = np.abs(_np(actual) - exact)
        bound = allowed_error(exact, scale, dtype) if dtype != torch.float64 else 1e-12 * scale
        assert np.all(err <= bound), f"{name}: max error {err.max():.3g}"


def test_zero_coefficients_do_not_read_their_tensor():
    """An unwritten ring slot, a NaN last sample or NaN noise behind a zero coefficient leave no trace."""
    x, y, z, last, history = _state(torch.float32)
    table = _table(density=1.0)
    col = SolverColumns(SLOTS)
    table[:, [col.c_hist + 1, col.p_hist + 1, col.c_last, col.p_noise]] = 0.0
    index = torch.tensor([1, 2, 3])
    for b, i in enumerate(index.tolist()):
        history[(i - 2) % SLOTS, b] = float("nan")
    got = solver_step(x, y, table, index, history=history, last_sample=torch.full_like(x, float("nan")),
                      noise=torch.full_like(x, float("inf")), backend="reference")
    assert torch.isfinite(got).all()


def test_the_ring_and_the_last_sample_carry_a_loop():
    """Three steps of a loop on one ring equal three float64 steps carrying their own state."""
    x, y, _, last, _ = _state(torch.float64)
    history = new_history(x, SLOTS)
    table = _table(seed=3)
    h64, l64, x64 = _np(history), _np(last), _np(x)
    for i in range(STEPS):
        y = torch.sin(x + i)  # a model output that depends on the sample
        x64, h64, l64 = _step64(x64, _np(y), _np(table), [i] * SHAPE[0], h64, l64, None)
        x = solver_step(x, y, table, torch.full((SHAPE[0],), i), history=history, last_sample=last,
                        backend="reference")
        np.testing.assert_allclose(_np(x), x64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(history), h64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(last), l64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["clip", "threshold"])
def test_clipped_or_thresholded_x0(kind):
    x, y, _, last, history = _state(torch.float64)
    y = 3 * y
    table = _table(density=1.0, seed=5)
    index = torch.tensor([5, 0, 3])
    options = dict(clip_range=1.5) if kind == "clip" else dict(threshold_ratio=0.9, threshold_max=2.0)
    expected, h64, l64 = _step64(_np(x), _np(y), _np(table), index.tolist(), _np(history), _np(last), None,
                                 clip=1.5 if kind == "clip" else None,
                                 threshold=None if kind == "clip" else (0.9, 2.0))
    got = solver_step(x, y, table, index, history=history, last_sample=last, backend="reference", **options)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(history), h64, rtol=1e-10, atol=1e-10)


def test_an_index_outside_the_table_gives_nan():
    x, y, _, last, history = _state(torch.float32)
    table = _table(density=1.0)
    # a device index is not range-checked on the host (that would be a sync): the row is NaN instead of an
    # out-of-bounds read, and the state it writes is NaN too
    got = solver_step_ref(x, y, None, None, table, torch.tensor([0, STEPS, -1]), history, last,
                          _step_options((False, None, None, 1.0, 0.0), False))
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1:]).all()
    assert torch.isnan(history[STEPS % SLOTS, 1]).all() and torch.isnan(history[(-1) % SLOTS, 2]).all()


def test_guided_step_is_the_step_of_the_guided_output():
    x, c, u, last, history = _state(torch.float32)
    table = _table(seed=7)
    index = torch.tensor([1, 3, 5])
    ring, buffer = history.clone(), last.clone()
    got = solver_step(x, torch.cat([u, c]), table, index, history=history, last_sample=last, guidance_scale=4.0,
                      guidance_rescale=0.7, backend="reference")
    mixed = dk.reference.guided_output(c, u, torch.full((3,), 4.0), 0.7, torch.float32)
    expected = solver_step(x, mixed, table, index, history=ring, last_sample=buffer, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(history, ring, rtol=1e-6, atol=1e-6)


def test_in_kernel_noise_is_the_noise_stream():
    x, y, _, _, history = _state(torch.float32)
    table = _table(density=1.0, seed=9)
    index = torch.tensor([2, 2, 4])
    ring = history.clone()
    got = solver_step(x, y, table, index, history=history, stochastic=True,
                      generator=torch.Generator().manual_seed(11), backend="reference")
    z = dk.randn_stream(x.shape, torch.Generator().manual_seed(11), backend="reference")
    expected = solver_step(x, y, table, index, history=ring, noise=z, backend="reference")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    without = solver_step(x, y, table, index, history=ring.clone(), backend="reference")
    assert not torch.equal(without, got)  # the noise term is there only when asked for


def test_out_and_in_place():
    x, y, _, _, history = _state(torch.float32)
    table = _table(seed=2)
    index = torch.tensor([0, 1, 2])
    expected = solver_step(x, y, table, index, history=history.clone(), backend="reference")
    result = solver_step(x, y, table, index, history=history, out=x, backend="reference")
    assert result is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_argument_checks():
    x, y, z, last, history = _state(torch.float32)
    table = _table()
    index = torch.tensor([0, 1, 2])
    for call, error, message in [
        (lambda: solver_step(x, y, table[:, :-1], index, history=history), ValueError,
         "coefficients: expected shape (steps, 17)"),
        (lambda: solver_step(x, y, table, index), ValueError, "coefficients: expected shape (steps, 11)"),
        (lambda: solver_step(x, y, table.long(), index, history=history), TypeError, "coefficients: expected a float"),
        (lambda: solver_step(x, y, table, index, history=history.double()), ValueError, "history: expected torch.float32"),
        (lambda: solver_step(x, y, table, index, history=history[:, :2]), ValueError, "history: expected shape (H, 3,"),
        (lambda: solver_step(x, y, table, index, history=[history]), TypeError, "history: expected a tensor"),
        (lambda: solver_step(x, y, table, torch.tensor([0, 1, STEPS]), history=history), ValueError,
         "step_index: expected values in [0, 6)"),
        (lambda: solver_step(x, y, table, index[:2], history=history), ValueError, "step_index: expected shape (3,)"),
        (lambda: solver_step(x, y, table, index.float(), history=history), TypeError, "step_index: expected an integer"),
        (lambda: solver_step(x, y, table, index, history=history, last_sample=last[:, :1]), ValueError, "last_sample"),
        (lambda: solver_step(x, y[:2], table, index, history=history), ValueError, "model_output"),
        (lambda: solver_step(x, y, table, index, history=history, clip_range=0.0), ValueError, "clip_range: expected"),
        (lambda: solver_step(x, y, table, index, history=history, threshold_ratio=1.5), ValueError, "threshold_ratio"),
        (lambda: solver_step(x, y, table, index, history=history, stochastic="yes"), TypeError, "stochastic"),
        (lambda: solver_step(x, y, table, index, history=history, backend="gpu"), ValueError, "backend"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            call()


def test_new_history_follows_the_sample():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    ring = new_history(x, 2)
    assert ring.shape == (2, 2, 3, 4, 5) and ring[0].stride() == x.stride() and not ring.any()
    assert math.prod(new_history(torch.randn(3, 7), 1).shape) == 21
