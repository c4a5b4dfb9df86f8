"""Style A's drawing surface: a patch's component maps, and the shapes drawn on them.

Geometry is designed in microns and converted with ``mpp`` (:meth:`Scene.px`),
so a nucleus is always ~7 um wide whatever the patch size. A region tile
additionally carries a :class:`TileContext`, what it takes from its region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .optics import COMPONENTS, NEUTRAL_STYLE, NUC

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def pixel_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x and y coordinates of an n x n patch (float32, cached; never written to)."""
    if n not in _GRIDS:
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        _GRIDS[n] = (xx, yy)
    return _GRIDS[n]


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class Scene:
    """Concentration maps of one patch plus its label map, in pixel space."""

    def __init__(self, rng: np.random.Generator, size: int, mpp: float) -> None:
        self.rng = rng
        self.n = size
        self.ppu = 1.0 / mpp  # pixels per micron
        self.c = np.zeros((len(COMPONENTS), size, size), np.float32)
        self.labels = np.zeros((size, size), np.uint8)
        self.xx, self.yy = pixel_grid(size)
        self.style = NEUTRAL_STYLE

    # -- units and noise ------------------------------------------------------
    def px(self, um: float) -> float:
        return um * self.ppu

    def noise(self, scale_um: float) -> np.ndarray:
        """Smooth Gaussian field with correlation length ~scale_um, roughly unit std.

        Bicubic up-sampling of coarse white noise; very smooth fields are made
        at a reduced resolution first, which costs nothing visible and keeps
        the work proportional to the patch area.
        """
        n = self.n
        scale = max(self.px(scale_um), 1.0)
        f = max(1, int(scale // 6))
        ns = -(-n // f)
        s = scale / f
        g = int(ns / s) + 4
        low = self.rng.standard_normal((g, g)).astype(np.float32)
        full = int(math.ceil(g * s))
        up = cv2.resize(low, (full, full), interpolation=cv2.INTER_CUBIC)
        off = int(1.5 * s)
        out = up[off : off + ns, off : off + ns]
        if f > 1:
            out = cv2.resize(out, (ns * f, ns * f), interpolation=cv2.INTER_LINEAR)[:n, :n]
        return out / (out.std() + 1e-6)

    def fine_noise(self, sigma_px: float) -> np.ndarray:
        f = self.rng.standard_normal((self.n, self.n)).astype(np.float32)
        if sigma_px > 0:
            f = cv2.GaussianBlur(f, (0, 0), sigma_px)
        return f / (f.std() + 1e-6)

    # -- painting -------------------------------------------------------------
    def paint(self, comp: int, mask: np.ndarray, conc: np.ndarray | float, displace: float = 1.0):
        """Lay ``conc`` of a component over ``mask``, pushing other tissue aside."""
        if displace > 0:
            self.c *= 1.0 - displace * mask
        self.c[comp] += mask * conc

    def clear(self, mask: np.ndarray) -> None:
        """Empty space (cracks, clefts, lacunae, glass)."""
        self.c *= 1.0 - mask

    def ellipse(
        self, comp: int, x: float, y: float, a: float, b: float, ang_deg: float, val: float
    ):
        if comp == NUC:  # the patch's nuclear size and shape (domain randomisation)
            a *= self.style["nuc_size"] * self.style["nuc_aspect"]
            b *= self.style["nuc_size"] / self.style["nuc_aspect"]
        cv2.ellipse(
            self.c[comp],
            (int(x * 16), int(y * 16)),
            (max(int(a * 16), 8), max(int(b * 16), 8)),
            float(ang_deg),
            0,
            360,
            float(val),
            -1,
            cv2.LINE_8,
            4,
        )

    def sample_in(self, mask: np.ndarray, k: int = 1) -> np.ndarray:
        """k random pixel coordinates (x, y) where mask is true (or anywhere if empty)."""
        idx = np.flatnonzero(mask.ravel())
        if idx.size == 0:
            idx = np.arange(self.n * self.n)
        pick = self.rng.choice(idx, size=k)
        return np.stack([pick % self.n, pick // self.n], axis=1).astype(np.float64)


def uint8_mask(m: np.ndarray) -> np.ndarray:
    return (m > 0.5).astype(np.uint8)


def distance(m: np.ndarray) -> np.ndarray:
    """Pixels to the nearest zero of the uint8 mask ``m`` (cv2.distanceTransform).

    A mask without zeros has none to measure to: OpenCV then returns ~FLT_MAX,
    which overflows the sines drawn from it; no pixel is farther than two sides.
    """
    d = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    return np.minimum(d, 2.0 * float(max(m.shape)), out=d)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels to the mask boundary: negative inside, positive outside."""
    m = uint8_mask(mask)
    return distance(1 - m) - distance(m)


def gradient_dir(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = cv2.GaussianBlur(field.astype(np.float32), (0, 0), 1.5)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    norm = np.sqrt(gx * gx + gy * gy) + 1e-6
    return gx / norm, gy / norm


def boundary_points(mask: np.ndarray, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Points every ~spacing px along the mask outline, away from the patch border."""
    m = uint8_mask(mask)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    n = m.shape[0]
    out = []
    step = max(int(round(spacing)), 1)
    for cnt in contours:
        pts = cnt[:, 0, :]
        if len(pts) < 3:
            continue
        start = int(rng.integers(0, step))
        sel = pts[start::step]
        keep = (sel[:, 0] > 1) & (sel[:, 0] < n - 2) & (sel[:, 1] > 1) & (sel[:, 1] < n - 2)
        out.append(sel[keep])
    if not out:
        return np.zeros((0, 2), np.float64)
    return np.concatenate(out).astype(np.float64)


def blob_field(
    sc: Scene, centres: np.ndarray, radii: Sequence[float], rough: float, scale_um: float
):
    """Signed 'inside-ness' in px of a union of lobulated blobs (>0 inside)."""
    f = np.full((sc.n, sc.n), -1e6, np.float32)
    for (cx, cy), r in zip(centres, radii, strict=True):
        d = np.sqrt((sc.xx - cx) ** 2 + (sc.yy - cy) ** 2)
        f = np.maximum(f, r - d)
    return f + rough * sc.noise(scale_um)


def poisson_points(
    sc: Scene, mask: np.ndarray, spacing: float, max_n: int, tries: int = 4
) -> np.ndarray:
    """Dart throwing: points in mask at least ~``spacing`` px apart."""
    if not mask.any():
        return np.zeros((0, 2), np.float64)
    cand = sc.sample_in(mask, k=max_n * tries)
    blocked = np.zeros((sc.n, sc.n), np.uint8)
    r = max(int(round(spacing)), 1)
    kept = []
    for x, y in cand.astype(int).tolist():
        if blocked[y, x]:
            continue
        kept.append((x, y))
        cv2.circle(blocked, (x, y), r, 1, -1)
        if len(kept) >= max_n:
            break
    return np.asarray(kept, np.float64).reshape(-1, 2) + sc.rng.uniform(-0.5, 0.5, (len(kept), 2))


def voronoi(sc: Scene, spacing: float, warp_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Cells of a jittered-grid Voronoi tessellation: (cell id map, border map 0..1)."""
    n = sc.n
    pad = int(spacing) + 2
    big = n + 2 * pad
    k = int(big / spacing) + 2
    gx, gy = np.meshgrid(np.arange(k), np.arange(k))
    jitter = sc.rng.uniform(-0.45, 0.45, (2, k, k))
    xs = ((gx + 0.5 + jitter[0]) * spacing).astype(int).ravel()
    ys = ((gy + 0.5 + jitter[1]) * spacing).astype(int).ravel()
    ok = (xs < big) & (ys < big)
    xs, ys = xs[ok] - pad, ys[ok] - pad
    if len(xs) <= 48:
        # few large cells: nearest seed directly
        d = (sc.xx[None] - xs[:, None, None]) ** 2 + (sc.yy[None] - ys[:, None, None]) ** 2
        lab = np.argmin(d, axis=0).astype(np.float32)
    else:
        canvas = np.ones((big, big), np.uint8)
        canvas[ys + pad, xs + pad] = 0
        _, lab = cv2.distanceTransformWithLabels(
            canvas, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
        )
        lab = lab[pad : pad + n, pad : pad + n].astype(np.float32)
    if warp_um > 0:
        dx = sc.noise(warp_um * 3) * sc.px(warp_um)
        dy = sc.noise(warp_um * 3) * sc.px(warp_um)
        lab = cv2.remap(
            lab, sc.xx + dx, sc.yy + dy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT
        )
    border = np.zeros((n, n), np.float32)
    border[:, :-1] += lab[:, :-1] != lab[:, 1:]
    border[:-1, :] += lab[:-1, :] != lab[1:, :]
    return lab, np.minimum(border, 1.0)


def streaks(sc: Scene, ang: float, length_um: float, dx=None, dy=None) -> np.ndarray:
    """Fibrillar texture: fine noise smeared along direction ``ang`` (optionally warped)."""
    k = max(int(sc.px(length_um)) | 1, 3)
    kern = np.zeros((k, k), np.float32)
    c = k // 2
    cv2.line(
        kern,
        (int(c - c * math.cos(ang)), int(c - c * math.sin(ang))),
        (int(c + c * math.cos(ang)), int(c + c * math.sin(ang))),
        1.0,
        1,
    )
    kern /= kern.sum()
    f = cv2.filter2D(sc.fine_noise(0.5), -1, kern, borderType=cv2.BORDER_REFLECT)
    if dx is not None:
        f = cv2.remap(f, sc.xx + dx, sc.yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return f / (f.std() + 1e-6)


@dataclass
class TileContext:
    """What one region tile takes from its region (maps are tile-sized, float32)."""

    depth: np.ndarray  # um below the skin surface
    depth_deep: np.ndarray  # depth with the lobulated dermis/subcutis boundary folded in
    outside: np.ndarray  # bool: beyond the cut edges of the section (glass)
    theta: float  # direction of increasing depth at the tile centre
    keratin: float
    epidermis: float
    papillary: float
    subcutis: float
    lab: dict
    thickness: np.ndarray
    light: np.ndarray
    collagen: np.ndarray  # collagen density of the dermis
    septa: np.ndarray  # fibrous septa between fat lobules (0..1)
    margin: int  # px of the tile's feathered band on each side
