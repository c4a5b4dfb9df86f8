"""What to run on: files, folders and manifests expanded into images.

``calcinosis predict`` takes any mix of image files, whole-slide files,
folders (searched recursively) and CSV manifests (:func:`collect_inputs`);
``calcinosis export --int8-calibration`` and ``calcinosis bench --images``
take folders, manifests or ``.npy`` arrays of images (:func:`load_images`).
:func:`decoded_chunks` decodes ``predict``'s inputs in its thread pool, one
chunk ahead of the network.
Manifests are read by :mod:`calcinosis.model.manifest`, the reader training
uses too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError, DataError, ImageReadError
from calcinosis.model.imageio import IMAGE_EXTENSIONS, load_image
from calcinosis.model.manifest import parse_mpp, parse_split, read_rows

from .result import error_reason
from .slide import SLIDE_ONLY_EXTENSIONS

__all__ = ["PIXEL_BUDGET", "InputItem", "collect_inputs", "decoded_chunks", "load_images"]


@dataclass
class InputItem:
    """One image to predict, with where it was listed."""

    path: Path
    mpp: float | None = None
    source: str = ""  # the argument (file, folder or manifest) that named it
    error: str | None = None  # known before reading (missing file, bad manifest row)


# --------------------------------------------------------------------------- inputs


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    exclude: Path | None = None,
    default_mpp: float | None = None,
    split: str | None = None,
) -> list[InputItem]:
    """Expand files, folders (recursive) and CSV manifests into a list of images.

    Folders contribute every file whose extension (any case) is an image
    extension, in sorted order; files under ``exclude`` (the output folder) are
    skipped so a re-run never predicts its own overlays. A manifest needs a
    ``path`` column (relative paths are relative to the manifest) and may have
    an ``mpp`` column; with ``split``, only its rows of that split (a ``split``
    column) are taken. A path that does not exist becomes an error row.
    """
    extensions = IMAGE_EXTENSIONS | SLIDE_ONLY_EXTENSIONS
    items: list[InputItem] = []
    excl = exclude.resolve() if exclude is not None else None
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions),
                key=lambda f: str(f).lower(),
            )
            if excl is not None:
                found = [f for f in found if not _is_within(f.resolve(), excl)]
            if not found:
                print(f"warning: no images found in folder {p}", file=sys.stderr)
            items.extend(InputItem(f, default_mpp, str(raw)) for f in found)
        elif p.suffix.lower() == ".csv" and p.is_file():
            items.extend(_manifest_items(p, default_mpp, split))
        elif p.is_file():
            items.append(InputItem(p, default_mpp, str(raw)))
        else:
            items.append(
                InputItem(
                    p,
                    default_mpp,
                    str(raw),
                    error=f"input {p} does not exist (no such file or folder)",
                )
            )
    # The same file listed twice is predicted once.
    seen: set[str] = set()
    unique: list[InputItem] = []
    for it in items:
        key = str(it.path.resolve()) if it.error is None else f"missing:{it.path}"
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique


def _manifest_items(
    path: Path, default_mpp: float | None, split: str | None = None
) -> list[InputItem]:
    """A ``path[,mpp,split]`` manifest's rows; a bad row becomes an error item, not a failure."""
    man = read_rows(
        path,
        ("path",),
        optional=("mpp", "split"),
        missing_hint="name a CSV file with a 'path' column",
    )
    wanted = None
    if split is not None:
        if "split" not in man.columns:
            raise DataError(
                f"manifest {path} has no 'split' column, so --split {split} cannot select "
                "rows; drop --split or add the column"
            )
        try:
            wanted = parse_split(split)
        except ValueError:
            wanted = split  # selects nothing, as a split no row has
    items = []
    for row in man.rows:
        src = f"{path}:{row.line}"
        if wanted is not None:
            try:
                if parse_split(row.get("split")) != wanted:
                    continue
            except ValueError:
                continue
        rel = row.get("path")
        if not rel:
            items.append(
                InputItem(
                    path / f"<row {row.line}>", default_mpp, src, error=f"{src}: empty 'path'"
                )
            )
            continue
        p = man.resolve(rel)
        mpp = default_mpp
        if row.get("mpp"):
            try:
                mpp = parse_mpp(row.get("mpp"))
            except ValueError:
                items.append(
                    InputItem(
                        p,
                        None,
                        src,
                        error=f"{src}: mpp {row.get('mpp')!r} is not a positive number "
                        "(microns per pixel)",
                    )
                )
                continue
        err = None if p.is_file() else f"{src}: image {p} does not exist"
        items.append(InputItem(p, mpp, src, error=err))
    return items


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def load_images(
    sources: Sequence[str | os.PathLike[str]], *, limit: int | None = None
) -> list[np.ndarray]:
    """uint8 RGB images from folders, manifests, image files or ``.npy`` arrays.

    A ``.npy`` file holds one ``(H, W, 3)`` image or a stack ``(N, H, W, 3)``.
    Whole-slide files are skipped (they are not patches). With ``limit``, at
    most that many images, evenly spread over what was found, are read. Any
    image that cannot be read, or finding none, is a :class:`DataError`.
    """
    arrays: list[np.ndarray] = []
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.suffix.lower() == ".npy" and p.is_file():
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{p}: not a numpy array of images ({exc})") from None
            arrays.extend([a] if a.ndim in (2, 3) else list(a))
            continue
        items = collect_inputs([p])
        bad = [it for it in items if it.error]
        if bad:
            raise DataError(f"images from {p}: {bad[0].error}")
        files += [it.path for it in items if it.path.suffix.lower() in IMAGE_EXTENSIONS]
    named: list[np.ndarray | Path] = [*arrays, *files]
    if not named:
        raise DataError(
            f"no images found in {', '.join(map(str, sources))} (give a folder of patches, a "
            "manifest with a 'path' column or a .npy array)"
        )
    if limit is not None and len(named) > limit:
        keep = np.unique(np.linspace(0, len(named) - 1, max(1, limit)).round().astype(int))
        named = [named[i] for i in keep]
    out = []
    for item in named:
        try:
            out.append(load_image(item))
        except ImageReadError as exc:
            where = item if isinstance(item, Path) else "a .npy image"
            raise DataError(f"images: {where}: {exc}") from None
    return out


# --------------------------------------------------------------------------- decoding ahead

#: Pixels decoded ahead of the model at most (about 200 MB of RGB).
PIXEL_BUDGET = 64_000_000


def decoded_chunks(
    items: list[InputItem],
    pool: ThreadPoolExecutor,
    batch_size: int,
    max_pixels: int | None = None,
    indices: Sequence[int] | None = None,
    prepare: Callable[..., Any] | None = None,
) -> Iterator[tuple[list[int], dict[int, Any]]]:
    """Chunks of item indices with their decoded images, decoding one chunk ahead.

    A chunk holds up to ``batch_size`` images and about ``PIXEL_BUDGET`` pixels
    (a big region is a chunk of its own), so at most two chunks of pixels are
    in memory while the model works on one of them. Images above ``max_pixels``
    (None: ``imageio.DEFAULT_MAX_PIXELS``; 0: no limit) are never decoded.
    ``indices`` restricts the work to those items (default: all). With
    ``prepare`` (``Predictor.prepare``), each decoding thread also prepares its
    image, and the values are prepared images instead of arrays; a value is
    the exception instead when reading or preparing failed.
    """
    from calcinosis.model.imageio import image_size

    def plan() -> Iterator[list[int]]:
        chunk: list[int] = []
        pixels = 0
        for i in range(len(items)) if indices is None else indices:
            it = items[i]
            px = 0
            if it.error is None:
                try:
                    w, h = image_size(it.path)
                    px = w * h
                except Exception:  # noqa: BLE001 - the read below reports it properly
                    px = 0
            if chunk and (len(chunk) >= batch_size or pixels + px > PIXEL_BUDGET):
                yield chunk
                chunk, pixels = [], 0
            chunk.append(i)
            pixels += px
        if chunk:
            yield chunk

    def submit(chunk: list[int]) -> dict[int, Future]:
        return {i: pool.submit(_read, items[i], max_pixels, prepare) for i in chunk}

    chunks = plan()
    current = next(chunks, None)
    pending = submit(current) if current is not None else {}
    while current is not None:
        nxt = next(chunks, None)
        nxt_pending = submit(nxt) if nxt is not None else {}
        decoded = {i: _result_or_exc(f) for i, f in pending.items()}
        yield current, decoded
        current, pending = nxt, nxt_pending


def _read(
    item: InputItem, max_pixels: int | None = None, prepare: Callable[..., Any] | None = None
) -> Any:
    """Decode one input (in a pool thread), and prepare it when ``prepare`` is given."""
    if item.error is not None:
        raise CalcinosisError(item.error)
    from calcinosis.model.imageio import read_rgb

    rgb = read_rgb(item.path, max_pixels=max_pixels)
    if prepare is None:
        return rgb
    try:
        return prepare(rgb, item.mpp)
    except (CalcinosisError, OSError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so, with its traceback
        traceback.print_exc(file=sys.stderr)
        raise CalcinosisError(f"internal error: {error_reason(exc)}") from exc


def _result_or_exc(f: Future) -> Any:
    try:
        return f.result()
    except Exception as exc:  # noqa: BLE001 - reported as the row's reason
        return exc
