"""Style A's ordinary skin: epidermis, dermis, subcutis, vessels, adnexa, inflammation.

The amount of epidermis, dermis and fat in a patch varies independently of its
class, so that only a lesion's own structure tells the classes apart.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .contract import fibroblast_spacing_um2
from .optics import HISTIO, KERATIN, NUC, RBC, STROMA
from .scene import (
    Scene,
    TileContext,
    gradient_dir,
    poisson_points,
    smoothstep,
    streaks,
    voronoi,
)


class Layout:
    """Depth (um below the skin surface) of every pixel, and region masks."""

    # set only for region tiles: collagen density map and fat septa from the region
    collagen: np.ndarray | None = None
    septa: np.ndarray | None = None

    def __init__(self, sc: Scene, label: str, ctx: TileContext | None = None) -> None:
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

    def _from_region(self, ctx: TileContext) -> None:
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


def _collagen(sc: Scene, lay: Layout, region: np.ndarray) -> None:
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
    cleft = smoothstep(s, 0.72, 0.95) * smoothstep(along, -0.6, 0.4)
    fibril = 0.13 * streaks(sc, ang, 6.0, dx, dy)
    dense = rng.uniform(0.6, 1.0)
    if lay.collagen is not None:  # a region tile: density varies smoothly over the region
        dense = lay.collagen
    # loose to sclerotic: dense collagen is as eosinophilic as bone, in every class
    dense = dense * sc.style["coll_density"]
    coll = dense * (0.92 + fibril + 0.06 * sc.noise(8)) * (1 - 0.9 * cleft)
    # papillary dermis: looser, finer, paler
    pap = smoothstep(lay.dej + lay.papillary - lay.depth, -5, 5)
    fine = 0.55 + 0.25 * np.abs(sc.fine_noise(1.5)).clip(0, 2) / 2
    coll = coll * (1 - pap) + pap * fine * dense * 0.8
    sc.c[STROMA] += region * np.clip(coll, 0, 1.4)
    # fibroblast nuclei, elongated along the bundles: cellular dermis in half the
    # patches, paucicellular (reticular or sclerotic) dermis in the other half
    area_um2 = region.mean() * (sc.n / sc.ppu) ** 2
    k = rng.poisson(area_um2 / fibroblast_spacing_um2(rng))
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


def fat_cells(sc: Scene, region: np.ndarray, cell_um: tuple[float, float] = (40, 90)) -> None:
    """Adipocytes: clear polygonal cells with thin pink septa and flat nuclei."""
    rng = sc.rng
    spacing = sc.px(rng.uniform(*cell_um))
    _, border = voronoi(sc, spacing, warp_um=rng.uniform(1, 4))
    width = sc.px(rng.uniform(0.4, 0.9))
    memb = np.clip(cv2.GaussianBlur(border, (0, 0), width) * (1.2 + 2.0 * width), 0, 1)
    sc.c[STROMA] *= 1 - region  # fat displaces collagen
    sc.c[STROMA] += region * memb * rng.uniform(0.6, 0.95)
    # a few flattened nuclei sitting on the membranes
    on = (memb > 0.6) & (region > 0.5)
    length_px = on.sum() / (1.0 + 2 * width)
    k = rng.poisson(length_px / sc.px(70))
    gx, gy = gradient_dir(memb)
    for x, y in sc.sample_in(on, k) if k else []:
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(gy[yi, xi], gx[yi, xi])) + 90
        sc.ellipse(NUC, x, y, sc.px(rng.uniform(4, 6)), sc.px(1.0), ang, rng.uniform(0.7, 0.95))


def _vessel(sc: Scene, x: float, y: float) -> None:
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


def _gland(sc: Scene, x: float, y: float) -> None:
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


def _epidermis(sc: Scene, lay: Layout) -> None:
    """Keratin, keratinocytes (flattening upward), granular layer and basal row."""
    rng = sc.rng
    d = lay.depth
    # stratum corneum: basket-weave keratin lamellae
    ker = (d >= 0) & (d < lay.keratin)
    lam = np.sin(2 * np.pi * d / rng.uniform(1.5, 3.0) + 2.0 * sc.noise(6))
    sc.c[KERATIN] += ker * rng.uniform(0.7, 1.2) * smoothstep(lam, -0.5, 0.3)
    viable = ((d >= lay.keratin) & (d < lay.dej)).astype(np.float32)
    spacing = sc.px(rng.uniform(8, 10.5))
    _, border = voronoi(sc, spacing, warp_um=0.8)
    cyto = rng.uniform(0.6, 0.9) * (1 + 0.35 * cv2.GaussianBlur(border, (0, 0), 0.7))
    sc.c[STROMA] += viable * cyto
    # granular layer just under the keratin
    gran = (d >= lay.keratin) & (d < lay.keratin + rng.uniform(2, 5))
    dots = (sc.fine_noise(0.8) > 1.2) & gran
    sc.c[NUC] += dots * 0.9
    # keratinocyte nuclei, flattening towards the surface
    pts = poisson_points(sc, viable > 0.5, spacing * 0.85, 500)
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
    for x, y in poisson_points(sc, band, sc.px(6.5), 200):
        sc.ellipse(
            NUC, x, y, sc.px(3.8), sc.px(2.2), along + 90 + rng.normal(0, 12), rng.uniform(0.9, 1.1)
        )


def base_tissue(sc: Scene, lay: Layout) -> None:
    rng = sc.rng
    dermis = lay.dermis.astype(np.float32)
    fat = lay.fat.astype(np.float32)
    if dermis.any():
        _collagen(sc, lay, dermis)
    if fat.any():
        fat_cells(sc, fat)
        # fibrous septa between lobules
        if lay.septa is not None:  # a region tile: septa run on across tiles
            sc.paint(STROMA, fat * lay.septa, 0.85)
        elif rng.random() < 0.5:
            x, y = sc.sample_in(lay.fat)[0]
            ang = rng.uniform(0, math.pi)
            dist = np.abs((sc.xx - x) * math.sin(ang) - (sc.yy - y) * math.cos(ang))
            sep = fat * smoothstep(
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


def _lymphocytes(sc: Scene, region: np.ndarray) -> None:
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
