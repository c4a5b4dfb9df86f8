"""What ``calcinosis predict`` writes for each result: its table row, overlay, GeoJSON and CSVs.

:func:`result_row` is the result's row of ``predictions.csv`` (columns:
:func:`csv_columns`), :func:`run_settings` the predictor's settings at the top
of ``predictions.json``; :func:`planned_files` names the files a result gets and
:func:`write_outputs` writes them (in the command's thread pool): the overlay
PNG (``overlay.render_overlay``), the GeoJSON (``geojson.lesion_features``,
in a slide's level-0 frame for slides) and, for tiled regions, the tile and
lesion tables.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calcinosis.model.fileio import atomic_write
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS

from .overlay import PNG_COMPRESSION
from .result import PatchResult

if TYPE_CHECKING:
    from .predictor import Predictor

__all__ = [
    "csv_columns",
    "planned_files",
    "result_row",
    "run_settings",
    "write_csv",
    "write_outputs",
    "write_overlay_png",
    "write_result_geojson",
]


def csv_columns(class_names: Sequence[str], deposit_labels: Sequence[str]) -> list[str]:
    """predictions.csv columns: the contract's order, then a few extras."""
    cols = [
        "path",
        "prediction",
        *[f"p_{c}" for c in class_names],
        "stain",
        "p_stain",
        "tissue_fraction",
    ]
    for lab in deposit_labels[1:]:
        cols += [f"area_px_{lab}", f"area_um2_{lab}"]
    cols += [
        "status",
        "reason",
        "mode",
        "width",
        "height",
        "mpp",
        "focus",
        "overlay",
        "geojson",
        "tiles",
        "lesions",
        "n_lesions",
        "also_present",
    ]
    return cols


def result_row(
    res: PatchResult,
    class_names: Sequence[str],
    deposit_labels: Sequence[str],
    files: dict[str, str],
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": res.path,
        "prediction": res.prediction or "",
        "stain": res.stain or "",
        "p_stain": _fmt(res.stain_probability),
        "tissue_fraction": "" if res.status == "error" else _fmt(res.tissue_fraction),
        "status": res.status,
        "reason": res.reason,
        "mode": "" if res.status == "error" else res.mode,
        "width": res.width or "",
        "height": res.height or "",
        "mpp": _fmt(res.mpp),
        "focus": _fmt(res.focus),
        **{k: files.get(k, "") for k in ("overlay", "geojson", "tiles", "lesions")},
        "n_lesions": _n_lesions(res),
        "also_present": ";".join((res.region or {}).get("also_present") or []),
    }
    for c in class_names:
        row[f"p_{c}"] = _fmt(res.probabilities.get(c))
    for lab in deposit_labels[1:]:
        px = res.deposit_area_px.get(lab) if res.status != "error" else None
        um = (res.deposit_area_um2 or {}).get(lab) if res.status != "error" else None
        row[f"area_px_{lab}"] = "" if px is None else int(px)
        row[f"area_um2_{lab}"] = _fmt(um, 2)
    return row


def run_settings(predictor: Predictor) -> dict[str, Any]:
    """The predictor's settings in predictions.json's run header (``predict`` and ``serve``)."""
    return {
        "class_names": predictor.class_names,
        "stain_names": predictor.stain_names,
        "deposit_labels": predictor.deposit_labels,
        "model_mpp": predictor.model_mpp,
        "input_size": predictor.input_size,
        "temperature": predictor.temperature,
        # Test-time augmentation of patches, of tiled regions and slides, and the
        # mode the temperature was fitted in.
        "tta": predictor.tta,
        "region_tta": predictor.region_tta,
        "temperature_tta": predictor.temperature_tta,
        "indeterminate_threshold": predictor.indeterminate_threshold,
        "min_tissue_fraction": predictor.min_tissue_fraction,
        "focus_threshold": predictor.focus_threshold,
        "lesion_threshold": predictor.lesion_threshold,
        "min_lesion_area_um2": predictor.min_lesion_area_um2,
        "tile_overlap": predictor.tile_overlap,
    }


def _n_lesions(res: PatchResult) -> int | str:
    """Lesions found (at least the minimum area); ``region.lesions_passed`` counts those that count."""
    if res.lesions is None or res.status == "error":
        return ""
    return len(res.lesions)


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{float(v):.{digits}f}"


def planned_files(
    out: Path, name: str, res: PatchResult, overlays: bool, geojson: bool
) -> dict[str, str]:
    """Relative output paths for one result (nothing for unreadable inputs)."""
    if res.status == "error" or (res.label_map is None and res.label_file is None):
        return {}
    files = {}
    if res.label_file is not None:
        # A large region's label map: the pyramidal TIFF (``bigmap``), not held in memory.
        files["label_map"] = f"maps/{name}.ome.tif"
    if overlays:
        files["overlay"] = f"overlays/{name}.png"
    if geojson:
        files["geojson"] = f"geojson/{name}.geojson"
    if res.tiles is not None:
        files["tiles"] = f"tiles/{name}.csv"
        if res.lesions is not None:
            files["lesions"] = f"lesions/{name}.csv"
    return files


def write_outputs(
    out: Path,
    name: str,
    res: PatchResult,
    rgb: Any,
    files: dict[str, str],
    png_level: int = PNG_COMPRESSION,
    max_side: int | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    deposit_labels: Sequence[str] = DEPOSIT_LABELS,
) -> None:
    """Overlay PNG, GeoJSON, tile and lesion tables of one result (runs in the thread pool).

    ``png_level`` is the overlay PNG's zlib level (``overlay.PNG_COMPRESSION``).
    ``rgb`` may be smaller than the label map (a slide region's shrunk copy):
    the map is then shrunk to it, nearest-neighbour, for the overlay, whose
    longest side ``max_side`` caps (default ``overlay.MAX_SIDE``). A slide's
    GeoJSON is written in the slide's level-0 coordinates (``res.slide``), one
    annotation per lesion (``geojson.lesion_features``) when the result has lesions.
    ``class_names`` and ``deposit_labels`` name the lesion table's columns.
    """
    from .lesions import lesion_columns, lesion_row

    try:
        if "label_map" in files and res.label_file is not None:
            res.label_file.save_tiff(out / files["label_map"])
        if "overlay" in files and isinstance(rgb, np.ndarray):
            write_overlay_png(out / files["overlay"], res, rgb, name, png_level, max_side)
        if "geojson" in files and (res.label_map is not None or res.label_file is not None):
            write_result_geojson(out / files["geojson"], res, name)
        if "tiles" in files and res.tiles is not None:
            keys: list[str] = []
            for t in res.tiles:
                keys.extend(k for k in t if k not in keys)
            rows = [{k: _cell(t.get(k)) for k in keys} for t in res.tiles]
            write_csv(out / files["tiles"], keys, rows)
        if "lesions" in files and res.lesions is not None:
            cols = lesion_columns(class_names, deposit_labels)
            rows = [{k: _cell(v) for k, v in lesion_row(les).items()} for les in res.lesions]
            write_csv(out / files["lesions"], cols, rows)
    finally:
        res.release_maps()  # free the map as soon as its files are written


def write_overlay_png(
    path: Path,
    res: PatchResult,
    rgb: np.ndarray,
    name: str,
    png_level: int = PNG_COMPRESSION,
    max_side: int | None = None,
) -> None:
    """The overlay of one result on ``rgb``, which may be smaller than its label map."""
    import cv2

    from .overlay import MAX_SIDE, render_overlay, write_overlay

    lm, slide = res.label_map, res.slide
    if lm is None and res.label_file is not None:
        lm = res.label_file.thumbnail  # a large region's map, subsampled (``bigmap``)
    title = Path(res.path or name).name
    if slide:
        title += f"  level {slide['level']}, region {','.join(map(str, slide['region']))}"
    if res.mode == "region" and res.region:
        title += f"  ({res.region['tissue_tiles']} tissue tiles)"
    if lm is not None and lm.shape != rgb.shape[:2]:
        lm = cv2.resize(lm, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    img = render_overlay(
        rgb,
        lm,
        res.probabilities or None,
        res.prediction,
        res.stain,
        title,
        status=res.status,
        stain_prob=res.stain_probability,
        also_present=(res.region or {}).get("also_present") or (),
        max_side=max_side or MAX_SIDE,
    )
    del lm
    write_overlay(path, img, png_level)


def write_result_geojson(path: Path, res: PatchResult, name: str) -> None:
    """One QuPath annotation per lesion (or per deposit), in a slide's level-0 frame for slides."""
    from .geojson import (
        feature_collection,
        file_lesion_features,
        label_map_to_features,
        lesion_features,
        write_geojson,
    )

    lm, slide = res.label_map, res.slide
    mpp, offset, scale = res.mpp, (0.0, 0.0), 1.0
    if slide:
        # Label-map pixels (of the level read) -> the slide's level-0 pixels.
        scale = float(slide["level_downsample"])
        offset = (float(slide["origin"][0]), float(slide["origin"][1]))
        mpp = res.mpp / scale if res.mpp else None
    frame = {
        "offset": offset,
        "scale": scale,
        "properties": {"source": Path(res.path or name).name},
    }
    if lm is None:
        feats = file_lesion_features(res.label_file, res.lesions or [], mpp, **frame)
    elif res.lesions is not None and res.lesion_components is not None:
        feats = lesion_features(lm, res.lesions, res.lesion_components, mpp, **frame)
    else:
        feats = label_map_to_features(lm, mpp, **frame)
    props = {
        "image": res.path,
        "prediction": res.prediction,
        "status": res.status,
        "probabilities": res.probabilities,
        "stain": res.stain,
        "mpp": mpp,
    }
    if res.region:
        props["also_present"] = res.region.get("also_present") or []
        props["tile_mean_probabilities"] = res.region.get("tile_mean_probabilities")
    if slide:
        props["slide"] = {
            k: slide[k] for k in ("reader", "level", "level_downsample", "region", "origin")
        }
    write_geojson(path, feature_collection(feats, props))


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else v


def write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w", newline="", fsync=False) as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
