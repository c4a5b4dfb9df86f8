"""Metrics and temperature calibration, on plain numpy arrays.

Everything here works on the outputs that ``collect_outputs`` gathers (or on
logits that came from anywhere: a checkpoint, an ONNX export, another lab), so
it can be tested without torch. :func:`evaluation_metrics` is everything one
evaluation measures; :mod:`calcinosis.training.report` writes it out as
metrics.json, report.md and the plots.

Three questions the report answers for a pathologist reading it:

1. Does the class head separate calcinosis cutis from its mimics?
   (per-class precision / recall / F1, macro-F1, one-vs-rest ROC AUC,
   confusion matrix)
2. Can its probabilities be trusted? (expected calibration error before and
   after temperature scaling, reliability diagram, NLL, Brier score)
3. Does it see more than colour? A logistic regression on colour histograms
   alone (:mod:`calcinosis.model.baseline`) is the yardstick: in von Kossa and
   Alizarin red, calcium and bone are both positive, in H&E gout and amyloid
   are both pale pink, so only structure separates them. The gap between the
   network's macro-F1 and the colour baseline's is what the network adds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calcinosis.model.fileio import to_jsonable
from calcinosis.model.probability import softmax as _softmax

__all__ = [
    "IGNORE_INDEX",
    "softmax",
    "fit_temperature",
    "reliability_bins",
    "expected_calibration_error",
    "classification_metrics",
    "pixel_confusion",
    "segmentation_metrics",
    "stain_metrics",
    "evaluation_metrics",
    "compare_reports",
    "to_jsonable",
]

#: Target value that marks "no label here" (an unknown stain, a pixel without a
#: mask): torch's default ``ignore_index``. The one definition; the dataset
#: writes it, the losses and the metrics skip it.
IGNORE_INDEX = -100

#: Temperature search range. Below 0.05 the softmax is a hard argmax for any
#: realistic logit scale; above 20 it is nearly uniform. Either end means the
#: logits carry little calibration information, not that T is exactly there.
T_MIN, T_MAX = 0.05, 20.0

# Probabilities are clipped here before taking logs, so a confident mistake
# costs a large but finite NLL instead of inf (inf cannot go into JSON).
_EPS = 1e-12


# --------------------------------------------------------------------------- #
# Probabilities and calibration
# --------------------------------------------------------------------------- #


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature``.

    The row maximum is subtracted first, so logits of any size (1e4, -1e4)
    give finite probabilities instead of overflow.
    """
    _check_temperature(temperature)
    return _softmax(np.asarray(logits, dtype=np.float64) / float(temperature))


def _nll_at(z: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(z / T).

    Written as log(1 + sum_{j != y} exp(s_j - s_y)) with ``logaddexp`` so that
    tiny losses (confident, correct predictions at small T) keep their
    precision; the plain logsumexp(s) - s_y rounds them to 0 and the search
    would lose its direction near the lower bound.
    """
    from scipy.special import logsumexp

    rows = np.arange(len(labels))
    s = z / temperature
    d = s - s[rows, labels][:, None]
    d[rows, labels] = -np.inf
    return float(np.mean(np.logaddexp(0.0, logsumexp(d, axis=1))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature T that minimises the NLL of softmax(logits / T).

    A single scalar cannot change any prediction (argmax is unchanged for
    T > 0); it only rescales confidence, which is why it is fitted on the
    validation set after training and stored in the checkpoint.

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar
    search over log T in [log 0.05, log 20] finds the optimum. If the
    validation data are perfectly separated, the NLL keeps falling as T -> 0
    and the result sits at the lower bound 0.05; a result at either bound
    means "as sharp / as flat as allowed", not a measured value. Empty input
    returns 1.0 (no evidence, no change).
    """
    from scipy.optimize import minimize_scalar

    z, y = _check_logits_labels(logits, labels)
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    res = minimize_scalar(
        lambda u: _nll_at(z, y, math.exp(u)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-5},
    )
    # Brent's bounded search stops a hair inside the interval; when the
    # optimum is at a bound, return the bound itself.
    candidates = [float(res.x), lo, hi]
    best = min(candidates, key=lambda u: _nll_at(z, y, math.exp(u)))
    return float(math.exp(best))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Top-label reliability table with ``n_bins`` equal-width confidence bins.

    Bins are right-closed, (lo, hi], with the first one also taking 0. Returns
    numpy arrays: ``edges`` (n_bins + 1), ``confidence`` and ``accuracy``
    (mean per bin, NaN where the bin is empty) and ``count`` (int).
    """
    p, y = _check_probs_labels(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.zeros(n_bins, dtype=np.int64)
    conf_mean = np.full(n_bins, np.nan)
    acc_mean = np.full(n_bins, np.nan)
    if len(y):
        conf = p.max(axis=1)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        idx = np.searchsorted(edges[1:-1], conf, side="left")
        count = np.bincount(idx, minlength=n_bins).astype(np.int64)
        nz = count > 0
        conf_mean[nz] = np.bincount(idx, weights=conf, minlength=n_bins)[nz] / count[nz]
        acc_mean[nz] = np.bincount(idx, weights=correct, minlength=n_bins)[nz] / count[nz]
    return {"edges": edges, "confidence": conf_mean, "accuracy": acc_mean, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (bin share) x |accuracy - mean confidence|.

    Equal-width bins as in :func:`reliability_bins`. 0 means that whenever the
    model says "80 % sure" it is right 80 % of the time. Empty input gives 0.0.
    """
    bins = reliability_bins(probs, labels, n_bins)
    total = int(bins["count"].sum())
    if total == 0:
        return 0.0
    nz = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][nz] - bins["confidence"][nz])
    return float(np.sum(bins["count"][nz] / total * gaps))


# --------------------------------------------------------------------------- #
# Classification
# --------------------------------------------------------------------------- #


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Per-class and summary metrics of a probabilistic classifier.

    Predictions are the argmax of ``probs`` (N, C). Per class: precision,
    recall, F1 (2TP / (2TP + FP + FN)), support, number predicted and
    one-vs-rest ROC AUC. A quantity with a zero denominator is None rather
    than 0 (a class absent from the labels has no recall and no AUC).

    Summary: accuracy; balanced accuracy (mean recall over classes present);
    macro-F1 over classes that occur in the labels or the predictions (the
    scikit-learn default, so a class that is predicted but never true still
    counts as a 0); macro AUC over classes with an AUC; NLL; multi-class Brier
    score (mean over samples of the squared distance to the one-hot label,
    range 0..2). The confusion matrix has true classes as rows and predicted
    classes as columns.
    """
    from sklearn.metrics import confusion_matrix

    names = list(class_names)
    p, y = _check_probs_labels(probs, labels)
    n, c = len(y), len(names)
    if p.shape[1] != c:
        raise ValueError(f"probs have {p.shape[1]} columns but {c} class names were given")
    if n == 0:
        return _no_classification(names)

    cm = confusion_matrix(y, p.argmax(axis=1), labels=list(range(c)))
    per_class = _per_class(cm, y, p, names)

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in per_class.values() if r[key] is not None]
        return float(np.mean(values)) if values else None

    p_true = np.clip(p[np.arange(n), y], _EPS, 1.0)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    return {
        "n": int(n),
        "class_names": names,
        "accuracy": float(np.diag(cm).sum() / n),
        "balanced_accuracy": mean_of("recall"),
        "macro_f1": mean_of("f1"),
        "macro_auc": mean_of("auc"),
        "nll": float(-np.mean(np.log(p_true))),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def _per_class(
    cm: np.ndarray, y: np.ndarray, p: np.ndarray, names: list[str]
) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1, support, predicted and one-vs-rest AUC of each class."""
    from sklearn.metrics import roc_auc_score

    tp, true_count, pred_count = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        denom = true_count[i] + pred_count[i]
        positives = y == i
        # ROC AUC needs both positives and negatives of this class.
        auc = float(roc_auc_score(positives, p[:, i])) if 0 < positives.sum() < len(y) else None
        per_class[name] = {
            "precision": _float_or_none(tp[i] / pred_count[i] if pred_count[i] else None),
            "recall": _float_or_none(tp[i] / true_count[i] if true_count[i] else None),
            "f1": _float_or_none(2 * tp[i] / denom if denom else None),
            "support": int(true_count[i]),
            "predicted": int(pred_count[i]),
            "auc": auc,
        }
    return per_class


def _no_classification(names: list[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of no samples: counts 0, everything else None."""
    per_class = {}
    for name in names:
        per_class[name] = dict.fromkeys(("precision", "recall", "f1", "auc"))
        per_class[name].update(support=0, predicted=0)
    c = len(names)
    return {
        "n": 0,
        "class_names": names,
        "accuracy": None,
        "balanced_accuracy": None,
        "macro_f1": None,
        "macro_auc": None,
        "nll": None,
        "brier": None,
        "per_class": per_class,
        "confusion_matrix": [[0] * c for _ in range(c)],
    }


# --------------------------------------------------------------------------- #
# Segmentation
# --------------------------------------------------------------------------- #


def pixel_confusion(
    pred: np.ndarray,
    target: np.ndarray,
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """(D, D) int64 pixel confusion matrix, rows = target, columns = prediction.

    Pixels whose target is ``ignore_index`` (patches without a mask, padding)
    are skipped. The result of each batch can simply be added up, so a whole
    test set never has to sit in memory. Accepts (H, W) or (N, H, W) arrays,
    numpy or CPU tensors.
    """
    p = _as_numpy(pred).astype(np.int64, copy=False).ravel()
    t = _as_numpy(target).astype(np.int64, copy=False).ravel()
    if p.shape != t.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {np.shape(pred)} and {np.shape(target)}"
        )
    valid = t != ignore_index
    p, t = p[valid], t[valid]
    if t.size and (t.min() < 0 or t.max() >= num_labels):
        raise ValueError(
            f"target values must be in 0..{num_labels - 1} or {ignore_index}, "
            f"found {int(t.min())}..{int(t.max())}"
        )
    if p.size and (p.min() < 0 or p.max() >= num_labels):
        raise ValueError(
            f"predicted labels must be in 0..{num_labels - 1}, found {int(p.min())}..{int(p.max())}"
        )
    flat = np.bincount(t * num_labels + p, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels).astype(np.int64)


def segmentation_metrics(pixel_conf: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Dice and IoU per deposit label from an accumulated pixel confusion matrix.

    Label 0 (tissue / background) is reported but left out of the summary:
    what matters is whether deposits are found. ``mean_deposit_dice`` and
    ``mean_deposit_iou`` average labels 1.. that occur in the target or the
    prediction; a label absent from both has Dice/IoU None (nothing to score),
    while a label only predicted scores 0 (a false alarm counts).
    ``calcium_dice`` is the Dice of the label named "calcium" (label 1 if no
    label has that name). Support is the number of target pixels.
    """
    conf = np.asarray(pixel_conf, dtype=np.int64)
    names = list(label_names)
    d = len(names)
    if conf.shape != (d, d):
        raise ValueError(f"pixel_conf must be ({d}, {d}) for {d} labels, got {conf.shape}")
    tp = np.diag(conf)
    target = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    total = int(conf.sum())

    per_label: dict[str, dict[str, Any]] = {}
    deposit_dice: list[float] = []
    deposit_iou: list[float] = []
    for i, name in enumerate(names):
        denom = int(target[i] + predicted[i])
        dice = 2 * tp[i] / denom if denom else None
        iou = tp[i] / (denom - tp[i]) if denom else None
        per_label[name] = {
            "dice": _float_or_none(dice),
            "iou": _float_or_none(iou),
            "support": int(target[i]),
            "predicted": int(predicted[i]),
        }
        if i > 0 and dice is not None:
            deposit_dice.append(float(dice))
            deposit_iou.append(float(iou))
    calcium = "calcium" if "calcium" in per_label else (names[1] if d > 1 else None)
    return {
        "label_names": names,
        "total_pixels": total,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "mean_deposit_dice": float(np.mean(deposit_dice)) if deposit_dice else None,
        "mean_deposit_iou": float(np.mean(deposit_iou)) if deposit_iou else None,
        "calcium_dice": per_label[calcium]["dice"] if calcium else None,
        "per_label": per_label,
        "confusion": conf.tolist(),
    }


# --------------------------------------------------------------------------- #
# One evaluation
# --------------------------------------------------------------------------- #

#: Equal-width confidence bins of the calibration numbers and the reliability diagram.
N_BINS = 15


def evaluation_metrics(
    *,
    labels: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    stains: np.ndarray | None,
    stain_logits: np.ndarray | None,
    pixel_conf: np.ndarray | None,
    class_names: Sequence[str],
    stain_names: Sequence[str],
    deposit_labels: Sequence[str],
    baseline_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """Everything one evaluation measures, as JSON-able values.

    ``labels`` (N,) and ``logits`` (N, C) are the class head's; the class
    metrics use the calibrated probabilities softmax(logits / temperature).
    ``stains`` (N,) may hold -100 for an unknown stain: those samples are left
    out of the stain accuracy and grouped in the per-stain breakdown by the
    stain head's prediction instead (each group says how many of each).
    ``pixel_conf`` is the accumulated :func:`pixel_confusion` (None or all
    zeros when no masks were available). ``baseline_probs`` (N, C) are the
    colour baseline's on the same samples.

    Keys: n_samples, temperature, headline, classification, calibration,
    stain, segmentation, baseline.
    """
    class_names, stain_names = list(class_names), list(stain_names)
    _check_temperature(temperature)
    z, y = _check_logits_labels(logits, labels)
    if z.shape[1] != len(class_names):
        raise ValueError(f"logits have {z.shape[1]} columns but {len(class_names)} class names")
    probs = softmax(z, temperature)
    cls = classification_metrics(y, probs, class_names)
    calibration = _calibration(softmax(z), probs, y, class_names, temperature, cls["nll"])
    stain = stain_metrics(y, probs, stains, stain_logits, class_names, stain_names)
    seg = None
    if pixel_conf is not None and int(np.asarray(pixel_conf).sum()) > 0:
        seg = segmentation_metrics(pixel_conf, list(deposit_labels))
    baseline = None
    if baseline_probs is not None:
        bp = np.asarray(baseline_probs, dtype=np.float64)
        if bp.shape != probs.shape:
            raise ValueError(f"baseline_probs must have shape {probs.shape}, got {bp.shape}")
        baseline = classification_metrics(y, bp, class_names)
    headline = {
        "macro_f1": cls["macro_f1"],
        "accuracy": cls["accuracy"],
        "balanced_accuracy": cls["balanced_accuracy"],
        "macro_auc": cls["macro_auc"],
        "ece_before": calibration["ece_before"],
        "ece_after": calibration["ece_after"],
        "calcium_dice": seg["calcium_dice"] if seg else None,
        "mean_deposit_dice": seg["mean_deposit_dice"] if seg else None,
        "stain_accuracy": stain["accuracy"],
        "baseline_macro_f1": baseline["macro_f1"] if baseline else None,
    }
    return to_jsonable(
        {
            "n_samples": int(len(y)),
            "temperature": float(temperature),
            "headline": headline,
            "classification": cls,
            "calibration": calibration,
            "stain": stain,
            "segmentation": seg,
            "baseline": baseline,
        }
    )


def _calibration(
    probs_raw: np.ndarray,
    probs: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    temperature: float,
    nll_after: float | None,
) -> dict[str, Any]:
    """ECE, NLL and reliability bins before (T = 1) and after temperature scaling."""
    return {
        "temperature": float(temperature),
        "n_bins": N_BINS,
        # No patches, no calibration evidence: None rather than a reassuring 0.
        "ece_before": expected_calibration_error(probs_raw, y, N_BINS) if len(y) else None,
        "ece_after": expected_calibration_error(probs, y, N_BINS) if len(y) else None,
        "nll_before": classification_metrics(y, probs_raw, class_names)["nll"],
        "nll_after": nll_after,
        "reliability_before": reliability_bins(probs_raw, y, N_BINS),
        "reliability_after": reliability_bins(probs, y, N_BINS),
    }


def stain_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    stains: np.ndarray | None,
    stain_logits: np.ndarray | None,
    class_names: list[str],
    stain_names: list[str],
) -> dict[str, Any]:
    """Stain-head accuracy / confusion and the class head's results per stain."""
    n = len(y)
    s_true = (
        np.full(n, IGNORE_INDEX, dtype=np.int64)
        if stains is None
        else _as_numpy(stains).astype(np.int64).ravel()
    )
    if len(s_true) != n:
        raise ValueError(f"stains has {len(s_true)} entries but labels has {n}")
    n_s = len(stain_names)
    bad = (s_true != IGNORE_INDEX) & ((s_true < 0) | (s_true >= n_s))
    if bad.any():
        raise ValueError(
            f"stain indices must be in 0..{n_s - 1} or {IGNORE_INDEX}, found {np.unique(s_true[bad])}"
        )
    s_pred = None
    if stain_logits is not None:
        sl = np.asarray(stain_logits, dtype=np.float64)
        if sl.shape != (n, n_s):
            raise ValueError(f"stain_logits must have shape {(n, n_s)}, got {sl.shape}")
        s_pred = sl.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)

    known = s_true != IGNORE_INDEX
    accuracy = None
    confusion = None
    if s_pred is not None and known.any():
        accuracy = float(np.mean(s_pred[known] == s_true[known]))
        conf = np.zeros((n_s, n_s), dtype=np.int64)
        np.add.at(conf, (s_true[known], s_pred[known]), 1)
        confusion = conf.tolist()

    per_stain = _per_stain(y, probs, s_true, s_pred, class_names, stain_names)
    return {
        "stain_names": stain_names,
        "accuracy": accuracy,
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
        "confusion": confusion,
        "per_stain": per_stain,
        "grouping": "true stain where known, otherwise the stain head's prediction",
    }


def _per_stain(
    y: np.ndarray,
    probs: np.ndarray,
    s_true: np.ndarray,
    s_pred: np.ndarray | None,
    class_names: list[str],
    stain_names: list[str],
) -> dict[str, dict[str, Any]]:
    """The class head's accuracy and macro-F1 per stain.

    Each sample is grouped by its true stain where known, else by the stain
    head's guess, so unlabelled slides still show up per stain.
    """
    known = s_true != IGNORE_INDEX
    group = s_true.copy()
    source = np.where(known, "true", "unknown").astype(object)
    if s_pred is not None:
        group[~known] = s_pred[~known]
        source[~known] = "predicted"
    per_stain: dict[str, dict[str, Any]] = {}
    for j, name in [*enumerate(stain_names), (IGNORE_INDEX, "unknown")]:
        sel = group == j
        if not sel.any():
            continue
        m = classification_metrics(y[sel], probs[sel], class_names)
        per_stain[name] = {
            "n": int(sel.sum()),
            "n_true_stain": int(np.sum(sel & (source == "true"))),
            "n_predicted_stain": int(np.sum(sel & (source == "predicted"))),
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
        }
    return per_stain


# --------------------------------------------------------------------------- #
# Shifted test set comparison
# --------------------------------------------------------------------------- #

# Headline metrics compared between test sets, and whether higher is better.
_COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("macro_f1", "macro-F1", True),
    ("accuracy", "accuracy", True),
    ("balanced_accuracy", "balanced accuracy", True),
    ("macro_auc", "macro ROC AUC", True),
    ("ece_before", "ECE before temperature", False),
    ("ece_after", "ECE after temperature", False),
    ("calcium_dice", "calcium Dice", True),
    ("mean_deposit_dice", "mean deposit Dice", True),
    ("stain_accuracy", "stain accuracy", True),
    ("baseline_macro_f1", "colour baseline macro-F1", True),
)


def compare_reports(main: Mapping[str, Any], shifted: Mapping[str, Any]) -> dict[str, Any]:
    """Change of the headline metrics from the main test set to a shifted one.

    Takes two dicts as written to metrics.json (or just their
    ``headline`` parts). ``delta`` is shifted - main; ``worse`` says whether
    the change is for the worse (a higher ECE is worse). Per-class F1 deltas
    are included when both reports carry them.
    """
    a = main.get("headline", main)
    b = shifted.get("headline", shifted)
    rows: dict[str, dict[str, Any]] = {}
    for key, label, higher_better in _COMPARED:
        x, y = a.get(key), b.get(key)
        delta = None if x is None or y is None else float(y) - float(x)
        worse = None if delta is None else (delta < 0 if higher_better else delta > 0)
        rows[key] = {
            "label": label,
            "main": x,
            "shifted": y,
            "delta": delta,
            "higher_is_better": higher_better,
            "worse": worse,
        }
    per_class: dict[str, dict[str, Any]] = {}
    pa = main.get("classification", {}).get("per_class", {})
    pb = shifted.get("classification", {}).get("per_class", {})
    for name in pa:
        if name in pb:
            x, y = pa[name].get("f1"), pb[name].get("f1")
            per_class[name] = {
                "main": x,
                "shifted": y,
                "delta": None if x is None or y is None else float(y) - float(x),
            }
    return to_jsonable({"metrics": rows, "per_class_f1": per_class})


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_labels(labels: Any, n: int, c: int) -> np.ndarray:
    y = _as_numpy(labels).astype(np.int64).ravel()
    if len(y) != n:
        raise ValueError(f"{n} rows of scores but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise ValueError(
            f"class labels must be in 0..{c - 1}, found {int(y.min())}..{int(y.max())}"
        )
    return y


def _check_scores_labels(
    scores: Any, labels: Any, what: str = "probs"
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) finite float64 scores (``what``: logits or probs) and their N labels."""
    x = _as_numpy(scores).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be (N, C), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or inf")
    return x, _check_labels(labels, x.shape[0], x.shape[1])


def _check_logits_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    return _check_scores_labels(logits, labels, "logits")


def _check_probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    return _check_scores_labels(probs, labels, "probs")


def _float_or_none(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None
