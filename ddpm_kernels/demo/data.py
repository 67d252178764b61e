"""The demo's data: scikit-learn's bundled handwritten digits (no download)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .defaults import DEFAULT_IMAGE_SIZE


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
