"""Deposit outlines as GeoJSON that QuPath imports as classified annotations.

QuPath (v0.4 and later) reads a ``FeatureCollection`` whose features carry, in
``properties``: ``objectType`` ("annotation"), ``classification`` with a
``name`` and an RGB ``color`` array, and ``measurements`` as a flat mapping of
name to number (QuPath's own exporter writes exactly these keys). Coordinates
are pixels of the full-resolution image with the origin at the top-left corner;
a pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``. Area measurements carry
QuPath's own names (``Area px^2``, ``Area µm^2``, as its measurement table
calls an annotation's area). Files are plain ASCII (``µ`` written as
``\\u00b5``): QuPath v0.4 reads GeoJSON with the platform's default charset,
which on Windows (Java 17) is not UTF-8.

How outlines are traced, and why they are valid without repair
--------------------------------------------------------------
Each connected deposit (8-connectivity) is traced with OpenCV
(``RETR_CCOMP``: outer boundaries and their holes). OpenCV follows the centres
of boundary pixels, so a one-pixel-wide strand would give a zero-width,
self-overlapping ring, and two parts touching at a corner a pinched one; both
are invalid polygons, and repairing a large invalid polygon with shapely takes
seconds to minutes. So the component mask is first enlarged twice (every
pixel becomes 2 x 2, no strand is thinner than two pixels) and made
*well-composed* (no 2 x 2 checkerboard; a corner-only contact is bridged by one
sub-pixel), after which every traced ring is simple. Mapped back, outlines run
a quarter pixel inside the pixel edges. Validity is still checked and, in the
rare remaining case, repaired with ``shapely.make_valid``. Areas in the
``measurements`` are exact pixel counts, not polygon areas.

Lesions
-------
``predict`` writes one annotation per *lesion* (:func:`lesion_features`; see
``lesions.find_lesions``: a connected deposit of any labels, classified by
its majority label), so the GeoJSON, ``predictions.json`` and the lesion
table list the same objects under the same ``id``. Their ``measurements``
follow QuPath's naming: ``Area px^2``, ``Area µm^2``, ``Confidence`` (calibrated
``1 - p(normal)`` of the lesion's tiles), ``Deposit probability`` (the
decoder's mean), ``Prob <class>`` for every class and ``Fraction <label>`` for
every deposit label, plus the older ``area_px`` / ``area_um2`` keys. The
lesion's class, whether it counts towards the call (``passed``) and its id
are plain properties. :func:`label_map_to_features` (one feature per
connected area of each label) stays for label maps without lesions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from calcinosis.model.fileio import atomic_write_bytes
from calcinosis.model.labels import DEPOSIT_COLORS, DEPOSIT_DISPLAY

from .lesions import deposit_components

#: Deposits (and holes in them) smaller than this many image pixels are dropped
#: (filled, for holes): noise, not findings.
MIN_AREA_PX = 16
#: Enlargement before tracing (see the module docstring).
_UP = 2


def label_map_to_features(
    label_map: np.ndarray,
    mpp: float | None,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    properties: Mapping[str, Any] | None = None,
    min_area_px: int = MIN_AREA_PX,
    *,
    labels: Mapping[int, str] = DEPOSIT_DISPLAY,
    colors: Mapping[int, tuple[int, int, int]] = DEPOSIT_COLORS,
) -> list[dict[str, Any]]:
    """One GeoJSON Polygon (or MultiPolygon) feature per connected deposit.

    ``label_map`` is ``(H, W)`` of deposit labels (0 = none). A label-map pixel
    ``(x, y)`` maps to image coordinates ``(offset_x + x * scale, offset_y + y * scale)``
    (``offset`` is ``(x, y)``; ``scale`` > 1 when the map is coarser than the
    image). ``mpp`` is microns per *image* pixel; ``area_um2`` is omitted when it
    is None. ``properties`` are merged into every feature's ``properties``.
    ``min_area_px`` counts image pixels.
    """
    lm = np.asarray(label_map)
    if lm.ndim != 2:
        raise ValueError(f"label_map must be 2-D, got shape {lm.shape}")
    lm = lm.astype(np.uint8, copy=False)
    ox, oy = float(offset[0]), float(offset[1])
    s = float(scale)
    px_area = s * s  # image pixels per label-map pixel
    min_px = max(1.0, float(min_area_px) / px_area)  # in label-map pixels
    features: list[dict[str, Any]] = []
    for lab in sorted(labels):
        if lab == 0:
            continue
        mask = (lm == lab).astype(np.uint8)
        if not mask.any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        del mask
        col = [int(c) for c in colors.get(lab, (128, 128, 128))]
        for idx in range(1, n):
            count = int(stats[idx, cv2.CC_STAT_AREA])
            if count < min_px:
                continue
            x, y, w, h = (int(v) for v in stats[idx, :4])
            geom = _component_geometry(comp, idx, (x, y, w, h), min_px, (ox, oy), s)
            if geom is None:
                continue
            area_px = count * px_area
            measurements: dict[str, float] = {"Area px^2": float(area_px)}
            if mpp is not None and mpp > 0:
                measurements["Area µm^2"] = float(area_px * mpp * mpp)
            measurements["area_px"] = measurements["Area px^2"]
            if "Area µm^2" in measurements:
                measurements["area_um2"] = measurements["Area µm^2"]
            props: dict[str, Any] = {
                "objectType": "annotation",
                "name": labels[lab],
                "classification": {"name": labels[lab], "color": col},
                "measurements": measurements,
                "label": int(lab),
            }
            if properties:
                props.update(properties)
            features.append(
                {"type": "Feature", "geometry": _geometry_json(geom), "properties": props}
            )
        del comp
    return features


def lesion_features(
    label_map: np.ndarray,
    lesions: list[Mapping[str, Any]],
    components: list[int],
    mpp: float | None,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    properties: Mapping[str, Any] | None = None,
    *,
    labels: Mapping[int, str] = DEPOSIT_DISPLAY,
    colors: Mapping[int, tuple[int, int, int]] = DEPOSIT_COLORS,
    min_hole_px: int = MIN_AREA_PX,
) -> list[dict[str, Any]]:
    """One QuPath annotation per lesion of ``lesions.find_lesions``, in their order.

    ``components`` are the lesions' component indices (``PatchResult.lesion_components``)
    in ``deposit_components(label_map)``, which is recomputed here (it is
    deterministic), so no mask is kept between prediction and writing.
    ``offset``, ``scale`` and ``mpp`` (microns per *output* pixel) are as in
    :func:`label_map_to_features`; holes under ``min_hole_px`` output pixels
    are filled.
    """
    if len(lesions) != len(components):
        raise ValueError(f"{len(lesions)} lesions but {len(components)} component indices")
    if not lesions:
        return []
    n, comp, stats, _ = deposit_components(label_map)
    ox, oy = float(offset[0]), float(offset[1])
    s = float(scale)
    px_area = s * s
    min_px = max(1.0, float(min_hole_px) / px_area)
    features: list[dict[str, Any]] = []
    for les, ci in zip(lesions, components, strict=True):
        if not 0 < ci < n:
            raise ValueError(f"lesion {les.get('id')}: component {ci} is not in the label map")
        x, y, w, h, count = (int(v) for v in stats[ci])
        geom = _component_geometry(comp, ci, (x, y, w, h), min_px, (ox, oy), s)
        if geom is None:
            continue
        features.append(
            _lesion_feature(les, geom, count * px_area, mpp, labels, colors, properties)
        )
    del comp
    return features


def file_lesion_features(
    label_file: Any,
    lesions: list[Mapping[str, Any]],
    mpp: float | None,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    properties: Mapping[str, Any] | None = None,
    *,
    labels: Mapping[int, str] = DEPOSIT_DISPLAY,
    colors: Mapping[int, tuple[int, int, int]] = DEPOSIT_COLORS,
    min_hole_px: int = MIN_AREA_PX,
) -> list[dict[str, Any]]:
    """:func:`lesion_features` for a large region's map on disk (``bigmap.LabelMapFile``).

    Each lesion's window is read back from the file and labelled on its own:
    every path between two of a lesion's pixels runs through its pixels, all
    inside its bounding box, so within the window the lesion is exactly the
    component under its seed pixel (``label_file.outlines``). Memory: one
    window at a time, never the map.
    """
    ox, oy, s = float(offset[0]), float(offset[1]), float(scale)
    min_px = max(1.0, float(min_hole_px) / (s * s))
    features: list[dict[str, Any]] = []
    for les, ((x, y, w, h), (sx, sy)) in zip(lesions, label_file.outlines, strict=True):
        win = label_file.window(x, y, w, h)
        _, comp = cv2.connectedComponents(win, connectivity=8, ltype=cv2.CV_32S)
        ci = int(comp[sy - y, sx - x])
        count = int(np.count_nonzero(comp == ci))
        geom = _component_geometry(comp, ci, (0, 0, w, h), min_px, (x * s + ox, y * s + oy), s)
        if geom is not None:
            features.append(
                _lesion_feature(les, geom, count * s * s, mpp, labels, colors, properties)
            )
    return features


def _lesion_feature(
    les: Mapping[str, Any],
    geom: Any,
    area_px: float,
    mpp: float | None,
    labels: Mapping[int, str],
    colors: Mapping[int, tuple[int, int, int]],
    properties: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One lesion's QuPath annotation: its outline, class, colour and measurements."""
    lab = int(les.get("label_value", 0))
    display = labels.get(lab, str(les.get("label", lab)))
    meas: dict[str, float] = {"Area px^2": float(area_px)}
    if mpp is not None and mpp > 0:
        meas["Area µm^2"] = float(area_px * mpp * mpp)
    if les.get("confidence") is not None:
        meas["Confidence"] = float(les["confidence"])
    if les.get("deposit_probability") is not None:
        meas["Deposit probability"] = float(les["deposit_probability"])
    for c, p in (les.get("probabilities") or {}).items():
        meas[f"Prob {c}"] = float(p)
    for name, f in (les.get("label_fractions") or {}).items():
        meas[f"Fraction {name}"] = float(f)
    meas["area_px"] = meas["Area px^2"]
    if "Area µm^2" in meas:
        meas["area_um2"] = meas["Area µm^2"]
    props: dict[str, Any] = {
        "objectType": "annotation",
        "name": f"{display} {les.get('id')}",
        "classification": {
            "name": display,
            "color": [int(c) for c in colors.get(lab, (128, 128, 128))],
        },
        "measurements": meas,
        "label": lab,
        "lesion_id": les.get("id"),
        "lesion_class": les.get("prediction"),
        "passed": bool(les.get("passed")),
    }
    if properties:
        props.update(properties)
    return {"type": "Feature", "geometry": _geometry_json(geom), "properties": props}


def feature_collection(
    features: list[dict[str, Any]], properties: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Wrap features in a ``FeatureCollection`` (the form QuPath's import reads)."""
    fc: dict[str, Any] = {"type": "FeatureCollection", "features": list(features)}
    if properties:
        # A foreign member: ignored by QuPath, kept for provenance.
        fc["properties"] = dict(properties)
    return fc


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection as compact ASCII JSON (atomic replace).

    Non-ASCII characters are escaped (``\\u00b5``), so every reader decodes the
    same names whatever charset it assumes (see the module docstring).
    """
    path = Path(path)
    # json.dumps runs the C encoder; json.dump to a file would encode in Python.
    text = json.dumps(collection, ensure_ascii=True, separators=(",", ":"))
    return atomic_write_bytes(path, text.encode("ascii"), fsync=False)


# --------------------------------------------------------------------------- helpers


def _component_geometry(
    comp: np.ndarray,
    idx: int,
    box: tuple[int, int, int, int],
    min_px: float,
    origin: tuple[float, float],
    scale: float,
) -> Any:
    """Outline of component ``idx`` (bounding box ``box`` of ``comp``) in image coordinates.

    Traced straight from the component's crop; an invalid ring is repaired, and
    None comes back when nothing polygonal is left.
    """
    x, y, w, h = box
    sub = (comp[y : y + h, x : x + w] == idx).astype(np.uint8)
    polys = _trace(sub, min_px, (x * scale + origin[0], y * scale + origin[1]), scale)
    if not polys:
        return None
    geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if not geom.is_valid:
        geom = _polygonal(shapely.make_valid(geom))
    return geom


def _trace(
    mask: np.ndarray,
    min_px: float,
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> list[Polygon]:
    """Polygons (with holes) of a binary mask.

    Mask pixel coordinates ``(u, v)`` map to ``origin + scale * (u, v)``
    (default: the mask's own pixel coordinates).
    """
    # Enlarged copy with a 1-pixel empty border, filled by strided writes: no
    # full-size temporaries (an 8192^2 region's mask is 256 MB enlarged).
    h, w = mask.shape
    up = np.zeros((h * _UP + 2, w * _UP + 2), np.uint8)
    src = (mask != 0).view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).astype(np.uint8)
    for dy in range(_UP):
        for dx in range(_UP):
            up[1 + dy : 1 + h * _UP : _UP, 1 + dx : 1 + w * _UP : _UP] = src
    del src
    _well_compose(up)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours or hierarchy is None:
        return []
    hier = hierarchy[0]
    min_up = min_px * _UP * _UP

    k = scale / _UP
    shift = np.array([origin[0], origin[1]]) + (0.5 - 1.0) * k

    def coords(cnt: np.ndarray) -> np.ndarray:
        # Upsampled pixel centre (u + 0.5), minus the 1-pixel border, back to mask
        # units, then to the output frame.
        return cnt.reshape(-1, 2) * k + shift

    polys: list[Polygon] = []
    for i, cnt in enumerate(contours):
        if hier[i][3] != -1 or len(cnt) < 3:
            continue  # holes are collected with their parent
        holes = []
        child = hier[i][2]
        while child != -1:
            hc = contours[child]
            if len(hc) >= 3 and cv2.contourArea(hc) >= min_up:
                holes.append(coords(hc))
            child = hier[child][0]
        poly = Polygon(coords(cnt), holes)
        if poly.area > 0:
            polys.append(poly)
    return polys


def _well_compose(m: np.ndarray) -> None:
    """Bridge every diagonal-only contact (2 x 2 checkerboard) in place.

    ``m`` holds 0/1. Three scratch planes are reused across passes instead of
    the dozen boolean temporaries of the plain expression (memory bound for a
    large region's enlarged mask).
    """
    a, b = m[:-1, :-1], m[:-1, 1:]
    c, d = m[1:, :-1], m[1:, 1:]
    diag = np.empty(a.shape, np.uint8)
    anti = np.empty(a.shape, np.uint8)
    tmp = np.empty(a.shape, np.uint8)
    for _ in range(4):
        # diag = a & d & !(b | c);  anti = b & c & !(a | d)
        np.bitwise_and(a, d, out=diag)
        np.bitwise_or(b, c, out=tmp)
        np.bitwise_xor(tmp, 1, out=tmp)
        np.bitwise_and(diag, tmp, out=diag)
        np.bitwise_and(b, c, out=anti)
        np.bitwise_or(a, d, out=tmp)
        np.bitwise_xor(tmp, 1, out=tmp)
        np.bitwise_and(anti, tmp, out=anti)
        if not diag.any() and not anti.any():
            return
        np.bitwise_or(b, diag, out=b)
        np.bitwise_or(a, anti, out=a)


def _polygonal(geom: Any) -> Polygon | MultiPolygon | None:
    """The polygonal part of a geometry (make_valid may return a collection)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return None if geom.is_empty else geom
    polys: list[Polygon] = []
    for g in getattr(geom, "geoms", []):
        if isinstance(g, Polygon) and not g.is_empty:
            polys.append(g)
        elif isinstance(g, MultiPolygon):
            polys.extend(p for p in g.geoms if not p.is_empty)
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _geometry_json(geom: Polygon | MultiPolygon) -> dict[str, Any]:
    """GeoJSON geometry with closed rings (shapely rings repeat their first point)."""

    def poly(p: Polygon) -> list[list[list[float]]]:
        rings = [p.exterior, *p.interiors]
        return [np.round(np.asarray(r.coords)[:, :2], 4).tolist() for r in rings]

    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": poly(geom)}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}
