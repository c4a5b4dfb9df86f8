"""A contact sheet: every class in every stain, each patch beside its label map."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_COLORS, STAIN_NAMES

from .codec import write_png
from .contract import NOMINAL_MPP
from .patches import check_style, patch_seed, patch_style, renderer


def _mask_view(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image dimmed to grey with deposits painted in their overlay colours."""
    grey = rgb.mean(axis=2, keepdims=True) * 0.45 + 40
    out = np.repeat(grey, 3, axis=2)
    for value, colour in DEPOSIT_COLORS.items():
        out[labels == value] = colour
    return out.astype(np.uint8)


def contact_sheet(
    path: str | os.PathLike,
    size: int = 128,
    seed: int = 0,
    shift: float = 0.0,
    examples: int = 2,
    mpp: float = NOMINAL_MPP,
    style: str = "a",
) -> Path:
    """PNG grid: rows = classes, columns = stains; each cell shows ``examples``
    patches, each followed by its label map in the overlay colours (with
    ``style`` mix, the examples alternate between the two styles)."""
    check_style(style)
    gap, cell_gap, left, top = 2, 10, 170, 28
    cell_w = examples * (2 * size + gap) + (examples - 1) * gap
    width = left + len(STAIN_NAMES) * (cell_w + cell_gap)
    height = top + len(CLASS_NAMES) * (size + cell_gap)
    sheet = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for si, stain in enumerate(STAIN_NAMES):
        x0 = left + si * (cell_w + cell_gap)
        cv2.putText(sheet, stain, (x0 + 4, 20), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for ci, label in enumerate(CLASS_NAMES):
        y0 = top + ci * (size + cell_gap)
        cv2.putText(sheet, label, (6, y0 + size // 2 + 5), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for si, stain in enumerate(STAIN_NAMES):
            x = left + si * (cell_w + cell_gap)
            for e in range(examples):
                render = renderer(patch_style(style, e))
                rgb, labels = render(label, stain, patch_seed(seed, e), size, shift, mpp=mpp)
                sheet[y0 : y0 + size, x : x + size] = rgb
                x += size + gap
                sheet[y0 : y0 + size, x : x + size] = _mask_view(rgb, labels)
                x += size + 2 * gap
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(out, sheet)
    return out
