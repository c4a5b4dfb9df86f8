"""Shared fixtures. Each part prefixes its fixtures with its own name (``robust_``: bad input).

Plain helpers (no fixture needed) live in ``helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, make_train_cfg

#: Input side of the tiny checkpoint below: small enough to keep tests fast.
ROBUST_SIZE = 64


def save_tiny_checkpoint(path: Path, input_size: int, temperature: float) -> Path:
    """A random-weight (seed 0) resnet10t CalcinosisNet at 0.5 um/px that calls every
    patch (indeterminate threshold 0): statuses reflect the input, not the weights."""
    import torch

    from calcinosis.model import ModelConfig, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10t", decoder_channels=16))
    meta = {
        "input_size": input_size,
        "mpp": 0.5,
        "temperature": temperature,
        "indeterminate_threshold": 0.0,
        "min_tissue_fraction": 0.1,
    }
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory():
    """``save_tiny_checkpoint`` for test modules that need their own variant."""
    return save_tiny_checkpoint


@pytest.fixture(scope="session")
def robust_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint at 64 px, temperature 1."""
    path = tmp_path_factory.mktemp("robust_ckpt") / "tiny.safetensors"
    return save_tiny_checkpoint(path, ROBUST_SIZE, 1.0)


@pytest.fixture(scope="session")
def robust_predictor(robust_checkpoint):
    from calcinosis.inference.predictor import Predictor

    return Predictor.from_checkpoint(robust_checkpoint, batch_size=8)


@pytest.fixture(scope="session")
def train_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed fixture manifest; generated the same way if it is not there yet."""
    committed = sorted((REPO / "tests" / "fixtures").rglob("manifest.csv"))
    if committed:
        return committed[0]
    from calcinosis.training.synthetic import make_fixtures

    return Path(make_fixtures(tmp_path_factory.mktemp("fixtures")))


@pytest.fixture(scope="session")
def train_cfg():
    """``helpers.make_train_cfg(manifest, out, *overrides)`` for test modules that train."""
    return make_train_cfg
