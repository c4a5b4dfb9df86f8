"""Metrics, temperature calibration and the evaluation report.

Everything here works on plain numpy arrays (the outputs that
``collect_outputs`` gathers), so it can be tested without torch and reused on
logits that came from anywhere (a checkpoint, an ONNX export, another lab).

Three questions the report answers for a pathologist reading it:

1. Does the class head separate calcinosis cutis from its mimics?
   (per-class precision / recall / F1, macro-F1, one-vs-rest ROC AUC,
   confusion matrix)
2. Can its probabilities be trusted? (expected calibration error before and
   after temperature scaling, reliability diagram, NLL, Brier score)
3. Does it see more than colour? A logistic regression on colour histograms
   alone is the yardstick: in von Kossa and Alizarin red, calcium and bone are
   both positive, in H&E gout and amyloid are both pale pink, so only structure
   separates them. The gap between the network's macro-F1 and the colour
   baseline's is what the network adds.

Plots are drawn with matplotlib's Agg canvas on ``Figure`` objects directly, so
importing this module never changes the process-wide matplotlib backend and no
pyplot figures are left open.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "softmax",
    "fit_temperature",
    "reliability_bins",
    "expected_calibration_error",
    "classification_metrics",
    "pixel_confusion",
    "segmentation_metrics",
    "colour_histogram_features",
    "fit_colour_baseline",
    "predict_colour_baseline",
    "write_report",
    "compare_reports",
    "comparison_markdown",
    "to_jsonable",
]

#: Target value that marks "no label here" (unknown stain, pixel without mask).
#: Same value as ``calcinosis.training.data.IGNORE_INDEX`` and torch's default.
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
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size == 0:
        return z.copy()
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


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
    from sklearn.metrics import confusion_matrix, roc_auc_score

    names = list(class_names)
    p, y = _check_probs_labels(probs, labels)
    n, c = len(y), len(names)
    if p.shape[1] != c:
        raise ValueError(f"probs have {p.shape[1]} columns but {c} class names were given")

    per_class: dict[str, dict[str, Any]] = {}
    if n == 0:
        for name in names:
            per_class[name] = dict.fromkeys(("precision", "recall", "f1", "auc"))
            per_class[name].update(support=0, predicted=0)
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

    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(c)))
    tp = np.diag(cm)
    true_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)

    f1s: list[float] = []
    recalls: list[float] = []
    aucs: list[float] = []
    for i, name in enumerate(names):
        precision = tp[i] / pred_count[i] if pred_count[i] else None
        recall = tp[i] / true_count[i] if true_count[i] else None
        denom = true_count[i] + pred_count[i]
        f1 = 2 * tp[i] / denom if denom else None
        positives = y == i
        # ROC AUC needs both positives and negatives of this class.
        auc = None
        if 0 < positives.sum() < n:
            auc = float(roc_auc_score(positives, p[:, i]))
            aucs.append(auc)
        if f1 is not None:
            f1s.append(float(f1))
        if recall is not None:
            recalls.append(float(recall))
        per_class[name] = {
            "precision": _float_or_none(precision),
            "recall": _float_or_none(recall),
            "f1": _float_or_none(f1),
            "support": int(true_count[i]),
            "predicted": int(pred_count[i]),
            "auc": auc,
        }

    p_true = np.clip(p[np.arange(n), y], _EPS, 1.0)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    return {
        "n": int(n),
        "class_names": names,
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "nll": float(-np.mean(np.log(p_true))),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
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
# Colour-only baseline
# --------------------------------------------------------------------------- #

_HIST_BINS = 16  # per-channel bins of the marginal histograms
_JOINT_BINS = 4  # per-channel bins of the joint RGB histogram (4^3 = 64 cells)


def colour_histogram_features(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Colour-only features, one row per image (float32, 172 columns).

    Per image: 16-bin marginal histograms of R, G, B and of H, S, V (as
    fractions of pixels), a 4x4x4 joint RGB histogram, and the mean and
    standard deviation of each of the six channels. Every feature is a
    function of the multiset of pixel colours only, so shuffling the pixels of
    an image leaves its features unchanged: whatever this baseline gets right,
    colour alone was enough for. Images may differ in size; grey (H, W) and
    RGBA images are accepted (alpha is dropped).
    """
    from matplotlib.colors import rgb_to_hsv

    rows = []
    for k, img in enumerate(images):
        a = np.asarray(img)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"image {k}: expected (H, W, 3) RGB, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise ValueError(f"image {k}: expected uint8, got {a.dtype}")
        rgb = a[..., :3].reshape(-1, 3)
        if rgb.shape[0] == 0:
            raise ValueError(f"image {k} is empty")
        n = float(rgb.shape[0])
        q = (rgb.astype(np.int64) * _HIST_BINS) // 256
        rgb_hist = [np.bincount(q[:, c], minlength=_HIST_BINS) / n for c in range(3)]
        hsv = rgb_to_hsv(rgb.astype(np.float32) / 255.0)
        qh = np.minimum((hsv * _HIST_BINS).astype(np.int64), _HIST_BINS - 1)
        hsv_hist = [np.bincount(qh[:, c], minlength=_HIST_BINS) / n for c in range(3)]
        qj = (rgb.astype(np.int64) * _JOINT_BINS) // 256
        cell = (qj[:, 0] * _JOINT_BINS + qj[:, 1]) * _JOINT_BINS + qj[:, 2]
        joint = np.bincount(cell, minlength=_JOINT_BINS**3) / n
        chans = np.concatenate([rgb.astype(np.float32) / 255.0, hsv], axis=1)
        rows.append(
            np.concatenate(
                [*rgb_hist, *hsv_hist, joint, chans.mean(axis=0), chans.std(axis=0)]
            ).astype(np.float32)
        )
    if not rows:
        return np.zeros((0, 6 * _HIST_BINS + _JOINT_BINS**3 + 12), dtype=np.float32)
    return np.stack(rows)


def fit_colour_baseline(
    train_images: Sequence[np.ndarray] | np.ndarray,
    train_labels: Sequence[int] | np.ndarray,
    seed: int = 0,
) -> Any:
    """Fit StandardScaler + LogisticRegression on :func:`colour_histogram_features`.

    Returns the fitted scikit-learn ``Pipeline``; use
    :func:`predict_colour_baseline` to get probabilities laid out like the
    network's (one column per class index, even for classes missing from the
    training set).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = colour_histogram_features(train_images)
    y = np.asarray(train_labels)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError(
            "the colour baseline needs training images of at least two classes, "
            f"got labels {np.unique(y).tolist()}"
        )
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            # C=1 keeps the 172 correlated histogram features from being fitted
            # to noise; max_iter is generous because lbfgs converges slowly on
            # near-collinear histogram bins.
            ("logreg", LogisticRegression(C=1.0, max_iter=5000, random_state=seed)),
        ]
    )
    pipe.fit(x, y)
    return pipe


def predict_colour_baseline(
    pipeline: Any, images: Sequence[np.ndarray] | np.ndarray, num_classes: int
) -> np.ndarray:
    """(N, num_classes) probabilities of a baseline fitted on integer labels.

    Columns of classes that the baseline never saw in training are 0.
    """
    x = colour_histogram_features(images)
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    if len(x):
        proba = pipeline.predict_proba(x)
        cols = np.asarray(pipeline.classes_, dtype=np.int64)
        out[:, cols] = proba
    return out


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def write_report(
    out_dir: str | Path,
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
    title: str = "Evaluation",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute every metric and write ``metrics.json``, ``report.md`` and three plots.

    ``labels`` (N,) and ``logits`` (N, C) are the class head's; the class
    metrics use the calibrated probabilities softmax(logits / temperature).
    ``stains`` (N,) may hold -100 for an unknown stain: those samples are left
    out of the stain accuracy and grouped in the per-stain breakdown by the
    stain head's prediction instead (each group says how many of each).
    ``pixel_conf`` is the accumulated :func:`pixel_confusion` (None or all
    zeros when no masks were available). ``baseline_probs`` (N, C) are the
    colour baseline's on the same samples. ``extra`` maps a section title to a
    markdown string (written as is) or to a JSON-able value (written as JSON);
    all of it is also stored in metrics.json.

    Returns the metrics dict exactly as written to metrics.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    class_names = list(class_names)
    stain_names = list(stain_names)
    deposit_labels = list(deposit_labels)
    _check_temperature(temperature)

    z, y = _check_logits_labels(logits, labels)
    if z.shape[1] != len(class_names):
        raise ValueError(f"logits have {z.shape[1]} columns but {len(class_names)} class names")
    probs_raw = softmax(z)
    probs = softmax(z, temperature)
    cls = classification_metrics(y, probs, class_names)
    n_bins = 15
    rel_before = reliability_bins(probs_raw, y, n_bins)
    rel_after = reliability_bins(probs, y, n_bins)
    calibration = {
        "temperature": float(temperature),
        "n_bins": n_bins,
        # No patches, no calibration evidence: None rather than a reassuring 0.
        "ece_before": expected_calibration_error(probs_raw, y, n_bins) if len(y) else None,
        "ece_after": expected_calibration_error(probs, y, n_bins) if len(y) else None,
        "nll_before": classification_metrics(y, probs_raw, class_names)["nll"],
        "nll_after": cls["nll"],
        "reliability_before": rel_before,
        "reliability_after": rel_after,
    }

    stain = _stain_metrics(y, probs, stains, stain_logits, class_names, stain_names)

    seg = None
    if pixel_conf is not None and int(np.asarray(pixel_conf).sum()) > 0:
        seg = segmentation_metrics(pixel_conf, deposit_labels)

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
    files = {
        "metrics": "metrics.json",
        "report": "report.md",
        "confusion_matrix": "confusion_matrix.png",
        "reliability": "reliability.png",
        "roc": "roc.png",
    }
    metrics = to_jsonable(
        {
            "title": title,
            "n_samples": int(len(y)),
            "temperature": float(temperature),
            "headline": headline,
            "classification": cls,
            "calibration": calibration,
            "stain": stain,
            "segmentation": seg,
            "baseline": baseline,
            "extra": dict(extra) if extra else {},
            "files": files,
        }
    )

    _plot_confusion(out / files["confusion_matrix"], cls, title)
    _plot_reliability(out / files["reliability"], rel_before, rel_after, calibration)
    _plot_roc(out / files["roc"], y, probs, cls, title)
    _write_text(out / files["report"], _report_markdown(metrics, extra))
    _write_text(
        out / files["metrics"], json.dumps(metrics, indent=2, allow_nan=False, sort_keys=False)
    )
    return metrics


def _stain_metrics(
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

    # Group each sample by its true stain where known, else by the stain
    # head's guess, so unlabelled slides still show up per stain.
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
    return {
        "stain_names": stain_names,
        "accuracy": accuracy,
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
        "confusion": confusion,
        "per_stain": per_stain,
        "grouping": "true stain where known, otherwise the stain head's prediction",
    }


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

    Takes two dicts returned by :func:`write_report` (or just their
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
    h = m["headline"]
    cal = m["calibration"]
    stain = m["stain"]
    seg = m["segmentation"]
    cls = m["classification"]
    t = m["temperature"]
    stain_acc = _fmt(h["stain_accuracy"])
    if h["stain_accuracy"] is not None:
        stain_acc += f" (n={stain['n_known']} with known stain)"
    out = [
        f"# {m['title']}",
        "",
        f"{m['n_samples']} patches. Class metrics use calibrated probabilities "
        f"softmax(logits / T) with T = {t:.3f}; the temperature changes confidence, "
        "never the predicted class.",
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

    out += [
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
    out += [
        "",
        "Rows of the confusion matrix are the true classes, columns the predicted ones.",
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "![ROC curves](roc.png)",
        "",
        "## Calibration",
        "",
        f"Expected calibration error (top label, {cal['n_bins']} equal-width bins) "
        f"{_fmt(cal['ece_before'])} before and {_fmt(cal['ece_after'])} after temperature "
        f"scaling (T = {t:.3f}). If T was fitted on this same set, the 'after' value is optimistic.",
        "",
        "![Reliability diagram](reliability.png)",
        "",
        "## Per stain",
        "",
    ]
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
    if stain["confusion"] is not None:
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
        out.append("")
    else:
        out += ["No stain labels (or no stain head outputs): stain accuracy not measured.", ""]

    out += ["## Deposit segmentation", ""]
    if seg is None:
        out += ["No pixel masks in this set: Dice and IoU not measured.", ""]
    else:
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
        out.append("")

    base = m["baseline"]
    if base is not None:
        out += [
            "## Colour-only baseline",
            "",
            f"macro-F1 {_fmt(base['macro_f1'])}, accuracy {_fmt(base['accuracy'])}.",
            "",
            "| class | baseline F1 | network F1 |",
            "|---|---:|---:|",
        ]
        for name, r in base["per_class"].items():
            out.append(f"| {name} | {_fmt(r['f1'])} | {_fmt(cls['per_class'][name]['f1'])} |")
        out.append("")

    for section, value in (extra or {}).items():
        out += [f"## {section}", ""]
        if isinstance(value, str):
            out += [value.rstrip(), ""]
        else:
            out += ["```json", json.dumps(to_jsonable(value), indent=2), "```", ""]
    return "\n".join(out)


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
# Helpers
# --------------------------------------------------------------------------- #


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy values, tuples and paths into JSON types; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


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


def _check_logits_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = _as_numpy(logits).astype(np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf")
    return z, _check_labels(labels, z.shape[0], z.shape[1])


def _check_probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_numpy(probs).astype(np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    return p, _check_labels(labels, p.shape[0], p.shape[1])


def _float_or_none(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def _fmt_delta(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):+.3f}"


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _write_text(path: Path, text: str) -> None:
    # Write beside the target and rename, so a reader never sees half a file.
    from calcinosis.model.fileio import atomic_write_text

    atomic_write_text(path, text)
