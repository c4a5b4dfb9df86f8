"""Style B: a second, independently built renderer of the same skin histology.

A model trained on one procedural generator can learn that generator's
signature (its noise, its exact colours, how sharp its edges are) instead of
the morphology that separates the classes. Style B draws the same tissue model
as :mod:`calcinosis.training.synthetic` (style A) with other primitives,
textures and rendering, so cross-style transfer can be measured (train on one
style, test on the other) and models can be trained on both.

How style B differs from style A:

* *Rendering.* A painter's algorithm in display RGB: the patch starts as a
  glass colour and coloured layers are composited over it, one alpha map at a
  time (``rgb += alpha * (colour - rgb)``). There are no component
  concentration maps and no optical densities; colours come from per-stain
  palettes (one RGB colour per material), jittered per patch in HSV, with a
  per-group "staining strength" that moves each colour towards or away from
  the glass.
* *Geometry.* Everything is vector drawing with OpenCV: collagen is hundreds
  of stroked spline curves (``cv2.polylines``) of 2-8 um width, nuclei are
  irregular filled polygons, fat is a packing of overlapping ellipses whose
  outlines are the membranes, keratinocytes are polygon tiles laid out in
  rows that follow the skin surface, lesion outlines are star-shaped polygons
  with harmonic lobulation. Trabecular bone is a network of struts between
  nodes plus lobulated plates; its lamellae are the struts stroked again at
  decreasing widths and the plates refilled with shrunken copies of their
  outline, so they run parallel to the bone surface.
* *Layout.* Depth below the surface comes from 1-D profiles (sums of sines
  along the surface) of the skin surface, the rete ridges of the
  dermo-epidermal junction and the subcutis boundary, in a randomly rotated
  frame.
* *Texture.* Sums of oriented plane waves (spectral synthesis, computed as a
  separable product) and cellular (Worley, distance-to-nearest-seed) noise;
  no upsampled lattice noise.
* *Slide and scanner.* Section thickness and fine grain, knife chatter,
  folds, bubbles; a linear illumination ramp and colour cast, box or
  Gaussian blur, optional down/up-resampling, signal-dependent noise, JPEG.

Geometry is designed in microns and converted with ``mpp``. ``shift`` >= 0
moves the palette strength and hue, blur, noise and compression outside the
usual range (another lab). A patch depends only on its arguments and
:data:`STYLE_B_VERSION`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calcinosis.model.labels import (
    AMYLOID,
    BACKGROUND,
    BONE,
    CALCIUM,
    STAIN_NAMES,
    URATE,
)

from .synthetic import check_patch_args

__all__ = ["STYLE_B_VERSION", "render_patch_b"]

#: Bumped whenever style B's rendering changes, so cached datasets can be told apart.
STYLE_B_VERSION = 1

_NOMINAL_MPP = 0.5
_SALT = 0x5B  # keeps style B's random streams apart from style A's
_TWO_PI = 2.0 * math.pi

# ---------------------------------------------------------------------------
# Palettes: one display colour per material and stain
# ---------------------------------------------------------------------------

_MATERIALS = (
    "glass",
    "lumen",  # empty space inside tissue (vessel lumens, fat cells, lacunae)
    "ground",  # loose dermal ground substance
    "collagen",
    "sclerotic",  # dense, hyalinised collagen: as pink as bone in H&E
    "cytoplasm",  # keratinocytes
    "keratin",
    "nucleus",
    "nucleus_pale",
    "rbc",
    "membrane",  # adipocyte membranes
    "calcium",
    "calcium_dark",
    "bone",
    "bone_alt",  # alternate lamellae
    "cement",
    "osteoid",
    "urate",
    "urate_streak",
    "amyloid",
    "histiocyte",
    "gland",
)
_M = {name: i for i, name in enumerate(_MATERIALS)}

# Groups share one strength/hue/saturation jitter per patch (like one dye).
_CLEAR, _NUCLEAR, _TISSUE, _MINERAL, _BLOOD = range(5)

_PALETTES: dict[str, dict[str, tuple[tuple[int, int, int], int]]] = {
    "he": {
        "glass": ((243, 240, 244), _CLEAR),
        "lumen": ((240, 233, 240), _CLEAR),
        "ground": ((238, 212, 228), _TISSUE),
        "collagen": ((231, 160, 198), _TISSUE),
        "sclerotic": ((212, 98, 158), _TISSUE),
        "cytoplasm": ((206, 140, 190), _TISSUE),
        "keratin": ((238, 176, 204), _TISSUE),
        "nucleus": ((64, 40, 118), _NUCLEAR),
        "nucleus_pale": ((120, 92, 170), _NUCLEAR),
        "rbc": ((220, 58, 84), _BLOOD),
        "membrane": ((222, 146, 190), _TISSUE),
        "calcium": ((86, 64, 152), _NUCLEAR),
        "calcium_dark": ((44, 28, 104), _NUCLEAR),
        "bone": ((222, 104, 164), _TISSUE),
        "bone_alt": ((236, 146, 192), _TISSUE),
        "cement": ((96, 66, 150), _NUCLEAR),
        "osteoid": ((236, 166, 198), _TISSUE),
        "urate": ((214, 198, 214), _CLEAR),
        "urate_streak": ((190, 170, 196), _CLEAR),
        "amyloid": ((234, 180, 196), _TISSUE),
        "histiocyte": ((226, 182, 210), _TISSUE),
        "gland": ((204, 158, 206), _TISSUE),
    },
    "von_kossa": {  # silver black on mineral; nuclear fast red counterstain
        "glass": ((244, 241, 239), _CLEAR),
        "lumen": ((241, 234, 233), _CLEAR),
        "ground": ((241, 220, 220), _TISSUE),
        "collagen": ((234, 184, 188), _TISSUE),
        "sclerotic": ((222, 150, 162), _TISSUE),
        "cytoplasm": ((226, 170, 180), _TISSUE),
        "keratin": ((236, 198, 192), _TISSUE),
        "nucleus": ((182, 46, 78), _NUCLEAR),
        "nucleus_pale": ((204, 98, 118), _NUCLEAR),
        "rbc": ((214, 128, 96), _BLOOD),
        "membrane": ((230, 178, 186), _TISSUE),
        "calcium": ((28, 23, 20), _MINERAL),
        "calcium_dark": ((16, 12, 10), _MINERAL),
        "bone": ((34, 28, 25), _MINERAL),
        "bone_alt": ((62, 50, 44), _MINERAL),
        "cement": ((12, 10, 9), _MINERAL),
        "osteoid": ((228, 164, 176), _TISSUE),
        "urate": ((212, 207, 205), _CLEAR),
        "urate_streak": ((192, 187, 186), _CLEAR),
        "amyloid": ((232, 210, 212), _TISSUE),
        "histiocyte": ((234, 196, 200), _TISSUE),
        "gland": ((226, 180, 190), _TISSUE),
    },
    "alizarin_red": {  # calcium chelate orange-red; the rest pale, light counterstain
        "glass": ((245, 243, 240), _CLEAR),
        "lumen": ((241, 238, 234), _CLEAR),
        "ground": ((239, 232, 228), _TISSUE),
        "collagen": ((229, 215, 211), _TISSUE),
        "sclerotic": ((216, 197, 193), _TISSUE),
        "cytoplasm": ((219, 205, 207), _TISSUE),
        "keratin": ((233, 221, 208), _TISSUE),
        "nucleus": ((128, 124, 166), _NUCLEAR),
        "nucleus_pale": ((166, 160, 192), _NUCLEAR),
        "rbc": ((216, 176, 150), _BLOOD),
        "membrane": ((226, 212, 208), _TISSUE),
        "calcium": ((214, 64, 36), _MINERAL),
        "calcium_dark": ((178, 34, 24), _MINERAL),
        "bone": ((204, 56, 54), _MINERAL),
        "bone_alt": ((218, 88, 76), _MINERAL),
        "cement": ((160, 28, 30), _MINERAL),
        "osteoid": ((226, 202, 196), _TISSUE),
        "urate": ((216, 213, 206), _CLEAR),
        "urate_streak": ((200, 198, 191), _CLEAR),
        "amyloid": ((227, 221, 214), _TISSUE),
        "histiocyte": ((228, 215, 212), _TISSUE),
        "gland": ((221, 208, 210), _TISSUE),
    },
}
_BASE = {s: np.array([_PALETTES[s][m][0] for m in _MATERIALS], np.float32) for s in STAIN_NAMES}
_GROUP = {s: np.array([_PALETTES[s][m][1] for m in _MATERIALS], np.int64) for s in STAIN_NAMES}


def _sample_palette(rng: np.random.Generator, stain: str, shift: float) -> np.ndarray:
    """The patch's colours (M, 3) float32 0..255: the stain's palette, jittered per group.

    Strength pulls a colour towards the glass (weak staining) or away from it
    (strong); hue and saturation are jittered in HSV. ``shift`` pushes all of
    them one way, outside the usual spread.
    """
    base = _BASE[stain]
    group = _GROUP[stain]
    glass = base[0]
    g = 5
    sign = 1.0 if rng.random() < 0.5 else -1.0
    sd = np.array([0.0, 0.14, 0.14, 0.07, 0.14])
    strength = np.exp(
        rng.normal(0, 1, g) * sd + sign * 0.38 * shift + rng.normal(0, 0.1 * shift + 1e-9, g)
    )
    strength[_CLEAR] = 1.0
    k = strength[group][:, None].astype(np.float32)
    col = np.clip(glass - (glass - base) * k, 0, 255)
    hsv = cv2.cvtColor(col[None] / 255.0, cv2.COLOR_RGB2HSV)[0]
    hue_sign = 1.0 if rng.random() < 0.5 else -1.0
    dh = rng.normal(0, 4.0, g) + hue_sign * 14.0 * shift
    ds = np.exp(rng.normal(0, 0.1, g) + rng.normal(0, 0.3 * shift + 1e-9))
    m = len(_MATERIALS)
    hsv[:, 0] = (hsv[:, 0] + dh[group] + rng.normal(0, 2.0, m)) % 360.0
    hsv[:, 1] = np.clip(hsv[:, 1] * ds[group] * np.exp(rng.normal(0, 0.05, m)), 0, 1)
    hsv[:, 2] = np.clip(hsv[:, 2] * np.exp(rng.normal(0, 0.02, m)), 0, 1)
    out = cv2.cvtColor(hsv[None].astype(np.float32), cv2.COLOR_HSV2RGB)[0] * 255.0
    out[0] = glass
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# The canvas: painter's algorithm in RGB
# ---------------------------------------------------------------------------

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _GRIDS:
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        _GRIDS[n] = (xx, yy)
    return _GRIDS[n]


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _pick_one(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    """One of ``options`` with probabilities ``p`` (Generator.choice is slow for one draw)."""
    u = rng.random() * sum(p)
    for opt, w in zip(options, p, strict=True):
        u -= w
        if u < 0:
            return opt
    return options[-1]


def _bbox(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns that hold any coverage (None when the layer is empty)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _fixed(polys) -> list[np.ndarray]:
    """Point lists as int32 with 4 fractional bits (OpenCV's ``shift=4``)."""
    if isinstance(polys, np.ndarray):
        return list(np.rint(polys * 16).astype(np.int32))
    return [np.rint(np.asarray(p) * 16).astype(np.int32) for p in polys]


class _Canvas:
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
        self.xx, self.yy = _grid(n)
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
        f = _TWO_PI / np.maximum(lam, 1.5)
        kx, ky = f * np.cos(th), f * np.sin(th)
        ph = rng.uniform(0, _TWO_PI, k)
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
        c = self.pal[_M[name]]
        if strength != 1.0:
            g = self.pal[0]
            c = np.clip(g - (g - c) * strength, 0, 255)
        return c

    def put(self, alpha: np.ndarray, name: str, shade: np.ndarray | None = None, strength=1.0):
        """Composite a layer of material ``name`` with coverage ``alpha`` over the canvas.

        ``shade`` (around 1) modulates how strongly each pixel is coloured:
        > 1 further from the glass colour, < 1 towards it.
        """
        box = _bbox(alpha)
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
        box = _bbox(alpha)
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
            cv2.fillPoly(mask, _fixed(polys), int(value), self.lt, 4)

    def stroke(self, mask: np.ndarray, curves, thickness: float, value: int = 255) -> None:
        if len(curves):
            t = max(int(round(thickness)), 1)
            cv2.polylines(mask, _fixed(curves), False, int(value), t, self.lt, 4)

    def pick(self, mask: np.ndarray, k: int) -> np.ndarray:
        """``k`` random pixel positions (x, y) inside ``mask`` (anywhere if it is empty)."""
        idx = np.flatnonzero(mask.ravel())
        if idx.size == 0:
            idx = np.arange(self.n * self.n)
        sel = idx[self.rng.integers(0, idx.size, int(k))]
        pts = np.stack([sel % self.n, sel // self.n], axis=1).astype(np.float64)
        return pts + self.rng.uniform(0, 1, pts.shape)


# ---------------------------------------------------------------------------
# Geometric primitives
# ---------------------------------------------------------------------------


def _blobs(
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
    t = np.linspace(0, _TWO_PI, nv, endpoint=False)[None, :] + rng.uniform(0, _TWO_PI, (k, 1))
    r = 1.0 + jag * rng.standard_normal((k, nv))
    r = np.clip(r, 0.55, 1.5)
    ex = radii[:, None] * aspect[:, None] * np.cos(t) * r
    ey = radii[:, None] * np.sin(t) * r
    ca, sa = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x = centres[:, 0:1] + ex * ca - ey * sa
    y = centres[:, 1:2] + ex * sa + ey * ca
    return np.stack([x, y], axis=2)


def _star(
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
    t = np.linspace(0, _TWO_PI, nv, endpoint=False)
    h = np.arange(2, 8)[:, None]
    coef = lobes / h * rng.standard_normal((6, 1))
    r = 1.0 + (coef * np.cos(h * t + rng.uniform(0, _TWO_PI, (6, 1)))).sum(axis=0)
    r *= 1.0 + jag * rng.standard_normal(nv)
    r = radius * np.clip(r, 0.35, 1.8)
    ex, ey = r * np.cos(t) * aspect, r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ex * ca - ey * sa, cy + ex * sa + ey * ca], axis=1)


def _curves(
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
        + amp * np.sin(_TWO_PI * s[None, :] / wl + rng.uniform(0, _TWO_PI, (k, 1)))
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


def _jagged(cv: _Canvas, starts: np.ndarray, length_um: float, turn: float) -> list[np.ndarray]:
    """Sharp, jagged crack lines from ``starts``: straight runs with abrupt turns."""
    rng = cv.rng
    out = []
    for x, y in starts:
        seg = max(cv.px(rng.uniform(3, 8)), 1.5)
        steps = max(int(cv.px(length_um * rng.uniform(0.4, 1.0)) / seg), 2)
        # zig-zag about a slowly drifting course: straight runs, abrupt kinks
        a = (
            rng.uniform(0, _TWO_PI)
            + np.cumsum(rng.normal(0, 0.1, steps))
            + rng.normal(0, turn, steps)
        )
        ln = seg * rng.uniform(0.5, 1.5, steps)
        pts = np.stack([x + np.cumsum(np.cos(a) * ln), y + np.cumsum(np.sin(a) * ln)], axis=1)
        out.append(np.vstack([[x, y], pts]))
        if rng.random() < 0.4:  # a branch
            j = int(rng.integers(0, len(pts)))
            b = a[j] + _sign(rng) * rng.uniform(0.5, 1.2)
            m = max(steps // 2, 2)
            bb = b + rng.normal(0, turn, m)
            bx = pts[j, 0] + np.cumsum(np.cos(bb) * seg)
            by = pts[j, 1] + np.cumsum(np.sin(bb) * seg)
            out.append(np.vstack([pts[j], np.stack([bx, by], axis=1)]))
    return out


def _nuclei(
    cv: _Canvas,
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
    polys = _blobs(rng, pts, b, a / b, ang, 8, jag)
    cv.fill(mask, polys, value)


def _contour_points(mask: np.ndarray, spacing: float, rng: np.random.Generator):
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


def _disk(r: float) -> np.ndarray:
    k = max(int(round(r)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))


# ---------------------------------------------------------------------------
# Layout: surface, rete ridges and subcutis as 1-D profiles in a rotated frame
# ---------------------------------------------------------------------------


def _profile(rng: np.random.Generator, amp: float, wl: tuple[float, float], k: int = 3):
    """A 1-D profile along the surface: list of (amplitude, wavenumber, phase)."""
    return [
        (amp * rng.uniform(0.3, 1.0) / (i + 1), _TWO_PI / rng.uniform(*wl), rng.uniform(0, _TWO_PI))
        for i in range(k)
    ]


def _eval(prof, u):
    out = np.zeros_like(u)
    for a, kk, ph in prof:
        out += a * np.sin(kk * u + ph)
    return out


def _sin_grid(cv: _Canvas, t: np.ndarray, kk: float, ph: float) -> np.ndarray:
    """sin(kk * u + ph) on the pixel grid, u = um along direction t from the centre.

    u is linear in x and y, so the sine splits into outer products of 1-D terms.
    """
    x = (np.arange(cv.n, dtype=np.float64) - cv.n / 2) / cv.ppu
    ax = kk * t[0] * x + ph
    by = kk * t[1] * x
    out = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
    return out.astype(np.float32)


def _eval_grid(cv: _Canvas, t: np.ndarray, prof) -> np.ndarray:
    out = np.zeros((cv.n, cv.n), np.float32)
    for a, kk, ph in prof:
        out += np.float32(a) * _sin_grid(cv, t, kk, ph)
    return out


class _Layout:
    def __init__(self, cv: _Canvas, label: str) -> None:
        rng = cv.rng
        n = cv.n
        L = cv.side_um
        self.theta = rng.uniform(0, _TWO_PI)
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
        self.rete_ph = rng.uniform(0, _TWO_PI)
        self.rete_p = (1.0, 1.5, 2.0)[int(rng.integers(0, 3))]
        self.papillary = rng.uniform(18, 45)
        self.surf = _profile(rng, rng.uniform(1, 7), (60, 300))
        self.sub_prof = _profile(rng, rng.uniform(8, 40), (80, 400))
        deposit = label != "normal"
        p_surface = 0.55 if label == "amyloidosis" else 0.28
        rest = (1 - p_surface) / 0.72
        self.kind = _pick_one(
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
        self.depth = (w + self.c0).astype(np.float32) - _eval_grid(cv, t, self.surf)
        if self.kind == "surface":
            self.dej = self._rete(_sin_grid(cv, t, _TWO_PI / self.rete_wl, self.rete_ph))
        else:
            self.dej = np.full((n, n), self.keratin + self.epi, np.float32)
        self.sub = np.float32(self.sub0) + _eval_grid(cv, t, self.sub_prof)
        self.glass = self.depth < 0
        if rng.random() < 0.1:  # the cut edge of the section
            a = rng.uniform(0, _TWO_PI)
            proj = (X * math.cos(a) + Y * math.sin(a)) / n
            wob = 0.03 * cv.broad
            self.glass |= (proj + wob) > rng.uniform(0.25, 0.45)
        self.tissue = ~self.glass
        self.epidermis = self.tissue & (self.depth < self.dej)
        self.deep = self.tissue & (self.depth >= self.dej + 1.5)
        self.fat = self.deep & (self.depth >= self.sub)
        self.dermis = self.deep & ~self.fat

    def _rete(self, sine: np.ndarray) -> np.ndarray:
        s = np.maximum(sine, 0.0)
        if self.rete_p == 2.0:
            s = s * s
        elif self.rete_p == 1.5:
            s = s * np.sqrt(s)
        return self.keratin + self.epi + self.rete * s

    def dej_at(self, u: np.ndarray) -> np.ndarray:
        return self._rete(np.sin(_TWO_PI * u / self.rete_wl + self.rete_ph))

    def to_px(self, cv: _Canvas, u: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixel (x, y) of points given as (um along the surface, um below it)."""
        w = (depth - self.c0 + _eval(self.surf, u)) * cv.ppu
        uu = u * cv.ppu
        x = cv.n / 2 + uu * self.t[0] + w * self.d[0]
        y = cv.n / 2 + uu * self.t[1] + w * self.d[1]
        return np.stack([x, y], axis=-1)


# ---------------------------------------------------------------------------
# Ordinary skin
# ---------------------------------------------------------------------------


def _u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


def _dermis(cv: _Canvas, lay: _Layout, nuc: np.ndarray) -> None:
    """Pale ground crossed by bundles of stroked collagen fibres; fibroblasts along them."""
    rng = cv.rng
    region = lay.dermis
    if not region.any():
        return
    n = cv.n
    a_reg = region.astype(np.float32)
    # density: loose (sparse thin bundles) .. sclerotic (thick, overlapping, deep pink)
    dense = float(rng.beta(1.6, 1.6))
    if rng.random() < 0.22:
        dense = float(rng.uniform(0.8, 1.0))
    pink = float(np.clip(dense * rng.uniform(0.5, 1.3), 0, 1))
    cv.put(a_reg * (0.5 + 0.35 * rng.random()), "ground", shade=1 + 0.12 * cv.broad)
    if dense > 0.5:  # hyalinised dermis: an even pink underlay
        cv.put(a_reg * (dense - 0.3) * rng.uniform(0.5, 1.0), "collagen")
    base_ang = lay.theta + math.pi / 2 + rng.normal(0, 0.4)
    fib_w = cv.px(1.0) * np.array([2.0, 3.5, 5.5]) * (0.7 + 0.6 * dense) * cv.width_scale
    per = int(rng.integers(2, 5))  # fibres per bundle
    bundle_w = cv.px(rng.uniform(6, 14) + 14 * dense)
    length = cv.px(rng.uniform(50, 140) + 0.4 * cv.side_um)
    step = max(cv.px(3.0), 1.5)
    coverage = 0.35 + 1.6 * dense
    kb = int(np.clip(coverage * n * n * a_reg.mean() / max(bundle_w * length, 1), 2, 400))
    pad = 0.15 * n
    starts = rng.uniform(-pad, n + pad, (kb, 2))
    spread = rng.uniform(0.12, 0.6)
    angs = base_ang + rng.normal(0, spread, kb)
    axis = _curves(
        rng, starts, angs, length, step, rng.uniform(0.1, 0.4), cv.px(rng.uniform(25, 70))
    )
    tang = np.gradient(axis, axis=1)
    nrm = np.stack([-tang[..., 1], tang[..., 0]], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
    off = rng.uniform(-0.5, 0.5, (kb, per, 1, 1)) * bundle_w
    wob = np.cumsum(rng.normal(0, 0.04 * cv.px(1.0), (kb, per, axis.shape[1], 1)), axis=2)
    curves = (axis[:, None] + nrm[:, None] * (off + wob)).reshape(kb * per, -1, 2)
    k = len(curves)
    strokes = cv.blank()
    dark = cv.blank()
    groups = rng.integers(0, 3, k)
    vals = rng.integers(140, 256, 3)
    is_dark = np.repeat(rng.random(kb) < pink, per)
    for gi in range(3):
        sel = groups == gi
        cv.stroke(strokes, curves[sel & ~is_dark], fib_w[gi], vals[gi])
        cv.stroke(dark, curves[sel & is_dark], fib_w[gi], vals[gi])
    # papillary dermis: finer, looser, randomly oriented fibres
    if lay.kind == "surface":
        pap = region & (lay.depth < lay.dej + lay.papillary)
        if pap.any():
            strokes[pap] = 0
            dark[pap] = 0
            kp = int(np.clip(1.2 * pap.sum() / max(cv.px(2.0) * length * 0.4, 1), 2, 400))
            pc = _curves(
                rng,
                cv.pick(pap, kp),
                rng.uniform(0, math.pi, kp),
                length * 0.4,
                step,
                0.5,
                cv.px(20),
            )
            cv.stroke(strokes, pc, cv.px(rng.uniform(1.0, 2.2)), 200)
    fib = 0.85 + 0.15 * rng.random()
    fibrils = cv.waves(rng.uniform(2.5, 5.0), 10, base_ang + math.pi / 2, 0.15)
    shade = 1 + rng.uniform(0.06, 0.16) * fibrils
    cv.put(cv.alpha(strokes, fib) * a_reg, "collagen", shade=shade)
    cv.put(cv.alpha(dark, fib) * a_reg, "sclerotic", shade=shade)
    if dense > 0.55 and rng.random() < 0.6:
        # retraction clefts between bundles
        kc = int(rng.integers(2, 10))
        cl = _curves(
            rng,
            cv.pick(region, kc),
            base_ang + rng.normal(0, 0.2, kc),
            length,
            step,
            0.2,
            cv.px(50),
        )
        cm = cv.blank()
        cv.stroke(cm, cl, max(cv.px(1.0), 1), 255)
        cv.put(cv.alpha(cm, 0.8) * a_reg, "ground")
    # fibroblasts: flat nuclei lying along the bundles
    area_um2 = region.sum() / cv.ppu**2
    kf = int(rng.poisson(area_um2 / rng.uniform(700, 1600)))
    if kf:
        ci = rng.integers(0, k, kf)
        pi = rng.integers(0, curves.shape[1] - 1, kf)
        pts = curves[ci, pi]
        tang = curves[ci, pi + 1] - pts
        ang = np.arctan2(tang[:, 1], tang[:, 0])
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < n) & (pts[:, 1] >= 0) & (pts[:, 1] < n)
        pts, ang = pts[ok], ang[ok]
        ok = region[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        _nuclei(cv, nuc, pts[ok], (3.5, 6.0), (0.9, 1.6), ang[ok], 0.08, 230)


def _fat(cv: _Canvas, region: np.ndarray, cell_um: tuple[float, float], nuc: np.ndarray) -> None:
    """Adipocytes: overlapping ellipses painted one after another, each with its outline.

    A later cell covers part of an earlier one, so the outlines that survive
    meet at angles and the cells read as polygons with thin membranes.
    """
    rng = cv.rng
    box = _bbox(region)
    if box is None:
        return
    n = cv.n
    sp = cv.px(rng.uniform(*cell_um))
    ys, xs = box
    # jittered hexagonal lattice over the region's bounding box
    x0, x1 = xs.start - sp, xs.stop + sp
    y0, y1 = ys.start - sp, ys.stop + sp
    rows = int((y1 - y0) / (sp * 0.866)) + 2
    cols = int((x1 - x0) / sp) + 2
    j, i = np.meshgrid(np.arange(cols), np.arange(rows))
    cx = x0 + (j + 0.5 * (i % 2)) * sp + rng.uniform(-0.25, 0.25, j.shape) * sp
    cy = y0 + i * sp * 0.866 + rng.uniform(-0.25, 0.25, i.shape) * sp
    centres = np.stack([cx.ravel(), cy.ravel()], 1)[rng.permutation(cx.size)]
    k = len(centres)
    polys = _blobs(
        rng,
        centres,
        sp * rng.uniform(0.5, 0.62, k),
        rng.uniform(1.0, 1.25, k),
        rng.uniform(0, math.pi, k),
        16,
        0.03,
    )
    fixed = _fixed(polys)
    memb = np.full((n, n), 255, np.uint8)
    thick = max(int(round(cv.px(rng.uniform(0.8, 1.8)))), 1)
    for p in fixed:
        cv2.fillPoly(memb, [p], 0, cv.lt, 4)
        cv2.polylines(memb, [p], True, 255, thick, cv.lt, 4)
    a = region.astype(np.float32)
    cv.put(a, "lumen")
    cv.put(cv.alpha(memb, rng.uniform(0.8, 1.0)) * a, "membrane")
    # a few flat nuclei lying on the membranes
    m = int(rng.binomial(k, 0.12))
    if m:
        ci = rng.integers(0, k, m)
        vi = rng.integers(0, 16, m)
        q = polys[ci, vi]
        tang = polys[ci, (vi + 1) % 16] - q
        ok = (q[:, 0] >= 0) & (q[:, 0] < n) & (q[:, 1] >= 0) & (q[:, 1] < n)
        q, tang = q[ok], tang[ok]
        ok = region[q[:, 1].astype(int), q[:, 0].astype(int)]
        ang = np.arctan2(tang[ok, 1], tang[ok, 0])
        _nuclei(cv, nuc, q[ok], (3.5, 5.0), (0.8, 1.1), ang, 0.05, 220)


def _septum(cv: _Canvas, region: np.ndarray) -> None:
    """A fibrous septum crossing the fat: a thick band of collagen strokes."""
    rng = cv.rng
    p = cv.pick(region, 1)
    ang = np.array([rng.uniform(0, math.pi)])
    c = _curves(rng, p, ang, cv.n * 2.0, max(cv.px(4), 2), 0.15, cv.px(80))
    band = cv.blank()
    cv.stroke(band, c, cv.px(rng.uniform(5, 18)), 255)
    fib = cv.blank()
    k = int(rng.integers(3, 8))
    off = rng.normal(0, cv.px(3), (k, 1, 2))
    cv.stroke(fib, c + off, cv.px(rng.uniform(1.5, 4)), 255)
    a = region.astype(np.float32)
    cv.put(cv.alpha(band, 0.9) * a, "collagen")
    cv.put(cv.alpha(fib, 0.7) * a * (band > 0), "sclerotic")


def _epidermis(cv: _Canvas, lay: _Layout, nuc: np.ndarray) -> None:
    """Keratin on top; keratinocyte tiles in rows following the surface; basal row."""
    rng = cv.rng
    band = lay.epidermis
    if not band.any():
        return
    # the u range visible in the patch
    umin, umax = float(lay.u.min()) - 10, float(lay.u.max()) + 10
    # stratum corneum
    ker = band & (lay.depth < lay.keratin)
    if ker.any():
        cv.put(ker.astype(np.float32) * rng.uniform(0.3, 0.6), "keratin")
        kk = int(max(lay.keratin / rng.uniform(1.5, 3.0), 2) * (umax - umin) / 60)
        uu = rng.uniform(umin, umax, kk)
        dd = rng.uniform(0, lay.keratin, kk)
        starts = lay.to_px(cv, uu, dd)
        ang = np.full(kk, math.atan2(lay.t[1], lay.t[0])) + rng.normal(0, 0.08, kk)
        lam = _curves(
            rng, starts, ang, cv.px(rng.uniform(20, 60)), max(cv.px(3), 1.5), 0.1, cv.px(30)
        )
        m = cv.blank()
        cv.stroke(m, lam, cv.px(rng.uniform(0.8, 2.0)), 255)
        cv.put(cv.alpha(m, 0.9) * ker, "keratin", strength=1.15)
    viable = band & ~ker
    if not viable.any():
        return
    # keratinocytes: rows of polygon tiles in (u, depth)
    h = rng.uniform(11.0, 16.0)
    top = lay.keratin
    bottom = lay.keratin + lay.epi + lay.rete
    depths = np.arange(top + h / 2, bottom, h * 0.8)
    nrow = len(depths)
    ucols = np.arange(umin, umax, h)
    U, D = np.meshgrid(ucols, depths)
    U = U + (np.arange(nrow)[:, None] % 2) * h / 2 + rng.uniform(-0.15, 0.15, U.shape) * h
    D = D + rng.uniform(-0.12, 0.12, D.shape) * h
    keep = D < lay.dej_at(U) - 2.5
    U, D = U[keep], D[keep]
    frac = np.clip((D - top) / max(bottom - top, 1), 0, 1)
    flat = 0.45 + 0.55 * np.sqrt(frac)  # flatter towards the surface
    centres = lay.to_px(cv, U, D)
    ang_t = math.atan2(lay.t[1], lay.t[0])
    k = len(centres)
    shrink = rng.uniform(0.88, 0.97)
    r = cv.px(h / 2) * shrink * rng.uniform(0.9, 1.1, k)
    cellpolys = _blobs(rng, centres, r * flat, 1.0 / flat, np.full(k, ang_t), 6, 0.08)
    tiles = cv.blank()
    grp = rng.integers(0, 3, k)
    for gi, val in enumerate((255, 225, 195)):
        cv.fill(tiles, cellpolys[grp == gi], val)
    vb = viable.astype(np.float32)
    cv.put(vb * rng.uniform(0.5, 0.8), "lumen")
    cv.put(cv.alpha(tiles, 0.95) * vb, "cytoplasm", shade=1 + 0.08 * cv.broad.T)
    # nuclei in the tile centres, flattening upwards; granular layer granules on top
    nmask = cv.blank()
    rn = rng.uniform(1.9, 2.6)
    jitter = rng.normal(0, 0.08 * cv.px(h), centres.shape)
    _nuclei(
        cv, nmask, centres + jitter, (rn, rn * 1.15), (rn * 0.75, rn), ang_t + np.zeros(k), 0.1, 255
    )
    nmask[~viable] = 0
    # spinous nuclei are vesicular: paler than the basal row
    cv.put(cv.alpha(nmask, rng.uniform(0.8, 1.0)), "nucleus_pale", shade=cv.speckle)
    nmask = cv.blank()
    gran = frac < 0.18
    if gran.any():
        g = int(gran.sum() * 4)
        gpts = centres[gran][rng.integers(0, int(gran.sum()), g)] + rng.normal(
            0, cv.px(h / 4), (g, 2)
        )
        _nuclei(cv, nmask, gpts, (0.5, 1.0), (0.5, 0.9), None, 0.1, 255)
    # basal row: columnar, darker nuclei along the junction
    spacing = rng.uniform(5.5, 7.5)
    ub = np.arange(umin, umax, spacing) + rng.uniform(0, spacing)
    db = lay.dej_at(ub) - rng.uniform(3.0, 4.5)
    bp = lay.to_px(cv, ub, db)
    _nuclei(cv, nmask, bp, (3.2, 4.2), (1.8, 2.4), np.full(len(bp), ang_t + math.pi / 2), 0.08, 255)
    nmask[~viable] = 0
    nuc |= nmask  # drawn with the other tissue nuclei


def _vessels(cv: _Canvas, lay: _Layout, nuc: np.ndarray, count: int) -> None:
    """Small vessels: a collagen wall round a lumen lined by flat endothelium, red cells inside."""
    rng = cv.rng
    region = lay.deep
    if count == 0 or not region.any():
        return
    k = count
    c = cv.pick(region, k)
    r = cv.px(1.0) * rng.uniform(4, 13, k)
    asp = rng.uniform(1.0, 2.3, k)
    ang = rng.uniform(0, math.pi, k)
    w = cv.px(1.0) * rng.uniform(1.5, 5, k)
    nv = 24
    # the same vertex angles for wall and lumen keep the wall even
    t = np.linspace(0, _TWO_PI, nv, endpoint=False)
    ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def ring(rad):
        ex, ey = (rad * asp)[:, None] * np.cos(t), rad[:, None] * np.sin(t)
        return np.stack([c[:, 0:1] + ex * ca - ey * sa, c[:, 1:2] + ex * sa + ey * ca], 2)

    outer, inner = ring(r + w), ring(r)
    wall = cv.blank()
    lumen = cv.blank()
    for o, i in zip(_fixed(outer), _fixed(inner), strict=True):  # one vessel at a time
        cv2.fillPoly(wall, [o], 255, cv.lt, 4)
        cv2.fillPoly(lumen, [i], 255, cv.lt, 4)
    # endothelium: 2-6 flat nuclei per vessel on the lumen's outline
    m = rng.integers(2, 7, k)
    vi = rng.integers(0, nv, int(m.sum()))
    vk = np.repeat(np.arange(k), m)
    p0 = inner[vk, vi]
    tang = inner[vk, (vi + 1) % nv] - p0
    # red cells, a partly filled lumen
    kr = (rng.uniform(0.1, 0.8, k) * r * r * asp / max(cv.px(3.6) ** 2, 1)).astype(int)
    rk = np.repeat(np.arange(k), kr)
    rbc = cv.blank()
    if rk.size:
        a = rng.uniform(0, _TWO_PI, rk.size)
        rr = np.sqrt(rng.uniform(0, 0.8, rk.size)) * r[rk]
        ex, ey = rr * asp[rk] * np.cos(a), rr * np.sin(a)
        pts = np.stack(
            [
                c[rk, 0] + ex * np.cos(ang[rk]) - ey * np.sin(ang[rk]),
                c[rk, 1] + ex * np.sin(ang[rk]) + ey * np.cos(ang[rk]),
            ],
            1,
        )
        rad = np.full(rk.size, cv.px(3.5))
        cv.fill(rbc, _blobs(rng, pts, rad, rng.uniform(1, 1.5, rk.size), a, 8, 0.04))
    cv.put(cv.alpha(wall, 0.9), "sclerotic" if rng.random() < 0.4 else "collagen")
    cv.put(cv.alpha(lumen), "lumen")
    cv.put(cv.alpha(rbc, rng.uniform(0.75, 0.95)), "rbc")
    _nuclei(cv, nuc, p0, (3.5, 5.0), (0.9, 1.3), np.arctan2(tang[:, 1], tang[:, 0]), 0.05, 240)


def _glands(cv: _Canvas, lay: _Layout, nuc: np.ndarray) -> None:
    """A cluster of eccrine tubules: rings of wedge-shaped cuboidal cells round a lumen."""
    rng = cv.rng
    if not lay.dermis.any():
        return
    ((gx, gy),) = cv.pick(lay.dermis, 1)
    cyto = cv.blank()
    lumen = cv.blank()
    nuc_pts = []
    for _ in range(int(rng.integers(1, 5))):
        x, y = gx + rng.normal(0, cv.px(20)), gy + rng.normal(0, cv.px(20))
        ro = cv.px(rng.uniform(10, 18))
        ri = ro * rng.uniform(0.25, 0.45)
        m = max(int(_TWO_PI * ro / cv.px(6.5)), 6)
        t0 = np.linspace(0, _TWO_PI, m, endpoint=False) + rng.uniform(0, 1)
        dt = _TWO_PI / m * 0.45
        polys = []
        for t in t0:
            a = np.array([t - dt, t + dt])
            outer = np.stack([x + ro * np.cos(a), y + ro * np.sin(a)], 1)
            inner = np.stack([x + ri * np.cos(a[::-1]), y + ri * np.sin(a[::-1])], 1)
            polys.append(np.vstack([outer, inner]))
        cv.fill(cyto, polys, 230)
        cv2.circle(lumen, (int(x * 16), int(y * 16)), int(ri * 16), 255, -1, cv.lt, 4)
        rr = ri + 0.65 * (ro - ri)
        nuc_pts.append(np.stack([x + rr * np.cos(t0), y + rr * np.sin(t0)], 1))
    a = lay.dermis.astype(np.float32)
    cv.put(cv.alpha(cyto) * a, "gland")
    cv.put(cv.alpha(lumen) * a, "lumen")
    m = cv.blank()
    _nuclei(cv, m, np.concatenate(nuc_pts), (2.2, 3.0), (1.9, 2.6), None, 0.08, 240)
    m[~lay.dermis] = 0
    nuc |= m


def _lymphocytes(cv: _Canvas, lay: _Layout, nuc: np.ndarray) -> None:
    rng = cv.rng
    ((x, y),) = cv.pick(lay.deep, 1)
    k = int(rng.integers(8, 40))
    pts = rng.normal([x, y], cv.px(rng.uniform(6, 20)), (k, 2))
    m = cv.blank()
    _nuclei(cv, m, pts, (2.4, 3.2), (2.1, 2.9), None, 0.06, 255)
    m[~lay.deep] = 0
    nuc |= m


def _paint_nuclei(cv: _Canvas, nuc: np.ndarray) -> None:
    """Composite a mask of nuclei in the nuclear colour, with chromatin speckle."""
    if nuc.any():
        cv.put(cv.alpha(nuc), "nucleus", shade=cv.speckle)


def _base_tissue(cv: _Canvas, lay: _Layout) -> None:
    rng = cv.rng
    nuc = cv.blank()
    tissue = lay.tissue.astype(np.float32)
    cv.put(tissue * rng.uniform(0.25, 0.45), "ground")
    _dermis(cv, lay, nuc)
    _paint_nuclei(cv, nuc)
    nuc = cv.blank()
    if lay.fat.any():
        _fat(cv, lay.fat, (40, 95), nuc)
        if rng.random() < 0.5:
            _septum(cv, lay.fat)
    if lay.epidermis.any():
        _epidermis(cv, lay, nuc)
    area = lay.deep.sum() / cv.ppu**2
    _vessels(cv, lay, nuc, int(rng.poisson(0.6 + area / 25000)))
    if rng.random() < 0.14:
        _glands(cv, lay, nuc)
    if rng.random() < 0.22:
        _lymphocytes(cv, lay, nuc)
    _paint_nuclei(cv, nuc)


# ---------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------


def _giant_cells(cv: _Canvas, pts: np.ndarray, normals: np.ndarray, allowed: np.ndarray) -> None:
    """Multinucleated giant cells at ``pts``, their long axis along the outline."""
    rng = cv.rng
    if len(pts) == 0:
        return
    cyto = cv.blank()
    nm = cv.blank()
    for (x, y), (nx, ny) in zip(pts, normals, strict=True):
        ln = cv.px(rng.uniform(22, 50))
        wd = ln * rng.uniform(0.4, 0.65)
        cx, cy = x + nx * wd * 0.45, y + ny * wd * 0.45
        ang = math.atan2(ny, nx) + math.pi / 2
        poly = _blobs(
            rng,
            np.array([[cx, cy]]),
            np.array([wd / 2]),
            np.array([ln / wd]),
            np.array([ang]),
            14,
            0.06,
        )
        cv.fill(cyto, poly, 255)
        m = int(np.clip(rng.integers(5, 16) * (ln / cv.px(40)) ** 2, 3, 25))
        if rng.random() < 0.4:  # Langhans: a horseshoe of peripheral nuclei
            t = rng.uniform(0, _TWO_PI, m)
            u, v = 0.36 * ln * np.cos(t), 0.34 * wd * np.sin(t)
        else:
            u, v = rng.uniform(-0.33, 0.33, m) * ln, rng.uniform(-0.28, 0.28, m) * wd
        p = np.stack(
            [
                cx + u * math.cos(ang) - v * math.sin(ang),
                cy + u * math.sin(ang) + v * math.cos(ang),
            ],
            1,
        )
        _nuclei(cv, nm, p, (2.3, 3.0), (1.7, 2.2), None, 0.08, 230)
    a = allowed.astype(np.float32)
    cv.put(cv.alpha(cyto, 0.95) * a, "histiocyte")
    cv.put(cv.alpha(nm) * a, "nucleus", shade=cv.speckle)


def _fibrous_ring(cv: _Canvas, lesion: np.ndarray, allowed: np.ndarray) -> None:
    """Dense collagen wrapped round a deposit: the outline stroked at several widths."""
    rng = cv.rng
    width = cv.px(rng.uniform(6, 18))
    contours, _ = cv2.findContours(lesion, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return
    ring = cv.blank()
    lam = cv.blank()
    cv2.drawContours(ring, contours, -1, 255, max(int(2 * width), 2), cv.lt)
    step = max(cv.px(rng.uniform(2.5, 4.5)), 1.0)
    j = 0
    for t in np.arange(2 * width, 1, -2 * step):
        cv2.drawContours(lam, contours, -1, 255 if j % 2 == 0 else 150, max(int(t), 1), cv.lt)
        j += 1
    keep = (allowed & (lesion == 0)).astype(np.float32)
    cv.put(cv.alpha(ring, 0.9) * keep, "sclerotic")
    cv.put(cv.alpha(lam, 0.5) * keep, "collagen")
    pts, nrm = _contour_points(lesion, cv.px(rng.uniform(10, 18)), rng)
    if len(pts):
        off = rng.uniform(0.2, 1.0, (len(pts), 1)) * width
        p = pts + nrm * off
        ang = np.arctan2(nrm[:, 1], nrm[:, 0]) + math.pi / 2
        m = cv.blank()
        _nuclei(cv, m, p, (4.0, 6.5), (0.9, 1.3), ang, 0.05, 230)
        cv.put(cv.alpha(m) * keep, "nucleus", shade=cv.speckle)


def _calcinosis(cv: _Canvas, lay: _Layout, scale: float) -> None:
    rng = cv.rng
    L = cv.side_um
    deep = lay.deep
    mode = _pick_one(rng, ("mass", "granular", "mixed"), (0.45, 0.3, 0.25))
    body = cv.blank()  # solid masses
    gran = cv.blank()  # granules and small plaques
    if mode in ("mass", "mixed"):
        for x, y in cv.pick(deep, int(rng.integers(1, 4))):
            r = cv.px(rng.uniform(0.12, 0.4) * L * scale + 4)
            poly = _star(
                rng,
                x,
                y,
                r,
                rng.uniform(0.3, 0.7),
                rng.uniform(0.02, 0.08),
                90,
                rng.uniform(0.7, 1.4),
                rng.uniform(0, math.pi),
            )
            cv.fill(body, [poly])
            # the edge crumbles into granules
            m = int(rng.integers(10, 60))
            t = rng.uniform(0, _TWO_PI, m)
            rr = r * rng.uniform(0.85, 1.25, m)
            pts = np.stack([x + rr * np.cos(t), y + rr * np.sin(t)], 1)
            rad = cv.px(1.0) * rng.lognormal(0.4, 0.5, m)
            cv.fill(
                gran, _blobs(rng, pts, rad, rng.uniform(1, 1.6, m), rng.uniform(0, 3, m), 7, 0.15)
            )
    if mode in ("granular", "mixed"):
        region = lay.dermis if lay.dermis.any() else deep
        for x, y in cv.pick(region, int(rng.integers(1, 4))):
            rc = cv.px(rng.uniform(10, 40) * scale)
            m = int(np.clip((rc / max(cv.px(2.8), 0.8)) ** 2 * rng.uniform(0.5, 1.1), 10, 1500))
            a = rng.uniform(0, _TWO_PI, m)
            rr = rc * np.sqrt(rng.uniform(0, 1, m))
            pts = np.stack([x + rr * np.cos(a), y + rr * np.sin(a)], 1)
            rad = cv.px(1.0) * rng.lognormal(0.3, 0.55, m)
            cv.fill(
                gran, _blobs(rng, pts, rad, rng.uniform(1, 1.7, m), rng.uniform(0, 3, m), 7, 0.18)
            )
            # granules merging into small amorphous plaques
            for px_, py_ in pts[: int(rng.integers(0, 4))]:
                rp = cv.px(rng.uniform(3, 10))
                cv.fill(
                    gran,
                    [
                        _star(
                            rng,
                            px_,
                            py_,
                            rp,
                            0.5,
                            0.1,
                            28,
                            rng.uniform(0.7, 1.4),
                            rng.uniform(0, 3),
                        )
                    ],
                )
    body[~deep] = 0
    gran[~deep] = 0
    solid = body > 127
    free = deep & (cv.labels == 0)  # a retry must not paint tissue over earlier deposit
    if solid.any():
        if rng.random() < 0.4:
            _fibrous_ring(cv, _u8(solid), free & ~solid)
        if rng.random() < 0.45:
            p, nv = _contour_points(_u8(solid), cv.px(rng.uniform(25, 45)), rng)
            if len(p):
                sel = rng.permutation(len(p))[: int(rng.integers(1, 4))]
                _giant_cells(cv, p[sel], nv[sel], free & ~solid)
    # texture: pebbly (cellular noise), darker towards the rim, fine granular dust
    coarse = 1 - np.minimum(cv.cells(rng.uniform(5, 12)), 1)
    fine = 1 - np.minimum(cv.cells(rng.uniform(1.5, 3.5)), 1)
    shade = 0.8 + 0.25 * coarse + 0.12 * fine + 0.06 * cv.medium
    if solid.any() and rng.random() < 0.7:
        inner = cv2.erode(_u8(solid), _disk(cv.px(rng.uniform(2, 6))))
        shade = shade + 0.25 * ((body > 0) & (inner == 0))
    both = np.maximum(body, gran)
    cv.put_mix(
        cv.alpha(both, rng.uniform(0.92, 1.0)),
        "calcium",
        "calcium_dark",
        np.clip((shade - 0.8) * 1.4, 0, 1),
    )
    # sharp sectioning cracks through the masses
    cracks = cv.blank()
    if solid.any():
        k = int(rng.integers(1, 7))
        lines = _jagged(cv, cv.pick(solid, k), rng.uniform(30, 90) * scale, rng.uniform(0.25, 0.6))
        lt, cv.lt = cv.lt, cv2.LINE_8
        cv.stroke(cracks, lines, max(cv.px(rng.uniform(0.8, 2.0)), 1), 255)
        cv.lt = lt
        cracks[~solid] = 0
        cv.put(cracks.astype(np.float32) / 255.0, "lumen")
    cv.labels[(both > 127) & deep] = CALCIUM
    cv.labels[cracks > 127] = BACKGROUND


def _osteoma(cv: _Canvas, lay: _Layout, scale: float) -> None:
    rng = cv.rng
    n = cv.n
    L = cv.side_um
    deep = lay.deep
    # the lesion area: bone plus marrow, sometimes larger than the patch
    ((x, y),) = cv.pick(deep, 1)
    r = cv.px(rng.uniform(0.35, 1.0) * L * scale)
    room = cv.blank()
    cv.fill(room, [_star(rng, x, y, r, 0.4, 0.02, 72)])
    room = (room > 127) & deep
    if room.sum() < 0.05 * n * n:
        room = deep.copy()
    # trabecular skeleton: a network of struts joining nodes (some nodes grow
    # into plates), plus a few long free-running curves with branches
    step = max(cv.px(6), 2.0)
    nodes = cv.pick(room, int(rng.integers(3, 7)))
    net = []
    joined: set[tuple[int, int]] = set()
    for i, (x0, y0) in enumerate(nodes):
        d = np.linalg.norm(nodes - nodes[i], axis=1)
        for j in np.argsort(d)[1 : 1 + int(rng.integers(1, 3))]:
            pair = (min(i, int(j)), max(i, int(j)))
            if pair in joined or d[j] == 0:
                continue  # each pair of nodes joined once
            joined.add(pair)
            x1, y1 = nodes[j]
            p = max(int(d[j] / step) + 1, 2)
            t = np.linspace(0, 1, p)[:, None]
            bend = np.sin(np.pi * t) * rng.normal(0, 0.18) * d[j]
            nx, ny = -(y1 - y0) / (d[j] + 1e-9), (x1 - x0) / (d[j] + 1e-9)
            wig = np.cumsum(rng.normal(0, 0.6, (p, 1)), axis=0) * step * 0.15
            net.append(
                np.hstack(
                    [x0 + (x1 - x0) * t + nx * (bend + wig), y0 + (y1 - y0) * t + ny * (bend + wig)]
                )
            )
    k = int(rng.integers(0, 3))
    starts = cv.pick(room, k)
    main = _curves(
        rng,
        starts,
        rng.uniform(0, math.pi, k),
        cv.px(L * rng.uniform(0.8, 1.6)),
        step,
        rng.uniform(0.1, 0.35),
        cv.px(rng.uniform(60, 160)),
        0.03,
    )
    skel = list(main) + net
    for c in main:
        for _ in range(int(rng.integers(0, 3))):
            j = int(rng.integers(0, len(c) - 1))
            t = c[j + 1] - c[j]
            a = math.atan2(t[1], t[0]) + _sign(rng) * rng.uniform(0.6, 1.4)
            br = _curves(
                rng,
                c[j : j + 1],
                np.array([a]),
                cv.px(L * rng.uniform(0.3, 0.8)),
                step,
                0.2,
                cv.px(80),
                0.03,
                centred=False,
            )
            skel.append(br[0])
    period = max(cv.px(rng.uniform(3, 6)), 1.2)
    bone = cv.blank()
    lam = cv.blank()  # lamella tone: alternate values in concentric layers
    # struts: each skeleton curve in chunks of varying width, every chunk stroked
    # at decreasing widths so its lamellae run parallel to its surface
    pieces, widths = [], []
    skel_w = []  # width at every skeleton point, for the osteocytes
    lo, hi = cv.px(8), cv.px(70)
    for c in skel:
        m = int(rng.integers(4, 11))
        starts_ = np.arange(0, len(c) - 1, m)
        w = cv.px(rng.uniform(14, 45)) * cv.width_scale
        ws = np.clip(w * np.cumprod(rng.uniform(0.75, 1.3, len(starts_))), lo, hi)
        pieces.extend(c[j : j + m + 1] for j in starts_)
        widths.extend(ws.tolist())
        skel_w.append(ws[np.minimum(np.arange(len(c)) // m, len(ws) - 1)])
    # one polylines call per (width, tone): rings of all pieces, widest first
    rings: dict[tuple[int, int], list[np.ndarray]] = {}
    step2 = max(int(round(2 * period)), 2)
    for c, w in zip(pieces, widths, strict=True):
        t = max(int(round(w)), 1)
        j = 0
        while t >= 1:
            rings.setdefault((t, j % 2), []).append(c)
            t -= step2
            j += 1
    for (t, odd), cs in sorted(rings.items(), key=lambda kv: -kv[0][0]):
        cv.stroke(lam, cs, t, 110 if odd else 255)
    by_w: dict[int, list[np.ndarray]] = {}
    for c, w in zip(pieces, widths, strict=True):
        by_w.setdefault(max(int(round(w)), 1), []).append(c)
    for t, cs in by_w.items():
        cv.stroke(bone, cs, t, 255)
    # plates: lobulated outlines filled with concentric shrunken copies
    plates = []
    n_pl = min((0, 1, 1, 2, 3)[int(rng.integers(0, 5))], len(nodes))
    for px_, py_ in nodes[rng.permutation(len(nodes))[:n_pl]]:
        poly = _star(
            rng,
            px_,
            py_,
            cv.px(rng.uniform(18, 60) * scale),
            0.45,
            0.01,
            60,
            rng.uniform(0.6, 1.6),
            rng.uniform(0, 3),
        )
        cv.fill(bone, [poly], 255)
        r0 = float(np.linalg.norm(poly - [px_, py_], axis=1).mean())
        plates.append((px_, py_, r0))
        steps = max(int(r0 / period), 1)
        for j, f in enumerate(np.linspace(1.0, 0.08, steps)):
            cv.fill(lam, [(poly - [px_, py_]) * f + [px_, py_]], 255 if j % 2 == 0 else 110)
    bone[~deep] = 0
    # concentric osteons in thick parts
    canals = []
    din = cv2.distanceTransform(_u8(bone > 127), cv2.DIST_L2, 3)
    if din.max() > cv.px(10) and rng.random() < 0.5:
        for ox, oy in cv.pick(din > cv.px(9), int(rng.integers(1, 3))):
            rr = min(float(din[int(oy), int(ox)]), cv.px(rng.uniform(15, 35)))
            j = 0
            t = rr
            while t > cv.px(3):
                cv2.circle(
                    lam,
                    (int(ox * 16), int(oy * 16)),
                    int(t * 16),
                    255 if j % 2 == 0 else 110,
                    -1,
                    cv.lt,
                    4,
                )
                t -= period
                j += 1
            canals.append((ox, oy, cv.px(rng.uniform(3, 7))))
    marrow = room & (bone < 128) & (cv.labels == 0)
    nuc = cv.blank()
    # marrow: fat or loose fibrovascular stroma with scattered cells
    if marrow.any():
        cv.put(marrow.astype(np.float32), "lumen")
        if rng.random() < 0.65:
            _fat(cv, marrow, (22, 55), nuc)
        else:
            cv.put(marrow.astype(np.float32) * 0.55, "ground", shade=1 + 0.15 * cv.medium)
        km = int(marrow.sum() / max(cv.px(rng.uniform(20, 40)) ** 2, 1))
        if km:
            _nuclei(cv, nuc, cv.pick(marrow, km), (2.2, 3.4), (1.8, 3.0), None, 0.1, 230)
    bone_a = cv.alpha(bone)
    tone = lam.astype(np.float32) / 255.0
    # H&E bone ranges from pale to deep pink; mineral stains stay strong
    bone_strength = float(rng.uniform(0.6, 1.25) if cv.stain == "he" else rng.uniform(0.92, 1.08))
    cv.put(bone_a, "bone", strength=bone_strength)
    cv.put(bone_a * (1 - tone) * rng.uniform(0.25, 0.75), "bone_alt", strength=bone_strength)
    # cement lines: thin scalloped dark lines inside the bone
    cement = cv.blank()
    kc = int(rng.integers(1, 5))
    cl = _curves(
        rng,
        cv.pick(bone > 127, kc),
        rng.uniform(0, math.pi, kc),
        cv.px(rng.uniform(20, 70)),
        max(cv.px(2), 1.2),
        0.6,
        cv.px(rng.uniform(8, 20)),
        0.1,
    )
    cv.stroke(cement, cl, 1, 255)
    cement[bone < 128] = 0
    cv.put(cv.alpha(cement, rng.uniform(0.5, 0.9)), "cement")
    lab = bone > 127
    # Haversian canals: a small vessel in a clear hole
    holes = cv.blank()
    for ox, oy, rc in canals:
        cv2.circle(holes, (int(ox * 16), int(oy * 16)), int(rc * 16), 255, -1, cv.lt, 4)
    # osteocytes: dark nuclei in pale lacunae, between the lamellae
    lac = cv.blank()
    ocy = cv.blank()
    spacing = cv.px(rng.uniform(20, 34))
    occ_p, occ_a = [], []
    pts_all = np.concatenate(skel)
    tan_all = np.concatenate([np.gradient(c, axis=0) for c in skel])
    w_all = np.concatenate(skel_w)
    m = int(rng.poisson(len(pts_all) * step / spacing * max(float(w_all.mean()) / cv.px(15), 1)))
    if m:
        idx = rng.integers(0, len(pts_all), m)
        tang = tan_all[idx] / (np.linalg.norm(tan_all[idx], axis=1, keepdims=True) + 1e-9)
        nrm = np.stack([-tang[:, 1], tang[:, 0]], 1)
        off = rng.uniform(-0.38, 0.38, (m, 1)) * w_all[idx, None]
        occ_p.append(pts_all[idx] + nrm * off + tang * rng.uniform(-0.5, 0.5, (m, 1)) * step)
        occ_a.append(np.arctan2(tang[:, 1], tang[:, 0]))
    for px_, py_, rp in plates:  # plates: osteocytes along their concentric lamellae
        m = int(rng.poisson((rp / spacing) ** 2 * 2.5))
        if m:
            t = rng.uniform(0, _TWO_PI, m)
            rr = rp * np.sqrt(rng.uniform(0.05, 0.8, m))
            occ_p.append(np.stack([px_ + rr * np.cos(t), py_ + rr * np.sin(t)], 1))
            occ_a.append(t + math.pi / 2)
    if occ_p:
        p = np.concatenate(occ_p)
        ang = np.concatenate(occ_a)
        # about one osteocyte per spacing^2 of bone, wherever the struts overlap
        keep = int(rng.poisson(lab.sum() / spacing**2))
        sel = rng.permutation(len(p))[:keep]
        p, ang = p[sel], ang[sel]
        _nuclei(cv, lac, p, (2.8, 4.2), (1.4, 2.1), ang, 0.05, 255)
        _nuclei(cv, ocy, p, (1.8, 2.8), (0.9, 1.3), ang, 0.05, 255)
    lac[~lab] = 0
    ocy[lac == 0] = 0
    # osteoid seam and osteoblast rim on part of the surface
    seam = cv.blank()
    obl = cv.blank()
    if rng.random() < 0.7:
        pts, nrm = _contour_points(_u8(lab), cv.px(rng.uniform(8.5, 12)), rng)
        if len(pts):
            anchor = pts[int(rng.integers(len(pts)))]
            run = np.linalg.norm(pts - anchor, axis=1) < cv.px(rng.uniform(20, 70))
            if run.sum() >= 2:
                for px_, py_ in pts[run]:
                    cv2.circle(
                        seam,
                        (int(px_ * 16), int(py_ * 16)),
                        int(cv.px(rng.uniform(1.5, 3)) * 16),
                        255,
                        -1,
                        cv.lt,
                        4,
                    )
                seam[~lab] = 0
                p = pts[run] + nrm[run] * cv.px(rng.uniform(3.0, 4.5))
                ang = np.arctan2(nrm[run][:, 1], nrm[run][:, 0])
                _nuclei(cv, obl, p, (2.6, 3.3), (1.7, 2.2), ang, 0.08, 255)
                obl[lab] = 0
    cv.put(cv.alpha(seam, 0.9), "osteoid")
    cv.put(cv.alpha(lac), "lumen")
    cv.put(cv.alpha(holes), "lumen")
    nuc |= ocy
    nuc |= obl
    for ox, oy, rc in canals:
        _nuclei(cv, nuc, np.array([[ox + rc * 0.5, oy]]), 3.0, 1.1, 1.57, 0.05, 230)
    _paint_nuclei(cv, nuc)
    cv.labels[lab] = BONE
    cv.labels[(lac > 127) | (seam > 127) | (holes > 127)] = BACKGROUND


def _gout(cv: _Canvas, lay: _Layout, scale: float) -> None:
    rng = cv.rng
    L = cv.side_um
    deep = lay.deep
    toph = cv.blank()
    for x, y in cv.pick(deep, int(rng.integers(1, 3))):
        r = cv.px(rng.uniform(0.18, 0.45) * L * scale + 8)
        cv.fill(
            toph,
            [
                _star(
                    rng,
                    x,
                    y,
                    r,
                    rng.uniform(0.2, 0.5),
                    0.015,
                    80,
                    rng.uniform(0.75, 1.3),
                    rng.uniform(0, math.pi),
                )
            ],
        )
    toph[~deep] = 0
    tm = toph > 127
    if not tm.any():
        return
    # palisade of histiocytes and giant cells round the tophus
    rim_w = cv.px(rng.uniform(10, 26))
    dil = cv2.dilate(_u8(tm), _disk(rim_w))
    free = deep & (cv.labels == 0)
    rim = (dil > 0) & ~tm & free
    cv.put(
        rim.astype(np.float32) * rng.uniform(0.7, 0.95),
        "histiocyte",
        shade=1 + 0.1 * cv.medium.T,
    )
    pts, nrm = _contour_points(_u8(tm), cv.px(rng.uniform(5.5, 8.0)), rng)
    nm = cv.blank()
    if len(pts):
        rows = int(rng.integers(1, 3))
        for row in range(rows):
            off = rim_w * (0.22 + 0.45 * row + rng.uniform(-0.06, 0.06, (len(pts), 1)))
            p = pts + nrm * off + rng.normal(0, cv.px(0.8), pts.shape)
            ang = np.arctan2(nrm[:, 1], nrm[:, 0])  # long axis pointing at the tophus
            _nuclei(cv, nm, p, (4.5, 7.0), (1.3, 1.8), ang, 0.06, 220)
        nm[~rim] = 0
    cv.put(cv.alpha(nm), "nucleus", shade=cv.speckle)
    if len(pts) and rng.random() < 0.7:
        sel = rng.permutation(len(pts))[: int(rng.integers(1, 4))]
        _giant_cells(cv, pts[sel], nrm[sel], free & ~tm)
    # urate: pale pink-grey, feathery strokes in sheaves, needle-shaped clefts
    ta = tm.astype(np.float32)
    cv.put(ta, "urate", shade=1 + 0.12 * cv.medium)
    area = tm.sum()
    ns = max(1, int(area / max(cv.px(rng.uniform(20, 40)) ** 2, 1)))
    feather = cv.blank()
    needles = cv.blank()
    centres = cv.pick(tm, ns)
    for cx, cy in centres:
        phi = rng.uniform(0, math.pi)
        m = int(rng.integers(8, 26))
        radiate = rng.random() < 0.5
        a = (
            phi
            + rng.normal(0, rng.uniform(0.06, 0.45), m)
            + (math.pi * (np.arange(m) % 2) if radiate else 0)
        )
        ln = cv.px(1.0) * rng.uniform(8, 35, m)
        if radiate:
            x0, y0 = np.full(m, cx), np.full(m, cy)
        else:
            off = rng.normal(0, cv.px(7), m)
            x0 = cx - off * math.sin(phi) - ln / 2 * np.cos(a)
            y0 = cy + off * math.cos(phi) - ln / 2 * np.sin(a)
        seg = np.stack(
            [np.stack([x0, y0], 1), np.stack([x0 + ln * np.cos(a), y0 + ln * np.sin(a)], 1)], 1
        )
        is_cleft = rng.random(m) < 0.45
        cv.stroke(needles, seg[is_cleft], max(cv.px(rng.uniform(0.6, 1.4)), 1), 255)
        cv.stroke(feather, seg[~is_cleft], max(cv.px(rng.uniform(0.8, 2.0)), 1), 255)
    cv.put(cv.alpha(feather, rng.uniform(0.35, 0.7)) * ta, "urate_streak")
    cv.put(cv.alpha(needles, rng.uniform(0.8, 1.0)) * ta, "glass")
    cv.labels[tm] = URATE


def _amyloidosis(cv: _Canvas, lay: _Layout, scale: float) -> None:
    rng = cv.rng
    L = cv.side_um
    deep = lay.deep
    if rng.random() < 0.55:  # lichen / macular: small globules
        k = int(rng.integers(2, 8))
        radii = cv.px(1.0) * rng.uniform(7, 26, k) * scale
    else:  # nodular: large confluent masses
        k = int(rng.integers(1, 3))
        radii = cv.px(1.0) * (rng.uniform(0.2, 0.45, k) * L * scale + 6)
    if lay.kind == "surface" and rng.random() < 0.85:
        band = deep & (lay.depth < lay.dej + 20 + 0.3 * L * scale)
        centres = cv.pick(band if band.any() else deep, k)
    else:
        centres = cv.pick(lay.dermis if lay.dermis.any() else deep, k)
    glob = cv.blank()
    for (x, y), r in zip(centres, radii, strict=True):
        cv.fill(
            glob,
            [
                _star(
                    rng,
                    x,
                    y,
                    r,
                    rng.uniform(0.1, 0.35),
                    0.004,
                    64,
                    rng.uniform(0.8, 1.3),
                    rng.uniform(0, math.pi),
                )
            ],
        )
    glob[~deep] = 0
    gm = glob > 127
    if not gm.any():
        return
    # homogeneous and waxy: only a faint, very smooth variation
    cv.put(cv.alpha(glob), "amyloid", shade=1 + 0.04 * cv.broad[::-1])
    # retraction clefts along part of the margin
    if rng.random() < 0.85:
        pts, _ = _contour_points(_u8(gm), 1.0, rng)
        if len(pts) > 8:
            cleft = cv.blank()
            j0 = int(rng.integers(0, len(pts)))
            ln = int(len(pts) * rng.uniform(0.15, 0.5))
            arc = pts[np.arange(j0, j0 + ln) % len(pts)]
            d = np.linalg.norm(np.diff(arc, axis=0), axis=1)
            pieces = np.split(arc, np.flatnonzero(d > 3) + 1)
            cv.stroke(
                cleft, [p for p in pieces if len(p) > 2], max(cv.px(rng.uniform(1.0, 2.5)), 1), 255
            )
            cleft[gm | ~deep | (cv.labels != 0)] = 0
            cv.put(cv.alpha(cleft), "lumen")
    # fissures
    k = int(rng.integers(1, 6)) + int(gm.sum() / max(cv.px(60) ** 2, 1))
    lines = _jagged(cv, cv.pick(gm, k), rng.uniform(15, 50) * scale, rng.uniform(0.15, 0.4))
    fis = cv.blank()
    cv.stroke(fis, lines, max(cv.px(rng.uniform(0.7, 1.6)), 1), 255)
    fis[~gm] = 0
    cv.put(cv.alpha(fis, rng.uniform(0.7, 1.0)), "lumen")
    # very few nuclei
    kn = int(rng.integers(0, 3))
    m = cv.blank()
    if kn:
        _nuclei(cv, m, cv.pick(gm, kn), (3.5, 5.0), (1.0, 1.5), None, 0.06, 230)
        m[~gm] = 0
        cv.put(cv.alpha(m), "nucleus", shade=cv.speckle)
    cv.labels[gm] = AMYLOID
    cv.labels[(fis > 127) | (m > 127)] = BACKGROUND


_LESIONS = {
    "calcinosis_cutis": _calcinosis,
    "osteoma_cutis": _osteoma,
    "gout": _gout,
    "amyloidosis": _amyloidosis,
}


# ---------------------------------------------------------------------------
# Slide preparation and scanner
# ---------------------------------------------------------------------------


def _scanner(rng: np.random.Generator, shift: float) -> dict:
    """Per-patch preparation and scanner settings; ``shift`` pushes them out of range."""
    return {
        "thickness": rng.uniform(0.05, 0.12),
        "grain": rng.uniform(0.0, 0.16) if rng.random() < 0.7 else 0.0,
        "ramp": rng.uniform(0.0, 0.07) + 0.1 * shift,
        "gain": rng.uniform(0.97, 1.03) - 0.05 * shift * rng.random(),
        "cast": rng.normal(0, 0.012, 3) + shift * rng.normal(0, 0.05, 3),
        "blur_kind": _pick_one(rng, ("none", "gauss", "box"), (0.35, 0.45, 0.2)),
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


def _finish(cv: _Canvas, lay: _Layout, sc: dict, shift: float) -> np.ndarray:
    rng = cv.rng
    n = cv.n
    g = cv.pal[0]
    rgb = cv2.merge([cv.rgb[0], cv.rgb[1], cv.rgb[2]])
    # section thickness: tissue colour a little stronger or weaker in broad areas
    thick = 1 + sc["thickness"] * cv.broad.T[::-1]
    if sc["grain"] > 0:  # fine cellular grain of the section
        thick = thick * (1 + sc["grain"] * (0.5 - cv.cells(rng.uniform(1.5, 4.0))))
    if sc["chatter"]:  # knife chatter: parallel bands of varying thickness
        a = rng.uniform(0, math.pi)
        proj = (cv.xx * math.cos(a) + cv.yy * math.sin(a)) / cv.ppu
        thick = thick * (1 + rng.uniform(0.08, 0.2) * np.sin(_TWO_PI * proj / rng.uniform(8, 30)))
    if sc["fold"]:  # a fold: a band where the section lies double
        a = rng.uniform(0, math.pi)
        x0, y0 = rng.uniform(0, n, 2)
        dist = np.abs((cv.xx - x0) * math.sin(a) - (cv.yy - y0) * math.cos(a))
        half = cv.px(rng.uniform(3, 12))
        band = np.clip((half - dist) / max(cv.px(1.5), 1.0) + 0.5, 0, 1)
        thick = thick * (1 + rng.uniform(0.4, 0.8) * band)
    rgb = g - (g - rgb) * thick[:, :, None]
    if sc["bubble"]:
        x0, y0 = rng.uniform(0, n, 2)
        r = cv.px(rng.uniform(10, 40))
        d = np.sqrt((cv.xx - x0) ** 2 + (cv.yy - y0) ** 2)
        rim = np.abs(d - r) < max(cv.px(1.0), 0.8)
        rgb = np.where((d < r)[:, :, None], g - (g - rgb) * 0.8, rgb)
        rgb[rim] = rgb[rim] * 0.45
    # illumination: a linear ramp across the field, a gain and a colour cast
    a = rng.uniform(0, _TWO_PI)
    ramp = ((cv.xx - n / 2) * math.cos(a) + (cv.yy - n / 2) * math.sin(a)) / n
    light = sc["gain"] * (1 - sc["ramp"] * (ramp + 0.5))
    cast = np.exp(np.asarray(sc["cast"], np.float32))
    rgb = rgb * light[:, :, None] * cast[None, None, :]
    # optics
    if sc["blur_kind"] == "gauss" or (shift > 0 and sc["blur_kind"] == "none"):
        rgb = cv2.GaussianBlur(
            rgb, (0, 0), sc["blur"] if sc["blur_kind"] != "none" else 0.6 * shift
        )
    elif sc["blur_kind"] == "box":
        k = 2 + int(sc["blur"] > 1.2)
        rgb = cv2.blur(rgb, (k, k))
    if sc["resample"] and n >= 32:
        f = rng.uniform(0.55, 0.85) - 0.15 * shift
        m = max(int(n * max(f, 0.35)), 8)
        rgb = cv2.resize(
            cv2.resize(rgb, (m, m), interpolation=cv2.INTER_AREA),
            (n, n),
            interpolation=cv2.INTER_LINEAR,
        )
    # sensor noise, larger in bright pixels (shot noise) plus a floor
    # (uniform, unit variance: indistinguishable after blur and JPEG, and much
    # cheaper to draw than Gaussian noise)
    noise = (rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(3.4641)
    rgb = rgb + noise * (sc["noise"] * np.sqrt(np.maximum(rgb, 0)) + 0.6)
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if sc["jpeg"]:
        ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, sc["jpeg"]])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def render_patch_b(
    label: str,
    stain: str,
    seed: int,
    size: int = 128,
    shift: float = 0.0,
    *,
    mpp: float = _NOMINAL_MPP,
) -> tuple[np.ndarray, np.ndarray]:
    """One style-B patch: (RGB uint8 (size, size, 3), deposit labels uint8 (size, size)).

    Same contract as :func:`calcinosis.training.synthetic.render_patch`:
    deterministic in its arguments, geometry in microns at ``mpp``, ``shift``
    0 for the training lab and 1 for a clearly different one. A lesion patch
    has at least ~6% of its pixels labelled with its deposit; ``normal`` has
    none.
    """
    ci, si = check_patch_args(label, stain, int(size), float(shift), float(mpp))
    n = int(size)
    shift = float(shift)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, STYLE_B_VERSION, _SALT])
    pal = _sample_palette(rng, stain, shift)
    cv = _Canvas(rng, n, float(mpp), pal, stain)
    lay = _Layout(cv, label)
    _base_tissue(cv, lay)
    if label in _LESIONS:
        need = 0.06 * n * n
        draw = _LESIONS[label]
        scale = 1.0
        for _ in range(6):
            draw(cv, lay, scale)
            if np.count_nonzero(cv.labels) >= need:
                break
            scale *= 1.3
        cv.labels[lay.glass] = BACKGROUND
    sc = _scanner(rng, shift)
    rgb = _finish(cv, lay, sc, shift)
    return rgb, cv.labels
