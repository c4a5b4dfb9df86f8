"""Style B's deposits: calcium, urate and amyloid, and the reaction around them.

Bone (osteoma cutis) is in :mod:`.bone`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calcinosis.model.labels import AMYLOID, BACKGROUND, CALCIUM, URATE

from .bone import osteoma
from .canvas import TWO_PI, Canvas, pick_one
from .layout import Layout
from .shapes import blobs, contour_points, disk, jagged, nuclei, star
from .tissue import u8


def _giant_cells(cv: Canvas, pts: np.ndarray, normals: np.ndarray, allowed: np.ndarray) -> None:
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
        poly = blobs(
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
            t = rng.uniform(0, TWO_PI, m)
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
        nuclei(cv, nm, p, (2.3, 3.0), (1.7, 2.2), None, 0.08, 230)
    a = allowed.astype(np.float32)
    cv.put(cv.alpha(cyto, 0.95) * a, "histiocyte")
    cv.put(cv.alpha(nm) * a, "nucleus", shade=cv.speckle)


def _fibrous_ring(cv: Canvas, lesion: np.ndarray, allowed: np.ndarray) -> None:
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
    pts, nrm = contour_points(lesion, cv.px(rng.uniform(10, 18)), rng)
    if len(pts):
        off = rng.uniform(0.2, 1.0, (len(pts), 1)) * width
        p = pts + nrm * off
        ang = np.arctan2(nrm[:, 1], nrm[:, 0]) + math.pi / 2
        m = cv.blank()
        nuclei(cv, m, p, (4.0, 6.5), (0.9, 1.3), ang, 0.05, 230)
        cv.put(cv.alpha(m) * keep, "nucleus", shade=cv.speckle)


def _calcinosis(cv: Canvas, lay: Layout, scale: float) -> None:
    """Calcium: cracked solid masses whose edge crumbles, granule clusters, or both."""
    rng = cv.rng
    deep = lay.deep
    mode = pick_one(rng, ("mass", "granular", "mixed"), (0.45, 0.3, 0.25))
    body = cv.blank()  # solid masses
    gran = cv.blank()  # granules and small plaques
    if mode in ("mass", "mixed"):
        _calcium_masses(cv, deep, scale, body, gran)
    if mode in ("granular", "mixed"):
        _calcium_granules(cv, lay.dermis if lay.dermis.any() else deep, scale, gran)
    body[~deep] = 0
    gran[~deep] = 0
    solid = body > 127
    free = deep & (cv.labels == 0)  # a retry must not paint tissue over earlier deposit
    if solid.any():
        if rng.random() < 0.4:
            _fibrous_ring(cv, u8(solid), free & ~solid)
        if rng.random() < 0.45:
            p, nv = contour_points(u8(solid), cv.px(rng.uniform(25, 45)), rng)
            if len(p):
                sel = rng.permutation(len(p))[: int(rng.integers(1, 4))]
                _giant_cells(cv, p[sel], nv[sel], free & ~solid)
    both = _paint_calcium(cv, body, gran, solid)
    cracks = _cracks(cv, solid, scale)
    cv.labels[(both > 127) & deep] = CALCIUM
    cv.labels[cracks > 127] = BACKGROUND


def _calcium_masses(
    cv: Canvas, deep: np.ndarray, scale: float, body: np.ndarray, gran: np.ndarray
) -> None:
    """Lobulated solid masses into ``body``, the granules their edge crumbles into into ``gran``."""
    rng = cv.rng
    for x, y in cv.pick(deep, int(rng.integers(1, 4))):
        r = cv.px(rng.uniform(0.12, 0.4) * cv.side_um * scale + 4)
        lobes, jag = rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.08)
        poly = star(rng, x, y, r, lobes, jag, 90, rng.uniform(0.7, 1.4), rng.uniform(0, math.pi))
        cv.fill(body, [poly])
        m = int(rng.integers(10, 60))
        t = rng.uniform(0, TWO_PI, m)
        rr = r * rng.uniform(0.85, 1.25, m)
        pts = np.stack([x + rr * np.cos(t), y + rr * np.sin(t)], 1)
        rad = cv.px(1.0) * rng.lognormal(0.4, 0.5, m)
        cv.fill(gran, blobs(rng, pts, rad, rng.uniform(1, 1.6, m), rng.uniform(0, 3, m), 7, 0.15))


def _calcium_granules(cv: Canvas, region: np.ndarray, scale: float, gran: np.ndarray) -> None:
    """Clusters of granules in ``region``, some merging into small amorphous plaques."""
    rng = cv.rng
    for x, y in cv.pick(region, int(rng.integers(1, 4))):
        rc = cv.px(rng.uniform(10, 40) * scale)
        m = int(np.clip((rc / max(cv.px(2.8), 0.8)) ** 2 * rng.uniform(0.5, 1.1), 10, 1500))
        a = rng.uniform(0, TWO_PI, m)
        rr = rc * np.sqrt(rng.uniform(0, 1, m))
        pts = np.stack([x + rr * np.cos(a), y + rr * np.sin(a)], 1)
        rad = cv.px(1.0) * rng.lognormal(0.3, 0.55, m)
        cv.fill(gran, blobs(rng, pts, rad, rng.uniform(1, 1.7, m), rng.uniform(0, 3, m), 7, 0.18))
        for px_, py_ in pts[: int(rng.integers(0, 4))]:
            rp = cv.px(rng.uniform(3, 10))
            aspect, angle = rng.uniform(0.7, 1.4), rng.uniform(0, 3)
            cv.fill(gran, [star(rng, px_, py_, rp, 0.5, 0.1, 28, aspect, angle)])


def _paint_calcium(cv: Canvas, body: np.ndarray, gran: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Composite the calcium: pebbly (cellular noise), darker towards the rim, fine granular
    dust. Returns the calcium's coverage (masses and granules)."""
    rng = cv.rng
    coarse = 1 - np.minimum(cv.cells(rng.uniform(5, 12)), 1)
    fine = 1 - np.minimum(cv.cells(rng.uniform(1.5, 3.5)), 1)
    shade = 0.8 + 0.25 * coarse + 0.12 * fine + 0.06 * cv.medium
    if solid.any() and rng.random() < 0.7:
        inner = cv2.erode(u8(solid), disk(cv.px(rng.uniform(2, 6))))
        shade = shade + 0.25 * ((body > 0) & (inner == 0))
    both = np.maximum(body, gran)
    cv.put_mix(
        cv.alpha(both, rng.uniform(0.92, 1.0)),
        "calcium",
        "calcium_dark",
        np.clip((shade - 0.8) * 1.4, 0, 1),
    )
    return both


def _cracks(cv: Canvas, solid: np.ndarray, scale: float) -> np.ndarray:
    """Sharp sectioning cracks through the masses (aliased lines); their mask."""
    rng = cv.rng
    cracks = cv.blank()
    if solid.any():
        k = int(rng.integers(1, 7))
        lines = jagged(cv, cv.pick(solid, k), rng.uniform(30, 90) * scale, rng.uniform(0.25, 0.6))
        lt, cv.lt = cv.lt, cv2.LINE_8
        cv.stroke(cracks, lines, max(cv.px(rng.uniform(0.8, 2.0)), 1), 255)
        cv.lt = lt
        cracks[~solid] = 0
        cv.put(cracks.astype(np.float32) / 255.0, "lumen")
    return cracks


def _gout(cv: Canvas, lay: Layout, scale: float) -> None:
    """A tophus: feathery urate with needle clefts, ringed by palisading histiocytes."""
    deep = lay.deep
    toph = _tophus(cv, deep, scale)
    toph[~deep] = 0
    tm = toph > 127
    if not tm.any():
        return
    _palisade(cv, tm, deep)
    _urate(cv, tm)
    cv.labels[tm] = URATE


def _tophus(cv: Canvas, deep: np.ndarray, scale: float) -> np.ndarray:
    """One or two lobulated tophus outlines, filled."""
    rng = cv.rng
    toph = cv.blank()
    for x, y in cv.pick(deep, int(rng.integers(1, 3))):
        r = cv.px(rng.uniform(0.18, 0.45) * cv.side_um * scale + 8)
        lobes = rng.uniform(0.2, 0.5)
        aspect, angle = rng.uniform(0.75, 1.3), rng.uniform(0, math.pi)
        cv.fill(toph, [star(rng, x, y, r, lobes, 0.015, 80, aspect, angle)])
    return toph


def _palisade(cv: Canvas, tm: np.ndarray, deep: np.ndarray) -> None:
    """Palisade of histiocytes round the tophus ``tm``, nuclei pointing at it; giant cells."""
    rng = cv.rng
    rim_w = cv.px(rng.uniform(10, 26))
    dil = cv2.dilate(u8(tm), disk(rim_w))
    free = deep & (cv.labels == 0)
    rim = (dil > 0) & ~tm & free
    cv.put(
        rim.astype(np.float32) * rng.uniform(0.7, 0.95),
        "histiocyte",
        shade=1 + 0.1 * cv.medium.T,
    )
    pts, nrm = contour_points(u8(tm), cv.px(rng.uniform(5.5, 8.0)), rng)
    nm = cv.blank()
    if len(pts):
        rows = int(rng.integers(1, 3))
        for row in range(rows):
            off = rim_w * (0.22 + 0.45 * row + rng.uniform(-0.06, 0.06, (len(pts), 1)))
            p = pts + nrm * off + rng.normal(0, cv.px(0.8), pts.shape)
            ang = np.arctan2(nrm[:, 1], nrm[:, 0])  # long axis pointing at the tophus
            nuclei(cv, nm, p, (4.5, 7.0), (1.3, 1.8), ang, 0.06, 220)
        nm[~rim] = 0
    cv.put(cv.alpha(nm), "nucleus", shade=cv.speckle)
    if len(pts) and rng.random() < 0.7:
        sel = rng.permutation(len(pts))[: int(rng.integers(1, 4))]
        _giant_cells(cv, pts[sel], nrm[sel], free & ~tm)


def _urate(cv: Canvas, tm: np.ndarray) -> None:
    """Urate: pale pink-grey, feathery strokes in sheaves, needle-shaped clefts."""
    rng = cv.rng
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


def _amyloidosis(cv: Canvas, lay: Layout, scale: float) -> None:
    """Amyloid: homogeneous, waxy globules or nodules with fissures and retraction clefts."""
    rng = cv.rng
    deep = lay.deep
    glob = _globules(cv, lay, scale)
    glob[~deep] = 0
    gm = glob > 127
    if not gm.any():
        return
    # homogeneous and waxy: only a faint, very smooth variation
    cv.put(cv.alpha(glob), "amyloid", shade=1 + 0.04 * cv.broad[::-1])
    if rng.random() < 0.85:
        _retraction_cleft(cv, gm, deep)
    fis = _fissures(cv, gm, scale)
    # very few nuclei
    kn = int(rng.integers(0, 3))
    m = cv.blank()
    if kn:
        nuclei(cv, m, cv.pick(gm, kn), (3.5, 5.0), (1.0, 1.5), None, 0.06, 230)
        m[~gm] = 0
        cv.put(cv.alpha(m), "nucleus", shade=cv.speckle)
    cv.labels[gm] = AMYLOID
    cv.labels[(fis > 127) | (m > 127)] = BACKGROUND


def _globules(cv: Canvas, lay: Layout, scale: float) -> np.ndarray:
    """Small lichen/macular globules (often under the epidermis) or large nodules, filled."""
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
        lobes = rng.uniform(0.1, 0.35)
        aspect, angle = rng.uniform(0.8, 1.3), rng.uniform(0, math.pi)
        cv.fill(glob, [star(rng, x, y, r, lobes, 0.004, 64, aspect, angle)])
    return glob


def _retraction_cleft(cv: Canvas, gm: np.ndarray, deep: np.ndarray) -> None:
    """A retraction cleft along part of the globules' margin, outside them."""
    rng = cv.rng
    pts, _ = contour_points(u8(gm), 1.0, rng)
    if len(pts) <= 8:
        return
    cleft = cv.blank()
    j0 = int(rng.integers(0, len(pts)))
    ln = int(len(pts) * rng.uniform(0.15, 0.5))
    arc = pts[np.arange(j0, j0 + ln) % len(pts)]
    d = np.linalg.norm(np.diff(arc, axis=0), axis=1)
    pieces = np.split(arc, np.flatnonzero(d > 3) + 1)
    width = max(cv.px(rng.uniform(1.0, 2.5)), 1)
    cv.stroke(cleft, [p for p in pieces if len(p) > 2], width, 255)
    cleft[gm | ~deep | (cv.labels != 0)] = 0
    cv.put(cv.alpha(cleft), "lumen")


def _fissures(cv: Canvas, gm: np.ndarray, scale: float) -> np.ndarray:
    """Jagged fissures through the amyloid; their mask."""
    rng = cv.rng
    k = int(rng.integers(1, 6)) + int(gm.sum() / max(cv.px(60) ** 2, 1))
    lines = jagged(cv, cv.pick(gm, k), rng.uniform(15, 50) * scale, rng.uniform(0.15, 0.4))
    fis = cv.blank()
    cv.stroke(fis, lines, max(cv.px(rng.uniform(0.7, 1.6)), 1), 255)
    fis[~gm] = 0
    cv.put(cv.alpha(fis, rng.uniform(0.7, 1.0)), "lumen")
    return fis


LESIONS = {
    "calcinosis_cutis": _calcinosis,
    "osteoma_cutis": osteoma,
    "gout": _gout,
    "amyloidosis": _amyloidosis,
}
