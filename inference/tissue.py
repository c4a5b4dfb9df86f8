"""Is there tissue in this patch, and is it in focus?

Cheap image statistics decide whether a patch is worth classifying at all. A
network always answers, even on blank glass or a blurred scan; these checks
let the predictor say ``no_tissue`` or ``out_of_focus`` instead of a confident
but meaningless class.

Tissue is stained, so it is coloured (saturation), darker than glass, or
textured; glass is bright, grey and flat. Pale tissue (an Alizarin red
counterstain, a urate tophus) can be nearly as bright as glass, so two
contrast cues catch it: fine texture, and being darker than the brightest
surroundings (clefts and gaps in a section are glass). Before measuring, the
image is white-balanced on its brightest pixels when those look like glass, so
a scanner's colour cast does not read as stain. Pure black areas that touch
the image border are scanner fill outside the scanned area and are not tissue;
dark areas inside the section are kept, because von Kossa paints calcium
deposits black.

Thresholds were set on the project's synthetic patches (all classes and
stains, training lab and a shifted lab) against synthetic blank glass with the
same illumination, tint, noise and JPEG ranges.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Saturation (0-255, HSV) above which a pixel counts as stained.
SATURATION_MIN = 12
#: Grey level (0-255) below which a pixel absorbs enough light to be tissue.
GREY_MAX = 210
#: Local standard deviation of the (lightly smoothed) grey image above which a
#: pixel is textured; sensor noise on glass stays below it.
TEXTURE_MIN = 2.0
#: A pixel this many grey levels darker than the brightest pixel nearby is tissue.
LOCAL_CONTRAST = 6.0
#: Every channel at or below this is "pure black" (scanner fill, if at the border).
BLACK_MAX = 12
#: Side of the square structuring element that removes specks and closes gaps.
MORPH_KERNEL = 5
#: Neighbourhood (pixels) for the texture and the local-brightness references.
_TEXTURE_WIN = 11
_BRIGHT_WIN = 31
_BRIGHT_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_BRIGHT_WIN, _BRIGHT_WIN))
#: Glass is white-balanced to this grey level.
_WHITE = 245.0
#: Rows processed at a time, to bound temporary memory on large regions.
_BAND_ROWS = 1024


def tissue_mask(rgb: np.ndarray, *, morphology: bool = True) -> np.ndarray:
    """Boolean ``(H, W)`` mask of tissue pixels in an RGB uint8 image.

    A pixel is tissue if it is coloured, darker than ``GREY_MAX``, textured, or
    clearly darker than the brightest pixel around it, and not part of a
    pure-black area touching the border. A small opening then closing removes
    dust specks and fills small gaps. Works in overlapping row bands so large
    images need only modest temporaries (callers tile or downsample regions).
    """
    rgb = _as_rgb_uint8(rgb)
    h, w = rgb.shape[:2]
    # Scanner fill first: painted white below, so its edge is not mistaken for texture.
    black = np.zeros((h, w), dtype=np.uint8)
    for y in range(0, h, _BAND_ROWS):
        black[y : y + _BAND_ROWS] = rgb[y : y + _BAND_ROWS].max(axis=2) <= BLACK_MAX
    fill = _border_connected(black) if black.any() else None
    gain = _white_balance_gain(rgb if fill is None else rgb[~fill])
    mask = np.zeros((h, w), dtype=np.uint8)
    halo = _BRIGHT_WIN  # context rows so band edges see the same neighbourhood
    for y in range(0, h, _BAND_ROWS):
        y0, y1 = max(0, y - halo), min(h, y + _BAND_ROWS + halo)
        band = rgb[y0:y1]
        if gain is not None:
            band = np.clip(band.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        if fill is not None:
            band = band.copy() if gain is None else band
            band[fill[y0:y1]] = int(_WHITE)
        sat = cv2.cvtColor(band, cv2.COLOR_RGB2HSV)[..., 1]
        grey = cv2.cvtColor(band, cv2.COLOR_RGB2GRAY).astype(np.float32)
        smooth = cv2.GaussianBlur(grey, (0, 0), 1.5)
        mean = cv2.blur(smooth, (_TEXTURE_WIN, _TEXTURE_WIN))
        sq = cv2.blur(smooth * smooth, (_TEXTURE_WIN, _TEXTURE_WIN))
        texture = np.sqrt(np.maximum(sq - mean * mean, 0.0))
        brightest = cv2.dilate(smooth, _BRIGHT_KERNEL)
        tissue = (
            (sat >= SATURATION_MIN)
            | (grey < GREY_MAX)
            | (texture >= TEXTURE_MIN)
            | (smooth < brightest - LOCAL_CONTRAST)
        )
        a = y - y0
        n = min(_BAND_ROWS, h - y)
        mask[y : y + n] = tissue[a : a + n]
    if fill is not None:
        mask[fill] = 0
    if morphology and min(h, w) >= 3 * MORPH_KERNEL:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (MORPH_KERNEL, MORPH_KERNEL))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool)


def outside_section(mask: np.ndarray) -> np.ndarray:
    """Background of a tissue mask that is connected to the image border.

    That is the glass around a section. Background enclosed by tissue (fat-cell
    interiors, pale unstained urate or amyloid inside the section) is not.
    """
    return _border_connected(~np.asarray(mask, dtype=bool))


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are tissue, in [0, 1]."""
    m = tissue_mask(rgb)
    return float(m.mean()) if m.size else 0.0


def focus_measure(rgb: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Relative sharpness of the tissue: Laplacian variance / grey-level variance.

    The variance of the Laplacian measures fine detail; dividing it by the
    grey-level variance makes pale and strongly stained patches comparable.
    Measured over tissue only (``mask``; computed if not given) and away from
    its edge, because blank glass is flat in any focus and the tissue/glass
    step is sharp in any focus. Returns 0.0 when there is no tissue. On the
    synthetic patches at 0.5 um/px sharp tissue scores >= 1, a Gaussian
    defocus of sigma 2 px <= 0.4 and of 3 px <= 0.3.
    """
    rgb = _as_rgb_uint8(rgb)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    if mask is None:
        mask = tissue_mask(rgb)
    if mask.shape != lap.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {lap.shape}")
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    if inner.sum() < 64:
        inner = mask
    if inner.sum() < 64:
        return 0.0
    return float(lap[inner].var() / (grey[inner].var() + 1.0))


def _white_balance_gain(rgb: np.ndarray) -> np.ndarray | None:
    """Per-channel gain mapping the brightest pixels to neutral white, if they look like glass.

    ``rgb`` is an image or a list of pixels ``(N, 3)``. Uses the 99th percentile
    of each channel (on a subsample for speed); when
    even the darkest of the three is below 190 the brightest pixels are tissue,
    not glass, and the image is left alone.
    """
    pixels = rgb.reshape(-1, 3)
    if len(pixels) == 0:
        return None
    step = max(1, len(pixels) // 250_000)
    sample = pixels[::step]
    ref = np.percentile(sample, 99, axis=0).astype(np.float32)
    if ref.min() < 190:
        return None
    return (_WHITE / np.maximum(ref, 1.0)).astype(np.float32)


def _border_connected(binary: np.ndarray) -> np.ndarray:
    """Pixels of ``binary`` whose connected component touches the image border."""
    n, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(binary.shape, dtype=bool)
    edge = np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).astype(np.int64)
    )
    edge = edge[edge > 0]
    if edge.size == 0:
        return np.zeros(binary.shape, dtype=bool)
    lut = np.zeros(n, dtype=bool)
    lut[edge] = True
    return lut[labels]


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {rgb.dtype}")
    return np.ascontiguousarray(rgb)
