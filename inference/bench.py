"""``calcinosis bench``: how fast is each backend on this machine, and does it agree?

For every backend the measurement runs in a fresh Python process, so that its
peak resident memory (``VmHWM``) is its own and no backend warms caches for
the next. Each worker reports:

* throughput: patches per second at ``--batch-size`` (median of ``--iters``
  timed forward passes after warm-up; the model only, input already normalised);
* latency: median and 95th percentile of single-patch forward passes;
* peak RSS of the process;
* agreement with the baseline (PyTorch fp32 eager, NCHW): share of the
  patches given with ``--images`` (a folder, a manifest or a ``.npy`` array;
  ``benchmarks/bench_infer.py`` makes synthetic ones) with the same predicted
  class, and share of deposit pixels with the same label.

Then the end-to-end rate of ``calcinosis predict`` on a folder of PNGs
(decode, tissue and focus checks, model, overlays, GeoJSON, tables) with the
fastest backend is compared with that backend's pure model rate.

Everything runs one pass per patch (``--tta none``), whatever the
checkpoint's default: test-time augmentation ``d4`` multiplies the model's
share of the time by eight. Patches go through the checkpoint's own
preprocessing (``model/preprocess.py``) before the timed model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError
from calcinosis.model.hardware import cpu_seconds
from calcinosis.model.preprocess import Preprocessing
from calcinosis.model.probability import softmax

BASELINE = "torch-eager"
DEFAULT_BACKENDS = ("torch-eager", "torch", "torch-bf16", "onnx", "onnx-int8")
WORKER_TIMEOUT_S = 1800


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: measure, print one table, optionally write JSON."""
    from calcinosis.model import read_checkpoint_metadata

    from .engines import BACKENDS
    from .inputs import load_images

    ckpt = Path(args.checkpoint)
    meta = read_checkpoint_metadata(ckpt)
    spec = Preprocessing.from_metadata(meta)
    model_size = spec.input_size
    size = int(getattr(args, "size", None) or model_size)
    source = _images_source(getattr(args, "images", None))
    backends = [
        b.strip()
        for b in str(getattr(args, "backends", ",".join(DEFAULT_BACKENDS))).split(",")
        if b.strip()
    ]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise CalcinosisError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if BASELINE not in backends:
        backends.insert(0, BASELINE)
    batch = max(1, int(getattr(args, "batch_size", 32)))
    iters = max(1, int(getattr(args, "iters", 10)))
    n_images = max(1, int(getattr(args, "n_images", 64)))
    raw = load_images([source], limit=n_images)
    calibration_source = getattr(args, "int8_calibration", None)

    print(
        f"calcinosis bench: {ckpt} ({meta.get('model', {}).get('backbone', '?')}, {size} px), "
        f"{os.cpu_count()} CPU cores, torch threads default"
    )
    with tempfile.TemporaryDirectory(prefix="calcinosis-bench-") as td:
        tmp = Path(td)
        # The network inputs, preprocessed once here: the workers time the model only.
        bench_spec = dataclasses.replace(spec, input_size=size)
        data = tmp / "inputs.npy"
        np.save(data, np.stack([bench_spec.apply(im)[0] for im in raw]))

        # Exports happen here, once, so no worker times them.
        export_s: dict[str, float] = {}
        onnx_files: dict[str, Path] = {}
        for b in backends:
            if b.startswith("onnx"):
                if size != model_size:
                    print(
                        f"  {b}: skipped (ONNX files have the model's fixed size {model_size} px)"
                    )
                    continue
                from .export import INT8_CALIBRATION_IMAGES, cached_onnx

                calibration = None
                if b == "onnx-int8":
                    calibration = (
                        load_images([calibration_source], limit=INT8_CALIBRATION_IMAGES)
                        if calibration_source
                        else raw
                    )
                t0 = time.perf_counter()
                onnx_files[b] = cached_onnx(
                    ckpt,
                    tmp / f"model{'.int8' if b == 'onnx-int8' else ''}.onnx",
                    quantize=b == "onnx-int8",
                    calibration=calibration,
                )
                export_s[b] = time.perf_counter() - t0
        results: dict[str, dict[str, Any]] = {}
        outputs: dict[str, Path] = {}
        for b in backends:
            if b.startswith("onnx") and b not in onnx_files:
                continue
            out = tmp / f"{b}.npz"
            job = {
                "mode": "model",
                "checkpoint": str(onnx_files.get(b, ckpt)),
                "backend": b,
                "batch_size": batch,
                "iters": iters,
                "data": str(data),
                "out": str(out),
            }
            print(f"  measuring {b} ...", flush=True)
            res = _run_worker(job)
            if "error" in res:
                print(f"  {b}: failed: {res['error']}")
                continue
            results[b] = res
            outputs[b] = out

        base = np.load(outputs[BASELINE]) if BASELINE in outputs else None
        for b, res in results.items():
            if base is not None:
                o = np.load(outputs[b])
                res["agree_class"] = float((o["cls"].argmax(1) == base["cls"].argmax(1)).mean())
                res["agree_pixels"] = float((o["dep"] == base["dep"]).mean())
                res["max_abs_logit_diff"] = float(np.abs(o["cls"] - base["cls"]).max())
                res["max_prob_diff"] = float(
                    np.abs(softmax(o["cls"], axis=1) - softmax(base["cls"], axis=1)).max()
                )
                p = np.sort(softmax(base["cls"], axis=1), axis=1)
                confident = (p[:, -1] - p[:, -2]) >= 0.2
                if confident.any():
                    same = o["cls"].argmax(1) == base["cls"].argmax(1)
                    res["agree_class_confident"] = float(same[confident].mean())
                    res["confident_images"] = int(confident.sum())
            if b in export_s:
                res["export_s"] = export_s[b]

        e2e: dict[str, Any] | None = None
        if not getattr(args, "no_e2e", False) and results:
            # The fastest backend whose answers match fp32 (int8 may not).
            usable = [k for k, r in results.items() if r.get("agree_class", 1.0) >= 0.99]
            fastest = max(usable or results, key=lambda k: results[k]["throughput"])
            e2e = _end_to_end(
                ckpt if fastest not in onnx_files else onnx_files[fastest],
                fastest,
                raw,
                tmp,
                batch,
            )
            e2e["model_rate"] = results[fastest]["throughput"]
            e2e["model_cpu_ms_per_patch"] = results[fastest].get("cpu_ms_per_patch")
            if "rate" in e2e:
                e2e["percent_of_model"] = 100.0 * e2e["rate"] / e2e["model_rate"]
            if "rate_tables_only" in e2e:
                e2e["percent_of_model_tables_only"] = (
                    100.0 * e2e["rate_tables_only"] / e2e["model_rate"]
                )

    _print_table(results, e2e, batch, len(raw), source)
    if getattr(args, "json", None):
        Path(args.json).write_text(
            json.dumps(
                {
                    "checkpoint": str(ckpt),
                    "size": size,
                    "batch_size": batch,
                    "backends": results,
                    "end_to_end": e2e,
                },
                indent=1,
            ),
            encoding="utf-8",
        )
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- workers


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "calcinosis.inference.bench", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _worker_model(job: dict[str, Any]) -> dict[str, Any]:
    from .predictor import Predictor

    inputs = np.load(job["data"])  # preprocessed float32 NHWC
    bs = int(job["batch_size"])
    iters = int(job["iters"])
    pred = Predictor.from_checkpoint(job["checkpoint"], backend=job["backend"], batch_size=bs)
    engine = pred.engine
    reps = -(-bs // len(inputs))
    xb = np.ascontiguousarray(np.concatenate([inputs] * reps)[:bs])
    t0 = time.perf_counter()
    engine(xb)  # first call: graph building, allocator warm-up (and compilation)
    first_s = time.perf_counter() - t0
    engine(xb)
    times = []
    cpu0 = cpu_seconds()
    for _ in range(iters):
        t0 = time.perf_counter()
        engine(xb)
        times.append(time.perf_counter() - t0)
    cpu_per_patch = (cpu_seconds() - cpu0) / (iters * bs)
    x1 = xb[:1]
    for _ in range(3):
        engine(x1)
    lat = []
    for _ in range(max(20, 3 * iters)):
        t0 = time.perf_counter()
        engine(x1)
        lat.append(time.perf_counter() - t0)
    cls_all, dep_all = [], []
    for i in range(0, len(inputs), bs):
        c, _, d = engine(inputs[i : i + bs])
        cls_all.append(c)
        dep_all.append(d.argmax(1).astype(np.uint8))
    np.savez(job["out"], cls=np.concatenate(cls_all), dep=np.concatenate(dep_all))
    return {
        "backend": job["backend"],
        "throughput": bs / float(np.median(times)),
        "latency_ms_median": 1000 * float(np.median(lat)),
        "latency_ms_p95": 1000 * float(np.percentile(lat, 95)),
        "first_call_s": first_s,
        "cpu_ms_per_patch": 1000 * cpu_per_patch,
        "peak_rss_mb": _vm_hwm_mb(),
    }


def _worker_e2e(job: dict[str, Any]) -> dict[str, Any]:
    from .predict import run_predict

    ns = argparse.Namespace(
        inputs=[job["folder"]],
        checkpoint=job["checkpoint"],
        out=job["out"],
        backend=job["backend"],
        batch_size=int(job["batch_size"]),
        mpp=None,
        threshold=None,
        tile_overlap=None,
        focus_threshold=None,
        no_overlays=not job.get("overlays", True),
        no_geojson=not job.get("overlays", True),
        workers=None,
        device="cpu",
        quiet=True,
        tta="none",  # the model rate above is one pass per patch
    )
    rc = run_predict(ns)
    summary = json.loads((Path(job["out"]) / "predictions.json").read_text(encoding="utf-8"))
    n = len(summary["results"])
    secs = float(summary["seconds_after_load"])
    cpu = float(summary.get("cpu_seconds_after_load") or 0.0)
    return {
        "rc": rc,
        "images": n,
        "seconds": secs,
        "rate": n / max(secs, 1e-9),
        "cpu_ms_per_image": 1000 * cpu / max(n, 1),
        "cores_busy": cpu / max(secs, 1e-9),
        "peak_rss_mb": _vm_hwm_mb(),
    }


def _end_to_end(
    ckpt: Path, backend: str, images: list[np.ndarray], tmp: Path, batch: int
) -> dict[str, Any]:
    """``calcinosis predict`` on a folder of PNGs, with and without overlays/GeoJSON."""
    from calcinosis.model.imageio import write_png

    folder = tmp / "pngs"
    folder.mkdir()
    n = max(len(images), 4 * batch)  # enough images to amortise the pipeline start
    for i in range(n):
        write_png(folder / f"patch_{i:04d}.png", images[i % len(images)])
    print(f"  end-to-end predict on {n} PNGs with {backend} ...", flush=True)
    job = {
        "mode": "e2e",
        "folder": str(folder),
        "checkpoint": str(ckpt),
        "backend": backend,
        "batch_size": batch,
    }
    res = _run_worker({**job, "out": str(tmp / "e2e")})
    lean = _run_worker({**job, "out": str(tmp / "e2e_lean"), "overlays": False})
    if "rate" in lean:
        res["rate_tables_only"] = lean["rate"]
        res["cpu_ms_per_image_tables_only"] = lean.get("cpu_ms_per_image")
    res["backend"] = backend
    return res


def _vm_hwm_mb() -> float | None:
    """Peak resident set size of this process (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # noqa: BLE001
        return None


def _images_source(value: Any) -> str:
    """``--images``: a folder, manifest or ``.npy`` of patches; a bare count is the old form."""
    if value is None:
        raise CalcinosisError(
            "bench needs patches to measure on: --images DIR (a folder or manifest of patches, "
            "or a .npy array; python benchmarks/bench_infer.py makes synthetic ones)"
        )
    text = str(value)
    if text.isdigit() and not Path(text).exists():
        raise CalcinosisError(
            f"--images {text}: --images names the patches to measure on (a folder, manifest or "
            f".npy array); the number of them is --n-images {text}"
        )
    return text


# --------------------------------------------------------------------------- report


def _print_table(
    results: dict[str, dict[str, Any]],
    e2e: dict[str, Any] | None,
    batch: int,
    n: int,
    source: str,
) -> None:
    base = results.get(BASELINE, {}).get("throughput")
    cols = [
        ("backend", 13, "<"),
        (f"patches/s@{batch}", 14, ">"),
        ("vs eager", 9, ">"),
        ("b1 ms p50", 10, ">"),
        ("b1 ms p95", 10, ">"),
        ("peak RSS MB", 12, ">"),
        ("class agree", 12, ">"),
        ("(confident)", 12, ">"),
        ("max |dp|", 9, ">"),
        ("pixel agree", 12, ">"),
    ]
    line = "".join(f"{name:{al}{w}}" for name, w, al in cols)
    print()
    print(line)
    print("-" * len(line))
    for b, r in results.items():
        cells = [
            b,
            f"{r['throughput']:.1f}",
            f"{r['throughput'] / base:.1f}x" if base else "-",
            f"{r['latency_ms_median']:.1f}",
            f"{r['latency_ms_p95']:.1f}",
            f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
            f"{100 * r['agree_class']:.1f}%" if "agree_class" in r else "-",
            f"{100 * r['agree_class_confident']:.1f}%" if "agree_class_confident" in r else "-",
            f"{r['max_prob_diff']:.3f}" if "max_prob_diff" in r else "-",
            f"{100 * r['agree_pixels']:.2f}%" if "agree_pixels" in r else "-",
        ]
        print("".join(f"{c:{al}{w}}" for c, (_, w, al) in zip(cells, cols, strict=True)))
    conf = next(
        (r.get("confident_images") for r in results.values() if "confident_images" in r), None
    )
    print(
        f"agreement with {BASELINE} on {n} patches of {source}: same class; (confident) = only "
        f"patches whose fp32 top-2 probability margin is >= 0.2"
        + (f" ({conf} of {n})" if conf else "")
        + "; max |dp| = largest change of a class probability; same deposit label per pixel"
    )
    if e2e and "rate" in e2e:
        print(
            f"end-to-end predict ({e2e['backend']}, decode + checks + model + overlays + GeoJSON): "
            f"{e2e['rate']:.1f} images/s = {e2e['percent_of_model']:.0f}% of its pure model rate "
            f"({e2e['model_rate']:.1f}/s); peak RSS {e2e.get('peak_rss_mb') or 0:.0f} MB"
        )
        if "rate_tables_only" in e2e:
            print(
                f"  without overlays and GeoJSON (--no-overlays --no-geojson): "
                f"{e2e['rate_tables_only']:.1f} images/s = "
                f"{e2e['percent_of_model_tables_only']:.0f}% of the model rate"
            )
        model_cpu = e2e.get("model_cpu_ms_per_patch")
        if e2e.get("cpu_ms_per_image") and model_cpu:
            lean_cpu = e2e.get("cpu_ms_per_image_tables_only")
            print(
                f"  CPU time per image (all threads): {e2e['cpu_ms_per_image']:.1f} ms end to end"
                + (f", {lean_cpu:.1f} ms without overlays" if lean_cpu else "")
                + f", {model_cpu:.1f} ms for the model alone; the run kept "
                f"{e2e['cores_busy']:.1f} of {os.cpu_count()} cores busy (when that is all of "
                f"them, the rate is bounded by about model CPU / end-to-end CPU = "
                f"{100 * model_cpu / e2e['cpu_ms_per_image']:.0f}% of the model rate)"
            )
    elif e2e:
        print(f"end-to-end predict failed: {e2e.get('error')}")


def _worker_main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    try:
        res = _worker_model(job) if job["mode"] == "model" else _worker_e2e(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this backend's failure
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: calcinosis bench --checkpoint CKPT (this module's --worker mode is internal)")
    sys.exit(2)
