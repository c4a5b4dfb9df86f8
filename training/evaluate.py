"""Evaluate a checkpoint on a manifest split and write the report.

    calcinosis evaluate --checkpoint runs/demo/best.safetensors --data runs/demo/data/manifest.csv

writes ``metrics.json``, ``report.md`` and the plots (confusion matrix,
reliability diagram, ROC) to ``<checkpoint folder>/report``. The checkpoint
alone decides the preprocessing (input size, mean/std, mpp) and the
calibration temperature, exactly as inference will.

To see how much a model loses in another lab, evaluate it on a shifted set and
name the first report as the reference; the report then gets a comparison
section:

    calcinosis evaluate --checkpoint runs/demo/best.safetensors \\
        --data runs/demo/shifted/manifest.csv --split all \\
        --out runs/demo/report_shift --reference runs/demo/report/metrics.json

The colour-histogram baseline (a logistic regression on colour alone, fitted
on the same manifest's train split) is the yardstick for how much the network
sees beyond colour; ``--no-baseline`` skips it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from calcinosis.model import DataError, Preprocessing, load_checkpoint
from calcinosis.model.baseline import colour_baseline as _colour_baseline
from calcinosis.model.manifest import Sample, read_manifest
from calcinosis.model.metadata import checkpoint_tta, temperature_for

from . import report
from .engine import collect_outputs
from .loaders import make_loader
from .metrics import compare_reports

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str | Path,
    manifest: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    baseline: bool = True,
    *,
    reference: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    tta: str | None = None,
    baseline_train: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the ``split`` rows of ``manifest`` ('all' = every row).

    ``tta`` ("none" / "d4") defaults to the checkpoint's ``inference.tta``, so
    the report measures what ``calcinosis predict`` returns. The colour
    baseline is fitted on the train split of ``baseline_train`` (default:
    ``manifest`` itself); for a set from another lab, style or source, name
    the model's own training manifest, so that both see the same training
    data. Returns the metrics dict written to ``<out_dir>/metrics.json``.
    """
    from .dataset import PatchDataset
    from .transforms import EvalTransform

    checkpoint = Path(checkpoint)
    out = Path(out_dir) if out_dir is not None else checkpoint.parent / "report"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    # NHWC, as the Predictor's default backend runs it: the same arithmetic as
    # predict, and 1.4x the images/s of NCHW on CPU (benchmarks/bench_infer.py)
    model = model.to(memory_format=torch.channels_last)
    prep = Preprocessing.from_metadata(meta)  # exactly what the Predictor applies
    class_names, stain_names = list(meta["class_names"]), list(meta["stain_names"])
    tta, tta_warning = checkpoint_tta(meta, tta)
    if tta_warning:
        log.warning(tta_warning)
    # the temperature fitted in this mode where calibration fitted one, as predict uses
    temperature = temperature_for(meta, tta) or float(meta.get("temperature") or 1.0)

    rows = read_manifest(manifest, class_names, stain_names)
    samples = _rows_of_split(rows, split, manifest)
    dataset = PatchDataset(samples, class_names, stain_names, EvalTransform(prep), mpp=prep.mpp)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    outputs = collect_outputs(model, loader, dev, "fp32", channels_last=True, tta=tta)
    evaluated = [dataset.samples[i] for i in outputs["indices"]]

    baseline_probs, baseline_note = None, "skipped (--no-baseline)"
    if baseline:
        base_rows = rows
        if baseline_train is not None:
            base_rows = read_manifest(baseline_train, class_names, stain_names)
        baseline_probs, baseline_note = _baseline(base_rows, evaluated, class_names)

    extra: dict[str, Any] = {
        "Checkpoint and data": _provenance(
            checkpoint, meta, prep, manifest, split, baseline_note, tta, temperature
        )
    }
    if dataset.bad_files:
        extra["Unreadable files (skipped)"] = dict(dataset.bad_files)
    report_args = dict(
        labels=outputs["labels"],
        logits=outputs["class_logits"],
        temperature=temperature,
        stains=outputs["stains"],
        stain_logits=outputs["stain_logits"],
        pixel_conf=outputs["pixel_conf"],
        class_names=class_names,
        stain_names=stain_names,
        deposit_labels=list(meta["deposit_labels"]),
        baseline_probs=baseline_probs,
        title=f"{checkpoint.name} on {Path(manifest).name} ({split}, {len(samples)} patches)",
    )
    result = _write_report(out, report_args, extra, reference)
    _print_summary(result, out, result.get("comparison"))
    return result


def _write_report(
    out: Path, report_args: dict[str, Any], extra: dict[str, Any], reference: Any
) -> dict[str, Any]:
    """The report; with a ``reference`` metrics.json, a second pass adds the comparison."""
    result = report.write_report(out, **report_args, extra=extra)
    if reference is not None:
        ref_path = Path(reference)
        comparison = compare_reports(_read_reference(ref_path), result)
        extra[f"Compared with {ref_path}"] = report.comparison_markdown(
            comparison, main_name="reference", shifted_name="this set"
        )
        result = report.write_report(out, **report_args, extra=extra)
        result["comparison"] = comparison
    return result


def _rows_of_split(rows: list[Sample], split: str, manifest: Any) -> list[Sample]:
    samples = rows if split == "all" else [s for s in rows if s.split == split]
    if not samples:
        present = dict(Counter(s.split or "(none)" for s in rows))
        raise DataError(
            f"manifest '{manifest}' has no rows with split '{split}' (splits present: "
            f"{present}); pass --split all to evaluate every row"
        )
    return samples


def _baseline(
    base_rows: list[Sample], evaluated: list[Sample], class_names: list[str]
) -> tuple[Any, str]:
    """The colour baseline's probabilities for the evaluated rows, fitted on the train rows."""
    train_rows = [s for s in base_rows if s.split == "train"]
    if len({s.label for s in train_rows}) < 2:
        return None, "skipped: the baseline's manifest has no train split with two or more classes"
    return _colour_baseline(train_rows, evaluated, class_names)


def _read_reference(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"--reference {path}: cannot read it as metrics.json ({exc})") from None


def _provenance(
    checkpoint: Path,
    meta: dict[str, Any],
    prep: Preprocessing,
    manifest: Any,
    split: str,
    baseline: str,
    tta: str,
    temperature: float,
) -> str:
    cal = meta.get("calibration") or {}
    lines = [
        f"- checkpoint: `{checkpoint}` (epoch {meta.get('epoch')}, backbone "
        f"`{(meta.get('model') or {}).get('backbone')}`, package {meta.get('package_version')})",
        f"- preprocessing: {prep.input_size} px at {prep.mpp} um/px, "
        f"mean {list(prep.mean)}, std {list(prep.std)}",
        f"- temperature: {temperature:.3f}"
        + (f" (fitted on {cal['samples']} validation patches)" if "samples" in cal else ""),
        "- test-time augmentation: "
        + ("d4 (outputs averaged over the 8 rotations/reflections)" if tta == "d4" else "none"),
        f"- data: `{manifest}`, split `{split}`",
        f"- colour baseline: {baseline}",
    ]
    return "\n".join(lines) + "\n"


def _print_summary(m: dict[str, Any], out: Path, comparison: dict[str, Any] | None) -> None:
    h = m["headline"]

    def f(key: str, spec: str = ".3f") -> str:
        v = h.get(key)
        return "-" if v is None else format(v, spec)

    print(
        f"{m['title']}\n"
        f"  macro-F1 {f('macro_f1')}  accuracy {f('accuracy')}  macro AUC {f('macro_auc')}\n"
        f"  ECE {f('ece_before', '.4f')} -> {f('ece_after', '.4f')} at temperature "
        f"{m['temperature']:.3f}\n"
        f"  calcium Dice {f('calcium_dice')}  mean deposit Dice {f('mean_deposit_dice')}  "
        f"stain accuracy {f('stain_accuracy')}\n"
        f"  colour-only baseline macro-F1 {f('baseline_macro_f1')}",
        flush=True,
    )
    if comparison is not None:
        for key in ("macro_f1", "ece_after", "calcium_dice"):
            row = comparison["metrics"].get(key)
            if row and row["main"] is not None and row["shifted"] is not None:
                print(
                    f"  vs reference: {row['label']} {row['main']:.3f} -> {row['shifted']:.3f} "
                    f"({row['delta']:+.3f})",
                    flush=True,
                )
    print(f"report: {out / m['files']['report']}", flush=True)


def run_evaluate(args: Any) -> int:
    """``calcinosis evaluate --checkpoint C --data M [--split S] [--out D] ...``."""
    evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        out_dir=args.out,
        baseline=not getattr(args, "no_baseline", False),
        reference=getattr(args, "reference", None),
        batch_size=getattr(args, "batch_size", 64),
        num_workers=getattr(args, "workers", 0),
        device=getattr(args, "device", "auto"),
        tta=getattr(args, "tta", None),
        baseline_train=getattr(args, "baseline_train", None),
    )
    return 0
