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
}


def _add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate synthetic skin-histology patches with exact pixel labels",
        description=(
            "Render synthetic H&E, von Kossa and Alizarin red patches of the five classes "
            "with their deposit label maps, and write images/, masks/ and manifest.csv "
            "(stratified train/val/test split)."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created)")
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
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG to this path")


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


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict classes, deposits and stain for images, folders or a manifest",
        description=(
            "Predict calibrated class probabilities, the stain and the deposit map for each "
            "input; write predictions.csv/json, overlay PNGs and QuPath GeoJSON."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or CSV manifests"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="output folder")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--onnx", required=True, help="output .onnx path")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure inference speed of each backend on this machine")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors)")


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
    return parser


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
