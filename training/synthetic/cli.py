"""``calcinosis synth``: the command line's glue to the dataset, sheet and region writers."""

from __future__ import annotations

import re
from pathlib import Path

from calcinosis.model.errors import ConfigError
from calcinosis.model.fileio import atomic_write_text
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES

from .dataset import TEST_FRACTION, VAL_FRACTION, generate_dataset
from .region import region_json, region_metadata, render_plan, write_region_png
from .region_plan import DEPOSIT_CLASSES, GLASS, REGION_MAX_PIXELS, REGION_MIN_SIDE, plan_region
from .sheet import contact_sheet

_REGION_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_region_size(text: str) -> tuple[int, int]:
    """``"2048x1024"`` -> (2048, 1024); a clear ConfigError for anything else."""
    match = _REGION_RE.match(str(text))
    if not match:
        raise ConfigError(
            f"--region must be WIDTHxHEIGHT in pixels, for example --region 2048x2048; got {text!r}"
        )
    width, height = int(match[1]), int(match[2])
    if min(width, height) < REGION_MIN_SIDE:
        raise ConfigError(
            f"--region {text}: each side must be at least {REGION_MIN_SIDE} pixels, "
            "for example --region 2048x2048"
        )
    if width * height > REGION_MAX_PIXELS:
        raise ConfigError(
            f"--region {text} is too large (at most {REGION_MAX_PIXELS / 1e6:.0f} Mpx, "
            "e.g. --region 16384x16384); render several smaller regions"
        )
    return width, height


def _run_synth_region(args, region: str, stain: str) -> int:
    width, height = parse_region_size(region)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(
            f"with --region, --out is the PNG file to write (e.g. --out region.png); got {args.out!r}"
        )
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown --stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    plan = plan_region(width, height, args.seed, mpp=args.mpp)
    rgb, labels = render_plan(plan, stain, args.shift, workers=args.workers)
    labels_path = out.with_name(f"{out.stem}_labels.png")
    json_path = out.with_suffix(".json")
    write_region_png(out, rgb)
    del rgb
    write_region_png(labels_path, labels)
    # the JSON side-car last: its presence means the region is complete
    atomic_write_text(json_path, region_json(region_metadata(plan, stain, args.shift)))
    n_dep = sum(cell in DEPOSIT_CLASSES for row in plan.grid for cell in row)
    n_glass = sum(cell == GLASS for row in plan.grid for cell in row)
    print(
        f"wrote {out} ({width}x{height} px, {plan.mpp} um/px, {stain}; {plan.rows}x{plan.cols} "
        f"tiles of {plan.tile} px: {n_dep} with deposits, {n_glass} bare glass), "
        f"{labels_path.name} and {json_path.name}"
    )
    return 0


def run_synth(args) -> int:
    """``calcinosis synth``: a patch dataset (and optionally a contact sheet), or with
    ``--region WxH`` one large region PNG with its label map and JSON side-car."""
    region = getattr(args, "region", None)
    stain = getattr(args, "stain", None)
    if region is not None:
        return _run_synth_region(args, region, stain or "he")
    if stain is not None:
        raise ConfigError("--stain applies only with --region (a dataset holds all three stains)")
    look = {"size": args.size, "seed": args.seed, "shift": args.shift, "mpp": args.mpp}
    look["style"] = args.style  # the sheet shows patches exactly as the dataset draws them
    supersample = getattr(args, "supersample", 1)
    val, test = getattr(args, "val_fraction", None), getattr(args, "test_fraction", None)
    fractions = {
        "val_fraction": VAL_FRACTION if val is None else val,
        "test_fraction": TEST_FRACTION if test is None else test,
    }
    manifest = generate_dataset(
        args.out,
        args.n_per_class_stain,
        workers=args.workers,
        supersample=supersample,
        **fractions,
        **look,
    )
    n = args.n_per_class_stain * len(CLASS_NAMES) * len(STAIN_NAMES)
    print(f"wrote {n} patches ({args.size} px, {args.mpp} um/px) and {manifest}")
    if getattr(args, "sheet", None):
        sheet = contact_sheet(args.sheet, **look)
        print(f"wrote contact sheet {sheet}")
    return 0
