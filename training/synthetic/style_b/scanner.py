"""Style B's slide and scanner: section thickness, chatter, folds, bubbles, light, optics, noise."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..codec import scanner_jpeg
from .canvas import TWO_PI, Canvas, pick_one
from .layout import Layout


def scanner_settings(rng: np.random.Generator, shift: float) -> dict:
    """Per-patch preparation and scanner settings; ``shift`` pushes them out of range."""
    return {
        "thickness": rng.uniform(0.05, 0.12),
        "grain": rng.uniform(0.0, 0.16) if rng.random() < 0.7 else 0.0,
        "ramp": rng.uniform(0.0, 0.07) + 0.1 * shift,
        "gain": rng.uniform(0.97, 1.03) - 0.05 * shift * rng.random(),
        "cast": rng.normal(0, 0.012, 3) + shift * rng.normal(0, 0.05, 3),
        "blur_kind": pick_one(rng, ("none", "gauss", "box"), (0.35, 0.45, 0.2)),
        "blur": rng.uniform(0.3, 0.9) + shift * rng.uniform(0.6, 1.4),
        "resample": rng.random() < 0.2 + 0.2 * shift,
        "noise": rng.uniform(0.06, 0.22) + 0.25 * shift,
        "chatter": rng.random() < 0.08 + 0.1 * shift,
        "fold": rng.random() < 0.05 + 0.1 * shift,
        "bubble": rng.random() < 0.04 + 0.1 * shift,
        "jpeg": int(np.clip(rng.integers(62, 97) - 45 * shift, 12, 100))
        if rng.random() < 0.75
        else 0,
    }


def finish(cv: Canvas, lay: Layout, sc: dict, shift: float) -> np.ndarray:
    """The painted canvas as the scanner sees it: section, light, optics, noise, JPEG."""
    rng = cv.rng
    n = cv.n
    g = cv.pal[0]
    rgb = cv2.merge([cv.rgb[0], cv.rgb[1], cv.rgb[2]])
    rgb = g - (g - rgb) * _section_thickness(cv, sc)[:, :, None]
    if sc["bubble"]:
        x0, y0 = rng.uniform(0, n, 2)
        r = cv.px(rng.uniform(10, 40))
        d = np.sqrt((cv.xx - x0) ** 2 + (cv.yy - y0) ** 2)
        rim = np.abs(d - r) < max(cv.px(1.0), 0.8)
        rgb = np.where((d < r)[:, :, None], g - (g - rgb) * 0.8, rgb)
        rgb[rim] = rgb[rim] * 0.45
    # illumination: a linear ramp across the field, a gain and a colour cast
    a = rng.uniform(0, TWO_PI)
    ramp = ((cv.xx - n / 2) * math.cos(a) + (cv.yy - n / 2) * math.sin(a)) / n
    light = sc["gain"] * (1 - sc["ramp"] * (ramp + 0.5))
    cast = np.exp(np.asarray(sc["cast"], np.float32))
    rgb = _optics(cv, rgb * light[:, :, None] * cast[None, None, :], sc, shift)
    # sensor noise, larger in bright pixels (shot noise) plus a floor
    # (uniform, unit variance: indistinguishable after blur and JPEG, and much
    # cheaper to draw than Gaussian noise)
    noise = (rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(3.4641)
    rgb = rgb + noise * (sc["noise"] * np.sqrt(np.maximum(rgb, 0)) + 0.6)
    return scanner_jpeg(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), sc["jpeg"])


def _section_thickness(cv: Canvas, sc: dict) -> np.ndarray:
    """How strongly the tissue colours each pixel: broad areas, grain, chatter, a fold."""
    rng = cv.rng
    n = cv.n
    thick = 1 + sc["thickness"] * cv.broad.T[::-1]
    if sc["grain"] > 0:  # fine cellular grain of the section
        thick = thick * (1 + sc["grain"] * (0.5 - cv.cells(rng.uniform(1.5, 4.0))))
    if sc["chatter"]:  # knife chatter: parallel bands of varying thickness
        a = rng.uniform(0, math.pi)
        proj = (cv.xx * math.cos(a) + cv.yy * math.sin(a)) / cv.ppu
        thick = thick * (1 + rng.uniform(0.08, 0.2) * np.sin(TWO_PI * proj / rng.uniform(8, 30)))
    if sc["fold"]:  # a fold: a band where the section lies double
        a = rng.uniform(0, math.pi)
        x0, y0 = rng.uniform(0, n, 2)
        dist = np.abs((cv.xx - x0) * math.sin(a) - (cv.yy - y0) * math.cos(a))
        half = cv.px(rng.uniform(3, 12))
        band = np.clip((half - dist) / max(cv.px(1.5), 1.0) + 0.5, 0, 1)
        thick = thick * (1 + rng.uniform(0.4, 0.8) * band)
    return thick


def _optics(cv: Canvas, rgb: np.ndarray, sc: dict, shift: float) -> np.ndarray:
    """Gaussian or box blur, and sometimes a down/up resampling."""
    n = cv.n
    if sc["blur_kind"] == "gauss" or (shift > 0 and sc["blur_kind"] == "none"):
        rgb = cv2.GaussianBlur(
            rgb, (0, 0), sc["blur"] if sc["blur_kind"] != "none" else 0.6 * shift
        )
    elif sc["blur_kind"] == "box":
        k = 2 + int(sc["blur"] > 1.2)
        rgb = cv2.blur(rgb, (k, k))
    if sc["resample"] and n >= 32:
        f = cv.rng.uniform(0.55, 0.85) - 0.15 * shift
        m = max(int(n * max(f, 0.35)), 8)
        rgb = cv2.resize(
            cv2.resize(rgb, (m, m), interpolation=cv2.INTER_AREA),
            (n, n),
            interpolation=cv2.INTER_LINEAR,
        )
    return rgb
