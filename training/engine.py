"""The epoch loop: ``train_one_epoch``, ``collect_outputs`` and ``evaluate``.

As in torchvision's classification reference: plain functions, one epoch or
one pass over a loader each. What a training step needs is built once by
:func:`calcinosis.training.train.train` and handed in as a :class:`TrainContext`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from calcinosis.model import TrainingError
from calcinosis.model.checkpoint import unwrap_model
from calcinosis.model.tta import torch_d4

from . import metrics
from .config import Config
from .distributed import DistInfo, max_over_ranks, resolve_amp_dtype, sum_over_ranks
from .losses import LOSS_PARTS
from .metrics import IGNORE_INDEX
from .state import RunState


@dataclasses.dataclass
class TrainContext:
    """Everything a training step needs besides the batch; built once per run."""

    model: nn.Module  # what the step runs: DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    loader: DataLoader
    steps: int  # optimizer steps per epoch
    cfg: Config
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    dist_info: DistInfo = dataclasses.field(default_factory=DistInfo)
    ema: Any | None = None  # timm ModelEmaV3 when train.ema_decay > 0
    val_loader: DataLoader | None = None
    # train.mixstyle_prob > 0: the MixStyle hook on the encoder; told each
    # batch's stains so that it mixes statistics within a stain only
    mixstyle: Any | None = None

    @property
    def net(self) -> nn.Module:
        """The network itself (without the DDP wrapper): what is saved and resumed."""
        return unwrap_model(self.model)

    @property
    def eval_net(self) -> nn.Module:
        """What is validated and exported: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.net


class StopRequested(Exception):
    """Ctrl-C / SIGTERM arrived; the loop stopped at a step boundary."""


class GracefulStop:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current step,
    so the saved state is consistent; a second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self.enabled = enabled
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping after the current step and saving (Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> GracefulStop:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """bf16 autocast for ``amp_dtype``, a no-op context for None (fp32)."""
    return torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


# --------------------------------------------------------------------------- training


def freeze_batchnorm_stats(module: torch.nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode.

    Eval mode normalises with the running statistics and stops updating them;
    the layers' affine weights still get gradients. Call after ``.train()``,
    which would switch them back.
    """
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_one_epoch(
    ctx: TrainContext, run: RunState, stop: GracefulStop, on_step: Any | None = None
) -> dict[str, float]:
    """Train until ``run.step_in_epoch == ctx.steps``; returns the epoch's mean losses and speed.

    Stops with TrainingError on a non-finite loss or gradient (before the
    optimizer step, so the weights stay clean), and with StopRequested at a
    step boundary after Ctrl-C. ``on_step()`` runs after every completed step.
    """
    ctx.model.train()
    if run.epoch < ctx.cfg.train.freeze_encoder_epochs:
        # linear probing: the scheduler holds the encoder's rate at 0; eval mode
        # keeps its batch-norm statistics (and its dropout) as pretrained too
        ctx.net.encoder.eval()
    elif ctx.cfg.train.freeze_bn_stats:
        freeze_batchnorm_stats(ctx.net.encoder)
    images, start = 0, time.perf_counter()
    bar = tqdm(
        total=ctx.steps,
        initial=run.step_in_epoch,
        desc=f"epoch {run.epoch + 1}/{ctx.cfg.train.epochs}",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not ctx.dist_info.is_main or not sys.stderr.isatty(),
    )
    for raw in ctx.loader:
        if run.step_in_epoch >= ctx.steps:
            break
        batch = to_device(raw, ctx.device, ctx.cfg.train.channels_last)
        loss, parts, stop_now = _train_step(ctx, run, batch, stop)
        n = batch["image"].shape[0]
        images += n
        run.sums["loss"] += loss * n
        for k in LOSS_PARTS:
            run.sums[k] += parts[k] * n
        run.sums["n"] += n
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if stop_now:
            bar.close()
            raise StopRequested
        if on_step is not None:
            on_step()
    bar.close()
    return _epoch_means(ctx, run, images, time.perf_counter() - start)


def _train_step(
    ctx: TrainContext, run: RunState, batch: dict[str, Any], stop: GracefulStop
) -> tuple[float, dict[str, float], bool]:
    """One optimizer step; returns the loss, its parts and whether any rank asked to stop."""
    if ctx.mixstyle is not None:
        ctx.mixstyle.groups = batch.get("stain")
    with autocast(ctx.device, ctx.amp_dtype):
        out = ctx.model(batch["image"])
    loss, parts = ctx.criterion(out, batch)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.epoch < ctx.cfg.train.freeze_encoder_epochs:
        # linear probing: no gradient for the frozen encoder, so AdamW leaves its
        # weights and moments alone and gradient clipping sees the heads' alone
        for p in ctx.net.encoder.parameters():
            p.grad = None
    grad_norm = None
    if ctx.cfg.train.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.cfg.train.grad_clip)

    # One host sync per step for both questions, agreed across ranks.
    bad = ~torch.isfinite(loss.detach())
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm)
    flags = torch.stack([bad.float(), torch.tensor(float(stop.requested), device=ctx.device)])
    flags = max_over_ranks(flags, ctx.dist_info)
    if flags[0].item():
        _raise_non_finite(ctx, run, loss.item())
    ctx.optimizer.step()
    ctx.scheduler.step()
    if ctx.ema is not None:  # the step number sets the warm-up of the decay: exact on resume
        ctx.ema.update(ctx.net, step=run.global_step + 1)
    run.global_step += 1
    run.step_in_epoch += 1
    return loss.item(), {k: parts[k].item() for k in LOSS_PARTS}, bool(flags[1].item())


def _raise_non_finite(ctx: TrainContext, run: RunState, loss: float) -> None:
    lr = max(g["lr"] for g in ctx.optimizer.param_groups)
    base = ctx.cfg.train.lr
    raise TrainingError(
        f"the loss became {loss} (or the gradients non-finite) at epoch "
        f"{run.epoch + 1}, step {run.step_in_epoch + 1} (global step {run.global_step + 1}). "
        f"Lower the learning rate (train.lr={base:g} now, learning rate at this step "
        f"{lr:.3g}; try train.lr={base / 10:g}) or check the data. No checkpoint "
        "was written after this point."
    )


def _epoch_means(ctx: TrainContext, run: RunState, images: int, seconds: float) -> dict[str, float]:
    """Mean losses of the epoch over all ranks (the sums include a resumed part) and speed."""
    sums = sum_over_ranks(
        [run.sums[k] for k in ("loss", *LOSS_PARTS, "n")], ctx.dist_info, ctx.device
    )
    images *= ctx.dist_info.world_size
    count = max(sums[-1], 1.0)
    return {
        "train_loss": sums[0] / count,
        **{f"train_loss_{k}": sums[i + 1] / count for i, k in enumerate(LOSS_PARTS)},
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
    }


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def collect_outputs(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    precision: str | torch.dtype | None = "fp32",
    criterion: nn.Module | None = None,
    channels_last: bool = False,
    tta: str = "none",
) -> dict[str, Any]:
    """Run ``model`` over ``loader``; return the outputs as numpy arrays.

    Keys: class_logits (N, C) float32, stain_logits (N, S), labels (N,),
    stains (N,) (-100 = unknown), pixel_conf (D, D) accumulated deposit pixel
    confusion (rows = target), indices (N,) dataset indices; with a
    ``criterion`` also ``loss`` and ``loss_<part>`` (means over samples).
    ``tta="d4"`` averages every output over the eight rotations/reflections.
    """
    net = unwrap_model(model)
    net.eval()
    device = torch.device(device)
    amp_dtype = resolve_amp_dtype(precision, device)
    num_labels = len(net.config.deposit_labels)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("cls", "stn", "lab", "st", "idx")}
    conf = np.zeros((num_labels, num_labels), dtype=np.int64)
    sums = {"loss": 0.0, **{k: 0.0 for k in LOSS_PARTS}}
    for raw in loader:
        batch = to_device(raw, device, channels_last)
        with autocast(device, amp_dtype):
            out = torch_d4(net, batch["image"]) if tta == "d4" else net(batch["image"])
        if criterion is not None:
            loss, loss_parts = criterion(out, batch)
            n = batch["image"].shape[0]
            sums["loss"] += loss.item() * n
            for k in LOSS_PARTS:
                sums[k] += loss_parts[k].item() * n
        parts["cls"].append(out["class_logits"].float().cpu())
        parts["stn"].append(out["stain_logits"].float().cpu())
        parts["lab"].append(raw["label"])
        parts["st"].append(raw["stain"])
        parts["idx"].append(raw["index"])
        pred = out["deposit_logits"].argmax(dim=1).cpu().numpy()
        conf += metrics.pixel_confusion(pred, raw["mask"].numpy(), num_labels)
    return _gathered(parts, conf, sums if criterion is not None else None, net)


def _gathered(
    parts: dict[str, list[torch.Tensor]],
    conf: np.ndarray,
    sums: dict[str, float] | None,
    net: nn.Module,
) -> dict[str, Any]:
    def cat(xs: list[torch.Tensor], dtype: Any) -> np.ndarray:
        return torch.cat(xs).numpy().astype(dtype) if xs else np.zeros((0,), dtype=dtype)

    result: dict[str, Any] = {
        "class_logits": cat(parts["cls"], np.float32).reshape(-1, len(net.config.class_names)),
        "stain_logits": cat(parts["stn"], np.float32).reshape(-1, len(net.config.stain_names)),
        "labels": cat(parts["lab"], np.int64),
        "stains": cat(parts["st"], np.int64),
        "pixel_conf": conf,
        "indices": cat(parts["idx"], np.int64),
    }
    if sums is not None:
        n = max(len(result["labels"]), 1)
        result["loss"] = sums["loss"] / n
        for k in LOSS_PARTS:
            result[f"loss_{k}"] = sums[k] / n
    return result


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    criterion: nn.Module,
    cfg: Config,
) -> dict[str, Any]:
    """Validation loss and the headline metrics the run is steered by."""
    out = collect_outputs(
        model, loader, device, amp_dtype, criterion=criterion, channels_last=cfg.train.channels_last
    )
    probs = metrics.softmax(out["class_logits"])
    cls = metrics.classification_metrics(out["labels"], probs, list(cfg.model.class_names))
    seg = None
    if out["pixel_conf"].sum() > 0:
        seg = metrics.segmentation_metrics(out["pixel_conf"], list(cfg.model.deposit_labels))
    known = out["stains"] != IGNORE_INDEX
    stain_acc = (
        float((out["stain_logits"][known].argmax(1) == out["stains"][known]).mean())
        if known.any()
        else None
    )
    return {
        "val_loss": out["loss"],
        **{f"val_loss_{k}": out[f"loss_{k}"] for k in LOSS_PARTS},
        "val_acc": cls["accuracy"],
        "val_macro_f1": cls["macro_f1"],
        "val_calcium_dice": seg["calcium_dice"] if seg else None,
        "val_mean_deposit_dice": seg["mean_deposit_dice"] if seg else None,
        "val_stain_acc": stain_acc,
        "val_samples": int(len(out["labels"])),
    }
