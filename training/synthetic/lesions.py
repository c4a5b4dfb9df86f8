"""Style A's deposits: calcium, urate and amyloid, and the tissue reaction around them.

Each painter draws the structure a pathologist uses to tell the deposits
apart (amorphous cracked calcium with granules and giant cells, feathery
urate with needle clefts and a histiocyte palisade, homogeneous fissured
amyloid with retraction clefts) and writes its pixels into the label map.
Bone (osteoma cutis) is in :mod:`.bone`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calcinosis.model.labels import AMYLOID, CALCIUM, URATE

from .bone import osteoma
from .optics import AMYL, CALC, HISTIO, NUC, STROMA, URATEM
from .scene import Scene, blob_field, boundary_points, gradient_dir, signed_distance, smoothstep
from .tissue import Layout


def _crack_lines(
    sc: Scene,
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


def _calcinosis(sc: Scene, lay: Layout) -> None:
    """Calcium: fine granules merging into plaques, large cracked masses, or both."""
    rng = sc.rng
    mode = rng.choice(["granular", "mass", "mixed"], p=[0.4, 0.4, 0.2])
    calc = np.zeros((sc.n, sc.n), np.float32)
    if mode in ("granular", "mixed"):
        calc = _calcium_granules(sc, lay, calc)
    if mode in ("mass", "mixed"):
        calc = _calcium_masses(sc, lay.deep, calc)
    sc.labels[(calc > 0.3) & lay.deep] = CALCIUM


def _calcium_granules(sc: Scene, lay: Layout, calc: np.ndarray) -> np.ndarray:
    """Clusters of fine granules that merge into small amorphous plaques; the calcium map."""
    rng = sc.rng
    deep = lay.deep
    k = int(rng.integers(1, 4))
    centres = sc.sample_in(lay.dermis if lay.dermis.any() else deep, k)
    radii = [sc.px(rng.uniform(8, 35)) for _ in range(k)]
    clus = blob_field(sc, centres, radii, sc.px(rng.uniform(3, 8)), 10)
    dens = smoothstep(clus, -sc.px(6), sc.px(6))
    gran = np.zeros_like(calc)
    m = int(dens.sum() / sc.px(rng.uniform(2.5, 5)) ** 2)
    for x, y in sc.sample_in(dens > 0.2, m) if m else []:
        r = sc.px(rng.uniform(0.4, 2.0) ** 1.5)
        centre, radius = (int(x * 16), int(y * 16)), max(int(r * 16), 8)
        cv2.circle(gran, centre, radius, float(rng.uniform(0.6, 1.3)), -1, cv2.LINE_8, 4)
    dust = smoothstep(sc.fine_noise(sc.px(0.6)), 0.8, 1.6) * dens
    plaque = smoothstep(clus, sc.px(rng.uniform(3, 12)), sc.px(14))
    calc = np.maximum(calc, np.maximum(gran * (dens > 0.1), dust))
    calc = np.maximum(calc, plaque * (0.85 + 0.2 * sc.fine_noise(1.0)))
    calc *= deep
    sc.c[STROMA] *= 1 - 0.6 * np.clip(calc, 0, 1)
    sc.c[CALC] += calc
    return calc


def _calcium_masses(sc: Scene, deep: np.ndarray, calc: np.ndarray) -> np.ndarray:
    """Large lobulated masses with sharp cracks, a giant-cell rim or fibrosis; ``calc``
    with the masses added."""
    rng = sc.rng
    k = int(rng.integers(1, 4))
    centres = sc.sample_in(deep, k)
    big = sc.n / sc.ppu  # patch side in um
    radii = [sc.px(rng.uniform(0.1, 0.6) * big + 4) for _ in range(k)]
    field = blob_field(sc, centres, radii, sc.px(rng.uniform(2, 8)), rng.uniform(8, 25))
    mass = smoothstep(field, -1.0, 1.0) * deep
    tex = 0.9 + 0.18 * sc.noise(rng.uniform(3, 8)) + 0.12 * sc.fine_noise(0.8)
    # the edge breaks up into granules
    edge = (field > -sc.px(4)) & (field < sc.px(3)) & deep
    gr = smoothstep(sc.fine_noise(sc.px(0.7)), 0.3, 1.0) * edge
    conc = np.clip(rng.uniform(0.8, 1.2) * tex, 0.3, 1.6)
    sc.paint(CALC, np.maximum(mass, gr * 0.9), conc, displace=1.0)
    calc = np.maximum(calc, np.maximum(mass, gr))
    if rng.random() < 0.45:
        _foreign_body_rim(sc, mass, deep)
    if rng.random() < 0.4:
        _fibrosis(sc, mass, deep)
    cracks = _crack_lines(sc, mass, int(rng.integers(0, 5)), (1, 2.6), 0.05, 60)
    sc.clear(cracks)
    return calc


def _giant_cell(sc: Scene, x: float, y: float, length: float, ang_deg: float) -> None:
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


def _foreign_body_rim(sc: Scene, mass: np.ndarray, allowed: np.ndarray) -> None:
    rng = sc.rng
    sd = signed_distance(mass)
    gx, gy = gradient_dir(sd)
    pts = boundary_points(mass, sc.px(rng.uniform(25, 45)), rng)
    for x, y in pts[: int(rng.integers(1, 5))]:
        xi, yi = int(x), int(y)
        nx, ny = gx[yi, xi], gy[yi, xi]
        length = sc.px(rng.uniform(25, 50))
        off = length * 0.18
        if not allowed[yi, xi]:
            continue
        _giant_cell(sc, x + nx * off, y + ny * off, length, math.degrees(math.atan2(ny, nx)) + 90)


def _fibrosis(sc: Scene, mass: np.ndarray, allowed: np.ndarray) -> None:
    """Dense collagen wrapped round a deposit, with flattened fibroblasts."""
    rng = sc.rng
    sd = signed_distance(mass)
    width = sc.px(rng.uniform(6, 18))
    band = smoothstep(sd, -0.5, 1.5) * smoothstep(width - sd, 0, 3) * allowed
    lam = 0.9 + 0.07 * np.sin(2 * np.pi * sd / sc.px(3.0) + 0.8 * sc.noise(10))
    sc.paint(STROMA, band, lam * rng.uniform(0.9, 1.2), displace=0.9)
    gx, gy = gradient_dir(sd)
    for x, y in sc.sample_in(band > 0.5, int(band.sum() / sc.px(12) ** 2)) if band.any() else []:
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(gy[yi, xi], gx[yi, xi])) + 90
        sc.ellipse(NUC, x, y, sc.px(rng.uniform(5, 8)), sc.px(1.1), ang, 0.9)


def _gout(sc: Scene, lay: Layout) -> None:
    """A tophus: feathery urate with needle clefts, ringed by palisading histiocytes."""
    rng = sc.rng
    deep = lay.deep
    big = sc.n / sc.ppu
    k = int(rng.integers(1, 3))
    centres = sc.sample_in(deep, k)
    radii = [sc.px(rng.uniform(0.2, 0.9) * big + 8) for _ in range(k)]
    field = blob_field(sc, centres, radii, sc.px(rng.uniform(3, 9)), 20)
    toph = smoothstep(field, -1, 1) * deep
    _palisade(sc, toph, deep)
    _urate(sc, toph)
    sc.labels[(toph > 0.5)] = URATE


def _palisade(sc: Scene, toph: np.ndarray, deep: np.ndarray) -> None:
    """Palisading histiocytes ring the tophus, nuclei pointing radially; a few giant cells."""
    rng = sc.rng
    sd = signed_distance(toph)
    gx, gy = gradient_dir(sd)
    rim_w = sc.px(rng.uniform(14, 30))
    rim = ((sd > 0) & (sd < rim_w) & deep).astype(np.float32)
    sc.paint(HISTIO, rim, rng.uniform(0.55, 0.85) * (1 + 0.15 * sc.noise(5)), displace=0.85)
    pts = boundary_points(toph, sc.px(rng.uniform(4, 6)), rng)
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


def _urate(sc: Scene, toph: np.ndarray) -> None:
    """Urate: amorphous, feathery streaks, sheaves of needle-shaped clefts."""
    rng = sc.rng
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


def _amyloidosis(sc: Scene, lay: Layout) -> None:
    """Amyloid: homogeneous, waxy globules or nodules with fissures and retraction clefts."""
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
    field = blob_field(sc, centres, radii, sc.px(rng.uniform(1.5, 4)), 15)
    glob = smoothstep(field, -1.0, 1.0) * deep
    # homogeneous, waxy: only very low-frequency variation
    conc = rng.uniform(0.75, 1.05) * (1 + 0.04 * sc.noise(20) + 0.02 * sc.fine_noise(1.0))
    sc.paint(AMYL, glob, conc, displace=1.0)
    # retraction cleft separating part of a globule from the collagen
    if rng.random() < 0.85:
        sd = signed_distance(glob)
        ring = (np.abs(sd - 1.0) < sc.px(rng.uniform(0.8, 2.0))) * (sc.noise(15) > -0.4) * deep
        sc.clear(ring.astype(np.float32))
    # fissures
    cracks = _crack_lines(sc, glob, int(rng.integers(2, 7)), (1, 1.8), 0.18, 40)
    sc.clear(cracks * 0.9)
    # few nuclei: an occasional fibroblast at the edge
    for x, y in sc.sample_in(glob > 0.5, int(rng.integers(0, 3))):
        sc.ellipse(NUC, x, y, sc.px(4), sc.px(1.3), rng.uniform(0, 180), 0.7)
    sc.labels[glob > 0.5] = AMYLOID


def lesion_room(sc: Scene, margin: int) -> np.ndarray:
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


#: The painter of each deposit class (``normal`` has none).
DEPOSITS = {
    "calcinosis_cutis": _calcinosis,
    "osteoma_cutis": osteoma,
    "gout": _gout,
    "amyloidosis": _amyloidosis,
}
