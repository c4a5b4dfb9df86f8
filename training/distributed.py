"""Processes, device and precision: one process, or one per GPU/CPU under torchrun.

    torchrun --nproc_per_node=4 -m calcinosis.inference.cli train --config configs/default.yaml

Every collective the training loop uses goes through a helper here, and each
is a no-op in a one-process run, so the loop reads the same either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from calcinosis.model import ConfigError, TrainingError
from calcinosis.model.checkpoint import unwrap_model
from calcinosis.model.fileio import atomic_write_bytes
from calcinosis.model.hardware import cpu_has_native_bf16


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


def teardown_distributed(dist_info: DistInfo) -> None:
    if dist_info.enabled and dist.is_initialized():
        dist.destroy_process_group()


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


# --------------------------------------------------------------------------- collectives


def barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        dist.barrier()


def any_rank(flag: bool, dist_info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(t: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """Element-wise maximum of ``t`` over the ranks (in place; ``t`` itself in one process)."""
    if dist_info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise float64 sum of ``values`` over the ranks."""
    if not dist_info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(obj: Any, dist_info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not dist_info.enabled:
        return [obj]
    out: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 of the parameters (fp32 bytes, by name): equal across DDP ranks when in sync."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap_model(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_in_sync(path: Path, model: nn.Module, dist_info: DistInfo) -> None:
    """All ranks must end with the same parameters; rank 0 records the checksums at ``path``."""
    checksums = gather_objects(parameter_checksum(model), dist_info)
    if dist_info.is_main:
        report = {"world_size": dist_info.world_size, "parameter_sha256": checksums}
        atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())
    if len(set(checksums)) != 1:
        raise TrainingError(f"DDP ranks ended with different weights (checksums {checksums})")


def wrap_ddp(model: nn.Module, dist_info: DistInfo, device: torch.device) -> nn.Module:
    """The module the training step runs: DistributedDataParallel under torchrun."""
    if not dist_info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
    )
