"""Untrusted and broken bioimage.io packages (issue 14): no code from a package runs unless the
user says so, parsing problems are one line, ``zoo predict`` loses no data."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from denoiseg_core.checkpoint import read_checkpoint_state
from denoiseg_core.config import load_config
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.training import Trainer
from denoiseg_zoo.export import ExportOptions, export_package

from cli_helpers import run_cli, tree
from test_reliability import one_line_error, run_subprocess, tiny_config_file
from test_zoo_package import train_tiny_checkpoint

ARCHITECTURE = "denoiseg_architecture.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zoo_reliability")
    checkpoint = folder / "model.pt"
    data = train_tiny_checkpoint(checkpoint, steps=5)
    sample = folder / "sample.tif"
    tifffile.imwrite(sample, data["images"][0])
    package = folder / "model.zip"
    export_package(checkpoint, package, ExportOptions(name="DenoiSeg reliability model", authors=["Test"], samples=[sample]))
    return {"folder": folder, "checkpoint": checkpoint, "package": package, "sample": sample}


def rewrite_package(source: Path, target: Path, *, rdf: dict | None = None, rdf_text: str | None = None,
                    replace: dict[str, bytes] | None = None) -> Path:
    """A copy of a package with members replaced (their sha256 updated in rdf.yaml) and/or a new rdf.yaml."""
    replace = replace or {}
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    description = rdf if rdf is not None else yaml.safe_load(members["rdf.yaml"])
    members.update(replace)

    def fix_hashes(node):
        if isinstance(node, dict):
            if node.get("source") in replace and "sha256" in node:
                node["sha256"] = hashlib.sha256(replace[node["source"]]).hexdigest()
            for value in node.values():
                fix_hashes(value)
        elif isinstance(node, list):
            for value in node:
                fix_hashes(value)

    fix_hashes(description)
    members["rdf.yaml"] = (rdf_text if rdf_text is not None else yaml.safe_dump(description, sort_keys=False)).encode()
    with zipfile.ZipFile(target, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
    return target


def malicious_package(exported, target: Path, marker: Path, *, state_dict_only: bool = False) -> Path:
    """The package with an architecture file that writes ``marker`` when imported (it still works)."""
    with zipfile.ZipFile(exported["package"]) as archive:
        source = archive.read(ARCHITECTURE)
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n".encode() + source
    rdf = yaml.safe_load(zipfile.ZipFile(exported["package"]).read("rdf.yaml"))
    if state_dict_only:
        rdf["weights"] = {"pytorch_state_dict": rdf["weights"]["pytorch_state_dict"]}
    return rewrite_package(exported["package"], target, rdf=rdf, replace={ARCHITECTURE: payload})


# --------------------------------------------------------------------------- code from packages


def test_zoo_test_does_not_run_the_package_architecture(exported, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    package = malicious_package(exported, tmp_path / "evil.zip", marker)
    code, out, err = run_cli(["zoo", "test", package], capsys)
    assert code == 0, out + err
    assert not marker.exists(), "zoo test ran the package's Python"
    assert out.startswith("status: passed") and "(torchscript)" in out and "(onnx)" in out
    assert "[skipped] pytorch_state_dict" in out and "--trust-package-code" in out
    # the explicit opt-in tests the state dict too, which imports the architecture file
    code, out, err = run_cli(["zoo", "test", package, "--trust-package-code"], capsys)
    assert "(pytorch_state_dict)" in out and marker.exists()


def test_state_dict_only_package_needs_trust_to_predict(exported, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    package = malicious_package(exported, tmp_path / "evil.zip", marker, state_dict_only=True)
    for args in (["zoo", "predict", package, exported["sample"], "--out", tmp_path / "out"], ["zoo", "test", package]):
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, "evil.zip", "--trust-package-code")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_import_and_init_from_rebuild_from_the_installed_plugin(exported, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    package = malicious_package(exported, tmp_path / "evil.zip", marker)
    code, _, err = run_cli(["zoo", "import", package, "--out", tmp_path / "model.pt"], capsys)
    assert code == 0, err
    assert not marker.exists(), "zoo import ran the package's Python"
    imported, original = read_checkpoint_state(tmp_path / "model.pt"), read_checkpoint_state(exported["checkpoint"])
    for key, value in original["model_state"].items():
        assert np.array_equal(imported["model_state"][key].numpy(), value.numpy()), key

    data = write_synthetic_dataset(tmp_path / "data", n_train=2, n_labelled=1, n_val=1, n_test=1, shape=(64, 64), seed=3)
    config = tiny_config_file(tmp_path, data, tmp_path / "run", epochs=1)
    trainer = Trainer(load_config(config), init_from=package, progress=False, log=lambda _: None)
    assert not marker.exists(), "train --init-from ran the package's Python"
    for key, value in original["model_state"].items():
        assert np.array_equal(trainer.net.state_dict()[key].numpy(), value.numpy()), key


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "rdf_text, message",
    [
        (None, "aliases expand"),  # the package's own rdf.yaml with an alias bomb appended
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_rdf_yaml_is_one_line_and_quick(rdf_text, message, exported, tmp_path, capsys):
    if rdf_text is None:
        rdf_text = zipfile.ZipFile(exported["package"]).read("rdf.yaml").decode() + _alias_bomb()
    package = rewrite_package(exported["package"], tmp_path / "bad.zip", rdf_text=rdf_text)
    for args in (["zoo", "test", package], ["zoo", "predict", package, exported["sample"], "--out", tmp_path / "out"]):
        started = time.perf_counter()
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, "bad.zip", message)
        assert time.perf_counter() - started < 10


# --------------------------------------------------------------------------- zoo predict: data and numbers


def test_zoo_predict_collisions_are_found_before_any_work(exported, tmp_path, capsys):
    for folder in ("s1", "s2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.tif").write_bytes(exported["sample"].read_bytes())
    for extra in ([], ["--overwrite"]):
        args = ["zoo", "predict", exported["package"], tmp_path / "s1" / "x.tif", tmp_path / "s2" / "x.tif", "--out", tmp_path / "out", *extra]
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, "same file")
        assert not (tmp_path / "out").exists()


def test_zoo_predict_refuses_nan_pixels(exported, tmp_path, capsys):
    image = tifffile.imread(exported["sample"]).astype(np.float32)
    image[10, 10] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    code, _, err = run_cli(["zoo", "predict", exported["package"], tmp_path / "nan.tif", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "nan.tif", "NaN")
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == set()


def test_zoo_predict_killed_then_continued_with_skip_existing(exported, tmp_path):
    inputs = []
    for i in range(2):
        inputs.append(tmp_path / f"img{i}.tif")
        inputs[-1].write_bytes(exported["sample"].read_bytes())
    out = tmp_path / "out"
    args = ["zoo", "predict", exported["package"], *inputs, "--out", out]
    killed = run_subprocess(args, kill_at="img1_labels.tif:1:before")
    assert killed.returncode == -9
    assert (out / "img0_labels.tif").is_file() and list(out.glob(".img1_labels.tif.*.part"))
    again = run_subprocess(args)
    assert again.returncode == 2 and "--skip-existing" in again.stderr
    resumed = run_subprocess([*args, "--skip-existing"])
    assert resumed.returncode == 0, resumed.stderr
    assert "img0.tif: skipped" in resumed.stdout
    assert not list(out.glob(".*"))
    np.testing.assert_array_equal(tifffile.imread(out / "img1_labels.tif"), tifffile.imread(out / "img0_labels.tif"))


@pytest.mark.parametrize("broken", ["output_channels", "torchscript_file"])
def test_broken_package_contents_are_one_line(broken, exported, tmp_path, capsys):
    rdf = yaml.safe_load(zipfile.ZipFile(exported["package"]).read("rdf.yaml"))
    replace = {}
    if broken == "output_channels":
        rdf["config"]["denoiseg"]["output_channels"]["probabilities"] = [7, 8, 9]
    else:
        replace[rdf["weights"]["torchscript"]["source"]] = b"not a TorchScript archive"
    package = rewrite_package(exported["package"], tmp_path / "broken.zip", rdf=rdf, replace=replace)
    code, _, err = run_cli(["zoo", "predict", package, exported["sample"], "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, "broken.zip")
    assert not list((tmp_path / "out").glob("*labels*")) if (tmp_path / "out").exists() else True


def test_export_removes_the_orphan_of_a_killed_export(exported, tmp_path, capsys):
    """A killed export leaves ``.m.zip.xxxx.partial.zip`` (the name atomic_path gives it); the
    next export into the same place removes it. (Killing a real export costs a whole export's
    time; the SIGKILL tests of train and predict cover the kill itself.)"""
    import os
    import tempfile

    from denoiseg_core.io import temporary_prefix

    out = tmp_path / "m.zip"
    fd, orphan = tempfile.mkstemp(prefix=temporary_prefix(out), suffix=".partial.zip", dir=tmp_path)
    os.close(fd)
    code, _, err = run_cli(["zoo", "export", exported["checkpoint"], "--out", out, "--name", "DenoiSeg reliability model"], capsys)
    assert code == 0, err
    assert out.is_file() and not Path(orphan).exists() and not list(tmp_path.glob(".m.zip.*"))


def test_missing_weights_file_is_named(exported, tmp_path, capsys):
    with zipfile.ZipFile(exported["package"]) as source, zipfile.ZipFile(tmp_path / "gap.zip", "w") as out:
        for name in source.namelist():
            if name != "weights.onnx":
                out.writestr(name, source.read(name))
    code, _, err = run_cli(["zoo", "test", tmp_path / "gap.zip"], capsys)  # was "expected str, bytes or os.PathLike object, not NoneType"
    one_line_error(code, err, "gap.zip", "'weights.onnx' named in rdf.yaml is missing from the package")


def test_huge_declared_input_size_is_named(exported, tmp_path, capsys):
    rdf = yaml.safe_load(zipfile.ZipFile(exported["package"]).read("rdf.yaml"))
    for axis in rdf["inputs"][0]["axes"]:
        if axis.get("type") == "space":
            axis["size"] = {"min": 10**9, "step": 16}
    package = rewrite_package(exported["package"], tmp_path / "huge.zip", rdf=rdf)
    code, _, err = run_cli(["zoo", "test", package], capsys)  # was "No functions provided to try"
    one_line_error(code, err, "huge.zip", "1,000,000,000")


def test_zoo_writers_fail_in_one_line_before_or_without_leftovers(exported, tmp_path, capsys, monkeypatch):
    import errno
    import os
    import pathlib

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["zoo", "export", exported["checkpoint"], "--out", blocker / "m.zip"], capsys)  # before any work
    one_line_error(code, err, "not a folder")

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    code, _, err = run_cli(["zoo", "import", exported["package"], "--out", tmp_path / "m.pt"], capsys)
    one_line_error(code, err, "m.pt", "No space left on device")
    assert tree(tmp_path) == {"file"}
