"""Inference benchmark: a thin wrapper around ``calcinosis bench``.

    python benchmarks/bench_infer.py --checkpoint runs/demo/best.safetensors
    python benchmarks/bench_infer.py --checkpoint CKPT --backends torch-eager,onnx --iters 20

Every option of ``calcinosis bench`` is accepted; see ``calcinosis bench --help``.
Each backend runs in a fresh process (its own peak memory); the table gives
patches/s at the batch size, the ratio to PyTorch fp32 eager, single-patch
latency, peak RSS and agreement with fp32 eager, then the end-to-end rate of
``calcinosis predict`` on a folder of PNGs.
"""

from __future__ import annotations

import sys

from calcinosis.inference.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
