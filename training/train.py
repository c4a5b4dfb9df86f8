"""The training loop, readable top to bottom.

    calcinosis train --config configs/demo.yaml            # one process
    torchrun --nproc_per_node=4 -m calcinosis.inference.cli train --config configs/default.yaml

Sections, in order: setup (processes, device, precision, seeds), data, loss,
optimizer and schedule, ``train_one_epoch`` / ``collect_outputs`` /
``evaluate``, checkpoints and resume, then ``train(cfg, resume)`` which ties
them together and ``run_train(args)`` for the command line.

Reproducibility is by construction rather than by bookkeeping: every random
draw is a pure function of ``(seed, epoch, position)`` or ``(seed, step)``.
The epoch's sample order comes from a generator seeded with the epoch, each
sample's augmentation from a seed derived from its position in the epoch, and
dropout from a generator reseeded at every optimizer step. So the result does
not depend on the number of DataLoader workers, and a resumed run (even one
stopped in the middle of an epoch) replays exactly what the uninterrupted run
would have done.

Files in the run folder (``cfg.output_dir``):
    config.yaml          the resolved config (a run can be repeated from its folder)
    metrics.csv          one row per epoch
    last.safetensors     weights + metadata after the latest epoch (or mid-epoch save)
    best.safetensors     the epoch with the best validation macro-F1 (ties: lower loss)
    state.pt             everything needed to resume exactly (weights_only loadable)
    calibration.json     the fitted softmax temperature and ECE before/after
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from tqdm import tqdm

from calcinosis.model import (
    CHECKPOINT_FORMAT_VERSION,
    ConfigError,
    TrainingError,
    create_model,
    load_checkpoint,
    save_checkpoint,
)
from calcinosis.model.checkpoint import unwrap_model
from calcinosis.model.fileio import atomic_write_bytes
from calcinosis.model.tta import torch_d4

from . import __version__, metrics
from .config import Config, LossWeights, config_to_dict, load_config, save_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LAST_CHECKPOINT = "last.safetensors"
BEST_CHECKPOINT = "best.safetensors"
STATE_FILE = "state.pt"
CALIBRATION_FILE = "calibration.json"
DDP_CHECK_FILE = "ddp_check.json"

#: Same value as ``calcinosis.training.data.IGNORE_INDEX`` and torch's default.
IGNORE_INDEX = -100

#: The cosine schedule ends at this fraction of the peak learning rate rather
#: than 0: the last epochs still learn a little instead of idling.
LR_FLOOR = 0.01

#: Config keys that may differ on --resume: more epochs extend the run; the
#: worker count and the folder's own path do not change any result.
RESUME_MAY_CHANGE = frozenset({"train.epochs", "data.num_workers", "data.cache_mb", "output_dir"})

METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "train_loss_class",
    "train_loss_stain",
    "train_loss_deposit",
    "val_loss",
    "val_acc",
    "val_macro_f1",
    "val_calcium_dice",
    "val_stain_acc",
    "lr",
    "images_per_s",
    "seconds",
)

LOSS_PARTS = ("class", "stain", "deposit")


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one (env WORLD_SIZE > 1) and pick the device.

    NCCL on GPUs (one per local rank), gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu"
        )
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if world <= 1:
        return DistInfo(), torch.device("cuda" if use_cuda else "cpu")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank), device


def resolve_amp_dtype(
    precision: str | torch.dtype | None, device: torch.device
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    'auto' picks bf16 only where the hardware computes it natively (CUDA GPUs
    that support it; CPUs with AMX or AVX512-BF16). On other CPUs bf16 is
    emulated and slower than fp32 (see benchmarks/bench_train.py).
    """
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        with contextlib.suppress(Exception):
            if getattr(torch.cpu, name)():
                return True
    return False


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence, stable across versions)."""
    entropy = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    seed_host(seed)
    torch.manual_seed(seed)


def seed_host(seed: int) -> None:
    """Seed Python, NumPy and torch's CPU generator: what a data pipeline can draw from.

    Called once per training item, so it stays off ``torch.manual_seed``:
    that also queues a CUDA reseed, which records a stack trace every call
    (about 1 ms, a third of the cost of loading a 64 px patch).
    """
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


# Tags that keep the seed streams of different purposes apart.
_ORDER, _AUGMENT, _DROPOUT = 0x0D, 0xA6, 0xD0


# --------------------------------------------------------------------------- data


class EpochSampler(Sampler):
    """Yields ``(dataset index, augmentation seed)`` for this rank's share of one epoch.

    The epoch's order is drawn from a generator seeded with (seed, epoch):
    class-balanced with replacement (``WeightedRandomSampler``) or a plain
    permutation. Every rank draws the same order and takes positions
    ``rank::world_size`` (padded like ``DistributedSampler`` so all ranks take
    the same number of steps). Each position carries its own augmentation
    seed, so the images a rank sees do not depend on worker count, and
    ``start`` can skip the batches already done when resuming mid-epoch.
    """

    def __init__(
        self,
        labels: list[int],
        *,
        weighted: bool,
        seed: int,
        items_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.labels = list(labels)
        self.weighted = weighted
        self.seed = seed
        self.items_per_epoch = items_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        counts = np.bincount(self.labels)
        self.weights = torch.tensor([1.0 / counts[y] for y in self.labels], dtype=torch.double)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_order(self, epoch: int) -> list[int]:
        n = len(self.labels)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _ORDER))
        if self.weighted:
            order = list(WeightedRandomSampler(self.weights, n, replacement=True, generator=g))
        else:
            order = torch.randperm(n, generator=g).tolist()
        total = math.ceil(n / self.world_size) * self.world_size
        while len(order) < total:  # pad by repeating the start, as DistributedSampler does
            order += order[: total - len(order)]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order(self.epoch)
        positions = list(range(self.rank, len(order), self.world_size))[: self.items_per_epoch]
        for k in range(self.start, len(positions)):
            pos = positions[k]
            yield order[pos], derive_seed(self.seed, self.epoch, pos, _AUGMENT)

    def __len__(self) -> int:
        return max(0, self.items_per_epoch - self.start)


class SeededDataset(Dataset):
    """Wraps a PatchDataset: seeds the augmentation of each item from its key.

    albumentations keeps its own random state inside ``Compose`` (global seeds
    do not reach it), so the transform is reseeded too, along with Python's,
    NumPy's and torch's CPU generators for anything else in the pipeline.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        seed_host(seed)
        seed_transform(getattr(self.dataset, "transform", None), seed % (1 << 32))
        return self.dataset[index]


def seed_transform(transform: Any, seed: int) -> None:
    """Reseed the albumentations pipeline inside ``transform`` (a transforms.Pipeline).

    The Pipeline reseeds itself from the DataLoader worker's seed the first
    time it runs in a process; running that hook first keeps it from later
    overriding the per-item seed set here.
    """
    if transform is None:
        return
    from .transforms import reseed

    first_use = getattr(transform, "_maybe_reseed", None)
    if callable(first_use):
        first_use()
    compose = getattr(transform, "compose", transform)
    if hasattr(compose, "set_random_state"):
        reseed(compose, seed)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; the main process handles it
    # (saves and stops), so workers must not die under it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def build_loaders(
    cfg: Config, samples: list, data_config: dict[str, Any], dist_info: DistInfo
) -> tuple[DataLoader, DataLoader | None, EpochSampler, int]:
    """Train and validation loaders; returns them with the sampler and steps per epoch."""
    from .data import DecodedCache, PatchDataset
    from .transforms import build_eval_transform, build_train_transform, make_fork_safe

    class_names = list(cfg.model.class_names)
    stain_names = list(cfg.model.stain_names)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    size = cfg.data.image_size
    train_samples = [s for s in samples if s.split == "train"]
    val_samples = [s for s in samples if s.split == "val"]
    if not train_samples:
        raise ConfigError("the data has no training samples (split column all val/test?)")

    train_tf = build_train_transform(cfg.augment, size, mean, std)
    eval_tf = build_eval_transform(size, mean, std, stain_normalize=cfg.augment.stain_normalize)
    mpp = cfg.data.mpp
    cache = DecodedCache(cfg.data.cache_mb * 2**20) if cfg.data.cache_mb else None
    train_ds = PatchDataset(train_samples, class_names, stain_names, train_tf, mpp=mpp, cache=cache)
    val_ds = None
    if val_samples:
        val_ds = PatchDataset(val_samples, class_names, stain_names, eval_tf, mpp=mpp, cache=cache)

    batch = cfg.train.batch_size
    per_rank = math.ceil(len(train_samples) / dist_info.world_size)
    if per_rank >= batch:
        steps = per_rank // batch  # drop the ragged last batch (BatchNorm dislikes tiny ones)
        items = steps * batch
    else:
        steps, items = 1, per_rank
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
        items = min(items, steps * batch)

    labels = [class_names.index(s.label) for s in train_samples]
    sampler = EpochSampler(
        labels,
        weighted=cfg.train.balance == "sampler",
        seed=cfg.seed,
        items_per_epoch=items,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    workers = cfg.data.num_workers
    common = dict(
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init,
        pin_memory=torch.cuda.is_available(),
    )
    if workers > 0:
        make_fork_safe()
    train_loader = DataLoader(
        SeededDataset(train_ds),
        batch_size=batch,
        sampler=sampler,
        drop_last=False,  # the sampler already yields whole batches
        generator=torch.Generator().manual_seed(cfg.seed),
        **common,
    )
    val_loader = None
    if val_ds is not None:
        val_loader = DataLoader(val_ds, batch_size=batch, shuffle=False, **common)
    return train_loader, val_loader, sampler, steps


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over the classes present) for a weighted loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


# --------------------------------------------------------------------------- loss


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


# --------------------------------------------------------------------------- optimizer


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, encoder_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW; norms and biases (1-d tensors) get no weight decay.

    The parameters of ``model.encoder`` (the pretrained backbone) learn at
    ``lr * encoder_lr_scale``, everything else (decoder, heads) at ``lr``;
    each group keeps its rate in ``base_lr`` for the log. The fused
    implementation (one kernel over all parameters) where the parameters'
    device has it: on the CPU torch otherwise picks the per-tensor loop. In 30
    steps of the demo's training loop under cProfile the optimizer step took
    23 ms per-tensor and 14 ms fused (~2% of a step). The update is the same AdamW.
    """
    encoder = getattr(model, "encoder", None)
    in_encoder = {id(p) for p in encoder.parameters()} if isinstance(encoder, nn.Module) else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in in_encoder, p.ndim <= 1), []).append(p)
    groups = []
    for (enc, no_decay), params in sorted(buckets.items()):
        group_lr = lr * (encoder_lr_scale if enc else 1.0)
        groups.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": group_lr,
                "base_lr": group_lr,
                "name": ("encoder" if enc else "heads") + ("_no_decay" if no_decay else ""),
            }
        )
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and len(devices) == 1
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def warmup_cosine(
    total_steps: int, warmup_steps: int, floor: float = LR_FLOOR
) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine down to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- state of a run


@dataclasses.dataclass
class RunState:
    """Where the run is; saved in state.pt, so resume continues from exactly here."""

    epoch: int = 0  # the epoch in progress (0-based) = epochs completed
    step_in_epoch: int = 0  # optimizer steps done in it
    global_step: int = 0
    best_macro_f1: float | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    # sums over the epoch so far: loss and its parts times batch size, and the count
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def reset_sums(self) -> None:
        self.sums = {"loss": 0.0, **{k: 0.0 for k in LOSS_PARTS}, "n": 0.0}


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


# --------------------------------------------------------------------------- one epoch


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    *,
    run: RunState,
    steps: int,
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    dist_info: DistInfo,
    stop: GracefulStop,
    on_step: Callable[[], None] | None = None,
    ema: Any | None = None,
) -> dict[str, float]:
    """Train until ``run.step_in_epoch == steps``; returns the epoch's mean losses and speed.

    Stops with TrainingError on a non-finite loss or gradient (before the
    optimizer step, so the weights stay clean), and with StopRequested at a
    step boundary after Ctrl-C.
    """
    model.train()
    images, start = 0, time.perf_counter()
    bar = tqdm(
        total=steps,
        initial=run.step_in_epoch,
        desc=f"epoch {run.epoch + 1}/{cfg.train.epochs}",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not dist_info.is_main or not sys.stderr.isatty(),
    )
    for raw in loader:
        if run.step_in_epoch >= steps:
            break
        batch = _to_device(raw, device, cfg.train.channels_last)
        # Dropout draws from a generator reseeded per step: exact replay on resume.
        torch.manual_seed(derive_seed(cfg.seed, run.global_step, dist_info.rank, _DROPOUT))
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            out = model(batch["image"])
        loss, parts = criterion(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if cfg.train.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)

        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        flags = torch.stack([bad.float(), torch.tensor(float(stop.requested), device=device)])
        if dist_info.enabled:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item():
            lr = max(g["lr"] for g in optimizer.param_groups)
            raise TrainingError(
                f"the loss became {loss.item()} (or the gradients non-finite) at epoch "
                f"{run.epoch + 1}, step {run.step_in_epoch + 1} (global step {run.global_step + 1}). "
                f"Lower the learning rate (train.lr={cfg.train.lr:g} now, learning rate at this step "
                f"{lr:.3g}; try train.lr={cfg.train.lr / 10:g}) or check the data. No checkpoint "
                "was written after this point."
            )
        optimizer.step()
        scheduler.step()
        if ema is not None:  # the step number sets the warm-up of the decay: exact on resume
            ema.update(unwrap_model(model), step=run.global_step + 1)
        run.global_step += 1
        run.step_in_epoch += 1

        n = batch["image"].shape[0]
        images += n
        run.sums["loss"] += loss.item() * n
        for k in LOSS_PARTS:
            run.sums[k] += parts[k].item() * n
        run.sums["n"] += n
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if flags[1].item():
            bar.close()
            raise StopRequested
        if on_step is not None:
            on_step()
    bar.close()
    seconds = time.perf_counter() - start

    sums = torch.tensor([run.sums[k] for k in ("loss", *LOSS_PARTS, "n")], dtype=torch.float64)
    if dist_info.enabled:
        sums = sums.to(device)
        dist.all_reduce(sums)
        images *= dist_info.world_size
    sums = sums.cpu().tolist()
    count = max(sums[-1], 1.0)
    return {
        "train_loss": sums[0] / count,
        **{f"train_loss_{k}": sums[i + 1] / count for i, k in enumerate(LOSS_PARTS)},
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
    }


# --------------------------------------------------------------------------- validation


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
    cls, stn, labels, stains, indices = [], [], [], [], []
    conf = np.zeros((num_labels, num_labels), dtype=np.int64)
    sums = {"loss": 0.0, **{k: 0.0 for k in LOSS_PARTS}}
    for raw in loader:
        batch = _to_device(raw, device, channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            out = torch_d4(net, batch["image"]) if tta == "d4" else net(batch["image"])
        if criterion is not None:
            loss, parts = criterion(out, batch)
            n = batch["image"].shape[0]
            sums["loss"] += loss.item() * n
            for k in LOSS_PARTS:
                sums[k] += parts[k].item() * n
        cls.append(out["class_logits"].float().cpu())
        stn.append(out["stain_logits"].float().cpu())
        labels.append(raw["label"])
        stains.append(raw["stain"])
        indices.append(raw["index"])
        pred = out["deposit_logits"].argmax(dim=1).cpu().numpy()
        conf += metrics.pixel_confusion(pred, raw["mask"].numpy(), num_labels)

    def cat(xs: list[torch.Tensor], dtype: Any) -> np.ndarray:
        return torch.cat(xs).numpy().astype(dtype) if xs else np.zeros((0,), dtype=dtype)

    result: dict[str, Any] = {
        "class_logits": cat(cls, np.float32).reshape(-1, len(net.config.class_names)),
        "stain_logits": cat(stn, np.float32).reshape(-1, len(net.config.stain_names)),
        "labels": cat(labels, np.int64),
        "stains": cat(stains, np.int64),
        "pixel_conf": conf,
        "indices": cat(indices, np.int64),
    }
    if criterion is not None:
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


# --------------------------------------------------------------------------- checkpoints


def checkpoint_metadata(
    cfg: Config, model: nn.Module, run: RunState, temperature: float = 1.0
) -> dict[str, Any]:
    """Everything inference needs besides the weights (see calcinosis.model.checkpoint)."""
    net = unwrap_model(model)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "package_version": __version__,
        "model": dataclasses.asdict(net.config),
        "config": config_to_dict(cfg),
        "class_names": list(cfg.model.class_names),
        "stain_names": list(cfg.model.stain_names),
        "deposit_labels": list(cfg.model.deposit_labels),
        "input_size": cfg.data.image_size,
        "mean": [float(v) for v in net.data_config["mean"]],
        "std": [float(v) for v in net.data_config["std"]],
        # The starting weights (name/package/version/file/sha256, or path/sha256; None =
        # from scratch), recorded by load_init_weights; mean/std above follow them.
        "init_weights": getattr(net, "init_weights_source", None),
        "mpp": cfg.data.mpp,
        "temperature": float(temperature),
        "indeterminate_threshold": cfg.inference.indeterminate_threshold,
        "min_tissue_fraction": cfg.inference.min_tissue_fraction,
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "global_step": run.global_step,
        "metrics": _jsonable(run.last_metrics),
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (float, np.floating)):
            v = float(v)
            out[k] = v if math.isfinite(v) else None
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, rename it over ``path``."""
    atomic_write_bytes(path, data)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as tensors/lists (weights_only loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_point(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
    ema: Any | None = None,
) -> None:
    """Write last.safetensors, then state.pt (both atomic).

    state.pt carries its own copy of the weights: if the process dies between
    the two renames, state.pt still holds a weights/optimizer pair that
    belongs together, and resume never mixes steps. With an EMA, the
    checkpoint holds the averaged weights (what inference should use) and
    state.pt both.
    """
    net = unwrap_model(model)
    export = ema.module if ema is not None else net
    save_checkpoint(run_dir / LAST_CHECKPOINT, export, checkpoint_metadata(cfg, export, run))
    state = {
        "format_version": 1,
        "run": dataclasses.asdict(run),
        "model": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,  # bf16 needs no loss scaling
        "rng": rng_state(),
    }
    if ema is not None:
        state["ema"] = {
            k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()
        }
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv from the history kept in state.pt (so it never loses or repeats rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt_csv(row.get(k)) for k in METRICS_COLUMNS})
    _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _fmt_csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume_config(cfg: Config, saved_path: Path, completed_epochs: int) -> None:
    """A resumed run must use the config it was started with (epochs may grow)."""
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume: {saved_path} is missing")
    saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = _flatten(config_to_dict(cfg))
    diff = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    )
    if diff:
        lines = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ConfigError(
            f"cannot resume {saved_path.parent}: the config differs from the one it was started "
            f"with ({lines}). Resume with the run's own config (--config {saved_path}), "
            "changing at most train.epochs, or start a new run in another output_dir."
        )
    if cfg.train.epochs < completed_epochs:
        raise ConfigError(
            f"cannot resume {saved_path.parent} with train.epochs={cfg.train.epochs}: "
            f"{completed_epochs} epochs are already done (epochs can only be extended)"
        )


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"nothing to resume in {run_dir}: no {STATE_FILE} there. Start a new run without "
            "--resume, or point output_dir at the run to continue."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({exc}); start a new run") from exc


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 of the parameters (fp32 bytes, by name): equal across DDP ranks when in sync."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap_model(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- calibration


def calibrate(
    run_dir: Path,
    val_loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    tta: str = "none",
) -> dict[str, Any]:
    """Fit a softmax temperature on the validation logits of the best weights.

    The temperature goes into the metadata of best and last checkpoints
    (rewritten atomically) and into calibration.json with the ECE before and
    after, so inference reports calibrated probabilities. It is fitted on the
    outputs of test-time augmentation mode ``tta`` (inference.tta), the mode
    inference then uses by default: averaged logits are less extreme than
    single-pass ones, so each mode needs its own temperature.
    """
    model, _ = load_checkpoint(run_dir / BEST_CHECKPOINT, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = collect_outputs(
        model, val_loader, device, amp_dtype, channels_last=channels_last, tta=tta
    )
    logits, labels = out["class_logits"], out["labels"]
    temperature = float(metrics.fit_temperature(logits, labels))
    result = {
        "temperature": temperature,
        "fitted_on": "val",
        "tta": tta,
        "samples": int(len(labels)),
        "ece_before": float(metrics.expected_calibration_error(metrics.softmax(logits), labels)),
        "ece_after": float(
            metrics.expected_calibration_error(metrics.softmax(logits, temperature), labels)
        ),
        "checkpoint": BEST_CHECKPOINT,
    }
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        net, meta = load_checkpoint(run_dir / name)
        meta["temperature"] = temperature
        meta["calibration"] = {k: result[k] for k in ("tta", "samples", "ece_before", "ece_after")}
        save_checkpoint(run_dir / name, net, meta)
    _atomic_write_bytes(
        run_dir / CALIBRATION_FILE, (json.dumps(result, indent=2) + "\n").encode("utf-8")
    )
    return result


# --------------------------------------------------------------------------- the run


def _tensorboard(run_dir: Path) -> Any:
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        dist.barrier()


def _load_samples(cfg: Config, dist_info: DistInfo) -> list:
    """Rank 0 prepares the data first (the generator writes files); the others then read it."""
    from .data import load_samples

    samples = load_samples(cfg) if dist_info.is_main else None
    _barrier(dist_info)
    return samples if samples is not None else load_samples(cfg)


def train(cfg: Config, resume: bool = False) -> Path:
    """Train per ``cfg``; return the run folder. See the module docstring for its files."""
    dist_info, device = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, dist_info, device)
    finally:
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, resume: bool, dist_info: DistInfo, device: torch.device) -> Path:
    run_dir = Path(cfg.output_dir)
    main = dist_info.is_main

    # -- the run folder: a new run must not overwrite one, a resumed one must match
    state: dict[str, Any] | None = None
    if resume:
        state = load_resume_state(run_dir)
        check_resume_config(cfg, run_dir / CONFIG_FILE, int(state["run"]["epoch"]))
    elif (run_dir / LAST_CHECKPOINT).exists() or (run_dir / STATE_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a training run ({LAST_CHECKPOINT}). Pass --resume to "
            f"continue it, or choose another output_dir (for example output_dir={run_dir}-2)."
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    _barrier(dist_info)
    amp_dtype = resolve_amp_dtype(cfg.train.precision, device)

    # -- data, model, loss, optimizer, schedule
    samples = _load_samples(cfg, dist_info)
    seed_everything(cfg.seed)  # after the data: generating it must not change the init
    model = create_model(cfg.model)
    train_loader, val_loader, sampler, steps = build_loaders(
        cfg, samples, model.data_config, dist_info
    )
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cw = None
    if cfg.train.balance == "loss":
        cw = class_weights(sampler.labels, len(cfg.model.class_names)).to(device)
    criterion = MultiTaskLoss(cfg.train.loss_weights, cw).to(device)
    optimizer = build_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.encoder_lr_scale
    )
    total_steps = cfg.train.epochs * steps
    warmup_steps = round(cfg.train.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps)
    )

    ema = None
    if cfg.train.ema_decay > 0:
        from timm.utils import ModelEmaV3

        # use_warmup: the decay grows with the step count (1 - (1 + step)^-2/3),
        # capped at ema_decay, so early weights do not linger in a short run.
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
    run = RunState()
    run.reset_sums()
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            if "ema" not in state:
                raise ConfigError(
                    f"{run_dir / STATE_FILE} has no weight average (EMA), but the config "
                    "asks for train.ema_decay > 0; resume with the run's own config.yaml"
                )
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        run = RunState(**state["run"])
        if not main:  # the saved partial sums are already global; count them once
            run.reset_sums()
    already_done = run.epoch >= cfg.train.epochs

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )

    if main:
        n_train = sum(s.split == "train" for s in samples)
        n_val = sum(s.split == "val" for s in samples)
        procs = f"{dist_info.world_size} processes" if dist_info.enabled else "1 process"
        print(
            f"run dir: {run_dir}\n"
            f"data: {n_train} train / {n_val} val patches at {cfg.data.image_size} px; "
            f"{steps} steps/epoch of {cfg.train.batch_size} per process\n"
            f"model: {cfg.model.backbone} on {device} ({procs}), "
            f"precision {'bf16' if amp_dtype is not None else 'fp32'}"
            f"{', channels_last' if cfg.train.channels_last else ''}"
            f"{f', weight EMA {cfg.train.ema_decay:g}' if ema is not None else ''}",
            flush=True,
        )
        if state is not None:
            print(
                f"resuming at epoch {run.epoch + 1}, step {run.step_in_epoch} "
                f"(global step {run.global_step})",
                flush=True,
            )

    def save_now() -> None:
        _save_resume_point_all_ranks(
            run_dir, cfg, model, optimizer, scheduler, run, dist_info, device, ema
        )

    def mid_epoch_save() -> None:
        every = cfg.train.checkpoint_every_steps
        if every and run.global_step % every == 0 and run.step_in_epoch < steps:
            save_now()

    # what is validated and exported: the weight average when there is one
    eval_net: nn.Module = ema.module if ema is not None else model
    writer = _tensorboard(run_dir) if main else None
    stop = GracefulStop()
    try:
        with stop:
            while run.epoch < cfg.train.epochs:
                epoch_start = time.perf_counter()
                sampler.set_epoch(run.epoch, start=run.step_in_epoch * cfg.train.batch_size)
                try:
                    stats = train_one_epoch(
                        train_model, train_loader, optimizer, scheduler, criterion,
                        run=run, steps=steps, cfg=cfg, device=device, amp_dtype=amp_dtype,
                        dist_info=dist_info, stop=stop, on_step=mid_epoch_save, ema=ema,
                    )  # fmt: skip
                except StopRequested:
                    save_now()
                    _print_resume_hint(run_dir, run, main)
                    raise KeyboardInterrupt from None

                val: dict[str, Any] = {}
                if main and val_loader is not None:
                    val = evaluate(
                        eval_net,
                        val_loader,
                        device=device,
                        amp_dtype=amp_dtype,
                        criterion=criterion,
                        cfg=cfg,
                    )
                row = {
                    "epoch": run.epoch + 1,
                    **{k: v for k, v in stats.items() if k != "train_seconds"},
                    **val,
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - epoch_start,
                }
                improved = main and _improves(run, val)
                if improved:
                    run.best_macro_f1 = val.get("val_macro_f1")
                    run.best_val_loss = val.get("val_loss")
                    run.best_epoch = run.epoch + 1

                # The epoch is complete: advance the state, then save it.
                run.history.append(_jsonable(row))
                run.last_metrics = _jsonable({k: v for k, v in row.items() if k != "epoch"})
                run.epoch += 1
                run.step_in_epoch = 0
                run.reset_sums()
                if main:
                    if improved:
                        meta = checkpoint_metadata(cfg, eval_net, run)
                        save_checkpoint(run_dir / BEST_CHECKPOINT, eval_net, meta)
                    save_resume_point(run_dir, cfg, model, optimizer, scheduler, run, ema)
                    write_metrics_csv(run_dir / METRICS_FILE, run.history)
                    _print_epoch(row, cfg, improved)
                    if writer is not None:
                        for k, v in row.items():
                            if k != "epoch" and isinstance(v, (int, float)):
                                writer.add_scalar(k, v, row["epoch"])
                if _any_rank(stop.requested, dist_info, device):
                    _print_resume_hint(run_dir, run, main)
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if main and not stop.requested:
            print(
                "interrupted; resume from the last saved point with:\n"
                f"  calcinosis train --config {run_dir / CONFIG_FILE} --resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        if writer is not None:
            writer.close()

    # -- all epochs done: check that DDP ranks agree, then calibrate on rank 0
    if dist_info.enabled:
        _check_ranks_in_sync(run_dir, model, dist_info)
    if main and cfg.calibrate:
        if val_loader is None:
            print("calibration skipped: no validation split", flush=True)
        elif already_done and (run_dir / CALIBRATION_FILE).exists():
            print(f"{run_dir} is complete and calibrated; nothing to do", flush=True)
        else:
            cal = calibrate(
                run_dir,
                val_loader,
                device,
                amp_dtype,
                cfg.train.channels_last,
                tta=cfg.inference.tta,
            )
            print(
                f"calibration: temperature {cal['temperature']:.3f}, val ECE "
                f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
                + (
                    f" (test-time augmentation {cfg.inference.tta})"
                    if cfg.inference.tta != "none"
                    else ""
                ),
                flush=True,
            )
    if main:
        print(
            f"done: best epoch {run.best_epoch}, val macro-F1 {_fmt(run.best_macro_f1)}; "
            f"checkpoints in {run_dir}",
            flush=True,
        )
    _barrier(dist_info)
    return run_dir


def _improves(run: RunState, val: dict[str, Any]) -> bool:
    """Better validation macro-F1, or equal with a lower validation loss."""
    if not val:
        return True  # no validation split: the latest weights are the best we know
    f1, loss = val.get("val_macro_f1"), val.get("val_loss")
    if f1 is None:
        return False
    if run.best_macro_f1 is None or f1 > run.best_macro_f1:
        return True
    return f1 == run.best_macro_f1 and loss < (run.best_val_loss or math.inf)


def _any_rank(flag: bool, dist_info: DistInfo, device: torch.device) -> bool:
    if not dist_info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _save_resume_point_all_ranks(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
    dist_info: DistInfo,
    device: torch.device,
    ema: Any | None = None,
) -> None:
    """Mid-epoch resume point. Called on every rank: under DDP the partial loss
    sums are added up across ranks first; rank 0 writes."""
    saved = run
    if dist_info.enabled:
        keys = ["loss", *LOSS_PARTS, "n"]
        t = torch.tensor([run.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        saved = dataclasses.replace(run, sums=dict(zip(keys, t.cpu().tolist(), strict=True)))
    if dist_info.is_main:
        save_resume_point(run_dir, cfg, model, optimizer, scheduler, saved, ema)


def _check_ranks_in_sync(run_dir: Path, model: nn.Module, dist_info: DistInfo) -> None:
    """All ranks must end with the same parameters; rank 0 records the checksums."""
    checksums: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(checksums, parameter_checksum(model))
    if dist_info.is_main:
        report = {"world_size": dist_info.world_size, "parameter_sha256": checksums}
        _atomic_write_bytes(
            run_dir / DDP_CHECK_FILE, (json.dumps(report, indent=2) + "\n").encode()
        )
    if len(set(checksums)) != 1:
        raise TrainingError(f"DDP ranks ended with different weights (checksums {checksums})")


def _print_resume_hint(run_dir: Path, run: RunState, main: bool) -> None:
    if main:
        print(
            f"interrupted: saved epoch {run.epoch + 1} step {run.step_in_epoch} in "
            f"{run_dir / STATE_FILE}. Resume with:\n"
            f"  calcinosis train --config {run_dir / CONFIG_FILE} --resume",
            file=sys.stderr,
            flush=True,
        )


def _print_epoch(row: dict[str, Any], cfg: Config, improved: bool) -> None:
    print(
        f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f} "
        f"(class {row['train_loss_class']:.3f} stain {row['train_loss_stain']:.3f} "
        f"deposit {row['train_loss_deposit']:.3f})  val loss {_fmt(row.get('val_loss'), '.4f')} "
        f"acc {_fmt(row.get('val_acc'))} macro-F1 {_fmt(row.get('val_macro_f1'))} "
        f"calcium Dice {_fmt(row.get('val_calcium_dice'))} "
        f"stain acc {_fmt(row.get('val_stain_acc'))}  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.1f} img/s  {row['seconds']:.1f} s"
        f"{'  *best*' if improved else ''}",
        flush=True,
    )


def run_train(args: Any) -> int:
    """``calcinosis train --config X [key=value ...] [--resume]``."""
    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    train(cfg, resume=bool(getattr(args, "resume", False)))
    return 0
