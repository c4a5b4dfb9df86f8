"""The evaluation report: metrics.json, report.md and three plots in one folder.

:func:`write_report` takes the outputs of one evaluation (class and stain
logits, the deposit pixel confusion, the colour baseline's probabilities),
measures them with :func:`calcinosis.training.metrics.evaluation_metrics` and
writes what a pathologist reads. Plots are drawn with matplotlib's Agg canvas
on ``Figure`` objects directly, so importing this module never changes the
process-wide matplotlib backend and no pyplot figures are left open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.fileio import atomic_write_text

from .metrics import compare_reports, evaluation_metrics, softmax, to_jsonable

__all__ = ["REPORT_FILES", "compare_reports", "comparison_markdown", "write_report"]

#: What :func:`write_report` writes, by role.
REPORT_FILES = {
    "metrics": "metrics.json",
    "report": "report.md",
    "confusion_matrix": "confusion_matrix.png",
    "reliability": "reliability.png",
    "roc": "roc.png",
}


def write_report(
    out_dir: str | Path,
    *,
    title: str = "Evaluation",
    extra: Mapping[str, Any] | None = None,
    **inputs: Any,
) -> dict[str, Any]:
    """Measure one evaluation and write ``metrics.json``, ``report.md`` and three plots.

    ``inputs`` are the keyword arguments of
    :func:`~calcinosis.training.metrics.evaluation_metrics` (labels, logits,
    temperature, stains, stain_logits, pixel_conf, class_names, stain_names,
    deposit_labels, baseline_probs; see there). ``extra`` maps a section title
    to a markdown string (written as is) or to a JSON-able value (written as
    JSON); all of it is also stored in metrics.json.

    Returns the metrics dict exactly as written to metrics.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "title": title,
        **evaluation_metrics(**inputs),
        "extra": to_jsonable(dict(extra) if extra else {}),
        "files": dict(REPORT_FILES),
    }
    cls, cal = metrics["classification"], metrics["calibration"]
    y = np.asarray(inputs["labels"], dtype=np.int64).ravel()
    probs = softmax(inputs["logits"], inputs["temperature"])
    _plot_confusion(out / REPORT_FILES["confusion_matrix"], cls, title)
    _plot_reliability(
        out / REPORT_FILES["reliability"], cal["reliability_before"], cal["reliability_after"], cal
    )
    _plot_roc(out / REPORT_FILES["roc"], y, probs, cls, title)
    atomic_write_text(out / REPORT_FILES["report"], _report_markdown(metrics, extra))
    atomic_write_text(
        out / REPORT_FILES["metrics"],
        json.dumps(metrics, indent=2, allow_nan=False, sort_keys=False),
    )
    return metrics


# --------------------------------------------------------------------------- #
# Comparison with a reference report
# --------------------------------------------------------------------------- #


def comparison_markdown(
    comparison: Mapping[str, Any],
    main_name: str = "main test set",
    shifted_name: str = "shifted test set",
) -> str:
    """Markdown table of :func:`compare_reports`, ready for ``write_report(extra=...)``."""
    lines = [
        f"| metric | {main_name} | {shifted_name} | change |",
        "|---|---:|---:|---:|",
    ]
    for row in comparison["metrics"].values():
        if row["main"] is None and row["shifted"] is None:
            continue
        change = _fmt_delta(row["delta"])
        if row["worse"] is True:
            change += " (worse)"
        elif row["worse"] is False and row["delta"]:
            change += " (better)"
        lines.append(
            f"| {row['label']} | {_fmt(row['main'])} | {_fmt(row['shifted'])} | {change} |"
        )
    pc = comparison.get("per_class_f1") or {}
    if pc:
        lines += [
            "",
            f"| class F1 | {main_name} | {shifted_name} | change |",
            "|---|---:|---:|---:|",
        ]
        for name, row in pc.items():
            lines.append(
                f"| {name} | {_fmt(row['main'])} | {_fmt(row['shifted'])} | {_fmt_delta(row['delta'])} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #


def _report_markdown(m: dict[str, Any], extra: Mapping[str, Any] | None) -> str:
    """report.md: the summary, then one section per question, then ``extra``."""
    out = _summary_md(m)
    out += _per_class_md(m["classification"])
    out += _calibration_md(m["calibration"], m["temperature"])
    out += _stain_md(m["stain"])
    out += _segmentation_md(m["segmentation"])
    out += _baseline_md(m["baseline"], m["classification"])
    for section, value in (extra or {}).items():
        out += [f"## {section}", ""]
        if isinstance(value, str):
            out += [value.rstrip(), ""]
        else:
            out += ["```json", json.dumps(to_jsonable(value), indent=2), "```", ""]
    return "\n".join(out)


def _summary_md(m: dict[str, Any]) -> list[str]:
    h, cal, stain = m["headline"], m["calibration"], m["stain"]
    stain_acc = _fmt(h["stain_accuracy"])
    if h["stain_accuracy"] is not None:
        stain_acc += f" (n={stain['n_known']} with known stain)"
    out = [
        f"# {m['title']}",
        "",
        f"{m['n_samples']} patches. Class metrics use calibrated probabilities "
        f"softmax(logits / T) with T = {m['temperature']:.3f}; the temperature changes "
        "confidence, never the predicted class.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| macro-F1 | {_fmt(h['macro_f1'])} |",
        f"| accuracy | {_fmt(h['accuracy'])} |",
        f"| balanced accuracy | {_fmt(h['balanced_accuracy'])} |",
        f"| macro ROC AUC (one-vs-rest) | {_fmt(h['macro_auc'])} |",
        f"| ECE before temperature | {_fmt(h['ece_before'])} |",
        f"| ECE after temperature | {_fmt(h['ece_after'])} |",
        f"| NLL before / after | {_fmt(cal['nll_before'])} / {_fmt(cal['nll_after'])} |",
        f"| calcium Dice | {_fmt(h['calcium_dice'])} |",
        f"| mean deposit Dice | {_fmt(h['mean_deposit_dice'])} |",
        f"| stain accuracy | {stain_acc} |",
        f"| colour-only baseline macro-F1 | {_fmt(h['baseline_macro_f1'])} |",
        "",
    ]
    if h["baseline_macro_f1"] is not None and h["macro_f1"] is not None:
        gap = h["macro_f1"] - h["baseline_macro_f1"]
        out += [
            "The colour-only baseline is a logistic regression on colour histograms "
            "(no spatial structure at all). The network's macro-F1 is "
            f"{_fmt_delta(gap)} relative to it: "
            + (
                "that is what it reads from structure (lamellae and osteocytes versus "
                "cracked amorphous masses, needle clefts versus waxy fissured globules)."
                if gap > 0.05
                else "little more than colour. Check the classes that share a colour "
                "(calcium vs bone in von Kossa / Alizarin red, gout vs amyloid in H&E)."
            ),
            "",
        ]
    return out


def _per_class_md(cls: dict[str, Any]) -> list[str]:
    out = [
        "## Per class",
        "",
        "| class | precision | recall | F1 | ROC AUC | support | predicted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in cls["per_class"].items():
        out.append(
            f"| {name} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | "
            f"{_fmt(r['auc'])} | {r['support']} | {r['predicted']} |"
        )
    return out + [
        "",
        "Rows of the confusion matrix are the true classes, columns the predicted ones.",
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "![ROC curves](roc.png)",
        "",
    ]


def _calibration_md(cal: dict[str, Any], t: float) -> list[str]:
    return [
        "## Calibration",
        "",
        f"Expected calibration error (top label, {cal['n_bins']} equal-width bins) "
        f"{_fmt(cal['ece_before'])} before and {_fmt(cal['ece_after'])} after temperature "
        f"scaling (T = {t:.3f}). If T was fitted on this same set, the 'after' value is optimistic.",
        "",
        "![Reliability diagram](reliability.png)",
        "",
    ]


def _stain_md(stain: dict[str, Any]) -> list[str]:
    out = ["## Per stain", ""]
    if stain["per_stain"]:
        out += [
            f"Grouped by the {stain['grouping']}.",
            "",
            "| stain | n | stain known | stain predicted | accuracy | macro-F1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in stain["per_stain"].items():
            out.append(
                f"| {name} | {r['n']} | {r['n_true_stain']} | {r['n_predicted_stain']} | "
                f"{_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} |"
            )
        out.append("")
    if stain["confusion"] is None:
        return out + [
            "No stain labels (or no stain head outputs): stain accuracy not measured.",
            "",
        ]
    names = stain["stain_names"]
    out += [
        f"Stain head on the {stain['n_known']} patches with a known stain "
        f"({stain['n_unknown']} unknown left out); rows true, columns predicted:",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for name, row in zip(names, stain["confusion"], strict=True):
        out.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return out + [""]


def _segmentation_md(seg: dict[str, Any] | None) -> list[str]:
    out = ["## Deposit segmentation", ""]
    if seg is None:
        return out + ["No pixel masks in this set: Dice and IoU not measured.", ""]
    out += [
        f"{seg['total_pixels']} labelled pixels, pixel accuracy {_fmt(seg['pixel_accuracy'])}. "
        "Mean deposit Dice averages the deposit labels (not tissue) that occur in the "
        "masks or the predictions.",
        "",
        "| label | Dice | IoU | target pixels | predicted pixels |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in seg["per_label"].items():
        out.append(
            f"| {name} | {_fmt(r['dice'])} | {_fmt(r['iou'])} | {r['support']} | {r['predicted']} |"
        )
    return out + [""]


def _baseline_md(base: dict[str, Any] | None, cls: dict[str, Any]) -> list[str]:
    if base is None:
        return []
    out = [
        "## Colour-only baseline",
        "",
        f"macro-F1 {_fmt(base['macro_f1'])}, accuracy {_fmt(base['accuracy'])}.",
        "",
        "| class | baseline F1 | network F1 |",
        "|---|---:|---:|",
    ]
    for name, r in base["per_class"].items():
        out.append(f"| {name} | {_fmt(r['f1'])} | {_fmt(cls['per_class'][name]['f1'])} |")
    return out + [""]


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #

_DPI = 120


def _new_figure(width: float, height: float) -> Any:
    """A Figure on the Agg canvas, independent of pyplot and the global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _plot_confusion(path: Path, cls: dict[str, Any], title: str) -> None:
    names = cls["class_names"]
    cm = np.asarray(cls["confusion_matrix"], dtype=np.int64)
    k = len(names)
    side = max(4.5, 1.0 + 0.9 * k)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    # Colour by row share so a rare class's errors are as visible as a common
    # class's; the annotation gives the raw count.
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("share of true class")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=10,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), labels=[_pretty(n) for n in names], rotation=35, ha="right")
    ax.set_yticks(range(k), labels=[_pretty(n) for n in names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = cls["accuracy"]
    ax.set_title(
        f"{title}: confusion matrix" + (f" (accuracy {acc:.3f})" if acc is not None else "")
    )
    _save(fig, path)


def _plot_reliability(
    path: Path, before: dict[str, Any], after: dict[str, Any], cal: dict[str, Any]
) -> None:
    fig = _new_figure(10.0, 5.5)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1])
    panels = [
        (before, f"before calibration (T = 1), ECE {_fmt(cal['ece_before'])}", "tab:red"),
        (
            after,
            f"after calibration (T = {cal['temperature']:.2f}), ECE {_fmt(cal['ece_after'])}",
            "tab:blue",
        ),
    ]
    for col, (bins, label, colour) in enumerate(panels):
        edges = np.asarray(bins["edges"], dtype=float)
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = np.asarray(bins["accuracy"], dtype=float)
        conf = np.asarray(bins["confidence"], dtype=float)
        count = np.asarray(bins["count"], dtype=float)
        nz = count > 0
        ax = fig.add_subplot(grid[0, col])
        ax.bar(centres[nz], acc[nz], width=width * 0.95, color=colour, alpha=0.75, label="accuracy")
        ax.bar(
            centres[nz],
            conf[nz] - acc[nz],
            bottom=acc[nz],
            width=width * 0.95,
            color="none",
            edgecolor="black",
            hatch="//",
            linewidth=0.5,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(label, fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        hax = fig.add_subplot(grid[1, col], sharex=ax)
        hax.bar(centres, count, width=width * 0.95, color="grey")
        hax.set_xlabel("confidence (top-class probability)")
        hax.set_ylabel("patches")
    fig.suptitle("Reliability diagram")
    _save(fig, path)


def _plot_roc(
    path: Path, y: np.ndarray, probs: np.ndarray, cls: dict[str, Any], title: str
) -> None:
    from sklearn.metrics import roc_curve

    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, name in enumerate(cls["class_names"]):
        auc = cls["per_class"][name]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(y == i, probs[:, i])
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{_pretty(name)} (AUC {auc:.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="chance")
    if drawn == 0:
        ax.text(
            0.5,
            0.55,
            "no class has both positives and negatives:\nROC undefined",
            ha="center",
            va="center",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = cls["macro_auc"]
    ax.set_title(
        f"{title}: one-vs-rest ROC" + (f" (macro AUC {macro:.3f})" if macro is not None else "")
    )
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------- #


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def _fmt_delta(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):+.3f}"


def _pretty(name: str) -> str:
    return name.replace("_", " ")
