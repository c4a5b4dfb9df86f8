"""The robustness table: how the model does on data it never trained on, beside colour alone.

A model that scores 0.95 on its own generator says only that it learned the
generator. This table puts side by side, for one checkpoint (or one recipe),
every set it is checked on:

* evaluation reports (``calcinosis evaluate`` folders holding ``metrics.json``):
  the in-distribution test split, another lab's staining, the other
  rendering style, ... Each row gives the network's macro-F1 next to the
  colour-histogram baseline's on the same patches (the baseline fitted on the
  network's own training data: ``evaluate --baseline-train``), and the gap;
* real patches (a manifest such as ``../shared/real-dev/manifest.csv``),
  predicted the way a pathologist runs the model (``Predictor``: resampled to
  the model's mpp, tiled and called by its deposits when larger than one
  input), counted per true label: "bone called osteoma_cutis 11 of 12", with
  the mean calibrated probability of the true class beside the count (a dozen
  patches' count jumps by several between two trainings; the mean moves
  smoothly, so small changes show in it first). The colour baseline is
  fitted on ``--train-manifest``'s train split and counted the same way.

    calcinosis robustness --out runs/demo/robustness \\
        --report "in-distribution test=runs/demo/report" \\
        --report "other lab (shift 1.0)=runs/demo/report_shifted" \\
        --real-dev ../shared/real-dev/manifest.csv \\
        --checkpoint runs/demo/train/best.safetensors \\
        --train-manifest runs/demo/data/manifest.csv

writes ``robustness.md`` and ``robustness.json``. A report folder or a
real-patch manifest that does not exist is listed as "not run" rather than
failing the table, so the same command serves a machine without the real
patches (a user's) and one with them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import ConfigError, DataError, ImageReadError
from calcinosis.model.fileio import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["report_row", "real_patch_rows", "build_table", "run_robustness"]


def report_row(name: str, report_dir: str | Path) -> dict[str, Any]:
    """One table row from an evaluation folder's ``metrics.json``."""
    path = Path(report_dir) / "metrics.json"
    row: dict[str, Any] = {"set": name, "source": str(report_dir), "kind": "report"}
    if not path.is_file():
        row["status"] = f"not run ({path} not found)"
        return row
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        h = m["headline"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{path}: not a metrics.json written by calcinosis evaluate ({exc})"
        ) from None
    row.update(
        status="ok",
        n=m.get("n_samples"),
        title=m.get("title"),
        macro_f1=h.get("macro_f1"),
        baseline_macro_f1=h.get("baseline_macro_f1"),
        calcium_dice=h.get("calcium_dice"),
        ece=h.get("ece_after"),
    )
    if row["macro_f1"] is not None and row["baseline_macro_f1"] is not None:
        row["gap"] = row["macro_f1"] - row["baseline_macro_f1"]
    return row


def real_patch_rows(
    manifest: str | Path,
    checkpoint: str | Path,
    train_manifest: str | Path | None = None,
    *,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Predict every patch of ``manifest`` and count, per true label, how often it is called so.

    Returns one row per label in the manifest (``n``, ``correct``, and
    ``calls``: a histogram of the calls, ``indeterminate`` included, with a
    patch that got no call counted under its status, e.g. ``out_of_focus`` or
    ``error``) with the colour baseline's count of the same patches beside it
    when ``train_manifest`` is given.
    """
    from calcinosis.model.baseline import colour_baseline
    from calcinosis.model.manifest import read_manifest

    from .predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, batch_size=batch_size)
    class_names = list(predictor.class_names)
    samples = read_manifest(manifest, class_names)
    calls: list[str] = []
    p_true: list[float | None] = []
    for s in samples:
        res = predictor.predict(str(s.path), mpp=s.mpp)
        called = res.status in ("ok", "indeterminate") and res.prediction
        calls.append(res.prediction if called else res.status)
        p_true.append(res.probabilities.get(s.label) if called else None)
        if res.status != "ok":
            log.info("%s: %s %s", s.path, res.status, res.reason)
    base_calls: list[str] | None = None
    base_note = "no --train-manifest"
    if train_manifest is not None:
        train_rows = [r for r in read_manifest(train_manifest, class_names) if r.split == "train"]
        if len({r.label for r in train_rows}) >= 2:
            # the baseline sees the patches the network could read; the rest stay "error"
            readable = [i for i, c in enumerate(calls) if c != "error"]
            probs, base_note = colour_baseline(
                train_rows, [samples[i] for i in readable], class_names
            )
            if probs is not None:
                base_calls = ["error"] * len(samples)
                for i, k in zip(readable, probs.argmax(axis=1), strict=True):
                    base_calls[i] = class_names[int(k)]
        else:
            base_note = f"{train_manifest} has no train split with two or more classes"
    rows = []
    name = Path(manifest).parent.name or str(manifest)
    for label in sorted({s.label for s in samples}, key=class_names.index):
        idx = [i for i, s in enumerate(samples) if s.label == label]
        hist = Counter(calls[i] for i in idx)
        probs = [p_true[i] for i in idx if p_true[i] is not None]
        rows.append(
            {
                "set": f"{name}: {label} patches",
                "source": str(manifest),
                "kind": "real",
                "status": "ok",
                "label": label,
                "n": len(idx),
                "correct": sum(calls[i] == label for i in idx),
                "calls": dict(hist.most_common()),
                # the calibrated probability of the true class, averaged: moves
                # smoothly where the count of a dozen patches jumps
                "mean_p_true": float(np.mean(probs)) if probs else None,
                "baseline_correct": (
                    None if base_calls is None else sum(base_calls[i] == label for i in idx)
                ),
                "baseline": base_note,
            }
        )
    return rows


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def build_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: network, colour baseline and their gap for every set."""
    lines = [
        "| set | patches | network | colour-only baseline | network - baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['set']} | - | {r['status']} | - | - |")
        elif r["kind"] == "report":
            lines.append(
                f"| {r['set']} | {_fmt(r.get('n'), 'd')} | macro-F1 {_fmt(r.get('macro_f1'))} "
                f"| {_fmt(r.get('baseline_macro_f1'))} | {_fmt(r.get('gap'), '+.3f')} |"
            )
        else:
            n, c, b = r["n"], r["correct"], r.get("baseline_correct")
            base = "-" if b is None else f"{b} of {n}"
            gap = "-" if b is None else f"{c - b:+d}"
            others = ", ".join(f"{k} {v}" for k, v in r["calls"].items() if k != r["label"])
            mean_p = r.get("mean_p_true")
            lines.append(
                f"| {r['set']} | {n} | called {r['label']} {c} of {n}"
                + (f", mean p({r['label']}) {mean_p:.2f}" if mean_p is not None else "")
                + (f" (else: {others})" if others else "")
                + f" | {base} | {gap} |"
            )
    return "\n".join(lines) + "\n"


def _parse_named(text: str, flag: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"{flag} {text!r}: expected NAME=PATH, e.g. {flag} 'other lab=runs/x'")
    return name.strip(), path.strip()


def run_robustness(args: Any) -> int:
    """``calcinosis robustness --out DIR --report NAME=DIR ... [--real-dev MANIFEST ...]``."""
    rows = [report_row(*_parse_named(t, "--report")) for t in args.report or []]
    real = getattr(args, "real_dev", None)
    if real:
        if not args.checkpoint:
            raise ConfigError("--real-dev needs --checkpoint (the model to predict them with)")
        if Path(real).is_file():
            try:
                rows += real_patch_rows(real, args.checkpoint, args.train_manifest)
            except (ImageReadError, DataError) as exc:
                rows.append({"set": str(real), "status": f"failed: {exc}", "kind": "real"})
        else:
            rows.append({"set": Path(real).parent.name, "status": f"not run ({real} not found)"})
    if not rows:
        raise ConfigError("nothing to tabulate: give --report NAME=DIR and/or --real-dev")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(rows)
    title = getattr(args, "title", None) or "Robustness"
    md = (
        f"# {title}\n\n"
        "Macro-F1 of the network and of a colour-histogram logistic regression fitted on "
        "the network's own training patches, on each set; real patches as the number "
        "called their true class (predicted as `calcinosis predict` does).\n\n" + table
    )
    atomic_write_text(out / "robustness.md", md)
    atomic_write_text(out / "robustness.json", json.dumps(rows, indent=2) + "\n")
    print(table, end="")
    print(f"table: {out / 'robustness.md'}")
    return 0
