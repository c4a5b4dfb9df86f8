"""Shared fixtures. Each part prefixes its fixtures with its own name (``robust_``: bad input).

Plain helpers (no fixture needed) live in ``helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CI_CONFIG, REPO, make_train_cfg

#: Input side of the tiny checkpoint below: small enough to keep tests fast.
ROBUST_SIZE = 64


def save_tiny_checkpoint(path: Path, input_size: int, temperature: float) -> Path:
    """A random-weight (seed 0) resnet10t CalcinosisNet at 0.5 um/px that calls every
    patch (indeterminate threshold 0): statuses reflect the input, not the weights.

    Written the way a training run writes its best checkpoint, through the same
    functions: the network of configs/ci.yaml from ``create_model``, the metadata
    of ``training.state.checkpoint_metadata`` (config, class and stain names,
    preprocessing, init weights), the temperature and calibration section that
    ``training.calibration.calibrate`` adds, and ``save_checkpoint``. So the
    predictor tests read what a real checkpoint holds.
    """
    import torch

    from calcinosis.model import create_model, save_checkpoint
    from calcinosis.training.config import load_config
    from calcinosis.training.state import RunState, checkpoint_metadata

    cfg = load_config(
        CI_CONFIG,
        [
            f"output_dir={path.parent}",
            f"data.image_size={input_size}",
            "data.mpp=0.5",
            "inference.indeterminate_threshold=0.0",
            "inference.min_tissue_fraction=0.1",
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model)
    meta = checkpoint_metadata(cfg, model, RunState(epoch=1, global_step=2), temperature)
    # what calibrate() records beside the temperature (the ECEs are not read by inference)
    meta["calibration"] = {
        "tta": cfg.inference.tta,
        "samples": 6,
        "ece_before": 0.2,
        "ece_after": 0.1,
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
