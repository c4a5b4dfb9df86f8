"""Tiles read in a thread while the network runs (``inference.prefetch``): same results, clean exits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import mosaic

from calcinosis.inference import prefetch, region
from calcinosis.inference.predictor import Predictor
from calcinosis.inference.region import TileRun, predict_source
from calcinosis.inference.tiling import ArraySource


@pytest.fixture(scope="module")
def small_batches(robust_checkpoint) -> Predictor:
    """Batches of 3 tiles: a region makes many of them, and a last short one."""
    return Predictor.from_checkpoint(robust_checkpoint, batch_size=3)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tile-reader" and t.is_alive()]


@pytest.mark.slow
def test_prefetched_tiles_give_the_serial_results(small_batches, monkeypatch):
    image = mosaic(5, 4, margin=30)
    monkeypatch.setattr(region, "PREFETCH", False)
    serial = predict_source(small_batches, ArraySource(image), mpp=0.45, name="r")
    monkeypatch.setattr(region, "PREFETCH", True)
    batches: list[list[tuple[int, int]]] = []
    real = TileRun.run_batch

    def spy(self, todo, batch):
        batches.append([(y, x) for _, y, x, _ in todo])
        return real(self, todo, batch)

    monkeypatch.setattr(TileRun, "run_batch", spy)
    fetched = predict_source(small_batches, ArraySource(image), mpp=0.45, name="r")
    assert len(batches) > 3 and all(len(b) == 3 for b in batches[:-1])
    order = [p for b in batches for p in b]
    assert order == sorted(order), "row-major, as the stitcher needs"
    np.testing.assert_array_equal(fetched.label_map, serial.label_map)
    assert fetched.to_dict(include_tiles=True) == serial.to_dict(include_tiles=True)
    assert not _readers()


class _Broken(ArraySource):
    """Fails on the ``n``-th tile read (the tissue thumbnail is not a read)."""

    def __init__(self, image: np.ndarray, n: int) -> None:
        super().__init__(image)
        self.reads, self.n = 0, n

    def read(self, y, x, h, w):
        self.reads += 1
        if self.reads == self.n:
            raise OSError(f"corrupt slide tile near ({x}, {y})")
        return super().read(y, x, h, w)


def test_a_reader_error_reaches_the_caller_with_the_file_named(small_batches):
    source = _Broken(mosaic(5, 4, margin=30), n=7)
    with pytest.raises(OSError, match="corrupt slide tile") as info:
        predict_source(small_batches, source, mpp=0.5, name="slides/case-7.svs")
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "slides/case-7.svs" in notes and "tile at y=" in notes
    assert source.reads == 7, "the reader stopped at the failure"
    assert not _readers()


def test_an_interrupt_in_the_network_stops_the_reader(small_batches, monkeypatch):
    calls = []

    def interrupted(self, todo, batch):
        calls.append(len(todo))
        raise KeyboardInterrupt

    monkeypatch.setattr(TileRun, "run_batch", interrupted)
    source = _Broken(mosaic(5, 4, margin=30), n=10**9)
    with pytest.raises(KeyboardInterrupt):
        predict_source(small_batches, source, mpp=0.5, name="r")
    assert calls == [3]
    assert not _readers()
    # The reader ran at most the queue's worth of batches ahead, then stopped.
    assert source.reads <= 3 * (2 + prefetch.QUEUE_BATCHES)
