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
from calcinosis.model.fileio import to_jsonable

from .tiling import label_histogram

__all__ = ["STATUSES", "PatchResult", "error_reason"]

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
    #: A large region's label map on disk instead of ``label_map`` (``bigmap.LabelMapFile``:
    #: the pyramidal TIFF, a small copy for the overlay, each lesion's window; not serialised).
    label_file: Any = field(default=None, repr=False)
    #: Whole-slide input: reader, levels, the level and region read, and the mapping of
    #: label-map pixels to slide coordinates (see ``slide.predict_slide``).
    slide: dict[str, Any] | None = None

    def to_dict(self, include_tiles: bool = False) -> dict[str, Any]:
        """Plain, JSON-ready data (no label map; tiles only on request)."""
        skip = {"label_map", "lesion_components", "label_file"} | (
            set() if include_tiles else {"tiles"}
        )
        d = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip
        }
        return to_jsonable(d)

    def set_stain(self, probs: np.ndarray, names: list[str]) -> None:
        """The stain call from stain probabilities: all of them, the top one and its probability."""
        self.stain_probabilities = {s: float(p) for s, p in zip(names, probs, strict=True)}
        k = int(np.argmax(probs))
        self.stain = names[k]
        self.stain_probability = float(probs[k])

    def set_deposit_areas(self, label_map: np.ndarray, labels: list[str]) -> None:
        """Deposit area per label (not background) of a label map, in pixels and square microns."""
        self.set_deposit_counts(label_histogram(label_map, len(labels)), labels)

    def set_deposit_counts(self, counts: np.ndarray, labels: list[str]) -> None:
        """Deposit area per label from pixel counts per label value (a streamed map's)."""
        self.deposit_area_px = {name: int(counts[k]) for k, name in enumerate(labels) if k > 0}
        if self.mpp:
            a = float(self.mpp) ** 2
            self.deposit_area_um2 = {k: v * a for k, v in self.deposit_area_px.items()}
        else:
            self.deposit_area_um2 = None

    def release_maps(self) -> None:
        """Free the label map, or remove a large region's map file, once its outputs are written."""
        self.label_map = None
        if self.label_file is not None:
            self.label_file.close()
            self.label_file = None


def error_reason(exc: BaseException) -> str:
    """The ``reason`` of an error result: the message, with the type for unexpected errors."""
    msg = str(exc) or type(exc).__name__
    return msg if isinstance(exc, CalcinosisError) else f"{type(exc).__name__}: {msg}"
