"""``calcinosis predict-cohort``: a list of slides, one folder each, resumable, on Dask.

Outputs under ``--out``::

    slides/<name>/           what ``predict`` writes for that one slide (predictions.csv,
                             predictions.json, overlays/, geojson/, tiles/, lesions/,
                             maps/ for regions over 8192^2 px)
    slides/<name>/done.json  the done-marker: checkpoint sha256, options, status, seconds
    cohort.csv               one row per slide of the cohort, rebuilt from the folders
    cohort.json              the same, with the run's settings

Each slide is predicted into ``slides/.tmp-<name>-<random>/`` and renamed to
``slides/<name>/`` once its marker is written, so a folder without its marker
or with a stale one is never taken as done. A rerun skips the slides whose
marker records the same checkpoint digest and options and status ``ok``-like
(anything but ``error``) and redoes the rest; a changed checkpoint changes the
digest and so redoes everything.

Execution: one slide is one ``dask.distributed`` task (``run_slide``); by
default on a ``LocalCluster`` of ``--workers`` processes (default from the
cores and memory), or on the cluster at ``--scheduler``; ``--no-dask`` runs
the same tasks in this process. A worker process loads the model once
(``_PREDICTORS``, keyed by the checkpoint digest and the predictor options)
and keeps it for every slide it is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calcinosis.model.errors import CalcinosisError
from calcinosis.model.fileio import atomic_write_text, file_digest

__all__ = [
    "CohortSlide",
    "read_cohort",
    "rebuild_summary",
    "run_cohort",
    "run_slide",
    "slide_is_done",
]

#: The done-marker in each slide's folder.
MARKER = "done.json"
#: Prefix of the temporary folder a slide is written into before it is renamed.
TMP_PREFIX = ".tmp-"
#: Default retries of a slide whose worker died.
RETRIES = 2

#: Predictors loaded in this process, by (checkpoint digest, predictor options): a Dask
#: worker loads the model once and keeps it. ``LOADS`` counts the loads (tests read it).
_PREDICTORS: dict[tuple[str, str], Any] = {}
LOADS = 0


@dataclass
class CohortSlide:
    """One row of the cohort CSV."""

    path: Path
    name: str
    case_id: str = ""
    level: int | None = None
    region: tuple[int, int, int, int] | None = None
    mpp: float | None = None
    #: A problem found while reading the CSV row (the slide is reported, not run).
    error: str | None = None

    def options(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "region": list(self.region) if self.region else None,
            "mpp": self.mpp,
        }


# --------------------------------------------------------------------------- inputs


def read_cohort(
    csv_path: str | os.PathLike[str], default_mpp: float | None = None
) -> list[CohortSlide]:
    """The cohort CSV: ``path`` (required; relative to the CSV) and optional ``case_id``,
    ``level``, ``region`` (``X,Y,W,H`` level-0 pixels) and ``mpp``. A bad row becomes a
    slide with ``error`` set; a missing ``path`` column is a usage error."""
    from .predict import unique_names
    from .slide import parse_region

    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            cols = [c.strip() for c in reader.fieldnames or []]
    except OSError as exc:
        raise CalcinosisError(f"cannot read the cohort CSV {csv_path}: {exc}") from exc
    if "path" not in cols:
        raise CalcinosisError(f"{csv_path}: the cohort CSV needs a 'path' column (has {cols})")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    rows = [r for r in rows if any(r.values())]
    if not rows:
        raise CalcinosisError(f"{csv_path}: no slides listed")
    base = csv_path.resolve().parent
    # A slide's folder is named by its case_id (all of it: a dot is not a suffix), else
    # by its file's stem; safe and unique as predict names its outputs.
    names = unique_names(
        [
            f"{r['case_id']}.id" if r.get("case_id") else r["path"] or f"row{i}"
            for i, r in enumerate(rows)
        ]
    )
    out = []
    for i, (r, name) in enumerate(zip(rows, names, strict=True)):
        where = f"{csv_path.name} row {i + 2}"
        s = CohortSlide(path=base / r["path"], name=name, case_id=r.get("case_id", ""))
        try:
            if not r["path"]:
                raise ValueError("empty 'path'")
            if r.get("level"):
                if not r["level"].isdigit():
                    raise ValueError(f"level {r['level']!r} is not a whole number >= 0")
                s.level = int(r["level"])
                if s.level < 0:
                    raise ValueError(f"level {s.level} < 0")
            if r.get("region"):
                s.region = parse_region(r["region"])
            mpp = r.get("mpp")
            try:
                s.mpp = float(mpp) if mpp else default_mpp
            except ValueError:
                s.mpp = -1.0
            if s.mpp is not None and not s.mpp > 0:
                raise ValueError(f"mpp {mpp!r} is not a positive number")
        except (ValueError, CalcinosisError) as exc:
            s.error = f"{where}: {exc}"
        out.append(s)
    return out


# --------------------------------------------------------------------------- one slide


def slide_is_done(
    folder: Path, digest: str, options: dict[str, Any], path: str | None = None
) -> bool:
    """Whether ``folder`` holds a finished, non-error result for this model and options
    (and, with ``path``, for this slide file: names of duplicate stems follow CSV order)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        (path is None or marker.get("path") == path)
        and marker.get("checkpoint_sha256") == digest
        and marker.get("options") == options
        and marker.get("status") != "error"
    )


def _predictor(checkpoint: str, digest: str, settings: dict[str, Any]) -> Any:
    """This process's predictor for the checkpoint (loaded on first use, then kept)."""
    global LOADS
    from .predictor import Predictor

    settings = {k: v for k, v in settings.items() if k != "pin_gpus"} | {
        "device": worker_device(settings.get("device", "cpu"), settings.get("pin_gpus", 0))
    }
    key = (digest, json.dumps(settings, sort_keys=True))
    if key not in _PREDICTORS:
        _PREDICTORS.clear()  # a new checkpoint replaces the old one: one model per worker
        if settings.get("threads"):
            # The ONNX engine takes ``threads`` itself; torch and OpenCV are set per process.
            import cv2
            import torch

            torch.set_num_threads(int(settings["threads"]))
            cv2.setNumThreads(int(settings["threads"]))
        _PREDICTORS[key] = Predictor.from_checkpoint(checkpoint, **settings)
        LOADS += 1
    return _PREDICTORS[key]


def worker_device(device: str, pin_gpus: int) -> str:
    """The device of this process: ``cuda:<i>`` for worker ``i`` of a LocalCluster with one
    worker per GPU (``pin_gpus`` = their number), else ``device`` as given.

    Only predict-cohort's own LocalCluster pins (its workers are named 0..n-1): an
    attached cluster decides its workers' GPUs itself (dask-cuda gives each worker
    its own ``CUDA_VISIBLE_DEVICES``, so plain ``cuda`` is already that worker's GPU).
    """
    if pin_gpus <= 0 or not str(device).startswith("cuda") or ":" in str(device):
        return device
    try:
        from dask.distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a Dask worker (--no-dask)
        return device
    return f"cuda:{int(name) % pin_gpus}" if isinstance(name, int) else device


def cuda_devices(device: str) -> int:
    """How many GPUs predict-cohort spreads over: all visible ones for ``cuda``, else 0."""
    if str(device) != "cuda":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_slide(task: dict[str, Any]) -> dict[str, Any]:
    """One slide into ``slides/<name>/``: the Dask task (also run in-process by --no-dask).

    Writes into a temporary folder, adds the done-marker, then renames it into place.
    Returns the marker (plus ``pid`` and ``loads`` of the process that ran it).
    """
    from .inputs import InputItem
    from .predict import predict_into

    t0 = time.perf_counter()
    slides = Path(task["slides_dir"])
    final = slides / task["name"]
    tmp = slides / f"{TMP_PREFIX}{task['name']}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    opts = task["options"]
    status, reason, row = "error", "", None
    try:
        predictor = _predictor(task["checkpoint"], task["digest"], task["predictor"])
        if task.get("error"):
            raise CalcinosisError(task["error"])
        item = InputItem(Path(task["path"]), mpp=opts["mpp"], source=task["cohort_csv"])
        region = tuple(opts["region"]) if opts["region"] else None
        rows = predict_into(
            predictor,
            [item],
            tmp,
            checkpoint=task["checkpoint"],
            level=opts["level"],
            region=region,
            overlays=task["overlays"],
            geojson=task["geojson"],
            workers=task.get("threads", 1),
        )
        row = rows[0]
        status, reason = row["status"], row["reason"]
    except Exception as exc:  # noqa: BLE001 - a failing slide is recorded, the cohort goes on
        from .result import error_reason

        traceback.print_exc(file=sys.stderr)
        reason = error_reason(exc)
    seconds = round(time.perf_counter() - t0, 3)
    marker = _finish_folder(task, tmp, final, status, reason, seconds, host=os.uname().nodename)
    return {**marker, "pid": os.getpid(), "loads": LOADS}


def _finish_folder(
    task: dict[str, Any],
    tmp: Path,
    final: Path,
    status: str,
    reason: str,
    seconds: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """Write the done-marker into ``tmp``, rename it to ``final``; returns the marker."""
    marker = {
        "path": task["path"],
        "case_id": task["case_id"],
        "name": task["name"],
        "checkpoint": task["checkpoint"],
        "checkpoint_sha256": task["digest"],
        "options": task["options"],
        "status": status,
        "reason": reason,
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1), fsync=True)
    _replace_folder(tmp, final)
    return marker


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an older ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_failure(task: dict[str, Any], reason: str) -> dict[str, Any]:
    """A marker for a slide whose task itself failed (e.g. its workers kept dying)."""
    final = Path(task["slides_dir"]) / task["name"]
    tmp = final.with_name(f"{TMP_PREFIX}{task['name']}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return _finish_folder(task, tmp, final, "error", reason, None)


# --------------------------------------------------------------------------- summary


def _summary_row(folder: Path, slide: CohortSlide, labels: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": slide.name,
        "case_id": slide.case_id,
        "path": str(slide.path),
        "status": "missing",
        "reason": "",
        "prediction": "",
        "also_present": "",
        "n_lesions": "",
        "n_lesions_passed": "",
        "seconds": "",
    }
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return row
    row.update(status=marker.get("status", ""), reason=marker.get("reason", ""))
    row["seconds"] = "" if marker.get("seconds") is None else marker["seconds"]
    try:
        pred = json.loads((folder / "predictions.json").read_text(encoding="utf-8"))
        rec = pred["results"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return row
    row["prediction"] = rec.get("prediction") or ""
    row["also_present"] = ";".join((rec.get("region") or {}).get("also_present") or [])
    lesions = rec.get("lesions")
    if lesions is not None:
        row["n_lesions"] = len(lesions)
        row["n_lesions_passed"] = sum(1 for les in lesions if les.get("passed"))
    for lab in labels:
        n = None if lesions is None else sum(1 for les in lesions if les.get("label") == lab)
        row[f"n_lesions_{lab}"] = "" if n is None else n
        um2 = (rec.get("deposit_area_um2") or {}).get(lab)
        row[f"area_um2_{lab}"] = "" if um2 is None else round(float(um2), 2)
    return row


def rebuild_summary(out: Path, cohort: list[CohortSlide], settings: dict[str, Any]) -> list[dict]:
    """cohort.csv and cohort.json from the per-slide folders (never from memory)."""
    from calcinosis.model.labels import DEPOSIT_LABELS

    from .outputs import write_csv

    labels = list(settings.get("deposit_labels") or DEPOSIT_LABELS)[1:]
    rows = [_summary_row(out / "slides" / s.name, s, labels) for s in cohort]
    cols = [
        "name",
        "case_id",
        "path",
        "status",
        "reason",
        "prediction",
        "also_present",
        "n_lesions",
        "n_lesions_passed",
        *[f"n_lesions_{lab}" for lab in labels],
        *[f"area_um2_{lab}" for lab in labels],
        "seconds",
    ]
    write_csv(out / "cohort.csv", cols, rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **settings,
        "statuses": counts,
        "slides": rows,
    }
    atomic_write_text(out / "cohort.json", json.dumps(doc, indent=1, ensure_ascii=False))
    return rows


# --------------------------------------------------------------------------- the run


def default_workers() -> int:
    """Worker processes for a LocalCluster: one per core, at most one per 2 GiB of memory."""
    cores = os.cpu_count() or 1
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(mem // (2 << 30))))


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def step(self, marker: dict[str, Any]) -> None:
        self.done += 1
        if self.quiet:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt * 3600
        eta = (self.total - self.done) / (self.done / dt)
        print(
            f"[{self.done}/{self.total}] {marker['name']}: {marker['status']}"
            + (f" ({marker['reason']})" if marker.get("reason") else "")
            + f"  {rate:.1f} slides/h, ETA {eta / 60:.1f} min",
            flush=True,
        )


def run_cohort(args: argparse.Namespace) -> int:
    """The ``predict-cohort`` command. Exit status 0, or 3 when some slides failed."""
    from .engines import check_backend
    from .predict import EXIT_SOME_FAILED, _focus_arg

    out = Path(args.out)
    cohort = read_cohort(args.cohort, default_mpp=args.mpp)
    if args.level is not None:
        for s in cohort:
            s.level = s.level if s.level is not None else args.level
    checkpoint = str(Path(args.checkpoint).resolve())
    if not Path(checkpoint).is_file():
        raise CalcinosisError(f"checkpoint not found: {args.checkpoint}")
    digest = file_digest(checkpoint)
    predictor_opts = {
        "backend": check_backend(args.backend),
        "device": args.device,
        "batch_size": args.batch_size,
        "indeterminate_threshold": args.threshold,
        "tile_overlap": args.tile_overlap,
        "focus_threshold": _focus_arg(args.focus_threshold),
        "tta": args.tta,
        "lesion_threshold": args.lesion_threshold,
        "min_lesion_area_um2": args.min_lesion_area_um2,
    }
    run_opts = {"overlays": not args.no_overlays, "geojson": not args.no_geojson}
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    tasks, skipped = [], 0
    for s in cohort:
        options = {**s.options(), **predictor_opts, **run_opts}
        if slide_is_done(slides_dir / s.name, digest, options, str(s.path)):
            skipped += 1
            continue
        tasks.append(
            {
                "path": str(s.path),
                "name": s.name,
                "case_id": s.case_id,
                "error": s.error,
                "cohort_csv": str(args.cohort),
                "slides_dir": str(slides_dir),
                "checkpoint": checkpoint,
                "digest": digest,
                "options": options,
                "predictor": predictor_opts,
                **run_opts,
            }
        )
    print(f"{len(cohort)} slide(s): {skipped} already done, {len(tasks)} to predict")
    t0 = time.perf_counter()
    progress = _Progress(len(tasks), args.quiet)
    loads = 0
    if tasks and args.no_dask:
        for task in tasks:
            progress.step(run_slide(task))
        loads = LOADS
    elif tasks:
        loads = _run_on_dask(tasks, args, progress)
    _remove_stale_tmp(slides_dir)
    settings = {
        "checkpoint": checkpoint,
        "checkpoint_sha256": digest,
        "cohort_csv": str(args.cohort),
        "options": {**predictor_opts, **run_opts},
        "engine": "in-process" if args.no_dask else (args.scheduler or "LocalCluster"),
        "seconds": round(time.perf_counter() - t0, 2),
        "predicted": len(tasks),
        "skipped": skipped,
        "model_loads": loads,
    }
    from calcinosis.model.labels import DEPOSIT_LABELS

    settings["deposit_labels"] = list(DEPOSIT_LABELS)
    rows = rebuild_summary(out, cohort, settings)
    failed = [r for r in rows if r["status"] in ("error", "missing")]
    print(
        f"cohort: {len(rows)} slide(s) in {settings['seconds']:.1f} s; "
        f"{len(rows) - len(failed)} done, {len(failed)} failed"
    )
    print(f"summary:  {out / 'cohort.csv'}")
    return EXIT_SOME_FAILED if failed else 0


def _remove_stale_tmp(slides_dir: Path) -> None:
    """Temporary folders of killed runs (never taken as done) are removed at the end."""
    for p in slides_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _worker_environ(threads: int) -> dict[str, Any]:
    """The environment a LocalCluster's nanny gives its workers: Dask's own, with the BLAS
    and OpenMP threads at ``threads`` and without ``MALLOC_TRIM_THRESHOLD_``.

    Dask sets that to 64 KiB to return memory sooner; but setting it turns off glibc's
    dynamic mmap threshold, so every array over 128 KiB (each batch, each activation) is
    mmap'ed and unmapped anew: measured here, 5.6x the page faults, 4.6x the system time
    and 36% more CPU per slide than in a plain process.
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env.update({k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def _run_on_dask(tasks: list[dict[str, Any]], args: argparse.Namespace, progress: _Progress) -> int:
    """Every task on a Dask cluster (attached or local); returns the model loads reported."""
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        gpus = cuda_devices(args.device)
        n = min(args.workers or gpus or default_workers(), len(tasks))
        threads = max(1, (os.cpu_count() or 1) // n)
        for t in tasks:
            t["predictor"] = {**t["predictor"], "threads": threads, "pin_gpus": gpus}
            t["threads"] = threads
        # A task whose worker dies is resubmitted up to ``allowed-failures`` times (``retries=``
        # only covers exceptions, which run_slide records itself); this is the scheduler's
        # setting, so on an attached cluster it is that scheduler's configuration.
        with dask.config.set(
            {
                "distributed.scheduler.allowed-failures": args.retries,
                "distributed.nanny.pre-spawn-environ": _worker_environ(threads),
            }
        ):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=None,
            )
        client = Client(cluster)
        if not args.quiet:
            print(
                f"LocalCluster: {n} worker process(es), {threads} thread(s) each"
                + (f", worker i on cuda:(i mod {gpus})" if gpus else "")
            )
    loads: dict[int, int] = {}
    try:
        futures = {
            client.submit(
                run_slide, t, key=f"slide-{t['name']}-{uuid.uuid4().hex[:8]}", retries=args.retries
            ): t
            for t in tasks
        }
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                marker = fut.result()
                loads[marker["pid"]] = marker["loads"]
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after the retries
                marker = write_failure(task, f"task failed: {type(exc).__name__}: {exc}")
            progress.step(marker)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return sum(loads.values())
