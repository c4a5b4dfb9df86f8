"""Optical density and Macenko stain normalisation: pure numpy/OpenCV, shared by both sides.

Training uses these for its colour augmentations and, with
``augment.stain_normalize: macenko``, to normalise every patch; inference
normalises the same way when the checkpoint's preprocessing says so
(:mod:`calcinosis.model.preprocess`). Keeping the one implementation here means
the two can never drift apart.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "MACENKO_REF_MAX_CONC",
    "MACENKO_REF_STAINS",
    "apply_3x3",
    "macenko_normalize",
    "macenko_stains",
    "od_to_rgb",
    "rgb_to_od",
]

# Optical density of each uint8 level: -ln((v + 1) / 256); 255 (white) -> 0.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """Per-pixel optical density, ``(H, W, 3)`` float32, via a lookup table (cheap)."""
    return cv2.LUT(np.ascontiguousarray(image, dtype=np.uint8), _OD_LUT)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to uint8."""
    rgb = cv2.exp(-np.asarray(od, dtype=np.float32))
    # 256 * exp(-od) - 1, rounded and saturated to 0..255 in one OpenCV call.
    return cv2.convertScaleAbs(np.maximum(rgb, 1.0 / 256.0, out=rgb), alpha=256.0, beta=-1.0)


def apply_3x3(od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Per-pixel ``od @ matrix`` for an (H, W, 3) array; cv2.transform is SIMD and fast."""
    return cv2.transform(od, np.ascontiguousarray(matrix.T, dtype=np.float32))


# Reference H&E stain vectors (columns: haematoxylin, eosin; rows: R, G, B OD)
# and 99th-percentile concentrations, the values of Macenko et al.'s reference
# slide as circulated with the common reference implementation.
MACENKO_REF_STAINS = np.array(
    [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=np.float32
)
MACENKO_REF_MAX_CONC = np.array([1.9705, 1.0308], dtype=np.float32)


def macenko_stains(
    image: np.ndarray,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 100,
    max_samples: int = 8192,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Estimate the H&E stain matrix (3x2, unit columns) and 99th-percentile concentrations.

    Macenko et al. 2009: optical density, drop transparent pixels (any channel OD
    < ``beta``), project onto the plane of the two largest eigenvectors, take the
    ``alpha`` / ``100 - alpha`` percentile angles as the stain vectors. At most
    ``max_samples`` evenly strided tissue pixels enter the percentiles (the
    estimate barely moves, the cost halves). Returns None when there is too
    little tissue or the estimate degenerates.
    """
    od = rgb_to_od(image).reshape(-1, 3)
    tissue = od[np.all(od >= beta, axis=1)]
    if tissue.shape[0] < min_pixels:
        return None
    if tissue.shape[0] > max_samples:
        tissue = tissue[:: -(-tissue.shape[0] // max_samples)]
    cov = np.cov(tissue.T.astype(np.float64))
    if not np.all(np.isfinite(cov)):
        return None
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # two largest eigenvalues (eigh sorts ascending)
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Orient to positive OD and put haematoxylin (larger red OD) first.
    v1, v2 = v1 * np.sign(v1.sum() or 1.0), v2 * np.sign(v2.sum() or 1.0)
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    norms = np.linalg.norm(stains, axis=0)
    if np.any(norms < 1e-6):
        return None
    stains = stains / norms
    if abs(float(stains[:, 0] @ stains[:, 1])) > 0.999:  # one colour only: no plane
        return None
    stains = stains.astype(np.float32)
    # Background pixels have zero concentration, so the tissue sample gives the
    # same upper percentile as the whole image would, without its dilution.
    conc = tissue @ np.linalg.pinv(stains).T
    max_conc = np.percentile(conc, 99, axis=0).astype(np.float32)
    if np.any(~np.isfinite(max_conc)) or np.any(max_conc < 1e-3):
        return None
    return stains, max_conc


def macenko_normalize(
    image: np.ndarray,
    reference_stains: np.ndarray = MACENKO_REF_STAINS,
    reference_max_conc: np.ndarray = MACENKO_REF_MAX_CONC,
    beta: float = 0.15,
    alpha: float = 1.0,
) -> np.ndarray:
    """``image`` (uint8 RGB) with its H&E stains mapped onto the reference ones.

    Images with too little tissue (blank, white) come back unchanged. The
    method models two stains: von Kossa's black and Alizarin's orange-red are
    re-expressed as H&E-like colours, so use it for H&E-only data.
    """
    est = macenko_stains(image, beta, alpha)
    if est is None:
        return image
    stains, max_conc = est
    # od -> concentrations (pinv) -> rescaled to the reference maxima -> reference
    # stains: one 3x3 matrix per image.
    scale = np.asarray(reference_max_conc, np.float32) / max_conc
    matrix = (np.linalg.pinv(stains).T * scale[None, :]) @ np.asarray(
        reference_stains, np.float32
    ).T
    return od_to_rgb(apply_3x3(rgb_to_od(image), matrix))
