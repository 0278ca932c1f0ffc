"""A third-party plugin distribution (plugins/example_plugin) installed as a separate package.

The module fixture pip-installs a copy of ``plugins/example_plugin`` (non-editable, without
dependencies or network when setuptools is available) into the running environment and
uninstalls it afterwards. denoiseg finds its ``tiny_resnet`` backbone and ``distance_map``
head (float targets, two thresholds) only through the ``denoiseg.plugins`` entry point,
exactly as it would for a package from PyPI. Commands
that must see the install (or its absence) run in fresh subprocesses, because a Python
process keeps the modules it has imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from denoiseg_core.config import DenoiSegConfig, save_config, validate_components
from denoiseg_core.errors import ConfigError
from denoiseg_core.model import build_model
from denoiseg_core.plugin_manager import Registry, get_plugin_manager, plugin_versions
from denoiseg_core.checkpoint import load_checkpoint
from denoiseg_core.testing import check_backbone, check_head

from head_packages import check_head_package
from old_runtime import check_package_runtimes, old_torch  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = REPO / "plugins" / "example_plugin"
DISTRIBUTION = "denoiseg-example-plugin"
DENOISEG = Path(sys.executable).parent / "denoiseg"  # the console script of this environment


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _local_build_backend() -> bool:
    """Whether this environment's setuptools can build the plugin (>= 70.1 needs no `wheel`)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1)


def _pip(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory) -> str:
    """Install the example distribution for this module's tests; yields its version."""
    preinstalled = _installed()
    if not preinstalled:
        # Build from a copy so pip's build/ and *.egg-info never land in the repository.
        copy = tmp_path_factory.mktemp("example_plugin") / "src"
        shutil.copytree(PLUGIN_SOURCE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        if _local_build_backend():
            # Build with the environment's setuptools: no network, about a second.
            _pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(copy))
        else:  # e.g. a Python >= 3.12 venv: let pip fetch the build backend
            _pip("install", "--quiet", "--no-deps", str(copy))
    importlib.invalidate_caches()
    yield importlib.metadata.version(DISTRIBUTION)
    if not preinstalled and _installed():
        _pip("uninstall", "--yes", "--quiet", DISTRIBUTION)


@pytest.fixture(scope="module")
def fresh_registry(example_plugin) -> Registry:
    """A registry built after the install (``get_registry()`` was cached before it)."""
    return Registry.from_plugin_manager(get_plugin_manager())


def _tiny_resnet_config(tmp_path: Path) -> DenoiSegConfig:
    return DenoiSegConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "data"), "patch_size": [16, 16]},
            "model": {"backbone": {"name": "tiny_resnet", "params": {"width": 8, "blocks": 2}}},
            "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "device": "cpu"},
        }
    )


def test_listed_with_its_distribution(example_plugin):
    result = _run(DENOISEG, "plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    by_name = {(r["kind"], r["name"]): r for r in records}
    tiny = by_name[("backbone", "tiny_resnet")]
    assert tiny["distribution"] == DISTRIBUTION and tiny["version"] == example_plugin == "0.1.0"
    assert tiny["plugin"] == "denoiseg_example_plugin"
    assert {p["name"]: p["default"] for p in tiny["params"]} == {"width": 16, "blocks": 3, "kernel_size": 3}
    # The inventory: >= 3 backbones (one third-party), >= 3 masking strategies, >= 2 heads.
    kinds = [r["kind"] for r in records]
    assert kinds.count("backbone") >= 4 and kinds.count("masking") >= 3 and kinds.count("head") >= 2
    table = _run(DENOISEG, "plugins", "list")
    assert table.returncode == 0 and "tiny_resnet" in table.stdout and DISTRIBUTION in table.stdout


def test_config_naming_the_backbone_builds_a_model(fresh_registry, tmp_path):
    config = _tiny_resnet_config(tmp_path)
    built = build_model(config, ndim=2, in_channels=1, registry=fresh_registry)
    assert type(built.backbone_spec.build(built.backbone_params, ndim=2, in_channels=1, out_channels=4)).__module__ == (
        "denoiseg_example_plugin.tiny_resnet_arch"
    )
    assert built.size_divisor == 1 and built.halo == 5
    out = built.net(torch.randn(2, 1, 20, 13))
    assert out.shape == (2, 1 + built.head.num_classes, 20, 13)
    versions = plugin_versions(fresh_registry, [("backbone", "tiny_resnet"), ("head", "three_class")])
    assert versions[DISTRIBUTION] == "0.1.0" and "denoiseg" in versions


def test_conformance_kit_passes_for_the_third_party_backbone(fresh_registry):
    check_backbone(fresh_registry.get("backbone", "tiny_resnet"))


def test_conformance_kit_passes_for_every_head_with_the_third_party_one(fresh_registry):
    heads = fresh_registry.components("head")
    assert "distance_map" in {h.name for h in heads}
    for head in heads:
        check_head(head)


def test_the_plugins_own_tests_pass(example_plugin, tmp_path):
    tests = tmp_path / "tests"
    shutil.copytree(PLUGIN_SOURCE / "tests", tests)
    result = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout


@pytest.mark.slow
def test_train_predict_tune_and_zoo_export_with_the_third_party_backbone_and_head(example_plugin, old_torch, tmp_path):
    """Backbone and head are chosen only by name in the config; training tunes the head's two
    thresholds, and no code in denoiseg_core or denoiseg_zoo names either."""
    from denoiseg_core.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_train=4, n_labelled=2, n_val=2, n_test=1, shape=(64, 64))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {"train": str(data["train"]), "validation": str(data["val"]), "patch_size": [32, 32]},
                "model": {
                    "backbone": {"name": "tiny_resnet", "params": {"width": 8, "blocks": 2}},
                    "head": {"name": "distance_map"},
                },
                "training": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu"},
            }
        )
    )
    trained = _run(DENOISEG, "train", config_file, "--no-progress")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    run_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_config["plugins"][DISTRIBUTION] == "0.1.0"
    assert "tuned instance settings: probability_threshold" in trained.stdout
    model = load_checkpoint(tmp_path / "run", registry=Registry.from_plugin_manager(get_plugin_manager()))
    assert set(model.tuned_settings.model_dump()) == {"probability_threshold", "seed_threshold"}

    predicted = _run(DENOISEG, "predict", tmp_path / "run", data["test_images"], "--out", tmp_path / "pred", "--probabilities")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.tif")) == [
        "test_000_denoised.tif", "test_000_labels.tif", "test_000_probabilities.tif"
    ]
    # --threshold sets the head's primary threshold: a higher one finds no more foreground
    strict = _run(DENOISEG, "predict", tmp_path / "run", data["test_images"], "--out", tmp_path / "strict", "--threshold", "0.95")
    assert strict.returncode == 0 and "probability_threshold 0.95" in strict.stdout + strict.stderr, strict.stderr[-2000:]
    import tifffile

    assert (tifffile.imread(tmp_path / "strict" / "test_000_labels.tif") > 0).sum() <= (
        tifffile.imread(tmp_path / "pred" / "test_000_labels.tif") > 0
    ).sum()

    package = tmp_path / "model.zip"
    sample = next(data["test_images"].glob("*.tif"))
    exported = _run(DENOISEG, "zoo", "export", tmp_path / "run", "--out", package, "--sample", sample)
    # `zoo export` runs bioimageio.core's test on every weight format before it reports success.
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
    assert package.is_file() and "tested" in exported.stdout
    check_head_package(package, model.head, "distance_map", model.instance_settings)
    # its TorchScript runs in PyTorch 1.13 (deepImageJ, ilastik) and its ONNX in onnxruntime, agreeing with torch 2.x
    check_package_runtimes(package, tmp_path / "runtimes")


def test_uninstalled_plugin_error_names_the_distribution(example_plugin, fresh_registry, tmp_path):
    """Runs last in this module: it uninstalls the distribution."""
    if not _installed():
        pytest.skip("the example plugin is not installed")
    config = _tiny_resnet_config(tmp_path)
    # What a run records: the distributions its components came from.
    config.plugins = plugin_versions(
        fresh_registry, [("backbone", "tiny_resnet"), ("masking", "n2v"), ("head", "three_class")]
    )
    config_file = tmp_path / "run_config.yaml"
    save_config(config, config_file)
    assert yaml.safe_load(config_file.read_text())["plugins"][DISTRIBUTION] == "0.1.0"

    _pip("uninstall", "--yes", "--quiet", DISTRIBUTION)
    result = _run(DENOISEG, "train", config_file, "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: backbone 'tiny_resnet' is not installed: it comes from distribution "
        f"'{DISTRIBUTION}' (pip install {DISTRIBUTION}==0.1.0)"
    ]
    listed = _run(DENOISEG, "plugins", "list", "--json")
    assert "tiny_resnet" not in {r["name"] for r in json.loads(listed.stdout)}

    # Without the record the error still lists what is installed.
    config.plugins = {}
    save_config(config, config_file)
    result = _run(DENOISEG, "train", config_file, "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown backbone 'tiny_resnet'; installed backbone components:")


# --------------------------------------------------------------------------- the error itself (no install)


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        (
            {"denoiseg": "0.1.0", "no-such-dist-4f2a": "1.2"},
            "^backbone 'gone' is not installed: it comes from distribution 'no-such-dist-4f2a'"
            r" \(pip install no-such-dist-4f2a==1.2\)$",
        ),
        (
            {"no-such-dist-4f2a": "unknown"},
            r"^backbone 'gone' is not installed: it comes from distribution 'no-such-dist-4f2a'"
            r" \(pip install no-such-dist-4f2a\)$",
        ),
        (
            {"no-such-dist-4f2a": "1", "no-such-dist-9c1b": "2"},
            "^backbone 'gone' is not installed: it comes from one of the distributions 'no-such-dist-4f2a',"
            " 'no-such-dist-9c1b', which are not installed",
        ),
        ({"denoiseg": "0.1.0"}, "^unknown backbone 'gone'; installed backbone components: .*unet"),
    ],
)
def test_missing_component_error_uses_the_recorded_distributions(registry, plugins, message):
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "gone"}}, "plugins": plugins})
    with pytest.raises(ConfigError, match=message) as info:
        validate_components(config, registry)
    assert "\n" not in str(info.value)
