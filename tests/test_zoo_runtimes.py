"""bioimage.io packages in the runtimes Fiji and ilastik really use.

* TorchScript of every built-in backbone and head, 2D and 3D, a third-party backbone and a
  network with ``nn.Upsample`` loads and agrees in an old PyTorch (1.13, see
  ``old_runtime.py``), and export refuses operators old runtimes lack, naming them;
* packages of the demo's architecture (2D) and of a 3D model pass bioimageio.core's test for
  every weight format, their TorchScript agrees in PyTorch 1.13 and their ONNX in onnxruntime;
* bioimageio.core's own command line (``bioimageio predict``) gives what ``denoiseg zoo
  predict`` gives;
* the packaged ImageJ macro labels a 3D model output in real ImageJ like ``denoiseg predict``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from torch import nn

from denoiseg_core import exportability
from denoiseg_core.checkpoint import load_checkpoint, save_checkpoint
from denoiseg_core.cli.demo import DEMO_OVERRIDES
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.exportability import build_from_source
from denoiseg_core.model import InferenceNet, build_model
from denoiseg_core.evaluation import segment
from denoiseg_core.prediction import predict_image
from denoiseg_core.synthetic import make_nuclei_image
from denoiseg_zoo.export import ExportOptions, export_package, geometry_for

from old_runtime import assert_agrees, check_package_runtimes, old_torch, package_member, run_in_old_torch  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("onnx", "pytorch_state_dict", "torchscript")
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- TorchScript of every network


class _UpsamplingNet(nn.Module):
    """What a third-party backbone often looks like: ``nn.Upsample``, whose scripted
    ``F.interpolate`` holds operators libtorch 1.13 lacks (export traces it instead)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.output = nn.Conv2d(8, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.upsample(self.pool(torch.relu(self.conv(x)))))


def _randomised(net: nn.Module) -> nn.Module:
    """Batch-norm statistics away from 0/1, so untrained networks give varied outputs."""
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return net.eval()


BUILTIN_CASES = [(b, h, n) for b in ("unet", "n2v2_unet", "res_unet") for h in ("three_class", "two_class") for n in (2, 3)]


@pytest.fixture(scope="module")
def exported_torchscripts(tmp_path_factory, old_torch):
    """Every case's TorchScript from ``export_torchscript``, its input and its output in this torch
    and in the old runtime (one old-runtime process for all)."""
    torch.manual_seed(0)
    cases: dict[str, tuple[bytes, np.ndarray, np.ndarray, str]] = {}

    def add(name: str, net: nn.Module, spatial: tuple[int, ...], step: int) -> None:
        batch = torch.randn(2, 1, *spatial)
        data, how = exportability.export_torchscript(net, batch[:1], name, step=step)
        cases[name] = (data, batch.numpy(), exportability.run_torchscript(data, batch.numpy()), how)

    for backbone, head, ndim in BUILTIN_CASES:
        config = DenoiSegConfig.model_validate(
            {"model": {"backbone": {"name": backbone, "params": {"depth": 2, "first_filters": 8}}, "head": {"name": head}}}
        )
        built = build_model(config, ndim=ndim, in_channels=1)
        spatial = (12, 20, 24) if ndim == 3 else (36, 44)  # not multiples of 8: any valid size works
        add(f"{backbone}-{head}-{ndim}d", _randomised(InferenceNet(built.net, built.head)), spatial, built.size_divisor)
    example_arch = REPO / "plugins" / "example_plugin" / "denoiseg_example_plugin" / "tiny_resnet_arch.py"
    for ndim in (2, 3):
        tiny = build_from_source(example_arch, "TinyResNet", {"ndim": ndim, "in_channels": 1, "out_channels": 4, "width": 8, "blocks": 2})
        add(f"tiny_resnet-{ndim}d", tiny.eval(), (10, 22, 18) if ndim == 3 else (30, 26), 1)
    add("upsampling", _UpsamplingNet(1, 4).eval(), (32, 40), 2)

    old = run_in_old_torch({name: (data, batch) for name, (data, batch, _, _) in cases.items()}, tmp_path_factory.mktemp("old"))
    return {name: {"how": how, "current": current, "old": old[name], "data": data} for name, (data, _, current, how) in cases.items()}


@pytest.mark.parametrize("case", [f"{b}-{h}-{n}d" for b, h, n in BUILTIN_CASES] + ["tiny_resnet-2d", "tiny_resnet-3d", "upsampling"])
def test_torchscript_runs_and_agrees_in_old_pytorch(exported_torchscripts, case, old_torch):
    result = exported_torchscripts[case]
    assert old_torch.startswith("1.13"), old_torch  # what .ci/run installs (Debian's python3-torch)
    assert_agrees(result["old"], result["current"], f"{case} in torch {old_torch}")
    assert np.ptp(result["current"]) > 1e-3  # a non-trivial comparison
    # scripted where that serialises only long-standing operators, traced otherwise
    assert result["how"] == ("traced" if case == "upsampling" else "scripted")
    ops = {found.op for found in exportability.serialised_torchscript_ops(result["data"])}
    assert ops <= exportability.LONG_STANDING_TORCHSCRIPT_OPS


class _AntialiasedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        return self.conv(nn.functional.interpolate(half, scale_factor=2.0, mode="nearest"))


class _WithAntialiasedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _AntialiasedNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_export_refuses_operators_old_runtimes_lack_and_names_them():
    with pytest.raises(DenoiSegError) as error:
        exportability.export_torchscript(_WithAntialiasedBlock(), torch.randn(1, 1, 16, 16), "antialiased", step=2)
    message = str(error.value)
    assert "\n" not in message and message.startswith("backbone 'antialiased'")
    # the operator the network executes, where it is called and the module that calls it
    assert "aten::_upsample_bilinear2d_aa in" in message and "_AntialiasedNet (module 'block')" in message


def test_scripted_interpolate_is_reported_with_the_module():
    """The problem the issue reports: nn.Upsample's scripted code names ops 1.13 lacks."""
    scripted = torch.jit.script(_UpsamplingNet(1, 4))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    problems = exportability.old_runtime_problems(scripted, buffer.getvalue())
    assert "aten::_upsample_lanczos2d_aa in torch.nn.functional.interpolate (module 'upsample')" in problems


def test_onnx_export_refuses_opsets_newer_than_onnx_runtime_1_13():
    net = _UpsamplingNet(1, 4).eval()
    example = torch.randn(1, 1, 16, 16)
    data = exportability.export_onnx(net, example, "upsampling")
    import onnx

    proto = onnx.load_from_string(data)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17] and proto.ir_version <= 8
    np.testing.assert_allclose(exportability.run_onnx(data, example.numpy()), net(example).detach().numpy(), atol=1e-5)
    with pytest.raises(DenoiSegError, match=r"^upsampling: ONNX opset 18 is newer than 17 \(ONNX Runtime 1.13"):
        exportability.export_onnx(net, example, "upsampling", opset=18)


# --------------------------------------------------------------------------- whole packages


def _train_checkpoint(path: Path, backbone_params: dict, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    """A U-Net fitted for a few Adam steps to 4 synthetic images (both loss terms) with a tuned
    threshold; returns the images."""
    torch.manual_seed(0)
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "unet", "params": backbone_params}}})
    built = build_model(config, ndim=len(shape), in_channels=1)
    rng = np.random.default_rng(0)
    images, labels = zip(*[(noisy, lab) for _, noisy, lab in (make_nuclei_image(shape, rng) for _ in range(4))])
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
    # the foreground threshold with the best AP@0.5 on these images (as training tunes it on validation data)
    with torch.inference_mode():
        probabilities = InferenceNet(built.net, built.head)(inputs)[:, 1:].numpy()
    settings = built.head.tune(list(probabilities), list(labels)).settings
    save_checkpoint(path, config=config, built=built, normalization=Normalization([mean], [std]), instance_settings=settings, epoch=1)
    return list(images)


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    """A package of the demo's network (``denoiseg demo``'s U-Net), briefly trained on 2D images."""
    folder = tmp_path_factory.mktemp("demo_zoo")
    images = _train_checkpoint(folder / "demo.pt", DEMO_OVERRIDES["model"]["backbone"]["params"], (64, 64), steps=30)
    sample = folder / "sample.tif"
    tifffile.imwrite(sample, images[0])
    package = folder / "demo.zip"
    # exported the way a user does it: `denoiseg zoo export` (it runs bioimageio.core's test on
    # every weight format and writes the package only if all pass)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(BIN / "denoiseg"), "zoo", "export", str(folder / "demo.pt"), "--out", str(package),
         "--name", "DenoiSeg demo network", "--sample", str(sample)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "package written and tested (torchscript scripted, onnx, pytorch_state_dict)" in result.stdout
    return {"folder": folder, "checkpoint": folder / "demo.pt", "package": package, "result": None}


@pytest.fixture(scope="module")
def package_3d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo3d")
    images = _train_checkpoint(folder / "model3d.pt", {"depth": 2, "first_filters": 8}, (16, 48, 48), steps=40)
    sample = folder / "sample3d.tif"
    tifffile.imwrite(sample, images[0])
    package = folder / "model3d.zip"
    result = export_package(folder / "model3d.pt", package, ExportOptions(name="DenoiSeg test model 3D", samples=[sample]))
    return {"folder": folder, "checkpoint": folder / "model3d.pt", "package": package, "result": result}


def _passed_every_format(summary) -> None:
    assert summary.status == "passed"
    by_name = {d.name: d.status for d in summary.details}
    for fmt in FORMATS:
        assert by_name[f"Reproduce test outputs from test inputs ({fmt})"] == "passed"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["demo_package", "package_3d"])
def test_package_runs_in_old_pytorch_and_onnxruntime(which, request, old_torch, tmp_path):
    exported = request.getfixturevalue(which)
    if exported["result"] is not None:  # (the CLI export checked this itself)
        _passed_every_format(exported["result"].summary)
    outputs = check_package_runtimes(exported["package"], tmp_path)
    probabilities = outputs["old_torchscript"][:, 1:]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    ndim = load_checkpoint(exported["checkpoint"]).ndim
    assert outputs["torchscript"].ndim == ndim + 2


# --------------------------------------------------------------------------- bioimageio.core's command line


@pytest.mark.slow
def test_bioimageio_cli_predict_agrees_with_zoo_predict(demo_package, tmp_path):
    model = load_checkpoint(demo_package["checkpoint"])
    geometry = geometry_for(model)
    # a valid size for the package (min + n * step) so bioimageio predicts it whole
    shape = (geometry.min_size + 2 * geometry.step, geometry.min_size + 5 * geometry.step)
    _, image, _ = make_nuclei_image(shape, np.random.default_rng(21))
    path = tmp_path / "cell.tif"
    tifffile.imwrite(path, image)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    theirs_path = tmp_path / "bioimageio_output.tif"
    result = subprocess.run(
        [str(BIN / "bioimageio"), "predict", str(demo_package["package"]), "--inputs", str(path),
         "--outputs", str(tmp_path / "bioimageio_{output_id}.tif"), "--weight-format", "torchscript"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0 and theirs_path.is_file(), result.stdout[-2000:] + result.stderr[-3000:]
    theirs = tifffile.imread(theirs_path)
    assert theirs.shape == (1, 4, *shape)

    ours_dir = tmp_path / "ours"
    result = subprocess.run(
        [str(BIN / "denoiseg"), "zoo", "predict", str(demo_package["package"]), str(path), "--out", str(ours_dir)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    denoised = tifffile.imread(ours_dir / "cell_denoised.tif")
    probabilities = tifffile.imread(ours_dir / "cell_probabilities.tif")
    labels = tifffile.imread(ours_dir / "cell_labels.tif")
    assert_agrees(np.concatenate([denoised[None], probabilities])[None], theirs, "denoiseg zoo predict vs bioimageio predict")
    np.testing.assert_array_equal(labels, model.head.instances(theirs[0, 1:], model.instance_settings))
    assert labels.max() >= 3


# --------------------------------------------------------------------------- ImageJ, 3D

IMAGEJ_JAR = Path(os.environ.get("DENOISEG_IMAGEJ_JAR", "/usr/share/java/ij.jar"))
WRAPPER_MACRO = 'args = split(getArgument(), "|");\nopen(args[0]);\nrunMacro(args[1]);\nsaveAs("Tiff", args[2]);\n'


def _imagej_missing() -> str | None:
    if not IMAGEJ_JAR.is_file():
        return f"ImageJ not installed ({IMAGEJ_JAR} missing; apt-get install imagej xvfb xauth)"
    for tool in ("java", "xvfb-run"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install imagej xvfb xauth)"
    return None


@pytest.fixture(scope="module")
def imagej() -> Path:
    reason = _imagej_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"ImageJ required in CI: {reason}")
        pytest.skip(reason)
    return IMAGEJ_JAR


@pytest.mark.slow
def test_packaged_imagej_macro_labels_a_3d_output(package_3d, imagej, tmp_path):
    model = load_checkpoint(package_3d["checkpoint"])
    _, volume, _ = make_nuclei_image((20, 72, 64), np.random.default_rng(12), n_objects=16)
    prediction = predict_image(model, volume[None])
    output = np.concatenate([prediction.denoised, prediction.probabilities]).astype(np.float32)  # C, Z, Y, X
    output_path = tmp_path / "output3d.tif"
    tifffile.imwrite(output_path, output.transpose(1, 0, 2, 3), imagej=True, metadata={"axes": "ZCYX"})
    macro = tmp_path / "denoiseg_instances.ijm"
    macro.write_bytes(package_member(package_3d["package"], "denoiseg_instances.ijm"))
    rdf = yaml.safe_load(package_member(package_3d["package"], "rdf.yaml"))
    assert rdf["config"]["deepimagej"]["prediction"]["postprocess"][0]["kwargs"] == "denoiseg_instances.ijm"
    wrapper = tmp_path / "run.ijm"
    wrapper.write_text(WRAPPER_MACRO)
    labels_path = tmp_path / "labels3d.tif"
    result = subprocess.run(
        ["xvfb-run", "-a", "java", "-jar", str(imagej), "-batch", str(wrapper), f"{output_path}|{macro}|{labels_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert labels_path.is_file(), result.stdout + result.stderr
    imagej_labels = np.rint(tifffile.imread(labels_path)).astype(np.int64)
    ours = segment(model, prediction)
    assert imagej_labels.shape == ours.shape == volume.shape
    assert ours.max() >= 3  # a non-trivial comparison
    assert imagej_labels.max() == ours.max()
    # the components (same numbering) are identical; of the border voxels grown into them only
    # those equally near two instances may differ (the macro takes the smaller label)
    foreground = prediction.probabilities[1] > model.instance_settings.threshold
    np.testing.assert_array_equal(imagej_labels[foreground], ours[foreground])
    assert (imagej_labels == ours).mean() >= 0.999
