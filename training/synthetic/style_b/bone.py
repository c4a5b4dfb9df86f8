"""Style B's osteoma cutis: a trabecular network of struts and plates with stroked lamellae.

Trabecular bone is a network of struts between nodes plus lobulated plates;
its lamellae are the struts stroked again at decreasing widths and the plates
refilled with shrunken copies of their outline, so they run parallel to the
bone surface.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calcinosis.model.labels import BACKGROUND, BONE

from .canvas import TWO_PI, Canvas, random_sign
from .layout import Layout
from .shapes import contour_points, nuclei, star, wavy_curves
from .tissue import fat_cells, paint_nuclei, u8


def osteoma(cv: Canvas, lay: Layout, scale: float) -> None:
    """A bone lesion below the epidermis: trabeculae, plates, osteons, marrow, osteoid."""
    rng = cv.rng
    deep = lay.deep
    room = _room(cv, deep, scale)
    step = max(cv.px(6), 2.0)
    nodes = cv.pick(room, int(rng.integers(3, 7)))
    skel = _skeleton(cv, room, nodes, step)
    period = max(cv.px(rng.uniform(3, 6)), 1.2)
    bone = cv.blank()
    lam = cv.blank()  # lamella tone: alternate values in concentric layers
    skel_w = _struts(cv, skel, period, bone, lam)
    plates = _plates(cv, nodes, scale, period, bone, lam)
    bone[~deep] = 0
    canals = _osteons(cv, bone, period, lam)
    marrow = room & (bone < 128) & (cv.labels == 0)
    nuc = cv.blank()
    if marrow.any():
        _marrow(cv, marrow, nuc)
    _paint_bone(cv, bone, lam)
    lab = bone > 127
    # Haversian canals: a small vessel in a clear hole
    holes = cv.blank()
    for ox, oy, rc in canals:
        cv2.circle(holes, (int(ox * 16), int(oy * 16)), int(rc * 16), 255, -1, cv.lt, 4)
    lac, ocy = _osteocytes(cv, skel, skel_w, step, plates, lab)
    seam, obl = _osteoid_seam(cv, lab)
    cv.put(cv.alpha(seam, 0.9), "osteoid")
    cv.put(cv.alpha(lac), "lumen")
    cv.put(cv.alpha(holes), "lumen")
    nuc |= ocy
    nuc |= obl
    for ox, oy, rc in canals:
        nuclei(cv, nuc, np.array([[ox + rc * 0.5, oy]]), 3.0, 1.1, 1.57, 0.05, 230)
    paint_nuclei(cv, nuc)
    cv.labels[lab] = BONE
    cv.labels[(lac > 127) | (seam > 127) | (holes > 127)] = BACKGROUND


def _room(cv: Canvas, deep: np.ndarray, scale: float) -> np.ndarray:
    """The lesion area: bone plus marrow, sometimes larger than the patch."""
    rng = cv.rng
    n = cv.n
    ((x, y),) = cv.pick(deep, 1)
    r = cv.px(rng.uniform(0.35, 1.0) * cv.side_um * scale)
    room = cv.blank()
    cv.fill(room, [star(rng, x, y, r, 0.4, 0.02, 72)])
    room = (room > 127) & deep
    if room.sum() < 0.05 * n * n:
        room = deep.copy()
    return room


def _skeleton(cv: Canvas, room: np.ndarray, nodes: np.ndarray, step: float) -> list[np.ndarray]:
    """Trabecular skeleton: a network of struts joining ``nodes`` (some nodes grow into
    plates), plus a few long free-running curves with branches."""
    rng = cv.rng
    L = cv.side_um
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
            off = bend + wig
            net.append(np.hstack([x0 + (x1 - x0) * t + nx * off, y0 + (y1 - y0) * t + ny * off]))
    k = int(rng.integers(0, 3))
    starts = cv.pick(room, k)
    main = wavy_curves(
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
            a = math.atan2(t[1], t[0]) + random_sign(rng) * rng.uniform(0.6, 1.4)
            length = cv.px(L * rng.uniform(0.3, 0.8))
            br = wavy_curves(
                rng, c[j : j + 1], np.array([a]), length, step, 0.2, cv.px(80), 0.03, centred=False
            )
            skel.append(br[0])
    return skel


def _struts(
    cv: Canvas, skel: list[np.ndarray], period: float, bone: np.ndarray, lam: np.ndarray
) -> list[np.ndarray]:
    """Each skeleton curve stroked in chunks of varying width into ``bone``, and every chunk
    again at decreasing widths into ``lam`` so its lamellae run parallel to its surface.

    Returns the strut width at every skeleton point (for the osteocytes).
    """
    rng = cv.rng
    pieces, widths = [], []
    skel_w = []
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
    return skel_w


def _plates(
    cv: Canvas,
    nodes: np.ndarray,
    scale: float,
    period: float,
    bone: np.ndarray,
    lam: np.ndarray,
) -> list[tuple[float, float, float]]:
    """Plates at some nodes: lobulated outlines filled with concentric shrunken copies.

    Returns each plate's centre and mean radius.
    """
    rng = cv.rng
    plates = []
    n_pl = min((0, 1, 1, 2, 3)[int(rng.integers(0, 5))], len(nodes))
    for px_, py_ in nodes[rng.permutation(len(nodes))[:n_pl]]:
        radius = cv.px(rng.uniform(18, 60) * scale)
        poly = star(rng, px_, py_, radius, 0.45, 0.01, 60, rng.uniform(0.6, 1.6), rng.uniform(0, 3))
        cv.fill(bone, [poly], 255)
        r0 = float(np.linalg.norm(poly - [px_, py_], axis=1).mean())
        plates.append((px_, py_, r0))
        steps = max(int(r0 / period), 1)
        for j, f in enumerate(np.linspace(1.0, 0.08, steps)):
            cv.fill(lam, [(poly - [px_, py_]) * f + [px_, py_]], 255 if j % 2 == 0 else 110)
    return plates


def _osteons(
    cv: Canvas, bone: np.ndarray, period: float, lam: np.ndarray
) -> list[tuple[float, float, float]]:
    """Concentric osteons in thick parts of the bone; their canals (x, y, r)."""
    rng = cv.rng
    canals = []
    din = cv2.distanceTransform(u8(bone > 127), cv2.DIST_L2, 3)
    if din.max() > cv.px(10) and rng.random() < 0.5:
        for ox, oy in cv.pick(din > cv.px(9), int(rng.integers(1, 3))):
            rr = min(float(din[int(oy), int(ox)]), cv.px(rng.uniform(15, 35)))
            centre = (int(ox * 16), int(oy * 16))
            j = 0
            t = rr
            while t > cv.px(3):
                cv2.circle(lam, centre, int(t * 16), 255 if j % 2 == 0 else 110, -1, cv.lt, 4)
                t -= period
                j += 1
            canals.append((ox, oy, cv.px(rng.uniform(3, 7))))
    return canals


def _marrow(cv: Canvas, marrow: np.ndarray, nuc: np.ndarray) -> None:
    """Marrow: fat or loose fibrovascular stroma with scattered cells (nuclei into ``nuc``)."""
    rng = cv.rng
    cv.put(marrow.astype(np.float32), "lumen")
    if rng.random() < 0.65:
        fat_cells(cv, marrow, (22, 55), nuc)
    else:
        cv.put(marrow.astype(np.float32) * 0.55, "ground", shade=1 + 0.15 * cv.medium)
    km = int(marrow.sum() / max(cv.px(rng.uniform(20, 40)) ** 2, 1))
    if km:
        nuclei(cv, nuc, cv.pick(marrow, km), (2.2, 3.4), (1.8, 3.0), None, 0.1, 230)


def _paint_bone(cv: Canvas, bone: np.ndarray, lam: np.ndarray) -> None:
    """Bone in two lamella tones, and cement lines: thin scalloped dark lines inside it."""
    rng = cv.rng
    bone_a = cv.alpha(bone)
    tone = lam.astype(np.float32) / 255.0
    # H&E bone ranges from pale to deep pink; mineral stains stay strong
    bone_strength = float(rng.uniform(0.6, 1.25) if cv.stain == "he" else rng.uniform(0.92, 1.08))
    cv.put(bone_a, "bone", strength=bone_strength)
    cv.put(bone_a * (1 - tone) * rng.uniform(0.25, 0.75), "bone_alt", strength=bone_strength)
    cement = cv.blank()
    kc = int(rng.integers(1, 5))
    cl = wavy_curves(
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


def _osteocytes(
    cv: Canvas,
    skel: list[np.ndarray],
    skel_w: list[np.ndarray],
    step: float,
    plates: list[tuple[float, float, float]],
    lab: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Osteocytes between the lamellae: (pale lacunae, dark nuclei), masks inside the bone."""
    rng = cv.rng
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
            t = rng.uniform(0, TWO_PI, m)
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
        nuclei(cv, lac, p, (2.8, 4.2), (1.4, 2.1), ang, 0.05, 255)
        nuclei(cv, ocy, p, (1.8, 2.8), (0.9, 1.3), ang, 0.05, 255)
    lac[~lab] = 0
    ocy[lac == 0] = 0
    return lac, ocy


def _osteoid_seam(cv: Canvas, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Osteoid seam and osteoblast rim on part of the bone surface: (seam, osteoblast nuclei)."""
    rng = cv.rng
    seam = cv.blank()
    obl = cv.blank()
    if rng.random() >= 0.7:
        return seam, obl
    pts, nrm = contour_points(u8(lab), cv.px(rng.uniform(8.5, 12)), rng)
    if not len(pts):
        return seam, obl
    anchor = pts[int(rng.integers(len(pts)))]
    run = np.linalg.norm(pts - anchor, axis=1) < cv.px(rng.uniform(20, 70))
    if run.sum() >= 2:
        for px_, py_ in pts[run]:
            centre, radius = (int(px_ * 16), int(py_ * 16)), int(cv.px(rng.uniform(1.5, 3)) * 16)
            cv2.circle(seam, centre, radius, 255, -1, cv.lt, 4)
        seam[~lab] = 0
        p = pts[run] + nrm[run] * cv.px(rng.uniform(3.0, 4.5))
        ang = np.arctan2(nrm[run][:, 1], nrm[run][:, 0])
        nuclei(cv, obl, p, (2.6, 3.3), (1.7, 2.2), ang, 0.08, 255)
        obl[lab] = 0
    return seam, obl
