"""``python -m ddpm_kernels demo``: the command line, and the run from data to report."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .. import __version__, backends
from .data import load_digits
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_FLOW_STEPS, DEFAULT_IMAGE_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_STEPS
from .defaults import DEFAULT_TIMESTEPS
from .model import OBJECTIVES, Generative, build_model, is_flow, objective_of, sample_shape, sampling_steps, step_op
from .quality import DigitClassifier, digit_quality
from .report import machine_info, render_quality_markdown, render_timing_markdown, save_progression
from .report import save_sample_grid, write_text
from .samplers import DEFAULT_SAMPLERS, SAMPLERS, compare_samplers, parse_samplers, render_samplers_markdown
from .sampling import backends_for, compare_backends, resolved_backend, sample_grid
from .timing import LATENT_SHAPE, TIMING_ROUNDS, auto_threads, load_average, time_sampling_step
from .training import EMA, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_kernels demo",
        description="Train a tiny DDPM (or, with --objective flow, a rectified flow) on scikit-learn's handwritten "
        "digits and sample it with the fused ops.",
    )
    p.add_argument(
        "--objective", default="ddpm", choices=OBJECTIVES,
        help="ddpm: GaussianDiffusion, ancestral sampling; flow: FlowMatching (rectified flow, SD3's logit-normal "
        "sigmas), Euler sampling (default: ddpm)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--backend", default="auto", choices=backends.BACKEND_NAMES, help="backend for sampling (default: auto)"
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default: {DEFAULT_STEPS})")
    p.add_argument(
        "--timesteps", type=int, default=None,
        help=f"sampling steps: DDPM's diffusion steps T (default: {DEFAULT_TIMESTEPS}), or flow's Euler steps "
        f"(default: {DEFAULT_FLOW_STEPS})",
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
    p.add_argument(
        "--samplers", nargs="*", default=None, metavar="NAME[:STEPS]",
        help="instead of the default sampling report: sample the DDPM model with these diffusers samplers, stock "
        f"and fused drop-in side by side (names: {', '.join(SAMPLERS)}; no names: {' '.join(DEFAULT_SAMPLERS)}); "
        "needs diffusers",
    )
    return p


def _print(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class _Run:
    """The parsed arguments and what was found out about the machine before any work started."""

    args: argparse.Namespace
    device: torch.device
    wall_start: float
    load_start: Optional[float]
    resolved: str  # the backend that ``--backend`` runs on here
    fused: List[str]  # fused backends to compare with the reference and time
    missing: Dict[str, str]  # fused backends that cannot run here, and why
    lacking: Dict[str, str] = field(default_factory=dict)  # fused backends that run here but lack the step op

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    def path(self, name: str) -> str:
        return os.path.join(self.args.out, name)


@dataclass
class _Model:
    """The model to sample, and how it came to be: trained here or loaded from a checkpoint."""

    diffusion: Generative  # a GaussianDiffusion, or a FlowMatching
    image_size: int
    steps_done: int
    losses: List[float] = field(default_factory=list)
    train_seconds: float = 0.0
    untrained_state: Optional[Dict[str, torch.Tensor]] = None  # the very weights training started from


def _final_loss(losses: List[float]) -> Optional[float]:
    return statistics.fmean(losses[-100:]) if losses else None


def _start(args: argparse.Namespace) -> Optional[_Run]:
    """Check the arguments and set up the machine; None, after printing why, when the demo cannot run."""
    wall_start = time.perf_counter()
    load_start = load_average()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _print("error: --device cuda but torch sees no CUDA device")
        return None
    torch.set_num_threads(args.threads or auto_threads(device))
    if args.checkpoint:  # the checkpoint says what was trained
        args.objective = _checkpoint_config(args.checkpoint).get("objective", "ddpm")
    if args.timesteps is None:
        args.timesteps = DEFAULT_FLOW_STEPS if args.objective == "flow" else DEFAULT_TIMESTEPS
    if args.steps < 0 or args.timesteps < 2 or args.num_samples < 1 or args.batch_size < 1:
        _print("error: --steps >= 0, --timesteps >= 2, --num-samples >= 1 and --batch-size >= 1 are required")
        return None
    if args.samplers is not None:
        if args.objective != "ddpm":
            _print("error: --samplers samples the DDPM objective (the diffusers schedulers' own)")
            return None
        try:
            import diffusers  # noqa: F401
            args.samplers = parse_samplers(args.samplers)
        except ImportError:
            _print("error: --samplers needs diffusers (pip install 'ddpm_kernels[diffusers]')")
            return None
        except ValueError as exc:
            _print(f"error: {exc}")
            return None
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    op = "flow_step" if args.objective == "flow" else "p_sample"
    try:
        resolved = resolved_backend(args.backend, device, op=op)
    except backends.BackendUnavailableError as exc:
        _print(f"error: {exc}")
        return None
    fused, missing, lacking = backends_for(device, op)
    if resolved != "reference" and resolved not in fused:  # an explicit --backend outside auto's list
        fused.append(resolved)
    return _Run(args, device, wall_start, load_start, resolved, fused, missing, lacking)


def _announce(run: _Run) -> None:
    _print(
        f"ddpm_kernels {__version__} demo on {run.device} (torch threads: {torch.get_num_threads()}, 1-minute load "
        f"average {run.load_start}), torch {torch.__version__}"
    )
    _print(f"sampling backend: {run.args.backend} -> {run.resolved}")
    for name, why in run.missing.items():
        _print(f"  fused backend {name!r} not available here: {why}")
    for name, why in run.lacking.items():
        _print(f"  fused backend {name!r}: {why}")


def _checkpoint_config(path: str) -> Dict[str, object]:
    return torch.load(path, map_location="cpu", weights_only=True)["config"]


def _load_checkpoint(run: _Run) -> _Model:
    args = run.args
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    diffusion = build_model(
        cfg.get("objective", "ddpm"), cfg["image_size"], cfg["timesteps"], args.backend, device=run.device,
        unet_config=cfg["unet"],
    )
    diffusion.model.load_state_dict(ckpt["model"])
    diffusion.eval()
    _print(f"loaded {args.checkpoint} ({cfg['steps']} training steps); training skipped")
    return _Model(diffusion, image_size=cfg["image_size"], steps_done=cfg["steps"])


def _save_checkpoint(run: _Run, diffusion: Generative) -> None:
    args = run.args
    ckpt_path = run.path("checkpoint.pt")
    config = {
        "objective": objective_of(diffusion),
        "image_size": args.image_size,
        "timesteps": args.timesteps,
        "unet": diffusion.model.config,
        "steps": args.steps,
        "seed": args.seed,
    }
    torch.save({"model": {k: v.cpu() for k, v in diffusion.model.state_dict().items()}, "config": config}, ckpt_path)
    _print(f"checkpoint (EMA weights): {ckpt_path}")


def _train_new(run: _Run, images: torch.Tensor) -> _Model:
    args = run.args
    diffusion = build_model(
        args.objective, args.image_size, args.timesteps, args.backend, args.base_channels, device=run.device
    )
    n_params = sum(p.numel() for p in diffusion.model.parameters())
    what = (f"rectified flow, {args.timesteps} Euler sampling steps" if is_flow(diffusion)
            else f"DDPM, T={args.timesteps}")
    _print(
        f"model: UNet, {n_params / 1e6:.2f} M parameters; {what}; "
        f"training {args.steps} steps x batch {args.batch_size}"
    )
    untrained_state = {k: v.clone() for k, v in diffusion.state_dict().items()}
    ema = EMA(diffusion.model)
    train_start = time.perf_counter()
    losses = train(diffusion, images, args.steps, args.batch_size, args.lr, args.seed, run.progress, ema)
    train_seconds = time.perf_counter() - train_start
    if args.steps:
        diffusion.model.load_state_dict(ema.state_dict())
        _print(
            f"trained in {train_seconds:.1f} s ({1e3 * train_seconds / args.steps:.0f} ms/step); "
            f"final loss (mean of last 100) {_final_loss(losses):.4f}"
        )
    _save_checkpoint(run, diffusion)
    return _Model(diffusion, args.image_size, args.steps, losses, train_seconds, untrained_state)


def _logged_labels(diffusion: Generative) -> List[str]:
    """Column titles of the progression strip: the starting noise, then each logged step."""
    if is_flow(diffusion):
        sigmas = diffusion.sigma_table().tolist()
        return ["noise"] + [f"s={sigmas[i]:.2f}" for i in diffusion.logged_steps()[1:]]
    T = diffusion.num_timesteps
    return ["x_T"] + [f"t={i}" for i in reversed(range(T)) if i % diffusion.log_every_t == 0 or i == T - 1]


def _sample(run: _Run, diffusion: Generative) -> Tuple[torch.Tensor, float]:
    """Sample the grid on ``--backend`` and save it with the denoising progression; (samples, seconds)."""
    args = run.args
    diffusion.backend = args.backend
    samples, intermediates, sample_seconds = sample_grid(diffusion, args.num_samples, args.seed, run.progress)
    T = sampling_steps(diffusion)
    logged = _logged_labels(diffusion)
    grid_path = run.path("samples.png")
    strip_path = run.path("progression.png")
    save_sample_grid(samples, grid_path)
    save_progression(intermediates, logged, strip_path)
    _print(
        f"sampled {args.num_samples} images in {sample_seconds:.1f} s ({1e3 * sample_seconds / T:.1f} ms/step) "
        f"on {run.resolved}: {grid_path}, {strip_path}"
    )
    return samples, sample_seconds


def _quality_figure(run: _Run, model: _Model, samples: torch.Tensor, images, labels) -> Dict[str, object]:
    """The trained model's samples, the same model untrained, and real held-out digits, scored alike."""
    args = run.args
    diffusion = model.diffusion
    classifier = DigitClassifier(images, labels, seed=args.seed)
    untrained_diffusion = build_model(
        objective_of(diffusion), diffusion.image_size, sampling_steps(diffusion), args.backend, device=run.device,
        unet_config=diffusion.model.config,
    )
    if model.untrained_state is not None:
        untrained_diffusion.load_state_dict(model.untrained_state)
    untrained, _, _ = sample_grid(untrained_diffusion, args.num_samples, args.seed, progress=False)
    save_sample_grid(untrained, run.path("samples_untrained.png"))
    quality = {
        "generated": digit_quality(classifier, samples),
        "untrained_model": digit_quality(classifier, untrained),
        "real_heldout": digit_quality(classifier, classifier.heldout_images),
        "classifier_heldout_accuracy": classifier.heldout_accuracy,
    }
    quality_table = render_quality_markdown(quality)
    write_text(run.path("quality.md"), quality_table)
    _print()
    _print(quality_table)
    return quality


def _compare(run: _Run, diffusion: Generative) -> Dict[str, Dict[str, float]]:
    equality = compare_backends(diffusion, run.fused, seed=run.args.seed)
    for name, e in equality.items():
        _print(
            f"fused {name} vs reference, same noise: max |diff| one step {e['step_max_abs_diff']:.2e}, "
            f"whole {sampling_steps(diffusion)}-step trajectory {e['trajectory_max_abs_diff']:.2e}"
        )
    if not equality:
        _print(f"fused vs reference equality: no fused backend runs {step_op(diffusion)} on {run.device.type} here, "
               f"nothing to compare")
    return equality


def _report(run: _Run, model: _Model, sample_seconds: float, timing, equality, quality) -> Dict[str, object]:
    args = run.args
    return {
        "machine": machine_info(run.device, args.condition, run.load_start),
        "config": {
            "device": str(run.device),
            "objective": objective_of(model.diffusion),
            "step_op": step_op(model.diffusion),
            "timesteps": sampling_steps(model.diffusion),
            "training_steps": model.steps_done,
            "batch_size": args.batch_size,
            "sample_shape": list(sample_shape(model.diffusion, args.num_samples)),
            "latent_shape": list(LATENT_SHAPE),
            "timing_rounds": TIMING_ROUNDS,
            "timing_repeats": args.timing_repeats,
            "seed": args.seed,
        },
        "sampling": {
            "backend": args.backend,
            "resolved": run.resolved,
            "seconds": sample_seconds,
            "num_samples": args.num_samples,
        },
        "timing": timing,
        "unavailable": run.missing,
        "no_fused_op": run.lacking,
        "equality": equality,
        "quality": quality,
        "final_loss": _final_loss(model.losses),
        "seconds": {"training": model.train_seconds, "total": time.perf_counter() - run.wall_start},
    }


def _samplers(run: _Run, model: _Model, images, labels) -> int:
    """``--samplers``: each sampler stock and fused from the same seed; a grid per sampler, the table, the JSON."""
    args = run.args
    classifier = DigitClassifier(images, labels, seed=args.seed)
    rows = compare_samplers(model.diffusion, args.samplers, classifier, args.num_samples, args.seed)
    for row in rows:
        if "samples" in row and (row["implementation"] == "fused" or not any(
                r["name"] == row["name"] and r["implementation"] == "fused" and "samples" in r for r in rows)):
            save_sample_grid(row["samples"], run.path(f"samples_{row['name']}.png"))
    table = render_samplers_markdown(rows, str(run.device), args.num_samples)
    write_text(run.path("samplers.md"), table)
    report = {
        "machine": machine_info(run.device, args.condition, run.load_start),
        "training_steps": model.steps_done,
        "timesteps": model.diffusion.num_timesteps,
        "seed": args.seed,
        "samplers": [{k: v for k, v in row.items() if k != "samples"} for row in rows],
    }
    with open(run.path("samplers.json"), "w") as f:
        json.dump(report, f, indent=2)
    _print(table)
    _print(f"total {time.perf_counter() - run.wall_start:.1f} s; outputs in {args.out}/")
    return 0


def main(argv=None) -> int:
    run = _start(_parser().parse_args(argv))
    if run is None:
        return 2
    args = run.args
    _announce(run)
    images, labels = load_digits(args.image_size)
    _print(f"data: {images.shape[0]} scikit-learn digits, upsampled to {args.image_size}x{args.image_size}, in [-1, 1]")
    model = _load_checkpoint(run) if args.checkpoint else _train_new(run, images)
    if model.image_size != args.image_size:
        images, labels = load_digits(model.image_size)
    if args.samplers is not None:
        return _samplers(run, model, images, labels)
    samples, sample_seconds = _sample(run, model.diffusion)
    quality = _quality_figure(run, model, samples, images, labels)
    _print()
    equality = _compare(run, model.diffusion)
    timing = time_sampling_step(
        model.diffusion, args.num_samples, ["reference"] + run.fused, args.timing_repeats, seed=args.seed
    )
    report = _report(run, model, sample_seconds, timing, equality, quality)
    table = render_timing_markdown(report)
    with open(run.path("report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_text(run.path("timing.md"), table)
    _print(table)
    _print(f"total {time.perf_counter() - run.wall_start:.1f} s; outputs in {args.out}/")
    return 0
