"""The synthetic generator: determinism, labels, stain chemistry, dataset layout, CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from calcinosis.model.errors import ConfigError
from calcinosis.model.labels import (
    AMYLOID,
    BONE,
    CALCIUM,
    CLASS_DEPOSIT,
    CLASS_NAMES,
    STAIN_NAMES,
    URATE,
)
from calcinosis.training.synthetic import (
    DEPOSIT_CLASSES,
    MANIFEST_COLUMNS,
    NOMINAL_MPP,
    assign_synthetic_splits,
    generate_dataset,
    make_fixtures,
    patch_seed,
    plan_region,
    render_patch,
    render_plan,
    render_region,
)

FIXTURES = Path(__file__).parent / "fixtures"
SEEDS = range(12)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _tissue(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label-0 pixels that hold tissue (not bare glass)."""
    grey = rgb.astype(np.float32).mean(axis=2)
    glass_level = np.percentile(grey, 99)
    return (labels == 0) & (grey < glass_level - 12)


@pytest.mark.parametrize("label", CLASS_NAMES)
@pytest.mark.parametrize("stain", STAIN_NAMES)
def test_render_patch_shapes_and_label_values(label: str, stain: str) -> None:
    for seed in range(4):
        rgb, labels = render_patch(label, stain, seed, size=64)
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        assert labels.shape == (64, 64) and labels.dtype == np.uint8
        present = set(np.unique(labels).tolist())
        deposit = CLASS_DEPOSIT[label]
        if label == "normal":
            assert present == {0}
        else:
            # the class's own deposit is in view, and no other deposit is drawn
            assert deposit in present, (label, stain, seed)
            assert present <= {0, deposit}
            assert np.count_nonzero(labels) >= 0.01 * labels.size


def test_render_patch_is_deterministic() -> None:
    a = render_patch("gout", "he", 7, size=96, shift=0.3)
    b = render_patch("gout", "he", 7, size=96, shift=0.3)
    c = render_patch("gout", "he", 8, size=96, shift=0.3)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    # the stain changes the picture, not only the colours' order
    d = render_patch("gout", "von_kossa", 7, size=96, shift=0.3)
    assert a[0].tobytes() != d[0].tobytes()


def test_render_patch_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="calcinosis_cutis"):
        render_patch("calcinosis", "he", 0)
    with pytest.raises(ConfigError, match="von_kossa"):
        render_patch("gout", "congo_red", 0)


@pytest.mark.parametrize("mpp", [0.0, -1.0, float("nan"), float("inf")])
def test_both_renderers_reject_a_bad_mpp_alike(mpp: float) -> None:
    # One argument check serves both styles (check_patch_args): style A used to
    # divide by a zero mpp instead of saying what is wrong.
    from calcinosis.training.synthetic import render_patch_b

    for render in (render_patch, render_patch_b):
        with pytest.raises(ConfigError, match="mpp must be a positive number"):
            render("gout", "he", 0, 32, mpp=mpp)


def test_patch_seed_differs_by_index_and_seed() -> None:
    seeds = {patch_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150


def _deposit_vs_tissue(label, stain, shift, stat, seeds=SEEDS, size=96):
    """Per patch: (stat over the class's deposit pixels, stat over tissue pixels)."""
    out = []
    for seed in seeds:
        rgb, labels = render_patch(label, stain, seed, size=size, shift=shift)
        dep = labels == CLASS_DEPOSIT[label]
        tis = _tissue(rgb, labels)
        if dep.sum() < 20 or tis.sum() < 20:
            continue
        px = rgb.astype(np.float32)
        out.append((stat(px[dep]), stat(px[tis])))
    assert len(out) >= len(seeds) * 2 // 3, "too few patches had both deposit and tissue"
    return np.array(out)


def _intensity(px: np.ndarray) -> float:
    return float(px.mean())


def _redness(px: np.ndarray) -> float:
    return float(np.mean(px[:, 0] / (0.5 * (px[:, 1] + px[:, 2]) + 1.0)))


def _blueness(px: np.ndarray) -> float:
    return float(np.mean((px[:, 2] + 1.0) / (px[:, 0] + 1.0)))


@pytest.mark.parametrize("shift", [0.0, 0.6])
@pytest.mark.parametrize("label", ["calcinosis_cutis", "osteoma_cutis"])
def test_von_kossa_blackens_calcium_and_bone(label: str, shift: float) -> None:
    stats = _deposit_vs_tissue(label, "von_kossa", shift, _intensity)
    assert np.all(stats[:, 0] < stats[:, 1] - 40), stats


@pytest.mark.parametrize("shift", [0.0, 0.6])
@pytest.mark.parametrize("label", ["calcinosis_cutis", "osteoma_cutis"])
def test_alizarin_red_reddens_calcium_and_bone(label: str, shift: float) -> None:
    stats = _deposit_vs_tissue(label, "alizarin_red", shift, _redness)
    # Dye strength is drawn per patch (domain randomisation) and a shifted lab
    # stains weaker still: every deposit is redder than its tissue, most clearly.
    assert np.all(stats[:, 0] > stats[:, 1] * 1.15), stats
    assert np.median(stats[:, 0] / stats[:, 1]) > 1.5, stats


@pytest.mark.parametrize("shift", [0.0, 0.6])
@pytest.mark.parametrize("label", ["gout", "amyloidosis"])
@pytest.mark.parametrize("stain", ["von_kossa", "alizarin_red"])
def test_urate_and_amyloid_are_negative_in_special_stains(
    label: str, stain: str, shift: float
) -> None:
    stats = _deposit_vs_tissue(label, stain, shift, _intensity)
    # Not darkened: on average brighter than the surrounding tissue, and no patch
    # anywhere near a positive deposit (those are > 40 grey levels darker). A
    # glassy amyloid globule may be a shade greyer than very pale papillary dermis.
    diff = stats[:, 0] - stats[:, 1]
    assert diff.mean() > 0, stats
    assert np.all(diff > -20), stats
    if stain == "alizarin_red":
        red = _deposit_vs_tissue(label, stain, shift, _redness)
        assert np.all(red[:, 0] < red[:, 1] + 0.1), red


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_he_calcium_is_basophilic(shift: float) -> None:
    stats = _deposit_vs_tissue("calcinosis_cutis", "he", shift, _blueness)
    assert np.mean(stats[:, 0] > stats[:, 1]) >= 0.9, stats
    # and the mimics' deposits are eosinophilic (pink: red above blue)
    calc = stats[:, 0].mean()
    for label in ("osteoma_cutis", "gout", "amyloidosis"):
        own = []
        for seed in range(6):
            rgb, labels = render_patch(label, "he", seed, size=96, shift=shift)
            own.append(_blueness(rgb[labels == CLASS_DEPOSIT[label]].astype(np.float32)))
        assert np.mean(own) < calc, (label, own, calc)


def test_he_urate_and_amyloid_share_a_colour() -> None:
    """In H&E gout and amyloid are both pale pink: the mean colours overlap."""
    means = {}
    for label in ("gout", "amyloidosis"):
        cols = []
        for seed in SEEDS:
            rgb, labels = render_patch(label, "he", seed, size=96)
            dep = labels == CLASS_DEPOSIT[label]
            cols.append(rgb[dep].astype(np.float32).mean(axis=0))
        means[label] = np.array(cols)
    gap = np.abs(means["gout"].mean(0) - means["amyloidosis"].mean(0))
    spread = np.maximum(means["gout"].std(0), means["amyloidosis"].std(0))
    assert np.all(gap < 3.5 * spread + 12), (gap, spread)


def test_shift_moves_colour_statistics() -> None:
    """A shifted lab differs measurably from the training lab, on average."""

    def colour(shift):
        return np.array(
            [render_patch("normal", "he", s, size=64, shift=shift)[0].mean((0, 1)) for s in SEEDS]
        )

    base, shifted = colour(0.0), colour(1.0)
    assert np.abs(shifted - base).mean() > 3


def test_assign_splits_is_stratified() -> None:
    splits = assign_synthetic_splits(20, seed=0)
    assert splits == assign_synthetic_splits(20, seed=0)
    for label in CLASS_NAMES:
        for stain in STAIN_NAMES:
            counts = Counter(splits[(label, stain, i)] for i in range(20))
            assert set(counts) == {"train", "val", "test"}
            assert 12 <= counts["train"] <= 16 and 2 <= counts["val"] <= 4
    for n in (2, 3, 5):  # small sets still give every class all three splits
        small = assign_synthetic_splits(n, seed=3)
        for label in CLASS_NAMES:
            got = {small[(label, s, i)] for s in STAIN_NAMES for i in range(n)}
            assert got == {"train", "val", "test"}, (n, label)


def test_generate_dataset_layout_and_worker_independence(tmp_path: Path) -> None:
    one = generate_dataset(tmp_path / "one", 3, size=32, seed=5, workers=1)
    two = generate_dataset(tmp_path / "two", 3, size=32, seed=5, workers=2)
    assert one.name == "manifest.csv"
    rows = _read_manifest(one)
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert len(rows) == 3 * len(CLASS_NAMES) * len(STAIN_NAMES)
    assert {(r["label"], r["stain"]) for r in rows} == {
        (c, s) for c in CLASS_NAMES for s in STAIN_NAMES
    }
    for label in CLASS_NAMES:
        assert {r["split"] for r in rows if r["label"] == label} == {"train", "val", "test"}
    for r in rows:
        assert float(r["mpp"]) == NOMINAL_MPP
        img = cv2.imread(str(one.parent / r["path"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(one.parent / r["mask_path"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32, 3) and mask.shape == (32, 32) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, CLASS_DEPOSIT[r["label"]]}
        # byte-identical whatever the number of workers
        for key in ("path", "mask_path"):
            assert (one.parent / r[key]).read_bytes() == (two.parent / r[key]).read_bytes()
    assert one.read_bytes() == two.read_bytes()
    # the PNG holds the same pixels render_patch returns (RGB order kept)
    r = rows[0]
    i = int(Path(r["path"]).stem.split("_")[-1])
    rgb, labels = render_patch(r["label"], r["stain"], patch_seed(5, i), size=32)
    img = cv2.imread(str(one.parent / r["path"]))[:, :, ::-1]
    assert np.array_equal(img, rgb)


def test_generate_dataset_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_per_class_stain"):
        generate_dataset(tmp_path, 0)
    with pytest.raises(ConfigError, match="size"):
        generate_dataset(tmp_path, 1, size=8)


def test_fixtures_regenerate_byte_identical(tmp_path: Path) -> None:
    manifest = make_fixtures(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len([p for p in produced if p.parts[0] == "images"]) == 30
    assert len([p for p in produced if p.parts[0] == "masks"]) == 30
    for rel in produced:
        committed = FIXTURES / rel
        assert committed.is_file(), f"{committed} missing: run tests/fixtures/regenerate.py"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from the committed fixture; if the generator changed on purpose, "
            "run tests/fixtures/regenerate.py"
        )
    rows = _read_manifest(manifest)
    assert len(rows) == 30


def test_fixture_masks_carry_each_class_deposit() -> None:
    rows = _read_manifest(FIXTURES / "manifest.csv")
    seen = {label: set() for label in CLASS_NAMES}
    for r in rows:
        mask = cv2.imread(str(FIXTURES / r["mask_path"]), cv2.IMREAD_UNCHANGED)
        seen[r["label"]] |= set(np.unique(mask).tolist())
    assert seen["calcinosis_cutis"] == {0, CALCIUM}
    assert BONE in seen["osteoma_cutis"]
    assert URATE in seen["gout"]
    assert AMYLOID in seen["amyloidosis"]
    assert seen["normal"] == {0}


def test_cli_synth_writes_tree_and_sheet(tmp_path: Path, capsys) -> None:
    from calcinosis.inference.cli import main

    out = tmp_path / "data"
    sheet = tmp_path / "sheet.png"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--n-per-class-stain",
            "1",
            "--size",
            "32",
            "--workers",
            "1",
            "--sheet",
            str(sheet),
        ]
    )
    assert rc == 0
    assert (out / "manifest.csv").is_file()
    for label in CLASS_NAMES:
        for stain in STAIN_NAMES:
            assert (out / "images" / label / f"{stain}_0000.png").is_file()
            assert (out / "masks" / label / f"{stain}_0000.png").is_file()
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 5 * 32 and img.shape[1] > 3 * 4 * 32
    assert "manifest.csv" in capsys.readouterr().out


def test_cli_synth_reports_bad_arguments(tmp_path: Path, capsys) -> None:
    from calcinosis.inference.cli import main

    rc = main(["synth", "--out", str(tmp_path / "x"), "--n-per-class-stain", "0"])
    assert rc == 2
    assert "n_per_class_stain" in capsys.readouterr().err


def test_cli_synth_takes_split_fractions(tmp_path: Path, capsys) -> None:
    import csv
    from collections import Counter

    from calcinosis.inference.cli import main

    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--n-per-class-stain", "10", "--size", "32"]
    rc = main([*argv, "--workers", "1", "--val-fraction", "0.1", "--test-fraction", "0.2"])
    assert rc == 0
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for label in CLASS_NAMES:
        for stain in STAIN_NAMES:
            mine = Counter(r["split"] for r in rows if (r["label"], r["stain"]) == (label, stain))
            assert mine == {"train": 7, "val": 1, "test": 2}, (label, stain, mine)
    capsys.readouterr()
    assert main([*argv, "--val-fraction", "0.6", "--test-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "val_fraction + test_fraction must be < 1" in err and "0.6 + 0.5" in err


# ---------------------------------------------------------------------------
# Large regions (a mosaic of patches, like an area exported from a slide)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_region_1024():
    plan = plan_region(1024, 1024, seed=0)
    rgb, labels = render_plan(plan, "he")
    return plan, rgb, labels


def _near_white(rgb: np.ndarray) -> bool:
    """Bare glass: every channel of every pixel bright, nothing stained."""
    return int(rgb.min()) >= 200 and float(rgb.astype(np.float32).std(axis=(0, 1)).max()) < 8


def test_render_region_shape_dtype_and_determinism() -> None:
    # sides that are not multiples of the tile: the last row and column are cropped
    a = render_region(300, 200, seed=3, tile=64, workers=1)
    b = render_region(300, 200, seed=3, tile=64, workers=2)
    c = render_region(300, 200, seed=4, tile=64, workers=1)
    assert a[0].shape == (200, 300, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (200, 300) and a[1].dtype == np.uint8
    # byte-identical whatever the number of worker processes
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert set(np.unique(a[1]).tolist()) <= {0, CALCIUM, BONE, URATE, AMYLOID}


def test_render_region_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="osteoma_cutis"):
        render_region(256, 256, classes=["osteoma"])
    with pytest.raises(ConfigError, match="width"):
        render_region(10, 256)
    with pytest.raises(ConfigError, match="von_kossa"):
        render_region(256, 256, stain="congo_red")


def test_region_has_glass_tissue_and_deposits(synthetic_region_1024) -> None:
    plan, rgb, labels = synthetic_region_1024
    assert rgb.shape == (1024, 1024, 3) and labels.shape == (1024, 1024)
    assert (plan.rows, plan.cols) == (4, 4)
    flat = [cell for row in plan.grid for cell in row]
    assert set(flat) >= {"glass", "normal", *DEPOSIT_CLASSES}

    def window(r: int, c: int) -> tuple[slice, slice]:
        return slice(r * 256, (r + 1) * 256), slice(c * 256, (c + 1) * 256)

    grey = rgb.astype(np.float32).mean(axis=2)
    glass = [window(r, c) for r in range(4) for c in range(4) if plan.grid[r][c] == "glass"]
    glass_level = float(np.mean([grey[w].mean() for w in glass]))
    blank = tissue = 0
    for r in range(plan.rows):
        for c in range(plan.cols):
            cell, cell_labels = rgb[window(r, c)], labels[window(r, c)]
            blank += _near_white(cell)
            tissue += np.mean(grey[window(r, c)] < glass_level - 12) > 0.3
            # the plan and the pixels agree: glass tiles are bare, labels stay in their tile
            if plan.grid[r][c] == "glass":
                assert _near_white(cell) and not cell_labels.any(), (r, c)
            else:
                present = set(np.unique(cell_labels).tolist())
                assert present <= {0, CLASS_DEPOSIT[plan.grid[r][c]]}, (r, c, present)
                if plan.grid[r][c] != "normal":
                    assert CLASS_DEPOSIT[plan.grid[r][c]] in present, (r, c)
    assert blank >= 1 and tissue >= 6, (blank, tissue)
    # several deposit kinds, each a small part of the region (mostly normal tissue)
    values, counts = np.unique(labels, return_counts=True)
    assert len(set(values.tolist()) - {0}) >= 3, values
    assert counts[values == 0][0] > 0.8 * labels.size
    # labels only where there is tissue (never on bright glass)
    assert rgb[labels > 0].astype(np.float32).mean() < 200


def test_region_seams_are_feathered(synthetic_region_1024) -> None:
    """Neighbouring tiles are cross-faded: no step in brightness at tile edges."""
    _plan, rgb, _labels = synthetic_region_1024
    grey = rgb.astype(np.float32).mean(axis=2)
    for axis in (0, 1):
        # mean jump between neighbouring rows / columns; hard seams give ~4x the median
        jumps = np.abs(np.diff(grey, axis=axis)).mean(axis=1 - axis)
        at_seams = jumps[[255, 511, 767]].mean()
        assert at_seams < 1.5 * np.median(jumps), (axis, at_seams, np.median(jumps))


def test_cli_synth_region_writes_png_labels_and_json(tmp_path: Path, capsys) -> None:
    from calcinosis.inference.cli import main

    out = tmp_path / "slide" / "region.png"
    rc = main(
        [
            "synth",
            "--region",
            "320x256",
            "--out",
            str(out),
            "--stain",
            "von_kossa",
            "--seed",
            "3",
            "--shift",
            "0.2",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    img = cv2.imread(str(out))[:, :, ::-1]
    lab = cv2.imread(str(out.with_name("region_labels.png")), cv2.IMREAD_UNCHANGED)
    meta = json.loads(out.with_suffix(".json").read_text())
    rgb, labels = render_region(320, 256, seed=3, stain="von_kossa", shift=0.2, workers=1)
    assert np.array_equal(img, rgb) and np.array_equal(lab, labels)
    assert meta["width"] == 320 and meta["height"] == 256 and meta["mpp"] == NOMINAL_MPP
    assert meta["stain"] == "von_kossa" and meta["seed"] == 3 and meta["shift"] == 0.2
    assert len(meta["tile_classes"]) == meta["rows"] == 1
    assert len(meta["tile_classes"][0]) == meta["cols"] == 2
    assert "region.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--region", "2048"], "2048x2048"),
        (["--region", "20x20"], "--region"),
        (["--region", "512x512", "--stain", "congo_red"], "von_kossa"),
        (["--stain", "he"], "--region"),
    ],
)
def test_cli_synth_region_reports_bad_arguments(
    tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    from calcinosis.inference.cli import main

    out = tmp_path / ("r.png" if "--region" in argv else "data")
    rc = main(["synth", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def test_no_overflow_or_nan_in_any_class():
    # Distance transforms of masks with no zero (a trabecula filling the patch)
    # used to return FLT_MAX and overflow the lamella sines into NaN pixels.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for label in CLASS_NAMES:
            for seed in range(12):
                rgb, _ = render_patch(label, "he", seed, 64, mpp=2.0)
                assert rgb.dtype == np.uint8


def test_domain_randomisation_varies_the_drawing_not_the_labels():
    from calcinosis.training.synthetic.optics import style_settings

    styles = [style_settings(np.random.default_rng(s)) for s in range(200)]
    dens = np.array([s["coll_density"] for s in styles])
    assert dens.min() < 0.6 and dens.max() > 1.4  # loose to sclerotic dermis
    assert len({round(s["nuc_size"], 3) for s in styles}) > 150
    assert any(s["edge_blur"] == 0 for s in styles) and any(s["edge_blur"] > 0 for s in styles)
    # normal patches differ in collagen density a lot from seed to seed
    means = [render_patch("normal", "he", s, 64, mpp=2.0)[0].mean() for s in range(16)]
    assert np.ptp(means) > 25


def test_mix_dataset_alternates_styles_and_records_them(tmp_path):
    from calcinosis.training.synthetic import patch_seed, render_patch_b

    manifest = generate_dataset(tmp_path, 2, size=32, seed=4, workers=1, mpp=2.0, style="mix")
    rows = list(csv.DictReader(manifest.open()))
    assert {r["style"] for r in rows} == {"a", "b"}
    by_style = Counter(r["style"] for r in rows)
    assert by_style["a"] == by_style["b"]
    row = next(r for r in rows if r["style"] == "b")
    i = int(Path(row["path"]).stem.split("_")[-1])
    expected, _ = render_patch_b(row["label"], row["stain"], patch_seed(4, i), 32, mpp=2.0)
    assert np.array_equal(cv2.imread(str(tmp_path / row["path"]))[:, :, ::-1], expected)
    assert json.loads((tmp_path / "synthetic.json").read_text())["style"] == "mix"
    with pytest.raises(ConfigError, match="unknown style"):
        generate_dataset(tmp_path / "x", 1, size=32, style="c")


def test_supersampled_patches_are_area_averaged_and_keep_labels(tmp_path):
    from calcinosis.training.synthetic import (
        render_supersampled,
        supersample_factor,
    )

    rgb1, lab1 = render_supersampled(render_patch, "osteoma_cutis", "he", 3, 48, 0.0, 2.0, 1)
    assert np.array_equal(rgb1, render_patch("osteoma_cutis", "he", 3, 48, mpp=2.0)[0])
    rgb2, lab2 = render_supersampled(render_patch, "osteoma_cutis", "he", 3, 48, 0.0, 2.0, 2)
    fine, fine_lab = render_patch("osteoma_cutis", "he", 3, 96, mpp=1.0)
    assert rgb2.shape == (48, 48, 3) and lab2.shape == (48, 48)
    assert np.array_equal(rgb2, cv2.resize(fine, (48, 48), interpolation=cv2.INTER_AREA))
    assert set(np.unique(lab2)) <= set(np.unique(fine_lab))
    # the bone share survives the reduction
    assert abs((lab2 == 2).mean() - (fine_lab == 2).mean()) < 0.05
    factors = Counter(supersample_factor(0, i, 2) for i in range(400))
    assert set(factors) == {1, 2} and min(factors.values()) > 150
    assert supersample_factor(0, 5, 1) == 1
    m = generate_dataset(tmp_path, 1, size=32, workers=1, mpp=2.0, supersample=2)
    assert json.loads((m.parent / "synthetic.json").read_text())["supersample"] == 2
    with pytest.raises(ConfigError, match="supersample"):
        generate_dataset(tmp_path / "x", 1, size=32, supersample=9)
