"""The picture a pathologist looks at: the patch, its deposits and the verdict.

Deposits are tinted with their label colour and outlined, calcium with a
thick two-tone contour that stays visible on H&E, von Kossa and Alizarin red
alike. A legend panel beside the image (never on top of the tissue) gives the
call, the calibrated probabilities as bars, the stain, and the colour key of
the deposits present. Small patches are enlarged by an integer factor with
nearest-neighbour sampling so the result is readable at a glance: every
scanned pixel stays a crisp square (no detail or label is invented), and the
picture compresses to a small PNG quickly (repeated rows and columns cost
almost nothing to encode). For speed, an enlarged patch is tinted and its
outlines are traced at its own resolution; only the drawing happens at the
display size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from calcinosis.model.fileio import atomic_write_bytes
from calcinosis.model.labels import CALCIUM, DEPOSIT_COLORS, DEPOSIT_DISPLAY

from .tiling import label_histogram

#: Opacity of the deposit tint.
ALPHA = 0.45
#: Small patches are enlarged until their shorter side reaches this.
MIN_SIDE = 384
#: Large regions are shrunk until their longer side fits this.
MAX_SIDE = 2048
#: Width of the legend panel in pixels.
PANEL_WIDTH = 300
#: zlib level of overlay PNGs (0-9). 1 is several times faster to write than
#: the usual 6, and overlays of enlarged patches are barely larger with it.
PNG_COMPRESSION = 1

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREY = (110, 110, 110)
_BAR_BG = (225, 225, 225)
_BAR_FG = (70, 110, 170)
_BAR_TOP = (200, 60, 40)


def render_overlay(
    rgb: np.ndarray,
    label_map: np.ndarray | None,
    class_probs: Mapping[str, float] | None = None,
    prediction: str | None = None,
    stain: str | None = None,
    title: str | None = None,
    *,
    status: str | None = None,
    stain_prob: float | None = None,
    also_present: Sequence[str] = (),
    colors: Mapping[int, tuple[int, int, int]] = DEPOSIT_COLORS,
    names: Mapping[int, str] = DEPOSIT_DISPLAY,
    alpha: float = ALPHA,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """Return an RGB uint8 picture: the tinted, outlined image plus a legend panel.

    ``label_map`` is ``(H, W)`` with the image's size (values: deposit labels;
    0 = background/tissue, never tinted). ``class_probs`` maps class name to
    calibrated probability. Everything but ``rgb`` may be None.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    if label_map is not None and label_map.shape != (h, w):
        raise ValueError(f"label_map shape {label_map.shape} differs from image {(h, w)}")

    scale = _display_scale(h, w, min_side, max_side)
    labels = None if label_map is None else np.ascontiguousarray(label_map, dtype=np.uint8)
    present: list[tuple[int, float]] = []
    if labels is not None:
        counts = label_histogram(labels, max(colors, default=0) + 1)
        total = float(labels.size)
        present = [
            (lab, counts[lab] / total)
            for lab in sorted(colors)
            if lab < len(counts) and counts[lab] > 0
        ]
    if scale >= 1:
        # Integer enlargement: tint and trace at the image's own resolution
        # (scale**2 fewer pixels), then repeat pixels; the outlines are drawn
        # at display size through the centres of the enlarged boundary pixels.
        f = int(scale)
        img = rgb.copy()
        contours: list[tuple[int, list[np.ndarray]]] = []
        if labels is not None and present:
            _tint(img, labels, colors, alpha)
            contours = _contours(labels, colors)
        if f > 1:
            img = cv2.resize(img, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
            contours = [(lab, [c * f + f // 2 for c in cs]) for lab, cs in contours]
        dh, dw = h * f, w * f
    else:
        dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
        img = cv2.resize(rgb, (dw, dh), interpolation=cv2.INTER_AREA)
        contours = []
        if labels is not None and present:
            small = cv2.resize(labels, (dw, dh), interpolation=cv2.INTER_NEAREST)
            _tint(img, small, colors, alpha)
            contours = _contours(small, colors)
    _outline(img, contours, colors, dh, dw)

    panel = _legend(
        height=dh,
        title=title,
        prediction=prediction,
        status=status,
        class_probs=class_probs,
        stain=stain,
        stain_prob=stain_prob,
        also_present=also_present,
        present=present,
        colors=colors,
        names=names,
    )
    out_h = max(dh, panel.shape[0])
    canvas = np.full((out_h, dw + panel.shape[1], 3), 255, dtype=np.uint8)
    canvas[:dh, :dw] = img
    canvas[: panel.shape[0], dw:] = panel
    # A thin rule separates the image from the panel.
    canvas[:, dw : dw + 1] = _GREY
    return canvas


def encode_png(rgb: np.ndarray, compress_level: int = PNG_COMPRESSION) -> bytes:
    """An RGB (or grey) uint8 picture as PNG bytes.

    OpenCV encodes without holding the GIL, so overlays of many images are
    written in parallel threads. At fast levels (<= 3) every row uses PNG's
    "Up" filter instead of trying all five per row: on enlarged patches
    (rows repeated) and white legend panels it compresses as well, at about
    half the time.
    """
    level = int(compress_level)
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be 0-9, got {compress_level}")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    params = [cv2.IMWRITE_PNG_COMPRESSION, level]
    if level <= 3 and hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", bgr, params)
    if not ok:
        raise ValueError("OpenCV could not encode the picture as PNG")
    return buf.tobytes()


def write_overlay(
    path: str | os.PathLike[str], rgb: np.ndarray, compress_level: int = PNG_COMPRESSION
) -> Path:
    """Write an overlay PNG atomically (no fsync: overlays are cheap to recreate)."""
    return atomic_write_bytes(path, encode_png(rgb, compress_level), fsync=False)


def _display_scale(h: int, w: int, min_side: int, max_side: int) -> float:
    if max(h, w) > max_side:
        return max_side / max(h, w)
    if min(h, w) < min_side:
        # Integer factors keep pixels square and crisp; never exceed max_side.
        f = int(np.ceil(min_side / max(1, min(h, w))))
        while f > 1 and max(h, w) * f > max_side:
            f -= 1
        return float(f)
    return 1.0


def _tint(
    img: np.ndarray, labels: np.ndarray, colors: Mapping[int, tuple[int, int, int]], alpha: float
) -> None:
    """Blend the label colours into ``img`` in place (label 0 and unknown labels untouched)."""
    lut, has = _tint_luts(tuple((int(k), tuple(int(c) for c in v)) for k, v in colors.items()))
    mask = cv2.LUT(labels, has)
    if not mask.any():
        return
    blend = cv2.addWeighted(img, 1.0 - alpha, lut[labels], alpha, 0.0)
    cv2.copyTo(blend, mask, img)


@functools.lru_cache(maxsize=16)
def _tint_luts(
    colors: tuple[tuple[int, tuple[int, ...]], ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Label -> colour and label -> "is tinted" tables, built once per colour scheme."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    has = np.zeros(256, dtype=np.uint8)
    for lab, col in colors:
        lut[lab] = col
        has[lab] = 1
    lut.flags.writeable = False
    has.flags.writeable = False
    return lut, has


def _contours(
    labels: np.ndarray, colors: Mapping[int, tuple[int, int, int]]
) -> list[tuple[int, list[np.ndarray]]]:
    """Outline polylines per label, mimics first and calcium last (drawn on top)."""
    out = []
    for lab in sorted(colors, key=lambda k: (k == CALCIUM, k)):
        mask = (labels == lab).view(np.uint8)
        if not mask.any():
            continue
        found, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        if found:
            out.append((lab, list(found)))
    return out


def _outline(
    img: np.ndarray,
    contours: list[tuple[int, list[np.ndarray]]],
    colors: Mapping[int, tuple[int, int, int]],
    dh: int,
    dw: int,
) -> None:
    base = max(1, round(max(dh, dw) / 800))
    for lab, cs in contours:
        col = tuple(int(c) for c in colors[lab])
        if lab == CALCIUM:
            # Thick bright line over a dark halo: unmistakable on any stain.
            cv2.drawContours(img, cs, -1, _BLACK, 3 * base + 2, lineType=cv2.LINE_AA)
            cv2.drawContours(img, cs, -1, col, 3 * base, lineType=cv2.LINE_AA)
        else:
            cv2.drawContours(img, cs, -1, col, base, lineType=cv2.LINE_AA)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only; replace anything else."""
    text = str(text)
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


@functools.lru_cache(maxsize=4096)
def _fit(text: str, max_width: int, scale: float, thickness: int) -> str:
    """``text`` in ASCII, shortened with "~" until it fits ``max_width`` pixels (cached)."""
    text = _ascii(text)
    while text and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > max_width:
        text = text[:-2] + "~" if len(text) > 2 else ""
    return text


def _percent(frac: float) -> str:
    """A share of the image; a deposit that is there never reads as 0.0%."""
    return f"{frac:.1%}" if frac >= 0.001 or frac <= 0 else "<0.1%"


def _legend(
    *,
    height: int,
    title: str | None,
    prediction: str | None,
    status: str | None,
    class_probs: Mapping[str, float] | None,
    stain: str | None,
    stain_prob: float | None,
    present: list[tuple[int, float]],
    colors: Mapping[int, tuple[int, int, int]],
    names: Mapping[int, str],
    also_present: Sequence[str] = (),
) -> np.ndarray:
    width = PANEL_WIDTH
    rows: list[tuple] = []  # drawing instructions, laid out top to bottom
    if title:
        rows.append(("text", title, 0.45, 1, _GREY, 20))
    if prediction:
        rows.append(("text", prediction.replace("_", " "), 0.75, 2, _BLACK, 30))
    if also_present:  # a region's other lesion classes, one line each (never cut off)
        rows.append(("text", "also present:", 0.45, 1, _GREY, 20))
        for name in also_present:
            rows.append(("text", f"  {name.replace('_', ' ')}", 0.5, 1, _BLACK, 20))
    if status and status not in ("ok",):
        rows.append(("text", f"status: {status}", 0.5, 1, _BAR_TOP, 22))
    if class_probs:
        rows.append(("text", "calibrated probability", 0.45, 1, _GREY, 22))
        top = max(class_probs, key=lambda k: class_probs[k])
        for name, p in class_probs.items():
            rows.append(("bar", name, float(p), name == top))
    if stain:
        sp = f" ({stain_prob:.0%})" if stain_prob is not None else ""
        rows.append(("text", f"stain: {stain.replace('_', ' ')}{sp}", 0.5, 1, _BLACK, 26))
    if present:
        rows.append(("text", "deposits (% of image)", 0.45, 1, _GREY, 24))
        for lab, frac in present:
            rows.append(("key", lab, frac))

    needed = 12 + sum(r[5] if r[0] == "text" else 22 for r in rows) + 8
    panel = np.full((max(height, needed), width, 3), 255, dtype=np.uint8)
    y = 8
    for r in rows:
        if r[0] == "text":
            _, text, sc, th, col, step = r
            y += step
            cv2.putText(
                panel, _fit(text, width - 20, sc, th), (10, y - 6), _FONT, sc, col, th, cv2.LINE_AA
            )
        elif r[0] == "bar":
            _, name, p, is_top = r
            y += 22
            label = _fit(name.replace("_", " "), 120, 0.42, 1)
            cv2.putText(panel, label, (10, y - 7), _FONT, 0.42, _BLACK, 1, cv2.LINE_AA)
            x0, x1 = 135, width - 55
            cv2.rectangle(panel, (x0, y - 17), (x1, y - 5), _BAR_BG, -1)
            fill = x0 + round((x1 - x0) * min(max(p, 0.0), 1.0))
            if fill > x0:
                cv2.rectangle(
                    panel, (x0, y - 17), (fill, y - 5), _BAR_TOP if is_top else _BAR_FG, -1
                )
            cv2.putText(panel, f"{p:.0%}", (x1 + 5, y - 7), _FONT, 0.42, _BLACK, 1, cv2.LINE_AA)
        else:  # colour key
            _, lab, frac = r
            y += 22
            col = tuple(int(c) for c in colors[lab])
            cv2.rectangle(panel, (10, y - 18), (28, y - 4), col, -1)
            if lab == CALCIUM:
                cv2.rectangle(panel, (10, y - 18), (28, y - 4), _BLACK, 1)
            name = names.get(lab, str(lab))
            cv2.putText(
                panel,
                _fit(f"{name}  {_percent(frac)}", width - 45, 0.45, 1),
                (36, y - 6),
                _FONT,
                0.45,
                _BLACK,
                1,
                cv2.LINE_AA,
            )
    return panel
