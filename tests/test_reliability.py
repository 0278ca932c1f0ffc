"""Untrusted files, injected faults and silent failures (issue 14).

Every test here failed on the code before the reliability work: a pickled payload ran, an
output replaced an input, a fault left a traceback or a half-finished state, or a number
that cannot be right went through silently.
"""

from __future__ import annotations

import csv
import errno
import os
import pathlib
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from denoiseg_core.checkpoint import read_checkpoint_state, save_checkpoint
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.model import build_model
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.training import Trainer, train
from denoiseg_core.training_state import BestEpochs

from cli_helpers import run_cli, tree

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- helpers


def one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def make_checkpoint(path: Path, *, normalization: Normalization | None = None, **extra_state) -> Path:
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}}})
    torch.manual_seed(0)
    built = build_model(config, ndim=2, in_channels=1)
    save_checkpoint(path, config=config, built=built, normalization=normalization or Normalization([100.0], [25.0]), instance_settings=built.head.settings(threshold=0.4))
    if extra_state:
        state = torch.load(path, weights_only=True)
        state.update(extra_state)
        torch.save(state, path)
    return path


class Payload:
    """Pickles as a call that writes a marker file: it must never run on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def poisoned(path: Path, marker: Path) -> Path:
    """A working checkpoint with a payload hidden in an otherwise unused key."""
    state = torch.load(make_checkpoint(path), weights_only=True)
    state["extra"] = {"note": Payload(marker)}
    torch.save(state, path)
    return path


def tiny_config_file(folder: Path, data: dict[str, Path], run_dir: Path, **training) -> Path:
    config = {
        "seed": 0,
        "run_dir": str(run_dir),
        "data": {"train": str(data["train"]), "validation": str(data["val"]), "patch_size": [32, 32]},
        "model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}},
        "training": {
            "epochs": 3, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu", "precision": "fp32",
            "best_metric": "val_loss", **training,
        },
    }
    path = folder / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_subprocess(args: list, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``denoiseg ARGS`` in a fresh process (through tests/fault_driver.py, which can SIGKILL it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DENOISEG_KILL_AT", None)
    if kill_at:
        env["DENOISEG_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, str(TESTS / "fault_driver.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=4, n_labelled=2, n_val=1, n_test=2, shape=(64, 64), seed=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(folder / f"img{i}.tif", rng.normal(100, 20, (40, 52)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


# --------------------------------------------------------------------------- 1. no code runs from a checkpoint


def test_checkpoints_are_plain_data_loadable_with_weights_only(data, tmp_path):
    run = train(DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1).read_text())),
                progress=False, log=lambda _: None)
    for path in (run.best_checkpoint, run.last_checkpoint):
        state = torch.load(path, map_location="cpu", weights_only=True)  # raises on anything but plain data
        assert state["training_state"] is None or "numpy_rng" in state["training_state"]


@pytest.mark.parametrize("command", ["predict", "evaluate", "init-from", "resume", "export"])
def test_malicious_checkpoint_payload_does_not_run(command, data, images, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = poisoned(tmp_path / "best.pt", marker)
    args = {
        "predict": ["predict", evil, images / "img0.tif", "--out", tmp_path / "out"],
        "evaluate": ["evaluate", evil, "--images", data["test"] / "images", "--masks", data["test"] / "masks"],
        "init-from": ["train", tiny_config_file(tmp_path, data, tmp_path / "run"), "--init-from", evil],
        "resume": ["train", "--resume", tmp_path],  # tmp_path/last.pt is the payload
        "export": ["zoo", "export", evil, "--out", tmp_path / "m.zip"],
    }[command]
    if command == "resume":
        evil.rename(tmp_path / "last.pt")
        evil = tmp_path / "last.pt"
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, str(evil), "--trust-checkpoint", "could run code")
    assert not marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.zip").exists()


def test_trust_checkpoint_is_the_explicit_opt_in(images, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = poisoned(tmp_path / "model.pt", marker)
    code, _, err = run_cli(["predict", evil, images / "img0.tif", "--out", tmp_path / "out", "--trust-checkpoint"], capsys)
    assert code == 0, err
    assert marker.exists()  # the user vouched for the file: full unpickling, payload and all


# --------------------------------------------------------------------------- 2. no data loss


def test_evaluate_json_may_not_replace_the_checkpoint_or_an_existing_report(checkpoint, data, tmp_path, capsys):
    before = checkpoint.read_bytes()
    common = ["--images", data["test"] / "images", "--masks", data["test"] / "masks"]
    code, _, err = run_cli(["evaluate", checkpoint, *common, "--json", checkpoint, "--overwrite"], capsys)
    one_line_error(code, err, "refusing to overwrite an input file")
    assert checkpoint.read_bytes() == before
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    code, _, err = run_cli(["evaluate", checkpoint, *common, "--json", report], capsys)
    one_line_error(code, err, "exists", "--overwrite")
    assert report.read_text() == "{}"
    code, _, err = run_cli(["evaluate", checkpoint, *common, "--json", report, "--overwrite"], capsys)
    assert code == 0, err
    assert "ap50" in report.read_text()


def test_predict_same_file_names_from_two_folders_collide_before_any_work(checkpoint, images, tmp_path, capsys):
    for folder in ("s1", "s2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.tif").write_bytes((images / "img0.tif").read_bytes())
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(["predict", checkpoint, tmp_path / "s1" / "x.tif", tmp_path / "s2" / "x.tif", "--out", tmp_path / "out", *extra], capsys)
        one_line_error(code, err, "same file")
        assert not (tmp_path / "out").exists()


def test_predict_killed_then_continued_with_skip_existing(checkpoint, images, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    assert run_subprocess(["predict", checkpoint, images, "--out", reference]).returncode == 0
    # SIGKILL just before the second image's labels are renamed into place: img0 complete, img1 cut off
    killed = run_subprocess(["predict", checkpoint, images, "--out", out], kill_at="img1_labels.tif:1:before")
    assert killed.returncode == -9
    assert (out / "img0_labels.tif").is_file() and not (out / "img1_labels.tif").exists()
    assert list(out.glob(".*.part")), "the kill should have left a temporary file"
    first = (out / "img0_labels.tif").stat().st_mtime_ns

    again = run_subprocess(["predict", checkpoint, images, "--out", out])  # without a flag: one line, nothing changed
    assert again.returncode == 2 and "--skip-existing" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = run_subprocess(["predict", checkpoint, images, "--out", out, "--skip-existing"])
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "img0_labels.tif").stat().st_mtime_ns == first  # skipped, not redone
    assert not list(out.glob(".*")), "temporary files of the killed run must be removed"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        np.testing.assert_array_equal(tifffile.imread(out / path.name), tifffile.imread(path))


def test_outputs_follow_the_umask(checkpoint, images, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(["predict", checkpoint, images / "img0.tif", "--out", tmp_path / "out"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_run_folder_is_locked_against_a_second_training(data, tmp_path):
    from denoiseg_core.safeguards import claim_run_folder

    config = DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1).read_text()))
    lock = claim_run_folder(tmp_path / "run")  # as a training running in another process holds it
    try:
        with pytest.raises(DenoiSegError, match="in use by another training"):
            train(config, progress=False, log=lambda _: None)
    finally:
        lock.release()
    assert not (tmp_path / "run" / "last.pt").exists()
    train(config, progress=False, log=lambda _: None)  # released: the folder is usable again


def test_two_trainings_into_one_new_run_folder(data, tmp_path):
    """Two real processes: the first pauses mid-run (SIGSTOP at its first last.pt write, holding
    the lock); the second, started into the same new folder, stops with one line."""
    import signal
    import time

    config = tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DENOISEG_KILL_AT": "last.pt:1:stop"}
    first = subprocess.Popen([sys.executable, str(TESTS / "fault_driver.py"), "train", config, "--no-progress"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while Path(f"/proc/{first.pid}/stat").read_text().split(") ")[1][0] != "T":
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not reach its pause"
            time.sleep(0.2)
        second = run_subprocess(["train", config, "--no-progress"])
        assert second.returncode == 2, second.stdout + second.stderr
        assert "in use by another training" in second.stderr and f"process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "run" / "last.pt").exists()  # only the paused first run ever wrote here


def test_resume_refuses_to_change_data_model_or_seed(data, tmp_path, capsys):
    config = tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1)
    assert run_cli(["train", config, "--no-progress"], capsys)[0] == 0
    for setting in ("data.train=/elsewhere", "model.backbone.params.depth=3", "seed=5"):
        code, _, err = run_cli(["train", "--resume", tmp_path / "run", "--set", setting], capsys)
        one_line_error(code, err, "only training.* settings")
    code, _, err = run_cli(["train", "--resume", tmp_path / "run", "--set", "training.epochs=2", "--no-progress"], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- fault windows of training


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    config = DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(folder, data, folder / "run").read_text()))
    return train(config, progress=False, log=lambda _: None).run_dir


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("last.pt", "best.pt"):
        got, want = read_checkpoint_state(run / name), read_checkpoint_state(reference / name)
        assert got["epoch"] == want["epoch"] and got["instance_settings"] == want["instance_settings"], name
        for key, value in want["model_state"].items():
            assert torch.equal(got["model_state"][key], value), (name, key)
    with open(run / "log.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize(
    "kill_at",
    [
        "last.pt:2:before",  # between epoch 2's best.pt and last.pt writes (its last.pt left as a .part)
        "last.pt:3:after",  # after the final last.pt, before log.csv and threshold tuning
        "best.pt:2:before",  # while best.pt is written (an orphan .best.pt.xxxx.part with the true best weights)
        "best.pt:1:after",  # after the first best.pt, before the first last.pt (nothing to resume: start again)
    ],
)
def test_sigkill_during_training_then_resume_gives_the_uninterrupted_run(kill_at, data, reference_run, tmp_path):
    config = tiny_config_file(tmp_path, data, tmp_path / "run")
    killed = run_subprocess(["train", config, "--no-progress"], kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "run"
    if (run / "last.pt").exists():
        best, last = read_checkpoint_state(run / "best.pt"), read_checkpoint_state(run / "last.pt")
        assert best["epoch"] <= last["epoch"] + 1  # best.pt is never behind last.pt
        resumed = run_subprocess(["train", "--resume", run, "--no-progress"])
    else:  # killed before the first last.pt: a fresh start into the same folder is allowed
        resumed = run_subprocess(["train", config, "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run, reference_run)


def test_best_checkpoint_records_the_epoch_of_its_weights(data, tmp_path, monkeypatch):
    config = DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(tmp_path, data, tmp_path / "run").read_text()))
    # epoch 1 is the best; the run goes on to epoch 3
    monkeypatch.setattr(BestEpochs, "improves", lambda self, values: values["epoch"] == 1 and not setattr(self, "value", 0.0))
    run = train(config, progress=False, log=lambda _: None)
    best = read_checkpoint_state(run.best_checkpoint)
    assert best["epoch"] == 1 and best["instance_settings"] is not None
    assert read_checkpoint_state(run.last_checkpoint)["epoch"] == 3


# --------------------------------------------------------------------------- 3. faults are one line


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO])
def test_write_faults_are_one_line_and_leave_nothing(code_, checkpoint, images, tmp_path, capsys, monkeypatch):
    """A full disk (ENOSPC), a read-only mount, a permission problem or an I/O error, injected
    at the write call (works everywhere, also as root; see the tmpfs variant below)."""

    def failing(self, data):
        raise OSError(code_, os.strerror(code_), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing)
    code, _, err = run_cli(["predict", checkpoint, images / "img0.tif", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, os.strerror(code_), "img0_denoised.tif")
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == set()


def test_full_tmpfs_is_one_line_and_leaves_nothing(checkpoint, images, tmp_path, capsys):
    """A real full disk: a 256 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the ENOSPC-injection test covers this)")
    try:
        with open(mount / "filler", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass  # full
        (mount / "out").mkdir()
        code, _, err = run_cli(["predict", checkpoint, images / "img0.tif", "--out", mount / "out"], capsys)
        one_line_error(code, err, "No space left on device")
        assert tree(mount / "out") == set()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("where", ["below_a_file", "is_a_folder"])
def test_unwritable_outputs_are_one_line_before_any_work(where, checkpoint, data, images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "folder.json").mkdir()
    commands = {
        "below_a_file": [
            ["predict", checkpoint, images / "img0.tif", "--out", blocker / "out"],
            ["evaluate", checkpoint, "--images", data["test"] / "images", "--masks", data["test"] / "masks", "--json", blocker / "m.json"],
            ["config", "init", blocker / "c.yaml"],
            ["zoo", "import", tmp_path / "missing.zip", "--out", blocker / "m.pt"],
        ],
        "is_a_folder": [
            ["evaluate", checkpoint, "--images", data["test"] / "images", "--masks", data["test"] / "masks", "--json", tmp_path / "folder.json", "--overwrite"],
            ["config", "init", tmp_path / "folder.json", "--overwrite"],
        ],
    }[where]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err)


def test_long_output_name_is_written(checkpoint, images, tmp_path, capsys):
    """The output name fits in 255 bytes; its temporary ``.NAME.xxxx.part`` used not to."""
    image = tmp_path / ("n" * 230 + ".tif")
    image.write_bytes((images / "img0.tif").read_bytes())
    code, _, err = run_cli(["predict", checkpoint, image, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / ("n" * 230 + "_labels.tif")).is_file()


@pytest.mark.parametrize(
    "state, message",
    [
        ({"model_state": None}, "model_state"),
        ("no_model_state", "no model_state"),
        ("wrong_weights", "do not fit"),
    ],
)
def test_broken_checkpoints_are_one_line(state, message, images, tmp_path, capsys):
    path = make_checkpoint(tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    if state == "no_model_state":
        del raw["model_state"]
    elif state == "wrong_weights":
        raw["model_state"] = {k: v[..., :1] if v.ndim else v for k, v in raw["model_state"].items()}
    else:
        raw.update(state)
    torch.save(raw, path)
    code, _, err = run_cli(["predict", path, images / "img0.tif", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, str(path), message)


def test_memory_error_is_one_line(checkpoint, images, tmp_path, capsys, monkeypatch):
    """An absurd setting (e.g. batch_size=1e8) ends in MemoryError: one line, exit 2."""
    import denoiseg_core.prediction as prediction

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(prediction, "predict_image", exhausted)
    code, _, err = run_cli(["predict", checkpoint, images / "img0.tif", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "out of memory")


# --------------------------------------------------------------------------- 4. numbers that cannot be right


@pytest.mark.parametrize("setting", ["training.learning_rate=.inf", "training.alpha=.nan", "data.noise_sigma=.inf"])
def test_non_finite_settings_are_refused(setting, data, tmp_path, capsys):
    code, _, err = run_cli(["train", tiny_config_file(tmp_path, data, tmp_path / "run"), "--set", setting], capsys)
    one_line_error(code, err, setting.split("=")[0].split(".")[-1])
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    config = DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(tmp_path, data, tmp_path / "run").read_text()))
    calls = {"n": 0}
    original = Trainer.train_step

    def diverging(self, batch, *args):  # the optimiser blows up in epoch 2
        calls["n"] += 1
        total, denoise, seg = original(self, batch, *args)
        if calls["n"] > 2:
            with torch.no_grad():
                for p in self.net.parameters():
                    p.fill_(float("nan"))
            return total * float("nan"), denoise, seg
        return total, denoise, seg

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", diverging)
        with pytest.raises(DenoiSegError, match="diverged.*epoch 2.*keep epoch 1"):
            train(config, progress=False, log=lambda _: None)
    for name in ("best.pt", "last.pt"):
        state = read_checkpoint_state(tmp_path / "run" / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_checkpoint_with_non_finite_normalisation_is_refused(images, tmp_path, capsys):
    path = make_checkpoint(tmp_path / "model.pt", normalization=Normalization([float("nan")], [1.0]))
    code, _, err = run_cli(["predict", path, images / "img0.tif", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "normalisation")


def test_constant_images_and_no_labels_warn(tmp_path):
    data = write_synthetic_dataset(tmp_path / "d", n_train=3, n_labelled=0, n_val=1, n_test=1, shape=(64, 64), seed=1)
    tifffile.imwrite(data["train"] / "images" / "flat.tif", np.full((64, 64), 7, np.uint16))
    config = DenoiSegConfig.model_validate(yaml.safe_load(tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1).read_text()))
    messages: list[str] = []
    Trainer(config, progress=False, log=messages.append)
    assert any("constant" in m and "flat.tif" in m for m in messages), messages
    assert any("no labelled training images" in m for m in messages), messages


def test_multi_series_tiff_and_fifo_are_refused(checkpoint, images, tmp_path, capsys):
    series = tmp_path / "two.tif"
    with tifffile.TiffWriter(series) as tif:
        tif.write(np.zeros((40, 52), np.uint16))
        tif.write(np.ones((20, 20), np.uint16))
    code, _, err = run_cli(["predict", checkpoint, series, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "2 images")
    fifo = tmp_path / "x.tif"
    os.mkfifo(fifo)
    code, _, err = run_cli(["predict", checkpoint, fifo, "--out", tmp_path / "out"], capsys)  # used to block forever
    one_line_error(code, err, "not a regular file")


def test_config_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nseed: 0\n")
    code, _, err = run_cli(["config", "show", bomb], capsys)
    one_line_error(code, err, "aliases expand")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((40, 52), 1e300), "beyond the float32 range"),  # finite, so not "NaN or infinite"
        (np.zeros((40, 52, 3), np.uint8), "RGB"),  # not "3-D image"
    ],
)
def test_unclear_messages_name_the_real_problem(image, message, checkpoint, tmp_path, capsys):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image)
    code, _, err = run_cli(["predict", checkpoint, path, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "image.tif", message)



@pytest.mark.parametrize("command", ["train", "evaluate", "config"])
def test_full_disk_in_every_writer_is_one_line(command, checkpoint, data, tmp_path, capsys, monkeypatch):
    args = {
        "train": ["train", tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1), "--no-progress"],
        "evaluate": ["evaluate", checkpoint, "--images", data["test"] / "images", "--masks", data["test"] / "masks", "--json", tmp_path / "m.json"],
        "config": ["config", "init", tmp_path / "c.yaml"],
    }[command]

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "No space left on device")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]
