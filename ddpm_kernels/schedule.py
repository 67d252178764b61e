"""Beta schedules and the per-timestep coefficient tables of DDPM.

The tables are the ones CompVis' ``ldm/models/diffusion/ddpm.py`` registers in ``register_schedule``, under
the same names. They are computed in float64 and stored as float32 rows of one packed ``(K, T)`` buffer,
``coefficients``; each CompVis name is a view of one row. Kernels receive the packed buffer and gather
``coefficients[row, t[b]]`` on the device, so a sampling step never indexes a table on the host and a
captured CUDA graph always reads the current values.

A float64 copy (``coefficients64``) serves float64 inputs, so the reference path and ``gradcheck`` run in
float64 end to end.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "make_beta_schedule",
    "rescale_zero_terminal_snr",
    "DiffusionSchedule",
    "TABLE_NAMES",
    "TABLE_ROW",
    "BETA_SCHEDULES",
]

# Row order of the packed table. Kernels index rows by these numbers (TABLE_ROW); never reorder
# without updating every backend.
TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights_eps",
    "lvlb_weights_x0",
    "lvlb_weights_v",
)
TABLE_ROW: Dict[str, int] = {name: i for i, name in enumerate(TABLE_NAMES)}

# CompVis names, then diffusers' names for the same schedules. diffusers' "linear" is CompVis'
# "sqrt_linear" and CompVis' "linear" is diffusers' "scaled_linear"; the CompVis meaning wins for the
# bare name "linear" because this package reproduces ldm's DDPM. `DiffusionSchedule.from_diffusers`
# maps a diffusers config correctly.
BETA_SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "sqrt_linear": "sqrt_linear",
    "sqrt": "sqrt",
    "scaled_linear": "linear",
    "squaredcos_cap_v2": "cosine",
}


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas of a named schedule as a float64 numpy array (CompVis ``make_beta_schedule``)."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule: expected one of {sorted(BETA_SCHEDULES)}, got {schedule!r}"
        )
    schedule = BETA_SCHEDULES[schedule]
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    else:  # "sqrt"
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    return betas.numpy()


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1), in float64; the same algorithm as diffusers' ``rescale_zero_terminal_snr``.

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its first value is unchanged; the
    last beta becomes exactly 1 (``alphas_cumprod[-1] == 0``). Idempotent: a schedule that already ends at zero
    SNR comes back unchanged.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas: zero terminal SNR needs a 1-D schedule of at least 2 steps, got shape {betas.shape}")
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


# Entries that are infinite, by the math, in a zero-terminal-SNR schedule (alphas_cumprod[-1] == 0): x0 from
# eps is undefined at zero SNR. Everything else must stay finite.
_ZERO_SNR_INFINITE = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
# Rows only the training loss reads. A schedule built with sampling_only=True may have them non-finite: a
# one-step schedule (T = 1) has posterior_variance[0] == 0 and no neighbour to copy the eps-form weight from,
# yet sampling with it is well defined (diffusers accepts num_train_timesteps=1).
_TRAINING_ONLY = ("lvlb_weights_eps", "lvlb_weights_x0", "lvlb_weights_v")


def _compute_tables(betas: np.ndarray, v_posterior: float) -> Dict[str, np.ndarray]:
    """Every table of `TABLE_NAMES` in float64, following CompVis ``register_schedule``."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + v_posterior * betas
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # posterior_variance[0] is 0 when v_posterior == 0: the clip keeps the log finite.
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            # eps form: beta^2 / (2 sigma^2 alpha (1 - alpha_bar)); infinite at t=0 when
            # posterior_variance[0] == 0, hence the seed's lvlb_weights[0] = lvlb_weights[1] below.
            "lvlb_weights_eps": betas**2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod)),
            # x0 form exactly as the seed writes it: `0.5 * sqrt(a) / (2. * 1 - a)`. The denominator is
            # (2 - alpha_bar), not 2 (1 - alpha_bar); reproduced on purpose so losses match ldm.
            "lvlb_weights_x0": 0.5 * np.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod),
            # v form: the seed (Stability-AI's ldm) uses ones.
            "lvlb_weights_v": np.ones_like(betas),
        }
    for name in ("lvlb_weights_eps", "lvlb_weights_x0", "lvlb_weights_v"):
        if len(betas) > 1:
            tables[name][0] = tables[name][1]
    return tables


class DiffusionSchedule(nn.Module):
    """The DDPM noise schedule and its coefficient tables, as a module.

    Arguments follow CompVis ``DDPM.register_schedule``. Tables are float64-computed and stored as float32
    buffers under CompVis names (``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``, ...,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1/2``) plus ``lvlb_weights_eps``,
    ``lvlb_weights_x0`` and ``lvlb_weights_v``. ``.to(device)`` moves them; casting the module to another
    floating dtype (``.half()``, ``.to(torch.bfloat16)``) leaves them in float32 on purpose: the kernels
    compute in float32 whatever the data dtype.

    Every table must be finite in float32, else ``ValueError``. ``sampling_only=True`` exempts the training-only
    lvlb weights, for schedules that sampling can use but the seed's loss cannot (a one-step schedule, as
    diffusers allows); such a schedule has ``sampling_only = True`` and its lvlb weights are not meant for a loss.
    """

    def __init__(
        self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
        linear_end: float = 2e-2, cosine_s: float = 8e-3, v_posterior: float = 0.0,
        given_betas: Optional[Sequence[float]] = None, *, zero_terminal_snr: bool = False, sampling_only: bool = False
    ):
        super().__init__()
        if not isinstance(zero_terminal_snr, bool):
            raise TypeError(f"zero_terminal_snr: expected a bool, got {type(zero_terminal_snr).__name__}")
        if not isinstance(sampling_only, bool):
            raise TypeError(f"sampling_only: expected a bool, got {type(sampling_only).__name__}")
        if given_betas is not None:
            if isinstance(given_betas, torch.Tensor):
                betas = given_betas.detach().to("cpu", torch.float64).numpy()
            else:
                betas = np.asarray(given_betas, dtype=np.float64)
            if betas.ndim != 1 or betas.size == 0:
                raise ValueError(
                    f"given_betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}"
                )
            beta_schedule = "given"
        else:
            if not isinstance(beta_schedule, str) or beta_schedule not in BETA_SCHEDULES:
                raise ValueError(
                    f"beta_schedule: expected one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}"
                )
            if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
                raise ValueError(f"timesteps: expected a positive int, got {timesteps!r}")
            if BETA_SCHEDULES[beta_schedule] != "cosine":
                for name, value in (("linear_start", linear_start), ("linear_end", linear_end)):
                    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                        raise ValueError(f"{name}: expected a float in (0, 1), got {value!r}")
            elif not (isinstance(cosine_s, (int, float)) and cosine_s >= 0):
                raise ValueError(f"cosine_s: expected a float >= 0, got {cosine_s!r}")
            betas = make_beta_schedule(beta_schedule, int(timesteps), linear_start, linear_end, cosine_s)
        if zero_terminal_snr:
            if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas[:-1] >= 1) or betas[-1] > 1:
                raise ValueError(
                    "betas: expected every beta in (0, 1) (the last may be 1) before the zero-terminal-SNR "
                    f"rescale; got min {float(np.min(betas))!r}, max {float(np.max(betas))!r}"
                )
            betas = rescale_zero_terminal_snr(betas)
            betas[-1] = 1.0  # exactly: alphas_cumprod[-1] == 0 whatever the rounding of the rescale
            inner = betas[:-1]
        else:
            inner = betas
        if not np.all(np.isfinite(betas)) or np.any(inner <= 0) or np.any(inner >= 1):
            raise ValueError(
                "betas: expected every beta in (0, 1); got min "
                f"{float(np.min(betas))!r}, max {float(np.max(betas))!r}"
            )
        if not (isinstance(v_posterior, (int, float)) and 0.0 <= v_posterior <= 1.0):
            raise ValueError(f"v_posterior: expected a float in [0, 1], got {v_posterior!r}")

        self.beta_schedule = beta_schedule
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        self.cosine_s = cosine_s
        self.v_posterior = float(v_posterior)
        self.zero_terminal_snr = zero_terminal_snr
        self.sampling_only = sampling_only

        tables = _compute_tables(betas, self.v_posterior)
        if zero_terminal_snr:
            # alphas_cumprod[-1] == 0 makes the eps-form lvlb weight infinite (and 0 * inf = NaN in the loss even
            # with original_elbo_weight == 0): the last weight repeats its neighbour, as CompVis does at t = 0.
            tables["lvlb_weights_eps"][-1] = tables["lvlb_weights_eps"][-2]
        packed64 = torch.from_numpy(np.stack([tables[name] for name in TABLE_NAMES])).contiguous()
        checked = packed64.clone()
        if zero_terminal_snr:
            for name in _ZERO_SNR_INFINITE:
                checked[TABLE_ROW[name], -1] = 0.0
        if sampling_only:
            for name in _TRAINING_ONLY:
                checked[TABLE_ROW[name]] = 0.0
        finite = torch.isfinite(checked).all(dim=1) & torch.isfinite(checked.to(torch.float32)).all(dim=1)
        if not bool(finite.all()):
            bad = [name for name, ok in zip(TABLE_NAMES, finite.tolist()) if not ok]
            raise ValueError(
                f"betas: the schedule's tables {bad} are not finite in float32 (alphas_cumprod reaches "
                f"{float(tables['alphas_cumprod'][-1]):.3g}); use fewer timesteps or smaller betas"
            )
        self._set_tables(packed64.to(torch.float32), packed64)

    # ------------------------------------------------------------------ tables
    def _set_tables(self, packed32: torch.Tensor, packed64: torch.Tensor) -> None:
        # The packed tables are what kernels read; they are not saved in state_dict. The CompVis-named rows
        # are saved (so an ldm checkpoint's schedule buffers load into them) and, being views, loading one
        # writes through into the packed table.
        self.register_buffer("coefficients", packed32, persistent=False)
        self.register_buffer("coefficients64", packed64, persistent=False)
        for row, name in enumerate(TABLE_NAMES):
            self.register_buffer(name, packed32[row], persistent=True)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: a dtype cast would round the tables, and views must stay views.
        probe = fn(torch.zeros(1, dtype=torch.float32, device=self.coefficients.device))
        if probe.device != self.coefficients.device:
            self._set_tables(self.coefficients.to(probe.device), self.coefficients64.to(probe.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loaded float32 rows replace the float64 build where they differ (e.g. a checkpoint made with
        # another schedule), so float32 and float64 inputs see the same schedule.
        stale = (self.coefficients64.to(torch.float32) != self.coefficients).any(dim=1)
        if bool(stale.any()):
            self.coefficients64[stale] = self.coefficients[stale].to(torch.float64)

    def table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The packed ``(len(TABLE_NAMES), T)`` table kernels read: float64 for float64 data, else float32."""
        # _buffers directly: nn.Module.__getattr__ costs more than the rest of a small step's Python
        return self._buffers["coefficients64" if dtype == torch.float64 else "coefficients"]

    def lvlb_weights(self, parameterization: str = "eps") -> torch.Tensor:
        """The seed's ``lvlb_weights`` for a parameterization ("eps", "x0" or "v")."""
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization: expected 'eps', 'x0' or 'v', got {parameterization!r}")
        return getattr(self, "lvlb_weights_" + parameterization)

    @property
    def device(self) -> torch.device:
        return self.coefficients.device

    def extra_repr(self) -> str:
        return (
            f"beta_schedule={self.beta_schedule!r}, timesteps={self.num_timesteps}, "
            f"v_posterior={self.v_posterior}" + (", zero_terminal_snr=True" if self.zero_terminal_snr else "")
            + (", sampling_only=True" if self.sampling_only else "")
        )

    # ------------------------------------------------------------------ interop
    @classmethod
    def from_diffusers(
        cls, scheduler_or_config, v_posterior: float = 0.0, *, sampling_only: bool = False
    ) -> "DiffusionSchedule":
        """Build the schedule a diffusers scheduler (or its config) uses, from that scheduler's own betas
        where it has them, so both compute with the same numbers. A scheduler made with
        ``rescale_betas_zero_snr=True`` gives a ``zero_terminal_snr`` schedule. ``sampling_only`` as in the
        constructor."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        zero_snr = bool(get("rescale_betas_zero_snr", False))
        betas = getattr(scheduler_or_config, "betas", None)
        if betas is not None:
            # the scheduler's betas are already rescaled; the rescale is idempotent
            return cls(given_betas=betas, v_posterior=v_posterior, zero_terminal_snr=zero_snr,
                       sampling_only=sampling_only)
        if get("trained_betas") is not None:
            return cls(given_betas=get("trained_betas"), v_posterior=v_posterior, zero_terminal_snr=zero_snr,
                       sampling_only=sampling_only)
        names = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}
        name = get("beta_schedule", "linear")
        if name not in names:
            raise ValueError(f"beta_schedule: diffusers schedule {name!r} is not supported")
        return cls(
            beta_schedule=names[name],
            timesteps=int(get("num_train_timesteps", 1000)),
            linear_start=float(get("beta_start", 1e-4)),
            linear_end=float(get("beta_end", 2e-2)),
            v_posterior=v_posterior,
            zero_terminal_snr=zero_snr,
            sampling_only=sampling_only,
        )
