"""Package safety checks and export refusals that need no exported package (fast)."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from denoiseg_core.components import NoParams
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.exportability import build_from_source
from denoiseg_core.model import InferenceNet, build_model
from denoiseg_core.plugin_manager import Registry
from denoiseg_zoo.architecture import architecture_export
from denoiseg_zoo.archive import PackageError, check_package_zip, load_package, unsafe_member

from cli_helpers import run_cli, tree


@pytest.mark.parametrize(
    "name, unsafe",
    [
        ("rdf.yaml", False),
        ("weights/a.pt", False),
        ("../evil.txt", True),
        ("a/../../evil.txt", True),
        ("/etc/passwd", True),
        ("C:/evil.txt", True),
        ("a\\..\\evil.txt", True),
        ("", True),
    ],
)
def test_unsafe_member_paths(name, unsafe):
    assert unsafe_member(name) is unsafe


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not a zip at all"), "not a zip file"),
        (lambda p: _zip(p, {"notes.txt": b"hello"}), "not a bioimage.io model package"),
        (lambda p: _zip(p, {"rdf.yaml": b"type: model\n", "../escape.txt": b"x"}), "escape the target folder"),
        (lambda p: _zip(p, {"rdf.yaml": b"type: model\n", "/abs.txt": b"x"}), "escape the target folder"),
        (lambda p: _zip(p, {"rdf.yaml": b"format_version: 0.5.12\ntype: model\nname: broken\n"}), "invalid bioimage.io package"),
    ],
)
def test_bad_packages_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "model.zip"
    make(path)
    with pytest.raises(PackageError) as error:
        load_package(path)
    text = str(error.value)
    assert message in text and "\n" not in text and str(path) in text


def test_missing_package(tmp_path):
    with pytest.raises(PackageError, match="package not found"):
        check_package_zip(tmp_path / "nope.zip")


@pytest.mark.parametrize("command", ["predict", "import", "test"])
def test_cli_refuses_zip_slip_and_writes_nothing(tmp_path, capsys, command):
    package = _zip(tmp_path / "evil.zip", {"rdf.yaml": b"type: model\n", "../../outside.txt": b"pwned"})
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.float32))
    before = tree(tmp_path)
    args = {
        "predict": ["zoo", "predict", package, image, "--out", tmp_path / "out"],
        "import": ["zoo", "import", package, "--out", tmp_path / "out" / "model.pt"],
        "test": ["zoo", "test", package],
    }[command]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "escape the target folder" in lines[0] and "evil.zip" in lines[0]
    assert tree(tmp_path) == before
    assert not (tmp_path.parent / "outside.txt").exists()


# --------------------------------------------------------------------------- plugin backbones


class _PlainNet(nn.Module):
    def __init__(self, ndim: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _registry_with(spec, registry: Registry) -> Registry:
    from denoiseg_core.components import RegisteredComponent

    return Registry([*registry.components(), RegisteredComponent(spec=spec, plugin="tests")])


def test_backbone_without_architecture_cannot_be_exported(registry):
    from denoiseg_core.components import BackboneSpec

    spec = BackboneSpec(
        name="no_architecture",
        params=NoParams,
        build=lambda params, ndim, in_channels, out_channels: _PlainNet(ndim, in_channels, out_channels),
        size_divisor=lambda p: 1,
        halo=lambda p: 1,
    )
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "no_architecture"}}})
    built = build_model(config, ndim=2, in_channels=1, registry=_registry_with(spec, registry))
    with pytest.raises(DenoiSegError, match="does not declare its architecture source"):
        architecture_export(built)
    # the built-in U-Net does declare one, and the wrapper keeps denoiseg's state-dict keys
    unet = build_model(DenoiSegConfig(), ndim=2, in_channels=1, registry=registry)
    exported = architecture_export(replace(unet))
    assert "class DenoiSegInferenceModel" in exported.source
    assert exported.kwargs["denoised_channels"] == 1


def test_architecture_applies_the_activation_the_head_describes(registry, tmp_path):
    """The exporter knows no head: it writes the head's described activation code, which must
    rebuild the network denoiseg runs (here the two_class head's softmax)."""
    config = DenoiSegConfig.model_validate(
        {"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 4}}, "head": {"name": "two_class"}}}
    )
    built = build_model(config, ndim=2, in_channels=1, registry=registry)
    exported = architecture_export(built)
    assert built.head.outputs().activation_code in exported.source
    source = tmp_path / "architecture.py"
    source.write_text(exported.source)
    rebuilt = build_from_source(source, exported.callable_name, exported.kwargs)
    rebuilt.load_state_dict(built.net.state_dict())
    x = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(x), InferenceNet(built.net, built.head).eval()(x))


def test_the_exporter_names_no_backbone_or_head(registry):
    """zoo/ only assembles what the specs describe: no registered backbone's or head's name
    (nor the U-Net) is written into its code."""
    zoo = Path(__file__).resolve().parents[1] / "zoo"
    sources = {path.name: path.read_text(encoding="utf-8").lower() for path in zoo.glob("*.py")}
    names = {c.name for kind in ("backbone", "head") for c in registry.components(kind)} | {"u-net"}
    assert {"three_class", "two_class", "unet"} <= names
    assert [(file, name) for file, text in sources.items() for name in names if name in text] == []
    assert not list(zoo.glob("*.ijm"))  # the three_class head carries its own macro
