"""After training: read the diagnosis from the deposit map (``deposit_readout: true``).

The network trains as usual: its class head sees the pooled deepest features
and the deposit map's statistics. Those pooled features are where a network
trained on rendered patches keeps the renderer's signature; on real H&E the
demo model's class head called 12 of 12 patches of compact lamellar bone
`normal` (tile means, ../shared/real-dev), while its deposit decoder, trained
on dense pixel labels, labelled bone in 11 of them. The decoder has learned
the morphology the classes are defined by (HISTOLOGY.md: which deposit is
present, and how much); this step makes the diagnosis say what it found.

It replaces the best checkpoint's class head by a multinomial logistic
regression on the deposit statistics alone (the mean and the max of each
deposit label's probability over the patch, the statistics the class head
already received), fitted on the *training* split without augmentation, one
pass per patch. In the network it is ``model.class_head: deposits``: a batch
norm holding the statistics' mean and deviation, then a linear layer, so
export, test-time augmentation, tiling and calibration treat it like any
class head. Calibration then fits the temperature of the new head on the
validation split, as for any run.

``last.safetensors`` keeps the trained class head: it is the resume point of
the run, and its class logits are not the readout's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from calcinosis.model import create_model, load_checkpoint, save_checkpoint
from calcinosis.model.checkpoint import unwrap_model
from calcinosis.model.network import deposit_statistics

from .engine import autocast, to_device
from .state import BEST_CHECKPOINT

#: Inverse L2 strength of the logistic regression (scikit-learn's default):
#: ten standardised inputs and thousands of patches need little of it.
READOUT_C = 1.0


@torch.inference_mode()
def collect_statistics(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The deposit statistics and class labels of every patch of ``loader`` (one pass each).

    The statistics are taken at the decoder's own resolution, where the head reads them.
    """
    net = unwrap_model(model).eval()
    stats, labels = [], []
    for raw in loader:
        batch = to_device(raw, device, channels_last)
        with autocast(device, amp_dtype):
            deposit = net.deposit_map(net.encoder(batch["image"]))
        stats.append(deposit_statistics(deposit).cpu())
        labels.append(raw["label"])
    return torch.cat(stats).numpy().astype(np.float64), torch.cat(labels).numpy()


def fit_deposit_readout(
    run_dir: Path,
    train_loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> dict[str, Any]:
    """Replace the class head of ``run_dir``'s best checkpoint by the deposit readout.

    Returns what was fitted (split, patches, the readout's training accuracy,
    its regularisation), also stored in the checkpoint's metadata under
    ``deposit_readout``. Running it again refits from the same decoder, so a
    run interrupted after this step and resumed gets the same head.
    """
    path = run_dir / BEST_CHECKPOINT
    model, meta = load_checkpoint(path, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Every class has training patches (data.load_samples checks it before training),
    # so the regression has a row for each.
    x, y = collect_statistics(model, train_loader, device, amp_dtype, channels_last)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    lr = LogisticRegression(C=READOUT_C, max_iter=5000)
    lr.fit((x - mean) / std, y)
    accuracy = float(lr.score((x - mean) / std, y))

    readout = create_model(dataclasses.replace(model.config, class_head="deposits"))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("classification_head.")}
    result = readout.load_state_dict(kept, strict=False)
    # Everything but the class head carries over; the head is set below.
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("classification_head.") for k in result.missing_keys)
    head = readout.classification_head
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.from_numpy(mean))
        # BatchNorm divides by sqrt(running_var + eps): store var - eps so that is std.
        head.norm.running_var.copy_(torch.from_numpy(std**2 - head.norm.eps))
        head.norm.weight.fill_(1.0)
        head.norm.bias.zero_()
        head.fc.weight.copy_(torch.from_numpy(lr.coef_))
        head.fc.bias.copy_(torch.from_numpy(lr.intercept_))
    readout.data_config = model.data_config
    readout.init_weights_source = getattr(model, "init_weights_source", None)
    info = {
        "fitted_on": "train",
        "samples": int(len(y)),
        "train_accuracy": accuracy,
        "C": READOUT_C,
    }
    meta = {**meta, "deposit_readout": info}
    save_checkpoint(path, readout.cpu().eval(), meta)
    return info


def describe(info: dict[str, Any]) -> str:
    """One log line for a :func:`fit_deposit_readout` result."""
    return (
        f"deposit readout: class head replaced by a logistic regression on the deposit map's "
        f"statistics, fitted on {info['samples']} training patches "
        f"(training accuracy {info['train_accuracy']:.3f})"
    )
