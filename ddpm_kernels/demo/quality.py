"""The quality figure: a digit classifier, and how digit-like a batch of images is in its eyes."""

from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

NOT_A_DIGIT = 10


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) images in [-1, 1] -> (N, 64) float features in [0, 1] at the digits' native 8x8."""
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x + 1) / 2).reshape(x.shape[0], -1).numpy()


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
