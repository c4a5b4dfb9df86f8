"""Style A's osteoma cutis: lamellar bone with osteocytes, osteons, marrow and osteoid.

Trabecular bone (plates with marrow holes, or bands) or compact bone with
Haversian systems; lamellae run parallel to the bone surface, osteocytes lie
in clear lacunae aligned with them, and osteoid seams with osteoblast rims
line parts of the surface.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from calcinosis.model.labels import BONE

from .optics import BONEM, CEMENT, HISTIO, NUC, OSTEOID, STROMA
from .scene import (
    Scene,
    blob_field,
    boundary_points,
    distance,
    gradient_dir,
    poisson_points,
    signed_distance,
    smoothstep,
    uint8_mask,
)
from .tissue import Layout, fat_cells


def osteoma(sc: Scene, lay: Layout) -> None:
    """Paint one bone lesion (bone and marrow) below the epidermis and label its bone."""
    rng = sc.rng
    deep = lay.deep
    lesion, bone, bone_f, compact = _lesion_and_bone(sc, deep)
    lam_d = _lamella_depth(bone_f)
    bone = bone * lesion
    if bone.sum() < 0.02 * sc.n * sc.n:  # make sure some bone is in view
        bone = np.maximum(
            bone,
            smoothstep(
                blob_field(sc, sc.sample_in(deep, 1), [sc.px(rng.uniform(10, 20))], sc.px(3), 10),
                -1,
                1,
            )
            * deep,
        )
        lesion = np.maximum(lesion, bone)
        lam_d = distance(uint8_mask(bone))
    marrow = np.clip(lesion - bone, 0, 1)
    if marrow.any():
        _marrow(sc, marrow)
    # lamellae follow the trabecular surface; osteons have concentric ones
    din = distance(uint8_mask(bone))
    period = sc.px(rng.uniform(3, 6))
    phase = 0.3 * sc.noise(25)
    lam_d, canals = _osteons(sc, bone, din, lam_d, compact)
    _matrix_and_cement(sc, bone, din, np.cos(2 * np.pi * lam_d / period + phase))
    labels_bone = bone > 0.5
    for x, y, r in canals:  # Haversian canals
        canal = (((sc.xx - x) ** 2 + (sc.yy - y) ** 2) < r * r).astype(np.float32)
        sc.clear(canal)
        sc.c[STROMA] += canal * 0.25
        labels_bone &= canal < 0.5
        sc.ellipse(NUC, x + r * 0.6, y, sc.px(3), sc.px(1.2), 90, 0.8)
    _osteoid_seams(sc, bone, marrow, labels_bone)
    _osteocytes(sc, lam_d, din, labels_bone)
    sc.labels[labels_bone] = BONE


def _lesion_and_bone(
    sc: Scene, deep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """The lesion area (bone plus marrow, sometimes filling the patch), its bone and the
    smooth field the bone was cut from (lamellae follow its iso-lines); compact or not."""
    rng = sc.rng
    big = sc.n / sc.ppu
    centre = sc.sample_in(deep, 1)
    lesion_f = blob_field(sc, centre, [sc.px(rng.uniform(0.35, 1.3) * big)], sc.px(8), 25)
    lesion = smoothstep(lesion_f, -2, 2) * deep
    # trabeculae: thresholded smooth field, either plates with marrow holes or bands;
    # or compact (cortical) bone: solid lamellar bone with Haversian systems, no marrow
    f = sc.noise(rng.uniform(15, 35))
    compact = rng.random() < 0.3
    if compact:
        lesion_f = blob_field(sc, centre, [sc.px(rng.uniform(0.9, 1.8) * big)], sc.px(8), 25)
        lesion = smoothstep(lesion_f, -2, 2) * deep
        bone_f = (lesion_f / max(sc.px(8), 1.0)).astype(np.float32)
        bone = np.ones_like(lesion)
    elif rng.random() < 0.35:
        w = rng.uniform(0.25, 0.6)
        bone_f = w - np.abs(f - rng.normal(0, 0.3))
        bone = smoothstep(bone_f, -0.03, 0.03)
    else:
        frac = rng.uniform(0.25, 0.85)
        thr = float(np.quantile(f, 1 - frac))
        bone_f = f - thr
        bone = smoothstep(bone_f, -0.03, 0.03)
    return lesion, bone, bone_f, compact


def _lamella_depth(bone_f: np.ndarray) -> np.ndarray:
    """Approximate pixels from the bone surface: the bone's field over its typical gradient.

    Lamellae run parallel to the bone surface, so they are iso-lines of this.
    """
    gx_f = cv2.Sobel(bone_f, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy_f = cv2.Sobel(bone_f, cv2.CV_32F, 0, 1, ksize=3) / 8
    edge = np.abs(bone_f) < 0.05
    g0 = float(np.median(np.sqrt(gx_f * gx_f + gy_f * gy_f)[edge])) if edge.any() else 0.01
    return bone_f / max(g0, 1e-4)


def _marrow(sc: Scene, marrow: np.ndarray) -> None:
    """Marrow: fat cells or loose fibrovascular stroma with scattered cells."""
    rng = sc.rng
    sc.c *= 1 - marrow
    if rng.random() < 0.65:
        before = sc.c[STROMA].copy()
        sc.c[STROMA] = 0
        fat_cells(sc, marrow, (25, 60))
        sc.c[STROMA] = np.where(marrow > 0.5, sc.c[STROMA], before)
    else:
        sc.c[STROMA] += marrow * (0.3 + 0.1 * sc.noise(5))
    k = int(marrow.sum() / sc.px(rng.uniform(15, 35)) ** 2)
    for x, y in sc.sample_in(marrow > 0.5, k) if k else []:
        r = sc.px(rng.uniform(2.2, 3.5))
        sc.ellipse(
            NUC, x, y, r, r * rng.uniform(0.7, 1), rng.uniform(0, 180), rng.uniform(0.7, 1.1)
        )


def _osteons(
    sc: Scene, bone: np.ndarray, din: np.ndarray, lam_d: np.ndarray, compact: bool
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Osteons in thick bone: concentric lamellae round a canal, a cement line round each.

    Returns the lamella depth with the osteons' rings in it, and their canals (x, y, r).
    """
    rng = sc.rng
    canals = []
    if din.max() > sc.px(14) and (compact or rng.random() < 0.5):
        n_osteons = int(rng.integers(2, 6)) if compact else int(rng.integers(1, 3))
        for x, y in sc.sample_in(din > sc.px(12), n_osteons):
            rr = np.sqrt((sc.xx - x) ** 2 + (sc.yy - y) ** 2)
            big_r = min(din[int(y), int(x)], sc.px(rng.uniform(20, 40)))
            inside = rr < big_r
            lam_d = np.where(inside, big_r - rr, lam_d)
            cement_ring = np.abs(rr - big_r) < 0.9
            sc.c[CEMENT] += cement_ring * bone * 0.6
            canals.append((x, y, sc.px(rng.uniform(4, 10))))
    return lam_d, canals


def _matrix_and_cement(sc: Scene, bone: np.ndarray, din: np.ndarray, lam: np.ndarray) -> None:
    """Lamellar bone matrix, a faint basophilic line in some lamellae, scalloped cement lines."""
    rng = sc.rng
    matrix = bone * (0.86 + 0.07 * lam + 0.04 * sc.noise(4))
    sc.paint(BONEM, bone, matrix / np.maximum(bone, 1e-3), displace=1.0)
    sc.c[CEMENT] += bone * 0.06 * smoothstep(lam, 0.85, 1.0)
    g = sc.noise(rng.uniform(10, 25))
    for lvl in rng.normal(0, 0.7, int(rng.integers(1, 4))):
        line = np.exp(-(((g - lvl) / 0.05) ** 2)) * (din > 2)
        sc.c[CEMENT] += bone * line * 0.7


def _osteoid_seams(
    sc: Scene, bone: np.ndarray, marrow: np.ndarray, labels_bone: np.ndarray
) -> None:
    """Osteoid seams and osteoblast rims on parts of the surface (unlabelled: not mineral)."""
    rng = sc.rng
    sd = signed_distance(bone)
    gx, gy = gradient_dir(sd)
    if rng.random() >= 0.65:
        return
    pts = boundary_points(bone, sc.px(rng.uniform(6.5, 8.5)), rng)
    if not len(pts):
        return
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
            NUC, x + nx * off, y + ny * off, sc.px(3.3), sc.px(2.6), ang, rng.uniform(0.75, 1.0)
        )


def _osteocytes(sc: Scene, lam_d: np.ndarray, din: np.ndarray, labels_bone: np.ndarray) -> None:
    """Osteocytes: nuclei in clear (unlabelled) lacunae, aligned with the lamellae."""
    rng = sc.rng
    lgx, lgy = gradient_dir(lam_d)
    spacing = sc.px(rng.uniform(16, 26))
    for x, y in poisson_points(sc, (din > sc.px(2.5)) & labels_bone, spacing, 80):
        xi, yi = int(x), int(y)
        ang = math.degrees(math.atan2(lgy[yi, xi], lgx[yi, xi])) + 90
        a, b = sc.px(rng.uniform(3.5, 5.5)), sc.px(rng.uniform(1.6, 2.4))
        halo = np.zeros((sc.n, sc.n), np.float32)
        centre, axes = (int(x * 16), int(y * 16)), (int(a * 16), int(b * 16))
        cv2.ellipse(halo, centre, axes, ang, 0, 360, 1.0, -1, cv2.LINE_8, 4)
        sc.clear(halo)
        labels_bone &= halo < 0.5
        sc.ellipse(NUC, x, y, a * 0.75, b * 0.7, ang, rng.uniform(0.85, 1.1))
