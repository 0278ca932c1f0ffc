"""Export a small trained model as a bioimage.io package and use it the way consumers do.

One module-scoped export (a depth-2, 8-filter U-Net trained for a few steps on synthetic
nuclei) is shared by the tests: bioimageio.core's test on every weight format, re-opening
with bioimageio.spec, ONNX/TorchScript agreement, tiled ``zoo predict``, the round trip
back to a checkpoint, corrupted packages, and the ImageJ macro in real ImageJ.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from denoiseg_core import exportability
from denoiseg_core.checkpoint import load_checkpoint, read_checkpoint_state, save_checkpoint
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.exportability import build_from_source
from denoiseg_core.metrics import average_precision
from denoiseg_core.model import build_model
from denoiseg_core.evaluation import segment
from denoiseg_core.prediction import predict_image
from denoiseg_core.synthetic import make_nuclei_image
from denoiseg_core.testing import parametrize_components
from denoiseg_zoo.export import ExportOptions, export_package, geometry_for
from denoiseg_zoo.importing import checkpoint_state_from_package

from cli_helpers import run_cli, tree
from head_packages import check_head_package

FORMATS = ("onnx", "pytorch_state_dict", "torchscript")


def train_tiny_checkpoint(path: Path, steps: int = 40) -> dict:
    """A depth-2 U-Net fitted for a few Adam steps to 4 synthetic 64x64 images (both loss terms)."""
    torch.manual_seed(0)
    config = DenoiSegConfig.model_validate(
        {"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}}}
    )
    built = build_model(config, ndim=2, in_channels=1)
    rng = np.random.default_rng(0)
    images, labels = zip(*[(noisy, lab) for _, noisy, lab in (make_nuclei_image((64, 64), rng) for _ in range(4))])
    x = np.stack(images)[:, None]
    mean, std = float(x.mean()), float(x.std())
    inputs = torch.from_numpy((x - mean) / std)
    targets = torch.from_numpy(np.stack([built.head.targets(lab) for lab in labels]))
    optimizer = torch.optim.Adam(built.net.parameters(), 3e-3)
    built.net.train()
    for _ in range(steps):
        denoised, logits = built.net.split(built.net(inputs))
        loss = ((denoised - inputs) ** 2).mean() + built.head.loss(logits, targets, torch.ones(len(x), dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    built.net.eval()
    save_checkpoint(
        path, config=config, built=built, normalization=Normalization([mean], [std]), instance_settings=built.head.settings(threshold=0.45), epoch=3,
        extra={"validation": {"ap50": 0.61, "n_images": 2}},
    )
    return {"images": images, "labels": labels}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    checkpoint = folder / "model.pt"
    data = train_tiny_checkpoint(checkpoint)
    sample, mask = folder / "sample.tif", folder / "mask.tif"
    tifffile.imwrite(sample, data["images"][0])
    tifffile.imwrite(mask, data["labels"][0].astype(np.uint16))
    package = folder / "model.zip"
    result = export_package(
        checkpoint, package, ExportOptions(name="DenoiSeg test model", authors=["Test Author"], tags=["test"],
                                           samples=[sample], masks=[mask]),
    )
    return {"folder": folder, "checkpoint": checkpoint, "package": package, "result": result, "sample": sample}


def _member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def _rdf(package: Path) -> dict:
    return yaml.safe_load(_member(package, "rdf.yaml"))


# --------------------------------------------------------------------------- the package


def test_every_weight_format_passes_bioimageio_test_model(exported):
    summary = exported["result"].summary
    assert summary.status == "passed"
    by_name = {d.name: d.status for d in summary.details}
    for fmt in FORMATS:
        assert by_name[f"Reproduce test outputs from test inputs ({fmt})"] == "passed"
        # parametrised sizes min + n * step for n = 0, 1, 2 at batch sizes 1 and 2
        runs = [n for n in by_name if n.startswith(f"Run {fmt} inference")]
        assert len(runs) == 6 and all(by_name[n] == "passed" for n in runs)
    assert exported["package"].is_file()
    assert not list(exported["folder"].glob(".*partial*"))


def test_package_reopens_with_bioimageio_spec(exported):
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    descr = load_model_description(exported["package"])
    assert isinstance(descr, v0_5.ModelDescr)
    model = load_checkpoint(exported["checkpoint"])
    geometry = geometry_for(model)
    assert len(descr.inputs) == 1 and len(descr.outputs) == 1
    (inp,), (out,) = descr.inputs, descr.outputs
    assert [a.type for a in inp.axes] == ["batch", "channel", "space", "space"]
    assert [str(a.id) for a in inp.axes][2:] == ["y", "x"]
    for axis in inp.axes[2:]:
        assert (axis.size.min, axis.size.step) == (geometry.min_size, model.built.size_divisor)
    assert geometry.halo >= model.built.halo and geometry.halo % model.built.size_divisor == 0
    assert [str(a.id) for a in out.axes][2:] == ["y", "x"] and all(a.halo == geometry.halo for a in out.axes[2:])
    assert list(out.axes[1].channel_names) == ["denoised", "background", "foreground", "border"]

    normalise = [p for p in inp.preprocessing if p.id == "fixed_zero_mean_unit_variance"]
    assert len(normalise) == 1
    assert normalise[0].kwargs.mean == pytest.approx(model.normalization.mean[0])
    assert normalise[0].kwargs.std == pytest.approx(model.normalization.std[0])
    scale = [p for p in out.postprocessing if p.id == "scale_linear"][0]
    assert scale.kwargs.gain == pytest.approx([model.normalization.std[0], 1, 1, 1])
    assert scale.kwargs.offset == pytest.approx([model.normalization.mean[0], 0, 0, 0])

    assert set(descr.weights.available_formats) == set(FORMATS)
    assert descr.weights.onnx.opset_version <= 17 and descr.weights.onnx.external_data is None
    assert descr.weights.pytorch_state_dict.architecture.callable == "DenoiSegInferenceModel"
    assert {str(c.doi) for c in descr.cite} == {"10.1007/978-3-030-66415-2_21", "10.1109/CVPR.2019.00223"}
    assert [a.name for a in descr.authors] == ["Test Author"] and "test" in descr.tags and str(descr.license) == "CC-BY-4.0"
    assert descr.covers

    rdf = _rdf(exported["package"])
    section = rdf["config"]["denoiseg"]
    assert section["instance_settings"] == {"threshold": pytest.approx(0.45)} and section["head"]["name"] == "three_class"
    assert rdf["config"]["deepimagej"]["allow_tiling"] is True
    postprocess = rdf["config"]["deepimagej"]["prediction"]["postprocess"]
    assert postprocess == [{"spec": "ij.IJ::runMacroFile", "kwargs": "denoiseg_instances.ijm"}]
    attachments = {Path(a["source"]).name for a in rdf["attachments"]}
    assert attachments == {"training_config.yaml", "denoiseg_instances.ijm"}
    macro = _member(exported["package"], "denoiseg_instances.ijm").decode()
    assert "threshold = 0.45;" in macro
    training_config = yaml.safe_load(_member(exported["package"], "training_config.yaml"))
    assert DenoiSegConfig.model_validate(training_config) == model.config

    readme = _member(exported["package"], rdf["documentation"]["source"]).decode()
    assert "# Validation" in readme and "Fiji" in readme and "ilastik" in readme
    assert "0.61" in readme  # the checkpoint's own validation AP
    assert "Export samples with the given masks" in readme


def _normalised_input(model, shape, seed=1) -> np.ndarray:
    _, noisy, _ = make_nuclei_image(shape, np.random.default_rng(seed))
    return ((noisy - model.normalization.mean[0]) / model.normalization.std[0])[None, None].astype(np.float32)


def test_onnx_and_torchscript_agree_with_pytorch(exported):
    model = load_checkpoint(exported["checkpoint"])
    geometry = geometry_for(model)
    size = geometry.min_size + 3 * geometry.step  # not the size used while exporting
    batch = np.concatenate([_normalised_input(model, (size, size), seed) for seed in (1, 2)])
    with torch.inference_mode():
        expected = model.inference_net()(torch.from_numpy(batch)).numpy()
    torchscript = _member(exported["package"], "weights_torchscript.pt")
    onnx = _member(exported["package"], "weights.onnx")
    np.testing.assert_allclose(exportability.run_torchscript(torchscript, batch), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exportability.run_onnx(onnx, batch), expected, rtol=1e-4, atol=1e-5)
    # probabilities come out of the network (softmax inside: deepImageJ has none)
    np.testing.assert_allclose(expected[:, 1:].sum(axis=1), 1.0, atol=1e-5)


def test_weights_suit_old_runtimes(exported):
    import onnx

    torchscript = _member(exported["package"], "weights_torchscript.pt")
    assert exportability.torchscript_file_version(torchscript) <= exportability.MAX_TORCHSCRIPT_FILE_VERSION
    module = torch.jit.load(io.BytesIO(torchscript))
    assert exportability.torchscript_op_kinds(module) <= exportability.LONG_STANDING_TORCHSCRIPT_OPS
    assert "aten::dropout" not in exportability.torchscript_op_kinds(module)  # trained with dropout, exported without
    # the serialised code (what an old runtime parses, every branch included) as well
    assert {o.op for o in exportability.serialised_torchscript_ops(torchscript)} <= exportability.LONG_STANDING_TORCHSCRIPT_OPS
    assert exportability.old_runtime_problems(module, torchscript) == []
    proto = onnx.load_from_string(_member(exported["package"], "weights.onnx"))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 17


def test_architecture_source_rebuilds_the_network(exported, tmp_path):
    rdf = _rdf(exported["package"])
    entry = rdf["weights"]["pytorch_state_dict"]
    source = tmp_path / "architecture.py"
    source.write_bytes(_member(exported["package"], entry["architecture"]["source"]))
    assert "denoiseg" not in [line.split()[1] for line in source.read_text().splitlines() if line.startswith("import ")]
    network = build_from_source(source, entry["architecture"]["callable"], entry["architecture"]["kwargs"])
    network.load_state_dict(torch.load(io.BytesIO(_member(exported["package"], entry["source"])), weights_only=True))
    network.eval()
    model = load_checkpoint(exported["checkpoint"])
    # trained with the default dropout; the package's network, for inference, has none
    assert any(isinstance(m, torch.nn.Dropout) for m in model.inference_net().modules())
    assert entry["architecture"]["kwargs"]["backbone_kwargs"]["dropout"] == 0.0
    assert not any(isinstance(m, torch.nn.Dropout) for m in network.modules())
    batch = _normalised_input(model, (64, 64))
    with torch.inference_mode():
        np.testing.assert_allclose(network(torch.from_numpy(batch)).numpy(),
                                   model.inference_net()(torch.from_numpy(batch)).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- using the package


def test_zoo_test_command_prints_the_summary(exported, capsys):
    code, out, _ = run_cli(["zoo", "test", exported["package"]], capsys)
    assert code == 0
    assert out.startswith("status: passed") and "Reproduce test outputs from test inputs (torchscript)" in out


def test_zoo_predict_tiled_equals_direct_prediction(exported, tmp_path, capsys):
    model = load_checkpoint(exported["checkpoint"])
    geometry = geometry_for(model)
    _, image, _ = make_nuclei_image((150, 170), np.random.default_rng(7))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image)
    tile = geometry.min_size + 6 * geometry.step  # several tiles per axis
    code, out, err = run_cli(["zoo", "predict", exported["package"], path, "--out", tmp_path / "pred", "--tile", tile], capsys)
    assert code == 0, err
    denoised = tifffile.imread(tmp_path / "pred" / "big_denoised.tif")
    probabilities = tifffile.imread(tmp_path / "pred" / "big_probabilities.tif")
    labels = tifffile.imread(tmp_path / "pred" / "big_labels.tif")

    direct = predict_image(model, image[None])  # whole image at once
    h = geometry.halo
    inner = (slice(h, -h), slice(h, -h))
    np.testing.assert_allclose(denoised[inner], direct.denoised[0][inner], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(probabilities[(slice(None), *inner)], direct.probabilities[(slice(None), *inner)], atol=1e-5)
    # labels: the package's threshold and the head's post-processing on the package output
    expected = model.head.instances(probabilities, model.instance_settings)  # tuned 0.45
    np.testing.assert_array_equal(labels, expected)
    assert average_precision(segment(model, direct), labels) >= 0.9


def test_round_trip_export_import_predict(exported, tmp_path, capsys):
    target = tmp_path / "imported.pt"
    code, out, err = run_cli(["zoo", "import", exported["package"], "--out", target], capsys)
    assert code == 0, err
    original, imported = load_checkpoint(exported["checkpoint"]), load_checkpoint(target)
    assert imported.config == original.config and imported.tuned_settings == original.tuned_settings
    assert imported.normalization.mean == pytest.approx(original.normalization.mean)
    image = tifffile.imread(exported["sample"])[None]
    a, b = predict_image(original, image), predict_image(imported, image)
    np.testing.assert_array_equal(a.denoised, b.denoised)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    # the dictionary `denoiseg train --init-from MODEL.zip` uses has the checkpoint layout
    state = checkpoint_state_from_package(exported["package"])
    assert set(state) == set(read_checkpoint_state(exported["checkpoint"]))
    # never over an existing file
    code, _, err = run_cli(["zoo", "import", exported["package"], "--out", target], capsys)
    assert code == 2 and "output exists" in err


def test_export_refuses_to_overwrite_and_checks_options(exported, tmp_path):
    with pytest.raises(DenoiSegError, match="output exists"):
        export_package(exported["checkpoint"], exported["package"])
    with pytest.raises(DenoiSegError, match="must end in .zip"):
        export_package(exported["checkpoint"], tmp_path / "model.tar")
    with pytest.raises(DenoiSegError, match="--license"):
        export_package(exported["checkpoint"], tmp_path / "m.zip", license="no-such-license")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- corrupted packages


def _rewrite(package: Path, target: Path, *, drop: str | None = None, change: str | None = None, add: str | None = None) -> Path:
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as out:
        for item in source.infolist():
            if item.filename == drop:
                continue
            data = source.read(item.filename)
            if item.filename == change:
                data = data[:-8] + bytes(8)
            out.writestr(item.filename, data)
        if add:
            out.writestr(add, b"outside")
    return target


@pytest.mark.parametrize(
    "corruption, message",
    [
        ({"drop": "weights.onnx"}, "'weights.onnx' named in rdf.yaml is missing"),
        ({"change": "weights.pt"}, "sha256"),
        ({"change": "test_output.npy"}, "sha256"),
        ({"add": "../escaped.txt"}, "escape the target folder"),
    ],
)
def test_corrupted_package_gives_one_line_error_and_writes_nothing(exported, tmp_path, capsys, corruption, message):
    package = _rewrite(exported["package"], tmp_path / "broken.zip", **corruption)
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, tifffile.imread(exported["sample"]))
    before = tree(tmp_path)
    for args in (
        ["zoo", "predict", package, image, "--out", tmp_path / "out"],
        ["zoo", "import", package, "--out", tmp_path / "out" / "model.pt"],
    ):
        code, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert message in lines[0].lower() and "broken.zip" in lines[0]
        assert tree(tmp_path) == before
    assert not (tmp_path.parent / "escaped.txt").exists()


# --------------------------------------------------------------------------- plugin backbones

_SHAPE_BAKING_SOURCE = '''
import torch
from torch import nn


class ShapeBakingNet(nn.Module):
    """Cannot be scripted (*args); its trace bakes in the input size (int() of a shape)."""

    def __init__(self, ndim, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x, *unused):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        y = self.conv(x)[..., ::2, ::2]
        return nn.functional.interpolate(y, size=(h, w), mode="nearest")
'''


def test_export_refuses_a_backbone_whose_trace_bakes_in_the_size(tmp_path, registry):
    """A backbone TorchScript can only trace with a fixed size: export checks the trace on
    a second size and refuses it (its package would fail the parametrised-size test), and
    nothing is written at --out."""
    from denoiseg_core.components import ArchitectureSource, BackboneSpec, NoParams, RegisteredComponent
    from denoiseg_core.plugin_manager import Registry

    source = tmp_path / "shape_baking.py"
    source.write_text(_SHAPE_BAKING_SOURCE)
    kwargs = lambda params, ndim, in_channels, out_channels: {  # noqa: E731
        "ndim": ndim, "in_channels": in_channels, "out_channels": out_channels}
    spec = BackboneSpec(
        name="shape_baking",
        params=NoParams,
        build=lambda params, ndim, in_channels, out_channels: build_from_source(
            source, "ShapeBakingNet", kwargs(params, ndim, in_channels, out_channels)),
        size_divisor=lambda p: 2,
        halo=lambda p: 4,
        architecture=ArchitectureSource(file=source, callable_name="ShapeBakingNet", kwargs=kwargs),
    )
    custom = Registry([*registry.components(), RegisteredComponent(spec=spec, plugin="tests")])
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "shape_baking"}}})
    built = build_model(config, ndim=2, in_channels=1, registry=custom)
    checkpoint = tmp_path / "shape.pt"
    save_checkpoint(checkpoint, config=config, built=built, normalization=Normalization([0.0], [1.0]))
    out = tmp_path / "out" / "shape.zip"
    with pytest.raises(DenoiSegError) as error:
        export_package(checkpoint, out, registry=custom)
    message = str(error.value)
    assert "cannot be exported to TorchScript" in message and "computes something else at input size" in message
    assert "\n" not in message
    assert not out.parent.exists() or not list(out.parent.iterdir())


# --------------------------------------------------------------------------- ImageJ

IMAGEJ_JAR = Path(os.environ.get("DENOISEG_IMAGEJ_JAR", "/usr/share/java/ij.jar"))
WRAPPER_MACRO = 'args = split(getArgument(), "|");\nopen(args[0]);\nrunMacro(args[1]);\nsaveAs("Tiff", args[2]);\n'


def _imagej_missing() -> str | None:
    if not IMAGEJ_JAR.is_file():
        return f"ImageJ not installed ({IMAGEJ_JAR} missing; apt-get install imagej xvfb xauth)"
    for tool in ("java", "xvfb-run"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install imagej xvfb xauth)"
    return None


@pytest.mark.skipif(
    _imagej_missing() is not None and os.environ.get("CI", "").lower() != "true", reason=str(_imagej_missing())
)
def test_packaged_imagej_macro_gives_denoiseg_labels(exported, tmp_path):
    assert _imagej_missing() is None, f"ImageJ required in CI: {_imagej_missing()}"
    model = load_checkpoint(exported["checkpoint"])
    _, image, _ = make_nuclei_image((160, 192), np.random.default_rng(11), n_objects=40)
    prediction = predict_image(model, image[None])
    output = np.concatenate([prediction.denoised, prediction.probabilities]).astype(np.float32)
    output_path = tmp_path / "output.tif"
    tifffile.imwrite(output_path, output, imagej=True, metadata={"axes": "CYX"})
    macro = tmp_path / "denoiseg_instances.ijm"
    macro.write_bytes(_member(exported["package"], "denoiseg_instances.ijm"))
    wrapper = tmp_path / "run.ijm"
    wrapper.write_text(WRAPPER_MACRO)
    labels_path = tmp_path / "labels_imagej.tif"
    result = subprocess.run(
        ["xvfb-run", "-a", "java", "-jar", str(IMAGEJ_JAR), "-batch", str(wrapper), f"{output_path}|{macro}|{labels_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert labels_path.is_file(), result.stdout + result.stderr
    imagej = np.rint(tifffile.imread(labels_path)).astype(np.int64)
    ours = segment(model, prediction)
    assert ours.max() >= 5  # a non-trivial comparison
    assert average_precision(ours, imagej) >= 0.95
    assert (imagej == ours).mean() >= 0.99


def test_zoo_predict_runs_a_package_not_made_by_denoiseg(exported, tmp_path, capsys):
    """Any bioimage.io model with one input: its outputs are written as they are."""
    rdf = _rdf(exported["package"])
    del rdf["config"]["denoiseg"]
    package = tmp_path / "generic.zip"
    with zipfile.ZipFile(exported["package"]) as source, zipfile.ZipFile(package, "w") as out:
        for item in source.infolist():
            data = yaml.safe_dump(rdf).encode() if item.filename == "rdf.yaml" else source.read(item.filename)
            out.writestr(item.filename, data)
    image = tifffile.imread(exported["sample"])
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image)
    code, _, err = run_cli(["zoo", "predict", package, path, "--out", tmp_path / "pred"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["img_output.tif"]
    output = tifffile.imread(tmp_path / "pred" / "img_output.tif")
    assert output.shape == (4, *image.shape)
    # with no denoiseg section the result is still the network's output (same as the denoiseg path)
    direct = predict_image(load_checkpoint(exported["checkpoint"]), image[None])
    h = geometry_for(load_checkpoint(exported["checkpoint"])).halo
    np.testing.assert_allclose(output[1:, h:-h, h:-h], direct.probabilities[:, h:-h, h:-h], atol=1e-5)


@parametrize_components("head")
def test_every_registered_head_exports_a_tested_package(component, tmp_path):
    """The exporter only assembles what backbone and head describe: each head's channels,
    instance settings and macro (if any) land in a package that passes bioimageio.core's test."""
    torch.manual_seed(0)
    config = DenoiSegConfig.model_validate(
        {"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 4}}, "head": {"name": component.name}}}
    )
    built = build_model(config, ndim=2, in_channels=1)
    checkpoint = tmp_path / "model.pt"
    settings = built.head.settings().with_threshold(0.4)
    save_checkpoint(checkpoint, config=config, built=built, normalization=Normalization([100.0], [30.0]), instance_settings=settings)
    package = tmp_path / "model.zip"
    assert export_package(checkpoint, package).summary.status == "passed"
    rdf = check_head_package(package, built.head, component.name, settings)
    assert "unet" in rdf["tags"]  # from the backbone's spec


@pytest.mark.slow
def test_3d_model_exports_and_passes_bioimageio_test(tmp_path):
    from bioimageio.spec import load_model_description

    torch.manual_seed(0)
    config = DenoiSegConfig.model_validate(
        {"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 4}}}}
    )
    built = build_model(config, ndim=3, in_channels=1)
    checkpoint = tmp_path / "model3d.pt"
    save_checkpoint(checkpoint, config=config, built=built, normalization=Normalization([100.0], [30.0]), instance_settings=built.head.settings(threshold=0.5))
    package = tmp_path / "model3d.zip"
    result = export_package(checkpoint, package)
    assert result.summary.status == "passed"
    descr = load_model_description(package)
    assert [str(a.id) for a in descr.inputs[0].axes] == ["batch", "channel", "z", "y", "x"]
    assert all(a.halo == geometry_for(load_checkpoint(checkpoint)).halo for a in descr.outputs[0].axes[2:])
