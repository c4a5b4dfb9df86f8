"""The colour-only baseline: how far colour alone gets, the yardstick for the network.

A logistic regression on colour histograms (features that ignore where each
colour is) fitted on a training split: whatever it gets right, colour alone
was enough for. ``calcinosis evaluate`` reports it beside the network, and the
robustness table beside every held-out set, so a model that only learned its
generator's palette shows up as no better than this.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import DataError, ImageReadError
from .imageio import read_rgb
from .manifest import Sample

__all__ = [
    "BASELINE_MAX_TRAIN",
    "BASELINE_SIZE",
    "colour_baseline",
    "colour_histogram_features",
    "fit_colour_baseline",
    "predict_colour_baseline",
]

log = logging.getLogger(__name__)

#: The colour baseline sees images shrunk to this side: colour histograms need
#: no detail, and it keeps fitting fast on large manifests.
BASELINE_SIZE = 64
#: At most this many training images are read for the baseline (random, seeded).
BASELINE_MAX_TRAIN = 3000

_HIST_BINS = 16  # per-channel bins of the marginal histograms
_JOINT_BINS = 4  # per-channel bins of the joint RGB histogram (4^3 = 64 cells)


def colour_histogram_features(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Colour-only features, one row per image (float32, 172 columns).

    Per image: 16-bin marginal histograms of R, G, B and of H, S, V (as
    fractions of pixels), a 4x4x4 joint RGB histogram, and the mean and
    standard deviation of each of the six channels. Every feature is a
    function of the multiset of pixel colours only, so shuffling the pixels of
    an image leaves its features unchanged: whatever this baseline gets right,
    colour alone was enough for. Images may differ in size; grey (H, W) and
    RGBA images are accepted (alpha is dropped).
    """
    from matplotlib.colors import rgb_to_hsv

    rows = []
    for k, img in enumerate(images):
        a = np.asarray(img)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"image {k}: expected (H, W, 3) RGB, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise ValueError(f"image {k}: expected uint8, got {a.dtype}")
        rgb = a[..., :3].reshape(-1, 3)
        if rgb.shape[0] == 0:
            raise ValueError(f"image {k} is empty")
        n = float(rgb.shape[0])
        q = (rgb.astype(np.int64) * _HIST_BINS) // 256
        rgb_hist = [np.bincount(q[:, c], minlength=_HIST_BINS) / n for c in range(3)]
        hsv = rgb_to_hsv(rgb.astype(np.float32) / 255.0)
        qh = np.minimum((hsv * _HIST_BINS).astype(np.int64), _HIST_BINS - 1)
        hsv_hist = [np.bincount(qh[:, c], minlength=_HIST_BINS) / n for c in range(3)]
        qj = (rgb.astype(np.int64) * _JOINT_BINS) // 256
        cell = (qj[:, 0] * _JOINT_BINS + qj[:, 1]) * _JOINT_BINS + qj[:, 2]
        joint = np.bincount(cell, minlength=_JOINT_BINS**3) / n
        chans = np.concatenate([rgb.astype(np.float32) / 255.0, hsv], axis=1)
        rows.append(
            np.concatenate(
                [*rgb_hist, *hsv_hist, joint, chans.mean(axis=0), chans.std(axis=0)]
            ).astype(np.float32)
        )
    if not rows:
        return np.zeros((0, 6 * _HIST_BINS + _JOINT_BINS**3 + 12), dtype=np.float32)
    return np.stack(rows)


def fit_colour_baseline(
    train_images: Sequence[np.ndarray] | np.ndarray,
    train_labels: Sequence[int] | np.ndarray,
    seed: int = 0,
) -> Any:
    """Fit StandardScaler + LogisticRegression on :func:`colour_histogram_features`.

    Returns the fitted scikit-learn ``Pipeline``; use
    :func:`predict_colour_baseline` to get probabilities laid out like the
    network's (one column per class index, even for classes missing from the
    training set).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = colour_histogram_features(train_images)
    y = np.asarray(train_labels)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError(
            "the colour baseline needs training images of at least two classes, "
            f"got labels {np.unique(y).tolist()}"
        )
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            # C=1 keeps the 172 correlated histogram features from being fitted
            # to noise; max_iter is generous because lbfgs converges slowly on
            # near-collinear histogram bins.
            ("logreg", LogisticRegression(C=1.0, max_iter=5000, random_state=seed)),
        ]
    )
    pipe.fit(x, y)
    return pipe


def predict_colour_baseline(
    pipeline: Any, images: Sequence[np.ndarray] | np.ndarray, num_classes: int
) -> np.ndarray:
    """(N, num_classes) probabilities of a baseline fitted on integer labels.

    Columns of classes that the baseline never saw in training are 0.
    """
    x = colour_histogram_features(images)
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    if len(x):
        proba = pipeline.predict_proba(x)
        cols = np.asarray(pipeline.classes_, dtype=np.int64)
        out[:, cols] = proba
    return out


def _read_small(path: Path) -> np.ndarray:
    rgb = read_rgb(path)
    return cv2.resize(rgb, (BASELINE_SIZE, BASELINE_SIZE), interpolation=cv2.INTER_AREA)


def colour_baseline(
    train_rows: Sequence[Sample], eval_rows: Sequence[Sample], class_names: Sequence[str]
) -> tuple[np.ndarray | None, str]:
    """Fit the colour-only baseline on the train rows; probabilities for the eval rows.

    Returns ``(probabilities (N, classes) or None, a note saying what was fitted)``;
    None when fewer than two classes of training images could be read.
    Training rows that cannot be read are skipped with a warning.
    """
    class_names = list(class_names)
    if len(train_rows) > BASELINE_MAX_TRAIN:
        train_rows = random.Random(0).sample(train_rows, BASELINE_MAX_TRAIN)
    images, labels = [], []
    for s in train_rows:
        try:
            images.append(_read_small(s.path))
        except (ImageReadError, DataError) as exc:
            log.warning("colour baseline: skipping %s: %s", s.path, exc)
            continue
        labels.append(class_names.index(s.label))
    if len(set(labels)) < 2:
        return None, "skipped: fewer than two classes of readable training images"
    pipe = fit_colour_baseline(images, labels)
    probs = predict_colour_baseline(
        pipe, [_read_small(s.path) for s in eval_rows], len(class_names)
    )
    note = f"logistic regression on colour histograms of {len(images)} train patches at {BASELINE_SIZE} px"
    return probs, note
