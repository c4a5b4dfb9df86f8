"""Deposits as lesions, and the call a pathologist makes from them.

A pathologist calls a section by the lesions it contains, not by the kind of
tissue that covers most of it: one calcium nodule in a field of normal dermis
is calcinosis cutis. Averaging tile verdicts over a large region does the
opposite (the many normal tiles outvote the few with the nodule), so region
mode calls a region from its deposits instead. This module holds that logic,
free of the network, so it can be tested on hand-made arrays.

Finding the lesions (:func:`find_lesions`)
------------------------------------------
A lesion is a connected component (8-connectivity) of the stitched deposit
map's deposit pixels (label > 0), *whatever their labels*; its label is the
majority label of its pixels (ties go to the lower label value, calcium
first), and ``label_fractions`` keeps the share of every label. So a calcium
nodule whose rim the decoder labels bone in places is one calcium lesion with
``label_fractions["bone"] = 0.05``, not one large calcium lesion plus a ring
of small bone ones. The price: two different deposits that touch become one
lesion; their fractions show it.

Components smaller than :data:`MIN_LESION_AREA_UM2` (checkpoint metadata
``min_lesion_area_um2`` overrides it) are dropped as specks. 100 µm² is a disc
about 11 µm across, the area of two or three small cells: larger than one
nucleus (5-8 µm across, 20-50 µm²), which is the commonest thing a decoder
takes for a basophilic speck, and smaller than the smallest deposit a
pathologist reports (dermal calcium granules and amyloid globules are tens of
microns). Without a known resolution, :data:`MIN_LESION_AREA_PX` applies.

Everything is computed from one label image and the component statistics
(area, bounding box, centroid), with per-lesion sums accumulated a band of
rows (or a tile window) at a time: no full-size mask per lesion, so an
8192 x 8192 map with thousands of deposits costs one int32 component image.

Each lesion's probabilities
---------------------------
A lesion's ``probabilities`` are the calibrated class probabilities of the
tiles it overlaps, weighted by how many of its pixels fall in each tile
(in-focus tiles only, when it touches any). They keep ``normal``: its
probability is the tiles' doubt that there is a deposit at all, so the
lesion's ``confidence`` (that it is a real deposit) is ``1 - p(normal)``,
which is calibrated (temperature scaling) and comparable to a threshold. The
lesion's class (``prediction``) is the most probable non-normal class: once
a deposit is there, "normal" is not one of its kinds, so ``normal`` is
renormalised away for typing, and ``class_probability`` is that class's share
of the non-normal mass, ``p(class) / (1 - p(normal))``. The decoder's own
belief, the mean per-pixel deposit probability ``1 - p(label 0)`` over the
lesion, is reported as ``deposit_probability`` where the stitched
probabilities are available; it is not calibrated, and every labelled pixel
already has it above 0.5, so it informs but does not decide.

The region's call (:func:`region_call`)
---------------------------------------
A lesion *passes* when it is in focus and ``confidence`` >= the lesion
threshold (metadata ``lesion_threshold``, default :data:`LESION_THRESHOLD`:
the tiles say a deposit is more likely than not). Each passing lesion lends
its class the evidence ``area x confidence``; the region is the class with
the most evidence, and the other classes with passing lesions are listed in
``also_present``, strongest first ("calcinosis cutis, bone also present").
Area x confidence, rather than the single most confident lesion, because a
call should rest on the deposit that dominates the section: one small,
confidently typed false speck must not outvote a large nodule, and a doubtful
lesion counts for less than a sure one of the same size.

The region's ``probabilities`` are then the evidence-weighted mean of the
winning class's lesions' probabilities, and the usual indeterminate rule
applies to the winning class: below the indeterminate threshold the answer is
``indeterminate`` (a deposit is there, but its kind or its reality is not
sure enough), never ``normal``. ``normal`` is called only where no lesion
passes, and then only when normal is both the most probable class and at
least the indeterminate threshold in the most suspicious of: the tiles' mean
and every lesion that was found but did not pass. So a weak lesion (say
confidence 0.45) or tiles that favour a deposit class without a deposit being
segmented make the region indeterminate rather than confidently normal. The
tissue-weighted tile mean is always kept as ``tile_mean_probabilities``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from calcinosis.model.labels import INDETERMINATE

#: Deposits smaller than this (µm²) are specks, not lesions (see the module docstring).
MIN_LESION_AREA_UM2 = 100.0
#: The same when the image's resolution is unknown, in pixels.
MIN_LESION_AREA_PX = 16
#: A lesion counts towards the region's call at this calibrated confidence
#: (``1 - p(normal)`` of its tiles) or more.
LESION_THRESHOLD = 0.5
#: The class that means "no deposit".
NORMAL = "normal"
#: Rows per band when summing over the component image.
BAND_ROWS = 256


@dataclass
class Lesions:
    """What :func:`find_lesions` found: lesion records and where they are in the label image.

    ``components[i]`` is the OpenCV component index (of
    ``deposit_components(label_map)``) of ``lesions[i]``, for tracing its
    outline later without storing a mask.
    """

    lesions: list[dict[str, Any]] = field(default_factory=list)
    components: list[int] = field(default_factory=list)


def deposit_components(label_map: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of the deposit pixels (label > 0), all labels together.

    OpenCV's ``(n, labels int32, stats, centroids)``; component 0 is the
    background. The label map itself is the input (OpenCV takes every
    non-zero pixel as foreground), so no mask is built.
    """
    lm = np.ascontiguousarray(label_map, dtype=np.uint8)
    if lm.ndim != 2:
        raise ValueError(f"label_map must be 2-D, got shape {lm.shape}")
    return cv2.connectedComponentsWithStats(lm, connectivity=8, ltype=cv2.CV_32S)


def min_area_px(mpp: float | None, min_area_um2: float = MIN_LESION_AREA_UM2) -> int:
    """The minimum lesion area in label-map pixels of ``mpp`` microns."""
    if mpp is None or not mpp > 0:
        return MIN_LESION_AREA_PX
    return max(1, math.ceil(float(min_area_um2) / (float(mpp) ** 2) - 1e-9))


def find_lesions(
    label_map: np.ndarray,
    *,
    mpp: float | None,
    class_names: Sequence[str],
    deposit_labels: Sequence[str],
    tile_boxes: np.ndarray | Sequence[Sequence[int]],
    tile_probs: np.ndarray | Sequence[Sequence[float]],
    tile_in_focus: np.ndarray | Sequence[bool] | None = None,
    deposit_prob: np.ndarray | None = None,
    min_area_um2: float = MIN_LESION_AREA_UM2,
    lesion_threshold: float = LESION_THRESHOLD,
    fallback_probs: np.ndarray | Sequence[float] | None = None,
) -> Lesions:
    """Lesions of a stitched deposit map, each with its tiles' class probabilities.

    ``label_map``: ``(H, W)`` uint8 deposit labels; ``mpp``: microns per
    label-map pixel (None: unknown). ``tile_boxes``: ``(n, 3)`` rows of
    ``(y0, x0, size)`` in label-map pixels, the tiles the network was run on;
    ``tile_probs``: their ``(n, C)`` calibrated class probabilities (columns in
    ``class_names`` order); ``tile_in_focus``: ``(n,)`` (default: all).
    ``deposit_prob``: optional ``(H, W)`` per-pixel deposit probability
    (float in [0, 1], or uint8 in 0..255). ``fallback_probs`` serve a lesion
    that no tile window covers (rounding at resampled edges).

    Lesions are sorted by evidence (``area x confidence``), strongest first;
    ``id`` counts from 1 in that order. Coordinates are label-map pixels with
    pixel ``(x, y)`` covering ``[x, x+1) x [y, y+1)`` (GeoJSON's frame):
    ``centroid`` ``[x, y]`` and ``bbox`` ``[x, y, w, h]``.
    """
    lm = np.ascontiguousarray(label_map, dtype=np.uint8)
    out = Lesions()
    if not lm.any():
        return out
    n, comp, stats, cents = deposit_components(lm)
    counts = stats[1:, cv2.CC_STAT_AREA]
    keep = np.nonzero(counts >= min_area_px(mpp, min_area_um2))[0] + 1
    if keep.size == 0:
        return out
    k = int(keep.size)
    depth = max(len(deposit_labels), int(lm.max()) + 1)
    lut = np.zeros(n, np.int32)
    lut[keep] = np.arange(1, k + 1, dtype=np.int32)
    kstats = stats[keep].astype(np.int64)  # x, y, w, h, area of lesion 1..k
    hh, ww = lm.shape

    # Label histogram (and decoder probability sum) per lesion, a band of rows at a time.
    hist = np.zeros((k + 1) * depth, np.int64)
    psum = np.zeros(k + 1, np.float64) if deposit_prob is not None else None
    y_lo = int(kstats[:, 1].min())
    y_hi = int((kstats[:, 1] + kstats[:, 3]).max())
    for y0 in range(y_lo, y_hi, BAND_ROWS):
        y1 = min(y_hi, y0 + BAND_ROWS)
        c = lut[comp[y0:y1]]
        m = c > 0
        cm = c[m]
        del c
        key = cm.astype(np.int64)
        key *= depth
        key += lm[y0:y1][m]
        hist += np.bincount(key, minlength=(k + 1) * depth)
        del key
        if psum is not None:
            assert deposit_prob is not None
            pv = deposit_prob[y0:y1][m]
            psum += np.bincount(cm, weights=pv, minlength=k + 1)
            del pv
        del m, cm
    hist = hist.reshape(k + 1, depth)[1:]
    if psum is not None:
        psum = psum[1:]
        if deposit_prob is not None and deposit_prob.dtype == np.uint8:
            psum /= 255.0

    # Pixels of each lesion in each tile window, and the weighted tile probabilities.
    boxes = np.asarray(tile_boxes, dtype=np.int64).reshape(-1, 3)
    probs = np.asarray(tile_probs, dtype=np.float64).reshape(len(boxes), -1)
    n_cls = len(class_names)
    if probs.shape[1] != n_cls:
        raise ValueError(f"tile_probs has {probs.shape[1]} columns for {n_cls} classes")
    focus = (
        np.ones(len(boxes), bool)
        if tile_in_focus is None
        else np.asarray(tile_in_focus, bool).reshape(-1)
    )
    acc = np.zeros((2, k + 1, n_cls), np.float64)  # [in focus, out of focus]
    wsum = np.zeros((2, k + 1), np.float64)
    ntiles = np.zeros(k + 1, np.int64)
    if len(boxes) == 1 and boxes[0, 0] <= 0 and boxes[0, 1] <= 0 and boxes[0, 2] >= max(hh, ww):
        # One tile over everything (a patch): every pixel of every lesion is in it.
        slot = 0 if focus[0] else 1
        acc[slot, 1:] = probs[0]
        wsum[slot, 1:] = kstats[:, 4]
        ntiles[1:] = 1
    else:
        # Coarse occupancy from the lesions' boxes: tiles far from every lesion are skipped.
        cell = 32
        occ = np.zeros(((hh + cell - 1) // cell + 1, (ww + cell - 1) // cell + 1), np.int32)
        for x, y, w, h, _ in kstats:
            occ[y // cell : (y + h - 1) // cell + 1, x // cell : (x + w - 1) // cell + 1] = 1
        occ_int = cv2.integral(occ.astype(np.uint8))
        for (ty, tx, ts), p, f in zip(boxes.tolist(), probs, focus.tolist(), strict=True):
            ya, xa = max(0, ty), max(0, tx)
            yb, xb = min(hh, ty + ts), min(ww, tx + ts)
            if yb <= ya or xb <= xa:
                continue
            ca, cb = ya // cell, (yb - 1) // cell + 1
            ra, rb = xa // cell, (xb - 1) // cell + 1
            if occ_int[cb, rb] - occ_int[ca, rb] - occ_int[cb, ra] + occ_int[ca, ra] == 0:
                continue
            v = lut[comp[ya:yb, xa:xb]]
            v = v[v > 0]
            if v.size == 0:
                continue
            lo, hi = int(v.min()), int(v.max())
            if lo == hi:
                ids, cnt = np.array([lo]), np.array([v.size])
            else:
                ids, cnt = np.unique(v, return_counts=True)
            slot = 0 if f else 1
            acc[slot, ids] += cnt[:, None] * p[None, :]
            wsum[slot, ids] += cnt
            ntiles[ids] += 1
    del comp, lut
    return lesion_records(
        LesionSums(kstats, cents[keep], hist, psum, acc[:, 1:], wsum[:, 1:], ntiles[1:]),
        keep,
        mpp=mpp,
        class_names=class_names,
        deposit_labels=deposit_labels,
        depth=depth,
        lesion_threshold=lesion_threshold,
        fallback_probs=fallback_probs,
    )


@dataclass
class LesionSums:
    """What a lesion's record is computed from, for ``k`` lesions (whole map or band-wise).

    ``stats``: ``(k, 5)`` int64 x, y, w, h, area; ``centroids``: ``(k, 2)`` mean
    pixel (x, y) without the half-pixel shift; ``hist``: ``(k, depth)`` pixels
    per label; ``psum``: summed deposit probability (None without one); ``acc``
    ``(2, k, C)`` / ``wsum`` ``(2, k)``: pixel-weighted tile probabilities and
    pixel counts in in-focus [0] and out-of-focus [1] tiles; ``ntiles``: tiles
    each lesion touches.
    """

    stats: np.ndarray
    centroids: np.ndarray
    hist: np.ndarray
    psum: np.ndarray | None
    acc: np.ndarray
    wsum: np.ndarray
    ntiles: np.ndarray


def lesion_records(
    sums: LesionSums,
    tiebreak: np.ndarray,
    *,
    mpp: float | None,
    class_names: Sequence[str],
    deposit_labels: Sequence[str],
    depth: int,
    lesion_threshold: float,
    fallback_probs: np.ndarray | Sequence[float] | None,
) -> Lesions:
    """Lesion records from their sums, strongest first (ties by ``tiebreak``, kept as components).

    Shared by :func:`find_lesions` (whole map; the tiebreak is the OpenCV
    component index) and the band-wise finder (``streamlesions``), so both
    make the same records from the same sums.
    """
    out = Lesions()
    kstats, hist, psum = sums.stats, sums.hist, sums.psum
    acc, wsum, ntiles = sums.acc, sums.wsum, sums.ntiles
    k, n_cls = int(kstats.shape[0]), len(class_names)

    # Per-lesion values, all lesions at once.
    in_focus = wsum[0] > 0
    have = in_focus | (wsum[1] > 0)
    slot = np.where(in_focus, 0, 1)
    rows = np.arange(k)
    denom = np.where(have, wsum[slot, rows], 1.0)
    P = acc[slot, rows] / denom[:, None]
    if fallback_probs is not None:
        P[~have] = np.asarray(fallback_probs, np.float64)
        have = np.ones(k, bool)
    tot = P.sum(1, keepdims=True)
    P = np.divide(P, tot, out=P, where=tot > 0)
    normal = list(class_names).index(NORMAL) if NORMAL in class_names else None
    deposit_cls = np.array([j for j in range(n_cls) if j != normal], np.int64)
    area = kstats[:, 4].astype(np.float64)
    if deposit_cls.size:
        top = deposit_cls[np.argmax(P[:, deposit_cls], axis=1)]
    else:
        top = np.zeros(k, np.int64)
    p_top = P[rows, top]
    if normal is None:
        conf = psum / area if psum is not None else np.ones(k)
        share = p_top
    else:
        conf = 1.0 - P[:, normal]
        share = np.divide(
            p_top, conf, out=np.full(k, 1.0 / max(1, deposit_cls.size)), where=conf > 0
        )
    conf = np.where(have, conf, 0.0)
    passed = in_focus & have & (conf >= lesion_threshold)
    px_um2 = float(mpp) ** 2 if mpp else None
    area_um2 = area * px_um2 if px_um2 is not None else None
    evidence = (area_um2 if area_um2 is not None else area) * conf
    labels = np.argmax(hist[:, 1:], axis=1) + 1
    fracs = hist[:, 1:] / np.maximum(1, hist[:, 1:].sum(1, keepdims=True))
    label_names = [_label_name(deposit_labels, j) for j in range(depth)]
    order = sorted(range(k), key=lambda i: (-evidence[i], int(tiebreak[i])))

    P_l, fr_l, cen_l = P.tolist(), fracs.tolist(), (sums.centroids + 0.5).tolist()
    box_l, top_l, lab_l = kstats[:, :4].tolist(), top.tolist(), labels.tolist()
    conf_l, share_l, ev_l = conf.tolist(), share.tolist(), evidence.tolist()
    area_l = area.tolist()
    um_l = area_um2.tolist() if area_um2 is not None else [None] * k
    dp_l = (psum / area).tolist() if psum is not None else None
    for rank, i in enumerate(order, start=1):
        rec: dict[str, Any] = {
            "id": rank,
            "label": label_names[lab_l[i]],
            "label_value": lab_l[i],
            "label_fractions": dict(zip(label_names[1:], fr_l[i], strict=True)),
            "area_px": area_l[i],
            "area_um2": um_l[i],
            "centroid": cen_l[i],
            "bbox": box_l[i],
            "tiles": int(ntiles[i]),
            "in_focus": bool(in_focus[i]),
        }
        if dp_l is not None:
            rec["deposit_probability"] = dp_l[i]
        if have[i]:
            rec["probabilities"] = dict(zip(class_names, P_l[i], strict=True))
            rec["prediction"] = class_names[top_l[i]]
            rec["class_probability"] = share_l[i]
        else:
            rec.update(probabilities={}, prediction=None, class_probability=None)
        rec["confidence"] = conf_l[i]
        rec["passed"] = bool(passed[i])
        rec["evidence"] = ev_l[i]
        out.lesions.append(rec)
        out.components.append(int(tiebreak[i]))
    return out


def region_call(
    lesions: Sequence[Mapping[str, Any]],
    tile_mean: Mapping[str, float] | None,
    class_names: Sequence[str],
    *,
    indeterminate_threshold: float,
) -> dict[str, Any]:
    """The region's call from its lesions (see the module docstring for the rule).

    Returns ``prediction`` (a class, ``indeterminate``), ``status`` (``ok`` or
    ``indeterminate``), ``reason``, ``probabilities`` (the region's, over
    ``class_names``), ``basis`` (``"lesions"`` when passing lesions decided,
    else ``"no_lesion"``), ``lesion_class`` (the class the lesions point to,
    even when the answer is indeterminate; None without passing lesions),
    ``classes_present`` (per class with passing lesions: ``class``,
    ``lesions``, ``area_px``, ``area_um2``, ``evidence``, ``max_confidence``;
    strongest first) and ``also_present`` (the names of the other classes
    there).
    """
    thr = float(indeterminate_threshold)
    passed = [les for les in lesions if les.get("passed")]
    groups: dict[str, dict[str, Any]] = {}
    for les in passed:
        g = groups.setdefault(
            les["prediction"],
            {
                "class": les["prediction"],
                "lesions": 0,
                "area_px": 0.0,
                "area_um2": 0.0 if les.get("area_um2") is not None else None,
                "evidence": 0.0,
                "max_confidence": 0.0,
            },
        )
        g["lesions"] += 1
        g["area_px"] += float(les["area_px"])
        if g["area_um2"] is not None and les.get("area_um2") is not None:
            g["area_um2"] += float(les["area_um2"])
        g["evidence"] += float(les["evidence"])
        g["max_confidence"] = max(g["max_confidence"], float(les["confidence"]))
    order = {c: i for i, c in enumerate(class_names)}
    present = sorted(
        groups.values(),
        key=lambda g: (-g["evidence"], -g["max_confidence"], order.get(g["class"], 99)),
    )
    out: dict[str, Any] = {
        "classes_present": present,
        "also_present": [g["class"] for g in present[1:]],
        "lesion_class": present[0]["class"] if present else None,
    }
    if present:
        win = present[0]["class"]
        mine = [les for les in passed if les["prediction"] == win]
        w = np.array([max(float(les["evidence"]), 1e-12) for les in mine])
        pv = np.array([[les["probabilities"][c] for c in class_names] for les in mine])
        probs = (pv * w[:, None]).sum(0) / w.sum()
        p_win = float(probs[list(class_names).index(win)])
        n_les = present[0]["lesions"]
        out.update(basis="lesions", probabilities=_as_dict(class_names, probs))
        if p_win >= thr:
            out.update(prediction=win, status="ok", reason="")
        else:
            out.update(
                prediction=INDETERMINATE,
                status="indeterminate",
                reason=(
                    f"{n_les} lesion(s) point to {win}, but its calibrated probability "
                    f"{p_win:.2f} is below the threshold {thr:.2f}"
                ),
            )
        return out
    # No lesion passes: normal, unless something else makes that doubtful.
    candidates: list[tuple[str, np.ndarray]] = []
    if tile_mean:
        candidates.append(("tiles", np.array([tile_mean[c] for c in class_names], np.float64)))
    for les in lesions:
        if les.get("in_focus") and les.get("probabilities"):
            candidates.append(
                (
                    f"lesion {les['id']}",
                    np.array([les["probabilities"][c] for c in class_names], np.float64),
                )
            )
    out["basis"] = "no_lesion"
    if NORMAL not in class_names or not candidates:
        out.update(
            prediction=INDETERMINATE,
            status="indeterminate",
            probabilities=dict(tile_mean or {}),
            reason="no lesion passes the lesion threshold and there is nothing else to go by",
        )
        return out
    j_n = list(class_names).index(NORMAL)
    src, probs = min(candidates, key=lambda t: t[1][j_n])
    out["probabilities"] = _as_dict(class_names, probs)
    top = int(np.argmax(probs))
    if top == j_n and probs[j_n] >= thr:
        out.update(prediction=NORMAL, status="ok", reason="")
        return out
    if src == "tiles":
        why = (
            f"no deposit passes the lesion threshold, but the tiles' mean gives normal only "
            f"{probs[j_n]:.2f} (top: {class_names[top]} {probs[top]:.2f}; threshold {thr:.2f})"
        )
    else:
        why = (
            f"no lesion passes the lesion threshold, but {src} leaves normal at only "
            f"{probs[j_n]:.2f} (threshold {thr:.2f})"
        )
    out.update(prediction=INDETERMINATE, status="indeterminate", reason=why)
    return out


def to_frame(lesions: Sequence[dict[str, Any]], offset: tuple[float, float], scale: float) -> None:
    """Map lesion coordinates in place from label-map pixels to ``offset + scale * (x, y)``.

    For slides: label-map pixels of the level read to the slide's level-0
    frame (the GeoJSON's). ``area_px`` becomes level-0 pixels; ``area_um2``
    is unchanged.
    """
    ox, oy, s = float(offset[0]), float(offset[1]), float(scale)
    for les in lesions:
        cx, cy = les["centroid"]
        les["centroid"] = [ox + cx * s, oy + cy * s]
        x, y, w, h = les["bbox"]
        les["bbox"] = [ox + x * s, oy + y * s, w * s, h * s]
        les["area_px"] = float(les["area_px"]) * s * s


def lesion_columns(class_names: Sequence[str], deposit_labels: Sequence[str]) -> list[str]:
    """Columns of the per-lesion table (``lesions/<name>.csv``)."""
    return [
        "id",
        "label",
        "prediction",
        "passed",
        "confidence",
        "class_probability",
        "deposit_probability",
        "evidence",
        "area_px",
        "area_um2",
        "centroid_x",
        "centroid_y",
        "bbox_x",
        "bbox_y",
        "bbox_w",
        "bbox_h",
        "tiles",
        "in_focus",
        *[f"p_{c}" for c in class_names],
        *[f"frac_{lab}" for lab in deposit_labels[1:]],
    ]


def lesion_row(les: Mapping[str, Any]) -> dict[str, Any]:
    """One lesion as a flat table row (see :func:`lesion_columns`)."""
    row = {k: v for k, v in les.items() if not isinstance(v, (dict, list))}
    row["centroid_x"], row["centroid_y"] = les["centroid"]
    row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"] = les["bbox"]
    for c, p in (les.get("probabilities") or {}).items():
        row[f"p_{c}"] = p
    for lab, f in (les.get("label_fractions") or {}).items():
        row[f"frac_{lab}"] = f
    return row


def _label_name(deposit_labels: Sequence[str], value: int) -> str:
    return deposit_labels[value] if value < len(deposit_labels) else f"label_{value}"


def _as_dict(class_names: Sequence[str], probs: np.ndarray) -> dict[str, float]:
    return {c: float(p) for c, p in zip(class_names, probs, strict=True)}
