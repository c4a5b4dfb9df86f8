"""Where training patches come from, how they are checked, and how they are served.

Three sources give the same list of :class:`Sample`:

* ``synthetic``: the built-in generator writes a dataset under
  ``<output_dir>/data`` (reused while its settings are unchanged);
* ``manifest``: a CSV file, ``path,label[,stain,mask_path,split,mpp,group]``
  (read by :func:`calcinosis.model.manifest.read_manifest`, shared with
  evaluation and the robustness table);
* ``folders``: ``root/<class>/**/*.png`` (any supported image suffix, any case),
  masks optionally at ``root/masks/<class>/<same relative path>.png``.

Everything is validated *before* training starts (:func:`validate_samples`), so
a typo in row 3,000 of a manifest fails in seconds with the row number and the
fix rather than an hour into an epoch. Serving the patches to a DataLoader is
:mod:`calcinosis.training.dataset`'s (:class:`PatchDataset`, imported here too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import DataError, ImageReadError
from calcinosis.model.imageio import IMAGE_EXTENSIONS, image_size, read_mask
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS, STAIN_NAMES
from calcinosis.model.manifest import (
    SPLITS,
    STAIN_ALIASES,
    Sample,
    name_map,
    normalise_name,
    read_manifest,
    suggestion,
)
from calcinosis.model.preprocess import MPP_TOLERANCE

from .dataset import DecodedCache, PatchDataset
from .metrics import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "MPP_TOLERANCE",
    "SPLITS",
    "DecodedCache",
    "PatchDataset",
    "Sample",
    "assign_splits",
    "load_samples",
    "read_manifest",
    "scan_class_folders",
    "split_counts",
    "validate_samples",
]

log = logging.getLogger(__name__)

# Problems listed in one error message; the rest are counted.
_MAX_LISTED = 20


# --------------------------------------------------------------------------- class folders

#: Folder under a class-folder root that holds masks, mirroring the class folders.
MASKS_DIRNAME = "masks"


def _hidden(name: str) -> bool:
    # .DS_Store, ._foo.png (macOS AppleDouble), .ipynb_checkpoints, __MACOSX
    return name.startswith(".") or name.startswith("__")


def _stain_patterns(stain_names: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    patterns = []
    aliases: dict[str, list[str]] = defaultdict(list)
    for alias, target in STAIN_ALIASES.items():
        if len(alias) >= 3 and alias != "ars":  # short aliases are too easy to hit by chance
            aliases[target].append(alias)
    for name in stain_names:
        forms = [r"[_\-\s]?".join(map(re.escape, name.split("_")))]
        forms += [re.escape(a) for a in aliases.get(name, [])]
        patterns.append(
            (name, re.compile(r"(?<![a-z0-9])(?:" + "|".join(forms) + r")(?![a-z0-9])"))
        )
    return patterns


def _stain_from_name(rel: Path, patterns: list[tuple[str, re.Pattern[str]]]) -> str | None:
    """A stain named as a token in the sub-folders or file name ('he_03.png', 'VK/x.png')."""
    text = "/".join([*rel.parent.parts, rel.stem]).lower()
    found = {name for name, pat in patterns if pat.search(text)}
    return found.pop() if len(found) == 1 else None


def scan_class_folders(
    root: str | os.PathLike[str],
    class_names: Sequence[str] = CLASS_NAMES,
    stain_names: Sequence[str] = STAIN_NAMES,
) -> list[Sample]:
    """Collect ``root/<class>/**/<image>`` (any supported suffix, any case).

    * Class folder names match the class names case- and separator-insensitively;
      any other non-hidden folder (except ``masks``) is an error naming it.
    * A mask, if present, is ``root/masks/<class>/<same relative path>.png``.
    * The stain is unknown unless a stain token (``he``, ``von_kossa``/``vonkossa``,
      ``alizarin_red``, ``h&e``) appears in the sub-folder or file names below the
      class folder, delimited by non-letters: ``he_03.png``, ``case7-HE.tif``,
      ``von_kossa/patch1.png``. Two different tokens -> unknown.
    * mpp and split are unknown (splits are assigned later).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"class-folder root {'is a file' if root.exists() else 'not found'}: '{root}'. "
            f"data.root must be a folder holding one sub-folder per class: {', '.join(class_names)}"
        )
    class_map = name_map(class_names)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    unknown = [
        d for d in subdirs if normalise_name(d.name) not in class_map and d.name != MASKS_DIRNAME
    ]
    if unknown:
        names = ", ".join(f"'{d.name}'{suggestion(d.name, class_names)}" for d in unknown)
        raise DataError(
            f"'{root}': folder(s) {names} are not class names. Rename them to one of "
            f"{', '.join(class_names)} (or move them out of the root)"
        )
    patterns = _stain_patterns(stain_names)
    loose = [
        p.name
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p.name)
    ]
    if loose:
        log.warning(
            "%s: %d image(s) directly in the root are ignored (e.g. %s); put them in a class "
            "folder",
            root,
            len(loose),
            loose[0],
        )
    samples: list[Sample] = []
    for class_dir in subdirs:
        if class_dir.name != MASKS_DIRNAME:
            label = class_map[normalise_name(class_dir.name)]
            mask_root = root / MASKS_DIRNAME / class_dir.name
            samples += _class_folder_samples(class_dir, label, mask_root, patterns)
    if not samples:
        found = ", ".join(d.name for d in subdirs) or "no sub-folders"
        raise DataError(
            f"no images found under '{root}' (found: {found}). Expected "
            f"'{root}/<class>/<patch>.png' with class folders among {', '.join(class_names)} "
            f"and image suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return samples


def _class_folder_samples(
    class_dir: Path, label: str, mask_root: Path, patterns: list[tuple[str, re.Pattern[str]]]
) -> list[Sample]:
    """The images under one class folder (sorted, hidden files skipped), with their masks."""
    samples = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for fname in sorted(filenames):
            if _hidden(fname) or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(class_dir)
            mask = (mask_root / rel).with_suffix(".png")
            samples.append(
                Sample(
                    path=path,
                    label=label,
                    stain=_stain_from_name(rel, patterns),
                    mask_path=mask if mask.is_file() else None,
                )
            )
    return samples


# --------------------------------------------------------------------------- splits


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for ``n`` items: rounded, >= 1 train, and >= 1 val/test
    when their fraction is > 0 and there are at least 3 items."""
    n_val = int(math.floor(n * val_fraction + 0.5))
    n_test = int(math.floor(n * test_fraction + 0.5))
    if n >= 3:
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n > 0 and n_val + n_test >= n:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    samples: Sequence[Sample], val_fraction: float, test_fraction: float, seed: int
) -> list[Sample]:
    """Give a split to every sample lacking one; splits already set are kept.

    Stratified by label and deterministic for a given seed and sample list
    (independent of input order). Samples sharing a ``group`` (patient, slide)
    go to the same split, so near-duplicate patches never straddle train and
    test; a group's stratum is its most common label.
    """
    out = list(samples)
    units: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, s in enumerate(out):
        if s.split is None:
            key = ("group", s.group) if s.group else ("path", str(s.path))
            units[key].append(i)
    strata: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, idx in units.items():
        counts = Counter(out[i].label for i in idx)
        top = max(counts.values())
        label = min(lab for lab, c in counts.items() if c == top)
        strata[label].append(key)
    rng = np.random.default_rng(seed)
    for label in sorted(strata):
        keys = sorted(strata[label])
        n = sum(len(units[k]) for k in keys)
        _, n_val, n_test = split_counts(n, val_fraction, test_fraction)
        got = {"test": 0, "val": 0}
        for j in rng.permutation(len(keys)):
            idx = units[keys[j]]
            if got["test"] < n_test:
                split = "test"
            elif got["val"] < n_val:
                split = "val"
            else:
                split = "train"
            if split != "train":
                got[split] += len(idx)
            for i in idx:
                out[i] = dataclasses.replace(out[i], split=split)
    return out


# --------------------------------------------------------------------------- validation


def _count_table(
    samples: Sequence[Sample], class_names: Sequence[str]
) -> dict[str, dict[str, int]]:
    table = {c: dict.fromkeys(SPLITS, 0) for c in class_names}
    for s in samples:
        if s.label in table and s.split in SPLITS:
            table[s.label][s.split] += 1
    return table


def _check_files(
    s: Sample, max_label: int, label_names: Sequence[str]
) -> tuple[list[str], tuple[int, int] | None]:
    """Header of the image; full read of the mask (its values must be checked)."""
    problems: list[str] = []
    try:
        w, h = image_size(s.path)
    except ImageReadError as exc:
        return [str(exc)], None
    if s.mask_path is None:
        return problems, (w, h)
    try:
        mask = read_mask(s.mask_path)
    except ImageReadError as exc:
        return [str(exc)], (w, h)
    if mask.shape != (h, w):
        problems.append(
            f"mask '{s.mask_path}' is {mask.shape[1]} x {mask.shape[0]} pixels but its image "
            f"'{s.path}' is {w} x {h}; a mask must have exactly the image's size"
        )
    if mask.size and int(mask.max()) > max_label:
        bad = np.unique(mask[mask > max_label])
        shown = ", ".join(map(str, bad[:10].tolist())) + (" ..." if bad.size > 10 else "")
        legend = ", ".join(f"{i} {n}" for i, n in enumerate(label_names))
        hint = (
            " It looks like a 0/255 binary mask: write the deposit's label value instead of 255."
            if bad.tolist() == [255]
            else ""
        )
        problems.append(
            f"mask '{s.mask_path}' has values {shown} outside 0..{max_label}; pixel labels are "
            f"{legend}.{hint}"
        )
    return problems, (w, h)


class _Problems:
    """Problems found while checking: the first ``_MAX_LISTED`` listed, all counted."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def add(self, msg: str) -> None:
        self.count += 1
        if len(self.listed) < _MAX_LISTED:
            self.listed.append(msg)

    def raise_if_any(self) -> None:
        if not self.count:
            return
        n_more = self.count - len(self.listed)
        more = f"\n  ... and {n_more} more" if n_more else ""
        raise DataError(
            f"{self.count} problem(s) in the dataset; fix them and run again:\n  - "
            + "\n  - ".join(self.listed)
            + more
        )


def validate_samples(
    samples: Sequence[Sample],
    class_names: Sequence[str] = CLASS_NAMES,
    stain_names: Sequence[str] = STAIN_NAMES,
    *,
    deposit_labels: Sequence[str] = DEPOSIT_LABELS,
    check_files: bool = True,
    image_size_px: int | None = None,
    target_mpp: float | None = None,
) -> dict[str, Any]:
    """Check everything that would otherwise fail mid-training; raise one DataError.

    Checks: labels, stains and splits are known; every image's header is
    readable; every mask has its image's size and values within the deposit
    labels; every class has at least one training sample. Images are not
    decoded (headers only); masks are, as their values matter. Returns a
    summary: sample counts per class and split, masks, stains, image sizes.
    """
    if not samples:
        raise DataError("no samples to train on; check data.source and its path")
    problems = _Problems()
    _check_names(samples, class_names, stain_names, problems)
    sizes: Counter[tuple[int, int]] = Counter()
    large = 0
    if check_files:
        for s in samples:
            found, size = _check_files(s, len(deposit_labels) - 1, deposit_labels)
            for msg in found:
                problems.add(msg)
            if size is not None:
                sizes[size] += 1
                scale = (s.mpp / target_mpp) if (s.mpp and target_mpp) else 1.0
                large += bool(image_size_px and min(size) * scale > 2 * image_size_px)
    problems.raise_if_any()

    table = _count_table(samples, class_names)
    _check_every_class_trains(table, class_names)
    for c, t in table.items():
        if t["val"] == 0:
            log.warning("class '%s' has no validation samples; its val metrics are undefined", c)
    if large:
        log.warning(
            "%d patch(es) are more than twice data.image_size=%d px at data.mpp: training sees "
            "random %d px windows and evaluation the centre window. Export patches of about "
            "that size, or raise data.image_size",
            large,
            image_size_px,
            image_size_px,
        )
    return {
        "n": len(samples),
        "counts": table,
        "with_mask": sum(s.mask_path is not None for s in samples),
        "stains": dict(Counter(s.stain or "unknown" for s in samples)),
        "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
    }


def _check_names(
    samples: Sequence[Sample],
    class_names: Sequence[str],
    stain_names: Sequence[str],
    problems: _Problems,
) -> None:
    class_set, stain_set = set(class_names), set(stain_names)
    for s in samples:
        if s.label not in class_set:
            problems.add(
                f"'{s.path}': label '{s.label}' is not one of {', '.join(class_names)}"
                f"{suggestion(s.label, class_names)}"
            )
        if s.stain is not None and s.stain not in stain_set:
            problems.add(f"'{s.path}': stain '{s.stain}' is not one of {', '.join(stain_names)}")
        if s.split is not None and s.split not in SPLITS:
            problems.add(f"'{s.path}': split '{s.split}' is not one of train, val, test")


def _check_every_class_trains(table: dict[str, dict[str, int]], class_names: Sequence[str]) -> None:
    empty = [c for c in class_names if table[c]["train"] == 0]
    if empty:
        rows = "; ".join(
            f"{c}: train {t['train']}, val {t['val']}, test {t['test']}" for c, t in table.items()
        )
        raise DataError(
            f"class(es) {', '.join(repr(c) for c in empty)} have no training samples "
            f"(per class: {rows}). Add patches of these classes, give some of them "
            "split=train, or remove the class from model.class_names"
        )


# --------------------------------------------------------------------------- load_samples


def _ensure_synthetic(cfg: Any) -> Path:
    """Generate the synthetic dataset under ``<output_dir>/data`` unless an identical one is there.

    The generator's own stamp (``synthetic.json``) says what a folder was made
    with; a dataset is reused only when it matches these settings exactly,
    ``data.val_fraction``/``test_fraction`` included (they set the manifest's
    split column).
    """
    from calcinosis.training import synthetic  # the generator is heavy; import on use

    out = Path(cfg.output_dir) / "data"
    settings = {
        **dataclasses.asdict(cfg.data.synthetic),
        # Render at the resolution the model trains at, so no resampling blurs the patches.
        "mpp": float(cfg.data.mpp),
        "val_fraction": float(cfg.data.val_fraction),
        "test_fraction": float(cfg.data.test_fraction),
    }
    if synthetic.dataset_is_current(out, **settings):
        log.info("reusing synthetic dataset %s", out)
        return out / "manifest.csv"
    if (out / "manifest.csv").is_file():
        log.info("synthetic settings changed; regenerating %s", out)
    (out / "synth.json").unlink(missing_ok=True)  # the stamp older versions wrote
    for sub in ("images", "masks"):  # only what the generator itself writes
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return Path(synthetic.generate_dataset(out, **settings))


def load_samples(cfg: Any) -> list[Sample]:
    """Samples of ``cfg.data.source``, each with a split, validated before training.

    For ``synthetic`` the dataset is generated under ``<output_dir>/data`` (or
    reused). Under torchrun, call this on rank 0 first (then barrier) so ranks do
    not generate the same files at once.
    """
    data = cfg.data
    class_names = list(cfg.model.class_names)
    stain_names = list(cfg.model.stain_names)
    if data.source == "synthetic":
        samples = read_manifest(_ensure_synthetic(cfg), class_names, stain_names)
    elif data.source == "manifest":
        samples = read_manifest(data.manifest, class_names, stain_names)
    elif data.source == "folders":
        samples = scan_class_folders(data.root, class_names, stain_names)
    else:  # the config validates this; keep a clear message anyway
        raise DataError(f"unknown data.source '{data.source}'; use synthetic, manifest or folders")
    samples = assign_splits(samples, data.val_fraction, data.test_fraction, cfg.seed)
    summary = validate_samples(
        samples,
        class_names,
        stain_names,
        deposit_labels=list(cfg.model.deposit_labels),
        image_size_px=data.image_size,
        target_mpp=data.mpp,
    )
    log.info(
        "data: %d samples (%d with masks); per class train/val/test: %s",
        summary["n"],
        summary["with_mask"],
        ", ".join(f"{c} {t['train']}/{t['val']}/{t['test']}" for c, t in summary["counts"].items()),
    )
    return samples
