"""The few-shot recipe's levers (EMA, warm start, semi-supervised objective, weight decay,
intensity jitter, checkpoint choice at the tuned threshold): each runs, does what it says,
and resumes exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiseg_core.checkpoint import read_checkpoint_state
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.errors import ConfigError
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.evaluation import scored_records
from denoiseg_core.training import BEST_DENOISING, Trainer, train
from denoiseg_plugins.mean_teacher import MeanTeacherConsistency, MeanTeacherParams, sigmoid_ramp


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("levers"), n_train=6, n_labelled=3, n_val=2, n_test=1, shape=(64, 64), seed=3
    )


def _config(tiny_config: DenoiSegConfig, data, run_dir: Path, **training) -> DenoiSegConfig:
    raw = tiny_config.model_dump(mode="json")
    raw["run_dir"] = str(run_dir)
    raw["data"].update({"train": str(data["train"]), "validation": str(data["val"])})
    raw["training"].update({"epochs": 3, "steps_per_epoch": 3, **training})
    return DenoiSegConfig.model_validate(raw)


ALL_LEVERS = {
    "ema_decay": 0.9,
    "warm_start_epochs": 1,
    "weight_decay": 1e-4,
    "intensity_jitter": 0.2,
    "semi_supervised": {"name": "mean_teacher", "params": {"ramp_up": 0.5, "confidence": 0.5}},
}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_every_lever_together_trains_and_stores_the_moving_average(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "run", **ALL_LEVERS)
    trainer = Trainer(config, progress=False, log=lambda _: None)
    run = trainer.fit()
    rows = _rows(run.run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # warm start: epoch 1 trains denoising only, so its segmentation loss is untouched by training
    # and it is never the best segmentation checkpoint
    assert read_checkpoint_state(run.best_checkpoint)["epoch"] > 1
    for row in rows:
        assert np.isfinite(float(row["train_loss"]))
        assert 0 <= float(row["val_ap50_tuned"]) <= 1 and float(row["val_ap50_tuned"]) >= float(row["val_ap50"])
    # checkpoints hold the moving average, last.pt also the trained weights for resuming
    last = read_checkpoint_state(run.last_checkpoint)
    ema = trainer.ema.module.state_dict()
    for key, value in last["model_state"].items():
        torch.testing.assert_close(value, ema[key].cpu())
    student = last["training_state"]["student_state"]
    assert any(not torch.equal(student[k].cpu(), last["model_state"][k]) for k in student if student[k].is_floating_point())
    # the best-denoising checkpoint exists next to the best-segmentation one
    assert (run.run_dir / BEST_DENOISING).is_file()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)


def test_resume_with_every_lever_equals_an_uninterrupted_run(tiny_config, dataset, tmp_path):
    whole = train(_config(tiny_config, dataset, tmp_path / "whole", **ALL_LEVERS), progress=False, log=lambda _: None)
    first = _config(tiny_config, dataset, tmp_path / "parts", **{**ALL_LEVERS, "epochs": 2})
    first.training.threshold_tuning = False
    train(first, progress=False, log=lambda _: None)
    resumed_config = _config(tiny_config, dataset, tmp_path / "parts", **ALL_LEVERS)
    resumed = train(resumed_config, resume=True, progress=False, log=lambda _: None)
    a = read_checkpoint_state(whole.last_checkpoint)
    b = read_checkpoint_state(resumed.last_checkpoint)
    for key in a["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key])


def test_semi_supervised_objective_needs_a_moving_average(tiny_config, dataset, tmp_path):
    with pytest.raises(Exception, match="semi_supervised needs ema_decay"):
        _config(tiny_config, dataset, tmp_path / "r", ema_decay=None, semi_supervised={"name": "mean_teacher"})


def test_unknown_semi_supervised_objective_is_a_one_line_error(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "r", ema_decay=0.9, semi_supervised={"name": "nope"})
    with pytest.raises(ConfigError, match="unknown semi_supervised 'nope'; installed semi_supervised components: mean_teacher"):
        Trainer(config, progress=False, log=lambda _: None)


def test_mean_teacher_is_zero_for_an_equivariant_teacher_that_agrees_and_pulls_otherwise():
    from denoiseg_plugins.three_class_head import ThreeClassHead

    head = ThreeClassHead()
    torch.manual_seed(0)
    patches = torch.randn(4, 1, 16, 16)
    pixelwise = torch.randn(3, 1)  # a per-pixel map is equivariant to rotations and flips

    def teacher(x):
        return torch.einsum("kc,nc...->nk...", pixelwise, x)

    objective = MeanTeacherConsistency(MeanTeacherParams(noise=0.0, ramp_up=0.0))
    generator = torch.Generator().manual_seed(1)
    labelled = torch.tensor([True, False, False, False])
    agree = objective(student_logits=teacher(patches), patches=patches, labelled=labelled, teacher=teacher,
                      head=head, progress=1.0, generator=generator)
    assert float(agree) < 1e-10
    student = torch.zeros(4, 3, 16, 16, requires_grad=True)
    differ = objective(student_logits=student, patches=patches, labelled=labelled, teacher=teacher,
                       head=head, progress=1.0, generator=generator)
    differ.backward()
    assert float(differ.detach()) > 1e-3 and float(student.grad.abs().sum()) > 0
    # ramped in: nothing at the start, everything after the ramp
    assert sigmoid_ramp(0.0, 0.3) < 0.01 and sigmoid_ramp(0.3, 0.3) == 1.0


def test_validation_ignores_images_without_objects(dataset):
    from denoiseg_core.data import ImageRecord

    image = np.zeros((1, 8, 8), np.float32)
    empty = ImageRecord(image=image, labels=np.zeros((8, 8), np.int32), path=Path("empty"))
    full = ImageRecord(image=image, labels=np.eye(8, dtype=np.int32), path=Path("full"))
    unlabelled = ImageRecord(image=image, labels=None, path=Path("none"))
    assert [r.name for r in scored_records([empty, full, unlabelled])] == [full.name]
