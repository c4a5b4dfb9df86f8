"""Tests of calcinosis.training.metrics (calibration, classification and
segmentation metrics), the colour-only baseline (calcinosis.model.baseline)
and the written report (calcinosis.training.report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from calcinosis.model import baseline as B
from calcinosis.training import metrics as M
from calcinosis.training import report as R

# The project's names (calcinosis.model.labels), spelled out here because
# importing calcinosis.model loads torch and metrics must not need it.
CLASS_NAMES = ("calcinosis_cutis", "osteoma_cutis", "gout", "amyloidosis", "normal")
STAIN_NAMES = ("he", "von_kossa", "alizarin_red")
DEPOSIT_LABELS = ("tissue", "calcium", "bone", "urate", "amyloid")

# --------------------------------------------------------------------------- #
# softmax and temperature
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("module", ["metrics", "report"])
def test_metrics_and_report_do_not_import_torch(module):
    import subprocess
    import sys

    code = f"import sys, calcinosis.training.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_softmax_sums_to_one_and_is_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [1000.0, 1000.0, 1000.0], [-5e3, -5e3 + 1, -5e3 + 2]])
    p = M.softmax(z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, atol=1e-12)
    # Shift invariance: the third row is softmax([0, 1, 2]).
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(p[2], e / e.sum(), rtol=1e-12)
    # A higher temperature flattens the distribution.
    assert M.softmax(z[2:], temperature=10.0).max() < p[2].max()
    with pytest.raises(ValueError):
        M.softmax(z, temperature=0.0)


def _tempered_sample(t_true: float, n: int = 4000, c: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / t_true): a model that is
    over-confident by exactly the factor t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, size=(n, c))
    p = M.softmax(z, t_true)
    u = rng.random((n, 1))
    labels = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), c - 1)
    return z, labels


def test_fit_temperature_recovers_known_temperature():
    z, y = _tempered_sample(2.5)
    t = M.fit_temperature(z, y)
    assert abs(t - 2.5) / 2.5 < 0.15, t


def test_fit_temperature_edge_cases():
    assert M.fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=int)) == 1.0
    # Perfectly separable data: the NLL keeps falling as T -> 0, so the fit
    # stops at the lower bound instead of diverging.
    z = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 3.0
    t = M.fit_temperature(z, [0, 1, 2, 0, 1, 2])
    assert t == pytest.approx(M.T_MIN)
    with pytest.raises(ValueError):
        M.fit_temperature(np.zeros((2, 3)), [0, 3])


def test_temperature_scaling_reduces_ece_on_overconfident_logits():
    z, y = _tempered_sample(2.5, seed=1)
    ece_raw = M.expected_calibration_error(M.softmax(z), y)
    t = M.fit_temperature(z, y)
    ece_cal = M.expected_calibration_error(M.softmax(z, t), y)
    assert ece_raw > 0.1
    assert ece_cal < ece_raw / 3


# --------------------------------------------------------------------------- #
# ECE
# --------------------------------------------------------------------------- #


def test_ece_is_zero_for_perfectly_calibrated_bins():
    probs, labels = [], []
    # In each bin, a confidence c with exactly a share c of correct answers.
    for conf, n_right, n in [(0.95, 19, 20), (0.75, 15, 20), (0.55, 11, 20)]:
        probs += [[conf, 1 - conf]] * n
        labels += [0] * n_right + [1] * (n - n_right)
    assert M.expected_calibration_error(np.array(probs), np.array(labels)) < 1e-12


def test_ece_matches_hand_computed_example():
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 1])
    # bin (0.8, 0.9]: confidence 0.85, accuracy 0.5 -> weight 2/4 x 0.35
    # bin (0.6, 0.7]: confidence 0.65, accuracy 1.0 -> weight 2/4 x 0.35
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.35)
    bins = M.reliability_bins(probs, labels, n_bins=10)
    assert bins["count"].tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 2, 0]
    assert bins["accuracy"][8] == pytest.approx(0.5)
    assert bins["confidence"][6] == pytest.approx(0.65)
    assert np.isnan(bins["accuracy"][0])
    assert M.expected_calibration_error(np.zeros((0, 2)), np.zeros(0)) == 0.0


# --------------------------------------------------------------------------- #
# classification
# --------------------------------------------------------------------------- #


def _hand_example():
    names = ["a", "b", "c", "d"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), pred] = 0.7
    probs[1, 0] = 0.15  # make the scores differ so the AUCs are not all ties
    probs[1, 3] = 0.05
    return names, labels, pred, probs


def test_classification_metrics_hand_example():
    names, labels, pred, probs = _hand_example()
    m = M.classification_metrics(labels, probs, names)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    pc = m["per_class"]
    assert pc["a"]["f1"] == pytest.approx(0.5)
    assert pc["b"]["f1"] == pytest.approx(0.8)
    assert pc["c"]["f1"] == pytest.approx(2 / 3)
    assert pc["b"]["precision"] == pytest.approx(2 / 3)
    assert pc["c"]["recall"] == pytest.approx(0.5)
    assert pc["a"]["support"] == 2 and pc["b"]["predicted"] == 3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # class "d" never occurs: no recall, no F1, no AUC -- and no crash.
    assert pc["d"]["auc"] is None and pc["d"]["recall"] is None and pc["d"]["f1"] is None
    # b: positives score 0.7, 0.7; negatives 0.1, 0.7, 0.1, 0.1 -> 6 wins + 2 ties of 8
    assert pc["b"]["auc"] == pytest.approx(7 / 8)
    assert m["macro_auc"] is not None
    assert m["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(6), labels])))
    onehot = np.eye(4)[labels]
    assert m["brier"] == pytest.approx(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def test_classification_metrics_single_class_and_empty():
    m = M.classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["x", "y"])
    assert m["macro_auc"] is None and m["per_class"]["y"]["auc"] is None
    e = M.classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 2)), ["x", "y"])
    assert e["macro_f1"] is None and e["confusion_matrix"] == [[0, 0], [0, 0]]


# --------------------------------------------------------------------------- #
# segmentation
# --------------------------------------------------------------------------- #


def test_pixel_confusion_ignores_and_accumulates():
    target = np.array([[0, 1, 1], [2, -100, -100]])
    pred = np.array([[0, 1, 0], [2, 2, 1]])
    c = M.pixel_confusion(pred, target, 3)
    assert c.dtype == np.int64
    assert c.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    batch = M.pixel_confusion(np.stack([pred, pred]), np.stack([target, target]), 3)
    np.testing.assert_array_equal(batch, 2 * c)
    np.testing.assert_array_equal(c + c, batch)
    with pytest.raises(ValueError):
        M.pixel_confusion(pred, np.full_like(target, 7), 3)


def test_segmentation_dice_iou_hand_example():
    names = ["tissue", "calcium", "bone", "urate"]
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 0, 2, 0])
    s = M.segmentation_metrics(M.pixel_confusion(pred, target, 4), names)
    cal = s["per_label"]["calcium"]
    # calcium: TP 3, target 4, predicted 4 -> Dice 6/8, IoU 3/5
    assert cal["dice"] == pytest.approx(0.75) and cal["iou"] == pytest.approx(0.6)
    assert cal["support"] == 4 and cal["predicted"] == 4
    assert s["calcium_dice"] == pytest.approx(0.75)
    # bone is only predicted (a false alarm): Dice 0; urate nowhere: None.
    assert s["per_label"]["bone"]["dice"] == 0.0
    assert s["per_label"]["urate"]["dice"] is None and s["per_label"]["urate"]["iou"] is None
    assert s["mean_deposit_dice"] == pytest.approx((0.75 + 0.0) / 2)
    # tissue: TP 4, target 6, predicted 5 -> Dice 8/11, reported but not averaged
    assert s["per_label"]["tissue"]["dice"] == pytest.approx(8 / 11)
    assert s["pixel_accuracy"] == pytest.approx(0.7)


# --------------------------------------------------------------------------- #
# colour baseline
# --------------------------------------------------------------------------- #


def _patterned(kind: str, fg, bg, rng, size: int = 32) -> np.ndarray:
    """Two-colour patch with exactly half the pixels in each colour, drawn as
    vertical stripes or as a checkerboard of 2x2 dots; only the arrangement
    differs between the two kinds."""
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = rng.integers(0, 4, size=2)
    if kind == "stripes":
        on = ((xx + dx) // 2) % 2 == 0
    else:
        on = (((xx + dx) // 2) + ((yy + dy) // 2)) % 2 == 0
    img = np.where(on[..., None], np.asarray(fg, float), np.asarray(bg, float))
    img = img + rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _colour(rng, base) -> np.ndarray:
    return np.asarray(base, float) + rng.normal(0, 12, size=3)


def _dataset(task: str, n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    pink, purple, blue = (230, 150, 190), (110, 50, 140), (60, 90, 200)
    images, labels = [], []
    for i in range(2 * n_per_class):
        label = i % 2
        if task == "colour":  # same structure, different colours
            fg = _colour(rng, purple if label == 0 else blue)
            images.append(_patterned("stripes", fg, _colour(rng, pink), rng))
        else:  # same colours, different structure
            kind = "stripes" if label == 0 else "dots"
            images.append(_patterned(kind, _colour(rng, purple), _colour(rng, pink), rng))
        labels.append(label)
    return images, np.array(labels)


def test_colour_features_ignore_structure():
    rng = np.random.default_rng(0)
    img = _patterned("dots", (110, 50, 140), (230, 150, 190), rng)
    shuffled = rng.permutation(img.reshape(-1, 3)).reshape(img.shape)
    f = B.colour_histogram_features([img, shuffled, img[:16]])
    assert f.shape[0] == 3 and f.dtype == np.float32
    np.testing.assert_allclose(f[0], f[1], atol=1e-5)
    # Grey and RGBA inputs are accepted.
    assert B.colour_histogram_features([img[..., 0], np.dstack([img, img[..., :1]])]).shape[0] == 2


def test_colour_baseline_sees_colour_but_not_structure():
    x_tr, y_tr = _dataset("colour", 40, seed=1)
    x_te, y_te = _dataset("colour", 40, seed=2)
    pipe = B.fit_colour_baseline(x_tr, y_tr, seed=0)
    acc_colour = np.mean(pipe.predict(B.colour_histogram_features(x_te)) == y_te)
    assert acc_colour >= 0.95

    x_tr, y_tr = _dataset("structure", 40, seed=3)
    x_te, y_te = _dataset("structure", 40, seed=4)
    pipe = B.fit_colour_baseline(x_tr, y_tr, seed=0)
    probs = B.predict_colour_baseline(pipe, x_te, num_classes=3)
    assert probs.shape == (80, 3) and np.all(probs[:, 2] == 0)
    acc_structure = np.mean(probs.argmax(axis=1) == y_te)
    assert 0.3 <= acc_structure <= 0.7, acc_structure


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


def _fake_outputs(n: int = 90, seed: int = 0, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    c, s = len(CLASS_NAMES), len(STAIN_NAMES)
    labels = np.arange(n) % c
    logits = rng.normal(0, 1.5 + shift, size=(n, c))
    logits[np.arange(n), labels] += 3.0 - 2 * shift  # a decent but over-confident model
    stains = (np.arange(n) // c) % s
    stains[::7] = -100  # some slides without a recorded stain
    stain_logits = rng.normal(0, 1, size=(n, s))
    stain_logits[np.arange(n), np.where(stains >= 0, stains, 0)] += 2.5
    target = np.stack([(np.arange(16 * 16).reshape(16, 16) + k) % 5 for k in range(4)])
    pred = np.where(rng.random(target.shape) < 0.8 - shift, target, 0)
    pixel_conf = M.pixel_confusion(pred, target, len(DEPOSIT_LABELS))
    baseline = M.softmax(rng.normal(0, 1, size=(n, c)))
    return labels, logits, stains, stain_logits, pixel_conf, baseline


def _report(out_dir, outputs, **kw):
    labels, logits, stains, stain_logits, pixel_conf, baseline = outputs
    return R.write_report(
        out_dir,
        labels=labels,
        logits=logits,
        temperature=kw.pop("temperature", 1.7),
        stains=stains,
        stain_logits=stain_logits,
        pixel_conf=pixel_conf,
        class_names=CLASS_NAMES,
        stain_names=STAIN_NAMES,
        deposit_labels=DEPOSIT_LABELS,
        baseline_probs=baseline,
        **kw,
    )


def test_write_report_writes_all_files(tmp_path):
    outputs = _fake_outputs()
    m = _report(tmp_path / "rep", outputs, title="Test set", extra={"Notes": "hello *world*"})
    out = tmp_path / "rep"
    for name in ["metrics.json", "report.md", "confusion_matrix.png", "reliability.png", "roc.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp"))

    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data == m
    for key in [
        "headline",
        "classification",
        "calibration",
        "stain",
        "segmentation",
        "baseline",
        "extra",
    ]:
        assert key in data, key
    h = data["headline"]
    for key in [
        "macro_f1",
        "accuracy",
        "ece_before",
        "ece_after",
        "calcium_dice",
        "stain_accuracy",
    ]:
        assert isinstance(h[key], float), key
    assert isinstance(h["baseline_macro_f1"], float)
    assert data["temperature"] == 1.7
    assert set(data["classification"]["per_class"]) == set(CLASS_NAMES)

    # Unknown (-100) stains: left out of stain accuracy, grouped by the prediction.
    labels, _, stains, stain_logits, _, _ = outputs
    known = stains != -100
    expected = np.mean(stain_logits[known].argmax(axis=1) == stains[known])
    assert data["stain"]["accuracy"] == pytest.approx(expected)
    assert data["stain"]["n_unknown"] == int((~known).sum())
    per = data["stain"]["per_stain"]
    assert sum(r["n"] for r in per.values()) == len(labels)
    assert sum(r["n_predicted_stain"] for r in per.values()) == int((~known).sum())

    md = (out / "report.md").read_text()
    for needle in [
        "# Test set",
        "macro-F1",
        "ECE after temperature",
        "calcium Dice",
        "colour-only baseline macro-F1",
        "![Reliability diagram](reliability.png)",
        "## Notes",
        "hello *world*",
        "calcinosis_cutis",
        "von_kossa",
    ]:
        assert needle in md, needle

    for name in ["confusion_matrix.png", "reliability.png", "roc.png"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            w, h_px = im.size
            assert 400 <= w <= 2000 and 300 <= h_px <= 2000, (name, im.size)
            arr = np.asarray(im.convert("L"))
            assert arr.std() > 5  # not a blank canvas


def test_write_report_without_stain_labels_or_masks(tmp_path):
    labels, logits, stains, stain_logits, _, _ = _fake_outputs(n=30)
    m = R.write_report(
        tmp_path,
        labels=labels,
        logits=logits,
        temperature=1.0,
        stains=np.full_like(stains, -100),
        stain_logits=stain_logits,
        pixel_conf=np.zeros((5, 5), dtype=np.int64),
        class_names=CLASS_NAMES,
        stain_names=STAIN_NAMES,
        deposit_labels=DEPOSIT_LABELS,
    )
    assert m["stain"]["accuracy"] is None and m["stain"]["n_known"] == 0
    assert all(r["n_true_stain"] == 0 for r in m["stain"]["per_stain"].values())
    assert m["segmentation"] is None and m["headline"]["calcium_dice"] is None
    assert m["baseline"] is None
    assert m["calibration"]["ece_before"] == m["calibration"]["ece_after"]
    json.loads((tmp_path / "metrics.json").read_text())
    assert "No pixel masks" in (tmp_path / "report.md").read_text()


def test_compare_reports_shows_the_drop(tmp_path):
    main = _report(tmp_path / "main", _fake_outputs(seed=0))
    shifted = _report(tmp_path / "shift", _fake_outputs(seed=5, shift=0.6))
    cmp = M.compare_reports(main, shifted)
    f1 = cmp["metrics"]["macro_f1"]
    assert f1["delta"] == pytest.approx(f1["shifted"] - f1["main"])
    assert f1["delta"] < 0 and f1["worse"] is True
    assert cmp["metrics"]["calcium_dice"]["worse"] is True
    assert set(cmp["per_class_f1"]) == set(CLASS_NAMES)
    md = R.comparison_markdown(cmp, "lab A", "lab B")
    assert "| macro-F1 |" in md and "lab B" in md and "(worse)" in md
    json.dumps(cmp, allow_nan=False)
