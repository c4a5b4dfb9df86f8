"""Export a checkpoint to ONNX, self-describing, and keep a cached copy for inference.

The ONNX file has a dynamic batch axis and a fixed square input of the
model's size; its ``metadata_props`` hold the checkpoint metadata JSON under
``"calcinosis"`` (class names, stain names, deposit labels, the
``preprocessing`` section, temperature, thresholds) plus the SHA-256 of the
checkpoint it came from, so ONNX Runtime alone can run it with the right
preprocessing and calibration.

Static int8 quantisation measures activation ranges on calibration images
that the caller provides (``calcinosis export --int8 --int8-calibration
DIR``): patches of the tissue the model will see, preprocessed exactly as
prediction preprocesses them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError, CheckpointError
from calcinosis.model.fileio import atomic_path, file_digest
from calcinosis.model.preprocess import PREPROCESSING_KEY, Preprocessing

log = logging.getLogger(__name__)

#: Below this share of calibration patches keeping their fp32 class, int8 is flagged.
INT8_MIN_AGREEMENT = 0.95
#: At most this many calibration images are read (evenly spread over what is given):
#: activation ranges settle after a few dozen patches.
INT8_CALIBRATION_IMAGES = 64

#: Key of the metadata JSON inside the ONNX model's metadata_props.
ONNX_METADATA_KEY = "calcinosis"
#: ONNX opset; 17 is read by every onnxruntime of the last few years.
OPSET = 17
OUTPUT_NAMES = ("class_logits", "stain_logits", "deposit_logits")


def export_onnx(
    checkpoint: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint`` as an ONNX model to ``onnx_path`` (atomically) and return the path."""
    import onnx
    import torch

    from calcinosis.model import load_checkpoint

    checkpoint = Path(checkpoint)
    onnx_path = Path(onnx_path)
    model, meta = load_checkpoint(checkpoint, device="cpu")
    spec = Preprocessing.from_metadata(meta)
    size = spec.input_size
    wrapper = _output_tuple(model).eval()  # eval() on the wrapper too: export restores its mode
    example = torch.zeros(2, model.config.in_chans, size, size)
    meta = dict(meta)
    meta[PREPROCESSING_KEY] = spec.to_dict()  # older checkpoints: made from their other keys
    meta["input_size"] = size
    meta["source_checkpoint"] = checkpoint.name
    meta["source_checkpoint_sha256"] = file_digest(checkpoint)
    if extra_metadata:
        meta.update(extra_metadata)

    with atomic_path(onnx_path) as tmp:
        _torch_export(wrapper, example, tmp, opset)
        proto = onnx.load(str(tmp))
        _set_metadata(proto, meta)
        onnx.save(proto, str(tmp))
    return onnx_path


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Sequence[np.ndarray],
) -> Path:
    """Static int8 quantisation (QDQ, per-channel 7-bit weights) calibrated on tissue patches.

    Dynamic quantisation leaves convolutions slower than fp32 in ONNX Runtime;
    static quantisation with activation ranges measured on the ``calibration``
    images (uint8 RGB patches at the model's mpp, of every class and stain the
    model will meet; any size: they are fitted like every input) runs the
    convolutions as int8. Check the agreement with fp32 (``calcinosis bench``
    reports it) before relying on it.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    images = list(calibration)
    if not images:
        raise CalcinosisError(
            "int8 quantisation needs calibration images (patches of the tissue the model will "
            "see); pass them with --int8-calibration DIR (a folder or a manifest)"
        )
    meta = json.loads(_get_metadata(onnx.load(str(src))))
    spec = Preprocessing.from_metadata(meta)
    batches = []
    for i in range(0, len(images), 8):
        chunk = np.stack([spec.apply(im)[0] for im in images[i : i + 8]])
        batches.append({"image": np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        out = Path(td) / "int8.onnx"
        with _quiet():
            # Shape inference and folding first: the quantiser needs weights as initializers.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            # The three output layers stay fp32: they cost little and the logits
            # are what the calibrated probabilities are computed from.
            graph = onnx.load(str(pre)).graph
            keep_fp32 = [
                n.name
                for n in graph.node
                if n.op_type in ("Gemm", "MatMul")
                or (n.op_type == "Conv" and "segmentation_head" in n.name)
            ]
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                # 7-bit weights: without AVX-VNNI (AVX2 CPUs such as this project's
                # reference machine) the u8 x s8 products saturate int16 sums;
                # with full-range weights 1 in 4 class calls changed, with 7 bits none.
                reduce_range=True,
                nodes_to_exclude=keep_fp32,
            )
        agreement = _class_agreement(src, out, batches)
        if agreement < INT8_MIN_AGREEMENT:
            log.warning(
                "int8 quantisation of %s changes the class of %.0f%% of its %d calibration "
                "patches (%.0f%% agree with fp32): this network does not quantise well; use "
                "--backend onnx or torch-bf16 instead of onnx-int8",
                src,
                100 * (1 - agreement),
                len(images),
                100 * agreement,
            )
        proto = onnx.load(str(out))
        meta["quantization"] = "static-int8-qdq"
        meta["calibration_images"] = len(images)
        meta["int8_class_agreement"] = round(agreement, 4)
        _set_metadata(proto, meta)
        with atomic_path(dst) as tmp:
            onnx.save(proto, str(tmp))
    return dst


def _class_agreement(fp32: Path, int8: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """Share of the batches' patches whose top class is the same in both ONNX files."""
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)
    ]
    same = total = 0
    for b in batches:
        a, q = (sess.run(["class_logits"], b)[0].argmax(axis=1) for sess in sessions)
        same += int((a == q).sum())
        total += len(a)
    return same / max(total, 1)


def cached_onnx(
    checkpoint: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    quantize: bool = False,
    calibration: Sequence[np.ndarray] | None = None,
) -> Path:
    """An ONNX export of ``checkpoint``, re-exported only when the checkpoint changed.

    Default location: ``<checkpoint>.onnx`` beside the checkpoint (``.int8.onnx``
    when quantised), or a per-user temp folder when the checkpoint's folder is
    read-only. A cached file is reused only if its recorded checkpoint SHA-256
    matches. A quantised file that is not cached yet needs ``calibration``
    images (see :func:`quantize_onnx`); without them the error says how to
    make one with ``calcinosis export --int8``.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist (or is not a file)")
    digest = file_digest(checkpoint)
    suffix = ".int8.onnx" if quantize else ".onnx"
    if onnx_path is None:
        target = checkpoint.with_name(checkpoint.stem + suffix)
        if not os.access(checkpoint.parent, os.W_OK):
            cache = (
                Path(tempfile.gettempdir())
                / f"calcinosis-onnx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
            )
            cache.mkdir(parents=True, exist_ok=True)
            target = cache / f"{digest[:16]}{suffix}"
    else:
        target = Path(onnx_path)
    if target.is_file() and _onnx_source_digest(target) == digest:
        return target
    if quantize:
        if not calibration:
            fp32 = checkpoint.with_name(checkpoint.stem + ".onnx")
            raise CalcinosisError(
                f"no int8 ONNX file of {checkpoint} at {target} yet, and int8 quantisation needs "
                "calibration images: make it once with 'calcinosis export --checkpoint "
                f"{checkpoint} --onnx {fp32} --int8 --int8-calibration DIR' (DIR: patches of "
                "the tissue the model will see, e.g. its training images), then run again"
            )
        fp32 = cached_onnx(
            checkpoint, None if onnx_path is None else target.with_suffix(".fp32.onnx")
        )
        return quantize_onnx(fp32, target, calibration)
    return export_onnx(checkpoint, target)


def check_parity(
    checkpoint: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    images: list[np.ndarray] | None = None,
    n_random: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Largest absolute difference per output between PyTorch fp32 and ONNX Runtime.

    ``images`` are uint8 RGB arrays (any size: preprocessed as prediction
    does); random images of the input size are used when none are given.
    """
    import onnxruntime as ort
    import torch

    from calcinosis.model import load_checkpoint

    model, meta = load_checkpoint(checkpoint, device="cpu")
    spec = Preprocessing.from_metadata(meta)
    s = spec.input_size
    if images:
        nhwc = np.stack([spec.apply(im)[0] for im in images])
    else:
        batch = np.random.default_rng(seed).integers(0, 256, (n_random, s, s, 3), dtype=np.uint8)
        nhwc = spec.normalize(batch)
    x = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {sess.get_inputs()[0].name: x}),
            strict=True,
        )
    )
    return {k: float(np.abs(ref[k].numpy() - got[k]).max()) for k in OUTPUT_NAMES}


def run_export(args: argparse.Namespace) -> int:
    """``calcinosis export``: write the ONNX file and report the parity with PyTorch."""
    out = Path(args.onnx)
    if out.suffix.lower() != ".onnx":
        raise CalcinosisError(f"--onnx must end in .onnx, got {out}")
    int8 = getattr(args, "int8", False)
    source = getattr(args, "int8_calibration", None)
    calibration: list[np.ndarray] = []
    if int8:
        if not source:
            raise CalcinosisError(
                "--int8 needs calibration images: add --int8-calibration DIR (a folder or a "
                "manifest of patches of the tissue the model will see, e.g. its training data)"
            )
        from .inputs import load_images

        calibration = load_images([source], limit=INT8_CALIBRATION_IMAGES)
    elif source:
        raise CalcinosisError("--int8-calibration is only used with --int8; add --int8")
    export_onnx(args.checkpoint, out, opset=getattr(args, "opset", OPSET))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if int8:
        q = quantize_onnx(out, out.with_name(out.stem + ".int8.onnx"), calibration)
        print(
            f"wrote {q} (static int8, calibrated on {len(calibration)} images of {source}; "
            "check its agreement with 'calcinosis bench')"
        )
    if not getattr(args, "no_check", False):
        diffs = check_parity(args.checkpoint, out)
        worst = max(diffs.values())
        print(
            "max |torch - onnxruntime| per output: "
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        )
        if worst > 1e-3:
            print(f"warning: ONNX output differs from PyTorch by {worst:.2e} (> 1e-3)")
            return 1
    return 0


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint metadata stored in an exported ONNX file's ``metadata_props``."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} could not be loaded by ONNX Runtime: {exc}") from exc
    props = sess.get_modelmeta().custom_metadata_map
    raw = props.get(ONNX_METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path} is an ONNX model without calcinosis metadata; export it with "
            "'calcinosis export' so it carries its class names and preprocessing"
        )
    return json.loads(raw)


# --------------------------------------------------------------------------- helpers


def _output_tuple(model: Any) -> Any:
    """Wrap the network so that it returns a tuple in a fixed order (the ONNX outputs)."""
    import torch

    class OutputTuple(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.net(image)
            return out["class_logits"], out["stain_logits"], out["deposit_logits"]

    return OutputTuple(model)


def _torch_export(wrapper: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    axes = {"image": {0: "batch"}, **{k: {0: "batch"} for k in OUTPUT_NAMES}}
    try:
        # The TorchScript-based exporter: quick, and its graph runs fastest in ORT here.
        with _quiet():
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=["image"],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return
    except (TypeError, RuntimeError) as exc:  # a future torch without the legacy exporter
        legacy_error = exc
    try:
        with _quiet():
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(
                wrapper,
                (example,),
                input_names=["image"],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=max(opset, 18),
                dynamo=True,
            )
            prog.save(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CalcinosisError(
            f"ONNX export failed with both exporters: {legacy_error!r}; {exc!r}"
        ) from exc


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == ONNX_METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key = ONNX_METADATA_KEY
    entry.value = json.dumps(meta)


def _get_metadata(proto: Any) -> str:
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return prop.value
    raise CheckpointError("ONNX model has no calcinosis metadata")


def _onnx_source_digest(path: Path) -> str | None:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return json.loads(_get_metadata(proto)).get("source_checkpoint_sha256")
    except Exception:  # noqa: BLE001 - an unreadable cache is simply rebuilt
        return None


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (deprecation warnings, progress prints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield
