"""``python -m ddpm_kernels demo``: train a tiny DDPM on handwritten digits, sample it with the fused ops.

What it does, end to end, on the CPU in about five minutes with the defaults:

1. loads scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped inside scikit-learn: no
   download), upsamples them to ``--image-size`` (16x16) and scales them to [-1, 1];
2. trains a small UNet (`ddpm_kernels.unet.UNet`, ~1 M parameters) with `GaussianDiffusion` (eps
   parameterization, l2 loss, the seed's ``p_losses``), keeping an exponential moving average of the weights
   as CompVis' ``LitEma`` does, and saves a checkpoint;
3. samples a grid with ``p_sample_loop`` on ``--backend`` (``auto``: the fastest fused backend that runs
   here) and writes ``samples.png`` and ``progression.png`` (the denoising steps, ``return_intermediates``);
4. scores the samples with a classifier trained on the real digits (the quality figure, ``quality.md``), next
   to the same figure for held-out real digits and for the untrained model's samples;
5. checks that the fused backends and the reference give the same samples from the same noise, and times
   one sampling step on every backend side by side (``report.json``, rendered into ``timing.md``).

The functions are importable, so the same pipeline runs on your own model and data: build a
`GaussianDiffusion` around any ``model(x, t)``, train it with `train`, then call `sample_grid`,
`digit_quality` (or your own metric) and `time_sampling_step`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__, backends
from . import ops as dk_ops
from ._info import cpu_name
from .diffusion import GaussianDiffusion
from .schedule import DiffusionSchedule
from .unet import UNet

__all__ = [
    "load_digits",
    "build_diffusion",
    "EMA",
    "train",
    "sample_grid",
    "sample_with_noise",
    "DigitClassifier",
    "digit_quality",
    "compare_backends",
    "time_sampling_step",
    "main",
]

# Defaults sized for about 5 minutes end to end on an idle 2-core x86 CPU (~0.19 s per training step with two
# threads); see benchmarks/results/demo/ for a measured run.
DEFAULT_STEPS = 1200
DEFAULT_TIMESTEPS = 200
DEFAULT_BATCH_SIZE = 64
DEFAULT_IMAGE_SIZE = 16
DEFAULT_NUM_SAMPLES = 100


# ----------------------------------------------------------------------------------------------- data
def load_digits(image_size: int = DEFAULT_IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(images, labels)``: images (N, 1, S, S) float32 in [-1, 1].

    The 8x8 originals (integers 0..16) are upsampled bilinearly to ``image_size`` (a power of two >= 8).
    """
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size: expected a power of two >= 8, got {image_size!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn (its bundled digits and the quality classifier): "
            "pip install 'ddpm-kernels[demo]'"
        ) from exc
    digits = _sk_load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    return images, torch.from_numpy(digits.target.astype(np.int64))


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) images in [-1, 1] -> (N, 64) float features in [0, 1] at the digits' native 8x8."""
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x + 1) / 2).reshape(x.shape[0], -1).numpy()


# ---------------------------------------------------------------------------------------------- model
def build_diffusion(
    image_size: int = DEFAULT_IMAGE_SIZE,
    timesteps: int = DEFAULT_TIMESTEPS,
    backend: str = "auto",
    base_channels: int = 32,
    beta_schedule: str = "linear",
    device="cpu",
    unet_config: Optional[dict] = None,
) -> GaussianDiffusion:
    """The demo's `GaussianDiffusion`: a `UNet` and a CompVis linear schedule.

    The schedule's ``linear_start``/``linear_end`` (CompVis' 1e-4 and 2e-2 at T=1000) are scaled by 1000/T,
    so alphas_cumprod still ends near 0 (data fully noised) with fewer steps; at T=1000 they are CompVis'.
    """
    scale = 1000.0 / timesteps
    schedule = DiffusionSchedule(
        beta_schedule, timesteps=timesteps, linear_start=1e-4 * scale, linear_end=min(2e-2 * scale, 0.5)
    )
    config = dict(unet_config) if unet_config else dict(in_channels=1, base_channels=base_channels)
    model = UNet(**config)
    diffusion = GaussianDiffusion(
        model,
        schedule,
        parameterization="eps",
        loss_type="l2",
        log_every_t=max(1, timesteps // 10),
        image_size=image_size,
        channels=config.get("in_channels", 1),
        backend=backend,
    )
    return diffusion.to(device)


class EMA:
    """Exponential moving average of a model's weights (CompVis ``LitEma``: decay warms up as (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow


def train(
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    ema: Optional[EMA] = None,
) -> List[float]:
    """Train ``diffusion.model`` with the seed's ``p_losses`` for ``steps`` steps; returns the losses.

    AdamW with a short linear warm-up and a cosine decay to zero (a short run ends at its best weights).
    ``ema``, when given, is updated after every step.
    """
    device = diffusion.device
    model = diffusion.model
    model.train()
    diffusion.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    g = torch.Generator().manual_seed(seed)
    data = images.to(device)
    losses: List[float] = []
    bar = tqdm(range(steps), desc="Training", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g).to(device)
        x = data[idx]
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        loss, _ = diffusion.p_losses(x, t, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.4f}")
    model.eval()
    diffusion.eval()
    return losses


# ------------------------------------------------------------------------------------------- sampling
def _sample_shape(diffusion: GaussianDiffusion, n: int) -> Tuple[int, ...]:
    size = diffusion.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (n, diffusion.channels, *size)


@torch.no_grad()
def sample_grid(
    diffusion: GaussianDiffusion, num_samples: int, seed: int = 0, progress: bool = True
) -> Tuple[torch.Tensor, List[torch.Tensor], float]:
    """``p_sample_loop`` from a seeded generator: ``(samples, intermediates, seconds)``."""
    device = diffusion.device
    g = torch.Generator(device=device).manual_seed(seed)
    shape = _sample_shape(diffusion, num_samples)
    _sync(device)
    start = time.perf_counter()
    samples, intermediates = diffusion.p_sample_loop(shape, return_intermediates=True, generator=g, progress=progress)
    _sync(device)
    return samples, intermediates, time.perf_counter() - start


@torch.no_grad()
def sample_with_noise(diffusion: GaussianDiffusion, x_T: torch.Tensor, seed: int, backend: str) -> torch.Tensor:
    """Ancestral sampling from ``x_T`` where step ``i`` uses explicit noise drawn from ``seed``.

    Two backends run with the same ``x_T`` and ``seed`` see exactly the same noise, so their results differ
    only by floating-point rounding (in-kernel noise, ``noise=None``, is backend-specific).
    """
    g = torch.Generator(device=x_T.device).manual_seed(seed)
    img = x_T.clone()
    t = torch.empty((img.shape[0],), device=img.device, dtype=torch.long)
    for i in reversed(range(diffusion.num_timesteps)):
        t.fill_(i)
        noise = torch.randn(img.shape, generator=g, device=img.device, dtype=img.dtype)
        model_out = diffusion.model(img, t)
        dk_ops.p_sample(
            img, t, model_out, diffusion.schedule, diffusion.parameterization, diffusion.clip_denoised,
            noise=noise, backend=backend, out=img,
        )
    return img


def fused_backends(device, dtype=torch.float32) -> Tuple[List[str], Dict[str, str]]:
    """(fused backends that run here, {fused backend: why not} for the device's other fused backends)."""
    device = torch.device(device)
    names = list(backends.AUTO_ORDER.get(device.type, ()))
    available, missing = [], {}
    for name in names:
        try:
            backends.get_backend(name, device, dtype)
            available.append(name)
        except backends.BackendUnavailableError as exc:
            missing[name] = str(exc)
    return available, missing


def resolved_backend(backend: str, device, dtype=torch.float32) -> str:
    """The backend that actually runs ``p_sample`` for ``backend`` (``auto`` resolved), without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return backends.resolve("p_sample", backend, torch.device(device), dtype)[0]


@torch.no_grad()
def compare_backends(
    diffusion: GaussianDiffusion, fused: Sequence[str], num_samples: int = 8, seed: int = 0
) -> Dict[str, Dict[str, float]]:
    """Max |fused - reference| for each fused backend: one step at every logged t, and whole trajectories
    (same x_T, same explicit noise per step)."""
    device = diffusion.device
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn(_sample_shape(diffusion, num_samples), generator=g, device=device)
    results: Dict[str, Dict[str, float]] = {}
    ref_final = sample_with_noise(diffusion, x_T, seed + 1, "reference") if fused else None
    for name in fused:
        step_err = 0.0
        for i in range(diffusion.num_timesteps - 1, -1, -diffusion.log_every_t):
            t = torch.full((num_samples,), i, device=device, dtype=torch.long)
            x_t = torch.randn(x_T.shape, generator=g, device=device)
            noise = torch.randn(x_T.shape, generator=g, device=device)
            model_out = diffusion.model(x_t, t)
            args = (x_t, t, model_out, diffusion.schedule, diffusion.parameterization, diffusion.clip_denoised)
            ref = dk_ops.p_sample(*args, noise=noise, backend="reference")
            got = dk_ops.p_sample(*args, noise=noise, backend=name)
            step_err = max(step_err, float((got - ref).abs().max()))
        final = sample_with_noise(diffusion, x_T, seed + 1, name)
        results[name] = {
            "step_max_abs_diff": step_err,
            "trajectory_max_abs_diff": float((final - ref_final).abs().max()),
        }
    return results


# -------------------------------------------------------------------------------------- quality figure
NOT_A_DIGIT = 10


def non_digit_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images (N, 1, 8, 8) in [0, 1] that are not digits: the classifier's "not a digit" class.

    Four kinds in equal parts: i.i.d. uniform pixels; Gaussian noise at 16x16, clipped to [-1, 1] and pooled
    to 8x8 (what a model that has learnt nothing samples); smooth random blobs (4x4 noise, upsampled); flat
    grey images. Without this class a confident classifier calls noise some digit with p > 0.9: a softmax
    must put its mass somewhere.
    """
    g = torch.Generator().manual_seed(seed)
    k = n // 4
    uniform = torch.rand(k, 1, 8, 8, generator=g)
    gaussian = F.avg_pool2d((torch.randn(k, 1, 16, 16, generator=g).clamp(-1, 1) + 1) / 2, 2)
    blobs = F.interpolate(torch.rand(k, 1, 4, 4, generator=g), size=(8, 8), mode="bilinear", align_corners=False)
    flat = torch.rand(n - 3 * k, 1, 1, 1, generator=g).expand(n - 3 * k, 1, 8, 8)
    return torch.cat([uniform, gaussian, blobs, flat])


def _one_blas_thread():
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    return threadpool_limits(1)


class DigitClassifier:
    """A small MLP (scikit-learn) that labels 8x8 images as one of the ten digits or "not a digit".

    Trained on 80% of the real digits plus as many `non_digit_images`; the other 20% of the digits are held
    out (``heldout_images``, ``heldout_accuracy``). Generated images are average-pooled to 8x8 the same way
    the real 16x16 images are, so both reach it through the same pipeline.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        rng = np.random.default_rng(seed)
        perm = rng.permutation(images.shape[0])
        n_train = int(0.8 * len(perm))
        train_idx, test_idx = perm[:n_train], perm[n_train:]
        features = to_8x8(images)
        y = labels.numpy()
        negatives = non_digit_images(n_train, seed).reshape(n_train, -1).numpy()
        x_train = np.concatenate([features[train_idx], negatives])
        y_train = np.concatenate([y[train_idx], np.full(n_train, NOT_A_DIGIT)])
        self.model = MLPClassifier(
            hidden_layer_sizes=(128,), batch_size=256, learning_rate_init=3e-3, max_iter=200, random_state=seed
        )
        # One BLAS thread: these matrices are tiny, and on a busy machine OpenBLAS' thread pool makes the fit
        # ~7x slower. It also makes the fit bit-reproducible.
        with _one_blas_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: 200 epochs are plenty for these 2.9k images
            self.model.fit(x_train, y_train)
        self.heldout_images = images[test_idx]
        self.heldout_labels = y[test_idx]
        self.heldout_accuracy = float((self.predict_proba(self.heldout_images).argmax(1) == y[test_idx]).mean())

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """(N, 11) probabilities: digits 0-9, then "not a digit"."""
        with _one_blas_thread():
            return self.model.predict_proba(to_8x8(images))


def digit_quality(classifier: DigitClassifier, images: torch.Tensor, threshold: float = 0.9) -> Dict[str, float]:
    """How digit-like a batch of images is, in the classifier's eyes.

    * ``recognised``: fraction of images that the classifier gives one digit with probability >= ``threshold``
      (the headline figure);
    * ``confidence``: mean over images of the top digit probability (0 for an image it calls "not a digit");
    * ``not_a_digit``: fraction of images whose top class is "not a digit";
    * ``digit_score``: exp(E_x KL(p(y|x) || p(y))) over the eleven classes, the Inception Score computed with
      the digit classifier: 1 when every image gets the same answer (noise, or one digit over and over), up
      to 10 when every image is a confident digit and the ten digits come equally often;
    * ``classes``: how many of the ten digits are the top class of at least one image.
    """
    p = classifier.predict_proba(images).astype(np.float64)
    p_y = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + 1e-12) - np.log(p_y + 1e-12))).sum(axis=1)
    top_digit = p[:, :NOT_A_DIGIT].max(axis=1)
    top = p.argmax(axis=1)
    return {
        "recognised": float((top_digit >= threshold).mean()),
        "confidence": float(top_digit.mean()),
        "not_a_digit": float((top == NOT_A_DIGIT).mean()),
        "digit_score": float(np.exp(kl.mean())),
        "classes": int(len(np.unique(top[top != NOT_A_DIGIT]))),
        "n": int(p.shape[0]),
    }


# ---------------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA: synchronised around each call)."""
    for _ in range(max(2, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_sampling_step(
    diffusion: GaussianDiffusion,
    batch_size: int,
    backend_names: Sequence[str],
    repeats: int = 50,
    latent_shape: Sequence[int] = (8, 4, 64, 64),
    seed: int = 0,
) -> List[Dict[str, object]]:
    """Per-step sampling time on each backend, same inputs, interleaved so load changes hit all alike.

    For each backend: the ``p_sample`` op alone at the demo's shape and at a latent-diffusion-sized shape
    (``latent_shape``, where the op's memory traffic matters), and a whole step (UNet call + ``p_sample``),
    as ``p_sample_loop`` runs it (``noise=None``: noise drawn by the backend from a generator).
    """
    device = diffusion.device
    s = diffusion.schedule
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(_sample_shape(diffusion, batch_size), generator=g, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=g, device=device)
    model_out = diffusion.model(x, t)
    xl = torch.randn(tuple(latent_shape), generator=g, device=device)
    tl = torch.randint(0, diffusion.num_timesteps, (xl.shape[0],), generator=g, device=device)
    outl = torch.randn(xl.shape, generator=g, device=device)
    buf, bufl = torch.empty_like(x), torch.empty_like(xl)
    kw = dict(parameterization=diffusion.parameterization, clip_denoised=diffusion.clip_denoised, generator=g)

    def op(name):
        return lambda: dk_ops.p_sample(x, t, model_out, s, backend=name, out=buf, **kw)

    def op_latent(name):
        return lambda: dk_ops.p_sample(xl, tl, outl, s, backend=name, out=bufl, **kw)

    def step(name):
        def run():
            dk_ops.p_sample(x, t, diffusion.model(x, t), s, backend=name, out=buf, **kw)

        return run

    results = {name: {"op": [], "op_latent": [], "step": []} for name in backend_names}
    rounds = 5  # interleave backends in rounds: on a shared, noisy machine each sees the same conditions
    for _ in range(rounds):
        for name in backend_names:
            results[name]["op"].append(_median_time(op(name), repeats, device))
            results[name]["op_latent"].append(_median_time(op_latent(name), max(5, repeats // 5), device))
            results[name]["step"].append(_median_time(step(name), max(3, repeats // 10), device))
    rows = []
    for name in backend_names:
        r = {k: statistics.median(v) for k, v in results[name].items()}
        rows.append(
            {
                "backend": name,
                "p_sample_us": r["op"] * 1e6,
                "p_sample_latent_us": r["op_latent"] * 1e6,
                "step_ms": r["step"] * 1e3,
            }
        )
    return rows


def _fmt_load(machine: Dict[str, object]) -> str:
    load = machine.get("load_average") or {}
    return f"{load.get('start')} at start, {load.get('end')} at the end"


def render_timing_markdown(report: Dict[str, object]) -> str:
    """The timing table (markdown) from the demo's JSON report; the table is never written by hand."""
    m = report["machine"]
    cfg = report["config"]
    shape = "x".join(str(d) for d in cfg["sample_shape"])
    latent = "x".join(str(d) for d in cfg["latent_shape"])
    lines = [
        f"Machine: {m['device_name']} ({m['threads']} torch threads), torch {m['torch']}, "
        f"ddpm_kernels {m['ddpm_kernels']}, {m['date']}, 1-minute load average {_fmt_load(m)}. {m['condition']}",
        "",
        f"Per-step sampling time, T={cfg['timesteps']}, samples {shape}; median of {cfg['timing_rounds']} "
        f"interleaved rounds.",
        "",
        f"| backend | p_sample op, {shape} (µs) | p_sample op, {latent} (µs) | step: UNet + p_sample (ms) "
        f"| op speed-up vs reference |",
        "|---|---:|---:|---:|---:|",
    ]
    ref = next((r for r in report["timing"] if r["backend"] == "reference"), None)
    for r in report["timing"]:
        speed = "1.00x" if r["backend"] == "reference" or ref is None else (
            f"{ref['p_sample_us'] / r['p_sample_us']:.2f}x / {ref['p_sample_latent_us'] / r['p_sample_latent_us']:.2f}x"
        )
        lines.append(
            f"| {r['backend']} | {r['p_sample_us']:.1f} | {r['p_sample_latent_us']:.1f} | {r['step_ms']:.2f} "
            f"| {speed} |"
        )
    for name, why in report["unavailable"].items():
        lines.append(f"| {name} | not available on this machine | — | — | — |")
    if report["unavailable"]:
        lines.append("")
        for name, why in report["unavailable"].items():
            lines.append(f"- `{name}`: {why}")
    sampling = report["sampling"]
    lines += [
        "",
        f"Sampling the grid ({sampling['num_samples']} samples, {cfg['timesteps']} steps) with backend="
        f"`{sampling['backend']}` (ran on `{sampling['resolved']}`): {sampling['seconds']:.1f} s.",
    ]
    if "seconds" in report:
        sec = report["seconds"]
        lines.append(
            f"Whole demo: {sec['total']:.0f} s, of which training ({cfg['training_steps']} steps, batch "
            f"{cfg['batch_size']}) {sec['training']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def render_quality_markdown(quality: Dict[str, object]) -> str:
    """The quality table (markdown) from the demo's quality dict."""
    lines = [
        "Quality figure: an MLP trained on real digits plus a \"not a digit\" class of noise images "
        f"(held-out digit accuracy {quality['classifier_heldout_accuracy']:.3f}) labels each image, pooled to 8x8.",
        "",
        "| images | n | recognised (p >= 0.9) | mean top-digit probability | not a digit | digit score (1-10) "
        "| digits seen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "generated": "trained model's samples",
        "untrained_model": "untrained model's samples",
        "real_heldout": "real held-out digits",
    }
    for key, label in names.items():
        if key in quality:
            q = quality[key]
            lines.append(
                f"| {label} | {q['n']} | {q['recognised']:.1%} | {q['confidence']:.3f} | {q['not_a_digit']:.1%} "
                f"| {q['digit_score']:.2f} | {q['classes']} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- images
def _tile(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, 1, S, S) in [-1, 1] -> a 2-D grey grid in [0, 1], white padding between images."""
    x = ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2)[:, 0].numpy()
    n, s = x.shape[0], x.shape[-1]
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = np.ones((nrows * (s + pad) + pad, ncol * (s + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (s + pad) : pad + r * (s + pad) + s, pad + c * (s + pad) : pad + c * (s + pad) + s] = x[i]
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 4) -> None:
    """A PNG grid of images, white digits on black as in the data, each pixel ``scale`` x ``scale``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _tile(images, nrow)
    plt.imsave(path, np.kron(grid, np.ones((scale, scale), dtype=np.float32)), cmap="gray", vmin=0, vmax=1)


def save_progression(intermediates: Sequence[torch.Tensor], steps: Sequence[int], path: str, rows: int = 8) -> None:
    """A PNG strip: one row per sample, one column per logged step, from pure noise (left) to x_0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(intermediates)
    rows = min(rows, intermediates[0].shape[0])
    fig, axes = plt.subplots(rows, cols, figsize=(0.75 * cols, 0.75 * rows + 0.35), squeeze=False)
    for c, (img, label) in enumerate(zip(intermediates, steps)):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(((img[r, 0].float().cpu().clamp(-1, 1) + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][c].set_title(label, fontsize=7)
    top = 1 - 0.3 / (0.75 * rows + 0.35)  # room for the column titles
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_kernels demo",
        description="Train a tiny DDPM on scikit-learn's handwritten digits and sample it with the fused ops.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--backend", default="auto", choices=backends.BACKEND_NAMES, help="backend for sampling (default: auto)"
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default: {DEFAULT_STEPS})")
    p.add_argument(
        "--timesteps", type=int, default=DEFAULT_TIMESTEPS, help=f"diffusion steps T (default: {DEFAULT_TIMESTEPS})"
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"training batch (default: {DEFAULT_BATCH_SIZE})"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="8, 16 or 32 (default: 16)")
    p.add_argument("--base-channels", type=int, default=32, help="UNet width (default: 32)")
    p.add_argument(
        "--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="samples to draw and score (default: 100)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and the classifier (default: 0)")
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    p.add_argument("--checkpoint", default=None, help="load this checkpoint and skip training")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice, fewer when other processes keep cores busy)",
    )
    p.add_argument("--timing-repeats", type=int, default=50, help="calls per timing measurement (default: 50)")
    p.add_argument("--condition", default="", help="a note on the machine's condition, written into the timing table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    wall_start = time.perf_counter()
    load_start = _load_average()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _print("error: --device cuda but torch sees no CUDA device")
        return 2
    torch.set_num_threads(args.threads or _auto_threads(device))
    if args.steps < 0 or args.timesteps < 2 or args.num_samples < 1 or args.batch_size < 1:
        _print("error: --steps >= 0, --timesteps >= 2, --num-samples >= 1 and --batch-size >= 1 are required")
        return 2
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    torch.manual_seed(args.seed)

    try:
        resolved = resolved_backend(args.backend, device)
    except backends.BackendUnavailableError as exc:
        _print(f"error: {exc}")
        return 2
    fused, missing = fused_backends(device)
    if resolved != "reference" and resolved not in fused:  # an explicit --backend outside auto's list
        fused.append(resolved)
    _print(
        f"ddpm_kernels {__version__} demo on {device} (torch threads: {torch.get_num_threads()}, 1-minute load "
        f"average {load_start}), torch {torch.__version__}"
    )
    _print(f"sampling backend: {args.backend} -> {resolved}")
    for name, why in missing.items():
        _print(f"  fused backend {name!r} not available here: {why}")

    # ---- data and model
    images, labels = load_digits(args.image_size)
    _print(f"data: {images.shape[0]} scikit-learn digits, upsampled to {args.image_size}x{args.image_size}, in [-1, 1]")
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        cfg = ckpt["config"]
        diffusion = build_diffusion(
            cfg["image_size"], cfg["timesteps"], args.backend, device=device, unet_config=cfg["unet"]
        )
        diffusion.model.load_state_dict(ckpt["model"])
        diffusion.eval()
        losses: List[float] = []
        untrained_state = None
        train_seconds = 0.0
        steps_done = cfg["steps"]
        _print(f"loaded {args.checkpoint} ({steps_done} training steps); training skipped")
        if cfg["image_size"] != args.image_size:
            images, labels = load_digits(cfg["image_size"])
    else:
        diffusion = build_diffusion(args.image_size, args.timesteps, args.backend, args.base_channels, device=device)
        n_params = sum(p.numel() for p in diffusion.model.parameters())
        _print(
            f"model: UNet, {n_params / 1e6:.2f} M parameters; T={args.timesteps}; "
            f"training {args.steps} steps x batch {args.batch_size}"
        )
        untrained_state = {k: v.clone() for k, v in diffusion.state_dict().items()}
        ema = EMA(diffusion.model)
        train_start = time.perf_counter()
        losses = train(diffusion, images, args.steps, args.batch_size, args.lr, args.seed, progress, ema)
        train_seconds = time.perf_counter() - train_start
        steps_done = args.steps
        if args.steps:
            diffusion.model.load_state_dict(ema.state_dict())
            _print(
                f"trained in {train_seconds:.1f} s ({1e3 * train_seconds / args.steps:.0f} ms/step); "
                f"final loss (mean of last 100) {statistics.fmean(losses[-100:]):.4f}"
            )
        ckpt_path = os.path.join(args.out, "checkpoint.pt")
        torch.save(
            {
                "model": {k: v.cpu() for k, v in diffusion.model.state_dict().items()},
                "config": {
                    "image_size": args.image_size,
                    "timesteps": args.timesteps,
                    "unet": diffusion.model.config,
                    "steps": args.steps,
                    "seed": args.seed,
                },
            },
            ckpt_path,
        )
        _print(f"checkpoint (EMA weights): {ckpt_path}")

    # ---- sampling with the requested backend
    diffusion.backend = args.backend
    samples, intermediates, sample_seconds = sample_grid(diffusion, args.num_samples, args.seed, progress)
    T = diffusion.num_timesteps
    logged = [f"x_T"] + [f"t={i}" for i in reversed(range(T)) if i % diffusion.log_every_t == 0 or i == T - 1]
    grid_path = os.path.join(args.out, "samples.png")
    strip_path = os.path.join(args.out, "progression.png")
    save_grid(samples[:100], grid_path, nrow=min(10, samples.shape[0]))
    save_progression(intermediates, logged, strip_path)
    _print(
        f"sampled {args.num_samples} images in {sample_seconds:.1f} s ({1e3 * sample_seconds / T:.1f} ms/step) "
        f"on {resolved}: {grid_path}, {strip_path}"
    )

    # ---- quality figure: the trained model, the same model untrained, and real held-out digits
    classifier = DigitClassifier(images, labels, seed=args.seed)
    untrained_diffusion = build_diffusion(
        diffusion.image_size, T, args.backend, device=device, unet_config=diffusion.model.config
    )
    if untrained_state is not None:  # the very weights training started from
        untrained_diffusion.load_state_dict(untrained_state)
    untrained, _, _ = sample_grid(untrained_diffusion, args.num_samples, args.seed, progress=False)
    save_grid(untrained[:100], os.path.join(args.out, "samples_untrained.png"), nrow=min(10, untrained.shape[0]))
    quality = {
        "generated": digit_quality(classifier, samples),
        "untrained_model": digit_quality(classifier, untrained),
        "real_heldout": digit_quality(classifier, classifier.heldout_images),
        "classifier_heldout_accuracy": classifier.heldout_accuracy,
    }
    quality_table = render_quality_markdown(quality)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(quality_table)
    _print()
    _print(quality_table)

    # ---- fused vs reference: equality and time
    _print()
    equality = compare_backends(diffusion, fused, seed=args.seed)
    if equality:
        for name, e in equality.items():
            _print(
                f"fused {name} vs reference, same noise: max |diff| one step {e['step_max_abs_diff']:.2e}, "
                f"whole {T}-step trajectory {e['trajectory_max_abs_diff']:.2e}"
            )
    else:
        _print(f"fused vs reference equality: no fused backend runs on {device.type} here, nothing to compare")
    timing_names = ["reference"] + fused
    timing = time_sampling_step(diffusion, args.num_samples, timing_names, args.timing_repeats, seed=args.seed)
    report = {
        "machine": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "ddpm_kernels": __version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "condition": args.condition,
            "load_average": {"start": load_start, "end": _load_average()},
        },
        "config": {
            "device": str(device),
            "timesteps": T,
            "training_steps": steps_done,
            "batch_size": args.batch_size,
            "sample_shape": list(_sample_shape(diffusion, args.num_samples)),
            "latent_shape": [8, 4, 64, 64],
            "timing_rounds": 5,
            "timing_repeats": args.timing_repeats,
            "seed": args.seed,
        },
        "sampling": {
            "backend": args.backend,
            "resolved": resolved,
            "seconds": sample_seconds,
            "num_samples": args.num_samples,
        },
        "timing": timing,
        "unavailable": missing,
        "equality": equality,
        "quality": quality,
        "final_loss": statistics.fmean(losses[-100:]) if losses else None,
        "seconds": {"training": train_seconds, "total": time.perf_counter() - wall_start},
    }
    table = render_timing_markdown(report)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "timing.md"), "w") as f:
        f.write(table)
    _print(table)
    _print(f"total {time.perf_counter() - wall_start:.1f} s; outputs in {args.out}/")
    return 0


def _auto_threads(device) -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load average).

    PyTorch's CPU ops split work across threads that meet at a barrier after every op; when another process
    holds one of the cores, every op waits for the descheduled thread. On a 2-core machine with a load of ~4
    this makes a training step 3x slower with 2 threads than with 1.
    """
    threads = torch.get_num_threads()
    load = _load_average()
    if torch.device(device).type != "cpu" or load is None:
        return threads
    free = (os.cpu_count() or threads) - int(round(load))
    return max(1, min(threads, free))


def _load_average() -> Optional[float]:
    """The 1-minute load average (other processes competing for the cores), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
