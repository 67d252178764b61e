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

``--objective flow`` trains the same UNet as a rectified flow instead (`FlowMatching`: SD3's logit-normal
sigmas, the velocity loss) and samples it with the fused Euler step (``flow_step``, 50 steps by default); the
quality figure, the fused-vs-reference check and the timings are the same, for ``flow_step``.

The functions are importable, so the same pipeline runs on your own model and data: build a
`GaussianDiffusion` around any ``model(x, t)``, train it with `train`, then call `sample_grid`,
`digit_quality` (or your own metric) and `time_sampling_step`.

Modules, one concern each: `data`, `model` (the UNet and schedule), `training`, `sampling` (and the
fused-vs-reference check), `quality` (the digit classifier), `timing`, `report` (PNGs, markdown, JSON) and
`cli` (the command line that runs them in order).
"""

from .cli import main
from .data import load_digits
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_STEPS, DEFAULT_TIMESTEPS
from .model import build_diffusion, build_flow_matching, build_model
from .quality import NOT_A_DIGIT, DigitClassifier, digit_quality, non_digit_images, to_8x8
from .report import render_quality_markdown, render_timing_markdown, save_grid, save_progression
from .sampling import backends_for, compare_backends, fused_backends, resolved_backend, sample_grid, sample_with_noise
from .timing import time_sampling_step
from .training import EMA, train

__all__ = [
    "load_digits",
    "build_diffusion",
    "build_flow_matching",
    "build_model",
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
