"""Style B's layout: skin surface, rete ridges and subcutis as 1-D profiles in a rotated frame.

Depth below the surface comes from sums of sines along the surface, in a
randomly rotated frame (style A uses smooth 2-D noise instead).
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import TWO_PI, Canvas, pick_one


def _profile(rng: np.random.Generator, amp: float, wl: tuple[float, float], k: int = 3):
    """A 1-D profile along the surface: list of (amplitude, wavenumber, phase)."""
    return [
        (amp * rng.uniform(0.3, 1.0) / (i + 1), TWO_PI / rng.uniform(*wl), rng.uniform(0, TWO_PI))
        for i in range(k)
    ]


def _eval(prof, u):
    out = np.zeros_like(u)
    for a, kk, ph in prof:
        out += a * np.sin(kk * u + ph)
    return out


def _sin_grid(cv: Canvas, t: np.ndarray, kk: float, ph: float) -> np.ndarray:
    """sin(kk * u + ph) on the pixel grid, u = um along direction t from the centre.

    u is linear in x and y, so the sine splits into outer products of 1-D terms.
    """
    x = (np.arange(cv.n, dtype=np.float64) - cv.n / 2) / cv.ppu
    ax = kk * t[0] * x + ph
    by = kk * t[1] * x
    out = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
    return out.astype(np.float32)


def _eval_grid(cv: Canvas, t: np.ndarray, prof) -> np.ndarray:
    out = np.zeros((cv.n, cv.n), np.float32)
    for a, kk, ph in prof:
        out += np.float32(a) * _sin_grid(cv, t, kk, ph)
    return out


class Layout:
    """Depth (um below the skin surface) of every pixel, the layer profiles and region masks."""

    def __init__(self, cv: Canvas, label: str) -> None:
        rng = cv.rng
        n = cv.n
        self.theta = rng.uniform(0, TWO_PI)
        d = np.array([math.cos(self.theta), math.sin(self.theta)])  # deeper
        t = np.array([-d[1], d[0]])  # along the surface
        self.d, self.t = d, t
        X, Y = cv.xx - n / 2, cv.yy - n / 2
        self.u = (X * t[0] + Y * t[1]) / cv.ppu  # um along the surface
        w = (X * d[0] + Y * d[1]) / cv.ppu
        self.keratin = rng.uniform(5, 18)
        self.epi = rng.uniform(20, 45)
        self.rete = rng.uniform(0, 35) if rng.random() < 0.8 else 0.0
        self.rete_wl = rng.uniform(50, 130)
        self.rete_ph = rng.uniform(0, TWO_PI)
        self.rete_p = (1.0, 1.5, 2.0)[int(rng.integers(0, 3))]
        self.papillary = rng.uniform(18, 45)
        self.surf = _profile(rng, rng.uniform(1, 7), (60, 300))
        self.sub_prof = _profile(rng, rng.uniform(8, 40), (80, 400))
        self._place(rng, label, cv.side_um)
        self.depth = (w + self.c0).astype(np.float32) - _eval_grid(cv, t, self.surf)
        if self.kind == "surface":
            self.dej = self._rete(_sin_grid(cv, t, TWO_PI / self.rete_wl, self.rete_ph))
        else:
            self.dej = np.full((n, n), self.keratin + self.epi, np.float32)
        self.sub = np.float32(self.sub0) + _eval_grid(cv, t, self.sub_prof)
        self.glass = self.depth < 0
        if rng.random() < 0.1:  # the cut edge of the section
            a = rng.uniform(0, TWO_PI)
            proj = (X * math.cos(a) + Y * math.sin(a)) / n
            wob = 0.03 * cv.broad
            self.glass |= (proj + wob) > rng.uniform(0.25, 0.45)
        self.tissue = ~self.glass
        self.epidermis = self.tissue & (self.depth < self.dej)
        self.deep = self.tissue & (self.depth >= self.dej + 1.5)
        self.fat = self.deep & (self.depth >= self.sub)
        self.dermis = self.deep & ~self.fat

    def _place(self, rng: np.random.Generator, label: str, L: float) -> None:
        """Where the patch lies in the skin (its ``kind``): the depth of its centre
        (``c0``) and of the subcutis (``sub0``), in um; a patch of side ``L`` um."""
        deposit = label != "normal"
        p_surface = 0.55 if label == "amyloidosis" else 0.28
        rest = (1 - p_surface) / 0.72
        self.kind = pick_one(
            rng,
            ("surface", "dermis", "junction", "subcutis"),
            (p_surface, 0.4 * rest, 0.14 * rest, 0.18 * rest),
        )
        dej_mean = self.keratin + self.epi + 0.5 * self.rete
        if self.kind == "surface":
            lo = 0.05 if deposit else -0.2
            self.c0 = dej_mean + rng.uniform(lo, 0.45) * L
            self.sub0 = 1e6
        elif self.kind == "dermis":
            self.c0 = 600.0 + L
            self.sub0 = 1e6
        elif self.kind == "junction":
            self.c0 = 900.0 + L
            self.sub0 = self.c0 + rng.uniform(-0.35, 0.35) * L
        else:
            self.c0 = 1500.0 + L
            self.sub0 = self.c0 - 0.9 * L
        if self.kind != "surface":  # the surface is far away: its profile is irrelevant
            self.surf = []
        if self.sub0 > 1e5:
            self.sub_prof = []

    def _rete(self, sine: np.ndarray) -> np.ndarray:
        s = np.maximum(sine, 0.0)
        if self.rete_p == 2.0:
            s = s * s
        elif self.rete_p == 1.5:
            s = s * np.sqrt(s)
        return self.keratin + self.epi + self.rete * s

    def dej_at(self, u: np.ndarray) -> np.ndarray:
        return self._rete(np.sin(TWO_PI * u / self.rete_wl + self.rete_ph))

    def to_px(self, cv: Canvas, u: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixel (x, y) of points given as (um along the surface, um below it)."""
        w = (depth - self.c0 + _eval(self.surf, u)) * cv.ppu
        uu = u * cv.ppu
        x = cv.n / 2 + uu * self.t[0] + w * self.d[0]
        y = cv.n / 2 + uu * self.t[1] + w * self.d[1]
        return np.stack([x, y], axis=-1)
