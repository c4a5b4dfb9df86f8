"""Style B's geometric primitives: polygons, lobulated outlines, wavy curves, nuclei."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .canvas import TWO_PI, Canvas, random_sign


def blobs(
    rng: np.random.Generator,
    centres: np.ndarray,
    radii: np.ndarray,
    aspect: np.ndarray,
    angle: np.ndarray,
    nv: int,
    jag: float,
) -> np.ndarray:
    """Irregular closed polygons (K, nv, 2): rotated ellipses with jagged vertex radii."""
    k = len(centres)
    t = np.linspace(0, TWO_PI, nv, endpoint=False)[None, :] + rng.uniform(0, TWO_PI, (k, 1))
    r = 1.0 + jag * rng.standard_normal((k, nv))
    r = np.clip(r, 0.55, 1.5)
    ex = radii[:, None] * aspect[:, None] * np.cos(t) * r
    ey = radii[:, None] * np.sin(t) * r
    ca, sa = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x = centres[:, 0:1] + ex * ca - ey * sa
    y = centres[:, 1:2] + ex * sa + ey * ca
    return np.stack([x, y], axis=2)


def star(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    lobes: float,
    jag: float,
    nv: int = 72,
    aspect: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """One lobulated outline (nv, 2): radius modulated by harmonics 2..7 plus vertex jitter."""
    t = np.linspace(0, TWO_PI, nv, endpoint=False)
    h = np.arange(2, 8)[:, None]
    coef = lobes / h * rng.standard_normal((6, 1))
    r = 1.0 + (coef * np.cos(h * t + rng.uniform(0, TWO_PI, (6, 1)))).sum(axis=0)
    r *= 1.0 + jag * rng.standard_normal(nv)
    r = radius * np.clip(r, 0.35, 1.8)
    ex, ey = r * np.cos(t) * aspect, r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ex * ca - ey * sa, cy + ex * sa + ey * ca], axis=1)


def wavy_curves(
    rng: np.random.Generator,
    starts: np.ndarray,
    angle: np.ndarray,
    length: float,
    step: float,
    wave_amp: float,
    wave_len: float,
    wander: float = 0.06,
    centred: bool = True,
) -> np.ndarray:
    """Smooth wavy curves (K, P, 2) in px: heading = angle + sine wave + random walk."""
    k = len(starts)
    p = max(int(length / step) + 1, 2)
    s = np.arange(p) * step
    wl = wave_len * rng.uniform(0.7, 1.4, (k, 1))
    amp = wave_amp * rng.uniform(0.4, 1.4, (k, 1))
    head = (
        angle[:, None]
        + amp * np.sin(TWO_PI * s[None, :] / wl + rng.uniform(0, TWO_PI, (k, 1)))
        + np.cumsum(rng.normal(0, wander, (k, p)), axis=1)
    )
    dx, dy = np.cos(head) * step, np.sin(head) * step
    x = np.cumsum(dx, axis=1) - dx[:, :1]
    y = np.cumsum(dy, axis=1) - dy[:, :1]
    if centred:
        mid = p // 2
        x -= x[:, mid : mid + 1]
        y -= y[:, mid : mid + 1]
    return np.stack([x + starts[:, 0:1], y + starts[:, 1:2]], axis=2)


def jagged(cv: Canvas, starts: np.ndarray, length_um: float, turn: float) -> list[np.ndarray]:
    """Sharp, jagged crack lines from ``starts``: straight runs with abrupt turns."""
    rng = cv.rng
    out = []
    for x, y in starts:
        seg = max(cv.px(rng.uniform(3, 8)), 1.5)
        steps = max(int(cv.px(length_um * rng.uniform(0.4, 1.0)) / seg), 2)
        # zig-zag about a slowly drifting course: straight runs, abrupt kinks
        a = (
            rng.uniform(0, TWO_PI)
            + np.cumsum(rng.normal(0, 0.1, steps))
            + rng.normal(0, turn, steps)
        )
        ln = seg * rng.uniform(0.5, 1.5, steps)
        pts = np.stack([x + np.cumsum(np.cos(a) * ln), y + np.cumsum(np.sin(a) * ln)], axis=1)
        out.append(np.vstack([[x, y], pts]))
        if rng.random() < 0.4:  # a branch
            j = int(rng.integers(0, len(pts)))
            b = a[j] + random_sign(rng) * rng.uniform(0.5, 1.2)
            m = max(steps // 2, 2)
            bb = b + rng.normal(0, turn, m)
            bx = pts[j, 0] + np.cumsum(np.cos(bb) * seg)
            by = pts[j, 1] + np.cumsum(np.sin(bb) * seg)
            out.append(np.vstack([pts[j], np.stack([bx, by], axis=1)]))
    return out


def nuclei(
    cv: Canvas,
    mask: np.ndarray,
    pts: np.ndarray,
    long_um: float | tuple[float, float],
    short_um: float | tuple[float, float],
    angle: np.ndarray | float | None = None,
    jag: float = 0.1,
    value: int = 255,
) -> None:
    """Draw irregular polygonal nuclei (semi-axes in um) at ``pts`` into ``mask``."""
    if len(pts) == 0:
        return
    rng = cv.rng
    k = len(pts)

    def _axis(v):
        if isinstance(v, tuple):
            return rng.uniform(v[0], v[1], k)
        return np.full(k, float(v))

    a = cv.px(1.0) * _axis(long_um) * cv.nuc_scale
    b = cv.px(1.0) * _axis(short_um) * cv.nuc_scale
    if angle is None:
        ang = rng.uniform(0, math.pi, k)
    else:
        ang = np.broadcast_to(np.asarray(angle, np.float64), (k,)) + rng.normal(0, 0.15, k)
    a = np.maximum(a, 0.7)
    b = np.maximum(b, 0.6)
    polys = blobs(rng, pts, b, a / b, ang, 8, jag)
    cv.fill(mask, polys, value)


def contour_points(mask: np.ndarray, spacing: float, rng: np.random.Generator):
    """Points every ~spacing px along a mask's outline, with outward unit normals."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts, nrm = [], []
    step = max(int(round(spacing)), 1)
    n = mask.shape[0]
    for c in contours:
        c = c[:, 0, :].astype(np.float64)
        if len(c) < 8:
            continue
        j = np.arange(int(rng.integers(0, step)), len(c), step)
        w = 3
        tang = c[(j + w) % len(c)] - c[(j - w) % len(c)]
        nv = np.stack([tang[:, 1], -tang[:, 0]], axis=1)
        nv /= np.linalg.norm(nv, axis=1, keepdims=True) + 1e-9
        p = c[j]
        probe = np.clip(np.round(p + 2.5 * nv).astype(int), 0, n - 1)
        inside = mask[probe[:, 1], probe[:, 0]] > 0
        nv[inside] *= -1
        keep = (p[:, 0] > 0) & (p[:, 0] < n - 1) & (p[:, 1] > 0) & (p[:, 1] < n - 1)
        pts.append(p[keep])
        nrm.append(nv[keep])
    if not pts:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(pts), np.concatenate(nrm)


def disk(r: float) -> np.ndarray:
    k = max(int(round(r)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
