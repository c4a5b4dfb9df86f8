"""A synthetic dataset on disk: images/, masks/, manifest.csv with splits, synthetic.json.

``generate_dataset`` derives each patch's seed from ``(seed, i)`` and writes
byte-identical files whatever the number of worker processes.
``synthetic.json`` (:func:`dataset_stamp`) records the settings a dataset was
made with, so a cached one can be reused only when they match
(:func:`dataset_is_current`).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from calcinosis.model.errors import ConfigError
from calcinosis.model.fileio import atomic_write_text
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES

from .codec import write_png
from .contract import GENERATOR_VERSION, NOMINAL_MPP
from .patches import (
    check_style,
    patch_seed,
    patch_style,
    render_supersampled,
    renderer,
    supersample_factor,
)
from .style_b import STYLE_B_VERSION
from .workers import map_in_workers

MANIFEST_COLUMNS = ("path", "label", "stain", "mask_path", "split", "mpp", "style")
#: The dataset's stamp file: the settings it was made with (:func:`dataset_stamp`).
STAMP_NAME = "synthetic.json"
#: Default shares of each class and stain held out for validation and test.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15

# one chunk of patches for a worker: (out_dir, [(label, stain, i)], seed, size, shift,
# mpp, style, supersample)
_Chunk = tuple[str, list[tuple[str, str, int]], int, int, float, float, str, int]


def _rel_paths(label: str, stain: str, i: int) -> tuple[str, str]:
    name = f"{stain}_{i:04d}.png"
    return f"images/{label}/{name}", f"masks/{label}/{name}"


def _render_chunk(job: _Chunk) -> int:
    out, tasks, seed, size, shift, mpp, style, supersample = job
    root = Path(out)
    for label, stain, i in tasks:
        render = renderer(patch_style(style, i))
        factor = supersample_factor(seed, i, supersample)
        rgb, labels = render_supersampled(
            render, label, stain, patch_seed(seed, i), size, shift, mpp, factor
        )
        img_rel, mask_rel = _rel_paths(label, stain, i)
        write_png(root / img_rel, rgb)
        write_png(root / mask_rel, labels)
    return len(tasks)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= v < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {v}")
    if not val_fraction + test_fraction < 1:
        raise ConfigError(
            f"val_fraction + test_fraction must be < 1 (some patches must train), "
            f"got {val_fraction} + {test_fraction}"
        )


def assign_synthetic_splits(
    n_per_class_stain: int,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> dict[tuple[str, str, int], str]:
    """train/val/test for every (class, stain, index), stratified and deterministic.

    Within each class the stain groups are laid end to end and split by a
    running quota (by default 70/15/15), each group shuffled first; so every
    (class, stain) gets about those shares, and with the defaults every class
    gets all three splits from two patches per (class, stain) on.
    """
    _check_fractions(val_fraction, test_fraction)
    out: dict[tuple[str, str, int], str] = {}
    names = ["train", "val", "test"]
    fracs = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    for ci, label in enumerate(CLASS_NAMES):
        counts = np.zeros(len(names))
        k = 0
        for si, stain in enumerate(STAIN_NAMES):
            order = np.random.default_rng([int(seed) & 0xFFFFFFFF, ci, si, 7]).permutation(
                n_per_class_stain
            )
            for i in order:
                deficit = fracs * (k + 1) - counts
                # largest deficit wins; ties go to val/test so small sets still get them
                j = max(range(len(names)), key=lambda t: (round(deficit[t], 9), t))
                counts[j] += 1
                k += 1
                out[(label, stain, int(i))] = names[j]
    return out


def dataset_stamp(**settings) -> dict:
    """What ``synthetic.json`` records: the renderers' versions and every argument of
    :func:`generate_dataset` given in ``settings``, its defaults filled in (``out_dir``
    and ``workers`` aside: they do not change the files)."""
    bound = inspect.signature(generate_dataset).bind(None, **settings)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "workers")}
    return {"generator_version": GENERATOR_VERSION, "style_b_version": STYLE_B_VERSION, **args}


def dataset_is_current(out_dir: str | os.PathLike, **settings) -> bool:
    """Whether ``out_dir`` holds a complete dataset generated with exactly these settings.

    ``settings`` are :func:`generate_dataset`'s (``workers`` aside, which does
    not change the files). Complete means manifest.csv is there (written last).
    """
    root = Path(out_dir)
    if not (root / "manifest.csv").is_file():
        return False
    try:
        found = json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == json.loads(json.dumps(dataset_stamp(**settings)))


def _check_dataset_args(
    n_per_class_stain: int, size: int, shift: float, workers: int, style: str, supersample: int
) -> None:
    check_style(style)
    if not 1 <= supersample <= 4:
        raise ConfigError(f"supersample must be 1 to 4, got {supersample}")
    if n_per_class_stain < 1:
        raise ConfigError(f"n_per_class_stain must be >= 1, got {n_per_class_stain}")
    if size < 32:
        raise ConfigError(f"size must be >= 32 pixels, got {size}")
    if shift < 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")


def _manifest_text(tasks: list[tuple[str, str, int]], splits: dict, mpp: float, style: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for label, stain, i in tasks:
        img_rel, mask_rel = _rel_paths(label, stain, i)
        split = splits[(label, stain, i)]
        writer.writerow([img_rel, label, stain, mask_rel, split, f"{mpp:g}", patch_style(style, i)])
    return buf.getvalue()


def generate_dataset(
    out_dir: str | os.PathLike,
    n_per_class_stain: int,
    size: int = 128,
    seed: int = 0,
    shift: float = 0.0,
    workers: int = 0,
    *,
    mpp: float = NOMINAL_MPP,
    style: str = "a",
    supersample: int = 1,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> Path:
    """Write images/, masks/ and manifest.csv for 5 classes x 3 stains x n patches.

    With ``supersample`` N > 1 each patch is drawn at a factor of 1..N times
    finer than ``mpp`` (random per patch) and area-averaged down
    (:func:`render_supersampled`), as a scanner's pyramid levels are.

    ``style`` is ``a``, ``b`` or ``mix`` (see :data:`STYLES`); the manifest's
    ``style`` column says which drew each patch, its ``split`` column holds
    ``val_fraction`` and ``test_fraction`` of each class and stain for
    validation and test. A manifest or stamp already in ``out_dir`` is removed
    first and the manifest is written last (atomically), so its presence means
    the dataset is complete. Returns the manifest path.
    """
    # the stamp first, while locals() holds nothing but the arguments
    stamp = dataset_stamp(**{k: v for k, v in locals().items() if k != "out_dir"})
    _check_dataset_args(n_per_class_stain, size, shift, workers, style, supersample)
    _check_fractions(val_fraction, test_fraction)
    root = Path(out_dir)
    manifest = root / "manifest.csv"
    for stale in (manifest, root / STAMP_NAME):  # an interrupted run must not look complete
        stale.unlink(missing_ok=True)
    for label in CLASS_NAMES:
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        (root / "masks" / label).mkdir(parents=True, exist_ok=True)
    tasks = [
        (lab, st, i) for lab in CLASS_NAMES for st in STAIN_NAMES for i in range(n_per_class_stain)
    ]
    workers = workers or os.cpu_count() or 1
    workers = min(workers, max(1, len(tasks) // 8))
    chunk = max(1, min(32, math.ceil(len(tasks) / (workers * 4))))
    settings = (int(seed), int(size), float(shift), float(mpp), style, int(supersample))
    jobs = [(str(root), tasks[j : j + chunk], *settings) for j in range(0, len(tasks), chunk)]
    for _ in map_in_workers(_render_chunk, jobs, workers, ordered=False):
        pass
    splits = assign_synthetic_splits(n_per_class_stain, seed, val_fraction, test_fraction)
    atomic_write_text(root / STAMP_NAME, json.dumps(stamp, indent=2) + "\n")
    atomic_write_text(manifest, _manifest_text(tasks, splits, mpp, style))
    return manifest


def make_fixtures(out_dir: str | os.PathLike) -> Path:
    """The committed test fixture set: 5 classes x 3 stains x 2 patches at 64 px."""
    return generate_dataset(out_dir, 2, size=64, seed=0, shift=0.0, workers=1)
