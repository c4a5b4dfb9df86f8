"""The generator's dataset writer: split fractions, the synthetic.json stamp, region tile jobs."""

from __future__ import annotations

import csv
import json
import pickle
from collections import Counter

import pytest

from calcinosis.model.errors import ConfigError
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES
from calcinosis.training.synthetic import (
    STAMP_NAME,
    assign_synthetic_splits,
    dataset_is_current,
    dataset_stamp,
    generate_dataset,
    plan_region,
)


def _split_counts(splits: dict, label: str) -> Counter:
    return Counter(v for (lab, _, _), v in splits.items() if lab == label)


def test_split_defaults_are_70_15_15_and_unchanged() -> None:
    # the defaults keep the demo's (and the committed fixtures') splits as they were
    for n, seed in ((2, 0), (7, 3), (20, 1)):
        assert assign_synthetic_splits(n, seed) == assign_synthetic_splits(n, seed, 0.15, 0.15)
    splits = assign_synthetic_splits(20, seed=0)
    for label in CLASS_NAMES:  # 60 patches per class
        assert _split_counts(splits, label) == {"train": 42, "val": 9, "test": 9}


def test_split_fractions_are_honoured() -> None:
    splits = assign_synthetic_splits(20, seed=0, val_fraction=0.25, test_fraction=0.1)
    for label in CLASS_NAMES:
        assert _split_counts(splits, label) == {"train": 39, "val": 15, "test": 6}
        for stain in STAIN_NAMES:  # still spread over the stains
            got = Counter(splits[(label, stain, i)] for i in range(20))
            assert 4 <= got["val"] <= 6 and 1 <= got["test"] <= 3
    none_held_out = assign_synthetic_splits(4, seed=2, val_fraction=0.0, test_fraction=0.0)
    assert set(none_held_out.values()) == {"train"}


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (1.0, 0.0), (0.6, 0.4)])
def test_split_fractions_are_checked(val: float, test: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        assign_synthetic_splits(3, 0, val, test)


def test_generate_dataset_writes_the_fractions_and_a_matching_stamp(tmp_path) -> None:
    settings = {"size": 32, "seed": 2, "mpp": 2.0, "val_fraction": 0.3, "test_fraction": 0.2}
    manifest = generate_dataset(tmp_path, 2, workers=1, **settings)
    rows = list(csv.DictReader(manifest.open()))
    for label in CLASS_NAMES:  # 6 per class: 30% val, 20% test
        got = Counter(r["split"] for r in rows if r["label"] == label)
        assert got == {"train": 3, "val": 2, "test": 1}
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    assert stamp == json.loads(json.dumps(dataset_stamp(n_per_class_stain=2, **settings)))
    assert stamp["val_fraction"] == 0.3 and stamp["test_fraction"] == 0.2
    # every argument that changes the files, and both renderers' versions
    assert set(stamp) == {
        "generator_version",
        "style_b_version",
        "n_per_class_stain",
        "size",
        "seed",
        "shift",
        "mpp",
        "style",
        "supersample",
        "val_fraction",
        "test_fraction",
    }
    assert dataset_is_current(tmp_path, n_per_class_stain=2, workers=4, **settings)
    # any other setting, another fraction included, does not match
    assert not dataset_is_current(tmp_path, n_per_class_stain=2, **{**settings, "seed": 3})
    assert not dataset_is_current(tmp_path, n_per_class_stain=2, **{**settings, "test_fraction": 0})
    assert not dataset_is_current(tmp_path, n_per_class_stain=2, size=32, seed=2, mpp=2.0)
    # no manifest (an interrupted run): not a dataset
    manifest.unlink()
    assert not dataset_is_current(tmp_path, n_per_class_stain=2, **settings)


def test_regenerating_removes_the_old_manifest_and_stamp_first(tmp_path, monkeypatch) -> None:
    generate_dataset(tmp_path, 1, size=32, workers=1, mpp=2.0)
    assert dataset_is_current(tmp_path, n_per_class_stain=1, size=32, mpp=2.0)
    from calcinosis.training.synthetic import dataset as dataset_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_module, "_render_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 1, size=32, seed=9, workers=1, mpp=2.0)
    assert not (tmp_path / "manifest.csv").exists() and not (tmp_path / STAMP_NAME).exists()
    assert not dataset_is_current(tmp_path, n_per_class_stain=1, size=32, mpp=2.0)


def test_region_tile_jobs_carry_only_their_window() -> None:
    # Worker processes get each tile's part of the geometry with its job (no module
    # state): a job stays a few kB however large the region is.
    from calcinosis.training.synthetic.region import _tile_jobs

    plan = plan_region(4096, 4096, seed=1, mpp=2.0)
    whole = len(pickle.dumps(plan.geometry))
    jobs = list(_tile_jobs(plan, 8))
    assert len(jobs) == plan.rows * plan.cols
    biggest = max(len(pickle.dumps(job)) for job in jobs[:: max(1, len(jobs) // 20)])
    assert biggest < 64_000 and biggest * 20 < whole, (biggest, whole)
