"""The three-task loss: class, stain and deposit map, with unknown targets left out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import LossWeights
from .metrics import IGNORE_INDEX

#: The parts of the loss, in the order the log and metrics.csv list them.
LOSS_PARTS = ("class", "stain", "deposit")


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the classes present) for a weighted loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over targets != IGNORE_INDEX; exactly 0 (not NaN) when there are none.

    Dividing a sum by the clamped count instead of asking torch for the mean
    avoids both the NaN of an all-ignored batch and a host sync.
    """
    total = F.cross_entropy(
        logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if weight is None:
        count = (target != IGNORE_INDEX).sum()
    else:
        valid = target != IGNORE_INDEX
        count = weight[target.clamp_min(0)].mul(valid).sum()
    return total / count.clamp_min(1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the deposit labels (1..D-1), pooled over the batch.

    Cross-entropy alone lets the large tissue class dominate; Dice weighs each
    deposit label by its own area, which is what the calcium Dice target
    measures. Unlabelled pixels (no mask) are left out; with none at all the
    loss is 0.
    """
    num_labels = logits.shape[1]
    valid = (target != IGNORE_INDEX).unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp_min(0), num_labels).permute(0, 3, 1, 2).to(logits.dtype) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean()


class MultiTaskLoss(nn.Module):
    """w_c * CE(class) + w_s * CE(stain) + w_d * (CE + soft Dice)(deposit map).

    Stains and pixels marked IGNORE_INDEX (unknown stain, no mask) do not
    count. The loss is computed in fp32 whatever the autocast dtype.
    """

    def __init__(self, weights: LossWeights, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = weights
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls = F.cross_entropy(out["class_logits"].float(), batch["label"], weight=self.class_weight)
        stain = masked_cross_entropy(out["stain_logits"].float(), batch["stain"])
        dep_logits = out["deposit_logits"].float()
        deposit = masked_cross_entropy(dep_logits, batch["mask"]) + soft_dice_loss(
            dep_logits, batch["mask"]
        )
        total = self.w.classification * cls + self.w.stain * stain + self.w.deposit * deposit
        parts = {"class": cls.detach(), "stain": stain.detach(), "deposit": deposit.detach()}
        return total, parts
