"""What prediction returns: :class:`PatchResult`, one per image, patch or tiled region.

Its own module so that everything producing or consuming results (the
predictor, whole-slide reading, the ``predict`` command, the GeoJSON and
overlay writers) can import it without importing one another.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError

__all__ = ["STATUSES", "PatchResult", "error_reason", "jsonable"]

#: ``ok``; ``indeterminate`` (top calibrated probability below the threshold);
#: ``no_tissue`` (the network is not asked); ``out_of_focus`` (probabilities
#: shown, no call); ``error`` (the image could not be read; ``reason`` says why).
STATUSES = ("ok", "indeterminate", "no_tissue", "out_of_focus", "error")


@dataclass
class PatchResult:
    """Everything known about one image (a patch or a tiled region)."""

    path: str | None = None
    status: str = "ok"
    reason: str = ""
    prediction: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    stain: str | None = None
    stain_probability: float | None = None
    stain_probabilities: dict[str, float] = field(default_factory=dict)
    tissue_fraction: float = 0.0
    focus: float | None = None
    #: Deposit area per label name (labels other than background), image pixels.
    deposit_area_px: dict[str, int] = field(default_factory=dict)
    #: The same in square microns (None when no mpp is known).
    deposit_area_um2: dict[str, float] | None = None
    mpp: float | None = None
    mpp_assumed: bool = False
    height: int = 0
    width: int = 0
    mode: str = "patch"  # or "region"
    #: ``(H, W)`` uint8 deposit labels at the image's own resolution (not serialised).
    label_map: np.ndarray | None = field(default=None, repr=False)
    #: Region mode: one row per tile (not serialised by default: can be long).
    tiles: list[dict[str, Any]] | None = field(default=None, repr=False)
    #: Region mode: the summary over tissue tiles and the lesion-driven call
    #: (``tile_mean_probabilities``, ``classes_present``, ``also_present``, ...).
    region: dict[str, Any] | None = None
    #: The deposits as lesions (``lesions.find_lesions``), strongest first: id, label,
    #: label_fractions, area_px, area_um2, centroid, bbox, probabilities, prediction,
    #: class_probability, confidence, deposit_probability, passed, evidence, tiles.
    #: Coordinates are label-map pixels, or level-0 pixels for slides.
    lesions: list[dict[str, Any]] | None = None
    #: OpenCV component index of each lesion in ``lesions.deposit_components(label_map)``
    #: (not serialised; the GeoJSON writer traces outlines with it).
    lesion_components: list[int] | None = field(default=None, repr=False)
    #: Whole-slide input: reader, levels, the level and region read, and the mapping of
    #: label-map pixels to slide coordinates (see ``slide.predict_slide``).
    slide: dict[str, Any] | None = None

    def to_dict(self, include_tiles: bool = False) -> dict[str, Any]:
        """Plain, JSON-ready data (no label map; tiles only on request)."""
        skip = {"label_map", "lesion_components"} | (set() if include_tiles else {"tiles"})
        d = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip
        }
        return jsonable(d)


def error_reason(exc: BaseException) -> str:
    """The ``reason`` of an error result: the message, with the type for unexpected errors."""
    msg = str(exc) or type(exc).__name__
    return msg if isinstance(exc, CalcinosisError) else f"{type(exc).__name__}: {msg}"


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, tuples as lists, NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
