"""Test-time augmentation by input kind: patches keep the checkpoint's mode, tiled inputs one pass.

A D4 checkpoint (``inference.tta: d4``, its temperature fitted with d4) runs
eight passes per patch, as it was calibrated, but one pass per tile of a region
or slide unless ``tta="d4"`` is asked for: eight passes per tile made an 8192²
region take about ten minutes. The mode and its cost are said in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tissue

from calcinosis.inference.predictor import Predictor

SIZE = 64  # conftest's robust checkpoint


def _d4_metadata(predictor: Predictor) -> dict:
    """The robust checkpoint's metadata as a D4-trained, D4-calibrated run writes it."""
    meta = dict(predictor.metadata)
    meta["config"] = {**(meta.get("config") or {}), "inference": {"tta": "d4"}}
    meta["calibration"] = {"tta": "d4", "samples": 10, "ece_before": 0.1, "ece_after": 0.05}
    meta["temperature"] = 1.4
    return meta


class _Counting:
    """Wraps an engine and counts the rows it is given (forward passes)."""

    def __init__(self, engine) -> None:
        self.engine, self.rows = engine, 0

    def __call__(self, nhwc):
        self.rows += len(nhwc)
        return self.engine(nhwc)


def _predictor(robust_predictor: Predictor, tta: str | None) -> tuple[Predictor, _Counting]:
    counting = _Counting(robust_predictor.engine)
    meta = _d4_metadata(robust_predictor)
    return Predictor(counting, meta, tta=tta, batch_size=8), counting


def _tissue_tiles(res) -> int:
    return sum(1 for t in res.tiles if t["status"] in ("ok", "out_of_focus"))


def test_regions_run_one_pass_per_tile_unless_d4_is_asked_for(robust_predictor):
    region = tissue(3 * SIZE, 2 * SIZE, seed=4)
    default, count = _predictor(robust_predictor, None)
    assert (default.tta, default.region_tta) == ("d4", "none")
    res = default.predict(region)
    assert res.mode == "region" and res.region["tta"] == "none"
    n_tiles = _tissue_tiles(res)
    assert n_tiles > 1 and count.rows == n_tiles  # one pass per tile
    count.rows = 0
    patch = default.predict(tissue(SIZE, SIZE, seed=1))
    assert patch.mode == "patch" and count.rows == 8  # the patch keeps the checkpoint's d4

    asked, count_d4 = _predictor(robust_predictor, "d4")
    assert (asked.tta, asked.region_tta) == ("d4", "d4")
    res_d4 = asked.predict(region)
    assert res_d4.region["tta"] == "d4" and count_d4.rows == 8 * _tissue_tiles(res_d4)
    # The mode changes the answer (random weights see the orientation), not the tiling.
    assert [t["y0"] for t in res_d4.tiles] == [t["y0"] for t in res.tiles]
    assert res_d4.region["tile_mean_probabilities"] != res.region["tile_mean_probabilities"]

    none, count_none = _predictor(robust_predictor, "none")
    none.predict(tissue(SIZE, SIZE, seed=1))
    assert (none.tta, none.region_tta) == ("none", "none") and count_none.rows == 1


def test_the_mode_and_its_cost_are_said_with_the_missing_temperature(robust_predictor):
    default, _ = _predictor(robust_predictor, None)
    line = default.describe_tta()
    assert line.startswith("tta d4 for patches (8 passes per patch), none for tiled regions")
    assert "(1 pass per tile; --tta d4 for 8)" in line
    # The checkpoint holds one temperature, fitted with d4: none for one pass.
    assert default.temperature_tta == "d4"
    assert "fitted with d4 and the checkpoint has none for one pass" in line
    assert "probabilities of tiled regions and slides" in line

    asked, _ = _predictor(robust_predictor, "d4")
    assert asked.describe_tta() == "tta d4 (8 passes per patch and per tile)"

    single, _ = _predictor(robust_predictor, "none")
    text = single.describe_tta()
    assert text.startswith("tta none (1 pass per patch and per tile)")
    assert "probabilities of all inputs" in text

    # A checkpoint calibrated without TTA (conftest's): one pass everywhere, nothing to add.
    assert robust_predictor.describe_tta() == "tta none (1 pass per patch and per tile)"
    assert robust_predictor.temperature_tta == "none"


def test_predict_prints_the_mode_first_and_records_it(
    robust_predictor, tmp_path, capsys, monkeypatch
):
    import calcinosis.inference.predict as predict_mod
    from calcinosis.inference.cli import main
    from calcinosis.model.imageio import write_png

    default, count = _predictor(robust_predictor, None)
    monkeypatch.setattr(
        predict_mod.Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: default)
    )
    write_png(tmp_path / "region.png", tissue(3 * SIZE, 2 * SIZE, seed=4))
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "region.png"), "--checkpoint", str(tmp_path / "c"),
            "--out", str(out), "--quiet", "--no-overlays", "--no-geojson"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == default.describe_tta()
    summary = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert (summary["tta"], summary["region_tta"], summary["temperature_tta"]) == (
        "d4",
        "none",
        "d4",
    )
    (rec,) = summary["results"]
    assert rec["mode"] == "region" and rec["region"]["tta"] == "none"
    assert count.rows == rec["region"]["tissue_tiles"]


def test_a_region_tiled_with_d4_matches_its_tiles_predicted_with_d4(robust_predictor):
    """The mode a region runs is the one its tiles run: a one-tile-wide strip's first
    tile gives the same class probabilities as that tile predicted as a patch."""
    asked, _ = _predictor(robust_predictor, "d4")
    strip = tissue(SIZE, 4 * SIZE, seed=6)
    res = asked.predict(strip)
    first = res.tiles[0]
    assert (first["y0"], first["x0"]) == (0, 0)
    patch = asked.predict(np.ascontiguousarray(strip[:, :SIZE]))
    for c, p in patch.probabilities.items():
        assert first[f"p_{c}"] == pytest.approx(p, abs=1e-5)
