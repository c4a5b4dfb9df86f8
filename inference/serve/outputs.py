"""The files of one prediction, written by ``calcinosis predict``'s own writers.

The page offers the same downloads as ``calcinosis predict --out DIR``:
``predictions.csv``, ``predictions.json``, ``overlays/<name>.png``,
``geojson/<name>.geojson`` and, for tiled regions, ``tiles/<name>.csv`` and
``lesions/<name>.csv``, in the same layout. This module is the one place the
server writes them, through the functions ``predict`` writes with
(:mod:`calcinosis.inference.outputs`: the table row, the planned file names,
the overlay/GeoJSON/table writer, the CSV writer and the predictor's settings
in the run header) and ``predict``'s output names (``predict.unique_names``),
called here unchanged. Only the timings of the run header (built inline in
``run_predict``) are assembled here; a test checks the header against
``predict``'s, key for key.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.inference.outputs import (
    csv_columns,
    planned_files,
    result_row,
    run_settings,
    write_csv,
    write_outputs,
)
from calcinosis.inference.overlay import PNG_COMPRESSION
from calcinosis.inference.predict import SLIDE_OVERLAY_SIDE, unique_names
from calcinosis.inference.predictor import Predictor
from calcinosis.inference.result import PatchResult
from calcinosis.model.fileio import atomic_write_text

__all__ = [
    "SLIDE_OVERLAY_SIDE",
    "download_files",
    "output_name",
    "run_header",
    "write_prediction",
]


def output_name(filename: str) -> str:
    """The base name ``predict`` gives an input of this file name (``predict.unique_names``)."""
    return unique_names([filename])[0]


def write_prediction(
    out: Path,
    predictor: Predictor,
    res: PatchResult,
    image: np.ndarray | None,
    name: str,
    *,
    source: str,
    checkpoint: str,
    seconds: float,
    max_side: int | None = None,
    png_level: int = PNG_COMPRESSION,
) -> dict[str, Any]:
    """Write one result's files under ``out`` as ``predict`` would; return its JSON record.

    ``res.path`` must already be what the table should show. ``image`` is the
    overlay's background (the decoded image, or a slide region's thumbnail,
    with ``max_side`` = :data:`SLIDE_OVERLAY_SIDE`). Like ``predict``, this
    frees ``res.label_map`` once the files are written: take what the page
    needs from it first.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = planned_files(out, name, res, True, True)
    for rel in files.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
    row = result_row(res, predictor.class_names, predictor.deposit_labels, files)
    rec = res.to_dict()
    rec["name"] = name
    rec["source"] = source
    rec["outputs"] = files
    if files:
        write_outputs(
            out,
            name,
            res,
            image,
            files,
            png_level,
            max_side,
            predictor.class_names,
            predictor.deposit_labels,
        )
    else:
        res.release_maps()
    cols = csv_columns(predictor.class_names, predictor.deposit_labels)
    write_csv(out / "predictions.csv", cols, [row])
    summary = run_header(predictor, checkpoint, seconds)
    summary["results"] = [rec]
    atomic_write_text(
        out / "predictions.json", json.dumps(summary, indent=1, ensure_ascii=False), fsync=False
    )
    return rec


def run_header(predictor: Predictor, checkpoint: str, seconds: float) -> dict[str, Any]:
    """The settings and timings ``predict`` puts at the top of predictions.json."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "backend": predictor.backend,
        **run_settings(predictor),
        "seconds": round(seconds, 2),
        "seconds_after_load": round(seconds, 2),
        # One job's CPU time is not separable from the server's other threads.
        "cpu_seconds_after_load": None,
    }


def download_files(out: Path, rec: dict[str, Any]) -> dict[str, str]:
    """Download key -> path relative to ``out``, for the files that exist."""
    files = {"csv": "predictions.csv", "json": "predictions.json"}
    for key, rel in (rec.get("outputs") or {}).items():
        files[key] = rel
    return {k: v for k, v in files.items() if (out / v).is_file()}
