"""The inference side of the ``calcinosis`` command line: ``predict``, ``predict-cohort``,
``export``, ``bench``, ``robustness``, ``serve``.

Parsers only (cheap to import, so ``calcinosis --help`` answers at once); each
command's work is imported when it runs. Registered under the
``calcinosis.commands`` entry points (pyproject.toml) and dispatched by
:mod:`calcinosis.model.cli`. ``main`` is that dispatcher, kept here so that
``python -m calcinosis.inference.cli COMMAND`` (and ``torchrun -m ...``) keep
working.
"""

from __future__ import annotations

import argparse
import sys

from calcinosis.model.cli import Command, add_tta_argument, main

from .serve import command as _serve

#: engines.BACKENDS, spelled out so the parsers need not import the engines
#: (torch and onnxruntime, ~0.25 s); tests/test_cli.py keeps the two equal.
BACKEND_CHOICES = ("torch", "torch-eager", "torch-bf16", "torch-compile", "onnx", "onnx-int8")

__all__ = ["bench", "export", "main", "predict", "predict_cohort", "robustness", "serve"]


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, whole-slide files, folders (searched recursively) or CSV manifests "
        "with a 'path' column",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint (.safetensors) or exported .onnx"
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--split",
        default=None,
        help="with CSV manifest inputs, only rows whose 'split' column is this (e.g. test)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="microns per pixel of the inputs (default: the model's own; a manifest 'mpp' "
        "column wins); images are resampled to the model's mpp and results mapped back. "
        "For whole-slide files: of level 0, overriding the mpp recorded in the slide",
    )
    p.add_argument(
        "--level",
        type=int,
        default=None,
        help="whole-slide files: pyramid level to read (0 = full resolution; default: the "
        "coarsest level at least as fine as the model's mpp)",
    )
    p.add_argument(
        "--region",
        default=None,
        metavar="X,Y,W,H",
        help="whole-slide files: predict only this rectangle, in level-0 pixels from the "
        "top-left corner (the coordinates QuPath shows; the GeoJSON comes back in the same "
        "frame); default: the whole slide. With --level or --region, .tif files are always "
        "read as slides",
    )
    _model_arguments(p, device_help="cpu (default) or cuda / cuda:N for the torch backends")
    p.add_argument(
        "--png-compression",
        type=int,
        default=None,
        metavar="0-9",
        help="zlib level of the overlay PNGs (default 1: fast, ~3x larger than 9; "
        "9 = smallest files, several times slower to write)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads for decoding and writing (default: all cores)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image (width x height) decoded; bigger ones get status=error "
        "(default 100000000, or $CALCINOSIS_MAX_PIXELS; 0 = no limit). Images above "
        "1.5 model inputs are tiled, but each is decoded whole in memory (3 bytes a pixel); "
        "whole-slide files are not (a larger .tif is read as a slide when tiffslide is installed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _model_arguments(p: argparse.ArgumentParser, device_help: str) -> None:
    """The network, thresholds, tiling and outputs: the options predict and predict-cohort share."""
    p.add_argument(
        "--backend",
        default="torch",
        choices=BACKEND_CHOICES,
        help="torch = PyTorch fp32 channels-last (default); onnx = ONNX Runtime, exported once "
        "next to the checkpoint and usually fastest on CPUs; torch-bf16 only pays off on "
        "CPUs with AMX/AVX512-BF16 or on GPUs",
    )
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="call a patch 'indeterminate' below this calibrated top probability "
        "(default: the checkpoint's)",
    )
    p.add_argument(
        "--lesion-threshold",
        type=float,
        default=None,
        help="a deposit found in a tiled region counts towards the region's call when its "
        "calibrated confidence (1 - p(normal) of its tiles) reaches this (default: the "
        "checkpoint's, else 0.5)",
    )
    p.add_argument(
        "--min-lesion-area",
        dest="min_lesion_area_um2",
        type=float,
        default=None,
        metavar="UM2",
        help="ignore deposits smaller than this many square microns (default: the "
        "checkpoint's, else 100)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="patches per forward pass (default 32)"
    )
    add_tta_argument(p)
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="overlap of region tiles in model pixels (default: a quarter of the input size)",
    )
    p.add_argument(
        "--focus-threshold",
        type=float,
        default=None,
        help="relative sharpness below which a patch is 'out_of_focus' (default 0.15; 0 disables)",
    )
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--no-geojson", action="store_true", help="do not write QuPath GeoJSON files")


def _cohort_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "cohort",
        metavar="COHORT.csv",
        help="CSV with a 'path' column (relative to the CSV) and optional case_id, level, "
        "region (X,Y,W,H level-0 pixels) and mpp columns",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint (.safetensors) or exported .onnx"
    )
    p.add_argument("--out", required=True, help="output folder: slides/<name>/, cohort.csv/json")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="LocalCluster worker processes (default: one per GPU with --device cuda, else "
        "the cores, at most one per 2 GiB)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="attach to a running Dask scheduler (e.g. tcp://host:8786) instead",
    )
    p.add_argument(
        "--no-dask", action="store_true", help="predict the slides one by one in this process"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a slide is retried when its worker dies (default 2)",
    )
    p.add_argument("--mpp", type=float, default=None, help="level-0 mpp where the CSV has none")
    p.add_argument("--level", type=int, default=None, help="pyramid level where the CSV has none")
    _model_arguments(
        p,
        device_help="cpu (default), cuda (a LocalCluster then runs one worker per GPU, each on "
        "its own) or cuda:N (every worker on GPU N)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--onnx", default=None, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write <name>.int8.onnx, statically quantised on the --int8-calibration images",
    )
    p.add_argument(
        "--int8-calibration",
        default=None,
        metavar="DIR",
        help="with --int8: patches to measure activation ranges on (a folder, a CSV manifest "
        "with a 'path' column or a .npy array; at most 64 are used), e.g. the model's "
        "training images",
    )
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch/ONNX parity check")
    # WSInfer (inference/wsinfer.py): for `wsinfer run` and QuPath's WSInfer extension.
    p.add_argument(
        "--wsinfer",
        metavar="DIR",
        default=None,
        help="also (or instead of --onnx) write DIR/torchscript_model.pt (calibrated class "
        "logits) and DIR/config.json for WSInfer; for QuPath, put DIR in the extension's "
        "models folder under local/",
    )
    p.add_argument(
        "--wsinfer-tta",
        choices=["none", "d4"],
        default=None,
        help="test-time augmentation inside the WSInfer model (default: the checkpoint's "
        "inference.tta, as predict runs patches)",
    )


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument(
        "--backends",
        default="torch-eager,torch,torch-bf16,onnx,onnx-int8",
        help="comma-separated backends (default: all but torch-compile, which takes a minute "
        "to compile); torch-eager is the baseline",
    )
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch size (default 32)")
    p.add_argument(
        "--iters", type=int, default=10, help="timed iterations per measurement (default 10)"
    )
    p.add_argument(
        "--size", type=int, default=None, help="patch side (default: the model's input size)"
    )
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="patches for agreement and end-to-end (a folder, a CSV manifest with a 'path' "
        "column or a .npy array), e.g. made with 'calcinosis synth' (benchmarks/bench_infer.py "
        "makes them itself); required",
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=64,
        metavar="N",
        help="use at most N of them, evenly spread (default 64)",
    )
    p.add_argument(
        "--int8-calibration",
        default=None,
        metavar="DIR",
        help="calibration patches for the onnx-int8 backend (default: the --images patches, "
        "so its agreement is then measured on its own calibration set)",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end predict measurement")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _robustness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for robustness.md and robustness.json")
    p.add_argument(
        "--report",
        action="append",
        metavar="NAME=DIR",
        help="a row from an evaluation folder's metrics.json (repeatable)",
    )
    p.add_argument(
        "--real-dev",
        default=None,
        metavar="MANIFEST",
        help="real patches to predict (path,label[,mpp] manifest); skipped if it does not exist",
    )
    p.add_argument("--checkpoint", default=None, help="the model for --real-dev")
    p.add_argument(
        "--train-manifest",
        default=None,
        help="the model's training manifest: its train split fits the colour baseline",
    )
    p.add_argument("--title", default=None, help="heading of robustness.md")


predict = Command(
    "predict",
    40,
    _predict_arguments,
    "calcinosis.inference.predict:run_predict",
    help="predict classes, deposits and stain for images, folders or a manifest",
    description=(
        "Predict calibrated class probabilities, the stain and the deposit map for each "
        "input; write predictions.csv/json, overlay PNGs and QuPath GeoJSON. Images much "
        "larger than the network input are tiled (region mode) and get a tile table. "
        "Whole-slide files (.svs .ndpi .scn .bif, tiled .tif; .mrxs .vms with OpenSlide) "
        "are read a band of tiles at a time, never whole: see --level and --region. "
        "Exit status: 0 when every input was processed, 3 when some inputs could not "
        "be read (their rows say status=error and why), 2 for usage errors."
    ),
)
predict_cohort = Command(
    "predict-cohort",
    45,
    _cohort_arguments,
    "calcinosis.inference.cohort:run_cohort",
    help="predict a cohort of slides listed in a CSV, resumably, on Dask",
    description=(
        "Predict every slide of COHORT.csv into its own folder OUT/slides/<name>/ (the files "
        "predict writes, plus a done-marker with the checkpoint's sha256 and the options), "
        "one Dask task per slide on a LocalCluster or the cluster at --scheduler. A rerun "
        "skips finished slides. OUT/cohort.csv and cohort.json summarise the cohort. "
        "Exit status 0, or 3 when some slides failed."
    ),
)
export = Command(
    "export",
    50,
    _export_arguments,
    # --onnx goes on to export.run_export, --wsinfer to wsinfer.export_wsinfer.
    "calcinosis.inference.wsinfer:run_export",
    help="export a checkpoint to ONNX (--onnx) and/or a WSInfer model (--wsinfer)",
    description=(
        "Export a checkpoint to a self-describing ONNX file (dynamic batch axis; the "
        "checkpoint metadata is stored in the model's metadata_props) and check that "
        "ONNX Runtime reproduces PyTorch within 1e-3."
    ),
)
bench = Command(
    "bench",
    60,
    _bench_arguments,
    "calcinosis.inference.bench:run_bench",
    help="measure inference speed of each backend on this machine",
    description=(
        "Throughput, latency, peak memory and agreement with fp32 eager for each backend "
        "(each in a fresh process), plus the end-to-end predict rate on a folder of PNGs."
    ),
)
robustness = Command(
    "robustness",
    70,
    _robustness_arguments,
    "calcinosis.inference.robustness:run_robustness",
    help="one table: the network beside the colour-only baseline on every held-out set",
    description=(
        "Collect evaluation reports (folders of `calcinosis evaluate`) and, optionally, "
        "predictions on real patches into one table of the network's macro-F1 beside the "
        "colour-histogram baseline's. Sets that were not run are listed as such."
    ),
)

# calcinosis serve: the local web page (its options and runner live in inference/serve).
serve = Command(
    "serve",
    80,
    _serve.serve_arguments,
    "calcinosis.inference.serve.command:run_serve",
    help=_serve.HELP,
    description=_serve.DESCRIPTION,
)


if __name__ == "__main__":
    sys.exit(main())
