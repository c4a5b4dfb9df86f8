"""Serving patches to a DataLoader: :class:`PatchDataset` and its :class:`DecodedCache`.

A patch is read, rescaled to the training mpp (calcinosis.model.preprocess),
transformed and packaged with its label, stain and mask targets; an unreadable
file is logged once and the next readable sample served instead, so one bad
file never kills an epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from calcinosis.model.errors import DataError, ImageReadError
from calcinosis.model.imageio import read_mask, read_rgb
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES
from calcinosis.model.manifest import Sample
from calcinosis.model.preprocess import resample_factor, resample_to_mpp

from .metrics import IGNORE_INDEX

__all__ = ["DecodedCache", "PatchDataset", "Transform"]

log = logging.getLogger(__name__)

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
    :mod:`calcinosis.training.transforms`); :meth:`get` with a ``seed`` also
    passes ``seed=`` to it, to fix that item's augmentation. Patches with a
    known ``mpp`` that differs from ``mpp`` by more than 5 % are rescaled
    first. An unreadable image (or mask) is logged once, recorded in
    ``bad_files`` (path -> reason, per process: DataLoader workers keep their
    own) and replaced by the next readable sample, whose index is the one
    returned. With a ``cache`` (:class:`DecodedCache`, which datasets may
    share) each patch is read and decoded once per process. A transform with
    ``wants_reference`` (Fourier domain adaptation) is also given
    ``reference=`` for a patch of one of its ``reference_stains``: another
    readable patch of the same stain, drawn from the item's ``seed`` when it
    has one.
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
        self._same_stain: dict[str | None, list[int]] | None = None

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
        factor = resample_factor(s.mpp, self.mpp)  # 1.0 within MPP_TOLERANCE or when unknown
        return resample_to_mpp(image, factor, mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def get(self, index: int, *, seed: int | None = None) -> dict[str, Any]:
        """Item ``index``; ``seed`` fixes its augmentation (passed to the transform).

        An unreadable sample is replaced by the next readable one, augmented
        with the same ``seed``.
        """
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
            return self._package(i, image, mask, seed)
        raise DataError(
            f"none of the {n} samples can be read; first problems: "
            + "; ".join(list(self.bad_files.values())[:3])
        )

    def _reference(self, i: int, seed: int | None) -> np.ndarray | None:
        """Another readable patch of sample ``i``'s stain, or None when there is none."""
        if self._same_stain is None:
            groups: dict[str | None, list[int]] = {}
            for j, s in enumerate(self.samples):
                groups.setdefault(s.stain, []).append(j)
            self._same_stain = groups
        pool = self._same_stain[self.samples[i].stain]
        # walk the pool from a random start: the first usable patch, found at once
        # unless many are unreadable, instead of filtering the whole pool per item
        start = (random.Random(seed ^ 0x5F0A) if seed is not None else random).randrange(len(pool))
        for k in range(len(pool)):
            j = pool[(start + k) % len(pool)]
            if j == i or str(self.samples[j].path) in self.bad_files:
                continue
            try:
                return self.load(j)[0]
            except (ImageReadError, DataError) as exc:
                self.bad_files[str(self.samples[j].path)] = str(exc)
                log.warning("skipping unreadable sample %d (%s): %s", j, self.samples[j].path, exc)
        return None

    def _package(
        self, i: int, image: np.ndarray, mask: np.ndarray | None, seed: int | None
    ) -> dict[str, Any]:
        s = self.samples[i]
        if self.transform is not None:
            # only a seeded item passes ``seed``: any transform(image=, mask=) serves the rest
            seeded: dict[str, Any] = {} if seed is None else {"seed": seed}
            if getattr(self.transform, "wants_reference", False) and s.stain in getattr(
                self.transform, "reference_stains", ()
            ):
                seeded["reference"] = self._reference(i, seed)
            out = self.transform(image=image, mask=mask, **seeded)
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
