"""The DPM-Solver(++) coefficient tables (``ddpm_kernels.solvers.dpm``): one step of the reference `solver_step`
on a table row against independent float64 math written from the DPM-Solver / DPM-Solver++ update formulas as
diffusers' ``DPMSolverMultistepScheduler`` writes them (divided differences, not the table's expanded weights),
the per-step order choice against the stock scheduler's, whole loops against the stock scheduler in float32,
and the argument checks."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from ddpm_kernels.solvers import SolverColumns, new_history, solver_step
from ddpm_kernels.solvers.dpm import dpm_solver_coefficients, dpm_solver_orders, dpm_solver_slots

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

SHAPE = (2, 3, 4, 5)
PLUS = ("dpmsolver++", "sde-dpmsolver++")
CASES = [(a, o, s) for a, o, s in itertools.product(
    ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"), (1, 2, 3), ("midpoint", "heun"))
    if not (a == "sde-dpmsolver" and o == 3)]


def _alpha_sigma(s, flow):
    return (1 - s, s) if flow else (1 / np.sqrt(s * s + 1), s / np.sqrt(s * s + 1))


def _convert64(algorithm, prediction, sigma, x, y, flow):
    """``convert_model_output`` in float64 (no thresholding)."""
    a, s = _alpha_sigma(sigma, flow)
    if algorithm in PLUS:
        return {"epsilon": (x - s * y) / a, "sample": y, "v_prediction": a * x - s * y,
                "flow_prediction": x - sigma * y}[prediction]
    return {"epsilon": y, "sample": (x - a * y) / s, "v_prediction": a * y + s * x}[prediction]


def _update64(algorithm, solver_type, order, sig, x, m, z, flow):
    """The stock update of ``order`` in float64: ``sig = (sigma_t, sigma_s0, sigma_s1, sigma_s2)``, ``m`` the
    converted outputs newest first, ``z`` the noise."""
    (at, st), (a0, s0), (a1, s1), (a2, s2) = (_alpha_sigma(v, flow) for v in sig)
    lam = [np.log(a) - np.log(s) for a, s in ((at, st), (a0, s0), (a1, s1), (a2, s2))]
    h = lam[0] - lam[1]
    D0 = m[0]
    if order == 2:
        D1 = (m[0] - m[1]) / ((lam[1] - lam[2]) / h)
    if order == 3:
        r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
        D1_0, D1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
    mid = solver_type == "midpoint" and order == 2
    if algorithm == "dpmsolver++":
        out = st / s0 * x - at * (np.exp(-h) - 1) * D0
        if order > 1:
            out = out + (-0.5 * at * (np.exp(-h) - 1) if mid else at * ((np.exp(-h) - 1) / h + 1)) * D1
        if order == 3:
            out = out - at * ((np.exp(-h) - 1 + h) / h**2 - 0.5) * D2
    elif algorithm == "dpmsolver":
        out = at / a0 * x - st * (np.exp(h) - 1) * D0
        if order > 1:
            out = out - (0.5 * st * (np.exp(h) - 1) if mid else st * ((np.exp(h) - 1) / h - 1)) * D1
        if order == 3:
            out = out - st * ((np.exp(h) - 1 - h) / h**2 - 0.5) * D2
    elif algorithm == "sde-dpmsolver++":
        e = 1 - np.exp(-2 * h)
        out = st / s0 * np.exp(-h) * x + at * e * D0 + st * np.sqrt(e) * z
        if order > 1:
            out = out + (0.5 * at * e if mid else at * (e / (-2 * h) + 1)) * D1
        if order == 3:
            out = out + at * ((e - 2 * h) / (2 * h) ** 2 - 0.5) * D2
    else:
        out = at / a0 * x - 2 * st * (np.exp(h) - 1) * D0 + st * np.sqrt(np.exp(2 * h) - 1) * z
        if order > 1:
            out = out - (st * (np.exp(h) - 1) if mid else 2 * st * ((np.exp(h) - 1) / h - 1)) * D1
    return out


def _sigmas(algorithm, flow=False, steps=12, karras=False):
    config = dict(final_sigmas_type="sigma_min" if algorithm not in PLUS else "zero")
    if flow:
        config.update(use_flow_sigmas=True, flow_shift=3.0)
    if karras:
        config.update(use_karras_sigmas=True)
    s = DPMSolverMultistepScheduler(algorithm_type=algorithm, **config)
    s.set_timesteps(steps)
    return s.sigmas, config["final_sigmas_type"]


@pytest.mark.parametrize("algorithm,order,solver_type", CASES)
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction", "flow_prediction"])
def test_each_row_is_the_update_in_float64(algorithm, order, solver_type, prediction):
    if prediction == "flow_prediction" and algorithm not in PLUS:
        pytest.skip("flow_prediction is a DPM-Solver++ conversion")
    flow = prediction == "flow_prediction"
    sigmas, final = _sigmas(algorithm, flow)
    table = dpm_solver_coefficients(sigmas, algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                                    prediction_type=prediction, final_sigmas_type=final, flow_sigmas=flow)
    slots = dpm_solver_slots(order)
    assert table.dtype == torch.float64 and table.shape == (12, SolverColumns(slots).width)
    orders = dpm_solver_orders(12, solver_order=order, final_sigmas_type=final)
    sig = sigmas.double().numpy()
    g = torch.Generator().manual_seed(order)
    for i in range(12):
        x, y, z, m1, m2 = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(5))
        ring = new_history(x, slots) if slots else None
        if slots:
            ring[(i - 1) % slots] = m1
        if slots > 1:
            ring[(i - 2) % slots] = m2
        noise = z if algorithm.startswith("sde") else None
        got = solver_step(x, y, table, torch.full((2,), i), history=ring, noise=noise, backend="reference")
        m0 = _convert64(algorithm, prediction, sig[i], x.numpy(), y.numpy(), flow)
        expected = _update64(algorithm, solver_type, orders[i], (sig[i + 1],) + tuple(sig[max(i - j, 0)] for j in
                             range(3)), x.numpy(), (m0, m1.numpy(), m2.numpy()), z.numpy(), flow)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max(),
                                   err_msg=f"row {i} (order {orders[i]})")
        if slots:  # the converted output went into the ring for the next step
            np.testing.assert_allclose(ring[i % slots].numpy(), m0, rtol=1e-12, atol=1e-12 * np.abs(m0).max())


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_thresholded_rows_threshold_x0(algorithm, prediction):
    """Thresholding: x0 from the output, thresholded, then the solver's form (for DPM-Solver the noise
    prediction back from the thresholded x0, as the stock conversion)."""
    sigmas, final = _sigmas(algorithm)
    table = dpm_solver_coefficients(sigmas, algorithm_type=algorithm, solver_order=1, prediction_type=prediction,
                                    thresholding=True, final_sigmas_type=final)
    stock = DPMSolverMultistepScheduler(algorithm_type=algorithm, prediction_type=prediction, thresholding=True,
                                        dynamic_thresholding_ratio=0.9, sample_max_value=1.5, solver_order=1,
                                        final_sigmas_type=final)
    stock.set_timesteps(12)
    g = torch.Generator().manual_seed(3)
    x, y = (3 * torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    for i in (0, 5, 11):
        stock._step_index = i
        expected = stock.dpm_solver_first_order_update(stock.convert_model_output(y, sample=x), sample=x)
        got = solver_step(x, y, table, torch.full((2,), i), threshold_ratio=0.9, threshold_max=1.5,
                          backend="reference")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the stock coefficients are float32


@pytest.mark.parametrize("steps", [1, 2, 5, 14, 15, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final,euler_at_final,final", [
    (True, False, "zero"), (False, False, "zero"), (True, False, "sigma_min"), (False, False, "sigma_min"),
    (False, True, "sigma_min")])
@pytest.mark.parametrize("begin", [0, 3])
def test_orders_are_the_stock_choice(steps, order, lower_order_final, euler_at_final, final, begin):
    if begin >= steps:
        pytest.skip("the loop starts after its end")
    stock = DPMSolverMultistepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                        euler_at_final=euler_at_final, final_sigmas_type=final)
    stock.set_timesteps(steps)
    stock.set_begin_index(begin)
    taken = []
    for name, k in (("dpm_solver_first_order_update", 1), ("multistep_dpm_solver_second_order_update", 2),
                    ("multistep_dpm_solver_third_order_update", 3)):
        method = getattr(stock, name)
        setattr(stock, name, lambda *a, _m=method, _k=k, **kw: taken.append(_k) or _m(*a, **kw))
    x = torch.randn(1, 2)
    for t in stock.timesteps[begin:]:
        x = stock.step(0.1 * x, t, x).prev_sample
    orders = dpm_solver_orders(steps, solver_order=order, lower_order_final=lower_order_final,
                               euler_at_final=euler_at_final, final_sigmas_type=final, begin_index=begin)
    assert orders[begin:] == taken
    assert orders[:begin] == [1] * begin  # a start there


def _loop(step, timesteps, x, model, seed):
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(timesteps):
        x = step(i, t, x, model(x, t), g)
    return x


def _model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return x * (0.3 + t / 4000) - 0.2 * torch.cos(x + t / 100)


@pytest.mark.parametrize("algorithm,order,solver_type", CASES)
@pytest.mark.parametrize("sigmas", ["vp", "karras", "flow"])
def test_a_loop_on_the_table_is_the_stock_loop(algorithm, order, solver_type, sigmas):
    """Twelve steps of the reference op on the table and one ring equal the stock scheduler's (float32, same
    model, same noise), within float32 rounding."""
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, lower_order_final=False,
                  final_sigmas_type="zero" if algorithm in PLUS else "sigma_min",
                  use_karras_sigmas=sigmas == "karras", use_flow_sigmas=sigmas == "flow", flow_shift=3.0,
                  prediction_type="flow_prediction" if sigmas == "flow" and algorithm in PLUS else "epsilon")
    stock = DPMSolverMultistepScheduler(**config)
    stock.set_timesteps(12)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = _loop(lambda i, t, x, y, g: stock.step(y, t, x, generator=g).prev_sample, stock.timesteps, x,
                     _model, 5)
    table = dpm_solver_coefficients(stock.sigmas, algorithm_type=algorithm, solver_order=order,
                                    solver_type=solver_type, prediction_type=config["prediction_type"],
                                    lower_order_final=False, final_sigmas_type=config["final_sigmas_type"],
                                    flow_sigmas=sigmas == "flow").float()
    slots = dpm_solver_slots(order)
    ring = new_history(x, slots) if slots else None

    def step(i, t, x, y, g):
        z = torch.randn(x.shape, generator=g) if algorithm.startswith("sde") else None
        return solver_step(x, y, table, torch.full((2,), i), history=ring, noise=z, backend="reference")

    got = _loop(step, stock.timesteps, x, _model, 5)
    # the epsilon-form flow loops divide by sigma_s down to 0.01: float32 rounding grows by up to 1/sigma
    rtol = 4e-5 if sigmas == "flow" and algorithm not in PLUS else 1e-5
    # (karras sigmas with a sigma_min final repeat the last sigma: the Heun form's last step is NaN in both)
    scale = expected.nan_to_num().abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


def test_a_repeated_sigma_gives_the_stock_step():
    """Karras sigmas with ``final_sigmas_type="sigma_min"`` repeat the last sigma (h = 0): the first and the
    midpoint steps keep the sample as stock does, the Heun form is NaN in both."""
    for solver_type in ("midpoint", "heun"):
        stock = DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                            lower_order_final=False, solver_type=solver_type)
        stock.set_timesteps(10)
        table = dpm_solver_coefficients(stock.sigmas, solver_type=solver_type, lower_order_final=False,
                                        final_sigmas_type="sigma_min")
        assert stock.sigmas[-1] == stock.sigmas[-2]
        col = SolverColumns(1)
        last = table[-1]
        if solver_type == "midpoint":
            assert last[col.p_xc] == 1 and last[col.p_m] == 0 and last[col.p_hist] == 0
        else:
            assert torch.isnan(last[col.p_m])


def test_argument_checks():
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    for kwargs, message in [
        (dict(algorithm_type="deis"), "algorithm_type: expected one of"),
        (dict(solver_order=4), "solver_order: expected 1, 2 or 3"),
        (dict(solver_type="bh2"), "solver_type: expected one of"),
        (dict(prediction_type="x0"), "prediction_type: expected one of"),
        (dict(final_sigmas_type="last"), "final_sigmas_type: expected one of"),
        (dict(algorithm_type="dpmsolver", prediction_type="flow_prediction", final_sigmas_type="sigma_min"),
         "prediction_type: 'flow_prediction' needs a DPM-Solver++"),
        (dict(algorithm_type="sde-dpmsolver", solver_order=3, lower_order_final=False,
              final_sigmas_type="sigma_min", sigmas=torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])),
         "'sde-dpmsolver' has no third-order step"),
        (dict(begin_index=-1), "begin_index: expected an int >= 0"),
        (dict(sigmas=torch.tensor([1.0])), "sigmas: expected at least 2"),
        (dict(sigmas=torch.tensor([1.0, -1.0])), "sigmas: expected finite sigmas >= 0, got -1.0 at index 1"),
        (dict(sigmas=[1.0, float("nan")]), "sigmas: expected finite sigmas >= 0, got nan at index 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            dpm_solver_coefficients(kwargs.pop("sigmas", sigmas), **kwargs)
