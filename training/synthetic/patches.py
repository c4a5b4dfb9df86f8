"""One patch of a dataset, whichever style draws it: style choice, seed, supersampling."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from calcinosis.model.errors import ConfigError

from .style_a import render_patch
from .style_b import render_patch_b

#: Rendering styles: ``a`` (:mod:`.style_a`: component concentrations through
#: Beer-Lambert optics), ``b`` (:mod:`.style_b`: other primitives, textures
#: and a painted rendering of the same tissue model) and ``mix`` (every other
#: patch of each class and stain in each style).
STYLES = ("a", "b", "mix")

#: A patch renderer: (label, stain, seed, size, shift, *, mpp) -> (RGB, labels).
Renderer = Callable[..., tuple[np.ndarray, np.ndarray]]


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return style


def patch_seed(seed: int, index: int) -> int:
    """The render seed of patch ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


def patch_style(style: str, index: int) -> str:
    """The style (``a`` or ``b``) patch ``index`` of a dataset of ``style`` is drawn in."""
    if style == "mix":
        return "b" if index % 2 else "a"
    return style


def renderer(style: str) -> Renderer:
    """The renderer of style ``a`` or ``b``."""
    return render_patch_b if style == "b" else render_patch


def supersample_factor(seed: int, index: int, supersample: int) -> int:
    """How many times finer than its mpp patch ``index`` is drawn (1..``supersample``)."""
    if supersample <= 1:
        return 1
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x55])
    return int(rng.integers(1, supersample + 1))


def render_supersampled(
    render: Renderer,
    label: str,
    stain: str,
    seed: int,
    size: int,
    shift: float,
    mpp: float,
    factor: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``render`` at ``factor`` times the resolution, then area-averaged down to ``size``.

    A scanner images the section at a fine resolution and a pyramid level (or
    ``calcinosis predict`` resampling to the model's mpp) averages it down:
    sensor noise, compression and edges then come out smoother than when drawn
    at the coarse resolution directly. Training on both kinds of patch keeps
    the model from reading that difference. Labels take, per output pixel, the
    value covering most of it.
    """
    if factor <= 1:
        return render(label, stain, seed, size, shift, mpp=mpp)
    rgb, labels = render(label, stain, seed, size * factor, shift, mpp=mpp / factor)
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    present = np.unique(labels)
    cover = np.stack(
        [
            cv2.resize((labels == v).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
            for v in present
        ]
    )
    return small, present[cover.argmax(axis=0)].astype(np.uint8)
