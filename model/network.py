"""CalcinosisNet: one encoder, a light deposit decoder and two pooled heads.

The shape follows segmentation_models_pytorch: a timm ``features_only``
backbone feeds (a) a small FPN-style decoder that paints the per-pixel deposit
map and (b) pooled heads on the deepest features for the diagnosis and the
stain. Everything here is plain ``nn.Module`` code built from ops that trace
cleanly to ONNX (convolutions, global average pooling, ``interpolate``), so the
same network serves training, bf16 inference and export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# ImageNet statistics: what almost every timm backbone was trained with, and
# the fallback when a backbone carries no pretrained config.
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

#: The decoder starts at stride 4. A 3x3 convolution at stride 2 would cost a
#: quarter of a resnet18 forward pass; at stride 4 it is a few per cent, and
#: deposits are far larger than four pixels at 0.5 um/px.
FINEST_DECODER_STRIDE = 4


class PooledHead(nn.Sequential):
    """Global average pool -> dropout -> linear: the class and stain heads."""

    def __init__(self, in_channels: int, num_outputs: int, drop_rate: float) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(drop_rate),
            nn.Linear(in_channels, num_outputs),
        )


def deposit_statistics(deposit_logits: torch.Tensor) -> torch.Tensor:
    """``(N, 2D)``: the mean (area) then the max (presence) of each deposit label's probability."""
    probs = deposit_logits.float().softmax(dim=1)
    return torch.cat([probs.mean(dim=(2, 3)), probs.amax(dim=(2, 3))], dim=1)


class DepositAwareClassHead(nn.Module):
    """Diagnosis from pooled deep features plus what the deposit map found.

    The class of a patch is largely "which deposit is present, and how much":
    the decoder learns that from dense pixel labels, far more signal than one
    label per patch. Feeding the head the mean (area) and max (presence) of each
    deposit label's probability lets the diagnosis lean on the morphology the
    network segments, and makes a small model learn the classes in a few epochs.
    Where masks are missing the decoder is still trained by the class loss
    through this path.

    With ``use_features=False`` (``model.class_head: deposits``) the head sees
    the deposit statistics only: the diagnosis is then what the decoder
    segmented, and the class loss reaches the encoder through the decoder.
    """

    def __init__(
        self,
        in_channels: int,
        num_deposit_labels: int,
        num_classes: int,
        drop_rate: float,
        use_features: bool = True,
    ) -> None:
        super().__init__()
        self.use_features = use_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        width = 2 * num_deposit_labels + (in_channels if use_features else 0)
        # Alone, the statistics (probabilities in [0, 1]) are standardised first:
        # a linear layer on them needs weights of several units to separate the
        # classes, which Adam at the usual learning rates takes thousands of steps
        # to reach (a first run sat at chance for its first epoch).
        self.norm = nn.Identity() if use_features else nn.BatchNorm1d(2 * num_deposit_labels)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, deepest: torch.Tensor, deposit_logits: torch.Tensor) -> torch.Tensor:
        stats = deposit_statistics(deposit_logits)
        if not self.use_features:
            return self.fc(self.norm(stats.to(self.fc.weight.dtype)))
        pooled = self.pool(deepest).flatten(1)
        return self.fc(self.drop(torch.cat([pooled, stats.to(pooled.dtype)], dim=1)))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=kernel_size // 2,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DepositDecoder(nn.Module):
    """A light FPN: 1x1 laterals, top-down nearest upsampling with additions,
    then one 3x3 conv on the finest merged level.

    Upsampling goes to the lateral's exact size rather than by a factor of 2,
    so inputs whose sides are not multiples of 32 still line up.
    """

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = ConvBNReLU(channels, channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features run from fine to coarse; walk them coarse to fine.
        out = self.laterals[-1](features[-1])
        for lateral, feature in zip(
            reversed(self.laterals[:-1]), reversed(features[:-1]), strict=True
        ):
            skip = lateral(feature)
            out = skip + F.interpolate(out, size=skip.shape[-2:], mode="nearest")
        return self.fuse(out)


class CalcinosisNet(nn.Module):
    """Encoder -> deposit decoder -> segmentation head, plus class and stain heads.

    Build it through :func:`calcinosis.model.create_model`, which owns the
    backbone factory; this class takes the already-built encoder so that it
    never needs to know how timm names or downloads things.
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder

        info = encoder.feature_info
        channels = list(info.channels())
        reductions = list(info.reduction())
        # Feed the decoder every level at stride >= 4 (or all of them when the
        # backbone has no such level, which no common backbone does).
        keep = [i for i, r in enumerate(reductions) if r >= FINEST_DECODER_STRIDE]
        self.decoder_levels: list[int] = keep or list(range(len(channels)))
        self.decoder = DepositDecoder(
            [channels[i] for i in self.decoder_levels], config.decoder_channels
        )
        self.segmentation_head = nn.Conv2d(config.decoder_channels, len(config.deposit_labels), 1)
        self.classification_head = DepositAwareClassHead(
            channels[-1],
            len(config.deposit_labels),
            len(config.class_names),
            config.drop_rate,
            use_features=config.class_head == "features+deposits",
        )
        self.stain_head = PooledHead(channels[-1], len(config.stain_names), config.drop_rate)

        self.data_config: dict[str, Any] = resolve_data_config(encoder, config.in_chans)
        # Where the starting weights came from (set by load_init_weights; None =
        # from scratch); saved in checkpoint metadata as "init_weights".
        self.init_weights_source: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw logits for the three tasks; deposits at the input resolution."""
        features = self.encoder(x)
        deepest = features[-1]
        deposit = self.deposit_map(features)
        class_logits = self.classification_head(deepest, deposit)
        deposit = F.interpolate(deposit, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {
            "class_logits": class_logits,
            "stain_logits": self.stain_head(deepest),
            "deposit_logits": deposit,
        }

    def deposit_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Deposit logits at the decoder's resolution (what the class head reads)."""
        return self.segmentation_head(self.decoder([features[i] for i in self.decoder_levels]))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward in eval mode without autograd bookkeeping (logits, not probabilities)."""
        if self.training:
            self.eval()
        return self(x)


def resolve_data_config(encoder: nn.Module, in_chans: int = 3) -> dict[str, Any]:
    """Preprocessing that travels with the model: mean, std and input size.

    timm's pretrained config says what the backbone's weights expect; a
    backbone without one gets ImageNet statistics, which is also what every
    timm/torchvision checkpoint a user is likely to load was trained with.
    """
    try:
        from timm.data import resolve_model_data_config

        cfg = dict(resolve_model_data_config(encoder))
    except Exception:  # a backbone without pretrained_cfg: fall back below
        cfg = {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    if len(mean) != in_chans:
        # A grey or multiplex input: one averaged statistic per channel.
        mean = (sum(mean) / len(mean),) * in_chans
        std = (sum(std) / len(std),) * in_chans
    input_size = tuple(int(v) for v in cfg.get("input_size", (in_chans, 224, 224)))
    return {
        **cfg,
        "mean": mean,
        "std": std,
        "input_size": (in_chans, *input_size[1:]),
    }
