"""Inference benchmark: ``calcinosis bench`` on synthetic patches made here.

    python benchmarks/bench_infer.py --checkpoint runs/demo/best.safetensors
    python benchmarks/bench_infer.py --checkpoint CKPT --backends torch-eager,onnx --iters 20

Every option of ``calcinosis bench`` is accepted; see ``calcinosis bench --help``.
Unless ``--images`` names patches of your own, this script renders
``--n-images`` (default 64) synthetic patches cycling through every class and
stain (the generator is deterministic: the same patches every run) at the
checkpoint's input size and hands them to the bench, which does not reach for
the generator itself. Each backend runs in a fresh process (its own peak
memory); the table gives patches/s at the batch size, the ratio to PyTorch
fp32 eager, single-patch latency, peak RSS and agreement with fp32 eager, then
the end-to-end rate of ``calcinosis predict`` on a folder of PNGs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from calcinosis.model import read_checkpoint_metadata
from calcinosis.model.cli import main
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES
from calcinosis.model.preprocess import Preprocessing

#: First generator seed of the bench patches (the seeds the bench always used).
SEED = 20_000


def synthetic_patches(n: int, size: int, seed: int = SEED) -> np.ndarray:
    """``n`` synthetic patches of ``size`` px, cycling through every class and stain."""
    from calcinosis.training.synthetic import render_patch

    pairs = [(c, s) for c in CLASS_NAMES for s in STAIN_NAMES]
    return np.stack(
        [render_patch(*pairs[i % len(pairs)], seed=seed + i, size=size)[0] for i in range(n)]
    )


def run(argv: list[str]) -> int:
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--checkpoint")
    known.add_argument("--images")
    known.add_argument("--n-images", type=int, default=64)
    known.add_argument("--size", type=int)
    args, _ = known.parse_known_args(argv)
    if args.images is not None or args.checkpoint is None or "-h" in argv or "--help" in argv:
        return main(["bench", *argv])
    size = (
        args.size
        or Preprocessing.from_metadata(read_checkpoint_metadata(args.checkpoint)).input_size
    )
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as td:
        images = Path(td) / "patches.npy"
        print(f"rendering {args.n_images} synthetic {size} px patches ...", flush=True)
        np.save(images, synthetic_patches(max(1, args.n_images), size))
        return main(["bench", *argv, "--images", str(images)])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
