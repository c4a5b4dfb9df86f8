"""Where training patches come from, how they are checked, and how they are served.

Three sources give the same list of :class:`Sample`:

* ``synthetic``: the built-in generator writes a dataset under
  ``<output_dir>/data`` (reused while its settings are unchanged);
* ``manifest``: a CSV file, ``path,label[,stain,mask_path,split,mpp,group]``;
* ``folders``: ``root/<class>/**/*.png`` (any supported image suffix, any case),
  masks optionally at ``root/masks/<class>/<same relative path>.png``.

Everything is validated *before* training starts (:func:`validate_samples`), so
a typo in row 3,000 of a manifest fails in seconds with the row number and the
fix rather than an hour into an epoch. During training one unreadable file
never kills an epoch: :class:`PatchDataset` logs it once and serves the next
sample instead.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import logging
import math
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from calcinosis.model.errors import DataError, ImageReadError
from calcinosis.model.fileio import atomic_write_text
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS, STAIN_NAMES
from calcinosis.training.imageio import IMAGE_EXTENSIONS, image_size, read_mask, read_rgb

__all__ = [
    "IGNORE_INDEX",
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

#: Target value the losses skip (torch's CrossEntropyLoss default): unknown
#: stain, and every pixel of a sample that has no mask.
IGNORE_INDEX = -100

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Resample a patch when its mpp differs from the training mpp by more than this.
MPP_TOLERANCE = 0.05

# Problems listed in one error message; the rest are counted.
_MAX_LISTED = 20


@dataclass
class Sample:
    """One labelled patch. ``mask_path`` and ``stain`` are optional."""

    path: Path
    label: str
    stain: str | None = None
    mask_path: Path | None = None
    split: str | None = None
    # Microns per pixel of this patch, if known; PatchDataset rescales to the training mpp.
    mpp: float | None = None
    # Patient / slide / block id: assign_splits keeps a group inside one split.
    group: str | None = None


# --------------------------------------------------------------------------- names


def _norm(text: str) -> str:
    """Case and separator-insensitive form: 'Calcinosis Cutis' -> 'calcinosis_cutis'."""
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


_STAIN_ALIASES = {
    "h&e": "he",
    "h_e": "he",
    "hne": "he",
    "hematoxylin_eosin": "he",
    "haematoxylin_eosin": "he",
    "vonkossa": "von_kossa",
    "kossa": "von_kossa",
    "vk": "von_kossa",
    "alizarin": "alizarin_red",
    "alizarinred": "alizarin_red",
    "alizarin_red_s": "alizarin_red",
    "ars": "alizarin_red",
}
_UNKNOWN_STAIN = {"", "unknown", "na", "n/a", "none", "?", "-"}
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def _name_map(names: Sequence[str]) -> dict[str, str]:
    return {_norm(n): n for n in names}


def _suggest(value: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(_norm(value), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _lookup_stain(value: str, stain_map: dict[str, str]) -> str | None:
    key = _norm(value)
    if key in stain_map:
        return stain_map[key]
    alias = _STAIN_ALIASES.get(key)
    if alias is not None and alias in stain_map:
        return stain_map[alias]
    raise KeyError(value)


# --------------------------------------------------------------------------- manifest

_REQUIRED = ("path", "label")
_OPTIONAL = ("stain", "mask_path", "split", "mpp", "group")


def _sniff_delimiter(first_line: str) -> str:
    """Excel in many European locales writes ';'-separated 'CSV'; accept it and tabs."""
    if "," in first_line:
        return ","
    for delim in (";", "\t"):
        if delim in first_line:
            return delim
    return ","


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text.strip()))
    return p if p.is_absolute() else base / p


def read_manifest(
    path: str | os.PathLike[str],
    class_names: Sequence[str] = CLASS_NAMES,
    stain_names: Sequence[str] = STAIN_NAMES,
    check_files: bool = True,
) -> list[Sample]:
    """Read and check a CSV manifest; every problem is reported at once.

    Columns: ``path,label`` required; ``stain``, ``mask_path``, ``split``
    (train/val/test), ``mpp``, ``group`` optional; others ignored. Paths are
    relative to the manifest's folder (absolute paths also work). An empty
    optional cell means unknown. Labels and stains match case- and
    separator-insensitively ('Calcinosis Cutis', 'H&E' are fine). Errors name the
    manifest, the file line (the header is line 1) and the data row.
    """
    manifest = Path(path)
    if not manifest.is_file():
        what = "is a folder" if manifest.is_dir() else "not found"
        raise DataError(
            f"manifest {what}: '{manifest}'. data.manifest must name a CSV file with the "
            "columns path,label[,stain,mask_path,split,mpp]"
        )
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest '{manifest}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as 'CSV UTF-8'"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read manifest '{manifest}': {exc}") from None

    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text), delimiter=_sniff_delimiter(first))
    header: list[str] | None = None
    for raw in reader:
        if any(cell.strip() for cell in raw):
            header = raw
            break
    if header is None:
        raise DataError(
            f"manifest '{manifest}' is empty; it needs a header line 'path,label' and one row "
            "per patch"
        )
    columns = [c.strip().lower() for c in header]
    dupes = sorted({c for c in columns if c and columns.count(c) > 1})
    if dupes:
        raise DataError(
            f"manifest '{manifest}' line {reader.line_num}: column(s) {', '.join(dupes)} appear "
            "more than once; keep one of each"
        )
    for req in _REQUIRED:
        if req not in columns:
            found = ", ".join(c for c in columns if c) or "(none)"
            close = difflib.get_close_matches(req, columns, n=1, cutoff=0.6)
            hint = f" (is '{close[0]}' meant to be '{req}'?)" if close else ""
            raise DataError(
                f"manifest '{manifest}' line {reader.line_num}: missing required column '{req}'"
                f"{hint}. Columns found: {found}. The header must contain path,label and may "
                f"contain {','.join(_OPTIONAL)}"
            )
    col = {name: columns.index(name) for name in (*_REQUIRED, *_OPTIONAL) if name in columns}

    base = manifest.parent
    class_map = _name_map(class_names)
    stain_map = _name_map(stain_names)
    problems: list[str] = []
    n_problems = 0
    samples: list[Sample] = []
    seen: dict[Path, tuple[int, str]] = {}
    row_no = 0

    def problem(line: int, row: int, msg: str) -> None:
        nonlocal n_problems
        n_problems += 1
        if len(problems) < _MAX_LISTED:
            problems.append(f"line {line} (data row {row}): {msg}")

    for raw in reader:
        if not any(cell.strip() for cell in raw) or raw[0].lstrip().startswith("#"):
            continue
        row_no += 1
        line = reader.line_num

        def cell(name: str, raw: list[str] = raw) -> str:
            i = col.get(name)
            return raw[i].strip() if i is not None and i < len(raw) else ""

        n_before = n_problems
        path_text, label_text = cell("path"), cell("label")
        if not path_text:
            problem(line, row_no, "empty 'path' cell; give the image file for this row")
        if not label_text:
            problem(line, row_no, f"empty 'label' cell; use one of {', '.join(class_names)}")
            label = None
        else:
            label = class_map.get(_norm(label_text))
            if label is None:
                problem(
                    line,
                    row_no,
                    f"unknown label '{label_text}'; valid labels: {', '.join(class_names)}"
                    f"{_suggest(label_text, class_names)}",
                )
        stain_text = cell("stain")
        stain = None
        if _norm(stain_text) not in _UNKNOWN_STAIN:
            try:
                stain = _lookup_stain(stain_text, stain_map)
            except KeyError:
                problem(
                    line,
                    row_no,
                    f"unknown stain '{stain_text}'; valid stains: {', '.join(stain_names)} "
                    f"(leave the cell empty if unknown){_suggest(stain_text, stain_names)}",
                )
        split_text = cell("split")
        split = None
        if split_text:
            key = _norm(split_text)
            split = _SPLIT_ALIASES.get(key, key)
            if split not in SPLITS:
                problem(
                    line,
                    row_no,
                    f"unknown split '{split_text}'; use train, val or test, or leave it empty "
                    "to have one assigned",
                )
        mpp_text = cell("mpp")
        mpp = None
        if mpp_text:
            try:
                mpp = float(mpp_text)
            except ValueError:
                mpp = float("nan")
            if not math.isfinite(mpp) or mpp <= 0:
                problem(
                    line,
                    row_no,
                    f"mpp '{mpp_text}' must be a positive number (microns per pixel, e.g. 0.5)",
                )
        group = cell("group") or None

        img_path = _resolve(base, path_text) if path_text else None
        mask_text = cell("mask_path")
        mask_path = _resolve(base, mask_text) if mask_text else None
        for kind, p in (("image", img_path), ("mask", mask_path)):
            if p is None:
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                problem(
                    line,
                    row_no,
                    f"{kind} '{p.name}' has suffix '{p.suffix}', not one of "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}; export patches as PNG or TIFF "
                    "(whole-slide files must be tiled first)",
                )
            elif check_files and not p.is_file():
                where = "a folder, not a file" if p.is_dir() else "not found"
                problem(
                    line,
                    row_no,
                    f"{kind} file {where}: '{p}' (paths are relative to the manifest's folder "
                    f"'{base}')",
                )
        if n_problems > n_before or img_path is None or label is None:
            continue
        prev = seen.get(img_path)
        if prev is not None:
            if prev[1] != label:
                problem(
                    line,
                    row_no,
                    f"'{path_text}' is also listed at data row {prev[0]} with label '{prev[1]}'; "
                    "one patch can have only one label",
                )
            else:
                log.warning(
                    "%s line %d: '%s' already listed at data row %d; using it once",
                    manifest,
                    line,
                    path_text,
                    prev[0],
                )
            continue
        seen[img_path] = (row_no, label)
        samples.append(Sample(img_path, label, stain, mask_path, split, mpp, group))

    if n_problems:
        more = (
            f"\n  ... and {n_problems - len(problems)} more" if n_problems > len(problems) else ""
        )
        raise DataError(
            f"manifest '{manifest}' has {n_problems} problem(s); fix them and run again "
            "(line numbers count the header as line 1):\n  - " + "\n  - ".join(problems) + more
        )
    if not samples:
        raise DataError(
            f"manifest '{manifest}' has a header but no data rows; add one row per patch "
            "(path,label,...)"
        )
    return samples


# --------------------------------------------------------------------------- class folders

#: Folder under a class-folder root that holds masks, mirroring the class folders.
MASKS_DIRNAME = "masks"


def _hidden(name: str) -> bool:
    # .DS_Store, ._foo.png (macOS AppleDouble), .ipynb_checkpoints, __MACOSX
    return name.startswith(".") or name.startswith("__")


def _stain_patterns(stain_names: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    patterns = []
    aliases: dict[str, list[str]] = defaultdict(list)
    for alias, target in _STAIN_ALIASES.items():
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
    class_map = _name_map(class_names)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    unknown = [d for d in subdirs if _norm(d.name) not in class_map and d.name != MASKS_DIRNAME]
    if unknown:
        names = ", ".join(f"'{d.name}'{_suggest(d.name, class_names)}" for d in unknown)
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
        if class_dir.name == MASKS_DIRNAME:
            continue
        label = class_map[_norm(class_dir.name)]
        mask_root = root / MASKS_DIRNAME / class_dir.name
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
    if not samples:
        found = ", ".join(d.name for d in subdirs) or "no sub-folders"
        raise DataError(
            f"no images found under '{root}' (found: {found}). Expected "
            f"'{root}/<class>/<patch>.png' with class folders among {', '.join(class_names)} "
            f"and image suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}"
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
    class_set, stain_set = set(class_names), set(stain_names)
    max_label = len(deposit_labels) - 1
    problems: list[str] = []
    n_problems = 0

    def problem(msg: str) -> None:
        nonlocal n_problems
        n_problems += 1
        if len(problems) < _MAX_LISTED:
            problems.append(msg)

    for s in samples:
        if s.label not in class_set:
            problem(
                f"'{s.path}': label '{s.label}' is not one of {', '.join(class_names)}"
                f"{_suggest(s.label, class_names)}"
            )
        if s.stain is not None and s.stain not in stain_set:
            problem(f"'{s.path}': stain '{s.stain}' is not one of {', '.join(stain_names)}")
        if s.split is not None and s.split not in SPLITS:
            problem(f"'{s.path}': split '{s.split}' is not one of train, val, test")

    sizes: Counter[tuple[int, int]] = Counter()
    large = 0
    if check_files:
        for s in samples:
            found, size = _check_files(s, max_label, deposit_labels)
            for msg in found:
                problem(msg)
            if size is not None:
                sizes[size] += 1
                if image_size_px:
                    scale = (s.mpp / target_mpp) if (s.mpp and target_mpp) else 1.0
                    if min(size) * scale > 2 * image_size_px:
                        large += 1
    if n_problems:
        more = (
            f"\n  ... and {n_problems - len(problems)} more" if n_problems > len(problems) else ""
        )
        raise DataError(
            f"{n_problems} problem(s) in the dataset; fix them and run again:\n  - "
            + "\n  - ".join(problems)
            + more
        )

    table = _count_table(samples, class_names)
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


# --------------------------------------------------------------------------- load_samples


def _ensure_synthetic(cfg: Any) -> Path:
    """Generate the synthetic dataset under ``<output_dir>/data`` unless an identical one is there.

    ``synth.json`` beside the manifest records the settings it was made with; it
    is written only after generation finished, so an interrupted run regenerates.
    """
    from calcinosis.training import synthetic  # the generator is heavy; import on use

    out = Path(cfg.output_dir) / "data"
    manifest, stamp = out / "manifest.csv", out / "synth.json"
    # Render at the resolution the model trains at, so no resampling blurs the patches.
    settings = {**dataclasses.asdict(cfg.data.synthetic), "mpp": float(cfg.data.mpp)}
    record = json.loads(
        json.dumps(
            {
                "settings": settings,
                "generator_version": getattr(synthetic, "GENERATOR_VERSION", None),
            }
        )
    )
    if manifest.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == record:
                log.info("reusing synthetic dataset %s", out)
                return manifest
        except (OSError, ValueError):
            pass
        log.info("synthetic settings changed; regenerating %s", out)
    stamp.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)
    for sub in ("images", "masks"):  # only what the generator itself writes
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    result = Path(synthetic.generate_dataset(out, **settings))
    atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    return result


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


# --------------------------------------------------------------------------- dataset


def _resample(
    image: np.ndarray, mask: np.ndarray | None, src_mpp: float, dst_mpp: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rescale a patch from ``src_mpp`` to ``dst_mpp`` (mask: nearest neighbour)."""
    factor = src_mpp / dst_mpp
    if abs(factor - 1.0) <= MPP_TOLERANCE:
        return image, mask
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return image, mask


Transform = Callable[..., dict[str, Any]]


class DecodedCache:
    """Decoded patches (image and mask, after rescaling) kept in memory.

    Reading and decoding a small PNG costs about as much as augmenting it, and
    training reads every patch once an epoch: keeping the decoded arrays saves
    that work from the second epoch on. Patches are kept first come, first
    kept, until ``max_bytes`` is reached (no eviction: training revisits every
    patch in turn, so any policy would evict what is needed next). Arrays are
    stored read-only, so a transform that writes into its input fails loudly
    instead of corrupting later epochs. Each process has its own: a DataLoader worker
    fills a copy, so memory grows with ``num_workers`` x ``max_bytes``.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[Any, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def put(self, key: Any, image: np.ndarray, mask: np.ndarray | None) -> None:
        size = image.nbytes + (mask.nbytes if mask is not None else 0)
        if key in self._items or self.nbytes + size > self.max_bytes:
            return
        image = np.ascontiguousarray(image)
        image.flags.writeable = False
        if mask is not None:
            mask = np.ascontiguousarray(mask)
            mask.flags.writeable = False
        self._items[key] = (image, mask)
        self.nbytes += size


class PatchDataset(Dataset):
    """Serves ``image``, ``label``, ``stain``, ``mask`` and ``index`` for each sample.

    ``transform(image=uint8 HWC, mask=uint8 HW | None)`` must return tensors (see
    :mod:`calcinosis.training.transforms`). Patches with a known ``mpp`` that
    differs from ``mpp`` by more than 5 % are rescaled first. An unreadable
    image (or mask) is logged once, recorded in ``bad_files`` (path -> reason,
    per process: DataLoader workers keep their own) and replaced by the next
    readable sample, whose index is the one returned. With a ``cache``
    (:class:`DecodedCache`, which datasets may share) each patch is read and
    decoded once per process.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str] = CLASS_NAMES,
        stain_names: Sequence[str] = STAIN_NAMES,
        transform: Transform | None = None,
        *,
        mpp: float | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.stain_names = list(stain_names)
        self.transform = transform
        self.mpp = mpp
        self.cache = cache
        self._class_idx = {c: i for i, c in enumerate(self.class_names)}
        self._stain_idx = {s: i for i, s in enumerate(self.stain_names)}
        unknown = sorted({s.label for s in self.samples} - set(self._class_idx))
        if unknown:
            raise DataError(
                f"samples have labels {unknown} that are not in class_names {self.class_names}"
            )
        self.bad_files: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Class index per sample (for weighted samplers and class weights)."""
        return [self._class_idx[s.label] for s in self.samples]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded image and mask of one sample, at the dataset's mpp; may raise."""
        s = self.samples[index]
        key = (str(s.path), str(s.mask_path), s.mpp, self.mpp)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        image, mask = self._read(s)
        if self.cache is not None:
            self.cache.put(key, image, mask)
        return image, mask

    def _read(self, s: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_rgb(s.path)
        mask = read_mask(s.mask_path) if s.mask_path is not None else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise DataError(
                f"mask '{s.mask_path}' is {mask.shape[1]}x{mask.shape[0]} but image "
                f"'{s.path}' is {image.shape[1]}x{image.shape[0]}"
            )
        if self.mpp and s.mpp:
            image, mask = _resample(image, mask, s.mpp, self.mpp)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            key = str(self.samples[i].path)
            if key in self.bad_files:
                continue
            try:
                image, mask = self.load(i)
            except (ImageReadError, DataError) as exc:
                self.bad_files[key] = str(exc)
                log.warning("skipping unreadable sample %d (%s): %s", i, key, exc)
                continue
            return self._package(i, image, mask)
        raise DataError(
            f"none of the {n} samples can be read; first problems: "
            + "; ".join(list(self.bad_files.values())[:3])
        )

    def _package(self, i: int, image: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
        s = self.samples[i]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            img_t, mask_t = out["image"], out.get("mask")
        else:
            img_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
            mask_t = torch.from_numpy(mask.astype(np.int64)) if mask is not None else None
        if mask_t is None or mask is None:
            mask_t = torch.full(tuple(img_t.shape[-2:]), IGNORE_INDEX, dtype=torch.int64)
        else:
            mask_t = torch.as_tensor(mask_t).to(torch.int64)
        stain = self._stain_idx.get(s.stain, IGNORE_INDEX) if s.stain else IGNORE_INDEX
        return {
            "image": img_t.to(torch.float32),
            "label": torch.tensor(self._class_idx[s.label], dtype=torch.int64),
            "stain": torch.tensor(stain, dtype=torch.int64),
            "mask": mask_t,
            "index": i,
        }
