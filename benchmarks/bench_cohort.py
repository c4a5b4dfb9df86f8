"""Cohort benchmark: ``calcinosis predict-cohort`` in one process versus on Dask.

    python benchmarks/bench_cohort.py                       # 8 slides of 8192 x 8192 px at 2 um/px
    python benchmarks/bench_cohort.py --slides 3 --side 2048 --json bench_cohort.json
    python benchmarks/bench_cohort.py --checkpoint runs/demo/train/best.safetensors

Makes a cohort of synthetic pyramidal TIFFs (each a ``render_region`` of at
most 2048 px, its own seed, tiled out to ``--side`` and written with its
pyramid; kept in ``--workdir`` and reused), then runs the same cohort with
``--no-dask`` and on a ``LocalCluster`` (the default worker count, then
``--workers 1`` and ``2`` where they differ from it), each in a fresh process
and a fresh ``--out``. Without ``--checkpoint`` the model is a random-weight
resnet10t at 64 px and 2 um/px written the way the tests write theirs: its
network is cheap, so the figures measure the engine (reading, tiling, the
cohort layer) more than the network.

Per run it prints seconds (wall, process start included; and the cohort's own,
from ``cohort.json``), slides per hour, tiles per second, peak RSS of the
parent process and of each Dask worker process (psutil, sampled in a thread),
and the ratio of each Dask run's tiles per second to the one-process run's
(the issue's goal: >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
from bench_region_memory import make_checkpoint  # the benchmarks' tiny model, one writer

#: The largest synthetic region rendered per slide; bigger slides repeat it.
BASE = 2048
CLI = "import sys; from calcinosis.model.cli import main; sys.exit(main(sys.argv[1:]))"


# --------------------------------------------------------------------------- inputs


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """A tiled (256 px) pyramidal TIFF, levels halved down to 512 px or less, zlib level 1."""
    import tifffile

    levels = [rgb]
    while max(levels[-1].shape[:2]) > 512:
        lv = levels[-1]
        levels.append(cv2.resize(lv, (lv.shape[1] // 2, lv.shape[0] // 2), cv2.INTER_AREA))
    opts = {
        "photometric": "rgb",
        "compression": "zlib",
        "compressionargs": {"level": 1},
        "tile": (256, 256),
        "metadata": None,
    }
    res = 1e4 / mpp  # pixels per centimetre
    tmp = path.with_suffix(".part")
    with tifffile.TiffWriter(tmp) as tw:
        tw.write(
            rgb, subifds=len(levels) - 1, resolution=(res, res), resolutionunit="CENTIMETER", **opts
        )
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    os.replace(tmp, path)


def make_cohort(folder: Path, n: int, side: int, mpp: float) -> Path:
    """``n`` synthetic slides (reused when already there) and their cohort CSV."""
    from calcinosis.training.synthetic.region import render_region

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,case_id"]
    for i in range(n):
        path = folder / f"synth-{side}-{mpp:g}-{i}.tif"
        if not path.is_file():
            t0 = time.perf_counter()
            base, _ = render_region(min(side, BASE), min(side, BASE), seed=i, mpp=mpp, workers=1)
            reps = -(-side // base.shape[0])
            write_pyramid(path, np.tile(base, (reps, reps, 1))[:side, :side], mpp)
            print(f"made {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
        lines.append(f"{path.name},slide-{i}")
    csv = folder / f"cohort-{n}-{side}-{mpp:g}.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


# --------------------------------------------------------------------------- one run


class PeakRSS:
    """Peak RSS and CPU seconds of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.root, self.every = pid, every
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    with p.oneshot():
                        rss, cpu = p.memory_info().rss, sum(p.cpu_times()[:2])
                        if p.pid not in self.role:
                            self.role[p.pid] = _role(p, self.root)
                except psutil.Error:
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
                self.cpu[p.pid] = cpu
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mb = {pid: round(v / 2**20) for pid, v in self.peak.items()}
        workers = sorted(pid for pid, r in self.role.items() if r == "worker")
        return {
            "parent_peak_rss_mb": mb.get(self.root, 0),
            "worker_peak_rss_mb": [mb[p] for p in workers],
            "cpu_seconds": round(sum(self.cpu.values()), 1),
        }


def _role(p: psutil.Process, root: int) -> str:
    if p.pid == root:
        return "parent"
    cmd = " ".join(p.cmdline())
    return "worker" if "spawn_main" in cmd and "resource_tracker" not in cmd else "other"


def run_once(label: str, csv: Path, ckpt: Path, out: Path, extra: list[str]) -> dict:
    """One ``predict-cohort`` run in a fresh process; its timings, tiles and memory."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", CLI, "predict-cohort", str(csv), "--checkpoint", str(ckpt)]
    cmd += ["--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRSS(proc.pid)
    log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    mem = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit status {proc.returncode}\n{log}")
    doc = json.loads((out / "cohort.json").read_text())
    tiles = tissue = 0
    mpp = set()
    for f in (out / "slides").glob("*/predictions.json"):
        rec = json.loads(f.read_text())["results"][0]
        region, mpp = rec.get("region") or {}, mpp | {rec.get("mpp")}
        tiles += region.get("tiles", 0)
        tissue += region.get("tissue_tiles", 0)
    n, secs = len(doc["slides"]), doc["seconds"]
    per_slide = [float(s["seconds"]) for s in doc["slides"] if s["seconds"] != ""]
    return {
        "run": label,
        "args": extra,
        "slides": n,
        "wall_seconds": round(wall, 2),
        "cohort_seconds": secs,
        "slide_seconds_sum": round(sum(per_slide), 2),
        "slides_per_hour": round(n / secs * 3600, 1),
        "tiles": tiles,
        "tissue_tiles": tissue,
        "slide_mpp": sorted(mpp),
        "tiles_per_second": round(tiles / secs, 1),
        "model_loads": doc.get("model_loads"),
        "log_tail": log.strip().splitlines()[-3:],
        **mem,
    }


# --------------------------------------------------------------------------- the benchmark


def runs_to_make(no_dask: bool, worker_counts: list[int]) -> list[tuple[str, list[str]]]:
    from calcinosis.inference.cohort import default_workers

    runs = [("one process (--no-dask)", ["--no-dask"])] if no_dask else []
    default = default_workers()
    runs.append((f"Dask LocalCluster, default ({default} workers)", []))
    for n in worker_counts:
        if n != default:
            runs.append((f"Dask LocalCluster, --workers {n}", ["--workers", str(n)]))
    return runs


def print_table(results: list[dict]) -> None:
    head = [
        "run",
        "wall s",
        "cohort s",
        "slides/h",
        "tiles/s",
        "vs 1-proc",
        "parent MB",
        "worker MB",
    ]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        ratio = r.get("ratio_to_one_process")
        cells = [
            r["run"],
            f"{r['wall_seconds']:.1f}",
            f"{r['cohort_seconds']:.1f}",
            f"{r['slides_per_hour']:.0f}",
            f"{r['tiles_per_second']:.0f}",
            "" if ratio is None else f"{ratio:.2f}",
            str(r["parent_peak_rss_mb"]),
            ", ".join(map(str, r["worker_peak_rss_mb"])) or "-",
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=8, help="slides in the cohort (default 8)")
    p.add_argument("--side", type=int, default=8192, help="slide side in pixels (default 8192)")
    p.add_argument("--mpp", type=float, default=2.0, help="level-0 um/px (default 2.0)")
    p.add_argument("--checkpoint", help="model (default: a tiny random resnet10t, see above)")
    p.add_argument("--workers", default="1,2", help="LocalCluster sizes besides the default")
    p.add_argument("--no-one-process", action="store_true", help="skip the --no-dask run")
    p.add_argument("--workdir", help="where slides and outputs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("extra", nargs="*", help="after --: more predict-cohort options")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    csv = make_cohort(work / "slides", args.slides, args.side, args.mpp)
    if args.checkpoint:
        ckpt, model = Path(args.checkpoint).resolve(), args.checkpoint
    else:
        ckpt = make_checkpoint(work / f"tiny-{args.mpp:g}.safetensors", 64, args.mpp)
        model = f"tiny random resnet10t, 64 px, {args.mpp:g} um/px (the tests' model)"
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    results = []
    for label, extra in runs_to_make(not args.no_one_process, counts):
        print(f"{label} ...", flush=True)
        results.append(run_once(label, csv, ckpt, work / "out", [*extra, *args.extra]))
        print(f"  {json.dumps({k: v for k, v in results[-1].items() if k != 'log_tail'})}")
    base = next((r for r in results if "--no-dask" in r["args"]), None)
    for r in results:
        if base is not None and r is not base:
            r["ratio_to_one_process"] = round(r["tiles_per_second"] / base["tiles_per_second"], 3)
    print(
        f"\nmodel: {model}; {args.slides} slides of {args.side} x {args.side} px at "
        f"{args.mpp:g} um/px; {os.cpu_count()} cores; load average at start "
        f"{load:.1f}"
    )
    print_table(results)
    if args.json:
        doc = {
            "model": model,
            "slides": args.slides,
            "side": args.side,
            "mpp": args.mpp,
            "cores": os.cpu_count(),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
