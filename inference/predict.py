"""``calcinosis predict``: images, folders or manifests in; tables, overlays and GeoJSON out.

Outputs under ``--out``::

    predictions.csv        one row per input (columns below), input order
    predictions.json       the same plus stain/region details, the lesions and run settings
    overlays/<name>.png    the image with deposits outlined and a legend
    geojson/<name>.geojson one QuPath annotation per lesion (File > Import objects)
    tiles/<name>.csv       for tiled regions: one row per tile
    lesions/<name>.csv     for tiled regions: one row per lesion (``lesions.lesion_columns``)
    maps/<name>.ome.tif    for regions over 8192^2 px: the deposit label map as a pyramidal
                           OME-TIFF (``bigmap``; uint8, 0 none, 1 calcium, 2 bone, 3 urate, 4 amyloid)

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
import json
import os
import re
import sys
import time
import traceback
import unicodedata
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError
from calcinosis.model.fileio import atomic_write_text
from calcinosis.model.hardware import cpu_seconds

from .engines import check_backend
from .inputs import InputItem, collect_inputs, decoded_chunks
from .outputs import (
    csv_columns,
    planned_files,
    result_row,
    run_settings,
    write_csv,
    write_outputs,
)
from .overlay import PNG_COMPRESSION
from .predictor import Predictor
from .result import PatchResult, error_reason

__all__ = [
    "EXIT_SOME_FAILED",
    "collect_inputs",
    "csv_columns",
    "predict_into",
    "run_predict",
    "safe_stem",
    "unique_names",
]

#: Exit status when some inputs failed (the others were still processed).
EXIT_SOME_FAILED = 3
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


# --------------------------------------------------------------------------- run


@dataclass
class _Run:
    """One ``predict`` run: its inputs, settings, the predictor and what it has produced."""

    out: Path
    items: list[InputItem]
    predictor: Predictor
    #: Indices of whole-slide inputs, and of everything else.
    slides: list[int]
    plain: list[int]
    level: int | None
    region: tuple[int, int, int, int] | None
    max_pixels: int | None
    png_level: int
    overlays: bool
    geojson: bool
    #: ``time.perf_counter()`` when the predictor began to load.
    started: float
    names: list[str] = field(default_factory=list)
    rows: list[dict[str, Any] | None] = field(default_factory=list)
    records: list[dict[str, Any] | None] = field(default_factory=list)


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` subcommand; see the module docstring for outputs and exit codes."""
    run = _plan(args)
    print(run.predictor.describe_tta())
    workers = getattr(args, "workers", None) or (os.cpu_count() or 1)
    _execute(run, str(args.checkpoint), workers, quiet=getattr(args, "quiet", False))
    return _report(run, time.perf_counter() - run.started)


def predict_into(
    predictor: Predictor,
    items: Sequence[InputItem],
    out: str | os.PathLike[str],
    *,
    checkpoint: str,
    level: int | None = None,
    region: tuple[int, int, int, int] | None = None,
    max_pixels: int | None = None,
    png_level: int = PNG_COMPRESSION,
    overlays: bool = True,
    geojson: bool = True,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """What ``predict`` writes for ``items``, into ``out``, with an already loaded predictor.

    The same code path as the command (``calcinosis predict-cohort`` calls it
    once per slide, into that slide's own folder): ``predictions.csv``,
    ``predictions.json``, overlays, GeoJSON, tile and lesion tables. Returns
    the ``predictions.csv`` rows, in input order.
    """
    from .slide import is_slide_file

    items = list(items)
    force = region is not None or level is not None
    slides = [
        i
        for i, it in enumerate(items)
        if it.error is None and is_slide_file(it.path, force=force, max_pixels=max_pixels)
    ]
    n = len(items)
    run = _Run(
        out=Path(out),
        items=items,
        predictor=predictor,
        slides=slides,
        plain=[i for i in range(n) if i not in set(slides)],
        level=level,
        region=region,
        max_pixels=max_pixels,
        png_level=png_level,
        overlays=overlays,
        geojson=geojson,
        started=time.perf_counter(),
        names=unique_names([it.path for it in items]),
        rows=[None] * n,
        records=[None] * n,
    )
    _execute(run, checkpoint, workers, quiet=True)
    return [r for r in run.rows if r is not None]


def _execute(run: _Run, checkpoint: str, workers: int, quiet: bool) -> None:
    """Predict every input of ``run`` and write its files, predictions.csv and predictions.json."""
    t0 = run.started
    t_ready, cpu_ready = time.perf_counter(), cpu_seconds()
    for sub in ("overlays",) * run.overlays + ("geojson",) * run.geojson + ("tiles", "lesions"):
        (run.out / sub).mkdir(parents=True, exist_ok=True)
    run.out.mkdir(parents=True, exist_ok=True)
    _predict_all(run, workers, quiet=quiet)
    elapsed = time.perf_counter() - t0
    write_csv(
        run.out / "predictions.csv",
        csv_columns(run.predictor.class_names, run.predictor.deposit_labels),
        [r for r in run.rows if r is not None],
    )
    summary = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "backend": run.predictor.backend,
        **run_settings(run.predictor),
        "seconds": round(elapsed, 2),
        "seconds_after_load": round(time.perf_counter() - t_ready, 2),
        # CPU time of all threads (decoding, network, overlays): with seconds_after_load,
        # how many cores the run kept busy.
        "cpu_seconds_after_load": round(cpu_seconds() - cpu_ready, 2),
        "results": run.records,
    }
    atomic_write_text(
        run.out / "predictions.json", json.dumps(summary, indent=1, ensure_ascii=False), fsync=False
    )


def _plan(args: argparse.Namespace) -> _Run:
    """Check the arguments, find the inputs and load the predictor (usage errors raise)."""
    from .slide import is_slide_file

    out = Path(args.out)
    backend, max_pixels, png_level, region, level = _options(args)
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
    plain = [i for i in range(len(items)) if i not in set(slides)]
    n_plain = sum(1 for i in plain if items[i].error is None)
    if force and n_plain:
        print(
            f"warning: --level/--region apply to whole-slide files only; {n_plain} ordinary "
            "image(s) are predicted whole",
            file=sys.stderr,
        )
    started = time.perf_counter()
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
    n = len(items)
    return _Run(
        out=out,
        items=items,
        predictor=predictor,
        slides=slides,
        plain=plain,
        level=level,
        region=region,
        max_pixels=max_pixels,
        png_level=png_level,
        overlays=not getattr(args, "no_overlays", False),
        geojson=not getattr(args, "no_geojson", False),
        started=started,
        names=unique_names([it.path for it in items]),
        rows=[None] * n,
        records=[None] * n,
    )


def _options(args: argparse.Namespace) -> tuple[str, int | None, int, Any, int | None]:
    """(backend, --max-pixels, --png-compression, --region, --level), each checked."""
    from .slide import parse_region

    backend = check_backend(getattr(args, "backend", "torch"))
    max_pixels = getattr(args, "max_pixels", None)
    if max_pixels is not None and max_pixels < 0:
        raise CalcinosisError(f"--max-pixels must be >= 0 (0 = no limit); got {max_pixels}")
    # zlib level of the overlay PNGs (see overlay.PNG_COMPRESSION).
    png_level = getattr(args, "png_compression", None)
    png_level = PNG_COMPRESSION if png_level is None else int(png_level)
    if not 0 <= png_level <= 9:
        raise CalcinosisError(f"--png-compression must be 0-9; got {png_level}")
    region_arg = getattr(args, "region", None)
    region = parse_region(region_arg) if region_arg else None
    level = getattr(args, "level", None)
    if level is not None and level < 0:
        raise CalcinosisError(f"--level must be >= 0 (0 = full resolution); got {level}")
    return backend, max_pixels, png_level, region, level


def _predict_all(run: _Run, workers: int, quiet: bool) -> None:
    """Every input through the predictor, its files written in the pool as it comes."""
    from tqdm import tqdm

    predictor = run.predictor
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        writes: list[Future] = []
        bar = tqdm(
            total=len(run.items), unit="image", desc="predict", file=sys.stderr, disable=quiet
        )
        # Decoding threads also run the tissue and focus checks (predictor.prepare),
        # so the main thread mostly waits on the network.
        chunks = decoded_chunks(
            run.items,
            pool,
            predictor.batch_size,
            run.max_pixels,
            indices=run.plain,
            prepare=predictor.prepare,
        )
        for chunk, images in chunks:
            results = _predict_chunk(predictor, [run.items[i] for i in chunk], images)
            for i, res in zip(chunk, results, strict=True):
                _record(run, pool, writes, i, res, _pixels(images.get(i)))
            bar.update(len(chunk))
            # Keep memory bounded: wait for writes of earlier chunks.
            while len(writes) > 2 * predictor.batch_size:
                writes.pop(0).result()
        side = SLIDE_OVERLAY_SIDE if run.overlays else None
        for i in run.slides:
            res, thumb = _predict_slide(predictor, run.items[i], run.level, run.region, side)
            _record(run, pool, writes, i, res, thumb, SLIDE_OVERLAY_SIDE)
            bar.update(1)
            # At most one slide's maps are still being written while the next is predicted.
            while len(writes) > 1:
                writes.pop(0).result()
        for f in writes:
            f.result()
        bar.close()


def _record(
    run: _Run,
    pool: ThreadPoolExecutor,
    writes: list[Future],
    i: int,
    res: PatchResult,
    image: Any,
    max_side: int | None = None,
) -> None:
    """Input ``i``'s row and record; its files are queued for the pool."""
    res.path = str(run.items[i].path)
    p = run.predictor
    files = planned_files(run.out, run.names[i], res, run.overlays, run.geojson)
    run.rows[i] = result_row(res, p.class_names, p.deposit_labels, files)
    rec = res.to_dict()
    rec["name"] = run.names[i]
    rec["source"] = run.items[i].source
    rec["outputs"] = files
    run.records[i] = rec
    if not files:
        res.release_maps()
        return
    job = (run.out, run.names[i], res, image, files, run.png_level, max_side)
    writes.append(pool.submit(write_outputs, *job, p.class_names, p.deposit_labels))


def _report(run: _Run, elapsed: float) -> int:
    """Print what was predicted and where it is; the exit status."""
    rows = run.rows
    out = run.out
    statuses = Counter(r["status"] for r in rows if r)
    calls = Counter(r["prediction"] for r in rows if r and r["prediction"])
    print(
        f"predicted {len(run.items)} input(s) in {elapsed:.1f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    if calls:
        print("calls: " + ", ".join(f"{k} {v}" for k, v in calls.most_common()))
    print(f"table:    {out / 'predictions.csv'}")
    print(f"details:  {out / 'predictions.json'}")
    if run.overlays:
        print(f"overlays: {out / 'overlays'}")
    if run.geojson:
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


def _focus_arg(value: float | None) -> float | None:
    from .predictor import FOCUS_MIN

    if value is None:
        return FOCUS_MIN
    return None if value <= 0 else float(value)


def _pixels(value: Any) -> np.ndarray | None:
    """The decoded image of a ``inputs.decoded_chunks`` value (an array or a prepared image)."""
    if isinstance(value, np.ndarray):
        return value
    rgb = getattr(value, "rgb", None)
    return rgb if isinstance(rgb, np.ndarray) else None


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
            # Prepared images carry their mpp; arrays take the item's.
            res = predictor.predict_batch(values, mpp=[items[keys.index(k)].mpp for k in good])
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
    """One whole-slide input and, with ``overlay_side``, the region shrunk to fit it.

    Failures become an error row, as for images.
    """
    from .slide import region_thumbnail

    if item.error is not None:
        return PatchResult(status="error", reason=item.error), None
    try:
        res = predictor.predict_slide(item.path, level=level, region=region, mpp=item.mpp)
        thumb = None
        if overlay_side and res.status != "error" and res.slide:
            thumb = region_thumbnail(item.path, res.slide, overlay_side)
        return res, thumb
    except (CalcinosisError, OSError, ValueError) as exc:
        return PatchResult(status="error", reason=error_reason(exc)), None
    except Exception as exc:  # noqa: BLE001 - one broken slide must not stop the run
        traceback.print_exc(file=sys.stderr)
        return PatchResult(status="error", reason=f"internal error: {error_reason(exc)}"), None
