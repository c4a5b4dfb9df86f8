"""Test helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import cv2
import numpy as np


def tissue(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Pink, textured 'tissue' with purple nuclei: passes the tissue and focus checks."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((225, 150, 190), 14, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(max(4, h * w // 300)):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), 4, (80, 40, 130), -1)
    return img
