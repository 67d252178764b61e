"""UniPC's coefficient table (``ddpm_kernels.solvers.unipc``): its first-order rows against the closed-form DDIM
step, whole loops of `solver_step` on it against diffusers' UniPC evaluated in float64 (independent float64
math: the stock formulas on float64 tensors), the zero-final-sigma limits against the float64 math at a tiny
final sigma, the orders that have no limit, float32 loops against the stock float32 scheduler, and the
argument checks. See docs/design.md, "Multistep solvers", "UniPC"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler  # noqa: E402

from ddpm_kernels.solvers import SolverColumns, new_history, solver_step  # noqa: E402
from ddpm_kernels.solvers.unipc import unipc_coefficients, unipc_orders  # noqa: E402
from ddpm_kernels.solvers import unipc  # noqa: E402

SHAPE = (2, 3, 4, 5)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def model(x, t):
    """A model output that depends on the sample and the timestep."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * (0.3 + t / 4000) - 0.2 * torch.cos(x + t / 100)


def table_for(scheduler, begin=0, sigmas=None):
    c = scheduler.config
    sigmas = scheduler.sigmas.double().numpy() if sigmas is None else sigmas
    return unipc_coefficients(
        sigmas, solver_order=c.solver_order, solver_type=c.solver_type, predict_x0=scheduler.predict_x0,
        prediction_type=c.prediction_type, lower_order_final=c.lower_order_final,
        disable_corrector=scheduler.disable_corrector, flow_sigmas=c.use_flow_sigmas, begin_index=begin)


def table_loop(scheduler, x, begin=0, sigmas=None, dtype=torch.float64):
    """The sampling loop as `solver_step` on the table (reference backend), in ``dtype``."""
    c = scheduler.config
    table = torch.from_numpy(table_for(scheduler, begin, sigmas))
    history, last = new_history(x.to(dtype), c.solver_order), torch.zeros_like(x, dtype=dtype)
    options = {}
    if c.thresholding and scheduler.predict_x0:
        options = dict(threshold_ratio=c.dynamic_thresholding_ratio, threshold_max=c.sample_max_value)
    x = x.to(dtype)
    for i, t in enumerate(scheduler.timesteps[begin:]):
        index = torch.full((x.shape[0],), begin + i)
        x = solver_step(x, model(x, t), table, index, history, last, backend="reference", **options)
    return x


def stock_loop(config, x, steps, begin=0, final_sigma=None, dtype=torch.float32):
    """diffusers' loop; in float64 (its sigmas as float64, the final one replaced by ``final_sigma``) it is the
    float64 math of the stock formulas."""
    s = UniPCMultistepScheduler(**config)
    s.set_timesteps(steps)
    if dtype == torch.float64:
        s.sigmas = s.sigmas.double()
        if final_sigma is not None:
            s.sigmas[-1] = final_sigma
    if begin:
        s.set_begin_index(begin)
    x = x.to(dtype)
    for t in s.timesteps[begin:]:
        x = s.step(model(x, t), t, x).prev_sample
    return x, s


def start(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# configurations whose stock loop is finite (a zero final sigma only with the data form, bh2, order 1 at the end)
FINITE = [
    dict(),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, disable_corrector=[0, 3]),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", solver_order=3),
    dict(thresholding=True, sample_max_value=1.5, solver_order=3),
    dict(use_karras_sigmas=True, solver_order=3),
    dict(use_exponential_sigmas=True),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(final_sigmas_type="sigma_min", solver_type="bh1", predict_x0=False, solver_order=3),
    dict(final_sigmas_type="sigma_min", predict_x0=False, prediction_type="v_prediction"),
    dict(final_sigmas_type="sigma_min", solver_order=3, lower_order_final=False),
    dict(final_sigmas_type="sigma_min", solver_order=4, lower_order_final=False, predict_x0=False),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", final_sigmas_type="sigma_min"),
]


def _id(config):
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


# ------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("predict_x0", [True, False])
def test_first_order_rows_are_the_ddim_step(predict_x0):
    """Order 1 without corrector: x' = alpha' x0 + sigma' eps with (x0, eps) from the output at (alpha, sigma),
    DDIM's step, whatever B(h)."""
    s = UniPCMultistepScheduler(**SD, solver_order=1, predict_x0=predict_x0, final_sigmas_type="sigma_min")
    s.set_timesteps(7)
    sigmas = s.sigmas.double().numpy()
    for solver_type in ("bh1", "bh2"):
        table = unipc_coefficients(sigmas, solver_order=1, solver_type=solver_type, predict_x0=predict_x0,
                                   disable_corrector=range(7))
        col = SolverColumns(1)
        for i in range(7):
            a, s_ = 1 / math.sqrt(sigmas[i] ** 2 + 1), sigmas[i] / math.sqrt(sigmas[i] ** 2 + 1)
            a1, s1 = 1 / math.sqrt(sigmas[i + 1] ** 2 + 1), sigmas[i + 1] / math.sqrt(sigmas[i + 1] ** 2 + 1)
            if predict_x0:  # m = x0: x' = s1/s x + (a1 - s1 a / s) x0
                expected = (s1 / s_, a1 - s1 * a / s_)
            else:  # m = eps: x' = a1/a x + (s1 - a1 s / a) eps
                expected = (a1 / a, s1 - a1 * s_ / a)
            np.testing.assert_allclose(table[i, [col.p_xc, col.p_m]], expected, rtol=1e-13)
            assert table[i, col.c_sample] == 1 and table[i, col.p_hist] == 0


def test_warm_up_and_lower_order_final_orders():
    assert unipc_orders(6, 3, True) == [1, 2, 3, 3, 2, 1]
    assert unipc_orders(6, 3, False) == [1, 2, 3, 3, 3, 3]
    assert unipc_orders(6, 2, True, begin_index=4) == [1, 1]
    table = unipc_coefficients(np.linspace(10, 0, 7), solver_order=3, begin_index=2)
    assert np.isnan(table[:2]).all() and np.isfinite(table[2:]).all()
    col = SolverColumns(3)
    assert table[2, col.c_sample] == 1 and table[2, col.c_last] == 0  # no corrector on a loop's first step
    assert table[3, col.c_last] != 0 and table[3, col.c_hist + 1] == 0  # corrector of the order-1 step before


# ------------------------------------------------------------------------------------------- float64 math
@pytest.mark.parametrize("begin", [0, 3])
@pytest.mark.parametrize("config", FINITE, ids=_id)
def test_table_loop_matches_float64_math(config, begin):
    """Every step of a 12-step loop (corrector, predictor, warm-up, ring) against the stock formulas on float64
    tensors: the table is the same math, only computed once per schedule."""
    config = dict(SD, **config)
    x = start()
    expected, s = stock_loop(config, x, 12, begin=begin, dtype=torch.float64)
    got = table_loop(s, x, begin=begin)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * scale)


# ------------------------------------------------------------------------------------------- sigma -> 0
@pytest.mark.parametrize("config", [
    dict(solver_type="bh1"),
    dict(solver_type="bh1", solver_order=3),
    dict(predict_x0=False),
    dict(predict_x0=False, prediction_type="v_prediction", solver_order=3),
    dict(predict_x0=False, solver_order=3, lower_order_final=False),
    dict(predict_x0=False, solver_order=4, lower_order_final=False, solver_type="bh1"),
    dict(predict_x0=False, solver_order=2, lower_order_final=False, solver_type="bh1"),
], ids=_id)
def test_zero_final_sigma_is_the_limit(config):
    """Where stock gives NaN or a singular solve at a zero final sigma, the table's last row is the limit of the
    float64 math as the final sigma goes to 0 (1e-14 here: within 1e-9 of it)."""
    config = dict(SD, **config)
    x = start()
    expected, _ = stock_loop(config, x, 10, final_sigma=1e-14, dtype=torch.float64)
    s = UniPCMultistepScheduler(**config)
    s.set_timesteps(10)
    assert s.sigmas[-1] == 0
    got = table_loop(s, x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    try:  # the stock case this fixes: NaN, or a singular solve
        finite = bool(torch.isfinite(stock_loop(config, x, 10, dtype=torch.float64)[0]).all())
    except torch.linalg.LinAlgError:
        finite = False
    assert not finite


@pytest.mark.parametrize("config", [
    dict(solver_order=2, lower_order_final=False),
    dict(solver_order=3, lower_order_final=False, solver_type="bh1"),
    dict(solver_order=2, lower_order_final=False, predict_x0=False),
], ids=_id)
def test_no_limit_gives_the_first_order_step(config):
    """The data form's higher orders (and the noise form's order 2 with bh2) grow without bound as the final
    sigma goes to 0: the table's last row is then the first-order step's limit, the row lower_order_final
    gives."""
    s = UniPCMultistepScheduler(**SD, **config)
    s.set_timesteps(10)
    sigmas = s.sigmas.double().numpy().copy()
    col = SolverColumns(s.config.solver_order)
    growth = []
    for final in (1e-4, 1e-8, 1e-12):
        sigmas[-1] = final
        growth.append(abs(table_for(s, sigmas=sigmas)[-1, col.p_hist]))
    assert growth[0] + 1 < growth[1] < growth[2] - 1
    sigmas[-1] = 0.0
    last = table_for(s, sigmas=sigmas)[-1]
    first_order = unipc_coefficients(sigmas, solver_order=s.config.solver_order, solver_type=s.config.solver_type,
                                     predict_x0=s.predict_x0, lower_order_final=True)[-1]
    np.testing.assert_array_equal(last[col.p_xc:], first_order[col.p_xc:])


def test_repeated_sigmas_are_the_identity_update():
    sigmas = np.array([5.0, 2.0, 2.0, 1.0, 0.0])
    table = unipc_coefficients(sigmas, solver_order=3, lower_order_final=False)
    col = SolverColumns(3)
    assert np.isfinite(table).all()
    np.testing.assert_array_equal(table[1, col.p_xc:], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # sigma 2 -> 2
    np.testing.assert_array_equal(table[2, col.c_last:col.p_xc], [1.0, 0.0, 0.0, 0.0, 0.0])  # its corrector
    # the next step's repeated node (sigma 2 twice) is left out: order 2 on the nodes at sigmas 2 and 5
    assert table[2, col.p_hist] == 0 and table[2, col.p_hist + 1] != 0


# ------------------------------------------------------------------------------------------- float32
@pytest.mark.parametrize("config", [c for c in FINITE if not c.get("thresholding")], ids=_id)
def test_float32_loop_agrees_with_stock(config):
    """25 float32 steps: within float32 rounding of stock, and at least as close to the float64 math (stock's
    float32 rhos lose digits at order 3: their divided differences cancel)."""
    config = dict(SD, **config)
    x = start()
    stock, s = stock_loop(config, x, 25)
    exact, _ = stock_loop(config, x, 25, dtype=torch.float64)
    got = table_loop(s, x, dtype=torch.float32)
    scale = exact.abs().max().item()
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=4e-6 * scale)
    assert (got.double() - exact).abs().max() <= (stock.double() - exact).abs().max() + 2e-6 * scale


# ------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("kwargs, message", [
    (dict(solver_type="bh3"), "solver_type"),
    (dict(solver_order=0), "solver_order"),
    (dict(begin_index=4), "begin_index"),
    (dict(predict_x0=False, prediction_type="flow_prediction"), "prediction_type"),
    (dict(prediction_type="x0"), "prediction_type"),
])
def test_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unipc_coefficients(np.linspace(3, 0, 5), **kwargs)
    with pytest.raises(ValueError, match="sigmas"):
        unipc_coefficients([1.0])


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_rows_solved_together_equal_rows_solved_one_at_a_time(order, predict_x0, solver_type, monkeypatch):
    # the table solves the rows of one (order, corrector) in one batched call; each row alone gives the same bits
    sigmas = np.concatenate([np.geomspace(14.6, 0.03, 25), [0.0]])
    kwargs = dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0, disable_corrector=[3])
    together = unipc_coefficients(sigmas, **kwargs)
    batched = unipc._update_rows
    calls = []

    def one_at_a_time(*arrays, predict_x0, solver_type, corrector):
        calls.append(arrays[0].shape[0])
        rows = [batched(*(a[j:j + 1] for a in arrays), predict_x0, solver_type, corrector)
                for j in range(arrays[0].shape[0])]
        return tuple(np.concatenate([r[k] for r in rows]) for k in range(4))

    monkeypatch.setattr(unipc, "_update_rows", lambda *a: one_at_a_time(*a[:7], predict_x0=a[7], solver_type=a[8],
                                                                         corrector=a[9]))
    alone = unipc_coefficients(sigmas, **kwargs)
    assert max(calls) > 10  # the rows did go through the batched path
    np.testing.assert_array_equal(together, alone)
