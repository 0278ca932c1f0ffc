"""Training: 2D and 3D smoke runs, repeatability, resume after an interruption, threshold tuning."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiseg_core.checkpoint import load_checkpoint, read_checkpoint_state
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import load_folder
from denoiseg_core.errors import ConfigError, DenoiSegError
from denoiseg_core.evaluation import ScoredImage, evaluate, scored_records
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.training import Trainer, train
from denoiseg_plugins.class_heads import THRESHOLDS


@pytest.fixture(scope="module")
def dataset_2d(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data2d"), n_train=6, n_labelled=3, n_val=2, n_test=1, shape=(64, 64), seed=1
    )


@pytest.fixture(scope="module")
def dataset_3d(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data3d"), n_train=3, n_labelled=2, n_val=1, n_test=1, shape=(16, 32, 32), seed=2
    )


def _config(tiny_config: DenoiSegConfig, data: dict[str, Path], run_dir: Path, **training) -> DenoiSegConfig:
    raw = tiny_config.model_dump(mode="json")
    raw["run_dir"] = str(run_dir)
    raw["data"].update({"train": str(data["train"]), "validation": str(data["val"])})
    raw["training"].update({"epochs": 2, "steps_per_epoch": 3, **training})
    return DenoiSegConfig.model_validate(raw)


def test_2d_training_writes_checkpoints_log_and_curves(tiny_config, dataset_2d, tmp_path):
    config = _config(tiny_config, dataset_2d, tmp_path / "run")
    given = config.model_dump(mode="json")
    run = train(config, progress=False, log=lambda _: None)
    assert config.model_dump(mode="json") == given  # the caller's config is left as it was

    for name in ("best.pt", "last.pt", "config.yaml", "log.csv", "training_curves.png"):
        assert (run.run_dir / name).is_file(), name
    with open(run.run_dir / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) and float(r["train_loss"]) > 0 for r in rows)
    assert (run.run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

    # The tuned threshold is one of the head's candidates and travels in both checkpoints,
    # together with the config and the versions of the plugins used.
    model = load_checkpoint(run.best_checkpoint)
    assert run.instance_settings.threshold in THRESHOLDS
    assert model.tuned_settings == run.instance_settings
    assert read_checkpoint_state(run.last_checkpoint)["instance_settings"] == run.instance_settings.model_dump()
    assert {"depth": 2, "first_filters": 8}.items() <= model.config.model.backbone.params.items()  # and the defaults
    assert model.versions["plugins"].get("denoiseg")
    assert model.ndim == 2 and model.in_channels == 1

    # One evaluation path at one precision: scoring best.pt on the validation images at its
    # tuned threshold reproduces the validation AP the threshold was chosen by.
    records = scored_records(load_folder(dataset_2d["val"], require_masks=True))
    scores = evaluate(model, [ScoredImage(r.path.name, r.image, r.labels) for r in records])
    assert scores["instance_settings"] == run.instance_settings.model_dump()
    assert scores["ap50"] == run.validation["ap50"]


def test_3d_training_smoke(tiny_config, dataset_3d, tmp_path):
    # fp32: 3-D bf16 convolutions on this CPU are not repeatable and now and then give NaN
    # (about 1 run in 8 here), which the non-finite-loss guard turns into an error
    config = _config(tiny_config, dataset_3d, tmp_path / "run3d", epochs=1, batch_size=2, precision="fp32")
    config.data.patch_size = [8, 16, 16]
    run = train(config, progress=False, log=lambda _: None)
    model = load_checkpoint(run.best_checkpoint)
    assert model.ndim == 3
    out = model.inference_net()(torch.zeros(1, 1, 8, 16, 16))
    assert out.shape == (1, 4, 8, 16, 16)


def test_seeded_cpu_run_is_repeatable(tiny_config, dataset_2d, tmp_path):
    states = []
    for name in ("a", "b"):
        config = _config(tiny_config, dataset_2d, tmp_path / name, epochs=1)
        run = train(config, progress=False, log=lambda _: None)
        states.append(read_checkpoint_state(run.last_checkpoint)["model_state"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_resume_after_interruption_matches_uninterrupted_run(tiny_config, dataset_2d, tmp_path, monkeypatch):
    reference = train(_config(tiny_config, dataset_2d, tmp_path / "ref", epochs=3), progress=False, log=lambda _: None)

    # Interrupt the second run during its second epoch's validation (Ctrl-C at a realistic point).
    config = _config(tiny_config, dataset_2d, tmp_path / "interrupted", epochs=3)
    calls = {"n": 0}
    original = Trainer.validate

    def interrupting_validate(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "validate", interrupting_validate)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, log=lambda _: None)
    monkeypatch.setattr(Trainer, "validate", original)
    assert read_checkpoint_state(tmp_path / "interrupted" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "interrupted").glob("*.part")), "a partial checkpoint was left behind"

    # A fresh start in the same folder is refused; --resume continues from epoch 1.
    with pytest.raises(DenoiSegError, match="--resume"):
        Trainer(config, progress=False, log=lambda _: None)
    resumed = train(config, resume=True, progress=False, log=lambda _: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]

    ref_state = read_checkpoint_state(reference.last_checkpoint)["model_state"]
    res_state = read_checkpoint_state(resumed.last_checkpoint)["model_state"]
    for key in ref_state:
        assert torch.allclose(ref_state[key].float(), res_state[key].float(), atol=1e-6), key


def test_a_run_records_every_component_setting_and_resumes_checkpoints_that_list_only_some(tiny_config, dataset_2d, tmp_path):
    """The run's config and checkpoints list every component parameter, defaults included (a later default change
    cannot alter a resumed run); a checkpoint written before that, listing only the given ones, still resumes."""
    import yaml

    config = _config(tiny_config, dataset_2d, tmp_path / "run", epochs=1)
    assert config.model.backbone.params == {"depth": 2, "first_filters": 8}
    first = train(config, progress=False, log=lambda _: None)
    assert config.model.backbone.params == {"depth": 2, "first_filters": 8}  # the caller's config is left alone
    stored = read_checkpoint_state(first.last_checkpoint)["config"]
    assert stored["model"]["backbone"]["params"] == {"depth": 2, "first_filters": 8, "kernel_size": 3, "batch_norm": True,
                                                     "dropout": 0.2, "halve_second_conv": False}
    assert set(stored["model"]["masking"]["params"]) >= {"percentage", "radius"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"] == stored["model"]

    # the same checkpoint as an older version wrote it: only the parameters the user gave
    state = read_checkpoint_state(first.last_checkpoint)
    state["config"]["model"]["backbone"]["params"] = {"depth": 2, "first_filters": 8}
    state["config"]["model"]["masking"]["params"] = {}
    torch.save(state, first.last_checkpoint)
    resumed = train(_config(tiny_config, dataset_2d, tmp_path / "run", epochs=2), resume=True, progress=False,
                    log=lambda _: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_resume_without_a_run_is_a_clear_error(tiny_config, dataset_2d, tmp_path):
    with pytest.raises(DenoiSegError, match="nothing to resume"):
        Trainer(_config(tiny_config, dataset_2d, tmp_path / "none"), resume=True, progress=False)


def test_unknown_component_fails_before_any_data_is_read(tiny_config, tmp_path):
    raw = tiny_config.model_dump(mode="json")
    raw["data"]["train"] = str(tmp_path / "does-not-exist")
    raw["model"]["backbone"]["name"] = "unet_typo"
    with pytest.raises(ConfigError, match="unknown backbone 'unet_typo'.*unet"):
        Trainer(DenoiSegConfig.model_validate(raw), progress=False)


def test_patch_size_of_wrong_dimensionality_is_a_clear_error(tiny_config, dataset_3d, tmp_path):
    config = _config(tiny_config, dataset_3d, tmp_path / "run")  # 2-entry patch size on 3-D data
    with pytest.raises(DenoiSegError, match="patch_size"):
        Trainer(config, progress=False)


def test_init_from_checkpoint_starts_from_its_weights(tiny_config, dataset_2d, tmp_path):
    first = train(_config(tiny_config, dataset_2d, tmp_path / "first", epochs=1), progress=False, log=lambda _: None)
    trainer = Trainer(
        _config(tiny_config, dataset_2d, tmp_path / "second", epochs=1),
        init_from=first.best_checkpoint,
        progress=False,
        log=lambda _: None,
    )
    source = read_checkpoint_state(first.best_checkpoint)["model_state"]
    for key, value in trainer.net.state_dict().items():
        assert torch.equal(value.cpu(), source[key]), key
