"""The few-shot recipe's levers (EMA, warm start, denoising finish, semi-supervised objective, weight decay,
intensity jitter, elastic deformation, noise augmentation, learned loss weights, alpha and labelled-fraction
schedules, checkpoint choice at the tuned threshold): each runs, does what it says, and
resumes exactly."""

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
    "elastic_deformation": 2.0,
    "noise_augmentation": 0.3,
    "loss_weighting": "uncertainty",
    "labelled_fraction_final": 0.1,
    "denoising_finish_fraction": 0.3,  # the last of the 3 epochs
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
    # warm start and denoising finish: epochs 1 and 3 train denoising only, so neither is ever the
    # best segmentation checkpoint
    assert read_checkpoint_state(run.best_checkpoint)["epoch"] == 2
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
    # the learned loss weights trained (they start at log-variance 0) and travel in last.pt for resuming
    learned = last["training_state"]["loss_weighting"]["log_variances"]
    assert float(learned.abs().min()) > 0
    torch.testing.assert_close(learned, trainer.state.loss_weighting.log_variances.detach().cpu())


def test_resume_with_every_lever_equals_an_uninterrupted_run(tiny_config, dataset, tmp_path):
    whole = train(_config(tiny_config, dataset, tmp_path / "whole", **ALL_LEVERS), progress=False, log=lambda _: None)
    # interrupted after two of the three epochs (the schedules run over all three)
    interrupted = Trainer(_config(tiny_config, dataset, tmp_path / "parts", **ALL_LEVERS), progress=False, log=lambda _: None)
    batches = interrupted.batches()
    for _ in range(2):
        interrupted._run_epoch(batches)
    interrupted._run_lock.release()
    resumed_config = _config(tiny_config, dataset, tmp_path / "parts", **ALL_LEVERS)
    resumed = train(resumed_config, resume=True, progress=False, log=lambda _: None)
    a = read_checkpoint_state(whole.last_checkpoint)
    b = read_checkpoint_state(resumed.last_checkpoint)
    for key in a["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key])
    torch.testing.assert_close(
        a["training_state"]["loss_weighting"]["log_variances"], b["training_state"]["loss_weighting"]["log_variances"]
    )


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


def test_mean_teacher_unlabelled_only_leaves_the_labelled_patches_to_their_labels():
    from denoiseg_plugins.three_class_head import ThreeClassHead

    torch.manual_seed(0)
    patches = torch.randn(4, 1, 16, 16)
    teacher_logits = torch.randn(4, 3, 16, 16)

    def teacher(x):  # any teacher: the term is only read where it applies
        return teacher_logits

    labelled = torch.tensor([True, True, False, False])
    objective = MeanTeacherConsistency(MeanTeacherParams(noise=0.0, ramp_up=0.0, loss="cross_entropy", unlabelled_only=True))
    student = torch.zeros(4, 3, 16, 16, requires_grad=True)
    objective(student_logits=student, patches=patches, labelled=labelled, teacher=teacher, head=ThreeClassHead(),
              progress=1.0, generator=torch.Generator().manual_seed(1)).backward()
    per_patch = student.grad.abs().sum(dim=(1, 2, 3))
    assert float(per_patch[:2].max()) == 0.0 and float(per_patch[2:].min()) > 0
    # no unlabelled patch in the batch: the term is zero, not NaN
    none = objective(student_logits=student, patches=patches, labelled=torch.ones(4, dtype=torch.bool), teacher=teacher,
                     head=ThreeClassHead(), progress=1.0, generator=torch.Generator().manual_seed(1))
    assert float(none.detach()) == 0.0


def test_validation_ignores_images_without_objects(dataset):
    from denoiseg_core.data import ImageRecord

    image = np.zeros((1, 8, 8), np.float32)
    empty = ImageRecord(image=image, labels=np.zeros((8, 8), np.int32), path=Path("empty"))
    full = ImageRecord(image=image, labels=np.eye(8, dtype=np.int32), path=Path("full"))
    unlabelled = ImageRecord(image=image, labels=None, path=Path("none"))
    assert [r.name for r in scored_records([empty, full, unlabelled])] == [full.name]


def test_alpha_schedule_moves_from_alpha_to_alpha_final_over_the_joint_steps(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "run", alpha=0.5, alpha_final=0.1, warm_start_epochs=1,
                     loss_weighting="fixed", denoising_finish_fraction=0.0)
    trainer = Trainer(config, progress=False, log=lambda _: None)
    trainer.state.epoch = 1  # the first joint epoch: 6 joint steps in all
    assert trainer._alpha(0) == pytest.approx(0.5)
    trainer.state.epoch = 2
    assert trainer._alpha(0) == pytest.approx(0.5 - 0.4 * 3 / 6)
    trainer.state.epoch = 3
    assert trainer._alpha(0) == pytest.approx(0.1)
    trainer.state.epoch = 0
    run = trainer.fit()
    assert all(np.isfinite(float(r["train_loss"])) for r in _rows(run.run_dir))


def test_scheduled_labelled_fraction_reaches_the_batches(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "run", batch_size=20, labelled_fraction=1.0,
                     labelled_fraction_final=0.0, epochs=2, steps_per_epoch=1, denoising_finish_fraction=0.0)
    trainer = Trainer(config, progress=False, log=lambda _: None)
    batches = trainer.batches()
    first = next(batches)[2]  # fraction 1.0: every patch from a labelled image
    last = next(batches)[2]  # fraction 0.5 at step 1 of 2: 10 drawn from labelled images, 10 from all
    assert first.all()
    assert last[:10].all() and last.sum() < 20


def test_uniform_batches_ignore_the_labelled_fraction_schedule_and_alpha_final_needs_fixed_weights(
    tiny_config, dataset, tmp_path
):
    # the paper's uniform batches: the default schedule's end has nothing to act on
    config = _config(tiny_config, dataset, tmp_path / "r", labelled_fraction=None, labelled_fraction_final=0.2,
                     denoising_finish_fraction=0.0)
    trainer = Trainer(config, progress=False, log=lambda _: None)
    assert trainer._labelled_fraction_at is None
    trainer._run_lock.release()
    with pytest.raises(Exception, match="set training.loss_weighting to fixed"):
        _config(tiny_config, dataset, tmp_path / "r", alpha_final=0.2, loss_weighting="uncertainty")


def test_learned_loss_weights_settle_where_each_term_is_balanced():
    from denoiseg_core.losses import UncertaintyWeighting

    weighting = UncertaintyWeighting()
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    denoise, seg = torch.tensor(0.2), torch.tensor(0.8)
    for _ in range(2000):
        optimizer.zero_grad()
        weighting(denoise, seg, torch.tensor(True)).backward()
        optimizer.step()
    # minimum of 0.5 exp(-s) L + s/2 at s = log L; of exp(-s) L + s/2 at s = log 2L
    torch.testing.assert_close(weighting.log_variances.detach(), torch.log(torch.tensor([0.2, 1.6])), atol=1e-3, rtol=0)
    # a batch without labelled patches leaves the segmentation weight alone
    optimizer.zero_grad()
    weighting(torch.tensor(1.0), seg, torch.tensor(False)).backward()  # off its optimum: the denoising side moves
    assert float(weighting.log_variances.grad[1]) == 0.0 and float(weighting.log_variances.grad[0]) != 0.0


def test_elastic_deformation_warps_chosen_patches_and_their_targets_alike():
    from denoiseg_core.augmentation import elastic_deform

    y, x = np.mgrid[:64, :64]
    blobs = np.zeros((64, 64), np.float32)
    for cy, cx in [(16, 16), (40, 44), (20, 50), (50, 15)]:
        blobs += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 60.0).astype(np.float32)
    patches = torch.from_numpy(np.stack([blobs, blobs]))[:, None]
    targets = (patches[:, 0] > 0.5).long() + (patches[:, 0] > 0.8).long()  # a 3-class map of the image
    chosen = torch.tensor([True, False])
    warped, warped_targets = elastic_deform(patches, targets, chosen, 3.0, torch.Generator().manual_seed(0))
    # the unchosen patch is untouched, the chosen one moved
    assert torch.equal(warped[1], patches[1]) and torch.equal(warped_targets[1], targets[1])
    assert float((warped[0] - patches[0]).abs().max()) > 0.05
    assert float((warped_targets[0] != targets[0]).float().mean()) > 0.005
    # classes stay classes, and the warped target is the warped image's class map (up to interpolation at edges)
    assert set(warped_targets.unique().tolist()) <= {0, 1, 2}
    recomputed = (warped[0, 0] > 0.5).long() + (warped[0, 0] > 0.8).long()
    assert float((recomputed == warped_targets[0]).float().mean()) > 0.98
    # float targets (e.g. distance maps) are warped linearly, per channel
    float_targets = torch.from_numpy(np.stack([np.stack([blobs, 1 - blobs])] * 2))
    _, warped_float = elastic_deform(patches, float_targets, chosen, 3.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(warped_float[0, 0], warped[0, 0])
    torch.testing.assert_close(warped_float[0, 1], 1 - warped[0, 0])


def test_learned_loss_weights_replace_alpha_except_for_a_single_term(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "run", loss_weighting="uncertainty")
    trainer = Trainer(config, progress=False, log=lambda _: None)
    batch = trainer._to_device(next(trainer.batches()))
    with torch.no_grad():
        trainer.state.loss_weighting.log_variances.copy_(torch.tensor([0.3, -0.2]))

    def losses(alpha):
        return trainer._losses(*batch, torch.Generator().manual_seed(0), alpha=alpha, learned_weights=True)

    total, denoise, seg = losses(0.5)
    expected = 0.5 * np.exp(-0.3) * denoise + np.exp(0.2) * seg + 0.5 * (0.3 - 0.2)
    torch.testing.assert_close(total, expected.float())
    total, denoise, seg = losses(0.0)  # alpha 0: segmentation only, as asked
    torch.testing.assert_close(total, seg)
    total, denoise, seg = losses(1.0)
    torch.testing.assert_close(total, denoise)


def test_a_run_written_before_learned_loss_weights_resumes_with_alpha(tiny_config, dataset, tmp_path):
    from denoiseg_core.checkpoint import load_checkpoint, write_checkpoint_state
    from denoiseg_core.training import resume_config

    config = _config(tiny_config, dataset, tmp_path / "run", epochs=1, loss_weighting="fixed")
    run = train(config, progress=False, log=lambda _: None)
    # what an earlier version wrote: a complete config without the setting (it weighed the terms by alpha)
    for name in ("last.pt", "best.pt"):
        state = read_checkpoint_state(run.run_dir / name)
        del state["config"]["training"]["loss_weighting"]
        write_checkpoint_state(run.run_dir / name, state)
    assert DenoiSegConfig().training.loss_weighting == "uncertainty"  # today's default differs
    assert load_checkpoint(run.run_dir / "best.pt").config.training.loss_weighting == "fixed"
    resumed = resume_config(run.run_dir)
    assert resumed.training.loss_weighting == "fixed"
    resumed.training.epochs = 2
    train(resumed, resume=True, progress=False, log=lambda _: None)
    assert read_checkpoint_state(run.run_dir / "last.pt")["epoch"] == 2


def test_denoising_finish_trains_denoising_alone_on_uniform_batches_and_keeps_best_segmentation(
    tiny_config, dataset, tmp_path
):
    config = _config(tiny_config, dataset, tmp_path / "run", batch_size=20, labelled_fraction=1.0,
                     labelled_fraction_final=None, epochs=3, steps_per_epoch=2, denoising_finish_fraction=0.25,
                     loss_weighting="uncertainty")
    trainer = Trainer(config, progress=False, log=lambda _: None)
    assert [trainer.denoising_only_phase(e) for e in range(3)] == [None, None, "denoising finish"]
    batches = trainer.batches()
    joint = [next(batches)[2] for _ in range(4)]
    finish = [next(batches)[2] for _ in range(2)]
    assert all(b.all() for b in joint)  # labelled_fraction 1.0 while joint
    assert all(not b.all() for b in finish)  # drawn from all images: 3 of the 6 are labelled
    batches.close()
    trainer._run_lock.release()
    # a labelled-fraction schedule ends where the finish starts (batch 4 of 6)
    ramped = Trainer(_config(tiny_config, dataset, tmp_path / "ramped", labelled_fraction=1.0, labelled_fraction_final=0.0,
                             epochs=3, steps_per_epoch=2, denoising_finish_fraction=0.25), progress=False, log=lambda _: None)
    assert [ramped._labelled_fraction_at(i) for i in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    ramped._run_lock.release()

    trainer = Trainer(config.model_copy(update={"run_dir": tmp_path / "fit"}), progress=False, log=lambda _: None)
    batches = trainer.batches()
    for _ in range(2):
        trainer._run_epoch(batches)
    weights_before = trainer.state.loss_weighting.log_variances.detach().clone()
    lr_steps_before = trainer.state.scheduler.last_epoch
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-7  # as if the joint epochs had plateaued
    trainer._run_epoch(batches)  # the finish: denoising alone
    batches.close()
    # the learned loss weights and the plateau schedule rest; the segmentation checkpoint is a joint epoch's
    torch.testing.assert_close(trainer.state.loss_weighting.log_variances.detach(), weights_before)
    assert trainer.state.scheduler.last_epoch == lr_steps_before
    # the finish runs at learning_rate again
    assert trainer.optimizer.param_groups[0]["lr"] == config.training.learning_rate
    assert read_checkpoint_state(trainer.run_dir / "best.pt")["epoch"] <= 2
    # best_denoising.pt is the finish's epoch, even had a joint epoch a lower validation denoising loss
    assert read_checkpoint_state(trainer.run_dir / BEST_DENOISING)["epoch"] == 3
    trainer._run_lock.release()


def test_denoising_finish_keeps_a_joint_epoch_and_needs_both_terms(tiny_config, dataset, tmp_path):
    def finish_epochs(**training):
        return _config(tiny_config, dataset, tmp_path / "r", **training).training.denoising_finish_epochs

    assert finish_epochs(epochs=30, denoising_finish_fraction=1 / 3) == 10
    assert finish_epochs(epochs=10, denoising_finish_fraction=0.01) == 1  # asked for: at least one epoch
    assert finish_epochs(epochs=3, warm_start_epochs=1, denoising_finish_fraction=0.9) == 1  # one joint epoch stays
    assert finish_epochs(epochs=1, denoising_finish_fraction=0.5) == 0
    assert finish_epochs(epochs=30, denoising_finish_fraction=0.5, alpha=0.0) == 0  # segmentation only
    assert finish_epochs(epochs=30, denoising_finish_fraction=0.5, alpha=1.0) == 0  # Noise2Void throughout


def test_noise_augmentation_adds_noise_of_random_bounded_strength_to_chosen_patches_only():
    from denoiseg_core.augmentation import add_noise

    patches = torch.zeros(64, 1, 32, 32)
    chosen = torch.arange(64) % 2 == 0
    noised = add_noise(patches, chosen, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(noised[~chosen], patches[~chosen])
    strengths = noised[chosen].flatten(1).std(dim=1)
    assert float(strengths.max()) < 0.55 and float(strengths.max()) > 0.35  # uniform in [0, 0.5]
    assert float(strengths.min()) < 0.15
    assert abs(float(noised[chosen].mean())) < 0.02


def test_noise_augmentation_noises_labelled_patches_and_leaves_them_out_of_denoising(tiny_config, dataset, tmp_path):
    config = _config(tiny_config, dataset, tmp_path / "run", batch_size=16, labelled_fraction=0.5,
                     noise_augmentation=0.5, intensity_jitter=0.0, elastic_deformation=0.0)
    trainer = Trainer(config, progress=False, log=lambda _: None)
    seen = {}
    losses = trainer._losses

    def recording_losses(patches, targets, labelled, *args, **kwargs):
        seen.update(patches=patches, labelled=labelled, no_denoising=kwargs["no_denoising"])
        return losses(patches, targets, labelled, *args, **kwargs)

    trainer._losses = recording_losses
    batch = trainer._to_device(next(trainer.batches()))
    trainer.train_step(batch)
    changed = (seen["patches"] != batch[0]).flatten(1).any(dim=1)
    # the patches that got noise are exactly those the denoising term leaves out, some of the labelled ones
    assert torch.equal(changed, seen["no_denoising"])
    assert bool(changed.any()) and not bool((changed & ~batch[2]).any())
    assert int(changed.sum()) < int(batch[2].sum())
