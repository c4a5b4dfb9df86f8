"""From a checkpoint and an image to a calibrated, explained answer.

:class:`Predictor` hides everything between pixels and the answer a
pathologist reads: the checkpoint's preprocessing (``model/preprocess.py``:
resampling to its microns per pixel, stain normalisation, reflect-pad or
centre-crop to the input size, mean/std; the very function evaluation
applies; ``patch.py`` fits a patch with it), the backend that runs the network (``engines.py``: PyTorch fp32 or
bf16, or ONNX Runtime), calibrated probabilities (``softmax(logits / T)``),
the "indeterminate" rule, the tissue and focus checks, the deposits as
lesions (``lesions.find_lesions``), and, for images much larger than the
network input, region prediction (``region.py``: tiling, blended stitching of
the deposit map and a region call made from the lesions found).

The ways in: :meth:`Predictor.predict` for one image (a patch, a large image,
which is tiled, or a slide file), :meth:`Predictor.predict_batch` for many (a
folder; :meth:`Predictor.prepare` is its first half, safe to run in decoding
threads), :meth:`Predictor.predict_slide` for a region of a slide.

A patch (one network input) is called by the class head, as it was trained
and calibrated; its deposits are still listed as lesions. A region is called
by its lesions: the class with the most ``area x confidence`` over the
lesions that pass the lesion threshold, other classes present listed in
``region["also_present"]``; ``normal`` only where no lesion passes. The
tissue-weighted mean of the tile probabilities, which the call used to be,
stays in ``region["tile_mean_probabilities"]``.

Test-time augmentation: patches run the checkpoint's mode (``inference.tta``,
the one its temperature was fitted in); tiled regions and slides run one pass
per tile unless ``tta`` is given (``--tta d4``: 8 passes per tile).
:meth:`Predictor.describe_tta` says which in one line.

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
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError
from calcinosis.model.imageio import load_image
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS, INDETERMINATE, STAIN_NAMES
from calcinosis.model.metadata import checkpoint_tta, setting, temperature_for, temperature_tta
from calcinosis.model.preprocess import Placement, Preprocessing, resample_to_mpp
from calcinosis.model.probability import softmax
from calcinosis.model.tta import TTA_PASSES

from .engines import BACKENDS, Engine, Logits, infer, load_engine
from .lesions import LESION_THRESHOLD, MIN_LESION_AREA_UM2, Lesions, find_lesions
from .patch import patch_deposit_probs, patch_views, resize_probs
from .region import predict_region
from .region import predict_slide as predict_slide_region
from .result import STATUSES, PatchResult, error_reason
from .slide import is_slide_file
from .tiling import ArraySource
from .tissue import focus_measure, tissue_mask

__all__ = ["BACKENDS", "STATUSES", "PatchResult", "Predictor", "Prepared"]

log = logging.getLogger(__name__)

#: An image is tiled (region mode) when a side exceeds this many network inputs.
REGION_FACTOR = 1.5
#: Below this relative sharpness (``tissue.focus_measure`` at the model's mpp) a
#: patch is called out of focus. Sharp synthetic tissue scores >= 1; a Gaussian
#: defocus of sigma 2 px scores 0.04-0.37 and of 3 px 0.02-0.29, so 0.15 flags
#: strong blur without touching the blur that stain/scanner variation brings.
FOCUS_MIN = 0.15


@dataclass
class Prepared:
    """An image read and checked without the network (:meth:`Predictor.prepare`)."""

    #: The image as read (the overlay's background).
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
    #: Set when the answer needs no network (no tissue).
    result: PatchResult | None = None


class Predictor:
    """Run a trained checkpoint on patches and regions; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
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
        self.indeterminate_threshold = _setting(
            metadata, "indeterminate_threshold", indeterminate_threshold, 0.6
        )
        self.min_tissue_fraction = _setting(
            metadata, "min_tissue_fraction", min_tissue_fraction, 0.1
        )
        #: A lesion counts towards a region's call at this calibrated confidence or more.
        self.lesion_threshold = _setting(
            metadata, "lesion_threshold", lesion_threshold, LESION_THRESHOLD
        )
        #: Deposits smaller than this (µm²) are specks, not lesions.
        self.min_lesion_area_um2 = _setting(
            metadata, "min_lesion_area_um2", min_lesion_area_um2, MIN_LESION_AREA_UM2
        )
        self.focus_threshold = focus_threshold
        self.batch_size = max(1, int(batch_size))
        self.tile_overlap = self.input_size // 4 if tile_overlap is None else int(tile_overlap)
        self._check_settings()
        self._set_tta(tta)

    def _check_settings(self) -> None:
        if not 0.0 <= self.lesion_threshold <= 1.0:
            raise CalcinosisError(
                f"lesion threshold must be a probability in [0, 1]; got {self.lesion_threshold}"
            )
        if not self.min_lesion_area_um2 >= 0.0:
            raise CalcinosisError(
                f"minimum lesion area must be >= 0 square microns; got {self.min_lesion_area_um2}"
            )
        if not 0 <= self.tile_overlap < self.input_size:
            raise CalcinosisError(
                f"tile overlap must be in [0, {self.input_size}) pixels for this model "
                f"(input size {self.input_size}); got {self.tile_overlap}"
            )

    def _set_tta(self, requested: str | None) -> None:
        """Patches: ``requested`` or the checkpoint's mode; tiles: ``requested`` or one pass."""
        #: Test-time augmentation of patches (``none`` or ``d4``).
        self.tta, warning = checkpoint_tta(self.metadata, requested)
        if warning:
            log.warning(warning)
        #: Test-time augmentation of the tiles of regions and slides (a mode given explicitly
        #: applies to both; its warning is the one above). A default run's mismatch with the
        #: temperature's mode is in :meth:`describe_tta`, which ``calcinosis predict`` prints.
        self.region_tta, _ = checkpoint_tta(self.metadata, requested or "none")
        #: The mode the main temperature was fitted in (None: the checkpoint has no temperature).
        self.temperature_tta = temperature_tta(self.metadata)
        #: The temperature each mode run here uses: its own where calibration fitted one
        #: (``calibration.temperatures``), else the main one.
        self.temperatures = {
            mode: temperature_for(self.metadata, mode) or self.temperature
            for mode in (self.tta, self.region_tta)
        }
        #: Modes run here without a temperature of their own (describe_tta says so).
        self.uncalibrated_modes = [
            m
            for m in (self.tta, self.region_tta)
            if self.temperature_tta and temperature_for(self.metadata, m) is None
        ]

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
        threads: int | None = None,
        **settings: Any,
    ) -> Predictor:
        """Load a ``.safetensors`` checkpoint (or a self-describing ``.onnx`` file).

        ``backend="onnx"`` exports the checkpoint once to ``onnx_path`` (default:
        a cache file next to the checkpoint, or in the temp folder when that
        folder is read-only) and reuses it while the checkpoint is unchanged
        (``engines.load_engine``). ``settings`` are the keyword arguments of
        the constructor (``tta``, ``tile_overlap``, ``focus_threshold``, ...).
        """
        engine, meta = load_engine(path, backend, device, onnx_path=onnx_path, threads=threads)
        return cls(
            engine,
            meta,
            backend=backend,
            indeterminate_threshold=indeterminate_threshold,
            batch_size=batch_size,
            **settings,
        )

    # ------------------------------------------------------------------ the ways in

    def predict(self, image: Any, mpp: float | None = None) -> PatchResult:
        """Predict one image: an ``(H, W, 3)`` uint8 array, a PIL image or a path.

        An image much larger than the network input is tiled (a region); a
        path to a whole-slide file (see ``slide.is_slide_file``) is predicted
        with :meth:`predict_slide` over the whole slide.
        """
        return self.predict_batch([image], mpp=mpp)[0]

    def predict_batch(
        self,
        images: Sequence[Any],
        mpp: float | None | Sequence[float | None] = None,
        names: Sequence[str | None] | None = None,
    ) -> list[PatchResult]:
        """Predict many images; patches go through the network in batches.

        ``images`` are what :meth:`predict` takes, or :class:`Prepared` images
        from :meth:`prepare` (their mpp and name were given there). ``mpp`` is
        one value for all images or one per image (None = the model's own).
        Images that cannot be read come back with status "error".
        """
        n = len(images)
        mpps = list(mpp) if isinstance(mpp, (list, tuple)) else [mpp] * n
        if len(mpps) != n:
            raise ValueError(f"got {len(mpps)} mpp values for {n} images")
        names = list(names) if names is not None else [None] * n
        results: list[PatchResult | None] = [None] * n
        pending: list[tuple[int, Prepared]] = []
        for i, img in enumerate(images):
            if isinstance(img, Prepared):
                prep = img
            else:
                name = names[i] if names[i] is not None else _name_of(img)
                try:
                    if isinstance(img, (str, os.PathLike)) and is_slide_file(img):
                        results[i] = self.predict_slide(img, mpp=mpps[i])
                        continue
                    prep = self._prepare(load_image(img), mpps[i], name)
                except (CalcinosisError, OSError, ValueError) as exc:
                    results[i] = PatchResult(path=name, status="error", reason=error_reason(exc))
                    continue
            # a region is predicted (and its pixels released) before the next image is read
            self._route(i, prep, results, pending)
        self._run_patches(pending, results)
        return [r for r in results if r is not None]

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
        :func:`calcinosis.inference.region.predict_slide`.
        """
        return predict_slide_region(self, path, level=level, region=region, mpp=mpp)

    def prepare(self, image: Any, mpp: float | None = None, name: str | None = None) -> Prepared:
        """Read an image and run the checks that need no network (tissue, focus, resampling).

        Safe to call from several threads at once: ``calcinosis predict`` runs
        it in its decoding threads, so these checks overlap the network. Hand
        the results to :meth:`predict_batch`. Raises what reading raises.
        """
        return self._prepare(load_image(image), mpp, name if name is not None else _name_of(image))

    def describe_tta(self) -> str:
        """The test-time augmentation this predictor runs and what it costs, in one line.

        ``calcinosis predict`` prints it first. It names the mode of patches
        and of tiled regions and slides, the network passes each costs, and,
        when a mode differs from the one the temperature was fitted in, that
        the checkpoint has no temperature for it.
        """
        p, r = self.tta, self.region_tta
        if p == r:
            text = f"tta {p} ({_passes(p)} per patch and per tile)"
        else:
            text = (
                f"tta {p} for patches ({_passes(p)} per patch), {r} for tiled regions and slides "
                f"({_passes(r)} per tile; --tta {p} for {TTA_PASSES[p]})"
            )
        fitted = self.temperature_tta
        kinds = (("patches", p), ("tiled regions and slides", r))
        off = [(what, mode) for what, mode in kinds if mode in self.uncalibrated_modes]
        if off:
            what, mode = ("all inputs", p) if p == r else off[0]
            text += (
                f"; the temperature was fitted with {fitted} and the checkpoint has none for "
                f"{'one pass' if mode == 'none' else mode}: probabilities of {what} may be a "
                "little over- or under-confident"
            )
        return text

    # ------------------------------------------------------------------ shared by patches and regions

    def infer(self, nhwc: np.ndarray, tta: str | None = None) -> Logits:
        """The engine's (class, stain, deposit) logits for preprocessed inputs, in mode ``tta``.

        ``tta`` defaults to the patches' mode (:attr:`tta`); regions pass :attr:`region_tta`.
        """
        return infer(self.engine, nhwc, self.tta if tta is None else tta)

    def calibrated(self, class_logits: np.ndarray, tta: str | None = None) -> np.ndarray:
        """Calibrated class probabilities: softmax of logits divided by mode ``tta``'s temperature.

        ``tta`` is the mode the logits were computed in (default: the patches' :attr:`tta`).
        """
        t = self.temperatures.get(self.tta if tta is None else tta, self.temperature)
        return softmax(np.asarray(class_logits, np.float32) / t, axis=-1)

    def resolution(self, mpp: float | None) -> tuple[float | None, float, bool]:
        """(the image's mpp, the scale factor to the model's mpp, whether the mpp was assumed)."""
        img_mpp = self.model_mpp if mpp is None else float(mpp)
        if img_mpp is not None and img_mpp <= 0:
            raise ValueError(f"mpp must be > 0 (microns per pixel), got {img_mpp}")
        factor = self.preprocessing.resample_factor(mpp)  # >1: image is coarser, enlarge it
        return img_mpp, factor, mpp is None

    def is_region(self, shape_at_model_mpp: tuple[int, int]) -> bool:
        """Whether an image of this size (at the model's mpp) is tiled rather than one patch."""
        limit = REGION_FACTOR * self.input_size
        return shape_at_model_mpp[0] > limit or shape_at_model_mpp[1] > limit

    def result_template(
        self, name: str | None, shape: tuple[int, int], mpp: float | None
    ) -> PatchResult:
        """An empty result for an image of ``shape`` (its own pixels) at ``mpp``."""
        img_mpp, _, assumed = self.resolution(mpp)
        return PatchResult(
            path=name,
            mpp=img_mpp,
            mpp_assumed=assumed and img_mpp is not None,
            height=shape[0],
            width=shape[1],
        )

    def find_lesions(
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

    # ------------------------------------------------------------------ patches

    def _route(
        self,
        i: int,
        prep: Prepared,
        results: list[PatchResult | None],
        pending: list[tuple[int, Prepared]],
    ) -> None:
        """Finish a prepared image now (no tissue, or a region), or queue it for a network batch."""
        if prep.result is not None:  # decided without the network (no tissue)
            results[i] = prep.result
        elif prep.region:
            assert prep.work is not None
            source = ArraySource(prep.work)
            results[i] = predict_region(self, source, prep.result_template, prep.factor)
        else:
            pending.append((i, prep))

    def _run_patches(
        self, pending: list[tuple[int, Prepared]], results: list[PatchResult | None]
    ) -> None:
        """Every view of every pending patch through the network, ``batch_size`` at a time."""
        views = [(i, prep, x) for i, prep in pending for x in prep.inputs]
        outputs: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for start in range(0, len(views), self.batch_size):
            chunk = views[start : start + self.batch_size]
            cls_l, stain_l, dep_l = self.infer(np.stack([x for _, _, x in chunk]))
            for j, (i, prep, _) in enumerate(chunk):
                outputs.setdefault(i, []).append((cls_l[j], stain_l[j], dep_l[j]))
                if len(outputs[i]) == len(prep.inputs):
                    results[i] = self._finish_patch(prep, outputs.pop(i))

    def _prepare(self, rgb: np.ndarray, mpp: float | None, name: str | None) -> Prepared:
        h0, w0 = rgb.shape[:2]
        base = self.result_template(name, (h0, w0), mpp)
        _, factor, _ = self.resolution(mpp)
        work, _ = resample_to_mpp(rgb, factor)
        prep = Prepared(rgb=rgb, work=work, factor=factor, result_template=base)
        if self.is_region(work.shape[:2]):
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
            base.set_deposit_areas(base.label_map, self.deposit_labels)
            base.lesions, base.lesion_components = [], []
            prep.result = base
            return prep
        base.focus = focus_measure(work, mask)
        prep.inputs, prep.views = patch_views(self.preprocessing, work, self.tile_overlap)
        return prep

    def _finish_patch(
        self, prep: Prepared, outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> PatchResult:
        """A patch's result from the outputs of its views (the first is the fitted patch)."""
        res = prep.result_template
        cls_logits, stain_logits, _ = outputs[0]
        probs = self.calibrated(cls_logits)
        self._fill_class(res, probs)
        res.set_stain(softmax(np.asarray(stain_logits, np.float32), axis=-1), self.stain_names)
        # Deposit probabilities back to the image's own grid, then argmax.
        assert prep.work is not None
        h0, w0 = res.height, res.width
        dep = patch_deposit_probs(prep.views, [d for _, _, d in outputs], prep.work.shape[:2])
        if dep.shape[:2] != (h0, w0):
            dep = resize_probs(dep, (h0, w0))
        res.label_map = dep.argmax(axis=-1).astype(np.uint8)
        res.set_deposit_areas(res.label_map, self.deposit_labels)
        self._apply_focus(res)
        # The patch is one tile: its deposits get the patch's own probabilities.
        found = self.find_lesions(
            res,
            res.label_map,
            [(0, 0, max(h0, w0))],
            probs[None],
            [res.status != "out_of_focus"],
            deposit_prob=1.0 - dep[..., 0] if res.label_map.any() else None,
        )
        res.lesions, res.lesion_components = found.lesions, found.components
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


# --------------------------------------------------------------------------- helpers


def _setting(meta: dict[str, Any], key: str, given: float | None, default: float) -> float:
    """``given``, else the checkpoint's ``key`` (top level, then ``inference.<key>``), else ``default``."""
    if given is None:
        given = setting(meta, key, ("inference", key), default)
    return float(given)


def _passes(mode: str) -> str:
    n = TTA_PASSES[mode]
    return f"{n} pass" if n == 1 else f"{n} passes"


def _name_of(image: Any) -> str | None:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", None) or None
