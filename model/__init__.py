"""Networks and checkpoints for calcinosis cutis and its mimics, and what both sides share.

This package builds the model (``create_model``), loads starting weights
(``load_init_weights``) and reads/writes self-describing safetensors
checkpoints with their preprocessing (``Preprocessing``). It also holds what
training and inference both need, so that neither imports the other: labels,
errors, atomic file IO, image IO, manifests, stain normalisation, the colour
baseline and the command-line dispatcher. It knows nothing of training loops.
"""

from typing import TYPE_CHECKING, Any

# Light modules load eagerly: the CLI, the config and the pure overlay/GeoJSON
# code need the names and error types without paying for torch and timm.
from .config import ModelConfig
from .errors import (
    CalcinosisError,
    CheckpointError,
    ConfigError,
    DataError,
    ImageReadError,
    TrainingError,
)
from .labels import (
    CLASS_DEPOSIT,
    CLASS_NAMES,
    DEPOSIT_COLORS,
    DEPOSIT_DISPLAY,
    DEPOSIT_LABELS,
    INDETERMINATE,
    STAIN_NAMES,
)

# Torch-backed names load on first use (PEP 562), so that
# ``import calcinosis.model.labels`` stays cheap.
_LAZY = {
    "CHECKPOINT_FORMAT_VERSION": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_metadata": "checkpoint",
    "save_checkpoint": "checkpoint",
    "create_model": "factory",
    "CalcinosisNet": "network",
    "load_init_weights": "weights",
    "Preprocessing": "preprocess",
}

if TYPE_CHECKING:
    from .checkpoint import (
        CHECKPOINT_FORMAT_VERSION,
        load_checkpoint,
        read_checkpoint_metadata,
        save_checkpoint,
    )
    from .factory import create_model
    from .network import CalcinosisNet
    from .preprocess import Preprocessing
    from .weights import load_init_weights


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CLASS_DEPOSIT",
    "CLASS_NAMES",
    "DEPOSIT_COLORS",
    "DEPOSIT_DISPLAY",
    "DEPOSIT_LABELS",
    "INDETERMINATE",
    "STAIN_NAMES",
    "CalcinosisError",
    "CalcinosisNet",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageReadError",
    "ModelConfig",
    "Preprocessing",
    "TrainingError",
    "create_model",
    "load_checkpoint",
    "load_init_weights",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
