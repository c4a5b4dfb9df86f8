"""The one place that builds networks.

``create_model`` is the only caller of ``timm.create_model`` in the project:
training, inference and checkpoint loading all come through here, so a
checkpoint's stored ``ModelConfig`` rebuilds exactly the trained network.
Weights are never downloaded; ``init_weights`` names packaged weights
(``imagenet``, found inside an installed package) or a local file.
"""

from __future__ import annotations

import difflib
import logging

import timm

from .config import ModelConfig
from .errors import ConfigError
from .network import CalcinosisNet

log = logging.getLogger(__name__)


def create_model(cfg: ModelConfig) -> CalcinosisNet:
    """Build a CalcinosisNet for ``cfg``, then load ``cfg.init_weights`` if set.

    ``cfg.init_weights`` is a name such as ``"imagenet"`` (weights shipped by an
    installed package; they also set ``data_config`` mean/std) or a local file;
    see :mod:`calcinosis.model.weights`. The source is kept as
    ``model.init_weights_source`` for the checkpoint metadata.
    """
    encoder = _create_encoder(cfg.backbone, cfg.in_chans)
    model = CalcinosisNet(cfg, encoder)
    if cfg.init_weights:
        # Imported here: weights.py imports the network module, not the factory.
        from .weights import load_init_weights

        result = load_init_weights(model, cfg.init_weights)
        log.info(
            "loaded init weights %s: %d model keys left at init, %d file keys unused",
            cfg.init_weights,
            len(result["missing"]),
            len(result["unexpected"]),
        )
    return model


def _create_encoder(name: str, in_chans: int):
    if not timm.is_model(name):
        raise ConfigError(_unknown_backbone_message(name))
    try:
        return timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
        # timm raises a mix of these for models that cannot return a feature pyramid.
        raise ConfigError(
            f"model.backbone {name!r} cannot be built as a feature extractor "
            f"(timm features_only): {exc}. Pick a convolutional backbone such as "
            "'resnet18', 'efficientnet_b0' or 'convnext_atto'."
        ) from exc


def _unknown_backbone_message(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"model.backbone {name!r} is not a known timm model name.{hint} List valid names "
        "with: python -c \"import timm; print(timm.list_models('*resnet*'))\" "
        "(any pattern between the asterisks)."
    )
