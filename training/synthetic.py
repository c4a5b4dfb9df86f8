"""Procedural skin histology with exact deposit labels.

No public dataset of calcinosis cutis and its mimics exists, so the project
renders its own: patches of epidermis, dermis and subcutis in which the
deposit of each class is drawn with the structure a pathologist uses to tell
them apart (amorphous cracked calcium, lamellar bone with osteocytes, feathery
urate with needle clefts and a histiocyte palisade, homogeneous fissured
amyloid), together with the pixel label map.

How a patch is made:

1. *Tissue components.* Every component (chromatin, collagen/cytoplasm,
   keratin, red cells, calcium salt, bone matrix, cement lines, osteoid,
   urate, amyloid, histiocyte cytoplasm, debris) is a float32 concentration
   map. Geometry is designed in microns and converted with ``mpp`` so a
   nucleus is always ~7 um wide, a fat cell 40-90 um, whatever the patch size.
2. *Staining.* Each stain binds dyes to components (haematoxylin/eosin;
   silver + nuclear fast red; alizarin + a light haematoxylin counterstain).
   Dye optical densities are jittered per patch (amount and hue), as labs do.
3. *Optics (Beer-Lambert).* ``I = I0 * exp(-sum_k c_k * OD_k)`` with an
   unevenly lit background ``I0``, then folds/bubbles, blur, sensor noise and
   JPEG compression.

Colour alone never gives the class: calcium and bone are both black in von
Kossa and red in Alizarin, urate and amyloid are both pale pink in H&E, and
the amount of epidermis, dermis and fat varies independently of the class.
``shift`` > 0 moves the staining and scanner settings outside the training
range (another lab).

Determinism: a patch depends only on ``(label, stain, seed, size, shift)``;
``generate_dataset`` derives each patch's seed from ``(seed, i)`` and writes
byte-identical files whatever the number of worker processes.

Regions (``render_region``) stand in for an area exported from a slide, for
tiling, tissue detection and speed tests: a grid of tiles drawn by the same
code, but cut out of one section. The skin surface, the layer depths,
collagen density, fat septa, section thickness, lighting and the lab's
staining are shared across the region, so layers run on from tile to tile;
the section's outline leaves bare glass above the surface and beyond its
cut edges; a few tiles hold a nodule of a deposit class. Neighbouring tiles
are rendered with a margin and cross-faded, and each pixel keeps the label of
its own tile.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calcinosis.model.errors import ConfigError, DataError
from calcinosis.model.fileio import atomic_path, atomic_write_text
from calcinosis.model.labels import (
    AMYLOID,
    BONE,
    CALCIUM,
    CLASS_NAMES,
    DEPOSIT_COLORS,
    DEPOSIT_LABELS,
    STAIN_NAMES,
    URATE,
)

__all__ = [
    "NOMINAL_MPP",
    "GENERATOR_VERSION",
    "render_patch",
    "check_patch_args",
    "render_supersampled",
    "supersample_factor",
    "patch_seed",
    "generate_dataset",
    "assign_synthetic_splits",
    "contact_sheet",
    "make_fixtures",
    "DEPOSIT_CLASSES",
    "GLASS",
    "RegionPlan",
    "plan_region",
    "render_plan",
    "render_region",
    "region_metadata",
    "parse_region_size",
    "run_synth",
]

#: Microns per pixel of generated patches (a 20x scan).
NOMINAL_MPP = 0.5
#: Bumped whenever the rendering changes, so cached datasets can be told apart.
GENERATOR_VERSION = 3

MANIFEST_COLUMNS = ("path", "label", "stain", "mask_path", "split", "mpp", "style")
#: Rendering styles: ``a`` (this module: component concentrations through
#: Beer-Lambert optics), ``b`` (:mod:`.synthetic_b`: other primitives, textures
#: and a painted rendering of the same tissue model) and ``mix`` (every other
#: patch of each class and stain in each style).
STYLES = ("a", "b", "mix")
SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))

# ---------------------------------------------------------------------------
# Components and dyes
# ---------------------------------------------------------------------------

COMPONENTS = (
    "nuclei",  # chromatin
    "stroma",  # collagen and ordinary cytoplasm
    "keratin",
    "rbc",
    "calcium",  # calcium phosphate / carbonate salts
    "bone",  # mineralised bone matrix
    "cement",  # cement / reversal lines in bone (mineralised, basophilic)
    "osteoid",  # unmineralised bone matrix seam
    "urate",
    "amyloid",
    "histio",  # histiocyte and giant-cell cytoplasm
    "debris",  # dust, precipitate, bubble rims
)
(
    NUC,
    STROMA,
    KERATIN,
    RBC,
    CALC,
    BONEM,
    CEMENT,
    OSTEOID,
    URATEM,
    AMYL,
    HISTIO,
    DEBRIS,
) = range(len(COMPONENTS))

# RGB optical density of one unit of each dye. Haematoxylin absorbs red and
# green (blue-purple), eosin mostly green (pink), silver everything (brown-black,
# red passing a little more), alizarin-calcium green and blue (orange-red).
DYES = ("haematoxylin", "eosin", "haemoglobin", "nuclear_fast_red", "silver", "alizarin", "neutral")
_DYE_OD = np.array(
    [
        [0.62, 0.80, 0.30],  # haematoxylin
        [0.07, 0.90, 0.40],  # eosin
        [0.06, 0.95, 0.85],  # haemoglobin (red cells)
        [0.10, 0.90, 0.62],  # nuclear fast red
        [0.85, 0.98, 1.10],  # reduced silver (brown-black)
        [0.04, 0.80, 1.05],  # alizarin red S calcium chelate
        [0.60, 0.60, 0.60],  # neutral grey (debris, unstained density)
    ],
    dtype=np.float64,
)
_H, _E, _HB, _NFR, _AG, _AR, _GREY = range(len(DYES))

# Which dyes each component binds, per stain: {component: {dye: amount}}.
_BINDING: dict[str, dict[int, dict[int, float]]] = {
    "he": {
        NUC: {_H: 1.55, _E: 0.10},
        STROMA: {_E: 0.55, _H: 0.03},
        KERATIN: {_E: 0.45, _GREY: 0.04},
        RBC: {_HB: 1.10},
        CALC: {_H: 1.45, _E: 0.22, _GREY: 0.12},  # deeply basophilic
        BONEM: {_E: 1.00, _H: 0.05},  # strongly eosinophilic
        CEMENT: {_H: 0.90, _E: 0.4},
        OSTEOID: {_E: 0.62},
        URATEM: {_E: 0.17, _H: 0.06, _GREY: 0.11},  # pale pink-grey
        AMYL: {_E: 0.28, _H: 0.05, _GREY: 0.10},  # pale, greyer than collagen, waxy
        HISTIO: {_E: 0.33, _H: 0.06},
        DEBRIS: {_GREY: 1.0},
    },
    "von_kossa": {
        NUC: {_NFR: 1.25},
        STROMA: {_NFR: 0.20, _GREY: 0.03},
        KERATIN: {_NFR: 0.14, _GREY: 0.06},
        RBC: {_HB: 0.35, _NFR: 0.05},
        CALC: {_AG: 2.10},  # black
        BONEM: {_AG: 1.85},  # mineralised bone is black too
        CEMENT: {_AG: 2.10},
        OSTEOID: {_NFR: 0.30},  # unmineralised: counterstain only
        URATEM: {_GREY: 0.13},  # negative / faint grey
        AMYL: {_NFR: 0.10, _GREY: 0.08},  # negative: pale grey-pink, glassy
        HISTIO: {_NFR: 0.15},
        DEBRIS: {_AG: 0.7},  # silver precipitate
    },
    "alizarin_red": {
        NUC: {_H: 0.45},  # light counterstain
        STROMA: {_AR: 0.05, _H: 0.05, _GREY: 0.07},
        KERATIN: {_AR: 0.04, _GREY: 0.06},
        RBC: {_HB: 0.35},
        CALC: {_AR: 1.85},  # orange-red
        BONEM: {_AR: 1.45},  # bone red as well
        CEMENT: {_AR: 1.85},
        OSTEOID: {_AR: 0.08, _GREY: 0.06},
        URATEM: {_GREY: 0.11},  # negative: unstained grey, texture only
        AMYL: {_GREY: 0.10, _H: 0.03, _AR: 0.02},  # negative: glassy, unstained
        HISTIO: {_AR: 0.04, _GREY: 0.05},
        DEBRIS: {_GREY: 0.8},
    },
}


def _binding_matrix(stain: str) -> np.ndarray:
    w = np.zeros((len(COMPONENTS), len(DYES)), np.float64)
    for comp, dyes in _BINDING[stain].items():
        for dye, amount in dyes.items():
            w[comp, dye] = amount
    return w


_BINDING_MATRICES = {s: _binding_matrix(s) for s in STAIN_NAMES}


def _rotate_hue(od: np.ndarray, angle: float) -> np.ndarray:
    """Rotate OD vectors about the grey axis: a hue change that keeps density."""
    k = np.full(3, 1.0 / math.sqrt(3.0))
    c, s = math.cos(angle), math.sin(angle)
    rot = (
        c * np.eye(3)
        + s * np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        + (1 - c) * np.outer(k, k)
    )
    return np.clip(od @ rot.T, 0.0, None)


# ---------------------------------------------------------------------------
# Small drawing and noise helpers
# ---------------------------------------------------------------------------

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _GRIDS:
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        _GRIDS[n] = (xx, yy)
    return _GRIDS[n]


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Scene:
    """Concentration maps of one patch plus its label map, in pixel space."""

    def __init__(self, rng: np.random.Generator, size: int, mpp: float) -> None:
        self.rng = rng
        self.n = size
        self.ppu = 1.0 / mpp  # pixels per micron
        self.c = np.zeros((len(COMPONENTS), size, size), np.float32)
        self.labels = np.zeros((size, size), np.uint8)
        self.xx, self.yy = _grid(size)
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


def _uint8_mask(m: np.ndarray) -> np.ndarray:
    return (m > 0.5).astype(np.uint8)


def _distance(m: np.ndarray) -> np.ndarray:
    """Pixels to the nearest zero of the uint8 mask ``m`` (cv2.distanceTransform).

    A mask without zeros has none to measure to: OpenCV then returns ~FLT_MAX,
    which overflows the sines drawn from it; no pixel is farther than two sides.
    """
    d = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    return np.minimum(d, 2.0 * float(max(m.shape)), out=d)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels to the mask boundary: negative inside, positive outside."""
    m = _uint8_mask(mask)
    return _distance(1 - m) - _distance(m)


def _gradient_dir(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = cv2.GaussianBlur(field.astype(np.float32), (0, 0), 1.5)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    norm = np.sqrt(gx * gx + gy * gy) + 1e-6
    return gx / norm, gy / norm


def _boundary_points(mask: np.ndarray, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Points every ~spacing px along the mask outline, away from the patch border."""
    m = _uint8_mask(mask)
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


def _blob_field(
    sc: _Scene, centres: np.ndarray, radii: Sequence[float], rough: float, scale_um: float
):
    """Signed 'inside-ness' in px of a union of lobulated blobs (>0 inside)."""
    f = np.full((sc.n, sc.n), -1e6, np.float32)
    for (cx, cy), r in zip(centres, radii, strict=True):
        d = np.sqrt((sc.xx - cx) ** 2 + (sc.yy - cy) ** 2)
        f = np.maximum(f, r - d)
    return f + rough * sc.noise(scale_um)


def _poisson_points(
    sc: _Scene, mask: np.ndarray, spacing: float, max_n: int, tries: int = 4
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


def _voronoi(sc: _Scene, spacing: float, warp_um: float) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------
# Ordinary skin: epidermis, dermis, subcutis, vessels, adnexa
# ---------------------------------------------------------------------------


class _Layout:
    """Depth (um below the skin surface) of every pixel, and region masks."""

    # set only for region tiles: collagen density map and fat septa from the region
    collagen: np.ndarray | None = None
    septa: np.ndarray | None = None

    def __init__(self, sc: _Scene, label: str, ctx: _TileContext | None = None) -> None:
        if ctx is not None:
            self._from_region(ctx)
            return
        rng = sc.rng
        n = sc.n
        self.theta = rng.uniform(0, 2 * math.pi)  # direction of increasing depth
        nx, ny = math.cos(self.theta), math.sin(self.theta)
        half_um = n / 2 / sc.ppu
        self.keratin = rng.uniform(4, 16)
        self.epidermis = rng.uniform(18, 40)
        self.dej = self.keratin + self.epidermis  # dermo-epidermal junction
        p_epi = 0.45 if label == "amyloidosis" else 0.22
        kind = rng.choice(
            ["epidermis", "dermis", "junction", "subcutis"],
            p=[p_epi, *(np.array([0.45, 0.13, 0.20]) * (1 - p_epi) / 0.78)],
        )
        self.kind = str(kind)
        self.papillary = rng.uniform(20, 45)
        if self.kind == "epidermis":
            centre = self.dej + rng.uniform(-0.3, 0.6) * half_um
            self.subcutis = 1e6
        elif self.kind == "dermis":
            centre = 500.0
            self.subcutis = 1e6
        elif self.kind == "junction":
            centre = 500.0
            self.subcutis = centre + rng.uniform(-0.6, 0.6) * half_um
        else:
            centre = 1000.0
            self.subcutis = 800.0
        proj = ((sc.xx - n / 2) * nx + (sc.yy - n / 2) * ny) / sc.ppu
        self.depth = centre + proj + rng.uniform(2, 6) * sc.noise(25)
        self.depth_deep = self.depth + rng.uniform(8, 25) * sc.noise(40)
        self.glass = self.depth < 0
        self.epi = (self.depth >= 0) & (self.depth < self.dej)
        self.fat = self.depth_deep >= self.subcutis
        self.dermis = ~self.glass & ~self.epi & ~self.fat
        # where deposits may lie: below the epidermis
        self.deep = ~self.glass & ~self.epi

    def _from_region(self, ctx: _TileContext) -> None:
        """Take depth and layer thicknesses from the region, so layers run on across tiles."""
        self.theta = ctx.theta
        self.keratin = ctx.keratin
        self.epidermis = ctx.epidermis
        self.dej = self.keratin + self.epidermis
        self.papillary = ctx.papillary
        self.subcutis = ctx.subcutis
        self.depth = ctx.depth
        self.depth_deep = ctx.depth_deep
        self.glass = (self.depth < 0) | ctx.outside
        self.epi = ~self.glass & (self.depth < self.dej)
        self.fat = ~self.glass & (self.depth_deep >= self.subcutis)
        self.dermis = ~self.glass & ~self.epi & ~self.fat
        self.deep = ~self.glass & ~self.epi
        self.collagen = ctx.collagen
        self.septa = ctx.septa
        if self.epi.any():
            self.kind = "epidermis"
        elif self.fat.any():
            self.kind = "junction" if self.dermis.any() else "subcutis"
        else:
            self.kind = "dermis"


def _streaks(sc: _Scene, ang: float, length_um: float, dx=None, dy=None) -> np.ndarray:
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


def _collagen(sc: _Scene, lay: _Layout, region: np.ndarray) -> None:
    """Wavy collagen bundles with clefts, finer in the papillary dermis; fibroblasts."""
    rng = sc.rng
    ang = lay.theta + math.pi / 2 + rng.normal(0, 0.35)  # bundles run roughly parallel to surface
    ca, sa = math.cos(ang), math.sin(ang)
    warp = rng.uniform(4, 12) * sc.style["coll_warp"]
    dx = sc.noise(30) * sc.px(warp)
    dy = sc.noise(30) * sc.px(warp)
    u = (sc.xx + dx) * (-sa) + (sc.yy + dy) * ca  # across bundles
    period = sc.px(rng.uniform(8, 20) * sc.style["coll_period"])
    s = np.sin(2 * np.pi * u / period + 0.6 * sc.noise(15))
    along = sc.noise(12)
    cleft = _smoothstep(s, 0.72, 0.95) * _smoothstep(along, -0.6, 0.4)
    fibril = 0.13 * _streaks(sc, ang, 6.0, dx, dy)
    dense = rng.uniform(0.6, 1.0)
    if lay.collagen is not None:  # a region tile: density varies smoothly over the region
        dense = lay.collagen
    # loose to sclerotic: dense collagen is as eosinophilic as bone, in every class
    dense = dense * sc.style["coll_density"]
    coll = dense * (0.92 + fibril + 0.06 * sc.noise(8)) * (1 - 0.9 * cleft)
    # papillary dermis: looser, finer, paler
    pap = _smoothstep(lay.dej + lay.papillary - lay.depth, -5, 5)
    fine = 0.55 + 0.25 * np.abs(sc.fine_noise(1.5)).clip(0, 2) / 2
    coll = coll * (1 - pap) + pap * fine * dense * 0.8
    sc.c[STROMA] += region * np.clip(coll, 0, 1.4)
    # fibroblast nuclei, elongated along the bundles
    area_um2 = region.mean() * (sc.n / sc.ppu) ** 2
    k = rng.poisson(area_um2 / rng.uniform(500, 1200))
    for x, y in sc.sample_in(region, k) if k else []:
        sc.ellipse(
            NUC,
            x,
            y,
            sc.px(rng.uniform(4.5, 8)),
            sc.px(rng.uniform(1.1, 1.9)),
            math.degrees(ang) + rng.normal(0, 12),
            rng.uniform(0.75, 1.0),
        )


def _fat(sc: _Scene, region: np.ndarray, cell_um: tuple[float, float] = (40, 90)) -> None:
    """Adipocytes: clear polygonal cells with thin pink septa and flat nuclei."""
    rng = sc.rng
    spacing = sc.px(rng.uniform(*cell_um))
    _, border = _voronoi(sc, spacing, warp_um=rng.uniform(1, 4))
    width = sc.px(rng.uniform(0.4, 0.9))
    memb = np.clip(cv2.GaussianBlur(border, (0, 0), width) * (1.2 + 2.0 * width), 0, 1)
    sc.c[STROMA] *= 1 - region  # fat displaces collagen
    sc.c[STROMA] += region * memb * rng.uniform(0.6, 0.95)
    # a few flattened nuclei sitting on the membranes
    on = (memb > 0.6) & (region > 0.5)
    length_px = on.sum() / (1.0 + 2 * width)
    k = rng.poisson(length_px / sc.px(70))
    gx, gy = _gradient_dir(memb)
    for x, y in sc.sample_in(on, k) if k else []:
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(gy[yi, xi], gx[yi, xi])) + 90
        sc.ellipse(NUC, x, y, sc.px(rng.uniform(4, 6)), sc.px(1.0), ang, rng.uniform(0.7, 0.95))


def _vessel(sc: _Scene, x: float, y: float) -> None:
    """A small vessel: endothelium around a lumen full of red cells."""
    rng = sc.rng
    r = sc.px(rng.uniform(4, 11))
    aspect = rng.uniform(1.0, 2.2)
    ang = rng.uniform(0, 180)
    wall = sc.px(rng.uniform(1.5, 4))
    ring = np.zeros((sc.n, sc.n), np.float32)
    cv2.ellipse(
        ring,
        (int(x * 16), int(y * 16)),
        (int((r + wall) * aspect * 16), int((r + wall) * 16)),
        ang,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_8,
        4,
    )
    lumen = np.zeros_like(ring)
    cv2.ellipse(
        lumen,
        (int(x * 16), int(y * 16)),
        (int(r * aspect * 16), int(r * 16)),
        ang,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_8,
        4,
    )
    sc.paint(STROMA, ring, 0.9)
    sc.clear(lumen)
    # endothelial nuclei: flat, along the wall
    for t in rng.uniform(0, 2 * math.pi, rng.integers(2, 6)):
        ca, sa = math.cos(t), math.sin(t)
        a = math.radians(ang)
        ex, ey = (r + wall / 2) * aspect * ca, (r + wall / 2) * sa
        px_ = x + ex * math.cos(a) - ey * math.sin(a)
        py_ = y + ex * math.sin(a) + ey * math.cos(a)
        tang = math.degrees(math.atan2(ey, ex)) + ang + 90
        sc.ellipse(NUC, px_, py_, sc.px(4), sc.px(1.1), tang, 0.9)
    # red cells
    fill = rng.uniform(0.2, 0.9)
    k = int(fill * (r * r * aspect) / sc.px(3.5) ** 2)
    pts = sc.sample_in(lumen > 0.5, k) if k else []
    for px_, py_ in pts:
        rr = sc.px(rng.uniform(3.0, 3.8))
        sc.ellipse(RBC, px_, py_, rr, rr * rng.uniform(0.6, 1.0), rng.uniform(0, 180), 0.9)
        sc.ellipse(RBC, px_, py_, rr * 0.4, rr * 0.35, 0, 0.55)


def _gland(sc: _Scene, x: float, y: float) -> None:
    """An eccrine-gland-like tubule cross-section (ring of cuboidal cells)."""
    rng = sc.rng
    r_out = sc.px(rng.uniform(12, 20))
    r_in = r_out * rng.uniform(0.25, 0.45)
    d = np.sqrt((sc.xx - x) ** 2 + (sc.yy - y) ** 2)
    ring = ((d < r_out) & (d >= r_in)).astype(np.float32)
    sc.paint(HISTIO, ring, rng.uniform(0.8, 1.2))
    sc.clear((d < r_in).astype(np.float32))
    k = int(2 * math.pi * (r_in + r_out) / 2 / sc.px(6))
    for t in np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 1):
        rr = (r_in + r_out) / 2 + rng.normal(0, 0.1) * (r_out - r_in)
        sc.ellipse(
            NUC,
            x + rr * math.cos(t),
            y + rr * math.sin(t),
            sc.px(3.2),
            sc.px(2.6),
            math.degrees(t),
            0.9,
        )


def _epidermis(sc: _Scene, lay: _Layout) -> None:
    """Keratin, keratinocytes (flattening upward), granular layer and basal row."""
    rng = sc.rng
    d = lay.depth
    # stratum corneum: basket-weave keratin lamellae
    ker = (d >= 0) & (d < lay.keratin)
    lam = np.sin(2 * np.pi * d / rng.uniform(1.5, 3.0) + 2.0 * sc.noise(6))
    sc.c[KERATIN] += ker * rng.uniform(0.7, 1.2) * _smoothstep(lam, -0.5, 0.3)
    viable = ((d >= lay.keratin) & (d < lay.dej)).astype(np.float32)
    spacing = sc.px(rng.uniform(8, 10.5))
    _, border = _voronoi(sc, spacing, warp_um=0.8)
    cyto = rng.uniform(0.6, 0.9) * (1 + 0.35 * cv2.GaussianBlur(border, (0, 0), 0.7))
    sc.c[STROMA] += viable * cyto
    # granular layer just under the keratin
    gran = (d >= lay.keratin) & (d < lay.keratin + rng.uniform(2, 5))
    dots = (sc.fine_noise(0.8) > 1.2) & gran
    sc.c[NUC] += dots * 0.9
    # keratinocyte nuclei, flattening towards the surface
    pts = _poisson_points(sc, viable > 0.5, spacing * 0.85, 500)
    along = math.degrees(lay.theta) + 90
    for x, y in pts:
        dd = lay.depth[int(y), int(x)]
        if dd > lay.dej - 4:
            continue
        frac = (dd - lay.keratin) / max(lay.epidermis, 1)
        r = sc.px(rng.uniform(2.8, 3.6))
        flat = 1 + 1.6 * (1 - frac) ** 3
        sc.ellipse(NUC, x, y, r * flat, r / flat, along + rng.normal(0, 10), rng.uniform(0.6, 0.85))
    # basal layer: a row of darker, columnar nuclei along the junction
    band = (d > lay.dej - 5) & (d < lay.dej - 1.5)
    for x, y in _poisson_points(sc, band, sc.px(6.5), 200):
        sc.ellipse(
            NUC, x, y, sc.px(3.8), sc.px(2.2), along + 90 + rng.normal(0, 12), rng.uniform(0.9, 1.1)
        )


def _base_tissue(sc: _Scene, lay: _Layout) -> None:
    rng = sc.rng
    dermis = lay.dermis.astype(np.float32)
    fat = lay.fat.astype(np.float32)
    if dermis.any():
        _collagen(sc, lay, dermis)
    if fat.any():
        _fat(sc, fat)
        # fibrous septa between lobules
        if lay.septa is not None:  # a region tile: septa run on across tiles
            sc.paint(STROMA, fat * lay.septa, 0.85)
        elif rng.random() < 0.5:
            x, y = sc.sample_in(lay.fat)[0]
            ang = rng.uniform(0, math.pi)
            dist = np.abs((sc.xx - x) * math.sin(ang) - (sc.yy - y) * math.cos(ang))
            sep = fat * _smoothstep(
                -dist + sc.px(rng.uniform(3, 10)) + sc.px(2) * sc.noise(10), -1, 1
            )
            sc.paint(STROMA, sep, 0.85)
    if lay.epi.any():
        _epidermis(sc, lay)
    region = ~lay.glass & ~lay.epi
    # vessels, adnexa, inflammation, haemorrhage: independent of the class
    for _ in range(rng.poisson(0.9)):
        x, y = sc.sample_in(region)[0]
        _vessel(sc, x, y)
    if rng.random() < 0.12 and lay.dermis.any():
        x, y = sc.sample_in(lay.dermis)[0]
        _gland(sc, x, y)
    if rng.random() < 0.2:
        _lymphocytes(sc, region)
    if rng.random() < 0.08:
        x, y = sc.sample_in(region)[0]
        r = sc.px(rng.uniform(8, 25))
        for px_, py_ in rng.normal([x, y], r, (int(rng.integers(10, 40)), 2)):
            rr = sc.px(rng.uniform(3.0, 3.8))
            sc.ellipse(RBC, px_, py_, rr, rr * rng.uniform(0.5, 1), rng.uniform(0, 180), 0.8)


def _lymphocytes(sc: _Scene, region: np.ndarray) -> None:
    """A cluster of small, round, dark lymphocytes (basophilic, but not calcium)."""
    rng = sc.rng
    x, y = sc.sample_in(region)[0]
    spread = sc.px(rng.uniform(6, 20))
    for px_, py_ in rng.normal([x, y], spread, (int(rng.integers(6, 30)), 2)):
        r = sc.px(rng.uniform(2.3, 3.2))
        sc.ellipse(
            NUC,
            px_,
            py_,
            r,
            r * rng.uniform(0.85, 1.0),
            rng.uniform(0, 180),
            rng.uniform(0.95, 1.2),
        )


# ---------------------------------------------------------------------------
# Deposits
# ---------------------------------------------------------------------------


def _crack_lines(
    sc: _Scene,
    mask: np.ndarray,
    k: int,
    width_px: tuple[float, float],
    wobble: float,
    length_um: float,
) -> np.ndarray:
    """Thin, sharp empty lines (sectioning cracks, fissures) limited to ``mask``."""
    rng = sc.rng
    canvas = np.zeros((sc.n, sc.n), np.uint8)
    for x, y in sc.sample_in(mask > 0.5, k) if k else []:
        ang = rng.uniform(0, 2 * math.pi)
        for direction in (0.0, math.pi):
            a = ang + direction
            px_, py_ = x, y
            pts = [(px_, py_)]
            steps = int(sc.px(rng.uniform(0.3, 1.0) * length_um) / 4) + 1
            for _ in range(steps):
                a += rng.normal(0, wobble)
                px_ += 4 * math.cos(a)
                py_ += 4 * math.sin(a)
                pts.append((px_, py_))
            poly = (np.asarray(pts) * 16).astype(np.int32)
            w = max(int(round(rng.uniform(*width_px))), 1)
            cv2.polylines(canvas, [poly], False, 255, w, cv2.LINE_AA, 4)
    return (canvas.astype(np.float32) / 255.0) * (mask > 0.5)


def _calcinosis(sc: _Scene, lay: _Layout) -> None:
    rng = sc.rng
    mode = rng.choice(["granular", "mass", "mixed"], p=[0.4, 0.4, 0.2])
    deep = lay.deep
    calc = np.zeros((sc.n, sc.n), np.float32)
    if mode in ("granular", "mixed"):
        # clusters of fine granules that merge into small amorphous plaques
        k = int(rng.integers(1, 4))
        centres = sc.sample_in(lay.dermis if lay.dermis.any() else deep, k)
        radii = [sc.px(rng.uniform(8, 35)) for _ in range(k)]
        clus = _blob_field(sc, centres, radii, sc.px(rng.uniform(3, 8)), 10)
        dens = _smoothstep(clus, -sc.px(6), sc.px(6))
        gran = np.zeros_like(calc)
        m = int(dens.sum() / sc.px(rng.uniform(2.5, 5)) ** 2)
        for x, y in sc.sample_in(dens > 0.2, m) if m else []:
            r = sc.px(rng.uniform(0.4, 2.0) ** 1.5)
            cv2.circle(
                gran,
                (int(x * 16), int(y * 16)),
                max(int(r * 16), 8),
                float(rng.uniform(0.6, 1.3)),
                -1,
                cv2.LINE_8,
                4,
            )
        dust = _smoothstep(sc.fine_noise(sc.px(0.6)), 0.8, 1.6) * dens
        plaque = _smoothstep(clus, sc.px(rng.uniform(3, 12)), sc.px(14))
        calc = np.maximum(calc, np.maximum(gran * (dens > 0.1), dust))
        calc = np.maximum(calc, plaque * (0.85 + 0.2 * sc.fine_noise(1.0)))
        calc *= deep
        sc.c[STROMA] *= 1 - 0.6 * np.clip(calc, 0, 1)
        sc.c[CALC] += calc
    if mode in ("mass", "mixed"):
        # large lobulated masses with sharp cracks
        k = int(rng.integers(1, 4))
        centres = sc.sample_in(deep, k)
        big = sc.n / sc.ppu  # patch side in um
        radii = [sc.px(rng.uniform(0.1, 0.6) * big + 4) for _ in range(k)]
        field = _blob_field(sc, centres, radii, sc.px(rng.uniform(2, 8)), rng.uniform(8, 25))
        mass = _smoothstep(field, -1.0, 1.0) * deep
        tex = 0.9 + 0.18 * sc.noise(rng.uniform(3, 8)) + 0.12 * sc.fine_noise(0.8)
        # the edge breaks up into granules
        edge = (field > -sc.px(4)) & (field < sc.px(3)) & deep
        gr = _smoothstep(sc.fine_noise(sc.px(0.7)), 0.3, 1.0) * edge
        conc = np.clip(rng.uniform(0.8, 1.2) * tex, 0.3, 1.6)
        sc.paint(CALC, np.maximum(mass, gr * 0.9), conc, displace=1.0)
        calc = np.maximum(calc, np.maximum(mass, gr))
        if rng.random() < 0.45:
            _foreign_body_rim(sc, mass, deep)
        if rng.random() < 0.4:
            _fibrosis(sc, mass, deep)
        cracks = _crack_lines(sc, mass, int(rng.integers(0, 5)), (1, 2.6), 0.05, 60)
        sc.clear(cracks)
    sc.labels[(calc > 0.3) & deep] = CALCIUM


def _giant_cell(sc: _Scene, x: float, y: float, length: float, ang_deg: float) -> None:
    """A multinucleated giant cell: broad pale cytoplasm with many ovoid nuclei."""
    rng = sc.rng
    width = length * rng.uniform(0.45, 0.7)
    cyto = np.zeros((sc.n, sc.n), np.float32)
    cv2.ellipse(
        cyto,
        (int(x * 16), int(y * 16)),
        (int(length / 2 * 16), int(width / 2 * 16)),
        ang_deg,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_8,
        4,
    )
    sc.paint(HISTIO, cyto, rng.uniform(0.9, 1.3), displace=0.8)
    a = math.radians(ang_deg)
    langhans = rng.random() < 0.4
    n_nuc = int(np.clip(rng.integers(5, 16) * (length / sc.px(40)) ** 2, 4, 24))
    for _ in range(n_nuc):
        if langhans:  # horseshoe of nuclei at the periphery
            t = rng.uniform(0, 2 * math.pi)
            u, v = 0.35 * length * math.cos(t), 0.32 * width * math.sin(t)
        else:
            u, v = rng.uniform(-0.32, 0.32) * length, rng.uniform(-0.28, 0.28) * width
        px_ = x + u * math.cos(a) - v * math.sin(a)
        py_ = y + u * math.sin(a) + v * math.cos(a)
        sc.ellipse(
            NUC, px_, py_, sc.px(2.6), sc.px(1.9), rng.uniform(0, 180), rng.uniform(0.5, 0.75)
        )


def _foreign_body_rim(sc: _Scene, mass: np.ndarray, allowed: np.ndarray) -> None:
    rng = sc.rng
    sd = _signed_distance(mass)
    gx, gy = _gradient_dir(sd)
    pts = _boundary_points(mass, sc.px(rng.uniform(25, 45)), rng)
    for x, y in pts[: int(rng.integers(1, 5))]:
        xi, yi = int(x), int(y)
        nx, ny = gx[yi, xi], gy[yi, xi]
        length = sc.px(rng.uniform(25, 50))
        off = length * 0.18
        if not allowed[yi, xi]:
            continue
        _giant_cell(sc, x + nx * off, y + ny * off, length, math.degrees(math.atan2(ny, nx)) + 90)


def _fibrosis(sc: _Scene, mass: np.ndarray, allowed: np.ndarray) -> None:
    """Dense collagen wrapped round a deposit, with flattened fibroblasts."""
    rng = sc.rng
    sd = _signed_distance(mass)
    width = sc.px(rng.uniform(6, 18))
    band = _smoothstep(sd, -0.5, 1.5) * _smoothstep(width - sd, 0, 3) * allowed
    lam = 0.9 + 0.07 * np.sin(2 * np.pi * sd / sc.px(3.0) + 0.8 * sc.noise(10))
    sc.paint(STROMA, band, lam * rng.uniform(0.9, 1.2), displace=0.9)
    gx, gy = _gradient_dir(sd)
    for x, y in sc.sample_in(band > 0.5, int(band.sum() / sc.px(12) ** 2)) if band.any() else []:
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(gy[yi, xi], gx[yi, xi])) + 90
        sc.ellipse(NUC, x, y, sc.px(rng.uniform(5, 8)), sc.px(1.1), ang, 0.9)


def _osteoma(sc: _Scene, lay: _Layout) -> None:
    rng = sc.rng
    deep = lay.deep
    big = sc.n / sc.ppu
    # the lesion: bone plus marrow, sometimes filling the patch
    centre = sc.sample_in(deep, 1)
    lesion_f = _blob_field(sc, centre, [sc.px(rng.uniform(0.35, 1.3) * big)], sc.px(8), 25)
    lesion = _smoothstep(lesion_f, -2, 2) * deep
    # trabeculae: thresholded smooth field, either plates with marrow holes or bands;
    # or compact (cortical) bone: solid lamellar bone with Haversian systems, no marrow
    f = sc.noise(rng.uniform(15, 35))
    compact = rng.random() < 0.3
    if compact:
        lesion_f = _blob_field(sc, centre, [sc.px(rng.uniform(0.9, 1.8) * big)], sc.px(8), 25)
        lesion = _smoothstep(lesion_f, -2, 2) * deep
        bone_f = (lesion_f / max(sc.px(8), 1.0)).astype(np.float32)
        bone = np.ones_like(lesion)
    elif rng.random() < 0.35:
        w = rng.uniform(0.25, 0.6)
        bone_f = w - np.abs(f - rng.normal(0, 0.3))
        bone = _smoothstep(bone_f, -0.03, 0.03)
    else:
        frac = rng.uniform(0.25, 0.85)
        thr = float(np.quantile(f, 1 - frac))
        bone_f = f - thr
        bone = _smoothstep(bone_f, -0.03, 0.03)
    # lamellae run parallel to the bone surface: iso-lines of the same smooth
    # field, scaled by its typical gradient to approximate pixels from the surface
    gx_f = cv2.Sobel(bone_f, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy_f = cv2.Sobel(bone_f, cv2.CV_32F, 0, 1, ksize=3) / 8
    edge = np.abs(bone_f) < 0.05
    g0 = float(np.median(np.sqrt(gx_f * gx_f + gy_f * gy_f)[edge])) if edge.any() else 0.01
    lam_d = bone_f / max(g0, 1e-4)
    bone = bone * lesion
    if bone.sum() < 0.02 * sc.n * sc.n:  # make sure some bone is in view
        bone = np.maximum(
            bone,
            _smoothstep(
                _blob_field(sc, sc.sample_in(deep, 1), [sc.px(rng.uniform(10, 20))], sc.px(3), 10),
                -1,
                1,
            )
            * deep,
        )
        lesion = np.maximum(lesion, bone)
        lam_d = _distance(_uint8_mask(bone))
    marrow = np.clip(lesion - bone, 0, 1)
    # marrow: fat cells or loose fibrovascular stroma with scattered cells
    if marrow.any():
        sc.c *= 1 - marrow
        if rng.random() < 0.65:
            before = sc.c[STROMA].copy()
            sc.c[STROMA] = 0
            _fat(sc, marrow, (25, 60))
            sc.c[STROMA] = np.where(marrow > 0.5, sc.c[STROMA], before)
        else:
            sc.c[STROMA] += marrow * (0.3 + 0.1 * sc.noise(5))
        k = int(marrow.sum() / sc.px(rng.uniform(15, 35)) ** 2)
        for x, y in sc.sample_in(marrow > 0.5, k) if k else []:
            r = sc.px(rng.uniform(2.2, 3.5))
            sc.ellipse(
                NUC, x, y, r, r * rng.uniform(0.7, 1), rng.uniform(0, 180), rng.uniform(0.7, 1.1)
            )
    # lamellae follow the trabecular surface; osteons have concentric ones
    bmask = _uint8_mask(bone)
    din = _distance(bmask)
    period = sc.px(rng.uniform(3, 6))
    phase = 0.3 * sc.noise(25)
    osteon_canals = []
    if din.max() > sc.px(14) and (compact or rng.random() < 0.5):
        n_osteons = int(rng.integers(2, 6)) if compact else int(rng.integers(1, 3))
        for x, y in sc.sample_in(din > sc.px(12), n_osteons):
            rr = np.sqrt((sc.xx - x) ** 2 + (sc.yy - y) ** 2)
            big_r = min(din[int(y), int(x)], sc.px(rng.uniform(20, 40)))
            inside = rr < big_r
            lam_d = np.where(inside, big_r - rr, lam_d)
            cement_ring = np.abs(rr - big_r) < 0.9
            sc.c[CEMENT] += cement_ring * bone * 0.6
            osteon_canals.append((x, y, sc.px(rng.uniform(4, 10))))
    lam = np.cos(2 * np.pi * lam_d / period + phase)
    matrix = bone * (0.86 + 0.07 * lam + 0.04 * sc.noise(4))
    sc.paint(BONEM, bone, matrix / np.maximum(bone, 1e-3), displace=1.0)
    # a faint basophilic line in some lamellae, and scalloped cement lines
    sc.c[CEMENT] += bone * 0.06 * _smoothstep(lam, 0.85, 1.0)
    g = sc.noise(rng.uniform(10, 25))
    for lvl in rng.normal(0, 0.7, int(rng.integers(1, 4))):
        line = np.exp(-(((g - lvl) / 0.05) ** 2)) * (din > 2)
        sc.c[CEMENT] += bone * line * 0.7
    labels_bone = bone > 0.5
    # Haversian canals
    for x, y, r in osteon_canals:
        canal = (((sc.xx - x) ** 2 + (sc.yy - y) ** 2) < r * r).astype(np.float32)
        sc.clear(canal)
        sc.c[STROMA] += canal * 0.25
        labels_bone &= canal < 0.5
        sc.ellipse(NUC, x + r * 0.6, y, sc.px(3), sc.px(1.2), 90, 0.8)
    # osteoid seams and osteoblast rims on parts of the surface
    sd = _signed_distance(bone)
    gx, gy = _gradient_dir(sd)
    if rng.random() < 0.65:
        pts = _boundary_points(bone, sc.px(rng.uniform(6.5, 8.5)), rng)
        if len(pts):
            # keep one or two contiguous runs of the outline
            anchor = pts[rng.integers(len(pts))]
            run = np.sqrt(((pts - anchor) ** 2).sum(axis=1)) < sc.px(rng.uniform(20, 60))
            seam_w = sc.px(rng.uniform(1.5, 4))
            near = np.zeros((sc.n, sc.n), np.uint8)
            for x, y in pts[run]:
                cv2.circle(near, (int(x), int(y)), int(sc.px(9)), 1, -1)
            seam = ((sd > -seam_w) & (sd <= 0) & (near > 0)).astype(np.float32)
            sc.paint(OSTEOID, seam, 0.85)
            labels_bone &= seam < 0.5
            rim = ((sd > 0) & (sd < sc.px(9)) & (near > 0) & (marrow > 0.5)).astype(np.float32)
            sc.paint(HISTIO, rim, 0.6, displace=0.8)
            for x, y in pts[run]:
                xi, yi = int(x), int(y)
                nx, ny = gx[yi, xi], gy[yi, xi]
                off = sc.px(rng.uniform(3.5, 5))
                ang = math.degrees(math.atan2(ny, nx))
                sc.ellipse(
                    NUC,
                    x + nx * off,
                    y + ny * off,
                    sc.px(3.3),
                    sc.px(2.6),
                    ang,
                    rng.uniform(0.75, 1.0),
                )
    # osteocytes: nuclei in clear lacunae, aligned with the lamellae
    lgx, lgy = _gradient_dir(lam_d)
    spacing = sc.px(rng.uniform(16, 26))
    for x, y in _poisson_points(sc, (din > sc.px(2.5)) & labels_bone, spacing, 80):
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(lgy[yi, xi], lgx[yi, xi])) + 90
        a, b = sc.px(rng.uniform(3.5, 5.5)), sc.px(rng.uniform(1.6, 2.4))
        halo = np.zeros((sc.n, sc.n), np.float32)
        cv2.ellipse(
            halo,
            (int(x * 16), int(y * 16)),
            (int(a * 16), int(b * 16)),
            ang,
            0,
            360,
            1.0,
            -1,
            cv2.LINE_8,
            4,
        )
        sc.clear(halo)
        labels_bone &= halo < 0.5
        sc.ellipse(NUC, x, y, a * 0.75, b * 0.7, ang, rng.uniform(0.85, 1.1))
    sc.labels[labels_bone] = BONE


def _gout(sc: _Scene, lay: _Layout) -> None:
    rng = sc.rng
    deep = lay.deep
    big = sc.n / sc.ppu
    k = int(rng.integers(1, 3))
    centres = sc.sample_in(deep, k)
    radii = [sc.px(rng.uniform(0.2, 0.9) * big + 8) for _ in range(k)]
    field = _blob_field(sc, centres, radii, sc.px(rng.uniform(3, 9)), 20)
    toph = _smoothstep(field, -1, 1) * deep
    # palisading histiocytes ring the tophus, nuclei pointing radially
    sd = _signed_distance(toph)
    gx, gy = _gradient_dir(sd)
    rim_w = sc.px(rng.uniform(14, 30))
    rim = ((sd > 0) & (sd < rim_w) & deep).astype(np.float32)
    sc.paint(HISTIO, rim, rng.uniform(0.55, 0.85) * (1 + 0.15 * sc.noise(5)), displace=0.85)
    pts = _boundary_points(toph, sc.px(rng.uniform(4, 6)), rng)
    for x, y in pts:
        xi, yi = int(x), int(y)
        nx, ny = gx[yi, xi], gy[yi, xi]
        for off in (rng.uniform(0.15, 0.45), rng.uniform(0.55, 0.9))[: int(rng.integers(1, 3))]:
            d = off * rim_w
            cx, cy = x + nx * d, y + ny * d
            if 0 <= cx < sc.n and 0 <= cy < sc.n and deep[int(cy), int(cx)]:
                ang = math.degrees(math.atan2(ny, nx)) + rng.normal(0, 12)
                sc.ellipse(
                    NUC,
                    cx,
                    cy,
                    sc.px(rng.uniform(4.5, 6.5)),
                    sc.px(rng.uniform(1.8, 2.4)),
                    ang,
                    rng.uniform(0.6, 0.85),
                )
    for x, y in pts[rng.permutation(len(pts))[: int(rng.integers(0, 3))]] if len(pts) else []:
        xi, yi = int(x), int(y)
        nx, ny = gx[yi, xi], gy[yi, xi]
        length = sc.px(rng.uniform(25, 55))
        _giant_cell(
            sc,
            x + nx * length * 0.25,
            y + ny * length * 0.25,
            length,
            math.degrees(math.atan2(ny, nx)) + 90,
        )
    # urate: amorphous, feathery streaks, sheaves of needle-shaped clefts
    streak = np.zeros((sc.n, sc.n), np.uint8)
    clefts = np.zeros((sc.n, sc.n), np.uint8)
    area = toph.sum()
    n_sheaf = max(1, int(area / sc.px(rng.uniform(22, 40)) ** 2))
    for cx, cy in sc.sample_in(toph > 0.5, n_sheaf):
        phi = rng.uniform(0, math.pi)
        spread = rng.uniform(0.08, 0.5)
        radiate = rng.random() < 0.5
        for j in range(int(rng.integers(6, 22))):
            a = phi + rng.normal(0, spread) + (math.pi if radiate and j % 2 else 0)
            L = sc.px(rng.uniform(8, 35))
            if radiate:
                x0, y0 = cx, cy
            else:  # parallel bundle
                off = rng.normal(0, sc.px(8))
                x0, y0 = cx - off * math.sin(phi), cy + off * math.cos(phi)
                x0 -= L / 2 * math.cos(a)
                y0 -= L / 2 * math.sin(a)
            x1, y1 = x0 + L * math.cos(a), y0 + L * math.sin(a)
            p0 = (int(x0 * 16), int(y0 * 16))
            p1 = (int(x1 * 16), int(y1 * 16))
            if rng.random() < 0.4:
                cv2.line(clefts, p0, p1, 255, 1 if rng.random() < 0.7 else 2, cv2.LINE_AA, 4)
            else:
                cv2.line(streak, p0, p1, 255, 1, cv2.LINE_AA, 4)
    feather = cv2.GaussianBlur(streak.astype(np.float32) / 255.0, (0, 0), 0.8)
    base = rng.uniform(0.95, 1.45) * (0.85 + 0.12 * sc.noise(6) + 0.1 * sc.fine_noise(0.7))
    conc = np.clip(base * (1 + 0.9 * feather), 0.2, 2.0)
    sc.paint(URATEM, toph, conc, displace=1.0)
    sc.clear((clefts.astype(np.float32) / 255.0) * toph * rng.uniform(0.8, 1.0))
    sc.labels[(toph > 0.5)] = URATE


def _amyloidosis(sc: _Scene, lay: _Layout) -> None:
    rng = sc.rng
    deep = lay.deep
    big = sc.n / sc.ppu
    if rng.random() < 0.55:  # lichen / macular type: small globules
        k = int(rng.integers(1, 6))
        radii = [sc.px(rng.uniform(8, 30)) for _ in range(k)]
    else:  # nodular: large confluent masses
        k = int(rng.integers(1, 3))
        radii = [sc.px(rng.uniform(0.25, 0.8) * big + 5) for _ in range(k)]
    if lay.kind == "epidermis" and rng.random() < 0.85:
        # globules packed in the papillary dermis right under the epidermis
        band = (lay.depth > lay.dej + 3) & (lay.depth < lay.dej + 25) & deep
        centres = sc.sample_in(band, k)
    else:
        centres = sc.sample_in(lay.dermis if lay.dermis.any() else deep, k)
    field = _blob_field(sc, centres, radii, sc.px(rng.uniform(1.5, 4)), 15)
    glob = _smoothstep(field, -1.0, 1.0) * deep
    # homogeneous, waxy: only very low-frequency variation
    conc = rng.uniform(0.75, 1.05) * (1 + 0.04 * sc.noise(20) + 0.02 * sc.fine_noise(1.0))
    sc.paint(AMYL, glob, conc, displace=1.0)
    # retraction cleft separating part of a globule from the collagen
    if rng.random() < 0.85:
        sd = _signed_distance(glob)
        ring = (np.abs(sd - 1.0) < sc.px(rng.uniform(0.8, 2.0))) * (sc.noise(15) > -0.4) * deep
        sc.clear(ring.astype(np.float32))
    # fissures
    cracks = _crack_lines(sc, glob, int(rng.integers(2, 7)), (1, 1.8), 0.18, 40)
    sc.clear(cracks * 0.9)
    # few nuclei: an occasional fibroblast at the edge
    for x, y in sc.sample_in(glob > 0.5, int(rng.integers(0, 3))):
        sc.ellipse(NUC, x, y, sc.px(4), sc.px(1.3), rng.uniform(0, 180), 0.7)
    sc.labels[glob > 0.5] = AMYLOID


def _lesion_room(sc: _Scene, margin: int) -> np.ndarray:
    """An irregular rounded area in the middle of a region tile where its lesion may lie."""
    rng = sc.rng
    n = sc.n
    cx, cy = n / 2 + rng.uniform(-0.1, 0.1, 2) * n
    radius = rng.uniform(0.24, 0.36) * n
    f = radius - np.sqrt((sc.xx - cx) ** 2 + (sc.yy - cy) ** 2)
    f = f + 0.05 * n * sc.noise(n / sc.ppu / rng.uniform(3, 6))
    # never closer than a few px to the feathered band at the tile's edge
    edge = np.minimum(np.minimum(sc.xx, sc.yy), np.minimum(n - 1 - sc.xx, n - 1 - sc.yy))
    return np.minimum(f, edge - margin - 6) > 0


_DEPOSITS = {
    "calcinosis_cutis": _calcinosis,
    "osteoma_cutis": _osteoma,
    "gout": _gout,
    "amyloidosis": _amyloidosis,
}


# ---------------------------------------------------------------------------
# Staining and optics
# ---------------------------------------------------------------------------


#: The drawing style of a patch with every randomised knob at its middle.
NEUTRAL_STYLE: dict[str, float] = {
    "coll_density": 1.0,
    "coll_period": 1.0,
    "coll_warp": 1.0,
    "nuc_size": 1.0,
    "nuc_aspect": 1.0,
    "nuc_blur": 0.6,
    "nuc_texture": 0.2,
    "edge_blur": 0.0,
    "dye_amount_sd": 0.12,
    "dye_hue_deg": 3.0,
}


def _style_settings(rng: np.random.Generator) -> dict[str, float]:
    """Domain randomisation: how this patch is drawn, independently of its class.

    A model trained on one fixed rendering learns the renderer's signature
    (its fibre width, its nuclear outline, its exact dye colours) as readily
    as the morphology. Every patch therefore draws its own collagen density
    (loose papillary to sclerotic: dense collagen is as pink as bone in every
    class), bundle width and waviness, nuclear size, shape and sharpness,
    edge softness of everything painted, and how far its dyes stray from the
    reference colours, so that only the structure that defines a class is
    common to all its patches.
    """
    return {
        "coll_density": float(np.exp(rng.uniform(np.log(0.5), np.log(1.6)))),
        "coll_period": float(rng.uniform(0.5, 1.8)),
        "coll_warp": float(rng.uniform(0.3, 1.8)),
        "nuc_size": float(rng.uniform(0.8, 1.25)),
        "nuc_aspect": float(rng.uniform(0.8, 1.3)),
        "nuc_blur": float(rng.uniform(0.3, 1.2)),
        "nuc_texture": float(rng.uniform(0.05, 0.45)),
        "edge_blur": float(rng.uniform(0.3, 1.3)) if rng.random() < 0.4 else 0.0,
        "dye_amount_sd": float(rng.uniform(0.08, 0.3)),
        "dye_hue_deg": float(rng.uniform(2.0, 7.0)),
    }


def _lab_settings(
    rng: np.random.Generator, shift: float, style: dict[str, float] = NEUTRAL_STYLE
) -> dict:
    """Per-patch staining and scanner settings; shift pushes them outside training."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return {
        "amount": np.exp(
            rng.normal(0, style["dye_amount_sd"], len(DYES))
            + sign * 0.45 * shift
            + rng.normal(0, 0.1 * shift, len(DYES))
        ),
        "hue": np.radians(
            rng.normal(0, style["dye_hue_deg"], len(DYES))
            + (1 if rng.random() < 0.5 else -1) * 12.0 * shift
        ),
        "thickness": rng.uniform(0.8, 1.2),
        "background": rng.uniform(232, 252) - 10 * shift * rng.random(),
        "tint": rng.normal(0, 0.02, 3) + shift * 0.06 * rng.normal(0, 1, 3),
        "vignette": rng.uniform(0, 0.08) + 0.12 * shift,
        "blur": rng.uniform(0.0, 1.1) + shift * rng.uniform(0.6, 1.3),
        "noise": rng.uniform(0.5, 3.5) + 3.0 * shift,
        "jpeg": int(np.clip(rng.integers(70, 96) - 45 * shift, 15, 100))
        if rng.random() < 0.8
        else 0,
        "fold": rng.random() < 0.06 + 0.1 * shift,
        "bubble": rng.random() < 0.04 + 0.1 * shift,
        "debris": rng.random() < 0.12,
    }


def _artefacts(sc: _Scene, lab: dict) -> None:
    """Folds (doubled tissue), bubble rims, dust / silver precipitate."""
    rng = sc.rng
    if lab["fold"]:
        x, y = rng.uniform(0, sc.n, 2)
        ang = rng.uniform(0, math.pi)
        dist = (sc.xx - x) * math.sin(ang) - (sc.yy - y) * math.cos(ang)
        w = sc.px(rng.uniform(3, 12))
        band = _smoothstep(w - np.abs(dist + sc.px(2) * sc.noise(15)), -1, 1)
        sc.c *= 1 + 0.9 * band
    if lab["debris"]:
        for x, y in rng.uniform(0, sc.n, (int(rng.integers(1, 6)), 2)):
            r = sc.px(rng.uniform(0.4, 1.5))
            cv2.circle(
                sc.c[DEBRIS],
                (int(x * 16), int(y * 16)),
                max(int(r * 16), 8),
                float(rng.uniform(0.4, 1.0)),
                -1,
                cv2.LINE_8,
                4,
            )
    if lab["bubble"]:
        x, y = rng.uniform(0, sc.n, 2)
        r = sc.px(rng.uniform(10, 40))
        d = np.sqrt((sc.xx - x) ** 2 + (sc.yy - y) ** 2)
        sc.c *= 1 - 0.25 * (d < r)
        ring = np.exp(-(((d - r) / max(sc.px(0.8), 1)) ** 2))
        sc.c[DEBRIS] += 0.7 * ring


def _render(sc: _Scene, stain: str, lab: dict, ctx: _TileContext | None = None) -> np.ndarray:
    """Beer-Lambert: transmitted light through the stained section, then the scanner.

    A region tile (``ctx``) takes section thickness and illumination from the
    region, so they run on smoothly from one tile to the next.
    """
    rng = sc.rng
    n = sc.n
    od_dyes = _DYE_OD * lab["amount"][:, None]
    od_dyes = np.stack([_rotate_hue(od_dyes[i], lab["hue"][i]) for i in range(len(DYES))])
    comp_od = (_BINDING_MATRICES[stain] @ od_dyes).astype(np.float32)  # (K, 3)
    np.maximum(sc.c, 0, out=sc.c)
    # sum_k c_k * OD_k, one channel at a time (plain numpy: a BLAS call here
    # would start threads that fight the worker processes for the cores)
    used = [k for k in range(len(COMPONENTS)) if comp_od[k].any() and sc.c[k].any()]
    planes = []
    for ch in range(3):
        acc = np.zeros((n, n), np.float32)
        for k in used:
            acc += sc.c[k] * comp_od[k, ch]
        planes.append(acc)
    if ctx is None:
        thick = lab["thickness"] * (1 + 0.07 * sc.noise(30))
    else:
        thick = ctx.thickness
    od = cv2.merge(planes) * thick[:, :, None]
    # unevenly lit, slightly tinted background
    if ctx is None:
        cx, cy = rng.uniform(-0.3, 1.3, 2) * n
        r2 = ((sc.xx - cx) ** 2 + (sc.yy - cy) ** 2) / (n * n)
        light = lab["background"] * (1 - lab["vignette"] * r2 / 2) * (1 + 0.01 * sc.noise(40))
    else:
        light = ctx.light
    tint = np.exp(-np.asarray(lab["tint"], np.float32))
    img = np.exp(-od) * light[:, :, None] * tint
    if lab["blur"] > 0.15:
        img = cv2.GaussianBlur(img, (0, 0), lab["blur"])
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(lab["noise"])
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if lab["jpeg"]:
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, lab["jpeg"]])
        if ok:
            rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_names(label: str, stain: str) -> tuple[int, int]:
    if label not in CLASS_NAMES:
        raise ConfigError(f"unknown class {label!r}; choose one of {', '.join(CLASS_NAMES)}")
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    return CLASS_NAMES.index(label), STAIN_NAMES.index(stain)


def check_patch_args(
    label: str, stain: str, size: int, shift: float, mpp: float
) -> tuple[int, int]:
    """The class and stain indices, or a ConfigError naming the bad argument.

    The contract of every patch renderer (:func:`render_patch`, style B's
    ``render_patch_b``): a known class and stain, at least 16 pixels, a shift
    of at least 0 and a positive, finite mpp.
    """
    ci, si = _check_names(label, stain)
    if size < 16:
        raise ConfigError(f"patch size {size} is too small; use at least 16 pixels")
    if not shift >= 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp}")
    return ci, si


def render_patch(
    label: str,
    stain: str,
    seed: int,
    size: int = 128,
    shift: float = 0.0,
    *,
    mpp: float = NOMINAL_MPP,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch: (RGB uint8 HxWx3, deposit labels uint8 HxW).

    Deterministic in its arguments. ``shift`` 0 is the training lab; 1 looks
    like a clearly different lab (stain strength and hue, blur, compression,
    tinted light) with the same morphology.
    """
    ci, si = check_patch_args(label, stain, size, shift, mpp)
    return _render_scene(label, stain, ci, si, seed, int(size), float(shift), float(mpp), None)


def _render_scene(
    label: str,
    stain: str,
    ci: int,
    si: int,
    seed: int,
    size: int,
    shift: float,
    mpp: float,
    ctx: _TileContext | None,
) -> tuple[np.ndarray, np.ndarray]:
    """render_patch's body; a region tile passes ``ctx`` (layout, lab and light from the region)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, GENERATOR_VERSION])
    sc = _Scene(rng, size, mpp)
    if ctx is None:  # a region's tiles share the region's style (one slide, one look)
        style_rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, 0x57E])
        sc.style = _style_settings(style_rng)
    else:
        sc.style = ctx.lab.get("style", NEUTRAL_STYLE)
    lay = _Layout(sc, label, ctx)
    if ctx is None or not lay.glass.all():  # a region's bare-glass tile needs no tissue
        _base_tissue(sc, lay)
    if label in _DEPOSITS:
        if ctx is not None:
            # a region tile keeps its lesion off the tile's edges, so it reads as a
            # nodule rather than a square cut out of one
            full = lay.deep, lay.dermis
            room = _lesion_room(sc, ctx.margin)
            lay.deep, lay.dermis = lay.deep & room, lay.dermis & room
        # A lesion patch shows its lesion: a patch labelled osteoma with a sliver of
        # bone in a corner teaches nothing but label noise. Patches need 6% of
        # their area; a region tile only 1% (its neighbours carry the rest).
        need = (0.06 if ctx is None else 0.01) * sc.n * sc.n
        for _ in range(6):
            _DEPOSITS[label](sc, lay)
            if np.count_nonzero(sc.labels) >= need:
                break
        if ctx is not None:
            lay.deep, lay.dermis = full
    # the edge of the section: glass beyond it (never hiding the whole lesion);
    # a region tile has its edges drawn by the region instead
    if ctx is None and rng.random() < 0.15:
        ang = rng.uniform(0, 2 * math.pi)
        proj = (sc.xx - sc.n / 2) * math.cos(ang) + (sc.yy - sc.n / 2) * math.sin(ang)
        edge = (proj + sc.px(3) * sc.noise(15)) > rng.uniform(0.15, 0.45) * sc.n
        lesion = sc.labels > 0
        if label == "normal" or (lesion & ~edge).sum() >= 0.5 * lesion.sum():
            lay.glass |= edge
    glass = lay.glass.astype(np.float32)
    sc.clear(cv2.GaussianBlur(glass, (0, 0), 0.7))
    sc.labels[lay.glass] = 0
    nuc = sc.c[NUC]
    amp = sc.style["nuc_texture"]
    tex = (1 - amp) + amp * sc.fine_noise(0.7)
    sc.c[NUC] = cv2.GaussianBlur(nuc * tex, (0, 0), sc.style["nuc_blur"])
    if sc.style["edge_blur"] > 0:  # soft-edged rendering of everything drawn
        sig = sc.style["edge_blur"]
        for k in range(len(COMPONENTS)):
            if k != NUC and sc.c[k].any():
                sc.c[k] = cv2.GaussianBlur(sc.c[k], (0, 0), sig)
    if ctx is None:
        lab = _lab_settings(rng, shift, sc.style)
    else:
        # one lab for the whole slide; folds and bubbles would stop at the tile edge
        lab = dict(ctx.lab, fold=False, bubble=False, debris=bool(rng.random() < 0.12))
    _artefacts(sc, lab)
    if ctx is not None:  # dust only on the tissue: a region's bare glass stays bare
        sc.c[DEBRIS][lay.glass] = 0
    rgb = _render(sc, stain, lab, ctx)
    return rgb, sc.labels


def patch_seed(seed: int, index: int) -> int:
    """The render seed of patch ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


def _png_bytes(arr: np.ndarray) -> bytes:
    img = arr[:, :, ::-1] if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError("could not encode a PNG (OpenCV imencode failed)")
    return buf.tobytes()


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(_png_bytes(arr))


def _rel_paths(label: str, stain: str, i: int) -> tuple[str, str]:
    name = f"{stain}_{i:04d}.png"
    return f"images/{label}/{name}", f"masks/{label}/{name}"


def patch_style(style: str, index: int) -> str:
    """The style (``a`` or ``b``) patch ``index`` of a dataset of ``style`` is drawn in."""
    if style == "mix":
        return "b" if index % 2 else "a"
    return style


def _renderer(style: str):
    if style == "b":
        from .synthetic_b import render_patch_b

        return render_patch_b
    return render_patch


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return style


def supersample_factor(seed: int, index: int, supersample: int) -> int:
    """How many times finer than its mpp patch ``index`` is drawn (1..``supersample``)."""
    if supersample <= 1:
        return 1
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x55])
    return int(rng.integers(1, supersample + 1))


def render_supersampled(
    render, label: str, stain: str, seed: int, size: int, shift: float, mpp: float, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """``render`` at ``factor`` times the resolution, then area-averaged down to ``size``.

    A scanner images the section at a fine resolution and a pyramid level (or
    ``calcinosis predict`` resampling to the model's mpp) averages it down:
    sensor noise, compression and edges then come out smoother than when drawn
    at the coarse resolution directly. Training on both kinds of patch keeps
    the model from reading that difference. Labels take, per output pixel, the
    value covering most of it.
    """
    if factor <= 1:
        return render(label, stain, seed, size, shift, mpp=mpp)
    rgb, labels = render(label, stain, seed, size * factor, shift, mpp=mpp / factor)
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    present = np.unique(labels)
    cover = np.stack(
        [
            cv2.resize((labels == v).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
            for v in present
        ]
    )
    return small, present[cover.argmax(axis=0)].astype(np.uint8)


def _render_chunk(
    job: tuple[str, list[tuple[str, str, int]], int, int, float, float, str, int],
) -> int:
    out, tasks, seed, size, shift, mpp, style, supersample = job
    root = Path(out)
    for label, stain, i in tasks:
        render = _renderer(patch_style(style, i))
        factor = supersample_factor(seed, i, supersample)
        rgb, labels = render_supersampled(
            render, label, stain, patch_seed(seed, i), size, shift, mpp, factor
        )
        img_rel, mask_rel = _rel_paths(label, stain, i)
        _write_png(root / img_rel, rgb)
        _write_png(root / mask_rel, labels)
    return len(tasks)


def _init_worker() -> None:
    cv2.setNumThreads(1)


@contextlib.contextmanager
def _cv2_single_thread():
    """OpenCV on one thread while it lasts; wrap every worker pool in it.

    Besides keeping processes from fighting over the cores, this makes forking
    safe: a child forked while OpenCV's thread pool is running inherits the
    pool's locks but not its threads, and its first call into the pool (even
    ``setNumThreads``) can then wait forever. With the pool shut down in the
    parent before the fork, there is nothing to inherit.
    """
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


def assign_synthetic_splits(
    n_per_class_stain: int, seed: int = 0
) -> dict[tuple[str, str, int], str]:
    """train/val/test for every (class, stain, index), stratified and deterministic.

    Within each class the stain groups are laid end to end and split by a
    running quota (70/15/15), each group shuffled first; so every (class,
    stain) gets about 70/15/15, and every class gets all three splits from
    two patches per (class, stain) on.
    """
    out: dict[tuple[str, str, int], str] = {}
    names = [s for s, _ in SPLIT_FRACTIONS]
    fracs = np.array([f for _, f in SPLIT_FRACTIONS])
    for ci, label in enumerate(CLASS_NAMES):
        counts = np.zeros(len(names))
        k = 0
        for si, stain in enumerate(STAIN_NAMES):
            order = np.random.default_rng([int(seed) & 0xFFFFFFFF, ci, si, 7]).permutation(
                n_per_class_stain
            )
            for i in order:
                deficit = fracs * (k + 1) - counts
                # largest deficit wins; ties go to val/test so small sets still get them
                j = max(range(len(names)), key=lambda t: (round(deficit[t], 9), t))
                counts[j] += 1
                k += 1
                out[(label, stain, int(i))] = names[j]
    return out


def generate_dataset(
    out_dir: str | os.PathLike,
    n_per_class_stain: int,
    size: int = 128,
    seed: int = 0,
    shift: float = 0.0,
    workers: int = 0,
    *,
    mpp: float = NOMINAL_MPP,
    style: str = "a",
    supersample: int = 1,
) -> Path:
    """Write images/, masks/ and manifest.csv for 5 classes x 3 stains x n patches.

    With ``supersample`` N > 1 each patch is drawn at a factor of 1..N times
    finer than ``mpp`` (random per patch) and area-averaged down
    (:func:`render_supersampled`), as a scanner's pyramid levels are.

    ``style`` is ``a``, ``b`` or ``mix`` (see :data:`STYLES`); the manifest's
    ``style`` column says which drew each patch. The manifest is written last
    (atomically), so its presence means the dataset is complete. Returns the
    manifest path.
    """
    _check_style(style)
    if not 1 <= supersample <= 4:
        raise ConfigError(f"supersample must be 1 to 4, got {supersample}")
    if n_per_class_stain < 1:
        raise ConfigError(f"n_per_class_stain must be >= 1, got {n_per_class_stain}")
    if size < 32:
        raise ConfigError(f"size must be >= 32 pixels, got {size}")
    if shift < 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")
    root = Path(out_dir)
    for label in CLASS_NAMES:
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        (root / "masks" / label).mkdir(parents=True, exist_ok=True)
    tasks = [
        (lab, st, i) for lab in CLASS_NAMES for st in STAIN_NAMES for i in range(n_per_class_stain)
    ]
    workers = workers or os.cpu_count() or 1
    workers = min(workers, max(1, len(tasks) // 8))
    chunk = max(1, min(32, math.ceil(len(tasks) / (workers * 4))))
    jobs = [
        (
            str(root),
            tasks[j : j + chunk],
            int(seed),
            int(size),
            float(shift),
            float(mpp),
            style,
            int(supersample),
        )
        for j in range(0, len(tasks), chunk)
    ]
    with _cv2_single_thread():
        if workers == 1:
            for job in jobs:
                _render_chunk(job)
        else:
            with mp.get_context().Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_render_chunk, jobs):
                    pass
    splits = assign_synthetic_splits(n_per_class_stain, seed)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for label, stain, i in tasks:
        img_rel, mask_rel = _rel_paths(label, stain, i)
        split = splits[(label, stain, i)]
        writer.writerow([img_rel, label, stain, mask_rel, split, f"{mpp:g}", patch_style(style, i)])
    settings = {
        "generator_version": GENERATOR_VERSION,
        "style": style,
        "supersample": supersample,
        "n_per_class_stain": n_per_class_stain,
        "size": size,
        "seed": seed,
        "shift": shift,
        "mpp": mpp,
    }
    atomic_write_text(root / "synthetic.json", json.dumps(settings, indent=2) + "\n")
    manifest = root / "manifest.csv"
    atomic_write_text(manifest, buf.getvalue())
    return manifest


def _mask_view(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image dimmed to grey with deposits painted in their overlay colours."""
    grey = rgb.mean(axis=2, keepdims=True) * 0.45 + 40
    out = np.repeat(grey, 3, axis=2)
    for value, colour in DEPOSIT_COLORS.items():
        out[labels == value] = colour
    return out.astype(np.uint8)


def contact_sheet(
    path: str | os.PathLike,
    size: int = 128,
    seed: int = 0,
    shift: float = 0.0,
    examples: int = 2,
    mpp: float = NOMINAL_MPP,
    style: str = "a",
) -> Path:
    """PNG grid: rows = classes, columns = stains; each cell shows ``examples``
    patches, each followed by its label map in the overlay colours (with
    ``style`` mix, the examples alternate between the two styles)."""
    _check_style(style)
    gap, cell_gap, left, top = 2, 10, 170, 28
    cell_w = examples * (2 * size + gap) + (examples - 1) * gap
    width = left + len(STAIN_NAMES) * (cell_w + cell_gap)
    height = top + len(CLASS_NAMES) * (size + cell_gap)
    sheet = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for si, stain in enumerate(STAIN_NAMES):
        x0 = left + si * (cell_w + cell_gap)
        cv2.putText(sheet, stain, (x0 + 4, 20), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for ci, label in enumerate(CLASS_NAMES):
        y0 = top + ci * (size + cell_gap)
        cv2.putText(sheet, label, (6, y0 + size // 2 + 5), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for si, stain in enumerate(STAIN_NAMES):
            x = left + si * (cell_w + cell_gap)
            for e in range(examples):
                render = _renderer(patch_style(style, e))
                rgb, labels = render(label, stain, patch_seed(seed, e), size, shift, mpp=mpp)
                sheet[y0 : y0 + size, x : x + size] = rgb
                x += size + gap
                sheet[y0 : y0 + size, x : x + size] = _mask_view(rgb, labels)
                x += size + 2 * gap
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_png(out, sheet)
    return out


def make_fixtures(out_dir: str | os.PathLike) -> Path:
    """The committed test fixture set: 5 classes x 3 stains x 2 patches at 64 px."""
    return generate_dataset(out_dir, 2, size=64, seed=0, shift=0.0, workers=1)


# ---------------------------------------------------------------------------
# Regions: a mosaic of patches, like an area exported from a slide
# ---------------------------------------------------------------------------

#: Classes whose deposits a region scatters by default (normal tissue fills the rest).
DEPOSIT_CLASSES: tuple[str, ...] = tuple(c for c in CLASS_NAMES if c != "normal")
#: Name in a region's tile grid of a tile with no tissue at all.
GLASS = "glass"
#: Width (px) of the band over which neighbouring region tiles are cross-faded.
REGION_FEATHER = 16
#: Smallest region side and largest region area accepted by render_region.
REGION_MIN_SIDE = 64
REGION_MAX_PIXELS = 16384 * 16384
# coarse sampling step (px) of the region's smooth 2-D fields
_FIELD_STEP = 8


@dataclass
class _TileContext:
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


@dataclass
class _Geometry:
    """The section's outline and layers, sampled so any tile can be cut out of it."""

    pad: int  # the 1-D and 2-D fields start at pixel -pad
    top: np.ndarray  # y (px) of the skin surface for every x
    top_cos: np.ndarray  # vertical -> perpendicular depth factor (surface slope)
    top_slope: np.ndarray
    bottom: np.ndarray | None  # y (px) of the deep cut edge for every x (glass below)
    side: str | None  # "left" / "right": which end of the section is in view
    edge: np.ndarray | None  # x (px) of that end for every y
    fields: dict[str, np.ndarray]  # smooth unit-variance fields on a _FIELD_STEP grid
    layers: dict[str, float]  # keratin, epidermis, papillary, subcutis, wobble amplitudes (um)


@dataclass
class RegionPlan:
    """What a synthetic region holds: its outline and the class drawn in every tile.

    ``grid[r][c]`` is the class rendered in tile (r, c) (``normal`` or a
    deposit class) or ``"glass"`` where the tile holds no tissue; ``tissue``
    is each tile's approximate tissue fraction. Rendering follows the plan, so
    one plan serves all three stains (serial sections of the same block).
    """

    width: int
    height: int
    seed: int
    tile: int
    mpp: float
    classes: tuple[str, ...]
    grid: list[list[str]]
    tissue: np.ndarray
    geometry: _Geometry = dataclasses.field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.grid)

    @property
    def cols(self) -> int:
        return len(self.grid[0])


def _smooth_1d(rng: np.random.Generator, length: int, scale: float) -> np.ndarray:
    """Smooth unit-variance noise of ``length`` samples, correlation length ~``scale``."""
    scale = max(float(scale), 1.0)
    k = int(length / scale) + 5
    knots = rng.standard_normal((1, k)).astype(np.float32)
    up = cv2.resize(knots, (int(k * scale), 1), interpolation=cv2.INTER_CUBIC)[0]
    off = int(1.5 * scale)
    out = up[off : off + length].astype(np.float64)
    return (out - out.mean()) / (out.std() + 1e-6)


def _smooth_2d(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth unit-variance 2-D noise, correlation length ~``scale`` samples."""
    scale = max(float(scale), 1.0)
    h, w = shape
    kh, kw = int(h / scale) + 5, int(w / scale) + 5
    knots = rng.standard_normal((kh, kw)).astype(np.float32)
    up = cv2.resize(knots, (int(kw * scale), int(kh * scale)), interpolation=cv2.INTER_CUBIC)
    off = int(1.5 * scale)
    out = up[off : off + h, off : off + w]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def _sample_field(geo: _Geometry, name: str, x0: int, y0: int, n: int) -> np.ndarray:
    """The n x n window of a smooth region field whose top-left pixel is (x0, y0)."""
    s = _FIELD_STEP
    m = np.float64([[1 / s, 0, (x0 + geo.pad) / s], [0, 1 / s, (y0 + geo.pad) / s]])
    return cv2.warpAffine(
        geo.fields[name],
        m,
        (n, n),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _inside(geo: _Geometry, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Section (tissue) mask on the grid xs x ys, without the fine surface wobble."""
    ix, iy = xs + geo.pad, ys + geo.pad
    ok = ys[:, None] >= geo.top[ix][None, :]
    if geo.bottom is not None:
        ok &= ys[:, None] <= geo.bottom[ix][None, :]
    if geo.side == "right":
        ok &= xs[None, :] <= geo.edge[iy][:, None]
    elif geo.side == "left":
        ok &= xs[None, :] >= geo.edge[iy][:, None]
    return ok


def _draw_geometry(
    rng: np.random.Generator, width: int, height: int, rows: int, cols: int, tile: int, mpp: float
) -> _Geometry:
    """One random section outline: skin surface on top, optional deep and side cut edges."""
    pad = REGION_FEATHER + 8
    nx, ny = cols * tile + 2 * pad, rows * tile + 2 * pad
    big = max(width, height)
    ppu = 1.0 / mpp
    # skin surface, gently undulating, with glass above it
    top = (
        height * rng.uniform(0.04, 0.16)
        + height * rng.uniform(0.015, 0.05) * _smooth_1d(rng, nx, big / 2.5)
        + ppu * rng.uniform(4, 12) * _smooth_1d(rng, nx, ppu * 120)
    )
    slope = np.gradient(top)
    bottom = side = edge = None
    if rng.random() < 0.55:  # the deep cut edge of the section (through fat or dermis)
        bottom = (
            height * rng.uniform(0.68, 0.95)
            + height * 0.05 * _smooth_1d(rng, nx, big / 3)
            + ppu * rng.uniform(8, 30) * _smooth_1d(rng, nx, ppu * 80)
        )
    if rng.random() < 0.5:  # one end of the section
        side = "right" if rng.random() < 0.5 else "left"
        e0 = rng.uniform(0.68, 0.92)
        wave = width * 0.05 * _smooth_1d(rng, ny, big / 3) + ppu * rng.uniform(8, 30) * _smooth_1d(
            rng, ny, ppu * 80
        )
        edge = (width * e0 + wave) if side == "right" else (width * (1 - e0) + wave)
    s = _FIELD_STEP
    shape = (ny // s + 3, nx // s + 3)
    fields = {
        "wobble": _smooth_2d(rng, shape, ppu * 25 / s),  # fine undulation of the layers
        "deep": _smooth_2d(rng, shape, ppu * 40 / s),
        "lobes": _smooth_2d(rng, shape, ppu * 160 / s),  # lobules of the subcutis boundary
        "thick": _smooth_2d(rng, shape, ppu * 30 / s),  # section thickness
        "light": _smooth_2d(rng, shape, ppu * 400 / s),  # uneven illumination
        "collagen": _smooth_2d(rng, shape, ppu * 300 / s),  # denser and looser dermis
        "septa": _smooth_2d(rng, shape, ppu * 250 / s),  # fat lobules: septa at zero crossings
    }
    keratin, epidermis = rng.uniform(5, 14), rng.uniform(22, 40)
    lo = np.clip(top[pad : pad + width], 0, height)
    hi = np.full(width, float(height)) if bottom is None else bottom[pad : pad + width]
    thickness_um = float(np.median(np.clip(hi - lo, 0, None))) * mpp
    dej = keratin + epidermis
    layers = {
        "keratin": keratin,
        "epidermis": epidermis,
        "papillary": rng.uniform(20, 45),
        "subcutis": dej + 60 + rng.uniform(0.3, 0.65) * max(thickness_um - dej - 60, 0),
        "wobble": rng.uniform(2, 6),
        "deep": rng.uniform(8, 25),
        "lobes": rng.uniform(20, 60),
        "septa": rng.uniform(0.03, 0.06),  # septum half-width, in units of the septa field
    }
    return _Geometry(pad, top, 1 / np.sqrt(1 + slope**2), slope, bottom, side, edge, fields, layers)


def _tile_fractions(
    geo: _Geometry, width: int, height: int, rows: int, cols: int, tile: int, mpp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile: tissue fraction, below-epidermis fraction, and whether it is surely glass."""
    step = 8
    xs, ys = np.arange(0, width, step), np.arange(0, height, step)
    inside = _inside(geo, xs, ys)
    depth_um = (ys[:, None] - geo.top[xs + geo.pad][None, :]) * mpp
    dej = geo.layers["keratin"] + geo.layers["epidermis"]
    deep = inside & (depth_um > dej + 15)
    # the fine wobble moves the outline by a few um: a tile is glass only if
    # no tissue lies within two lattice steps of it
    near = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    tissue = np.zeros((rows, cols))
    deep_frac = np.zeros((rows, cols))
    blank = np.zeros((rows, cols), bool)
    k = tile // step
    for r in range(rows):
        for c in range(cols):
            win = (slice(r * k, (r + 1) * k), slice(c * k, (c + 1) * k))
            tissue[r, c] = inside[win].mean()
            deep_frac[r, c] = deep[win].mean()
            blank[r, c] = not near[win].any()
    return tissue, deep_frac, blank


def _assign_classes(
    rng: np.random.Generator,
    deep_frac: np.ndarray,
    blank: np.ndarray,
    classes: tuple[str, ...],
) -> list[list[str]]:
    """Mostly normal tissue; deposits as small lesions of 1-3 neighbouring tiles.

    Every requested class gets at least one lesion when there are enough tiles
    with room below the epidermis; about a fifth of those tiles carry deposits.
    """
    rows, cols = deep_frac.shape
    grid = [[GLASS if blank[r, c] else "normal" for c in range(cols)] for r in range(rows)]
    eligible = {(r, c) for r in range(rows) for c in range(cols) if deep_frac[r, c] >= 0.6}
    if not classes or not eligible:
        return grid
    target = min(len(eligible), max(len(classes), round(rng.uniform(0.15, 0.3) * len(eligible))))
    order = [classes[i] for i in rng.permutation(len(classes))]
    placed, lesion = 0, 0
    while placed < target and eligible:
        label = order[lesion % len(order)]
        lesion += 1
        start = sorted(eligible)[int(rng.integers(len(eligible)))]
        cells, size = [start], int(rng.integers(1, 4))
        eligible.discard(start)
        # leave room for the classes that have not had a lesion yet
        unseen = max(0, len(order) - lesion)
        while len(cells) < size and placed + len(cells) + unseen < target:
            r, c = cells[int(rng.integers(len(cells)))]
            nbrs = [p for p in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if p in eligible]
            if not nbrs:
                break
            nxt = nbrs[int(rng.integers(len(nbrs)))]
            eligible.discard(nxt)
            cells.append(nxt)
        for r, c in cells:
            grid[r][c] = label
        placed += len(cells)
    return grid


def _check_region_args(width: int, height: int, tile: int, mpp: float, classes) -> tuple:
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or v < REGION_MIN_SIDE:
            raise ConfigError(f"region {name} must be an integer >= {REGION_MIN_SIDE}, got {v}")
    if width * height > REGION_MAX_PIXELS:
        raise ConfigError(
            f"region {width}x{height} is too large ({width * height / 1e6:.0f} Mpx; "
            f"at most {REGION_MAX_PIXELS / 1e6:.0f} Mpx): render several smaller regions"
        )
    if int(tile) != tile or tile < 32:
        raise ConfigError(f"region tile must be an integer >= 32 pixels, got {tile}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be > 0, got {mpp}")
    classes = DEPOSIT_CLASSES if classes is None else tuple(classes)
    for c in classes:
        if c not in DEPOSIT_CLASSES:
            raise ConfigError(
                f"unknown deposit class {c!r} for a region; choose from "
                f"{', '.join(DEPOSIT_CLASSES)} (normal tissue is always there)"
            )
    return tuple(dict.fromkeys(classes))


def plan_region(
    width: int,
    height: int,
    seed: int = 0,
    tile: int = 256,
    mpp: float = NOMINAL_MPP,
    classes: Sequence[str] | None = None,
) -> RegionPlan:
    """Lay out a synthetic region: section outline, layers and the class of every tile.

    The section has its skin surface near the top (glass above it), and often
    a deep cut edge and one end in view, so every region of at least 2 x 2
    tiles has whole tiles of bare glass as well as tissue. Deterministic in
    its arguments; the stain is chosen at rendering.
    """
    classes = _check_region_args(width, height, tile, mpp, classes)
    width, height, tile = int(width), int(height), int(tile)
    rows, cols = -(-height // tile), -(-width // tile)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, width, height, tile, 0x5EC7, 1])
    need_blank = rows >= 2 and cols >= 2
    for _attempt in range(24):
        geo = _draw_geometry(rng, width, height, rows, cols, tile, mpp)
        tissue, deep_frac, blank = _tile_fractions(geo, width, height, rows, cols, tile, mpp)
        if (blank.any() or not need_blank) and 0.35 <= tissue.mean() <= 0.9:
            break
    else:
        # rare: cut the section short on the right so the last column is glass
        wave = width * 0.03 * _smooth_1d(rng, rows * tile + 2 * geo.pad, max(width, height) / 3)
        geo.side, geo.edge = "right", (cols - 1) * tile - 24 - wave.max() + wave
        tissue, deep_frac, blank = _tile_fractions(geo, width, height, rows, cols, tile, mpp)
    grid = _assign_classes(rng, deep_frac, blank, classes)
    return RegionPlan(width, height, int(seed), tile, float(mpp), classes, grid, tissue, geo)


# state of a region being rendered, set in each worker process by _init_region_worker
_REGION_STATE: dict = {}


def _init_region_worker(state: dict) -> None:
    cv2.setNumThreads(1)
    _REGION_STATE.clear()
    _REGION_STATE.update(state)


def _region_tile_context(plan: RegionPlan, lab: dict, r: int, c: int, n: int) -> _TileContext:
    """Cut tile (r, c), with its feather margin, out of the region's layers and fields."""
    geo, lay, mpp = plan.geometry, plan.geometry.layers, plan.mpp
    m = (n - plan.tile) // 2
    x0, y0 = c * plan.tile - m, r * plan.tile - m
    xs, ys = np.arange(x0, x0 + n), np.arange(y0, y0 + n)
    ix = xs + geo.pad
    vertical = ys[:, None] - geo.top[ix][None, :]
    depth = vertical * (geo.top_cos[ix] * mpp)[None, :]
    depth = (depth + lay["wobble"] * _sample_field(geo, "wobble", x0, y0, n)).astype(np.float32)
    deep = (
        depth
        + lay["lobes"] * _sample_field(geo, "lobes", x0, y0, n)
        + lay["deep"] * _sample_field(geo, "deep", x0, y0, n)
    )
    outside = np.zeros((n, n), bool)
    if geo.bottom is not None:
        outside |= ys[:, None] > geo.bottom[ix][None, :]
    if geo.side == "right":
        outside |= xs[None, :] > geo.edge[ys + geo.pad][:, None]
    elif geo.side == "left":
        outside |= xs[None, :] < geo.edge[ys + geo.pad][:, None]
    thick = lab["thickness"] * (1 + 0.07 * _sample_field(geo, "thick", x0, y0, n))
    light = lab["background"] * (1 + 0.006 * _sample_field(geo, "light", x0, y0, n))
    return _TileContext(
        depth=depth,
        depth_deep=deep.astype(np.float32),
        outside=outside,
        theta=math.atan2(1.0, -float(geo.top_slope[ix[n // 2]])),
        keratin=lay["keratin"],
        epidermis=lay["epidermis"],
        papillary=lay["papillary"],
        subcutis=lay["subcutis"],
        lab=lab,
        thickness=thick.astype(np.float32),
        light=light.astype(np.float32),
        collagen=np.clip(0.8 + 0.1 * _sample_field(geo, "collagen", x0, y0, n), 0.55, 1.05),
        septa=_smoothstep(lay["septa"] - np.abs(_sample_field(geo, "septa", x0, y0, n)), 0, 0.02),
        margin=m,
    )


def _render_region_tile(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render tile (r, c) of the region in _REGION_STATE, feather margin included."""
    r, c = job
    st = _REGION_STATE
    plan: RegionPlan = st["plan"]
    label = plan.grid[r][c]
    label = "normal" if label == GLASS else label
    n = plan.tile + REGION_FEATHER
    ctx = _region_tile_context(plan, st["lab"], r, c, n)
    seed = patch_seed(plan.seed, r * plan.cols + c)
    ci = CLASS_NAMES.index(label)
    return _render_scene(label, st["stain"], ci, st["si"], seed, n, st["shift"], plan.mpp, ctx)


def _feather(n: int, m: int, first: bool, last: bool) -> np.ndarray:
    """Weights along one axis of a tile with margin ``m``: ramps where neighbours overlap.

    Rising and falling ramps are mirror images of a smoothstep, so a pixel's
    weights from the two tiles that cover it always add up to one.
    """
    w = np.ones(n, np.float32)
    t = (np.arange(2 * m, dtype=np.float32) + 0.5) / (2 * m)
    ramp = t * t * (3 - 2 * t)
    if not first:
        w[: 2 * m] = ramp
    if not last:
        w[n - 2 * m :] = ramp[::-1]
    return w


def render_plan(
    plan: RegionPlan, stain: str = "he", shift: float = 0.0, *, workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render a :class:`RegionPlan` in one stain: (RGB uint8 HxWx3, labels uint8 HxW).

    Tiles are rendered with a margin and cross-faded with their neighbours
    over :data:`REGION_FEATHER` px; each pixel's label comes from the tile
    whose weight dominates there (the tile's own cell). Only one row of tiles
    is held as floats at a time, so memory stays close to the output's size.
    """
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    if shift < 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")
    si = STAIN_NAMES.index(stain)
    # one staining run and one scanner for the whole region
    lab_rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, si, 0x5EC7, 2])
    style = _style_settings(np.random.default_rng([plan.seed & 0xFFFFFFFF, si, 0x57E]))
    lab = dict(_lab_settings(lab_rng, float(shift), style), style=style)
    state = {"plan": plan, "lab": lab, "stain": stain, "si": si, "shift": float(shift)}
    width, height, tile = plan.width, plan.height, plan.tile
    rows, cols = plan.rows, plan.cols
    m = REGION_FEATHER // 2
    n = tile + 2 * m
    rgb = np.empty((height, width, 3), np.uint8)
    labels = np.empty((height, width), np.uint8)
    # accumulator for one row of tiles: region rows [y0 - m, y0 + tile + m), columns from -m
    acc = np.zeros((n, cols * tile + 2 * m, 3), np.float32)
    jobs = [(r, c) for r in range(rows) for c in range(cols)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))

    def flush(rows_acc: np.ndarray, y_first: int) -> None:
        y0, y1 = max(y_first, 0), min(y_first + len(rows_acc), height)
        if y1 > y0:
            part = rows_acc[y0 - y_first : y1 - y_first, m : m + width]
            np.clip(part + 0.5, 0, 255, out=part)
            rgb[y0:y1] = part

    def consume(results) -> None:
        for (r, c), (img, lab_map) in zip(jobs, results, strict=True):
            wy = _feather(n, m, r == 0, r == rows - 1)
            wx = _feather(n, m, c == 0, c == cols - 1)
            acc[:, c * tile : c * tile + n] += img * (wy[:, None] * wx[None, :])[:, :, None]
            y0, x0 = r * tile, c * tile
            h, w = min(tile, height - y0), min(tile, width - x0)
            labels[y0 : y0 + h, x0 : x0 + w] = lab_map[m : m + h, m : m + w]
            if c == cols - 1:  # row of tiles done: its upper part is final
                flush(acc[:tile], y0 - m)
                acc[: 2 * m] = acc[tile:]
                acc[2 * m :] = 0
        flush(acc[: 2 * m], rows * tile - m)

    with _cv2_single_thread():
        if workers == 1:
            _init_region_worker(state)
            try:
                consume(map(_render_region_tile, jobs))
            finally:
                _REGION_STATE.clear()
        else:
            with mp.get_context().Pool(
                workers, initializer=_init_region_worker, initargs=(state,)
            ) as pool:
                consume(pool.imap(_render_region_tile, jobs, chunksize=max(1, cols // 4)))
    return rgb, labels


def render_region(
    width: int,
    height: int,
    seed: int = 0,
    stain: str = "he",
    shift: float = 0.0,
    tile: int = 256,
    mpp: float = NOMINAL_MPP,
    classes: Sequence[str] | None = None,
    *,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A large synthetic region, like one exported from a slide: (RGB uint8, labels uint8).

    A mosaic of generator tiles (``tile`` px) over one section: skin surface,
    dermis and subcutis run on from tile to tile, mostly normal tissue with
    small lesions of the deposit ``classes`` (default: all four), and bare
    glass above the surface and beyond the section's cut edges (label 0).
    Deterministic in its arguments, whatever ``workers``; see
    :func:`plan_region` for the layout and :func:`render_plan` for rendering.
    """
    plan = plan_region(width, height, seed, tile, mpp, classes)
    return render_plan(plan, stain, shift, workers=workers)


_REGION_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_region_size(text: str) -> tuple[int, int]:
    """``"2048x1024"`` -> (2048, 1024); a clear ConfigError for anything else."""
    match = _REGION_RE.match(str(text))
    if not match:
        raise ConfigError(
            f"--region must be WIDTHxHEIGHT in pixels, for example --region 2048x2048; got {text!r}"
        )
    width, height = int(match[1]), int(match[2])
    if min(width, height) < REGION_MIN_SIDE:
        raise ConfigError(
            f"--region {text}: each side must be at least {REGION_MIN_SIDE} pixels, "
            "for example --region 2048x2048"
        )
    if width * height > REGION_MAX_PIXELS:
        raise ConfigError(
            f"--region {text} is too large (at most {REGION_MAX_PIXELS / 1e6:.0f} Mpx, "
            "e.g. --region 16384x16384); render several smaller regions"
        )
    return width, height


def region_metadata(plan: RegionPlan, stain: str, shift: float) -> dict:
    """What a region's JSON side-car records: enough to regenerate it and to score on it."""
    return {
        "generator_version": GENERATOR_VERSION,
        "width": plan.width,
        "height": plan.height,
        "mpp": plan.mpp,
        "stain": stain,
        "seed": plan.seed,
        "shift": float(shift),
        "tile": plan.tile,
        "rows": plan.rows,
        "cols": plan.cols,
        "deposit_classes": list(plan.classes),
        "tile_classes": plan.grid,
        "tile_tissue_fraction": [[round(float(v), 3) for v in row] for row in plan.tissue],
        "label_values": {name: i for i, name in enumerate(DEPOSIT_LABELS)},
    }


def _grid_json(meta: dict) -> str:
    """JSON with one line per key, and one line per row for the tile grids (readable at 32 x 32)."""
    parts = []
    for key, value in meta.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
            parts.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _write_region_png(path: Path, image: np.ndarray) -> None:
    """Write a large region (RGB or labels) as PNG, atomically, without a second copy in memory.

    RGB pixels are swapped to OpenCV's BGR order in place, a band of rows at
    a time (the array is spent afterwards; ``cv2.cvtColor`` would clone the
    whole image first), and libpng streams the rows to disk, where a PIL
    image would hold another 4 bytes per pixel.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3:
        for y in range(0, image.shape[0], 256):
            band = image[y : y + 256]
            band[...] = band[..., ::-1]
    with atomic_path(path, suffix=".tmp.png") as tmp:  # OpenCV picks the encoder by suffix
        if not cv2.imwrite(str(tmp), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise DataError(
                f"could not write {path} (OpenCV imwrite failed; is the folder writable?)"
            )


def _run_synth_region(args, region: str, stain: str) -> int:
    width, height = parse_region_size(region)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(
            f"with --region, --out is the PNG file to write (e.g. --out region.png); got {args.out!r}"
        )
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown --stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    plan = plan_region(width, height, args.seed, mpp=args.mpp)
    rgb, labels = render_plan(plan, stain, args.shift, workers=args.workers)
    labels_path = out.with_name(f"{out.stem}_labels.png")
    json_path = out.with_suffix(".json")
    _write_region_png(out, rgb)
    del rgb
    _write_region_png(labels_path, labels)
    # the JSON side-car last: its presence means the region is complete
    atomic_write_text(json_path, _grid_json(region_metadata(plan, stain, args.shift)))
    n_dep = sum(cell in DEPOSIT_CLASSES for row in plan.grid for cell in row)
    n_glass = sum(cell == GLASS for row in plan.grid for cell in row)
    print(
        f"wrote {out} ({width}x{height} px, {plan.mpp} um/px, {stain}; {plan.rows}x{plan.cols} "
        f"tiles of {plan.tile} px: {n_dep} with deposits, {n_glass} bare glass), "
        f"{labels_path.name} and {json_path.name}"
    )
    return 0


def run_synth(args) -> int:
    """``calcinosis synth``: a patch dataset (and optionally a contact sheet), or with
    ``--region WxH`` one large region PNG with its label map and JSON side-car."""
    region = getattr(args, "region", None)
    stain = getattr(args, "stain", None)
    if region is not None:
        return _run_synth_region(args, region, stain or "he")
    if stain is not None:
        raise ConfigError("--stain applies only with --region (a dataset holds all three stains)")
    manifest = generate_dataset(
        args.out,
        args.n_per_class_stain,
        size=args.size,
        seed=args.seed,
        shift=args.shift,
        workers=args.workers,
        mpp=args.mpp,
        style=args.style,
        supersample=getattr(args, "supersample", 1),
    )
    n = args.n_per_class_stain * len(CLASS_NAMES) * len(STAIN_NAMES)
    print(f"wrote {n} patches ({args.size} px, {args.mpp} um/px) and {manifest}")
    if getattr(args, "sheet", None):
        sheet = contact_sheet(
            args.sheet,
            size=args.size,
            seed=args.seed,
            shift=args.shift,
            mpp=args.mpp,
            style=args.style,
        )
        print(f"wrote contact sheet {sheet}")
    return 0
