"""The project's vocabulary: class, stain and deposit-label names.

Every part of the project (generator, training, inference, reports) takes its
names from here, so a checkpoint's ``class_names`` and a manifest's ``label``
column always mean the same thing.
"""

from __future__ import annotations

#: Diagnostic classes, in the order of the class head's outputs.
CLASS_NAMES: tuple[str, ...] = (
    "calcinosis_cutis",
    "osteoma_cutis",
    "gout",
    "amyloidosis",
    "normal",
)

#: Stains, in the order of the stain head's outputs.
STAIN_NAMES: tuple[str, ...] = ("he", "von_kossa", "alizarin_red")

#: Pixel label values of the deposit map (value -> name).
DEPOSIT_LABELS: tuple[str, ...] = ("tissue", "calcium", "bone", "urate", "amyloid")
BACKGROUND, CALCIUM, BONE, URATE, AMYLOID = range(5)

#: Which deposit label a class's lesion is drawn with (``normal`` has none).
CLASS_DEPOSIT: dict[str, int] = {
    "calcinosis_cutis": CALCIUM,
    "osteoma_cutis": BONE,
    "gout": URATE,
    "amyloidosis": AMYLOID,
    "normal": BACKGROUND,
}

#: Overlay / QuPath colours per deposit label (RGB). Calcium is a saturated
#: yellow-green that stands out against all three stains; the mimics get
#: quieter colours, as they only explain why a patch was not called calcium.
DEPOSIT_COLORS: dict[int, tuple[int, int, int]] = {
    CALCIUM: (0, 255, 80),
    BONE: (40, 120, 255),
    URATE: (255, 160, 0),
    AMYLOID: (220, 60, 220),
}

#: Human-readable names for reports and QuPath classifications.
DEPOSIT_DISPLAY: dict[int, str] = {
    CALCIUM: "Calcium deposit",
    BONE: "Bone (osteoma)",
    URATE: "Urate (tophus)",
    AMYLOID: "Amyloid",
}

#: Predicted class reported when the top calibrated probability is too low.
INDETERMINATE = "indeterminate"
