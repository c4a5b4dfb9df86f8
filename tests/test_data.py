"""Data sources, validation before training, splits and the patch dataset."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calcinosis.model.errors import DataError
from calcinosis.model.labels import CLASS_NAMES
from calcinosis.training import data as data_mod
from calcinosis.training import dataset as dataset_mod
from calcinosis.training.config import config_from_dict
from calcinosis.training.data import (
    IGNORE_INDEX,
    DecodedCache,
    PatchDataset,
    Sample,
    assign_splits,
    load_samples,
    read_manifest,
    scan_class_folders,
    split_counts,
    validate_samples,
)
from calcinosis.training.transforms import build_eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _img(
    path: Path, size: tuple[int, int] = (32, 32), seed: int = 0, fmt: str | None = None
) -> Path:
    """Write a small random RGB image (size is height, width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _mask(path: Path, size: tuple[int, int] = (32, 32), value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, dtype=np.uint8)
    m[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = value
    Image.fromarray(m, mode="L").save(path)
    return path


def _write_manifest(
    root: Path, rows: list[str], header: str = "path,label,stain,mask_path,split"
) -> Path:
    p = root / "manifest.csv"
    p.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def data_dataset(tmp_path: Path) -> Path:
    """A valid manifest: 2 images per class (one with a mask), splits given."""
    rows = []
    for ci, c in enumerate(CLASS_NAMES):
        for k in range(2):
            _img(tmp_path / "img" / f"{c}_{k}.png", seed=ci * 10 + k)
            mask = ""
            if k == 0:
                _mask(tmp_path / "msk" / f"{c}_{k}.png", value=min(ci + 1, 4))
                mask = f"msk/{c}_{k}.png"
            rows.append(f"img/{c}_{k}.png,{c},he,{mask},{'train' if k == 0 else 'val'}")
    return _write_manifest(tmp_path, rows)


# --------------------------------------------------------------------------- manifest


def test_manifest_reads_relative_paths_and_optional_cells(data_dataset):
    samples = read_manifest(data_dataset)
    assert len(samples) == 10
    s = samples[0]
    assert s.path == data_dataset.parent / "img" / "calcinosis_cutis_0.png"
    assert s.mask_path == data_dataset.parent / "msk" / "calcinosis_cutis_0.png"
    assert s.label == "calcinosis_cutis" and s.stain == "he" and s.split == "train"
    assert samples[1].mask_path is None  # empty optional cell = missing


def test_manifest_tolerates_excel_habits(tmp_path):
    _img(tmp_path / "a b" / "x.png")
    _img(tmp_path / "a b" / "y.png")
    p = tmp_path / "m.csv"
    # BOM, ';' separator, extra column, odd case and spacing, absolute path, blank line.
    absolute = (tmp_path / "a b" / "y.png").resolve()
    p.write_bytes(
        (
            "\ufeffPath;Label;Stain;notes;MPP\n"
            "a b/x.png; Calcinosis Cutis ;H&E;first;0.25\n\n"
            f"{absolute};gout;;second;\n"
        ).encode()
    )
    samples = read_manifest(p)
    assert [s.label for s in samples] == ["calcinosis_cutis", "gout"]
    assert samples[0].stain == "he" and samples[0].mpp == 0.25
    assert samples[1].stain is None and samples[1].mpp is None


def test_manifest_missing_column_lists_columns_found(tmp_path):
    p = _write_manifest(tmp_path, ["a.png,gout"], header="path,class")
    with pytest.raises(DataError) as info:
        read_manifest(p)
    msg = str(info.value)
    assert str(p) in msg and "'label'" in msg and "path, class" in msg


def test_manifest_unknown_label_names_row_and_suggests(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    p = _write_manifest(tmp_path, ["a.png,gout,,,", "b.png,calcinosis,,,"])
    with pytest.raises(DataError) as info:
        read_manifest(p)
    msg = str(info.value)
    assert "line 3 (data row 2)" in msg
    assert "unknown label 'calcinosis'" in msg and "did you mean 'calcinosis_cutis'" in msg
    assert "osteoma_cutis" in msg  # the valid labels are listed


def test_manifest_missing_file_split_and_stain_are_all_reported(tmp_path):
    _img(tmp_path / "ok.png")
    p = _write_manifest(
        tmp_path,
        [
            "ok.png,gout,he,,train",
            "gone.png,gout,he,,train",
            "ok.png,normal,he,,training_set",
            "ok.png,normal,giemsa,,train",
            "ok.png,normal,he,nomask.png,train",
        ],
    )
    with pytest.raises(DataError) as info:
        read_manifest(p)
    msg = str(info.value)
    assert str(p) in msg and "4 problem(s)" in msg
    assert "line 3 (data row 2): image file not found" in msg and "gone.png" in msg
    assert "line 4 (data row 3): unknown split 'training_set'" in msg
    assert "line 5 (data row 4): unknown stain 'giemsa'" in msg
    assert "line 6 (data row 5): mask file not found" in msg and "nomask.png" in msg


def test_manifest_empty_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_manifest(empty)
    header_only = _write_manifest(tmp_path, [])
    with pytest.raises(DataError, match="no data rows"):
        read_manifest(header_only)
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_manifest_conflicting_duplicate_labels(tmp_path):
    _img(tmp_path / "a.png")
    p = _write_manifest(tmp_path, ["a.png,gout,,,", "a.png,normal,,,"])
    with pytest.raises(DataError, match="one patch can have only one label"):
        read_manifest(p)


def test_manifest_rejects_slide_files(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"x")
    p = _write_manifest(tmp_path, ["slide.svs,gout,,,"])
    with pytest.raises(DataError, match="tiled first"):
        read_manifest(p)


# --------------------------------------------------------------------------- class folders


def test_scan_class_folders_case_stain_tokens_and_masks(tmp_path):
    _img(tmp_path / "gout" / "HE_01.PNG", fmt="PNG")
    _img(tmp_path / "gout" / "sub" / "case7-vonkossa.JPG", fmt="JPEG")
    _img(tmp_path / "Calcinosis Cutis" / "alizarin_red" / "p1.TIFF", fmt="TIFF")
    _img(tmp_path / "normal" / "the_heart.png")  # 'he' only inside words: unknown
    (tmp_path / "gout" / "notes.txt").write_text("ignored")
    (tmp_path / "gout" / "._HE_01.PNG").write_bytes(b"\x00\x05")  # macOS AppleDouble junk
    _mask(tmp_path / "masks" / "gout" / "HE_01.png")
    samples = scan_class_folders(tmp_path)
    by_name = {s.path.name: s for s in samples}
    assert set(by_name) == {"HE_01.PNG", "case7-vonkossa.JPG", "p1.TIFF", "the_heart.png"}
    assert by_name["HE_01.PNG"].stain == "he"
    assert by_name["HE_01.PNG"].mask_path == tmp_path / "masks" / "gout" / "HE_01.png"
    assert by_name["case7-vonkossa.JPG"].stain == "von_kossa"
    assert by_name["p1.TIFF"].stain == "alizarin_red"
    assert by_name["p1.TIFF"].label == "calcinosis_cutis"
    assert by_name["the_heart.png"].stain is None
    assert all(s.split is None and s.mpp is None for s in samples)


def test_scan_unknown_class_folder_names_it(tmp_path):
    _img(tmp_path / "gout" / "a.png")
    _img(tmp_path / "goutt_extra" / "b.png")
    with pytest.raises(DataError) as info:
        scan_class_folders(tmp_path)
    assert "goutt_extra" in str(info.value) and "calcinosis_cutis" in str(info.value)


def test_scan_empty_root_raises_naming_folder(tmp_path):
    (tmp_path / "gout").mkdir()
    with pytest.raises(DataError) as info:
        scan_class_folders(tmp_path)
    assert "no images found" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        scan_class_folders(tmp_path / "missing")


# --------------------------------------------------------------------------- splits


def _fake_samples(per_class: dict[str, int]) -> list[Sample]:
    return [
        Sample(Path(f"/x/{c}/{i}.png"), c, None, None, None)
        for c, n in per_class.items()
        for i in range(n)
    ]


def test_assign_splits_stratified_deterministic_and_keeps_given():
    samples = _fake_samples({"gout": 100, "normal": 40, "amyloidosis": 3})
    samples[0] = Sample(samples[0].path, "gout", None, None, "test")
    a = assign_splits(samples, 0.15, 0.15, seed=7)
    b = assign_splits(list(reversed(samples)), 0.15, 0.15, seed=7)
    assert {s.path: s.split for s in a} == {s.path: s.split for s in b}  # order-independent
    c = assign_splits(samples, 0.15, 0.15, seed=8)
    assert {s.path: s.split for s in a} != {s.path: s.split for s in c}
    assert a[0].split == "test"  # given split kept
    assert samples[1].split is None  # input not mutated
    counts = Counter((s.label, s.split) for s in a)
    # 99 unsplit gout patches -> 15 val, 15 test (+1 given test).
    assert counts[("gout", "val")] == 15 and counts[("gout", "test")] == 16
    assert counts[("normal", "val")] == 6 and counts[("normal", "test")] == 6
    # Tiny class: one of each.
    assert [counts[("amyloidosis", k)] for k in ("train", "val", "test")] == [1, 1, 1]


def test_split_counts_always_leave_training_samples():
    assert split_counts(1, 0.15, 0.15) == (1, 0, 0)
    assert split_counts(2, 0.4, 0.4) == (1, 1, 0)
    for n in range(1, 30):
        tr, va, te = split_counts(n, 0.3, 0.3)
        assert tr >= 1 and tr + va + te == n


def test_assign_splits_keeps_groups_together():
    samples = [
        Sample(Path(f"/x/{i}.png"), CLASS_NAMES[i % 2], group=f"patient{i // 4}") for i in range(80)
    ]
    out = assign_splits(samples, 0.2, 0.2, seed=0)
    splits_per_group: dict[str, set[str]] = {}
    for s in out:
        splits_per_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_per_group.values())
    assert {s.split for s in out} == {"train", "val", "test"}


# --------------------------------------------------------------------------- validation


def test_validate_accepts_a_good_dataset(data_dataset):
    summary = validate_samples(read_manifest(data_dataset))
    assert summary["n"] == 10 and summary["with_mask"] == 5
    assert summary["counts"]["gout"] == {"train": 1, "val": 1, "test": 0}


def test_validate_mask_of_wrong_size_names_the_file(tmp_path):
    img = _img(tmp_path / "a.png", size=(32, 32))
    mask = _mask(tmp_path / "a_mask.png", size=(16, 32))
    s = Sample(img, "gout", None, mask, "train")
    with pytest.raises(DataError) as info:
        validate_samples([s], class_names=["gout"])
    msg = str(info.value)
    assert str(mask) in msg and "32 x 16" in msg and "32 x 32" in msg


def test_validate_mask_values_out_of_range_names_values_and_fix(tmp_path):
    img = _img(tmp_path / "a.png")
    mask = _mask(tmp_path / "a_mask.png", value=255)
    with pytest.raises(DataError) as info:
        validate_samples([Sample(img, "gout", None, mask, "train")], class_names=["gout"])
    msg = str(info.value)
    assert str(mask) in msg and "255" in msg and "0..4" in msg and "binary mask" in msg


def test_validate_unreadable_image_is_reported_before_training(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        validate_samples([Sample(bad, "gout", None, None, "train")], class_names=["gout"])


def test_validate_class_without_training_samples_names_it(tmp_path):
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png")
    samples = [Sample(a, "gout", None, None, "train"), Sample(b, "normal", None, None, "val")]
    with pytest.raises(DataError) as info:
        validate_samples(samples, class_names=["gout", "normal"])
    msg = str(info.value)
    assert "'normal'" in msg and "no training samples" in msg and "normal: train 0, val 1" in msg


def test_validation_of_many_files_is_fast(tmp_path):
    import time

    samples = []
    for i in range(300):
        img = _img(tmp_path / f"{i}.png", size=(64, 64), seed=i)
        samples.append(
            Sample(img, CLASS_NAMES[i % 5], None, _mask(tmp_path / f"{i}_m.png", (64, 64)), "train")
        )
    t0 = time.perf_counter()
    validate_samples(samples)
    assert time.perf_counter() - t0 < 2.0  # ~1-2 ms per image+mask on a slow core


# --------------------------------------------------------------------------- load_samples


def test_load_samples_from_folders_assigns_splits_and_validates(tmp_path):
    for ci, c in enumerate(CLASS_NAMES):
        for k in range(4):
            _img(tmp_path / "root" / c / f"he_{k}.png", seed=ci * 10 + k)
    cfg = config_from_dict(
        {
            "seed": 3,
            "output_dir": str(tmp_path / "run"),
            "data": {"source": "folders", "root": str(tmp_path / "root")},
        }
    )
    samples = load_samples(cfg)
    assert len(samples) == 20 and all(s.split in ("train", "val", "test") for s in samples)
    assert all(s.stain == "he" for s in samples)
    assert [s.split for s in samples] == [s.split for s in load_samples(cfg)]


def test_load_samples_synthetic_reuses_until_settings_change(tmp_path, monkeypatch):
    import json

    from calcinosis.training import synthetic

    calls = []

    def fake_generate(out_dir, n_per_class_stain, size=128, seed=0, shift=0.0, **kw):
        calls.append((n_per_class_stain, size, seed, shift, kw))
        out = Path(out_dir)
        rows = []
        for c in CLASS_NAMES:
            for k in range(n_per_class_stain):
                _img(out / "images" / c / f"he_{k}.png", size=(size, size), seed=k)
                _mask(out / "masks" / c / f"he_{k}.png", size=(size, size))
                rows.append(f"images/{c}/he_{k}.png,{c},he,masks/{c}/he_{k}.png,,0.5")
        stamp = synthetic.dataset_stamp(
            n_per_class_stain=n_per_class_stain, size=size, seed=seed, shift=shift, **kw
        )
        (out / synthetic.STAMP_NAME).write_text(json.dumps(stamp))
        return _write_manifest(out, rows, header="path,label,stain,mask_path,split,mpp")

    monkeypatch.setattr(synthetic, "generate_dataset", fake_generate)
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"synthetic": {"n_per_class_stain": 3, "size": 32}},
    }
    first = load_samples(config_from_dict(raw))
    assert len(calls) == 1 and len(first) == 15
    # the generator's own stamp is the one record: no second stamp file beside it
    assert sorted(p.name for p in (tmp_path / "run" / "data").glob("*.json")) == ["synthetic.json"]
    assert calls[0][4] == {"mpp": 0.5, "val_fraction": 0.15, "test_fraction": 0.15}
    load_samples(config_from_dict(raw))
    assert len(calls) == 1  # reused
    raw["data"]["synthetic"]["seed"] = 5
    load_samples(config_from_dict(raw))
    assert len(calls) == 2 and calls[-1][2] == 5  # settings changed -> regenerated
    raw["data"]["val_fraction"] = 0.3
    load_samples(config_from_dict(raw))
    assert len(calls) == 3 and calls[-1][4]["val_fraction"] == 0.3  # the splits change too


def test_synthetic_data_takes_the_configured_split_fractions(tmp_path):
    # data.val_fraction / test_fraction reach the generator's split column (they
    # used to be ignored for source: synthetic, which always held out 15 % + 15 %)
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {
            "synthetic": {"n_per_class_stain": 4, "size": 32},
            "image_size": 32,
            "val_fraction": 0.5,
            "test_fraction": 0.25,
        },
    }
    counts = Counter(s.split for s in load_samples(config_from_dict(raw)))
    assert counts == {"train": 15, "val": 30, "test": 15}


# --------------------------------------------------------------------------- PatchDataset


def test_patch_dataset_items_shapes_and_dtypes(data_dataset):
    samples = read_manifest(data_dataset)
    samples[2].stain = None
    ds = PatchDataset(
        samples,
        CLASS_NAMES,
        ("he", "von_kossa", "alizarin_red"),
        build_eval_transform(32, MEAN, STD),
    )
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 0
    assert item["stain"].dtype == torch.int64 and int(item["stain"]) == 0
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) == {0, 1}
    assert item["index"] == 0
    no_mask = ds[1]
    assert (no_mask["mask"] == IGNORE_INDEX).all()
    assert int(ds[2]["stain"]) == IGNORE_INDEX
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert ds.labels[:4] == [0, 0, 1, 1]


def test_patch_dataset_skips_and_records_bad_files(tmp_path, caplog):
    good = [_img(tmp_path / f"g{i}.png", seed=i) for i in range(3)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:100])  # truncated after validation
    samples = [Sample(p, "gout", None, None, "train") for p in (good[0], bad, good[1], good[2])]
    ds = PatchDataset(samples, CLASS_NAMES, transform=build_eval_transform(32, MEAN, STD))
    with caplog.at_level(logging.WARNING, logger="calcinosis.training.data"):
        item = ds[1]
        again = ds[1]
    assert item["index"] == 2 and again["index"] == 2  # replaced by the next sample
    assert list(ds.bad_files) == [str(bad)] and "truncated" in ds.bad_files[str(bad)]
    warnings = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(warnings) == 1  # logged once per file
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    assert next(iter(loader))["image"].shape[0] == 4  # the epoch goes on


def test_patch_dataset_all_bad_raises(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    ds = PatchDataset([Sample(bad, "gout", None, None, "train")], CLASS_NAMES)
    with pytest.raises(DataError, match="none of the 1 samples"):
        ds[0]


def test_patch_dataset_resamples_by_mpp(tmp_path):
    img = _img(tmp_path / "a.png", size=(64, 48))
    mask = _mask(tmp_path / "a_m.png", size=(64, 48), value=3)
    s = Sample(img, "gout", None, mask, "train", mpp=0.25)
    ds = PatchDataset([s], CLASS_NAMES, mpp=0.5)  # no transform: tensors at native size
    item = ds[0]
    assert item["image"].shape == (3, 32, 24) and item["mask"].shape == (32, 24)
    assert set(item["mask"].unique().tolist()) <= {0, 3}  # nearest keeps labels
    close = PatchDataset([Sample(img, "gout", mpp=0.51)], CLASS_NAMES, mpp=0.5)
    assert close[0]["image"].shape == (3, 64, 48)  # within 5 %: untouched


def test_decoded_cache_reads_each_file_once_and_serves_the_same_items(data_dataset, monkeypatch):
    samples = read_manifest(data_dataset)
    tf = build_eval_transform(32, MEAN, STD)
    plain = PatchDataset(samples, CLASS_NAMES, transform=tf)
    cache = DecodedCache(2**20)
    cached = PatchDataset(samples, CLASS_NAMES, transform=tf, cache=cache)
    reads = Counter()
    original = dataset_mod.read_rgb

    def counting(path, *a, **kw):
        reads[str(path)] += 1
        return original(path, *a, **kw)

    monkeypatch.setattr(dataset_mod, "read_rgb", counting)
    for _ in range(3):  # three epochs
        for i in range(len(samples)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(cache) == len(samples) and cache.hits == 2 * len(samples)
    assert all(n == 4 for n in reads.values())  # 3 by the plain dataset, 1 by the cached
    image, mask = cache.get(next(iter(cache._items)))
    assert not image.flags.writeable and (mask is None or not mask.flags.writeable)


def test_decoded_cache_stops_at_its_budget_and_skips_bad_files(tmp_path):
    good = [_img(tmp_path / f"g{i}.png", seed=i) for i in range(4)]  # 32x32x3: 3072 bytes each
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:100])
    samples = [Sample(p, "gout", None, None, "train") for p in (good[0], bad, *good[1:])]
    cache = DecodedCache(2 * 3072 + 100)
    ds = PatchDataset(samples, CLASS_NAMES, cache=cache)
    items = [ds[i]["index"] for i in range(len(samples))]
    assert items == [0, 2, 2, 3, 4]  # the broken file is skipped as without a cache
    assert len(cache) == 2 and cache.nbytes == 2 * 3072  # full: the rest is read each time
    assert str(bad) in ds.bad_files
    with pytest.raises(ValueError, match="max_bytes"):
        DecodedCache(-1)


def test_patch_dataset_rejects_unknown_labels(tmp_path):
    with pytest.raises(DataError, match="not in class_names"):
        PatchDataset([Sample(tmp_path / "a.png", "psoriasis")], CLASS_NAMES)


def test_data_module_exports():
    from calcinosis.training import metrics

    # one IGNORE_INDEX (torch's default), the names the data module always offered
    assert data_mod.IGNORE_INDEX is metrics.IGNORE_INDEX == -100
    assert data_mod.PatchDataset is dataset_mod.PatchDataset
    assert data_mod.MPP_TOLERANCE == 0.05


def test_load_samples_with_the_real_generator(tmp_path):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"synthetic": {"n_per_class_stain": 2, "size": 32}, "image_size": 32},
    }
    samples = load_samples(config_from_dict(raw))
    assert len(samples) == 5 * 3 * 2
    assert all(s.mask_path is not None and s.stain is not None for s in samples)
    ds = PatchDataset(samples, CLASS_NAMES, transform=build_eval_transform(32, MEAN, STD), mpp=0.5)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and int(item["mask"].max()) <= 4


def test_fda_reference_is_another_patch_of_the_same_stain(tmp_path):
    """PatchDataset hands a Fourier-adapting transform a reference of the patch's own stain."""
    import cv2

    from calcinosis.model.manifest import Sample
    from calcinosis.training.dataset import PatchDataset

    samples = []
    for i, (label, stain) in enumerate(
        [("normal", "he"), ("osteoma_cutis", "he"), ("gout", "he"), ("normal", "von_kossa")]
    ):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((16, 16, 3), 10 * (i + 1), np.uint8))
        samples.append(Sample(path=path, label=label, stain=stain))
    (tmp_path / "9.png").write_bytes(b"not a png")
    samples.append(Sample(path=tmp_path / "9.png", label="amyloidosis", stain="he"))

    seen: list[tuple[int, int | None]] = []

    class Recorder:
        wants_reference = True
        reference_stains = ("he",)

        def __call__(self, image, mask=None, *, seed=None, reference=None):
            seen.append(
                (int(image[0, 0, 0]), None if reference is None else int(reference[0, 0, 0]))
            )
            return {"image": torch.zeros(3, 16, 16), "mask": None}

    ds = PatchDataset(samples, transform=Recorder())
    for seed in range(20):
        ds.get(0, seed=seed)
        ds.get(3, seed=seed)
    he_refs = {r for v, r in seen if v == 10}
    assert he_refs <= {20, 30} and len(he_refs) == 2  # other H&E patches, never itself
    assert {r for v, r in seen if v == 40} == {None}  # von Kossa is not a reference stain
    seen.clear()
    ds.get(1, seed=5)
    ds.get(1, seed=5)
    assert seen[0] == seen[1]  # the item's seed fixes its reference
    # the unreadable file is skipped as a reference and recorded once
    for seed in range(30):
        ds.get(2, seed=seed)
    assert str(tmp_path / "9.png") in ds.bad_files
