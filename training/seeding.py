"""Where a training run's randomness comes from, and how it is saved for resume.

Three streams, kept apart by a tag mixed into their seeds:

* the epoch's sample order: a ``torch.Generator`` seeded with ``(seed, epoch)``
  (:class:`~calcinosis.training.loaders.EpochSampler`);
* each sample's augmentation: albumentations' own generators, seeded with
  ``(seed, epoch, position)`` for that one item
  (:class:`~calcinosis.training.loaders.SeededDataset`);
* dropout: torch's default generator (``nn.Dropout`` takes no generator),
  seeded once per rank with ``(seed, rank)`` after the network is built and
  saved with every resume point, one state per rank (:func:`rng_state`).

Nothing reseeds the process-wide generators per item or per step, so the
result does not depend on the number of DataLoader workers, and a resumed run
replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

#: Tags that keep the seed streams of different purposes apart.
ORDER, AUGMENT, DROPOUT = 0x0D, 0xA6, 0xD0


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence, stable across versions)."""
    entropy = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer: the network's init."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_dropout(seed: int, rank: int) -> None:
    """Start this rank's dropout stream (torch's default generators, CPU and CUDA).

    Called once, after the network is built, so the initial weights are the
    same on every rank while the dropout masks differ between ranks.
    """
    torch.manual_seed(derive_seed(seed, rank, DROPOUT))


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
    """Restore what :func:`rng_state` saved."""
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


def rank_rng_state(saved: Any, rank: int) -> dict[str, Any]:
    """This rank's generator state from a state.pt's ``rng`` entry.

    Current files hold a list, one state per rank; older files (and a run
    resumed with more processes than it was started with) give rank 0's.
    """
    if isinstance(saved, dict):
        return saved
    return saved[rank] if rank < len(saved) else saved[0]
