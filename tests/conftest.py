"""Shared pytest fixtures: tiny configurations and a seeded generator (CPU, fast)."""

from __future__ import annotations

import os

# Several test processes may share a few cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.plugin_manager import Registry, get_registry

torch.set_num_threads(1)


@pytest.fixture
def tiny_config(tmp_path) -> DenoiSegConfig:
    """A config with a depth-2, 8-filter U-Net and small patches/batches, writing into tmp_path."""
    return DenoiSegConfig.model_validate(
        {
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "data": {"patch_size": [32, 32]},
            "model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}},
            "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu"},
        }
    )


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The registry of installed plugins (the built-ins come from the entry points)."""
    return get_registry()


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU torch generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def touching_squares() -> np.ndarray:
    """12x12 instance labels: two 4x4 squares touching along a column (label 1 | label 2)."""
    labels = np.zeros((12, 12), dtype=np.int32)
    labels[2:6, 2:6] = 1
    labels[2:6, 6:10] = 2
    return labels
