"""Fitting one patch to the network, and its deposit map back to the patch: pure numpy.

A patch goes to the network exactly as evaluation fits it
(``Preprocessing.apply``: reflect-padded or centre-cropped to the input size,
never resized), so ``calcinosis evaluate`` measures what ``predict`` returns.
A patch longer than the input on a side loses its margins to that crop, so
:func:`patch_views` adds windows of the input size that cover it, for the
deposit map only; :func:`patch_deposit_probs` puts their maps back together.
"""

from __future__ import annotations

import cv2
import numpy as np

from calcinosis.model.preprocess import Placement, Preprocessing
from calcinosis.model.probability import softmax

from .tiling import tile_grid

__all__ = ["View", "patch_deposit_probs", "patch_views", "resize_probs"]

#: Where a network input's pixels lie in the patch: the window's corner and its placement.
View = tuple[int, int, Placement]


def patch_views(
    spec: Preprocessing, work: np.ndarray, overlap: int
) -> tuple[list[np.ndarray], list[View]]:
    """The network inputs of a patch (at the model's mpp), the fitted patch first.

    The first input is the patch fitted to the input size: its class and stain
    outputs are the answer. When the fit cropped the patch, windows of the
    input size covering it (``tiling.tile_grid`` with ``overlap``) follow.
    Stain normalisation runs once, over the whole patch, as evaluation does.
    """
    stained = spec.normalize_stain(work)
    x, _, place = spec.apply(stained, stain=False)
    inputs, views = [x], [(0, 0, place)]
    if place.cropped:
        s = spec.input_size
        for y0, x0 in tile_grid(stained.shape[:2], s, overlap):
            xw, _, pw = spec.apply(stained[y0 : y0 + s, x0 : x0 + s], stain=False)
            inputs.append(xw)
            views.append((y0, x0, pw))
    return inputs, views


def patch_deposit_probs(
    views: list[View], dep_logits: list[np.ndarray], shape: tuple[int, int]
) -> np.ndarray:
    """``(h, w, D)`` deposit probabilities over a patch of ``shape`` from its views' logits.

    One view: its map with the padding cut off. Several (a cropped patch):
    the mean over the covering windows and the centre view wherever they overlap.
    """
    maps = [
        place.to_patch(softmax(np.asarray(d, np.float32), axis=0).transpose(1, 2, 0))
        for d, (_, _, place) in zip(dep_logits, views, strict=True)
    ]
    if len(maps) == 1:
        return maps[0]
    hw, ww = shape
    acc = np.zeros((hw, ww, maps[0].shape[-1]), np.float32)
    count = np.zeros((hw, ww, 1), np.float32)
    for m, (y0, x0, place) in zip(maps, views, strict=True):
        ys, xs = y0 + place.src_y, x0 + place.src_x
        acc[ys : ys + place.h, xs : xs + place.w] += m
        count[ys : ys + place.h, xs : xs + place.w] += 1.0
    return acc / count


def resize_probs(p: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w, D) probability map, one channel at a time."""
    h, w = size_hw
    chans = [
        cv2.resize(p[..., k], (w, h), interpolation=cv2.INTER_LINEAR) for k in range(p.shape[-1])
    ]
    return np.stack(chans, axis=-1)
