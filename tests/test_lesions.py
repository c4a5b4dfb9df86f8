"""Lesion-level region calls: deposits found as lesions, and the region called by them.

The unit tests drive ``lesions.find_lesions`` / ``region_call`` with hand-made
label maps and tile probabilities; the end-to-end tests run a region through
``Predictor`` with a deterministic engine (a random-weight network segments
nothing meaningful) that sees a dark blue-purple nodule as calcium.
"""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from calcinosis.inference.lesions import (
    find_lesions,
    lesion_columns,
    lesion_row,
    min_area_px,
    region_call,
    to_frame,
)
from calcinosis.inference.tiling import tile_grid
from calcinosis.model.labels import BONE, CALCIUM, CLASS_NAMES, DEPOSIT_LABELS, INDETERMINATE

MPP = 0.5
TILE = 64
OVERLAP = 16
THRESHOLD = 0.6  # indeterminate threshold of these tests


def probs(**p: float) -> np.ndarray:
    """A probability vector over CLASS_NAMES; unnamed classes share the rest."""
    rest = [c for c in CLASS_NAMES if c not in p]
    left = (1.0 - sum(p.values())) / max(1, len(rest))
    return np.array([p.get(c, left) for c in CLASS_NAMES])


NORMAL_TILE = probs(normal=0.9)


def tiles_for(lm: np.ndarray, rule) -> tuple[np.ndarray, np.ndarray]:
    """The tile grid over ``lm`` and each tile's probabilities: ``rule(window)`` or normal."""
    boxes, ps = [], []
    for y0, x0 in tile_grid(lm.shape, TILE, OVERLAP):
        boxes.append((y0, x0, TILE))
        p = rule(lm[y0 : y0 + TILE, x0 : x0 + TILE])
        ps.append(NORMAL_TILE if p is None else p)
    return np.array(boxes), np.array(ps)


def calcium_tiles(win: np.ndarray):
    return probs(calcinosis_cutis=0.8, normal=0.1) if (win == CALCIUM).any() else None


def lesions_of(lm: np.ndarray, boxes: np.ndarray, ps: np.ndarray, **kw):
    """``find_lesions`` on ``lm`` with the tiles' boxes and probabilities, at the test's mpp."""
    return find_lesions(
        lm,
        mpp=MPP,
        class_names=CLASS_NAMES,
        deposit_labels=DEPOSIT_LABELS,
        tile_boxes=boxes,
        tile_probs=ps,
        **kw,
    )


def find(lm: np.ndarray, rule=calcium_tiles, **kw):
    boxes, ps = tiles_for(lm, rule)
    found = lesions_of(lm, boxes, ps, **kw)
    mean = dict(zip(CLASS_NAMES, ps.mean(0), strict=True))
    call = region_call(found.lesions, mean, CLASS_NAMES, indeterminate_threshold=THRESHOLD)
    return found, call, mean


def disc(lm: np.ndarray, cx: int, cy: int, r: int, value: int) -> int:
    cv2.circle(lm, (cx, cy), r, int(value), -1)
    return int((lm == value).sum())


# --------------------------------------------------------------------------- unit


def test_one_small_calcium_nodule_in_normal_tissue_is_calcinosis():
    lm = np.zeros((1024, 1024), np.uint8)
    n_px = disc(lm, 500, 300, 20, CALCIUM)
    found, call, mean = find(lm)
    assert mean["normal"] > 0.85  # what the old tile-mean rule called the region
    assert len(found.lesions) == 1
    les = found.lesions[0]
    assert les["id"] == 1 and les["label"] == "calcium" and les["passed"]
    assert les["area_px"] == n_px and les["area_um2"] == pytest.approx(n_px * MPP**2)
    assert les["centroid"] == pytest.approx([500.5, 300.5], abs=0.01)
    assert les["bbox"] == [480, 280, 41, 41]
    assert les["label_fractions"]["calcium"] == 1.0
    assert les["prediction"] == "calcinosis_cutis"
    assert les["probabilities"]["calcinosis_cutis"] == pytest.approx(0.8)  # only its own tiles
    assert les["confidence"] == pytest.approx(0.9)
    assert les["class_probability"] == pytest.approx(0.8 / 0.9)
    assert 1 <= les["tiles"] <= 4
    assert call["prediction"] == "calcinosis_cutis" and call["status"] == "ok"
    assert call["basis"] == "lesions" and call["also_present"] == []
    assert call["probabilities"]["calcinosis_cutis"] == pytest.approx(0.8)


def test_specks_below_the_minimum_area_are_ignored():
    lm = np.zeros((512, 512), np.uint8)
    need = min_area_px(MPP)  # 100 µm² at 0.5 µm/px
    assert need == 400
    lm[10:13, 10:13] = CALCIUM  # 2.25 µm²: a speck
    lm[100:119, 100:121] = CALCIUM  # 19 x 21 = 399 px: just below
    lm[300:320, 300:320] = CALCIUM  # 20 x 20 = 400 px: a lesion
    found, call, _ = find(lm)
    assert [les["area_px"] for les in found.lesions] == [400]
    assert found.lesions[0]["bbox"] == [300, 300, 20, 20]
    # A larger minimum (checkpoint metadata's min_lesion_area_um2) drops it too.
    found, _, _ = find(lm, min_area_um2=150.0)
    assert found.lesions == []


def test_no_lesions_is_normal_with_the_tile_mean():
    lm = np.zeros((512, 512), np.uint8)
    found, call, mean = find(lm)
    assert found.lesions == [] and found.components == []
    assert call["prediction"] == "normal" and call["status"] == "ok"
    assert call["basis"] == "no_lesion" and call["also_present"] == []
    assert call["probabilities"] == pytest.approx(mean)


def test_two_classes_the_stronger_wins_and_the_other_is_listed():
    lm = np.zeros((1024, 1024), np.uint8)
    disc(lm, 200, 200, 15, CALCIUM)
    bone_px = disc(lm, 700, 700, 40, BONE)

    def rule(win):
        if (win == BONE).any():
            return probs(osteoma_cutis=0.85, normal=0.05)
        return calcium_tiles(win)

    found, call, _ = find(lm, rule)
    assert [les["prediction"] for les in found.lesions] == ["osteoma_cutis", "calcinosis_cutis"]
    assert found.lesions[0]["area_px"] == bone_px and found.lesions[0]["label"] == "bone"
    assert call["prediction"] == "osteoma_cutis" and call["status"] == "ok"
    assert call["also_present"] == ["calcinosis_cutis"]
    present = {g["class"]: g for g in call["classes_present"]}
    assert present["osteoma_cutis"]["evidence"] > present["calcinosis_cutis"]["evidence"] > 0
    assert present["calcinosis_cutis"]["lesions"] == 1
    # Evidence is area x confidence: the calcium nodule wins once it is the larger.
    lm2 = np.zeros((1024, 1024), np.uint8)
    disc(lm2, 200, 200, 50, CALCIUM)
    disc(lm2, 700, 700, 20, BONE)
    _, call2, _ = find(lm2, rule)
    assert call2["prediction"] == "calcinosis_cutis" and call2["also_present"] == ["osteoma_cutis"]


def test_a_rim_of_another_label_stays_one_lesion_of_the_majority_label():
    lm = np.zeros((512, 512), np.uint8)
    cv2.circle(lm, (250, 250), 30, BONE, -1)
    cv2.circle(lm, (250, 250), 27, CALCIUM, -1)  # calcium with a thin bone rim
    found, call, _ = find(lm)
    assert len(found.lesions) == 1
    les = found.lesions[0]
    assert les["label"] == "calcium" and les["label_value"] == CALCIUM
    assert 0.1 < les["label_fractions"]["bone"] < 0.25
    assert sum(les["label_fractions"].values()) == pytest.approx(1.0)
    assert les["area_px"] == int((lm > 0).sum())
    assert call["prediction"] == "calcinosis_cutis"


def test_weak_evidence_is_indeterminate_not_normal():
    lm = np.zeros((512, 512), np.uint8)
    disc(lm, 250, 250, 20, CALCIUM)
    # The lesion's tiles doubt it (confidence 0.45 < the lesion threshold 0.5): it does not
    # pass, but normal at 0.55 is below the indeterminate threshold, so no "normal" call.
    found, call, mean = find(
        lm, lambda w: probs(calcinosis_cutis=0.4, normal=0.55) if w.any() else None
    )
    assert not found.lesions[0]["passed"]
    assert mean["normal"] > THRESHOLD
    assert call["prediction"] == INDETERMINATE and call["basis"] == "no_lesion"
    assert "lesion 1" in call["reason"]
    # A lesion that passes but whose class is unsure: indeterminate, never normal.
    unsure = probs(calcinosis_cutis=0.35, osteoma_cutis=0.3, normal=0.3)
    found, call, _ = find(lm, lambda w: unsure if w.any() else None)
    assert found.lesions[0]["passed"]
    assert call["prediction"] == INDETERMINATE and call["lesion_class"] == "calcinosis_cutis"
    # Far from any deposit, tiles that favour a deposit class make "normal" doubtful too.
    empty = np.zeros((256, 256), np.uint8)
    _, call, _ = find(empty, lambda w: probs(gout=0.7, normal=0.1))
    assert call["prediction"] == INDETERMINATE and "tiles" in call["reason"]


def test_out_of_focus_tiles_give_probabilities_but_no_pass_and_deposit_probability():
    lm = np.zeros((256, 256), np.uint8)
    disc(lm, 128, 128, 20, CALCIUM)
    boxes, ps = tiles_for(lm, calcium_tiles)
    dp = np.full(lm.shape, 200, np.uint8)
    found = lesions_of(lm, boxes, ps, tile_in_focus=np.zeros(len(boxes), bool), deposit_prob=dp)
    les = found.lesions[0]
    assert not les["in_focus"] and not les["passed"]
    assert les["prediction"] == "calcinosis_cutis"
    assert les["deposit_probability"] == pytest.approx(200 / 255)


def test_frame_and_table_rows():
    lm = np.zeros((256, 256), np.uint8)
    disc(lm, 100, 60, 20, CALCIUM)
    found, _, _ = find(lm)
    les = found.lesions[0]
    area = les["area_px"]
    to_frame(found.lesions, (1000.0, 2000.0), 4.0)
    assert les["centroid"] == pytest.approx([1000 + 100.5 * 4, 2000 + 60.5 * 4], abs=0.05)
    assert les["bbox"] == [1000 + 80 * 4, 2000 + 40 * 4, 41 * 4, 41 * 4]
    assert les["area_px"] == area * 16
    cols = lesion_columns(CLASS_NAMES, DEPOSIT_LABELS)
    row = lesion_row(les)
    assert set(row) <= set(cols) | {"label_value"}
    assert row["p_calcinosis_cutis"] == les["probabilities"]["calcinosis_cutis"]
    assert row["frac_calcium"] == 1.0 and row["bbox_w"] == 41 * 4


def test_large_map_is_handled_in_bands():
    """An 8192 x 8192 map with many deposits: one component image, no per-lesion masks."""
    lm = np.zeros((8192, 8192), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(300):
        x, y = (int(v) for v in rng.integers(50, 8140, 2))
        cv2.circle(lm, (x, y), int(rng.integers(2, 30)), int(rng.integers(1, 5)), -1)
    n_comp = cv2.connectedComponents(lm, connectivity=8)[0] - 1
    boxes = np.array([(y, x, 512) for y, x in tile_grid(lm.shape, 512, 0)])
    ps = np.tile(probs(calcinosis_cutis=0.7, normal=0.2), (len(boxes), 1))
    found = lesions_of(lm, boxes, ps)
    assert 0 < len(found.lesions) <= n_comp
    assert all(les["area_px"] >= 400 for les in found.lesions)
    ev = [les["evidence"] for les in found.lesions]
    assert ev == sorted(ev, reverse=True)
    assert [les["id"] for les in found.lesions] == list(range(1, len(ev) + 1))


# --------------------------------------------------------------------------- end to end

PINK = (225, 150, 190)
PURPLE = (70, 40, 120)


def nodule_region(side: int = 1024, centre=(600, 400), radius: int = 20):
    """A pink, textured field with one dark blue-purple nodule (~40 px across)."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(PINK, 14, (side, side, 3)), 0, 255).astype(np.uint8)
    cv2.circle(img, centre, radius, PURPLE, -1)
    truth = np.zeros((side, side), np.uint8)
    cv2.circle(truth, centre, radius, 1, -1)
    return img, truth


class NoduleEngine:
    """Calls dark blue-purple pixels calcium and tiles with enough of them calcinosis."""

    def __init__(self, mean, std) -> None:
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, nhwc: np.ndarray):
        rgb = nhwc * self.std + self.mean  # back to [0, 1]
        dark = (rgb[..., 0] < 0.45) & (rgb[..., 1] < 0.35)  # (N, H, W)
        n = nhwc.shape[0]
        frac = dark.reshape(n, -1).mean(1)
        cls = np.zeros((n, len(CLASS_NAMES)), np.float32)
        cls[:, CLASS_NAMES.index("normal")] = np.where(frac > 0.02, 0.0, 4.0)
        cls[:, CLASS_NAMES.index("calcinosis_cutis")] = np.where(frac > 0.02, 4.0, 0.0)
        seg = np.zeros((n, len(DEPOSIT_LABELS), *dark.shape[1:]), np.float32)
        seg[:, 0] = np.where(dark, 0.0, 4.0)
        seg[:, CALCIUM] = np.where(dark, 4.0, 0.0)
        return cls, np.zeros((n, 3), np.float32), seg


@pytest.fixture(scope="module")
def nodule_predictor(tmp_path_factory, tiny_checkpoint_factory):
    from calcinosis.inference.predictor import Predictor

    ckpt = tiny_checkpoint_factory(
        tmp_path_factory.mktemp("lesion_ckpt") / "t.safetensors", TILE, 1.0
    )
    pred = Predictor.from_checkpoint(ckpt, indeterminate_threshold=THRESHOLD, batch_size=64)
    pred.engine = NoduleEngine(pred.mean, pred.std)
    return pred


def test_predictor_calls_a_region_with_one_small_nodule_calcinosis(nodule_predictor):
    img, truth = nodule_region()
    res = nodule_predictor.predict(img, mpp=MPP)
    assert res.mode == "region"
    assert res.region["tile_mean_probabilities"]["normal"] > 0.9  # the old answer
    assert res.prediction == "calcinosis_cutis" and res.status == "ok"
    assert res.probabilities["calcinosis_cutis"] > 0.9
    assert res.region["also_present"] == [] and res.region["lesions_passed"] == 1
    assert len(res.lesions) == 1
    les = res.lesions[0]
    n_px = int(truth.sum())
    assert abs(les["area_px"] - n_px) <= 0.02 * n_px
    assert les["area_um2"] == pytest.approx(les["area_px"] * MPP**2)
    assert les["centroid"] == pytest.approx([600.5, 400.5], abs=1.0)
    assert les["label"] == "calcium" and les["prediction"] == "calcinosis_cutis"
    assert les["deposit_probability"] > 0.9
    json.dumps(res.to_dict())
    assert "lesion_components" not in res.to_dict()


def test_predict_cli_writes_lesions_to_json_csv_and_geojson(
    nodule_predictor, tmp_path, monkeypatch
):
    import calcinosis.inference.predict as predict_mod
    from calcinosis.inference.cli import main as cli_main
    from calcinosis.model.imageio import write_png

    img, _ = nodule_region()
    write_png(tmp_path / "region.png", img)
    monkeypatch.setattr(
        predict_mod.Predictor,
        "from_checkpoint",
        classmethod(lambda cls, *a, **k: nodule_predictor),
    )
    out = tmp_path / "out"
    ckpt = tmp_path / "unused.safetensors"
    ckpt.write_bytes(b"")
    args = ["predict", str(tmp_path / "region.png"), "--checkpoint", str(ckpt)]
    rc = cli_main([*args, "--out", str(out), "--mpp", str(MPP), "--quiet", "--workers", "1"])
    assert rc == 0
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["prediction"] == "calcinosis_cutis" and row["n_lesions"] == "1"
    assert row["also_present"] == "" and row["lesions"] == "lesions/region.csv"
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    rec = data["results"][0]
    assert data["lesion_threshold"] == 0.5 and data["min_lesion_area_um2"] == 100.0
    assert [les["prediction"] for les in rec["lesions"]] == ["calcinosis_cutis"]
    assert rec["region"]["tile_mean_probabilities"]["normal"] > 0.9
    with open(out / "lesions" / "region.csv", newline="") as fh:
        (lrow,) = list(csv.DictReader(fh))
    assert lrow["label"] == "calcium" and float(lrow["area_um2"]) > 250
    gj = json.loads((out / rec["outputs"]["geojson"]).read_text(encoding="utf-8"))
    assert gj["type"] == "FeatureCollection"
    (feat,) = gj["features"]
    props = feat["properties"]
    assert props["objectType"] == "annotation" and props["lesion_id"] == 1
    assert props["classification"]["name"] == "Calcium deposit"
    assert len(props["classification"]["color"]) == 3
    m = props["measurements"]
    assert m["Area µm^2"] == pytest.approx(rec["lesions"][0]["area_um2"])
    assert {f"Prob {c}" for c in CLASS_NAMES} <= set(m)
    assert m["Prob calcinosis_cutis"] > 0.9
    assert all(isinstance(v, float) for v in m.values())
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert np.abs(ring.mean(0) - [600.5, 400.5]).max() < 2


def test_geojson_lesion_features_in_a_slide_frame():
    from calcinosis.inference.geojson import lesion_features

    lm = np.zeros((200, 300), np.uint8)
    cv2.circle(lm, (100, 100), 30, BONE, -1)
    cv2.circle(lm, (100, 100), 27, CALCIUM, -1)
    lm[20:45, 220:260] = BONE
    found, _, _ = find(lm)
    assert len(found.lesions) == 2
    # Label-map pixels of a level downsampled 2x, placed at (1000, 500) of level 0 (0.25 µm/px).
    feats = lesion_features(
        lm, found.lesions, found.components, 0.25, offset=(1000.0, 500.0), scale=2.0
    )
    assert [f["properties"]["lesion_id"] for f in feats] == [1, 2]
    for f, les in zip(feats, found.lesions, strict=True):
        props = f["properties"]
        m = props["measurements"]
        assert props["objectType"] == "annotation"
        assert m["Area px^2"] == les["area_px"] * 4
        assert m["Area µm^2"] == pytest.approx(les["area_um2"])  # 0.5 µm per map pixel
        assert m["Prob calcinosis_cutis"] == les["probabilities"]["calcinosis_cutis"]
        ring = np.asarray(f["geometry"]["coordinates"][0])
        x, y, w, h = les["bbox"]
        assert ring[:, 0].min() >= 1000 + 2 * x and ring[:, 0].max() <= 1000 + 2 * (x + w)
        assert ring[:, 1].min() >= 500 + 2 * y and ring[:, 1].max() <= 500 + 2 * (y + h)
    assert feats[0]["properties"]["classification"]["name"] == "Calcium deposit"
    assert feats[0]["properties"]["measurements"]["Fraction bone"] > 0.1
    assert feats[1]["properties"]["classification"]["name"] == "Bone (osteoma)"
    with pytest.raises(ValueError):
        lesion_features(lm, found.lesions, found.components[:1], 0.25)


def test_lesion_options_from_the_command_line_are_checked(tmp_path, robust_checkpoint):
    from calcinosis.inference.cli import main

    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 200, np.uint8))
    base = ["predict", str(img), "--checkpoint", str(robust_checkpoint), "--out"]
    assert main([*base, str(tmp_path / "a"), "--lesion-threshold", "1.5", "--quiet"]) == 2
    assert main([*base, str(tmp_path / "b"), "--min-lesion-area", "-1", "--quiet"]) == 2
    code = main([*base, str(tmp_path / "c"), "--lesion-threshold", "0.7", "--quiet"])
    assert code in (0, 3)
    meta = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert meta["lesion_threshold"] == 0.7
