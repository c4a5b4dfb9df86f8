"""The training side of the ``calcinosis`` command line: ``synth``, ``train``, ``evaluate``.

Parsers only (cheap to import, so ``calcinosis --help`` answers at once); each
command's work is imported when it runs. Registered under the
``calcinosis.commands`` entry points (pyproject.toml) and dispatched by
:mod:`calcinosis.model.cli`.
"""

from __future__ import annotations

import argparse

from calcinosis.model.cli import Command, add_tta_argument

__all__ = ["evaluate", "synth", "train"]


def _synth_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of each class and stain for validation (default 0.15)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="share of each class and stain held out for test (default 0.15)",
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


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint",
    )


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
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
    add_tta_argument(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the model (default: a CUDA GPU if there is one)",
    )


synth = Command(
    "synth",
    10,
    _synth_arguments,
    "calcinosis.training.synthetic:run_synth",
    help="generate synthetic skin-histology patches with exact pixel labels",
    description=(
        "Render synthetic H&E, von Kossa and Alizarin red patches of the five classes "
        "with their deposit label maps, and write images/, masks/ and manifest.csv "
        "(stratified train/val/test split). With --region, render instead one large "
        "region like an area exported from a slide: a mosaic of tissue with scattered "
        "deposits and bare glass, written as a PNG with its label map and a JSON side-car."
    ),
)
train = Command(
    "train",
    20,
    _train_arguments,
    "calcinosis.training.train:run_train",
    help="train a model from a YAML config",
    description=(
        "Train from a YAML config; key=value pairs override config keys "
        "(for example train.lr=3e-4 data.image_size=96). Run under torchrun for "
        "several GPUs or processes."
    ),
)
evaluate = Command(
    "evaluate",
    30,
    _evaluate_arguments,
    "calcinosis.training.evaluate:run_evaluate",
    help="evaluate a checkpoint and write a report",
    description="Evaluate a checkpoint on a manifest split and write metrics, plots and a report.",
)
