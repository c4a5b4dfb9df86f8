"""The backends that run the network: PyTorch (fp32 or bf16, NHWC or NCHW) and ONNX Runtime.

An engine is a callable from a batch of preprocessed network inputs
(``(N, H, W, 3)`` float32, ``model.preprocess``'s output) to the three logit
arrays ``(class (N, C), stain (N, S), deposit (N, D, H, W))`` as float32
numpy. Nothing else of the predictor depends on which backend runs:
:func:`load_engine` builds one from a checkpoint and :func:`infer` runs it,
averaged over the D4 views when test-time augmentation asks for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError, CheckpointError
from calcinosis.model.hardware import cpu_has_native_bf16
from calcinosis.model.tta import numpy_d4

from .export import cached_onnx, read_onnx_metadata

__all__ = [
    "BACKENDS",
    "Engine",
    "OnnxEngine",
    "TorchEngine",
    "check_backend",
    "infer",
    "load_engine",
]

log = logging.getLogger(__name__)

#: Backends: PyTorch fp32 NHWC (the default), fp32 NCHW eager (the plain
#: baseline), bf16 autocast NHWC, fp32 NHWC through torch.compile (slow to
#: start), ONNX Runtime fp32, ONNX Runtime int8 (static QDQ quantisation).
BACKENDS = ("torch", "torch-eager", "torch-bf16", "torch-compile", "onnx", "onnx-int8")

Logits = tuple[np.ndarray, np.ndarray, np.ndarray]
#: Preprocessed NHWC float32 batch -> (class, stain, deposit) logits.
Engine = Callable[[np.ndarray], Logits]


class TorchEngine:
    """PyTorch model; fp32 or bf16 autocast, NHWC (channels_last) or NCHW."""

    def __init__(
        self, model: Any, device: str, bf16: bool, channels_last: bool, compile: bool = False
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.bf16 = bf16
        if bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "torch-bf16 on a CPU without native bf16 (AMX / AVX512-BF16) is emulated and "
                "slower than fp32 here; prefer --backend onnx or torch"
            )
        self.channels_last = channels_last
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model

    def __call__(self, nhwc: np.ndarray) -> Logits:
        torch = self.torch
        x = (
            torch.from_numpy(nhwc).to(self.device).permute(0, 3, 1, 2)
        )  # NHWC memory = channels_last
        x = x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
        # Denormal floats (tiny activations, common with fresh or lightly trained
        # weights) are up to 40x slower on x86 and change nothing in the answer:
        # flush them to zero for the forward pass only. The flag is per-thread
        # CPU state, so it is switched off again (it would otherwise leak into
        # the caller, e.g. numpy code that relies on subnormals).
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                if self.bf16:
                    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                        out = self.model(x)
                else:
                    out = self.model(x)
        finally:
            if flush:
                torch.set_flush_denormal(False)
        return (
            out["class_logits"].float().cpu().numpy(),
            out["stain_logits"].float().cpu().numpy(),
            out["deposit_logits"].float().cpu().numpy(),
        )


class OnnxEngine:
    """ONNX Runtime session (CPU unless CUDA is asked for and present)."""

    def __init__(self, onnx_path: Path, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: spinning burns the cores
        # that decoding and overlay threads (or other processes) need, and on the
        # project's 2-core machines it made even the bare model slower.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CalcinosisError(
                    "backend 'onnx' on CUDA needs onnxruntime-gpu; use --device cpu or a torch backend"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a broken file is a user error here
            raise CheckpointError(
                f"{onnx_path} could not be loaded by ONNX Runtime: {exc}"
            ) from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, nhwc: np.ndarray) -> Logits:
        x = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
        out = dict(
            zip(self.output_names, self.session.run(None, {self.input_name: x}), strict=True)
        )
        return out["class_logits"], out["stain_logits"], out["deposit_logits"]


def check_backend(backend: str) -> str:
    """``backend`` when it is one of :data:`BACKENDS`, else an error listing them."""
    if backend not in BACKENDS:
        raise CalcinosisError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def load_engine(
    path: str | os.PathLike[str],
    backend: str = "torch",
    device: str = "cpu",
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> tuple[Engine, dict[str, Any]]:
    """(engine, checkpoint metadata) for a ``.safetensors`` checkpoint or a self-describing ``.onnx``.

    ``backend="onnx"`` exports the checkpoint once to ``onnx_path`` (default:
    a cache file next to the checkpoint, or in the temp folder when that
    folder is read-only) and reuses it while the checkpoint is unchanged.
    """
    check_backend(backend)
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if not backend.startswith("onnx"):
            raise CalcinosisError(f"{path} is an ONNX file; use --backend onnx with it")
        return OnnxEngine(path, device, threads), read_onnx_metadata(path)
    if backend.startswith("torch"):
        from calcinosis.model import load_checkpoint  # torch: loaded only when asked for

        model, meta = load_checkpoint(path, device=device)
        engine = TorchEngine(
            model,
            device,
            bf16=backend == "torch-bf16",
            channels_last=backend != "torch-eager",
            compile=backend == "torch-compile",
        )
        return engine, meta
    onnx_file = cached_onnx(path, onnx_path, quantize=backend == "onnx-int8")
    return OnnxEngine(onnx_file, device, threads), read_onnx_metadata(onnx_file)


def infer(engine: Engine, nhwc: np.ndarray, tta: str = "none") -> Logits:
    """The engine's (class, stain, deposit) logits, averaged over the 8 D4 views with ``tta="d4"``."""
    if tta == "d4":
        cls, stain, dep = numpy_d4(engine, nhwc)
        return cls, stain, dep
    return engine(nhwc)
