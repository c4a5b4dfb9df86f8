"""What this machine computes natively, and how much CPU a process has used.

Training picks its precision with :func:`cpu_has_native_bf16` (``train.precision:
auto``) and inference warns with it when ``--backend torch-bf16`` would be
emulated; ``calcinosis predict`` and ``calcinosis bench`` report
:func:`cpu_seconds`. One probe for both sides, so they cannot disagree about
the same CPU.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["cpu_has_native_bf16", "cpu_seconds"]


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 instructions (the probes torch itself exposes).

    Elsewhere bf16 is emulated and slower than fp32 (see benchmarks/bench_train.py).
    Without torch, or with a build that lacks the probes: False.
    """
    try:
        import torch
    except ImportError:
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        with contextlib.suppress(Exception):
            if getattr(torch.cpu, name)():
                return True
    return False


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    t = os.times()
    return t.user + t.system
