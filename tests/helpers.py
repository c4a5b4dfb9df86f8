"""Test helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: The tiny training config of the training tests (configs/ci.yaml: resnet10t).
CI_CONFIG = REPO / "configs" / "ci.yaml"


def tissue(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Pink, textured 'tissue' with purple nuclei: passes the tissue and focus checks."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((225, 150, 190), 14, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(max(4, h * w // 300)):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), 4, (80, 40, 130), -1)
    return img


def make_train_cfg(manifest: Path, out: Path, *overrides: str):
    """configs/ci.yaml on ``manifest``, writing to ``out``: two steps of 4 per epoch."""
    from calcinosis.training.config import load_config

    base = [
        "data.source=manifest",
        f"data.manifest={manifest}",
        f"output_dir={out}",
        "train.max_steps_per_epoch=2",
        "train.batch_size=4",
    ]
    return load_config(CI_CONFIG, [*base, *overrides])
