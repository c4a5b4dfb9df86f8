"""Training and validation loaders: which patch comes when, augmented how.

The epoch's order is drawn by :class:`EpochSampler` from a generator seeded
with the epoch; each position carries its own augmentation seed, which
:class:`SeededDataset` hands to the transform for that one item. So what a
rank sees depends on ``(seed, epoch, position)`` only: not on the number of
DataLoader workers, and not on where a resumed run picked up.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from calcinosis.model import ConfigError

from .config import Config
from .distributed import DistInfo
from .seeding import AUGMENT, ORDER, derive_seed


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
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, ORDER))
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
            yield order[pos], derive_seed(self.seed, self.epoch, pos, AUGMENT)

    def __len__(self) -> int:
        return max(0, self.items_per_epoch - self.start)


class SeededDataset(Dataset):
    """Wraps a PatchDataset: item ``(index, seed)`` is sample ``index`` augmented with ``seed``.

    The seed goes to the transform with that one call (``transform(..., seed=)``,
    :class:`~calcinosis.training.transforms.Pipeline`), which seeds
    albumentations' own generators from it; the process-wide generators are
    left alone.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        return self.dataset.get(index, seed=seed % (1 << 32))


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; the main process handles it
    # (saves and stops), so workers must not die under it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, seed: int = 0, **kwargs: Any
) -> DataLoader:
    """A DataLoader with this project's worker set-up; the one place loaders are made.

    Workers ignore Ctrl-C and run one torch thread each; OpenCV's thread pool
    is shut down before they fork (transforms.make_fork_safe). The loader has
    its own generator (``seed``), so iterating it never draws from torch's
    default generator, which dropout uses.
    """
    if num_workers > 0:
        from .transforms import make_fork_safe

        make_fork_safe()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def steps_per_epoch(n_train: int, batch: int, world_size: int, max_steps: int) -> tuple[int, int]:
    """(optimizer steps, items) per rank and epoch.

    The ragged last batch is dropped (BatchNorm dislikes tiny ones) unless
    there is less than one batch in all.
    """
    per_rank = math.ceil(n_train / world_size)
    if per_rank >= batch:
        steps = per_rank // batch
        items = steps * batch
    else:
        steps, items = 1, per_rank
    if max_steps:
        steps = min(steps, max_steps)
        items = min(items, steps * batch)
    return steps, items


def build_loaders(
    cfg: Config, samples: list, data_config: dict[str, Any], dist_info: DistInfo
) -> tuple[DataLoader, DataLoader | None, EpochSampler, int]:
    """Train and validation loaders; returns them with the sampler and steps per epoch."""
    from .dataset import DecodedCache, PatchDataset
    from .transforms import build_train_transform

    class_names = list(cfg.model.class_names)
    stain_names = list(cfg.model.stain_names)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    size = cfg.data.image_size
    train_samples = [s for s in samples if s.split == "train"]
    if not train_samples:
        raise ConfigError("the data has no training samples (split column all val/test?)")

    train_tf = build_train_transform(cfg.augment, size, mean, std)
    mpp = cfg.data.mpp
    cache = DecodedCache(cfg.data.cache_mb * 2**20) if cfg.data.cache_mb else None
    train_ds = PatchDataset(train_samples, class_names, stain_names, train_tf, mpp=mpp, cache=cache)

    batch = cfg.train.batch_size
    steps, items = steps_per_epoch(
        len(train_samples), batch, dist_info.world_size, cfg.train.max_steps_per_epoch
    )
    sampler = EpochSampler(
        [class_names.index(s.label) for s in train_samples],
        weighted=cfg.train.balance == "sampler",
        seed=cfg.seed,
        items_per_epoch=items,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    workers = cfg.data.num_workers
    train_loader = make_loader(
        SeededDataset(train_ds),
        batch_size=batch,
        num_workers=workers,
        seed=cfg.seed,
        sampler=sampler,
        drop_last=False,  # the sampler already yields whole batches
    )
    val_loader = build_eval_loader(cfg, samples, data_config, "val", cache=cache)
    return train_loader, val_loader, sampler, steps


def build_eval_loader(
    cfg: Config, samples: list, data_config: dict[str, Any], split: str, cache: Any = None
) -> DataLoader | None:
    """The patches of ``split`` without augmentation, in order (one pass per patch).

    None when the split has no patches. ``cache``: a ``DecodedCache`` to share
    with another loader of the same run (the training loader's, for validation).
    """
    from .dataset import PatchDataset
    from .transforms import build_eval_transform

    chosen = [s for s in samples if s.split == split]
    if not chosen:
        return None
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    tf = build_eval_transform(
        cfg.data.image_size, mean, std, stain_normalize=cfg.augment.stain_normalize
    )
    ds = PatchDataset(
        chosen,
        list(cfg.model.class_names),
        list(cfg.model.stain_names),
        tf,
        mpp=cfg.data.mpp,
        cache=cache,
    )
    return make_loader(
        ds, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, shuffle=False
    )
