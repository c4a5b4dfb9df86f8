"""Style B's canvas: a painter's algorithm in display RGB, one alpha layer at a time."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..scene import pixel_grid
from .palette import MATERIAL

TWO_PI = 2.0 * math.pi


def random_sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def pick_one(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    """One of ``options`` with probabilities ``p`` (Generator.choice is slow for one draw)."""
    u = rng.random() * sum(p)
    for opt, w in zip(options, p, strict=True):
        u -= w
        if u < 0:
            return opt
    return options[-1]


def bbox(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns that hold any coverage (None when the layer is empty)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def fixed_point(polys) -> list[np.ndarray]:
    """Point lists as int32 with 4 fractional bits (OpenCV's ``shift=4``)."""
    if isinstance(polys, np.ndarray):
        return list(np.rint(polys * 16).astype(np.int32))
    return [np.rint(np.asarray(p) * 16).astype(np.int32) for p in polys]


class Canvas:
    def __init__(
        self, rng: np.random.Generator, n: int, mpp: float, pal: np.ndarray, stain: str
    ) -> None:
        self.rng = rng
        self.n = n
        self.ppu = 1.0 / mpp
        self.side_um = n * mpp
        self.pal = pal
        self.stain = stain
        # planar (3, n, n): per-channel updates of contiguous planes are fast
        self.rgb = np.empty((3, n, n), np.float32)
        self.rgb[:] = pal[0][:, None, None]
        self.labels = np.zeros((n, n), np.uint8)
        self.xx, self.yy = pixel_grid(n)
        # per-patch drawing style: anti-aliased or aliased edges, softened alpha
        self.lt = cv2.LINE_AA if rng.random() < 0.7 else cv2.LINE_8
        self.soft = (0.0, 0.0, 0.45, 0.8)[int(rng.integers(0, 4))]
        self.width_scale = float(rng.uniform(0.8, 1.25))
        self.nuc_scale = float(rng.uniform(0.85, 1.15))
        self.speckle = self._speckle(float(rng.uniform(0.15, 0.4)))
        self._broad: np.ndarray | None = None
        self._medium: np.ndarray | None = None

    # -- units ------------------------------------------------------------------
    def px(self, um: float) -> float:
        return um * self.ppu

    def blank(self) -> np.ndarray:
        return np.zeros((self.n, self.n), np.uint8)

    # -- textures ---------------------------------------------------------------
    @property
    def broad(self) -> np.ndarray:
        """One broad (~50 um) wave texture per patch, shared by the layers that
        only need gentle large-scale variation (flipped or transposed for each)."""
        if self._broad is None:
            self._broad = self.waves(50, 8)
        return self._broad

    @property
    def medium(self) -> np.ndarray:
        """A ~9 um wave texture shared by the deposits' fills (each patch draws one lesion)."""
        if self._medium is None:
            self._medium = self.waves(9)
        return self._medium

    def waves(
        self, wavelength_um: float, k: int = 14, angle: float | None = None, spread: float = 3.2
    ) -> np.ndarray:
        """Sum of ``k`` oriented plane waves (unit std): a smooth band-limited texture.

        Wavelengths are spread log-normally around ``wavelength_um`` so the sum
        reads as noise, not as a lattice. ``angle`` concentrates the wave
        vectors (anisotropic, fibrillar). The sum is separable, so it costs
        one small matrix product.
        """
        rng = self.rng
        n = self.n
        lam = self.px(wavelength_um) * np.exp(rng.normal(0, 0.5, k))
        if angle is None:
            th = rng.uniform(0, math.pi, k)
        else:
            th = angle + rng.normal(0, spread, k)
        f = TWO_PI / np.maximum(lam, 1.5)
        kx, ky = f * np.cos(th), f * np.sin(th)
        ph = rng.uniform(0, TWO_PI, k)
        amp = rng.uniform(0.5, 1.0, k) * np.sqrt(lam / self.px(wavelength_um))
        x = np.arange(n, dtype=np.float32)
        ax = np.outer(kx, x) + ph[:, None].astype(np.float32)
        ay = np.outer(ky, x)
        a = amp[:, None].astype(np.float32)
        left = np.concatenate([np.cos(ay), np.sin(ay)]).astype(np.float32)
        right = np.concatenate([np.cos(ax) * a, -np.sin(ax) * a]).astype(np.float32)
        out = np.einsum("ky,kx->yx", left, right)
        return out / (float(out.std()) + 1e-6)

    def cells(self, spacing_um: float) -> np.ndarray:
        """Cellular (Worley F1) noise: distance to the nearest random seed, 0..~1."""
        n = self.n
        sp = max(self.px(spacing_um), 1.5)
        k = max(int(n * n / (sp * sp)), 1)
        seeds = np.full((n, n), 255, np.uint8)
        xs = self.rng.integers(0, n, k)
        ys = self.rng.integers(0, n, k)
        seeds[ys, xs] = 0
        d = cv2.distanceTransform(seeds, cv2.DIST_L2, 3)
        return np.minimum(d / sp, 1.5).astype(np.float32)

    def _speckle(self, amp: float) -> np.ndarray:
        """Chromatin texture for nuclei: box-filtered white noise around 1."""
        g = self.rng.random((self.n, self.n), dtype=np.float32) - np.float32(0.5)
        k = max(int(round(self.px(1.2))), 1)
        if k > 1:
            g = cv2.blur(g, (k, k))
        g /= float(g.std()) + 1e-6
        return 1.0 + amp * np.clip(g, -2.5, 2.5)

    # -- compositing ------------------------------------------------------------
    def alpha(self, mask: np.ndarray, opacity: float = 1.0) -> np.ndarray:
        a = mask.astype(np.float32) * np.float32(opacity / 255.0)
        if self.soft > 0:
            a = cv2.GaussianBlur(a, (0, 0), self.soft)
        return a

    def colour(self, name: str, strength: float = 1.0) -> np.ndarray:
        c = self.pal[MATERIAL[name]]
        if strength != 1.0:
            g = self.pal[0]
            c = np.clip(g - (g - c) * strength, 0, 255)
        return c

    def put(self, alpha: np.ndarray, name: str, shade: np.ndarray | None = None, strength=1.0):
        """Composite a layer of material ``name`` with coverage ``alpha`` over the canvas.

        ``shade`` (around 1) modulates how strongly each pixel is coloured:
        > 1 further from the glass colour, < 1 towards it.
        """
        box = bbox(alpha)
        if box is None:
            return
        ys, xs = box
        a = alpha[ys, xs]
        col = self.colour(name, strength)
        if shade is None:
            for ch in range(3):
                p = self.rgb[ch, ys, xs]
                p += a * (np.float32(col[ch]) - p)
        else:
            g = self.pal[0]
            ash = a * shade[ys, xs]
            ia = 1.0 - a
            for ch in range(3):
                p = self.rgb[ch, ys, xs]
                p *= ia
                p += np.float32(g[ch]) * a - np.float32(g[ch] - col[ch]) * ash

    def put_mix(self, alpha: np.ndarray, a: str, b: str, t: np.ndarray) -> None:
        """Composite a layer whose colour blends materials ``a`` (t=0) and ``b`` (t=1)."""
        box = bbox(alpha)
        if box is None:
            return
        ys, xs = box
        ca, cb = self.colour(a), self.colour(b)
        al = alpha[ys, xs]
        at = al * t[ys, xs]
        ia = 1.0 - al
        for ch in range(3):
            p = self.rgb[ch, ys, xs]
            p *= ia
            p += np.float32(ca[ch]) * al + np.float32(cb[ch] - ca[ch]) * at

    # -- drawing ----------------------------------------------------------------
    def fill(self, mask: np.ndarray, polys, value: int = 255) -> None:
        if len(polys):
            cv2.fillPoly(mask, fixed_point(polys), int(value), self.lt, 4)

    def stroke(self, mask: np.ndarray, curves, thickness: float, value: int = 255) -> None:
        if len(curves):
            t = max(int(round(thickness)), 1)
            cv2.polylines(mask, fixed_point(curves), False, int(value), t, self.lt, 4)

    def pick(self, mask: np.ndarray, k: int) -> np.ndarray:
        """``k`` random pixel positions (x, y) inside ``mask`` (anywhere if it is empty)."""
        idx = np.flatnonzero(mask.ravel())
        if idx.size == 0:
            idx = np.arange(self.n * self.n)
        sel = idx[self.rng.integers(0, idx.size, int(k))]
        pts = np.stack([sel % self.n, sel // self.n], axis=1).astype(np.float64)
        return pts + self.rng.uniform(0, 1, pts.shape)
