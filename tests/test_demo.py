"""The digits demo: a reduced end-to-end run, fused-vs-reference sampling, and the quality figure."""

import json
import os

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'ddpm-kernels[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install 'ddpm-kernels[demo]')")

import ddpm_kernels as dk  # noqa: E402
from ddpm_kernels import backends, demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FUSED = ("cpu", "triton", "cuda")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: one thread is as fast as two on an idle 2-core box and several times faster on
    a busy one (no OpenMP barrier waiting on a descheduled sibling)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _tiny_diffusion(device, timesteps=12, backend="auto"):
    """The demo's pipeline at toy size, with the zero-initialised output layers randomised so that the model
    output (and so every sampling step) is non-trivial."""
    torch.manual_seed(0)
    cfg = dict(in_channels=1, base_channels=8, channel_mult=(1, 2))
    diffusion = demo.build_diffusion(8, timesteps, backend, device=device, unet_config=cfg)
    with torch.no_grad():
        for p in diffusion.model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return diffusion.eval()


def _require_fused(backend, device):
    if backend not in dk.available_backends(device):
        reason = backends._load_errors.get(backend, "")
        try:
            backends.get_backend(backend, torch.device(device), torch.float32)
        except backends.BackendUnavailableError as exc:
            reason = str(exc)
        pytest.skip(f"no fused {backend!r} backend for {device} tensors on this machine, nothing to compare: {reason}")


# ------------------------------------------------------------------------------------ reduced end to end
def test_reduced_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    argv = ["--steps", "12", "--timesteps", "10", "--num-samples", "12", "--batch-size", "16",
            "--base-channels", "16", "--timing-repeats", "3", "--seed", "0", "--no-progress", "--out", str(out)]
    assert demo.main(argv) == 0
    for name in ("checkpoint.pt", "samples.png", "progression.png", "samples_untrained.png", "report.json",
                 "timing.md", "quality.md"):
        assert (out / name).is_file(), name
    for name in ("samples.png", "progression.png", "samples_untrained.png"):
        assert _is_png(out / name)

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["timesteps"] == 10 and report["config"]["training_steps"] == 12
    assert report["timing"][0]["backend"] == "reference"
    fused_here, missing = demo.fused_backends("cpu")
    assert [r["backend"] for r in report["timing"]] == ["reference"] + fused_here
    for row in report["timing"]:
        assert row["p_sample_us"] > 0 and row["step_ms"] > 0
    # A fused backend that cannot run here is reported as such, never given a number.
    table = (out / "timing.md").read_text()
    for name in missing:
        assert f"| {name} | not available on this machine |" in table
    assert set(report["equality"]) == set(fused_here)
    for name, e in report["equality"].items():
        assert e["step_max_abs_diff"] <= 1e-5, name
        assert e["trajectory_max_abs_diff"] <= 1e-3, name
    q = report["quality"]
    assert set(q) >= {"generated", "untrained_model", "real_heldout", "classifier_heldout_accuracy"}
    assert q["generated"]["n"] == 12

    # The checkpoint loads back and samples without training.
    out2 = tmp_path / "resampled"
    argv2 = ["--checkpoint", str(out / "checkpoint.pt"), "--num-samples", "4", "--timing-repeats", "3",
             "--no-progress", "--out", str(out2)]
    assert demo.main(argv2) == 0
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["config"]["timesteps"] == 10 and report2["config"]["training_steps"] == 12


def test_reduced_flow_demo_end_to_end(tmp_path):
    out = tmp_path / "flow"
    argv = ["--objective", "flow", "--steps", "12", "--timesteps", "6", "--num-samples", "12", "--batch-size", "16",
            "--base-channels", "16", "--timing-repeats", "3", "--seed", "0", "--no-progress", "--out", str(out)]
    assert demo.main(argv) == 0
    for name in ("checkpoint.pt", "samples.png", "progression.png", "samples_untrained.png", "report.json",
                 "timing.md", "quality.md"):
        assert (out / name).is_file(), name
    for name in ("samples.png", "progression.png", "samples_untrained.png"):
        assert _is_png(out / name)

    report = json.loads((out / "report.json").read_text())
    cfg = report["config"]
    assert (cfg["objective"], cfg["step_op"], cfg["timesteps"], cfg["training_steps"]) == ("flow", "flow_step", 6, 12)
    assert report["final_loss"] is not None and report["final_loss"] > 0
    # The step op's backends: those with a fused flow_step are timed and compared, the others say why not.
    fused_here, unavailable, lacking = demo.backends_for("cpu", "flow_step")
    assert [r["backend"] for r in report["timing"]] == ["reference"] + fused_here
    for row in report["timing"]:
        assert row["flow_step_us"] > 0 and row["flow_step_latent_us"] > 0 and row["step_ms"] > 0
    assert report["unavailable"] == unavailable and report["no_fused_op"] == lacking
    table = (out / "timing.md").read_text()
    assert "| backend | flow_step op, 12x1x16x16 (µs) |" in table and "6 Euler steps" in table
    for name in lacking:
        assert f"| {name} | no fused flow_step in this build (the reference ran) |" in table
    assert set(report["equality"]) == set(fused_here)
    for name, e in report["equality"].items():
        assert e["step_max_abs_diff"] <= 1e-5, name
        assert e["trajectory_max_abs_diff"] <= 1e-4, name
    assert report["quality"]["generated"]["n"] == 12

    # The checkpoint remembers the objective: it loads back as a flow model without --objective.
    out2 = tmp_path / "flow_resampled"
    argv2 = ["--checkpoint", str(out / "checkpoint.pt"), "--num-samples", "4", "--timing-repeats", "3",
             "--no-progress", "--out", str(out2)]
    assert demo.main(argv2) == 0
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["config"]["objective"] == "flow" and report2["config"]["timesteps"] == 6


def test_flow_training_lowers_the_loss_and_samples_from_the_seed():
    """The demo's flow model trains through `demo.train` (the loss falls on the digits) and `sample_grid`
    gives the Euler loop's result, reproducibly from the seed."""
    images, _ = demo.load_digits(8)
    torch.manual_seed(0)
    fm = demo.build_flow_matching(8, num_steps=4, unet_config=dict(in_channels=1, base_channels=8, channel_mult=(1, 2)))
    losses = demo.train(fm, images, steps=60, batch_size=32, lr=3e-3, seed=0, progress=False)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    a, inter, _ = demo.sample_grid(fm, 5, seed=3, progress=False)
    b, _, _ = demo.sample_grid(fm, 5, seed=3, progress=False)
    assert torch.equal(a, b) and len(inter) == len(fm.logged_steps())
    # the loop's starting noise: the package's noise stream from the seeded generator
    x_init = dk.randn_stream((5, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, demo.sample_with_noise(fm, x_init, seed=0, backend="reference"))


def test_samplers_compare_stock_and_fused_from_one_seed(tmp_path):
    """``--samplers``: every named sampler runs stock and fused from the same seed; the fused drop-in's samples
    are the stock ones within float32 rounding, a sampler without a drop-in is reported as such."""
    pytest.importorskip("diffusers")
    from ddpm_kernels.demo.samplers import SAMPLERS, parse_samplers, scheduler_classes

    out = tmp_path / "samplers"
    argv = ["--steps", "4", "--timesteps", "12", "--num-samples", "6", "--batch-size", "8", "--base-channels", "8",
            "--no-progress", "--out", str(out), "--samplers", "ddim:4", "euler_a:3", "dpm++2m:4"]
    assert demo.main(argv) == 0
    report = json.loads((out / "samplers.json").read_text())
    rows = report["samplers"]
    assert [(r["name"], r["implementation"]) for r in rows] == [
        (name, impl) for name in ("ddim", "euler_a", "dpm++2m") for impl in ("stock", "fused")]
    for row in rows:
        _, fused_cls = scheduler_classes(SAMPLERS[row["name"]])
        if row["implementation"] == "fused" and fused_cls is None:
            assert "missing" in row
            continue
        assert row["steps"] == {"ddim": 4, "euler_a": 3, "dpm++2m": 4}[row["name"]]
        assert row["seconds"] > 0 and row["quality"]["n"] == 6
        if row["implementation"] == "fused":
            assert row["max_abs_diff_vs_stock"] <= 1e-4, row
        assert _is_png(out / f"samples_{row['name']}.png")
    assert "| ddim (4 steps) | fused |" in (out / "samplers.md").read_text()
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        parse_samplers(["heun"])
    with pytest.raises(ValueError, match="STEPS a positive integer"):
        parse_samplers(["ddim:0"])
    assert [s.name for s in parse_samplers([])] == ["ddpm", "ddim", "dpm++2m", "unipc", "euler_a"]


def test_cli_dispatches_to_demo(tmp_path):
    from ddpm_kernels.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0


# --------------------------------------------------------------------------- fused == reference, same noise
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_matches_reference_same_noise(backend, device):
    _require_fused(backend, device)
    diffusion = _tiny_diffusion(device)
    g = torch.Generator(device=device).manual_seed(1)
    T = diffusion.num_timesteps
    for i in (T - 1, T // 2, 1, 0):
        t = torch.tensor([i, max(i - 1, 0), i, 0, T - 1], device=device)
        x_t = torch.randn((5, 1, 8, 8), generator=g, device=device)
        noise = torch.randn(x_t.shape, generator=g, device=device)
        with torch.no_grad():
            model_out = diffusion.model(x_t, t)
        args = (x_t, t, model_out, diffusion.schedule, "eps", True)
        ref = dk.p_sample(*args, noise=noise, backend="reference")
        got = dk.p_sample(*args, noise=noise, backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_sampling_loop_matches_reference_same_noise(backend, device):
    _require_fused(backend, device)
    # Few steps: Triton runs on CPU tensors only through its (slow) interpreter.
    diffusion = _tiny_diffusion(device, timesteps=6)
    x_T = torch.randn((4, 1, 8, 8), generator=torch.Generator(device=device).manual_seed(2), device=device)
    ref = demo.sample_with_noise(diffusion, x_T, seed=3, backend="reference")
    got = demo.sample_with_noise(diffusion, x_T, seed=3, backend=backend)
    # Per-step rounding differences (<= 1e-5) pass through the model at every step; 1e-4 bounds their growth.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sample_with_noise_is_the_explicit_noise_sampler():
    """The comparison helper itself: the reference run of it is deterministic in (x_T, seed) and differs for
    another seed, so equal fused/reference results are not equal by construction."""
    diffusion = _tiny_diffusion("cpu")
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    a = demo.sample_with_noise(diffusion, x_T, seed=5, backend="reference")
    b = demo.sample_with_noise(diffusion, x_T, seed=5, backend="reference")
    c = demo.sample_with_noise(diffusion, x_T, seed=6, backend="reference")
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- quality figure
@pytest.fixture(scope="module")
def digits():
    return demo.load_digits(16)


@pytest.fixture(scope="module")
def classifier(digits):
    return demo.DigitClassifier(*digits, seed=0)


def test_digits_data(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.99 and images.max() > 0.9
    assert sorted(labels.unique().tolist()) == list(range(10))
    with pytest.raises(ValueError, match="image_size"):
        demo.load_digits(12)


def test_quality_metric_separates_digits_from_noise(classifier):
    """The metric itself: real held-out digits are recognised, noise and an untrained model's samples are not."""
    assert classifier.heldout_accuracy >= 0.95
    real = demo.digit_quality(classifier, classifier.heldout_images)
    assert real["recognised"] >= 0.9 and real["digit_score"] >= 8 and real["classes"] == 10
    noise = demo.digit_quality(
        classifier, torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    )
    assert noise["recognised"] <= 0.05 and noise["not_a_digit"] >= 0.9 and noise["digit_score"] < 2
    # One digit repeated is recognised but scores low: the digit score also needs variety.
    ones = classifier.heldout_images[torch.from_numpy(classifier.heldout_labels == 1)]
    same = demo.digit_quality(classifier, ones)
    assert same["recognised"] >= 0.8 and same["digit_score"] < 2


@pytest.mark.slow
def test_quality_figure_trained_far_above_untrained(digits, classifier):
    """Train the demo's model briefly with a fixed seed: the classifier recognises its samples with high
    confidence, far above the untrained model's samples."""
    torch.manual_seed(0)
    images, _ = digits
    diffusion = demo.build_diffusion(16, timesteps=100)
    untrained, _, _ = demo.sample_grid(diffusion, 100, seed=0, progress=False)
    ema = demo.EMA(diffusion.model)
    demo.train(diffusion, images, steps=800, batch_size=64, seed=0, progress=False, ema=ema)
    diffusion.model.load_state_dict(ema.state_dict())
    samples, _, _ = demo.sample_grid(diffusion, 100, seed=0, progress=False)
    trained_q = demo.digit_quality(classifier, samples)
    untrained_q = demo.digit_quality(classifier, untrained)
    print("trained", trained_q, "untrained", untrained_q)
    assert untrained_q["recognised"] <= 0.05
    assert trained_q["recognised"] >= 0.7
    assert trained_q["confidence"] >= 0.75
    assert trained_q["digit_score"] >= 6 and trained_q["classes"] >= 9
