"""The model's own arguments, stored in every checkpoint.

Kept apart from the training config so that inference can rebuild exactly the
same network from a checkpoint without knowing anything about training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .labels import CLASS_NAMES, DEPOSIT_LABELS, STAIN_NAMES


@dataclass
class ModelConfig:
    # Any timm model name that supports ``features_only``; resnet18 trains in
    # minutes on a CPU and is plenty for 128 px patches.
    backbone: str = "resnet18"
    # Local weights to start from (timm/torchvision state dict or one of our
    # checkpoints). Never downloaded: this project runs offline.
    init_weights: str | None = None
    # Channels of the light deposit decoder; 64 keeps it cheap next to the backbone.
    decoder_channels: int = 64
    # Dropout before the class and stain heads; mild regularisation.
    drop_rate: float = 0.1
    # Output vocabularies; training sets them from the data, inference reads them.
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    stain_names: list[str] = field(default_factory=lambda: list(STAIN_NAMES))
    deposit_labels: list[str] = field(default_factory=lambda: list(DEPOSIT_LABELS))
    in_chans: int = 3

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if self.decoder_channels < 1:
            raise ConfigError(f"model.decoder_channels must be >= 1, got {self.decoder_channels}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        for key in ("class_names", "stain_names", "deposit_labels"):
            names = getattr(self, key)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(f"model.{key} must hold at least two distinct names, got {names}")
