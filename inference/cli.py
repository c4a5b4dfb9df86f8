"""The ``calcinosis`` command line.

One console script with subcommands. Parsers are declared here (cheap to
import, so ``--help`` answers at once); each command's work is imported only
when it runs. Errors the user can fix (:class:`CalcinosisError`) are printed as
one clear line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> "module:function"; the function takes the parsed args, returns an exit code.
COMMANDS: dict[str, str] = {
    "synth": "calcinosis.training.synthetic:run_synth",
    "train": "calcinosis.training.train:run_train",
    "evaluate": "calcinosis.training.evaluate:run_evaluate",
    "predict": "calcinosis.inference.predict:run_predict",
    "export": "calcinosis.inference.export:run_export",
    "bench": "calcinosis.inference.bench:run_bench",
    "robustness": "calcinosis.inference.robustness:run_robustness",
}


def _add_tta_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        choices=("none", "d4"),
        default=None,
        help="test-time augmentation: d4 averages over the 8 rotations/reflections of each "
        "patch (8x the compute); default: the checkpoint's inference.tta, the mode its "
        "temperature was fitted in",
    )


def _add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate synthetic skin-histology patches with exact pixel labels",
        description=(
            "Render synthetic H&E, von Kossa and Alizarin red patches of the five classes "
            "with their deposit label maps, and write images/, masks/ and manifest.csv "
            "(stratified train/val/test split). With --region, render instead one large "
            "region like an area exported from a slide: a mosaic of tissue with scattered "
            "deposits and bare glass, written as a PNG with its label map and a JSON side-car."
        ),
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (created); with --region, the region PNG to write",
    )
    p.add_argument(
        "--region",
        default=None,
        metavar="WxH",
        help="render one region of W x H pixels (e.g. 2048x2048) instead of a dataset; "
        "also writes <stem>_labels.png and <stem>.json next to --out",
    )
    p.add_argument(
        "--stain",
        default=None,
        help="stain of a --region: he (default), von_kossa or alizarin_red",
    )
    p.add_argument(
        "--n-per-class-stain", type=int, default=20, help="patches per class and stain (default 20)"
    )
    p.add_argument("--size", type=int, default=128, help="patch side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives identical files")
    p.add_argument(
        "--shift",
        type=float,
        default=0.0,
        help="move staining/scanner variation outside the training range "
        "(0 = training lab, 1 = a clearly different lab)",
    )
    p.add_argument(
        "--supersample",
        type=int,
        default=1,
        metavar="N",
        help="draw each patch 1..N times finer (random per patch) and area-average it down, "
        "as a scanner's pyramid level or resampling to the model's mpp does (default 1: off)",
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG to this path")
    p.add_argument(
        "--mpp",
        type=float,
        default=0.5,
        help="microns per pixel to render at (default 0.5, a 20x scan); 1.0 shows twice "
        "the tissue in the same pixels",
    )
    p.add_argument(
        "--style",
        choices=("a", "b", "mix"),
        default="a",
        help="renderer: a (stained-component optics, default), b (a structurally different "
        "painted rendering of the same tissue), mix (every other patch in each); for "
        "measuring and training across rendering styles",
    )


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description=(
            "Train from a YAML config; key=value pairs override config keys "
            "(for example train.lr=3e-4 data.image_size=96). Run under torchrun for "
            "several GPUs or processes."
        ),
    )
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint",
    )


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint and write a report",
        description="Evaluate a checkpoint on a manifest split and write metrics, plots and a report.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument(
        "--data", required=True, help="CSV manifest with path,label[,stain,mask_path,split]"
    )
    p.add_argument(
        "--split", default="test", help="split to evaluate (default test; 'all' for every row)"
    )
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint dir>/report)")
    p.add_argument("--no-baseline", action="store_true", help="skip the colour-histogram baseline")
    p.add_argument(
        "--baseline-train",
        default=None,
        metavar="MANIFEST",
        help="fit the colour baseline on this manifest's train split (default: --data's); "
        "for another lab's or style's set, the model's own training manifest",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="METRICS_JSON",
        help="metrics.json of an earlier report (e.g. the in-lab test set); adds a section "
        "comparing this data with it",
    )
    p.add_argument("--batch-size", type=int, default=64, help="patches per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    _add_tta_argument(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the model (default: a CUDA GPU if there is one)",
    )


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
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
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "torch-eager", "torch-bf16", "torch-compile", "onnx", "onnx-int8"],
        help="torch = PyTorch fp32 channels-last (default); onnx = ONNX Runtime, exported once "
        "next to the checkpoint and usually fastest on CPUs; torch-bf16 only pays off on "
        "CPUs with AMX/AVX512-BF16 or on GPUs",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda / cuda:N for the torch backends"
    )
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
    _add_tta_argument(p)
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


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description=(
            "Export a checkpoint to a self-describing ONNX file (dynamic batch axis; the "
            "checkpoint metadata is stored in the model's metadata_props) and check that "
            "ONNX Runtime reproduces PyTorch within 1e-3."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write <name>.int8.onnx, statically quantised on synthetic calibration patches",
    )
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch/ONNX parity check")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure inference speed of each backend on this machine",
        description=(
            "Throughput, latency, peak memory and agreement with fp32 eager for each backend "
            "(each in a fresh process), plus the end-to-end predict rate on a folder of PNGs."
        ),
    )
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
        "--images", type=int, default=64, help="synthetic images for agreement and end-to-end"
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end predict measurement")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calcinosis",
        description=(
            "Calcinosis cutis versus its mimics (osteoma cutis, gout, amyloidosis, normal skin) "
            "in H&E, von Kossa and Alizarin red patches: synthetic data, training, evaluation "
            "and inference."
        ),
    )
    from calcinosis.training import __version__

    parser.add_argument("--version", action="version", version=f"calcinosis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_synth_parser(sub)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_bench_parser(sub)
    _add_robustness_parser(sub)
    # calcinosis serve: the local web page (its parser and runner live in inference/serve).
    from calcinosis.inference.serve import add_serve_parser

    add_serve_parser(sub)
    COMMANDS.setdefault("serve", "calcinosis.inference.serve:run_serve")
    return parser


def _add_robustness_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "robustness",
        help="one table: the network beside the colour-only baseline on every held-out set",
        description=(
            "Collect evaluation reports (folders of `calcinosis evaluate`) and, optionally, "
            "predictions on real patches into one table of the network's macro-F1 beside the "
            "colour-histogram baseline's. Sets that were not run are listed as such."
        ),
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command].split(":")
    from calcinosis.model.errors import CalcinosisError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except CalcinosisError as exc:
        print(f"calcinosis {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calcinosis {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
