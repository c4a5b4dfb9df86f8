"""CSV manifests: one reader for training, evaluation, prediction and the robustness table.

A manifest is a CSV file with a header and one row per image; paths are
relative to the manifest's folder (absolute paths and ``~`` also work).
:func:`read_rows` does what every user of a manifest needs (UTF-8 with or
without a byte-order mark, ``,``/``;``/tab separators as Excel writes them,
blank and ``#`` comment lines skipped, case-insensitive column names,
duplicate and missing columns named with the fix). On top of it:

* :func:`read_manifest`, strict, for labelled data (training, evaluation, the
  robustness table's real patches): ``path,label[,stain,mask_path,split,mpp,group]``,
  every problem reported at once with its line, as :class:`Sample` rows;
* ``calcinosis predict`` reads ``path[,mpp,split]`` rows leniently, one error
  row per bad line (``inference/inputs.py``).
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .imageio import IMAGE_EXTENSIONS
from .labels import CLASS_NAMES, STAIN_NAMES

__all__ = [
    "SPLITS",
    "STAIN_ALIASES",
    "Manifest",
    "ManifestRow",
    "Sample",
    "name_map",
    "normalise_name",
    "parse_mpp",
    "parse_split",
    "read_manifest",
    "read_rows",
    "suggestion",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

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


def normalise_name(text: str) -> str:
    """Case and separator-insensitive form: 'Calcinosis Cutis' -> 'calcinosis_cutis'."""
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


STAIN_ALIASES = {
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


def name_map(names: Sequence[str]) -> dict[str, str]:
    """Normalised name -> the name itself, for case-insensitive lookups."""
    return {normalise_name(n): n for n in names}


def suggestion(value: str, valid: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest valid name, or ""."""
    close = difflib.get_close_matches(normalise_name(value), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _lookup_stain(value: str, stain_map: dict[str, str]) -> str | None:
    key = normalise_name(value)
    if key in stain_map:
        return stain_map[key]
    alias = STAIN_ALIASES.get(key)
    if alias is not None and alias in stain_map:
        return stain_map[alias]
    raise KeyError(value)


def parse_split(text: str) -> str | None:
    """``train``/``val``/``test`` (aliases such as 'Validation' accepted); '' is None.

    Raises ValueError for anything else.
    """
    if not text.strip():
        return None
    key = normalise_name(text)
    split = _SPLIT_ALIASES.get(key, key)
    if split not in SPLITS:
        raise ValueError(text)
    return split


def parse_mpp(text: str) -> float | None:
    """A positive, finite microns-per-pixel value; '' is None. Raises ValueError otherwise."""
    if not text.strip():
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(text)
    return mpp


# --------------------------------------------------------------------------- rows


@dataclass
class ManifestRow:
    """One data row: where it is in the file and its cells by lower-case column name."""

    line: int  # the file line (the header is line 1)
    number: int  # the data row, counting from 1
    cells: dict[str, str]

    def get(self, column: str) -> str:
        """The stripped cell of ``column``, '' when the column or cell is absent."""
        return self.cells.get(column, "")


@dataclass
class Manifest:
    path: Path
    columns: list[str]
    rows: list[ManifestRow]

    def resolve(self, text: str) -> Path:
        """A path cell as a path: relative to the manifest's folder, ``~`` expanded."""
        p = Path(os.path.expanduser(text.strip()))
        return p if p.is_absolute() else self.path.parent / p


def _sniff_delimiter(first_line: str) -> str:
    """Excel in many European locales writes ';'-separated 'CSV'; accept it and tabs."""
    if "," in first_line:
        return ","
    for delim in (";", "\t"):
        if delim in first_line:
            return delim
    return ","


def read_rows(
    path: str | os.PathLike[str],
    required: Sequence[str] = ("path",),
    *,
    optional: Sequence[str] = (),
    missing_hint: str = "data.manifest must name a CSV file with the columns "
    "path,label[,stain,mask_path,split,mpp]",
) -> Manifest:
    """The header and data rows of a CSV manifest, with file-level problems as DataError.

    ``required`` columns must be present (a near miss is suggested);
    ``optional`` ones are only named in that error's help. ``missing_hint``
    ends the message for a manifest that is not there.
    """
    manifest = Path(path)
    if not manifest.is_file():
        what = "is a folder" if manifest.is_dir() else "not found"
        raise DataError(f"manifest {what}: '{manifest}'. {missing_hint}")
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
            f"manifest '{manifest}' is empty; it needs a header line "
            f"'{','.join(required)}' and one row per patch"
        )
    columns = [c.strip().lower() for c in header]
    dupes = sorted({c for c in columns if c and columns.count(c) > 1})
    if dupes:
        raise DataError(
            f"manifest '{manifest}' line {reader.line_num}: column(s) {', '.join(dupes)} appear "
            "more than once; keep one of each"
        )
    for req in required:
        if req not in columns:
            found = ", ".join(c for c in columns if c) or "(none)"
            close = difflib.get_close_matches(req, columns, n=1, cutoff=0.6)
            hint = f" (is '{close[0]}' meant to be '{req}'?)" if close else ""
            may = f" and may contain {','.join(optional)}" if optional else ""
            raise DataError(
                f"manifest '{manifest}' line {reader.line_num}: missing required column '{req}'"
                f"{hint}. Columns found: {found}. The header must contain "
                f"{','.join(required)}{may}"
            )
    col = {name: i for i, name in enumerate(columns) if name}
    rows: list[ManifestRow] = []
    for raw in reader:
        if not any(cell.strip() for cell in raw) or raw[0].lstrip().startswith("#"):
            continue
        cells = {name: raw[i].strip() for name, i in col.items() if i < len(raw)}
        rows.append(ManifestRow(reader.line_num, len(rows) + 1, cells))
    return Manifest(manifest, columns, rows)


# --------------------------------------------------------------------------- labelled patches

_REQUIRED = ("path", "label")
_OPTIONAL = ("stain", "mask_path", "split", "mpp", "group")


def read_manifest(
    path: str | os.PathLike[str],
    class_names: Sequence[str] = CLASS_NAMES,
    stain_names: Sequence[str] = STAIN_NAMES,
    check_files: bool = True,
) -> list[Sample]:
    """Read and check a CSV manifest of labelled patches; every problem is reported at once.

    Columns: ``path,label`` required; ``stain``, ``mask_path``, ``split``
    (train/val/test), ``mpp``, ``group`` optional; others ignored. Paths are
    relative to the manifest's folder (absolute paths also work). An empty
    optional cell means unknown. Labels and stains match case- and
    separator-insensitively ('Calcinosis Cutis', 'H&E' are fine). Errors name the
    manifest, the file line (the header is line 1) and the data row.
    """
    man = read_rows(path, _REQUIRED, optional=_OPTIONAL)
    manifest = man.path
    base = manifest.parent
    class_map = name_map(class_names)
    stain_map = name_map(stain_names)
    problems: list[str] = []
    n_problems = 0
    samples: list[Sample] = []
    seen: dict[Path, tuple[int, str]] = {}

    def problem(line: int, row: int, msg: str) -> None:
        nonlocal n_problems
        n_problems += 1
        if len(problems) < _MAX_LISTED:
            problems.append(f"line {line} (data row {row}): {msg}")

    for r in man.rows:
        line, row_no, cell = r.line, r.number, r.get
        n_before = n_problems
        path_text, label_text = cell("path"), cell("label")
        if not path_text:
            problem(line, row_no, "empty 'path' cell; give the image file for this row")
        if not label_text:
            problem(line, row_no, f"empty 'label' cell; use one of {', '.join(class_names)}")
            label = None
        else:
            label = class_map.get(normalise_name(label_text))
            if label is None:
                problem(
                    line,
                    row_no,
                    f"unknown label '{label_text}'; valid labels: {', '.join(class_names)}"
                    f"{suggestion(label_text, class_names)}",
                )
        stain_text = cell("stain")
        stain = None
        if normalise_name(stain_text) not in _UNKNOWN_STAIN:
            try:
                stain = _lookup_stain(stain_text, stain_map)
            except KeyError:
                problem(
                    line,
                    row_no,
                    f"unknown stain '{stain_text}'; valid stains: {', '.join(stain_names)} "
                    f"(leave the cell empty if unknown){suggestion(stain_text, stain_names)}",
                )
        split_text = cell("split")
        split = None
        try:
            split = parse_split(split_text)
        except ValueError:
            problem(
                line,
                row_no,
                f"unknown split '{split_text}'; use train, val or test, or leave it empty "
                "to have one assigned",
            )
        mpp_text = cell("mpp")
        mpp = None
        try:
            mpp = parse_mpp(mpp_text)
        except ValueError:
            problem(
                line,
                row_no,
                f"mpp '{mpp_text}' must be a positive number (microns per pixel, e.g. 0.5)",
            )
        group = cell("group") or None

        img_path = man.resolve(path_text) if path_text else None
        mask_text = cell("mask_path")
        mask_path = man.resolve(mask_text) if mask_text else None
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
