"""Style B renderer: contract, determinism, lesion labels and stain chemistry."""

from __future__ import annotations

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
from calcinosis.training.synthetic import STYLE_B_VERSION, render_patch_b

DEMO = {"size": 64, "mpp": 2.0}  # the demo's setting: 128 um of tissue in 64 px
SEEDS = range(6)
DEPOSIT_CLASSES = [c for c in CLASS_NAMES if c != "normal"]


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32).mean(axis=2)


def _tissue(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label-0 pixels that hold tissue, not bare glass."""
    grey = _grey(rgb)
    return (labels == 0) & (grey < np.percentile(grey, 99) - 12)


def _pooled(label: str, stain: str, value: int, seeds=SEEDS, **kw):
    """Pixels of deposit ``value`` and of the tissue around it, pooled over seeds."""
    dep, rest = [], []
    for seed in seeds:
        rgb, labels = render_patch_b(label, stain, seed, **(DEMO | kw))
        dep.append(rgb[labels == value].astype(np.float32))
        rest.append(rgb[_tissue(rgb, labels)].astype(np.float32))
    return np.concatenate(dep), np.concatenate(rest)


def test_version_is_an_int() -> None:
    assert isinstance(STYLE_B_VERSION, int) and STYLE_B_VERSION >= 1


@pytest.mark.parametrize("stain", STAIN_NAMES)
@pytest.mark.parametrize("label", CLASS_NAMES)
def test_shapes_dtypes_and_label_values(label: str, stain: str) -> None:
    for seed in range(3):
        rgb, labels = render_patch_b(label, stain, seed, **DEMO)
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        assert labels.shape == (64, 64) and labels.dtype == np.uint8
        assert rgb.flags.c_contiguous and labels.flags.c_contiguous
        assert set(np.unique(labels).tolist()) <= {0, CLASS_DEPOSIT[label]}


@pytest.mark.parametrize(("size", "mpp"), [(16, 0.5), (100, 0.5), (224, 1.0)])
def test_other_sizes_and_scales(size: int, mpp: float) -> None:
    rgb, labels = render_patch_b("osteoma_cutis", "he", 1, size, mpp=mpp)
    assert rgb.shape == (size, size, 3) and labels.shape == (size, size)


def test_deterministic_in_its_arguments() -> None:
    for label in CLASS_NAMES:
        a = render_patch_b(label, "he", 7, **DEMO)
        b = render_patch_b(label, "he", 7, **DEMO)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        c = render_patch_b(label, "he", 8, **DEMO)
        assert not np.array_equal(a[0], c[0])
        d = render_patch_b(label, "von_kossa", 7, **DEMO)
        assert not np.array_equal(a[0], d[0])


def test_large_seeds_are_accepted() -> None:
    a, _ = render_patch_b("gout", "he", 2**63 + 5, **DEMO)
    b, _ = render_patch_b("gout", "he", -3, **DEMO)
    assert a.shape == b.shape == (64, 64, 3)


@pytest.mark.parametrize("stain", STAIN_NAMES)
@pytest.mark.parametrize("label", DEPOSIT_CLASSES)
def test_lesion_patches_show_their_lesion(label: str, stain: str) -> None:
    value = CLASS_DEPOSIT[label]
    for seed in SEEDS:
        _, labels = render_patch_b(label, stain, seed, **DEMO)
        frac = float(np.mean(labels == value))
        assert frac >= 0.05, (label, stain, seed, frac)


@pytest.mark.parametrize(("size", "mpp"), [(224, 1.0), (128, 0.5)])
def test_lesion_fraction_at_other_scales(size: int, mpp: float) -> None:
    for label in DEPOSIT_CLASSES:
        for seed in range(2):
            _, labels = render_patch_b(label, "he", seed, size, mpp=mpp)
            assert np.mean(labels == CLASS_DEPOSIT[label]) >= 0.05, (label, seed)


@pytest.mark.parametrize("stain", STAIN_NAMES)
def test_normal_has_no_deposit(stain: str) -> None:
    for seed in range(10):
        _, labels = render_patch_b("normal", stain, seed, **DEMO)
        assert not labels.any()


def test_von_kossa_blackens_calcium_and_bone() -> None:
    for label, value in (("calcinosis_cutis", CALCIUM), ("osteoma_cutis", BONE)):
        dep, rest = _pooled(label, "von_kossa", value)
        assert dep.mean() < 0.55 * rest.mean(), (label, dep.mean(), rest.mean())
        assert dep.mean() < 110, label


def test_alizarin_reddens_calcium_and_bone() -> None:
    for label, value in (("calcinosis_cutis", CALCIUM), ("osteoma_cutis", BONE)):
        dep, rest = _pooled(label, "alizarin_red", value)

        def redness(px: np.ndarray) -> float:
            return float((px[:, 0] - px[:, 1:].mean(axis=1)).mean())

        assert redness(dep) > redness(rest) + 60, (label, redness(dep), redness(rest))


def test_he_calcium_is_basophilic() -> None:
    dep, rest = _pooled("calcinosis_cutis", "he", CALCIUM)
    blue = lambda px: float((px[:, 2] - px[:, 0]).mean())  # noqa: E731
    assert blue(dep) > blue(rest) + 30, (blue(dep), blue(rest))
    assert dep.mean() < rest.mean() - 40


def test_he_bone_is_eosinophilic() -> None:
    dep, _ = _pooled("osteoma_cutis", "he", BONE)
    assert float((dep[:, 0] - dep[:, 2]).mean()) > 10  # pink: more red than blue


@pytest.mark.parametrize("stain", ["von_kossa", "alizarin_red"])
def test_urate_and_amyloid_are_negative_in_special_stains(stain: str) -> None:
    for label, value in (("gout", URATE), ("amyloidosis", AMYLOID)):
        dep, rest = _pooled(label, stain, value)
        assert dep.mean() > 170, (label, stain, dep.mean())
        assert dep.mean() > 0.9 * rest.mean(), (label, stain, dep.mean(), rest.mean())
        if stain == "alizarin_red":
            assert float((dep[:, 0] - dep[:, 1:].mean(axis=1)).mean()) < 25


@pytest.mark.parametrize("stain", STAIN_NAMES)
def test_shift_changes_the_image_not_the_labels(stain: str) -> None:
    for label in CLASS_NAMES:
        for seed in range(2):
            a_rgb, a_lab = render_patch_b(label, stain, seed, shift=0.0, **DEMO)
            b_rgb, b_lab = render_patch_b(label, stain, seed, shift=1.0, **DEMO)
            assert np.array_equal(a_lab, b_lab)
            diff = np.abs(a_rgb.astype(np.int16) - b_rgb.astype(np.int16)).mean()
            assert diff > 3, (label, stain, seed, diff)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("calcinosis", "he", 0), {}),
        (("gout", "masson", 0), {}),
        (("gout", "he", 0, 8), {}),
        (("gout", "he", 0, 64, -0.5), {}),
        (("gout", "he", 0, 64), {"mpp": 0.0}),
        (("gout", "he", 0, 64), {"mpp": float("nan")}),
    ],
)
def test_bad_arguments_raise_config_error(args, kwargs) -> None:
    with pytest.raises(ConfigError):
        render_patch_b(*args, **kwargs)
