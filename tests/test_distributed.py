"""Data-parallel training: two gloo processes under torchrun train, write loadable checkpoints, resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from denoiseg_core.checkpoint import load_checkpoint, read_checkpoint_state
from denoiseg_core.runtime.distributed import DistributedContext, per_rank_batch, setup
from denoiseg_core.errors import ConfigError
from denoiseg_core.prediction import predict_image
from denoiseg_core.synthetic import write_synthetic_dataset


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "denoiseg_core", "train", *args, "--no-progress"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_two_process_gloo_training_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_train=4, n_labelled=2, n_val=1, n_test=0, shape=(48, 48), seed=3)
    config = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "data": {"train": str(data["train"]), "validation": str(data["val"]), "patch_size": [32, 32]},
        "model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}},
        # learned loss weights: their gradients are averaged across ranks outside DDP; elastic warps on each rank
        "training": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 4, "device": "cpu", "precision": "fp32",
                     "loss_weighting": "uncertainty", "elastic_deformation": 1.0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    first = _torchrun([str(config_path)], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    # rank 0 reports the split: 2 processes with batch_size / world_size patches each
    assert "2 processes, 2 patches each" in first.stdout
    assert first.stdout.count("epoch   1:") == 1, "only rank 0 may log epochs"

    model = load_checkpoint(tmp_path / "run" / "best.pt")
    assert model.tuned_settings is not None
    prediction = predict_image(model, np.random.default_rng(0).normal(100, 10, (1, 40, 40)).astype(np.float32))
    assert np.isfinite(prediction.denoised).all()
    np.testing.assert_allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-4)
    weights_after_first = read_checkpoint_state(tmp_path / "run" / "last.pt")["model_state"]

    resumed = _torchrun(["--resume", str(tmp_path / "run"), "--set", "training.epochs=2"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = read_checkpoint_state(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 2
    with open(tmp_path / "run" / "log.csv") as fh:
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == [1, 2]
    changed = [not torch.equal(state["model_state"][k], v) for k, v in weights_after_first.items() if v.is_floating_point()]
    assert any(changed), "the resumed epoch did not train"
    assert float(state["training_state"]["loss_weighting"]["log_variances"].abs().min()) > 0


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup("cpu") == DistributedContext()


def test_incomplete_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        setup("cpu")


def test_batch_is_split_evenly_between_ranks():
    assert per_rank_batch(128, 2) == 64
    assert per_rank_batch(128, 1) == 128
    with pytest.raises(ConfigError, match="divisible"):
        per_rank_batch(10, 4)
