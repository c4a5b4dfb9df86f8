"""Style B's ordinary skin: stroked collagen, ellipse-packed fat, tiled epidermis, vessels."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..contract import fibroblast_spacing_um2
from .canvas import TWO_PI, Canvas, bbox, fixed_point
from .layout import Layout
from .shapes import blobs, nuclei, wavy_curves


def u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


def _dermis(cv: Canvas, lay: Layout, nuc: np.ndarray) -> None:
    """Pale ground crossed by bundles of stroked collagen fibres; fibroblasts along them."""
    rng = cv.rng
    region = lay.dermis
    if not region.any():
        return
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
    curves, strokes, dark, length, step = _bundles(cv, a_reg, dense, pink, base_ang)
    # papillary dermis: finer, looser, randomly oriented fibres
    if lay.kind == "surface":
        pap = region & (lay.depth < lay.dej + lay.papillary)
        if pap.any():
            strokes[pap] = 0
            dark[pap] = 0
            kp = int(np.clip(1.2 * pap.sum() / max(cv.px(2.0) * length * 0.4, 1), 2, 400))
            starts, angs = cv.pick(pap, kp), rng.uniform(0, math.pi, kp)
            pc = wavy_curves(rng, starts, angs, length * 0.4, step, 0.5, cv.px(20))
            cv.stroke(strokes, pc, cv.px(rng.uniform(1.0, 2.2)), 200)
    fib = 0.85 + 0.15 * rng.random()
    fibrils = cv.waves(rng.uniform(2.5, 5.0), 10, base_ang + math.pi / 2, 0.15)
    shade = 1 + rng.uniform(0.06, 0.16) * fibrils
    cv.put(cv.alpha(strokes, fib) * a_reg, "collagen", shade=shade)
    cv.put(cv.alpha(dark, fib) * a_reg, "sclerotic", shade=shade)
    if rng.random() < 0.35 + 0.55 * dense:
        # retraction clefts between bundles (a fixation artefact of any dermis, so
        # of every class: curved white slits in collagen must not say "fissured amyloid")
        kc = int(rng.integers(2, 8) + 10 * dense)
        starts, angs = cv.pick(region, kc), base_ang + rng.normal(0, 0.25, kc)
        cl = wavy_curves(
            rng, starts, angs, length * rng.uniform(0.5, 1.0), step,
            rng.uniform(0.15, 0.45), cv.px(rng.uniform(30, 70)),
        )  # fmt: skip
        cm = cv.blank()
        cv.stroke(cm, cl, max(cv.px(rng.uniform(1.0, 3.0)), 1), 255)
        cv.put(cv.alpha(cm, 0.85) * a_reg, "lumen")
    _fibroblasts(cv, region, curves, nuc)


def _bundles(
    cv: Canvas, a_reg: np.ndarray, dense: float, pink: float, base_ang: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Collagen bundles of 2-4 wavy fibres each, stroked into two masks (pink and deep pink).

    Returns the fibre curves, the two masks, the bundles' length and the curves' step (px).
    """
    rng = cv.rng
    n = cv.n
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
    axis = wavy_curves(
        rng, starts, angs, length, step, rng.uniform(0.1, 0.4), cv.px(rng.uniform(25, 70))
    )
    tang = np.gradient(axis, axis=1)
    nrm = np.stack([-tang[..., 1], tang[..., 0]], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
    off = rng.uniform(-0.5, 0.5, (kb, per, 1, 1)) * bundle_w
    wob = np.cumsum(rng.normal(0, 0.04 * cv.px(1.0), (kb, per, axis.shape[1], 1)), axis=2)
    curves = (axis[:, None] + nrm[:, None] * (off + wob)).reshape(kb * per, -1, 2)
    strokes = cv.blank()
    dark = cv.blank()
    groups = rng.integers(0, 3, len(curves))
    vals = rng.integers(140, 256, 3)
    is_dark = np.repeat(rng.random(kb) < pink, per)
    for gi in range(3):
        sel = groups == gi
        cv.stroke(strokes, curves[sel & ~is_dark], fib_w[gi], vals[gi])
        cv.stroke(dark, curves[sel & is_dark], fib_w[gi], vals[gi])
    return curves, strokes, dark, length, step


def _fibroblasts(cv: Canvas, region: np.ndarray, curves: np.ndarray, nuc: np.ndarray) -> None:
    """Fibroblasts: flat nuclei lying along the collagen fibres, inside ``region``."""
    rng = cv.rng
    n = cv.n
    area_um2 = region.sum() / cv.ppu**2
    kf = int(rng.poisson(area_um2 / fibroblast_spacing_um2(rng)))
    if kf:
        ci = rng.integers(0, len(curves), kf)
        pi = rng.integers(0, curves.shape[1] - 1, kf)
        pts = curves[ci, pi]
        tang = curves[ci, pi + 1] - pts
        ang = np.arctan2(tang[:, 1], tang[:, 0])
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < n) & (pts[:, 1] >= 0) & (pts[:, 1] < n)
        pts, ang = pts[ok], ang[ok]
        ok = region[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        nuclei(cv, nuc, pts[ok], (3.5, 6.0), (0.9, 1.6), ang[ok], 0.08, 230)


def fat_cells(
    cv: Canvas, region: np.ndarray, cell_um: tuple[float, float], nuc: np.ndarray
) -> None:
    """Adipocytes: overlapping ellipses painted one after another, each with its outline.

    A later cell covers part of an earlier one, so the outlines that survive
    meet at angles and the cells read as polygons with thin membranes.
    """
    rng = cv.rng
    box = bbox(region)
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
    polys = blobs(
        rng,
        centres,
        sp * rng.uniform(0.5, 0.62, k),
        rng.uniform(1.0, 1.25, k),
        rng.uniform(0, math.pi, k),
        16,
        0.03,
    )
    fixed = fixed_point(polys)
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
        nuclei(cv, nuc, q[ok], (3.5, 5.0), (0.8, 1.1), ang, 0.05, 220)


def _septum(cv: Canvas, region: np.ndarray) -> None:
    """A fibrous septum crossing the fat: a thick band of collagen strokes."""
    rng = cv.rng
    p = cv.pick(region, 1)
    ang = np.array([rng.uniform(0, math.pi)])
    c = wavy_curves(rng, p, ang, cv.n * 2.0, max(cv.px(4), 2), 0.15, cv.px(80))
    band = cv.blank()
    cv.stroke(band, c, cv.px(rng.uniform(5, 18)), 255)
    fib = cv.blank()
    k = int(rng.integers(3, 8))
    off = rng.normal(0, cv.px(3), (k, 1, 2))
    cv.stroke(fib, c + off, cv.px(rng.uniform(1.5, 4)), 255)
    a = region.astype(np.float32)
    cv.put(cv.alpha(band, 0.9) * a, "collagen")
    cv.put(cv.alpha(fib, 0.7) * a * (band > 0), "sclerotic")


def _epidermis(cv: Canvas, lay: Layout, nuc: np.ndarray) -> None:
    """Keratin on top; keratinocyte tiles in rows following the surface; basal row."""
    band = lay.epidermis
    if not band.any():
        return
    # the u range visible in the patch
    umin, umax = float(lay.u.min()) - 10, float(lay.u.max()) + 10
    ker = band & (lay.depth < lay.keratin)
    if ker.any():
        _stratum_corneum(cv, lay, ker, umin, umax)
    viable = band & ~ker
    if not viable.any():
        return
    centres, frac, h = _keratinocytes(cv, lay, viable, umin, umax)
    _epidermal_nuclei(cv, lay, viable, centres, frac, h, (umin, umax), nuc)


def _stratum_corneum(cv: Canvas, lay: Layout, ker: np.ndarray, umin: float, umax: float) -> None:
    """Keratin: a pale layer with stroked lamellae along the surface."""
    rng = cv.rng
    cv.put(ker.astype(np.float32) * rng.uniform(0.3, 0.6), "keratin")
    kk = int(max(lay.keratin / rng.uniform(1.5, 3.0), 2) * (umax - umin) / 60)
    uu = rng.uniform(umin, umax, kk)
    dd = rng.uniform(0, lay.keratin, kk)
    starts = lay.to_px(cv, uu, dd)
    ang = np.full(kk, math.atan2(lay.t[1], lay.t[0])) + rng.normal(0, 0.08, kk)
    lam = wavy_curves(
        rng, starts, ang, cv.px(rng.uniform(20, 60)), max(cv.px(3), 1.5), 0.1, cv.px(30)
    )
    m = cv.blank()
    cv.stroke(m, lam, cv.px(rng.uniform(0.8, 2.0)), 255)
    cv.put(cv.alpha(m, 0.9) * ker, "keratin", strength=1.15)


def _keratinocytes(
    cv: Canvas, lay: Layout, viable: np.ndarray, umin: float, umax: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Keratinocytes: rows of polygon tiles in (u, depth), flatter towards the surface.

    Returns the cells' centres (px), their height in the viable layer (0 at its
    top, 1 at its base) and the cell height (um).
    """
    rng = cv.rng
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
    cellpolys = blobs(rng, centres, r * flat, 1.0 / flat, np.full(k, ang_t), 6, 0.08)
    tiles = cv.blank()
    grp = rng.integers(0, 3, k)
    for gi, val in enumerate((255, 225, 195)):
        cv.fill(tiles, cellpolys[grp == gi], val)
    vb = viable.astype(np.float32)
    cv.put(vb * rng.uniform(0.5, 0.8), "lumen")
    cv.put(cv.alpha(tiles, 0.95) * vb, "cytoplasm", shade=1 + 0.08 * cv.broad.T)
    return centres, frac, h


def _epidermal_nuclei(
    cv: Canvas,
    lay: Layout,
    viable: np.ndarray,
    centres: np.ndarray,
    frac: np.ndarray,
    h: float,
    u_range: tuple[float, float],
    nuc: np.ndarray,
) -> None:
    """Pale spinous nuclei in the tile centres (painted now); granular-layer granules and
    the basal row of columnar nuclei along the junction (into ``nuc``)."""
    rng = cv.rng
    umin, umax = u_range
    ang_t = math.atan2(lay.t[1], lay.t[0])
    k = len(centres)
    nmask = cv.blank()
    rn = rng.uniform(1.9, 2.6)
    jitter = rng.normal(0, 0.08 * cv.px(h), centres.shape)
    nuclei(
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
        nuclei(cv, nmask, gpts, (0.5, 1.0), (0.5, 0.9), None, 0.1, 255)
    # basal row: columnar, darker nuclei along the junction
    spacing = rng.uniform(5.5, 7.5)
    ub = np.arange(umin, umax, spacing) + rng.uniform(0, spacing)
    db = lay.dej_at(ub) - rng.uniform(3.0, 4.5)
    bp = lay.to_px(cv, ub, db)
    nuclei(cv, nmask, bp, (3.2, 4.2), (1.8, 2.4), np.full(len(bp), ang_t + math.pi / 2), 0.08, 255)
    nmask[~viable] = 0
    nuc |= nmask  # drawn with the other tissue nuclei


def _vessels(cv: Canvas, lay: Layout, nuc: np.ndarray, count: int) -> None:
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
    t = np.linspace(0, TWO_PI, nv, endpoint=False)
    ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def ring(rad):
        ex, ey = (rad * asp)[:, None] * np.cos(t), rad[:, None] * np.sin(t)
        return np.stack([c[:, 0:1] + ex * ca - ey * sa, c[:, 1:2] + ex * sa + ey * ca], 2)

    outer, inner = ring(r + w), ring(r)
    wall = cv.blank()
    lumen = cv.blank()
    for o, i in zip(fixed_point(outer), fixed_point(inner), strict=True):  # one vessel at a time
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
        a = rng.uniform(0, TWO_PI, rk.size)
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
        cv.fill(rbc, blobs(rng, pts, rad, rng.uniform(1, 1.5, rk.size), a, 8, 0.04))
    cv.put(cv.alpha(wall, 0.9), "sclerotic" if rng.random() < 0.4 else "collagen")
    cv.put(cv.alpha(lumen), "lumen")
    cv.put(cv.alpha(rbc, rng.uniform(0.75, 0.95)), "rbc")
    nuclei(cv, nuc, p0, (3.5, 5.0), (0.9, 1.3), np.arctan2(tang[:, 1], tang[:, 0]), 0.05, 240)


def _glands(cv: Canvas, lay: Layout, nuc: np.ndarray) -> None:
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
        m = max(int(TWO_PI * ro / cv.px(6.5)), 6)
        t0 = np.linspace(0, TWO_PI, m, endpoint=False) + rng.uniform(0, 1)
        dt = TWO_PI / m * 0.45
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
    nuclei(cv, m, np.concatenate(nuc_pts), (2.2, 3.0), (1.9, 2.6), None, 0.08, 240)
    m[~lay.dermis] = 0
    nuc |= m


def _lymphocytes(cv: Canvas, lay: Layout, nuc: np.ndarray) -> None:
    rng = cv.rng
    ((x, y),) = cv.pick(lay.deep, 1)
    k = int(rng.integers(8, 40))
    pts = rng.normal([x, y], cv.px(rng.uniform(6, 20)), (k, 2))
    m = cv.blank()
    nuclei(cv, m, pts, (2.4, 3.2), (2.1, 2.9), None, 0.06, 255)
    m[~lay.deep] = 0
    nuc |= m


def paint_nuclei(cv: Canvas, nuc: np.ndarray) -> None:
    """Composite a mask of nuclei in the nuclear colour, with chromatin speckle."""
    if nuc.any():
        cv.put(cv.alpha(nuc), "nucleus", shade=cv.speckle)


def base_tissue(cv: Canvas, lay: Layout) -> None:
    rng = cv.rng
    nuc = cv.blank()
    tissue = lay.tissue.astype(np.float32)
    cv.put(tissue * rng.uniform(0.25, 0.45), "ground")
    _dermis(cv, lay, nuc)
    paint_nuclei(cv, nuc)
    nuc = cv.blank()
    if lay.fat.any():
        fat_cells(cv, lay.fat, (40, 95), nuc)
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
    paint_nuclei(cv, nuc)
