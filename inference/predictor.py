"""From a checkpoint and an image to a calibrated, explained answer.

:class:`Predictor` hides everything between pixels and the answer a
pathologist reads: the checkpoint's preprocessing (``model/preprocess.py``:
resampling to its microns per pixel, stain normalisation, reflect-pad or
centre-crop to the input size, mean/std; the very function evaluation
applies), the backend that runs the network (PyTorch fp32 or
bf16, or ONNX Runtime), calibrated probabilities (``softmax(logits / T)``),
the "indeterminate" rule, the tissue and focus checks, the deposits as
lesions (``lesions.find_lesions``), and, for images much larger than the
network input, tiling with blended stitching of the deposit map and a region
call made from the lesions found (``lesions.region_call``).

A patch (one network input) is called by the class head, as it was trained
and calibrated; its deposits are still listed as lesions. A region is called
by its lesions: the class with the most ``area x confidence`` over the
lesions that pass the lesion threshold, other classes present listed in
``region["also_present"]``; ``normal`` only where no lesion passes. The
tissue-weighted mean of the tile probabilities, which the call used to be,
stays in ``region["tile_mean_probabilities"]``.

Result statuses: ``ok``; ``indeterminate`` (top calibrated probability below
the threshold, or for a region the winning class's; the prediction is then the
word "indeterminate"); ``no_tissue`` (blank glass or background: the network is
not asked); ``out_of_focus`` (probabilities are reported but no call is made);
``error`` (the image could not be read; ``reason`` says why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calcinosis.model.errors import CalcinosisError, CheckpointError
from calcinosis.model.imageio import load_image
from calcinosis.model.labels import (
    CLASS_NAMES,
    DEPOSIT_LABELS,
    INDETERMINATE,
    STAIN_NAMES,
)
from calcinosis.model.metadata import checkpoint_tta, setting
from calcinosis.model.preprocess import Placement, Preprocessing, resample_to_mpp
from calcinosis.model.tta import numpy_d4

from .export import cached_onnx, read_onnx_metadata
from .lesions import LESION_THRESHOLD, MIN_LESION_AREA_UM2, Lesions, find_lesions, region_call
from .result import STATUSES, PatchResult, error_reason
from .slide import is_slide_file, predict_slide
from .tiling import ArraySource, PixelSource, ResampledSource, Stitcher, label_histogram, tile_grid
from .tissue import focus_measure, outside_section, tissue_mask

__all__ = ["BACKENDS", "STATUSES", "PatchResult", "Predictor", "load_image", "read_onnx_metadata"]

log = logging.getLogger(__name__)

#: Backends: PyTorch fp32 NHWC (the default), fp32 NCHW eager (the plain
#: baseline), bf16 autocast NHWC, fp32 NHWC through torch.compile (slow to
#: start), ONNX Runtime fp32, ONNX Runtime int8 (static QDQ quantisation).
BACKENDS = ("torch", "torch-eager", "torch-bf16", "torch-compile", "onnx", "onnx-int8")

#: An image is tiled (region mode) when a side exceeds this many network inputs.
REGION_FACTOR = 1.5
#: Below this relative sharpness (``tissue.focus_measure`` at the model's mpp) a
#: patch is called out of focus. Sharp synthetic tissue scores >= 1; a Gaussian
#: defocus of sigma 2 px scores 0.04-0.37 and of 3 px 0.02-0.29, so 0.15 flags
#: strong blur without touching the blur that stain/scanner variation brings.
FOCUS_MIN = 0.15
#: Region tissue detection runs on a thumbnail whose longer side is at most this.
TISSUE_THUMB_SIDE = 2048


# --------------------------------------------------------------------------- engines


class _TorchEngine:
    """PyTorch model; fp32 or bf16 autocast, NHWC (channels_last) or NCHW."""

    def __init__(
        self, model: Any, device: str, bf16: bool, channels_last: bool, compile: bool = False
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.bf16 = bf16
        if bf16 and self.device.type == "cpu" and not _cpu_has_fast_bf16():
            log.warning(
                "torch-bf16 on a CPU without native bf16 (AMX / AVX512-BF16) is emulated and "
                "slower than fp32 here; prefer --backend onnx or torch"
            )
        self.channels_last = channels_last
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model

    def __call__(self, nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


class _OnnxEngine:
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

    def __call__(self, nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
        out = dict(
            zip(self.output_names, self.session.run(None, {self.input_name: x}), strict=True)
        )
        return out["class_logits"], out["stain_logits"], out["deposit_logits"]


# --------------------------------------------------------------------------- predictor


class Predictor:
    """Run a trained checkpoint on patches and regions; see the module docstring."""

    def __init__(
        self,
        engine: Any,
        metadata: dict[str, Any],
        *,
        backend: str = "torch",
        indeterminate_threshold: float | None = None,
        min_tissue_fraction: float | None = None,
        focus_threshold: float | None = FOCUS_MIN,
        batch_size: int = 32,
        tile_overlap: int | None = None,
        tta: str | None = None,
        lesion_threshold: float | None = None,
        min_lesion_area_um2: float | None = None,
    ) -> None:
        self.engine = engine
        self.metadata = metadata
        self.tta, tta_warning = checkpoint_tta(metadata, tta)
        if tta_warning:
            log.warning(tta_warning)
        self.backend = backend
        self.class_names = list(metadata.get("class_names") or CLASS_NAMES)
        self.stain_names = list(metadata.get("stain_names") or STAIN_NAMES)
        self.deposit_labels = list(metadata.get("deposit_labels") or DEPOSIT_LABELS)
        #: What every patch and tile goes through before the network (the checkpoint's own).
        self.preprocessing = Preprocessing.from_metadata(metadata)
        self.input_size = self.preprocessing.input_size
        self.mean = np.asarray(self.preprocessing.mean, np.float32)
        self.std = np.asarray(self.preprocessing.std, np.float32)
        self.model_mpp = self.preprocessing.mpp
        self.temperature = float(metadata.get("temperature") or 1.0)
        if indeterminate_threshold is None:
            indeterminate_threshold = setting(
                metadata, "indeterminate_threshold", ("inference", "indeterminate_threshold"), 0.6
            )
        self.indeterminate_threshold = float(indeterminate_threshold)
        if min_tissue_fraction is None:
            min_tissue_fraction = setting(
                metadata, "min_tissue_fraction", ("inference", "min_tissue_fraction"), 0.1
            )
        self.min_tissue_fraction = float(min_tissue_fraction)
        if lesion_threshold is None:
            lesion_threshold = setting(
                metadata, "lesion_threshold", ("inference", "lesion_threshold"), LESION_THRESHOLD
            )
        #: A lesion counts towards a region's call at this calibrated confidence or more.
        self.lesion_threshold = float(lesion_threshold)
        if min_lesion_area_um2 is None:
            min_lesion_area_um2 = setting(
                metadata,
                "min_lesion_area_um2",
                ("inference", "min_lesion_area_um2"),
                MIN_LESION_AREA_UM2,
            )
        #: Deposits smaller than this (µm²) are specks, not lesions.
        self.min_lesion_area_um2 = float(min_lesion_area_um2)
        if not 0.0 <= self.lesion_threshold <= 1.0:
            raise CalcinosisError(
                f"lesion threshold must be a probability in [0, 1]; got {self.lesion_threshold}"
            )
        if not self.min_lesion_area_um2 >= 0.0:
            raise CalcinosisError(
                f"minimum lesion area must be >= 0 square microns; got {self.min_lesion_area_um2}"
            )
        self.focus_threshold = focus_threshold
        self.batch_size = max(1, int(batch_size))
        self.tile_overlap = self.input_size // 4 if tile_overlap is None else int(tile_overlap)
        if not 0 <= self.tile_overlap < self.input_size:
            raise CalcinosisError(
                f"tile overlap must be in [0, {self.input_size}) pixels for this model "
                f"(input size {self.input_size}); got {self.tile_overlap}"
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        backend: str = "torch",
        device: str = "cpu",
        indeterminate_threshold: float | None = None,
        batch_size: int = 32,
        *,
        onnx_path: str | os.PathLike[str] | None = None,
        tile_overlap: int | None = None,
        focus_threshold: float | None = FOCUS_MIN,
        min_tissue_fraction: float | None = None,
        threads: int | None = None,
        tta: str | None = None,
        lesion_threshold: float | None = None,
        min_lesion_area_um2: float | None = None,
    ) -> Predictor:
        """Load a ``.safetensors`` checkpoint (or a self-describing ``.onnx`` file).

        ``backend="onnx"`` exports the checkpoint once to ``onnx_path`` (default:
        a cache file next to the checkpoint, or in the temp folder when that
        folder is read-only) and reuses it while the checkpoint is unchanged.
        """
        if backend not in BACKENDS:
            raise CalcinosisError(
                f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        path = Path(path)
        kwargs = dict(
            backend=backend,
            indeterminate_threshold=indeterminate_threshold,
            batch_size=batch_size,
            tile_overlap=tile_overlap,
            focus_threshold=focus_threshold,
            min_tissue_fraction=min_tissue_fraction,
            tta=tta,
            lesion_threshold=lesion_threshold,
            min_lesion_area_um2=min_lesion_area_um2,
        )
        if path.suffix.lower() == ".onnx":
            if not backend.startswith("onnx"):
                raise CalcinosisError(f"{path} is an ONNX file; use --backend onnx with it")
            meta = read_onnx_metadata(path)
            return cls(_OnnxEngine(path, device, threads), meta, **kwargs)
        if backend.startswith("torch"):
            from calcinosis.model import load_checkpoint  # torch: loaded only when asked for

            model, meta = load_checkpoint(path, device=device)
            engine = _TorchEngine(
                model,
                device,
                bf16=backend == "torch-bf16",
                channels_last=backend != "torch-eager",
                compile=backend == "torch-compile",
            )
            return cls(engine, meta, **kwargs)
        onnx_file = cached_onnx(path, onnx_path, quantize=backend == "onnx-int8")
        meta = read_onnx_metadata(onnx_file)
        return cls(_OnnxEngine(onnx_file, device, threads), meta, **kwargs)

    # ------------------------------------------------------------------ public API

    def predict(self, image: Any, mpp: float | None = None) -> PatchResult:
        """Predict one image: an ``(H, W, 3)`` uint8 array, a PIL image or a path.

        A path to a whole-slide file (see ``slide.is_slide_file``) is predicted
        with :meth:`predict_slide` over the whole slide.
        """
        return self.predict_batch([image], mpp=mpp)[0]

    def predict_slide(
        self,
        path: str | os.PathLike[str],
        level: int | None = None,
        region: tuple[int, int, int, int] | None = None,
        mpp: float | None = None,
    ) -> PatchResult:
        """Predict a region ``(x, y, w, h)`` (level-0 pixels; default: everything) of a slide.

        The slide is read a band of tiles at a time, never whole. ``level``
        defaults to the coarsest one at least as fine as the model's mpp;
        ``mpp`` is level 0's (default: the slide's own). See
        :func:`calcinosis.inference.slide.predict_slide`.
        """
        return predict_slide(self, path, level=level, region=region, mpp=mpp)[0]

    def predict_source(
        self, source: PixelSource, mpp: float | None = None, name: str | None = None
    ) -> PatchResult:
        """Predict an image served by a pixel source (``tiling.PixelSource``), such as a slide region.

        A source that is small at the model's mpp is read whole and predicted
        like an array; a larger one is tiled straight from the source,
        resampled a band at a time when its mpp differs from the model's, so
        it is never held whole.
        """
        h0, w0 = source.shape[:2]
        img_mpp, factor, assumed = self._resolution(mpp)
        s = self.input_size
        nh, nw = max(1, round(h0 * factor)), max(1, round(w0 * factor))
        if not (nh > REGION_FACTOR * s or nw > REGION_FACTOR * s):
            return self.predict_batch([source.read(0, 0, h0, w0)], mpp=[mpp], names=[name])[0]
        base = PatchResult(
            path=name,
            mpp=img_mpp,
            mpp_assumed=assumed and img_mpp is not None,
            height=h0,
            width=w0,
            mode="region",
        )
        src = source if factor == 1.0 else ResampledSource(source, factor)
        prep = _Prepared(rgb=None, work=None, factor=factor, result_template=base, region=True)
        prep.source = src
        return self._predict_region(prep)

    def predict_batch(
        self,
        images: Sequence[Any],
        mpp: float | None | Sequence[float | None] = None,
        names: Sequence[str | None] | None = None,
    ) -> list[PatchResult]:
        """Predict many images; patches go through the network in batches.

        ``mpp`` is one value for all images or one per image (None = the
        model's own). Images that cannot be read come back with status "error".
        """
        n = len(images)
        mpps = list(mpp) if isinstance(mpp, (list, tuple)) else [mpp] * n
        if len(mpps) != n:
            raise ValueError(f"got {len(mpps)} mpp values for {n} images")
        names = list(names) if names is not None else [None] * n
        results: list[PatchResult | None] = [None] * n
        pending: list[tuple[int, _Prepared]] = []
        for i, img in enumerate(images):
            name = names[i] if names[i] is not None else _name_of(img)
            try:
                if isinstance(img, (str, os.PathLike)) and is_slide_file(img):
                    results[i] = self.predict_slide(img, mpp=mpps[i])
                    continue
                rgb = load_image(img)
                prep = self._prepare(rgb, mpps[i], name)
            except (CalcinosisError, OSError, ValueError) as exc:
                results[i] = PatchResult(path=name, status="error", reason=error_reason(exc))
                continue
            # a region is predicted (and its pixels released) before the next image is read
            self._route(i, prep, results, pending)
        self._run_patches(pending, results)
        return [r for r in results if r is not None]

    def prepare(self, image: Any, mpp: float | None = None, name: str | None = None) -> _Prepared:
        """Read an image and run the checks that need no network (tissue, focus, resampling).

        Safe to call from several threads at once: ``calcinosis predict`` runs
        it in its decoding threads, so these checks overlap the network. Hand
        the results to :meth:`predict_prepared`. Raises what reading raises.
        """
        return self._prepare(load_image(image), mpp, name if name is not None else _name_of(image))

    def predict_prepared(self, preps: Sequence[_Prepared]) -> list[PatchResult]:
        """Finish images from :meth:`prepare`: patches in network batches, regions tiled.

        The same results as :meth:`predict_batch` on the same images, in order.
        """
        results: list[PatchResult | None] = [None] * len(preps)
        pending: list[tuple[int, _Prepared]] = []
        for i, prep in enumerate(preps):
            self._route(i, prep, results, pending)
        self._run_patches(pending, results)
        return [r for r in results if r is not None]

    def _route(
        self,
        i: int,
        prep: _Prepared,
        results: list[PatchResult | None],
        pending: list[tuple[int, _Prepared]],
    ) -> None:
        """Finish a prepared image now, or queue it for a network batch."""
        if prep.result is not None:  # decided without the network (no tissue)
            results[i] = prep.result
        elif prep.region:
            results[i] = self._predict_region(prep)
        else:
            pending.append((i, prep))

    def _run_patches(
        self, pending: list[tuple[int, _Prepared]], results: list[PatchResult | None]
    ) -> None:
        """Every view of every pending patch through the network, ``batch_size`` at a time."""
        views = [(i, prep, x) for i, prep in pending for x in prep.inputs]
        outputs: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for start in range(0, len(views), self.batch_size):
            chunk = views[start : start + self.batch_size]
            cls_l, stain_l, dep_l = self._infer(np.stack([x for _, _, x in chunk]))
            for j, (i, prep, _) in enumerate(chunk):
                outputs.setdefault(i, []).append((cls_l[j], stain_l[j], dep_l[j]))
                if len(outputs[i]) == len(prep.inputs):
                    results[i] = self._finish_patch(prep, outputs.pop(i))

    # ------------------------------------------------------------------ internals

    def _infer(self, nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The engine's (class, stain, deposit) logits, averaged over D4 views with tta='d4'."""
        if self.tta == "d4":
            return tuple(numpy_d4(self.engine, nhwc))
        return self.engine(nhwc)

    def calibrated(self, class_logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities: softmax of logits divided by the temperature."""
        return _softmax(np.asarray(class_logits, np.float32) / self.temperature, axis=-1)

    def _resolution(self, mpp: float | None) -> tuple[float | None, float, bool]:
        """(the image's mpp, the scale factor to the model's mpp, whether the mpp was assumed)."""
        img_mpp = self.model_mpp if mpp is None else float(mpp)
        if img_mpp is not None and img_mpp <= 0:
            raise ValueError(f"mpp must be > 0 (microns per pixel), got {img_mpp}")
        factor = self.preprocessing.resample_factor(mpp)  # >1: image is coarser, enlarge it
        return img_mpp, factor, mpp is None

    def _prepare(self, rgb: np.ndarray, mpp: float | None, name: str | None) -> _Prepared:
        h0, w0 = rgb.shape[:2]
        img_mpp, factor, mpp_assumed = self._resolution(mpp)
        work, _ = resample_to_mpp(rgb, factor)
        base = PatchResult(
            path=name,
            mpp=img_mpp,
            mpp_assumed=mpp_assumed and img_mpp is not None,
            height=h0,
            width=w0,
        )
        prep = _Prepared(rgb=rgb, work=work, factor=factor, result_template=base)
        s = self.input_size
        hw, ww = work.shape[:2]
        if hw > REGION_FACTOR * s or ww > REGION_FACTOR * s:
            prep.region = True
            base.mode = "region"
            return prep
        mask = tissue_mask(work)
        base.tissue_fraction = float(mask.mean())
        if base.tissue_fraction < self.min_tissue_fraction:
            base.status = "no_tissue"
            base.reason = (
                f"tissue covers {base.tissue_fraction:.0%} of the image "
                f"(at least {self.min_tissue_fraction:.0%} needed): blank glass or background"
            )
            base.label_map = np.zeros((h0, w0), np.uint8)
            self._fill_areas(base, base.label_map)
            base.lesions, base.lesion_components = [], []
            prep.result = base
            return prep
        base.focus = focus_measure(work, mask)
        self._add_views(prep, work)
        return prep

    def _add_views(self, prep: _Prepared, work: np.ndarray) -> None:
        """The patch's network inputs, fitted exactly as evaluation fits it.

        The first view is the patch reflect-padded / centre-cropped to the input
        size (``Preprocessing.apply``): its class and stain outputs are the
        answer, the same as ``calcinosis evaluate`` measures. A patch longer
        than the input on a side loses its margins to that crop, so windows of
        the input size covering the whole patch (``tiling.tile_grid``) are added,
        for the deposit map only: it then covers every pixel of the patch.
        """
        spec = self.preprocessing
        stained = spec.normalize_stain(work)  # once, over the whole patch, as evaluation does
        x, _, place = spec.apply(stained, stain=False)
        prep.inputs, prep.views = [x], [(0, 0, place)]
        if place.cropped:
            s = self.input_size
            for y0, x0 in tile_grid(stained.shape[:2], s, self.tile_overlap):
                xw, _, pw = spec.apply(stained[y0 : y0 + s, x0 : x0 + s], stain=False)
                prep.inputs.append(xw)
                prep.views.append((y0, x0, pw))

    def _deposit_probs(self, prep: _Prepared, dep_logits: list[np.ndarray]) -> np.ndarray:
        """``(h, w, D)`` deposit probabilities over the resampled patch, from its views.

        One view: its map with the padding cut off. Several (a cropped patch):
        the mean over the covering windows and the centre view wherever they overlap.
        """
        maps = [
            place.to_patch(_softmax(np.asarray(d, np.float32), axis=0).transpose(1, 2, 0))
            for d, (_, _, place) in zip(dep_logits, prep.views, strict=True)
        ]
        if len(maps) == 1:
            return maps[0]
        assert prep.work is not None
        hw, ww = prep.work.shape[:2]
        acc = np.zeros((hw, ww, maps[0].shape[-1]), np.float32)
        count = np.zeros((hw, ww, 1), np.float32)
        for m, (y0, x0, place) in zip(maps, prep.views, strict=True):
            ys, xs = y0 + place.src_y, x0 + place.src_x
            acc[ys : ys + place.h, xs : xs + place.w] += m
            count[ys : ys + place.h, xs : xs + place.w] += 1.0
        return acc / count

    def _finish_patch(
        self, prep: _Prepared, outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> PatchResult:
        """A patch's result from the outputs of its views (the first is the fitted patch)."""
        res = prep.result_template
        cls_logits, stain_logits, _ = outputs[0]
        probs = self.calibrated(cls_logits)
        self._fill_class(res, probs)
        self._fill_stain(res, _softmax(np.asarray(stain_logits, np.float32), axis=-1))
        # Deposit probabilities back to the image's own grid, then argmax.
        dep = self._deposit_probs(prep, [d for _, _, d in outputs])
        h0, w0 = res.height, res.width
        if dep.shape[:2] != (h0, w0):
            dep = _resize_probs(dep, (h0, w0))
        res.label_map = dep.argmax(axis=-1).astype(np.uint8)
        self._fill_areas(res, res.label_map)
        self._apply_focus(res)
        # The patch is one tile: its deposits get the patch's own probabilities.
        found = self._find_lesions(
            res,
            res.label_map,
            [(0, 0, max(h0, w0))],
            probs[None],
            [res.status != "out_of_focus"],
            deposit_prob=1.0 - dep[..., 0] if res.label_map.any() else None,
        )
        res.lesions, res.lesion_components = found.lesions, found.components
        return res

    def _find_lesions(
        self,
        res: PatchResult,
        label_map: np.ndarray,
        boxes: Any,
        probs: Any,
        in_focus: Any,
        deposit_prob: np.ndarray | None = None,
        fallback: np.ndarray | None = None,
    ) -> Lesions:
        """``lesions.find_lesions`` with this predictor's names, area and threshold settings."""
        return find_lesions(
            label_map,
            mpp=res.mpp,
            class_names=self.class_names,
            deposit_labels=self.deposit_labels,
            tile_boxes=boxes,
            tile_probs=probs,
            tile_in_focus=in_focus,
            deposit_prob=deposit_prob,
            min_area_um2=self.min_lesion_area_um2,
            lesion_threshold=self.lesion_threshold,
            fallback_probs=fallback,
        )

    def _predict_region(self, prep: _Prepared) -> PatchResult:
        """Tile, run, stitch, find the lesions and call an image much larger than the input.

        Pixels come from a pixel source (the in-memory image, or a slide
        region read band by band), one tile at a time in row-major order;
        tiles beyond the image read as white glass, as if padded. Besides the
        label map, the stitcher keeps the per-pixel deposit probability
        (``1 - p(label 0)``) at uint8, for each lesion's ``deposit_probability``.
        The call comes from the lesions (``lesions.region_call``); the
        tissue-weighted tile mean is ``region["tile_mean_probabilities"]``.
        """
        res = prep.result_template
        s, ov = self.input_size, self.tile_overlap
        if prep.source is not None:
            src: PixelSource = prep.source
        else:
            assert prep.work is not None
            src = ArraySource(prep.work)
        hw, ww = src.shape[:2]
        # Tissue on a thumbnail: bounded memory and time on big regions.
        ds = max(1, int(np.ceil(max(hw, ww) / TISSUE_THUMB_SIDE)))
        if ds == 1:
            thumb = src.read(0, 0, hw, ww)
        else:
            thumb = src.thumbnail(max(1, ww // ds), max(1, hw // ds))
        tmask = tissue_mask(thumb)
        del thumb
        tissue_frac_total = float(tmask.mean())
        # Integral image of the tissue mask: tissue fraction of any tile in O(1).
        integ = cv2.integral(tmask.astype(np.uint8))
        th, tw = tmask.shape
        sy, sx = th / hw, tw / ww

        def tile_tissue(y0: int, x0: int) -> float:
            ya, yb = (
                int(y0 * sy),
                max(int(y0 * sy) + 1, min(th, int(np.ceil(min(y0 + s, hw) * sy)))),
            )
            xa, xb = (
                int(x0 * sx),
                max(int(x0 * sx) + 1, min(tw, int(np.ceil(min(x0 + s, ww) * sx)))),
            )
            ya, xa = min(ya, th - 1), min(xa, tw - 1)
            tot = integ[yb, xb] - integ[ya, xb] - integ[yb, xa] + integ[ya, xa]
            return float(tot) / max(1, (yb - ya) * (xb - xa))

        def tile_mask(y0: int, x0: int) -> np.ndarray:
            """The tile's tissue mask, from the thumbnail (cheaper than recomputing it)."""
            if ds == 1:
                m = np.zeros((s, s), bool)
                part = tmask[y0 : y0 + s, x0 : x0 + s]
                m[: part.shape[0], : part.shape[1]] = part
                return m
            ya, xa = int(y0 * sy), int(x0 * sx)
            yb, xb = (
                max(ya + 1, int(np.ceil((y0 + s) * sy))),
                max(xa + 1, int(np.ceil((x0 + s) * sx))),
            )
            part = np.zeros((yb - ya, xb - xa), np.uint8)
            sub = tmask[ya:yb, xa:xb]
            part[: sub.shape[0], : sub.shape[1]] = sub
            return cv2.resize(part, (s, s), interpolation=cv2.INTER_NEAREST).astype(bool)

        depth = len(self.deposit_labels)
        # Per-pixel deposit probability, quantised to uint8 (a quarter of float32).
        dep_prob = np.zeros((hw, ww), np.uint8)

        def keep_deposit_prob(top: int, probs: np.ndarray, _wsum: np.ndarray) -> None:
            band = 255.0 * (1.0 - probs[..., 0]) + 0.5
            np.clip(band, 0.0, 255.0, out=band)
            dep_prob[top : top + probs.shape[0]] = band.astype(np.uint8)

        stitcher = Stitcher((hw, ww), depth, s, ov, consumer=keep_deposit_prob)
        grid = tile_grid((max(hw, s), max(ww, s)), s, ov)
        tiles: list[dict[str, Any]] = []
        agg_w: list[float] = []
        agg_p: list[np.ndarray] = []
        agg_s: list[np.ndarray] = []
        # Every tile the network saw: (y0, x0, size) in image pixels, probabilities, in focus.
        run_boxes: list[tuple[int, int, int]] = []
        run_probs: list[np.ndarray] = []
        run_focus: list[bool] = []
        inv = 1.0 / prep.factor
        # Tiles waiting for the network, with their pixels: a source is read once, in order.
        todo: list[tuple[dict[str, Any], int, int, np.ndarray]] = []

        def flush() -> None:
            if not todo:
                return
            batch = np.stack([self.preprocessing.apply(t[3])[0] for t in todo])
            cls_l, stain_l, dep_l = self._infer(batch)
            probs = self.calibrated(cls_l)
            stain_p = _softmax(np.asarray(stain_l, np.float32), axis=-1)
            dep = _softmax(np.asarray(dep_l, np.float32), axis=1).transpose(0, 2, 3, 1)
            for j, (row, y, x, _) in enumerate(todo):
                tile_map = np.ascontiguousarray(dep[j])
                stitcher.add(y, x, tile_map)
                p = probs[j]
                top = int(p.argmax())
                row["prediction"] = (
                    self.class_names[top]
                    if p[top] >= self.indeterminate_threshold
                    else INDETERMINATE
                )
                for k, c in enumerate(self.class_names):
                    row[f"p_{c}"] = float(p[k])
                si = int(stain_p[j].argmax())
                row["stain"] = self.stain_names[si]
                row["p_stain"] = float(stain_p[j][si])
                lab = tile_map[: min(s, hw - y), : min(s, ww - x)].argmax(-1)
                counts = label_histogram(lab.astype(np.uint8), depth)
                for k, name in enumerate(self.deposit_labels[1:], start=1):
                    row[f"tile_px_{name}"] = int(counts[k])
                run_boxes.append((row["y0"], row["x0"], row["size"]))
                run_probs.append(p)
                run_focus.append(row["status"] == "ok")
                if row["status"] == "ok":
                    agg_w.append(row["tissue_fraction"])
                    agg_p.append(p)
                    agg_s.append(stain_p[j])
            todo.clear()

        for y0, x0 in grid:
            tf = tile_tissue(y0, x0)
            row: dict[str, Any] = {
                "y0": int(round(y0 * inv)),
                "x0": int(round(x0 * inv)),
                "size": int(round(s * inv)),
                "tissue_fraction": tf,
            }
            tiles.append(row)
            if tf < self.min_tissue_fraction:
                row.update(status="no_tissue", prediction=None)
                continue
            tile_img = src.read(y0, x0, s, s)
            foc = focus_measure(tile_img, tile_mask(y0, x0))
            row["focus"] = foc
            row["status"] = (
                "out_of_focus"
                if self.focus_threshold is not None and foc < self.focus_threshold
                else "ok"
            )
            todo.append((row, y0, x0, tile_img))
            if len(todo) >= self.batch_size:
                flush()
        flush()
        label_map = stitcher.finish()
        # No deposit lies on the bare glass around the section: the network's
        # calls there (pale, structureless, like unstained amyloid) are cleared.
        # Pale deposits inside the section are enclosed by tissue and kept.
        _clear_where(label_map, outside_section(tmask))
        if prep.factor != 1.0:
            label_map = cv2.resize(
                label_map, (res.width, res.height), interpolation=cv2.INTER_NEAREST
            )
            dep_prob = cv2.resize(
                dep_prob, (res.width, res.height), interpolation=cv2.INTER_NEAREST
            )
        res.label_map = label_map
        res.tiles = tiles
        res.tissue_fraction = tissue_frac_total
        self._fill_areas(res, label_map)
        n_tissue = sum(1 for t in tiles if t.get("status") in ("ok", "out_of_focus"))
        n_focus = sum(1 for t in tiles if t.get("status") == "out_of_focus")
        tile_mean: np.ndarray | None = None
        if agg_w:
            w = np.asarray(agg_w, np.float64)
            w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / len(w))
            tile_mean = (np.asarray(agg_p) * w[:, None]).sum(0)
            self._fill_stain(res, (np.asarray(agg_s) * w[:, None]).sum(0))
        found = self._find_lesions(
            res,
            label_map,
            np.asarray(run_boxes, np.int64).reshape(-1, 3),
            np.asarray(run_probs, np.float64).reshape(len(run_boxes), len(self.class_names)),
            run_focus,
            deposit_prob=dep_prob,
            fallback=tile_mean,
        )
        res.lesions, res.lesion_components = found.lesions, found.components
        call: dict[str, Any] = {}
        if tile_mean is not None:
            call = region_call(
                res.lesions,
                dict(zip(self.class_names, map(float, tile_mean), strict=True)),
                self.class_names,
                indeterminate_threshold=self.indeterminate_threshold,
            )
            res.probabilities = call["probabilities"]
            res.prediction, res.status, res.reason = (
                call["prediction"],
                call["status"],
                call["reason"],
            )
        elif n_tissue:
            res.status = "out_of_focus"
            res.reason = f"all {n_tissue} tissue tiles are out of focus"
            res.prediction = None
        else:
            res.status = "no_tissue"
            res.reason = f"no tile has at least {self.min_tissue_fraction:.0%} tissue: blank glass or background"
        tissue_px = tissue_frac_total * res.height * res.width
        area_um = (res.mpp or 0.0) ** 2
        votes: dict[str, int] = {}
        for t in tiles:
            if t.get("status") == "ok":
                votes[t["prediction"]] = votes.get(t["prediction"], 0) + 1
        res.region = {
            "tiles": len(tiles),
            "tissue_tiles": n_tissue,
            "out_of_focus_tiles": n_focus,
            "tile_size_px": int(round(s * inv)),
            "tile_overlap_px": int(round(ov * inv)),
            "tissue_area_px": float(tissue_px),
            "tissue_area_um2": float(tissue_px * area_um) if res.mpp else None,
            "deposit_burden": {
                k: (float(v) / tissue_px if tissue_px > 0 else 0.0)
                for k, v in res.deposit_area_px.items()
            },
            "tile_votes": votes,
            # The mean the region used to be called by, for reference.
            "tile_mean_probabilities": (
                None
                if tile_mean is None
                else {c: float(p) for c, p in zip(self.class_names, tile_mean, strict=True)}
            ),
            "call_basis": call.get("basis"),
            "lesion_class": call.get("lesion_class"),
            "also_present": call.get("also_present", []),
            "classes_present": call.get("classes_present", []),
            "lesions_found": len(res.lesions),
            "lesions_passed": sum(1 for les in res.lesions if les["passed"]),
            "lesion_threshold": self.lesion_threshold,
            "min_lesion_area_um2": self.min_lesion_area_um2,
        }
        return res

    def _fill_class(self, res: PatchResult, probs: np.ndarray) -> None:
        res.probabilities = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        top = int(np.argmax(probs))
        if probs[top] < self.indeterminate_threshold:
            res.prediction = INDETERMINATE
            res.status = "indeterminate"
            res.reason = (
                f"top calibrated probability {probs[top]:.2f} ({self.class_names[top]}) is below "
                f"the threshold {self.indeterminate_threshold:.2f}"
            )
        else:
            res.prediction = self.class_names[top]
            res.status = "ok"
            res.reason = ""

    def _fill_stain(self, res: PatchResult, stain_probs: np.ndarray) -> None:
        res.stain_probabilities = {
            s: float(p) for s, p in zip(self.stain_names, stain_probs, strict=True)
        }
        k = int(np.argmax(stain_probs))
        res.stain = self.stain_names[k]
        res.stain_probability = float(stain_probs[k])

    def _apply_focus(self, res: PatchResult) -> None:
        if self.focus_threshold is None or res.focus is None:
            return
        if res.focus < self.focus_threshold:
            res.status = "out_of_focus"
            res.reason = (
                f"sharpness {res.focus:.1f} is below {self.focus_threshold:g} (variance of the "
                "Laplacian over tissue): rescan or refocus; probabilities are shown for reference only"
            )
            res.prediction = None

    def _fill_areas(self, res: PatchResult, label_map: np.ndarray) -> None:
        counts = label_histogram(label_map, len(self.deposit_labels))
        res.deposit_area_px = {
            name: int(counts[k]) for k, name in enumerate(self.deposit_labels) if k > 0
        }
        if res.mpp:
            a = float(res.mpp) ** 2
            res.deposit_area_um2 = {k: v * a for k, v in res.deposit_area_px.items()}
        else:
            res.deposit_area_um2 = None


@dataclass
class _Prepared:
    rgb: np.ndarray | None
    #: The image resampled to the model's mpp.
    work: np.ndarray | None
    factor: float
    result_template: PatchResult
    region: bool = False
    #: Patch mode: the network inputs (float32 HWC, preprocessed), the fitted patch first.
    inputs: list[np.ndarray] = field(default_factory=list)
    #: Where each input's pixels lie in ``work``: the window's corner and its placement.
    views: list[tuple[int, int, Placement]] = field(default_factory=list)
    result: PatchResult | None = None
    #: Region mode: where the tiles' pixels come from (None: ``work``).
    source: PixelSource | None = None


# --------------------------------------------------------------------------- helpers


def _cpu_has_fast_bf16() -> bool:
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an old or unusual build: assume not
        return False


def _clear_where(label_map: np.ndarray, coarse: np.ndarray, band_rows: int = 1024) -> None:
    """Set ``label_map`` to 0 where the coarse boolean mask (nearest-neighbour
    scaled to its size) is True; row band by band, no full-size temporary."""
    if not coarse.any():
        return
    h, w = label_map.shape
    th, tw = coarse.shape
    cols = np.minimum(np.arange(w) * tw // w, tw - 1)
    for y0 in range(0, h, band_rows):
        y1 = min(h, y0 + band_rows)
        rows = np.minimum(np.arange(y0, y1) * th // h, th - 1)
        label_map[y0:y1][coarse[rows[:, None], cols[None, :]]] = 0


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def _resize_probs(p: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w, D) probability map, one channel at a time."""
    h, w = size_hw
    chans = [
        cv2.resize(p[..., k], (w, h), interpolation=cv2.INTER_LINEAR) for k in range(p.shape[-1])
    ]
    return np.stack(chans, axis=-1)


def _name_of(image: Any) -> str | None:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", None) or None
