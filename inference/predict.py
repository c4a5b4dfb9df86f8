"""``calcinosis predict``: images, folders or manifests in; tables, overlays and GeoJSON out.

Outputs under ``--out``::

    predictions.csv        one row per input (columns below), input order
    predictions.json       the same plus stain/region details, the lesions and run settings
    overlays/<name>.png    the image with deposits outlined and a legend
    geojson/<name>.geojson one QuPath annotation per lesion (File > Import objects)
    tiles/<name>.csv       for tiled regions: one row per tile
    lesions/<name>.csv     for tiled regions: one row per lesion (``lesions.lesion_columns``)

A tiled region is called by its lesions (see :mod:`calcinosis.inference.lesions`):
``prediction`` is the class of its strongest lesions, ``also_present`` the
other classes with lesions that pass (``;``-separated), ``n_lesions`` the
number of lesions found; the mean of the tile probabilities is
``region.tile_mean_probabilities`` in predictions.json. A patch is called
by the class head; its lesions are listed in predictions.json and the GeoJSON.

Whole-slide files (``slide.is_slide_file``) are predicted one at a time
straight from the file, a band of tiles at a time (``--level``, ``--region``;
see :mod:`calcinosis.inference.slide`); their overlay shows the region shrunk
to at most :data:`SLIDE_OVERLAY_SIDE` pixels, and their GeoJSON is in the
slide's level-0 coordinates, so it lands in place when imported in QuPath.

``<name>`` is derived from the input's file name, reduced to safe characters
and made unique (``name``, ``name-2``, ...), so inputs with the same stem in
different folders never overwrite each other and no name can leave ``--out``.

Exit status: 0 when every input was processed; 3 when at least one input
could not be read or processed (its row has ``status=error`` and the reason);
2 for a usage error (no inputs found, bad checkpoint, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
import traceback
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError
from calcinosis.model.fileio import atomic_write, atomic_write_text
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS

from .inputs import InputItem, collect_inputs
from .overlay import PNG_COMPRESSION
from .predictor import BACKENDS, Predictor
from .result import PatchResult, error_reason

#: Exit status when some inputs failed (the others were still processed).
EXIT_SOME_FAILED = 3
#: Pixels decoded ahead of the model at most (about 200 MB of RGB).
PIXEL_BUDGET = 64_000_000
#: Longest output base name.
MAX_NAME = 80
#: Longest side of a whole-slide region's overlay (the region is shrunk to fit).
SLIDE_OVERLAY_SIDE = 4096

_WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


# --------------------------------------------------------------------------- names


def safe_stem(path: str | os.PathLike[str]) -> str:
    """A file-system-safe base name from a path's stem: ASCII letters, digits, ``._-``."""
    stem = Path(path).stem if str(path) else ""
    text = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    text = text[:MAX_NAME].rstrip("._-")
    if not text:
        text = "image"
    if text.lower().split(".")[0] in _WINDOWS_RESERVED:
        text = "_" + text
    return text


def unique_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Safe, distinct (case-insensitively) output names, one per path, in order."""
    taken: set[str] = set()
    out = []
    for p in paths:
        base = safe_stem(p)
        name, k = base, 2
        while name.lower() in taken:
            name = f"{base}-{k}"
            k += 1
        taken.add(name.lower())
        out.append(name)
    return out


# --------------------------------------------------------------------------- table


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


def _n_lesions(res: PatchResult) -> int | str:
    """Lesions found (at least the minimum area); ``region.lesions_passed`` counts those that count."""
    if res.lesions is None or res.status == "error":
        return ""
    return len(res.lesions)


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{float(v):.{digits}f}"


# --------------------------------------------------------------------------- run


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` subcommand; see the module docstring for outputs and exit codes."""
    out = Path(args.out)
    backend = getattr(args, "backend", "torch")
    if backend not in BACKENDS:
        raise CalcinosisError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    max_pixels = getattr(args, "max_pixels", None)
    if max_pixels is not None and max_pixels < 0:
        raise CalcinosisError(f"--max-pixels must be >= 0 (0 = no limit); got {max_pixels}")
    # zlib level of the overlay PNGs (see overlay.PNG_COMPRESSION).
    png_level = getattr(args, "png_compression", None)
    png_level = PNG_COMPRESSION if png_level is None else int(png_level)
    if not 0 <= png_level <= 9:
        raise CalcinosisError(f"--png-compression must be 0-9; got {png_level}")
    from .slide import is_slide_file, parse_region

    region_arg = getattr(args, "region", None)
    region = parse_region(region_arg) if region_arg else None
    level = getattr(args, "level", None)
    if level is not None and level < 0:
        raise CalcinosisError(f"--level must be >= 0 (0 = full resolution); got {level}")
    items = collect_inputs(
        args.inputs,
        exclude=out,
        default_mpp=getattr(args, "mpp", None),
        split=getattr(args, "split", None),
    )
    if not items:
        raise CalcinosisError(
            "no images found in the given inputs; pass image files, folders of images "
            "(.png .jpg .jpeg .tif .tiff .bmp .webp), whole-slide files (.svs .ndpi .scn .bif "
            ".mrxs ...) or a CSV manifest with a 'path' column"
        )
    force = region is not None or level is not None
    slides = [
        i
        for i, it in enumerate(items)
        if it.error is None and is_slide_file(it.path, force=force, max_pixels=max_pixels)
    ]
    slide_set = set(slides)
    plain = [i for i in range(len(items)) if i not in slide_set]
    n_plain = sum(1 for i in plain if items[i].error is None)
    if force and n_plain:
        print(
            f"warning: --level/--region apply to whole-slide files only; {n_plain} ordinary "
            "image(s) are predicted whole",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        backend=backend,
        device=getattr(args, "device", "cpu") or "cpu",
        indeterminate_threshold=getattr(args, "threshold", None),
        batch_size=getattr(args, "batch_size", 32) or 32,
        tile_overlap=getattr(args, "tile_overlap", None),
        focus_threshold=_focus_arg(getattr(args, "focus_threshold", None)),
        tta=getattr(args, "tta", None),
        lesion_threshold=getattr(args, "lesion_threshold", None),
        min_lesion_area_um2=getattr(args, "min_lesion_area_um2", None),
    )
    t_ready = time.perf_counter()
    cpu_ready = _cpu_seconds()
    overlays = not getattr(args, "no_overlays", False)
    geojson = not getattr(args, "no_geojson", False)
    workers = getattr(args, "workers", None) or (os.cpu_count() or 1)
    for sub in ("overlays",) * overlays + ("geojson",) * geojson + ("tiles", "lesions"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    names = unique_names([it.path for it in items])
    rows: list[dict[str, Any] | None] = [None] * len(items)
    records: list[dict[str, Any] | None] = [None] * len(items)
    cols = csv_columns(predictor.class_names, predictor.deposit_labels)

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        writes: list[Future] = []
        bar = tqdm(
            total=len(items),
            unit="image",
            desc="predict",
            file=sys.stderr,
            disable=getattr(args, "quiet", False),
        )

        def record(i: int, res: PatchResult, image: Any, max_side: int | None = None) -> None:
            res.path = str(items[i].path)
            files = _planned_files(out, names[i], res, overlays, geojson)
            rows[i] = result_row(res, predictor.class_names, predictor.deposit_labels, files)
            rec = res.to_dict()
            rec["name"] = names[i]
            rec["source"] = items[i].source
            rec["outputs"] = files
            records[i] = rec
            if files:
                writes.append(
                    pool.submit(
                        _write_outputs,
                        out,
                        names[i],
                        res,
                        image,
                        files,
                        png_level,
                        max_side,
                        predictor.class_names,
                        predictor.deposit_labels,
                    )
                )
            else:
                res.label_map = None

        # Decoding threads also run the tissue and focus checks (predictor.prepare),
        # so the main thread mostly waits on the network.
        chunks = _decoded_chunks(
            items,
            pool,
            predictor.batch_size,
            max_pixels,
            indices=plain,
            prepare=predictor.prepare,
        )
        for chunk, images in chunks:
            results = _predict_chunk(predictor, [items[i] for i in chunk], images)
            for i, res in zip(chunk, results, strict=True):
                record(i, res, _pixels(images.get(i)))
            bar.update(len(chunk))
            # Keep memory bounded: wait for writes of earlier chunks.
            while len(writes) > 2 * predictor.batch_size:
                writes.pop(0).result()
        for i in slides:
            res, thumb = _predict_slide(
                predictor, items[i], level, region, SLIDE_OVERLAY_SIDE if overlays else None
            )
            record(i, res, thumb, SLIDE_OVERLAY_SIDE)
            bar.update(1)
            # At most one slide's maps are still being written while the next is predicted.
            while len(writes) > 1:
                writes.pop(0).result()
        for f in writes:
            f.result()
        bar.close()

    elapsed = time.perf_counter() - t0
    _write_csv(out / "predictions.csv", cols, [r for r in rows if r is not None])
    summary = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(args.checkpoint),
        "backend": backend,
        "class_names": predictor.class_names,
        "stain_names": predictor.stain_names,
        "deposit_labels": predictor.deposit_labels,
        "model_mpp": predictor.model_mpp,
        "input_size": predictor.input_size,
        "temperature": predictor.temperature,
        "tta": predictor.tta,
        "indeterminate_threshold": predictor.indeterminate_threshold,
        "min_tissue_fraction": predictor.min_tissue_fraction,
        "focus_threshold": predictor.focus_threshold,
        "lesion_threshold": predictor.lesion_threshold,
        "min_lesion_area_um2": predictor.min_lesion_area_um2,
        "tile_overlap": predictor.tile_overlap,
        "seconds": round(elapsed, 2),
        "seconds_after_load": round(time.perf_counter() - t_ready, 2),
        # CPU time of all threads (decoding, network, overlays): with seconds_after_load,
        # how many cores the run kept busy.
        "cpu_seconds_after_load": round(_cpu_seconds() - cpu_ready, 2),
        "results": records,
    }
    atomic_write_text(
        out / "predictions.json", json.dumps(summary, indent=1, ensure_ascii=False), fsync=False
    )

    statuses = Counter(r["status"] for r in rows if r)
    calls = Counter(r["prediction"] for r in rows if r and r["prediction"])
    print(
        f"predicted {len(items)} input(s) in {elapsed:.1f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    if calls:
        print("calls: " + ", ".join(f"{k} {v}" for k, v in calls.most_common()))
    print(f"table:    {out / 'predictions.csv'}")
    print(f"details:  {out / 'predictions.json'}")
    if overlays:
        print(f"overlays: {out / 'overlays'}")
    if geojson:
        print(f"geojson:  {out / 'geojson'} (QuPath: File > Import objects)")
    if any(r and r["tiles"] for r in rows):
        print(f"tiles:    {out / 'tiles'}")
        print(f"lesions:  {out / 'lesions'}")
    failed = statuses.get("error", 0)
    if failed:
        print(
            f"{failed} input(s) failed; see the 'reason' column (exit status {EXIT_SOME_FAILED})",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    t = os.times()
    return t.user + t.system


def _focus_arg(value: float | None) -> float | None:
    from .predictor import FOCUS_MIN

    if value is None:
        return FOCUS_MIN
    return None if value <= 0 else float(value)


def _decoded_chunks(
    items: list[InputItem],
    pool: ThreadPoolExecutor,
    batch_size: int,
    max_pixels: int | None = None,
    indices: Sequence[int] | None = None,
    prepare: Callable[..., Any] | None = None,
) -> Iterator[tuple[list[int], dict[int, Any]]]:
    """Chunks of item indices with their decoded images, decoding one chunk ahead.

    A chunk holds up to ``batch_size`` images and about ``PIXEL_BUDGET`` pixels
    (a big region is a chunk of its own), so at most two chunks of pixels are
    in memory while the model works on one of them. Images above ``max_pixels``
    (None: ``imageio.DEFAULT_MAX_PIXELS``; 0: no limit) are never decoded.
    ``indices`` restricts the work to those items (default: all). With
    ``prepare`` (``Predictor.prepare``), each decoding thread also prepares its
    image, and the values are prepared images instead of arrays; a value is
    the exception instead when reading or preparing failed.
    """
    from calcinosis.model.imageio import image_size

    def plan() -> Iterator[list[int]]:
        chunk: list[int] = []
        pixels = 0
        for i in range(len(items)) if indices is None else indices:
            it = items[i]
            px = 0
            if it.error is None:
                try:
                    w, h = image_size(it.path)
                    px = w * h
                except Exception:  # noqa: BLE001 - the read below reports it properly
                    px = 0
            if chunk and (len(chunk) >= batch_size or pixels + px > PIXEL_BUDGET):
                yield chunk
                chunk, pixels = [], 0
            chunk.append(i)
            pixels += px
        if chunk:
            yield chunk

    def submit(chunk: list[int]) -> dict[int, Future]:
        return {i: pool.submit(_read, items[i], max_pixels, prepare) for i in chunk}

    chunks = plan()
    current = next(chunks, None)
    pending = submit(current) if current is not None else {}
    while current is not None:
        nxt = next(chunks, None)
        nxt_pending = submit(nxt) if nxt is not None else {}
        decoded = {i: _result_or_exc(f) for i, f in pending.items()}
        yield current, decoded
        current, pending = nxt, nxt_pending


def _read(
    item: InputItem, max_pixels: int | None = None, prepare: Callable[..., Any] | None = None
) -> Any:
    """Decode one input (in a pool thread), and prepare it when ``prepare`` is given."""
    if item.error is not None:
        raise CalcinosisError(item.error)
    from calcinosis.model.imageio import read_rgb

    rgb = read_rgb(item.path, max_pixels=max_pixels)
    if prepare is None:
        return rgb
    try:
        return prepare(rgb, item.mpp)
    except (CalcinosisError, OSError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so, with its traceback
        traceback.print_exc(file=sys.stderr)
        raise CalcinosisError(f"internal error: {error_reason(exc)}") from exc


def _pixels(value: Any) -> np.ndarray | None:
    """The decoded image of a ``_decoded_chunks`` value (an array or a prepared image)."""
    if isinstance(value, np.ndarray):
        return value
    rgb = getattr(value, "rgb", None)
    return rgb if isinstance(rgb, np.ndarray) else None


def _result_or_exc(f: Future) -> Any:
    try:
        return f.result()
    except Exception as exc:  # noqa: BLE001 - reported as the row's reason
        return exc


def _predict_chunk(
    predictor: Predictor, items: list[InputItem], images: dict[int, Any]
) -> list[PatchResult]:
    """Results for one chunk; ``images`` values: arrays, prepared images or exceptions."""
    keys = list(images)
    good = [k for k in keys if not isinstance(images[k], BaseException)]
    out: dict[int, PatchResult] = {}
    for k in keys:
        if isinstance(images[k], BaseException):
            out[k] = PatchResult(status="error", reason=error_reason(images[k]))
    if good:
        values = [images[k] for k in good]
        try:
            if all(isinstance(v, np.ndarray) for v in values):
                res = predictor.predict_batch(values, mpp=[items[keys.index(k)].mpp for k in good])
            else:
                res = predictor.predict_prepared(values)
            out.update(zip(good, res, strict=True))
        except Exception:  # noqa: BLE001 - isolate the image that broke the batch
            for k in good:
                try:
                    out[k] = predictor.predict(_pixels(images[k]), mpp=items[keys.index(k)].mpp)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    out[k] = PatchResult(
                        status="error", reason=f"internal error: {error_reason(exc)}"
                    )
    return [out[k] for k in keys]


def _predict_slide(
    predictor: Predictor,
    item: InputItem,
    level: int | None,
    region: tuple[int, int, int, int] | None,
    overlay_side: int | None,
) -> tuple[PatchResult, np.ndarray | None]:
    """One whole-slide input; failures become an error row, as for images."""
    from .slide import predict_slide

    if item.error is not None:
        return PatchResult(status="error", reason=item.error), None
    try:
        return predict_slide(
            predictor,
            item.path,
            level=level,
            region=region,
            mpp=item.mpp,
            overlay_side=overlay_side,
        )
    except (CalcinosisError, OSError, ValueError) as exc:
        return PatchResult(status="error", reason=error_reason(exc)), None
    except Exception as exc:  # noqa: BLE001 - one broken slide must not stop the run
        traceback.print_exc(file=sys.stderr)
        return PatchResult(status="error", reason=f"internal error: {error_reason(exc)}"), None


def _planned_files(
    out: Path, name: str, res: PatchResult, overlays: bool, geojson: bool
) -> dict[str, str]:
    """Relative output paths for one result (nothing for unreadable inputs)."""
    if res.status == "error" or res.label_map is None:
        return {}
    files = {}
    if overlays:
        files["overlay"] = f"overlays/{name}.png"
    if geojson:
        files["geojson"] = f"geojson/{name}.geojson"
    if res.tiles is not None:
        files["tiles"] = f"tiles/{name}.csv"
        if res.lesions is not None:
            files["lesions"] = f"lesions/{name}.csv"
    return files


def _write_outputs(
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
    import cv2

    from .geojson import feature_collection, label_map_to_features, lesion_features, write_geojson
    from .lesions import lesion_columns, lesion_row
    from .overlay import MAX_SIDE, render_overlay, write_overlay

    try:
        lm = res.label_map
        slide = res.slide
        if "overlay" in files and isinstance(rgb, np.ndarray):
            title = Path(res.path or name).name
            if slide:
                title += f"  level {slide['level']}, region {','.join(map(str, slide['region']))}"
            if res.mode == "region" and res.region:
                title += f"  ({res.region['tissue_tiles']} tissue tiles)"
            ov_lm = lm
            if lm is not None and lm.shape != rgb.shape[:2]:
                ov_lm = cv2.resize(
                    lm, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST
                )
            img = render_overlay(
                rgb,
                ov_lm,
                res.probabilities or None,
                res.prediction,
                res.stain,
                title,
                status=res.status,
                stain_prob=res.stain_probability,
                also_present=(res.region or {}).get("also_present") or (),
                max_side=max_side or MAX_SIDE,
            )
            del ov_lm
            write_overlay(out / files["overlay"], img, png_level)
        if "geojson" in files and lm is not None:
            mpp, offset, scale = res.mpp, (0.0, 0.0), 1.0
            if slide:
                # Label-map pixels (of the level read) -> the slide's level-0 pixels.
                scale = float(slide["level_downsample"])
                offset = (float(slide["origin"][0]), float(slide["origin"][1]))
                mpp = res.mpp / scale if res.mpp else None
            source = {"source": Path(res.path or name).name}
            if res.lesions is not None and res.lesion_components is not None:
                feats = lesion_features(
                    lm,
                    res.lesions,
                    res.lesion_components,
                    mpp,
                    offset=offset,
                    scale=scale,
                    properties=source,
                )
            else:
                feats = label_map_to_features(
                    lm, mpp, offset=offset, scale=scale, properties=source
                )
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
            write_geojson(out / files["geojson"], feature_collection(feats, props))
        if "tiles" in files and res.tiles is not None:
            keys: list[str] = []
            for t in res.tiles:
                keys.extend(k for k in t if k not in keys)
            rows = [{k: _cell(t.get(k)) for k in keys} for t in res.tiles]
            _write_csv(out / files["tiles"], keys, rows)
        if "lesions" in files and res.lesions is not None:
            cols = lesion_columns(class_names, deposit_labels)
            rows = [{k: _cell(v) for k, v in lesion_row(les).items()} for les in res.lesions]
            _write_csv(out / files["lesions"], cols, rows)
    finally:
        res.label_map = None  # free the map as soon as its files are written


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else v


def _write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w", newline="", fsync=False) as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
