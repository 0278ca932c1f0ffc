"""The built-in U-Net backbone: shapes, TorchScript, ONNX, tiling halo, spec wiring."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from denoiseg_core.exportability import export_torchscript
from denoiseg_plugins.unet import PlainUNetParams, UNetParams
from denoiseg_plugins.unet_arch import UNet, unet_halo


def _tiny(ndim: int, depth: int = 2, **kw) -> UNet:
    torch.manual_seed(0)
    return UNet(ndim, in_channels=2, out_channels=5, depth=depth, first_filters=4, **kw).eval()


@pytest.mark.parametrize(("ndim", "shape"), [(2, (24, 32)), (3, (8, 16, 12))])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_output_shape_and_script(ndim, shape, batch_norm):
    net = _tiny(ndim, batch_norm=batch_norm)
    x = torch.randn(3, 2, *shape)
    with torch.no_grad():
        out = net(x)
        scripted = torch.jit.script(net)(x)
    assert out.shape == (3, 5, *shape)
    torch.testing.assert_close(scripted, out)


def test_batch_norm_layers_follow_flag():
    with_bn = _tiny(2, batch_norm=True)
    without = _tiny(2, batch_norm=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())


def test_gradients_reach_every_parameter():
    net = _tiny(2).train()
    net(torch.randn(2, 2, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize(
    "bad",
    [{"ndim": 4}, {"depth": 0}, {"kernel_size": 4}, {"block": "dense"}, {"pooling": "average"},
     {"block": "residual", "halve_second_conv": True}],
)
def test_invalid_arguments(bad):
    kwargs = {"ndim": 2, "in_channels": 1, "out_channels": 1, **bad}
    with pytest.raises(ValueError):
        UNet(**kwargs)


@pytest.mark.parametrize(("depth", "offset"), [(1, 16), (2, 32), (3, 40)])
def test_tiles_match_whole_image_beyond_halo(depth, offset):
    """Inference on a tile equals whole-image inference except within `halo` of the tile edge."""
    net = _tiny(2, depth=depth)
    # Train-mode forward once so batch-norm running statistics are not the identity.
    with torch.no_grad():
        net.train()(torch.randn(4, 2, 64, 64) * 3 + 1)
    net.eval()
    halo = unet_halo(depth, 3)
    size = 2 * halo + 16 - (2 * halo + 16) % 2**depth + 2**depth  # > 2 * halo, multiple of 2**depth
    image = torch.randn(1, 2, offset + size + 48, offset + size + 40)
    with torch.no_grad():
        whole = net(image)
        tile = net(image[..., offset : offset + size, offset : offset + size])
    expected = whole[..., offset : offset + size, offset : offset + size]
    inner = (..., slice(halo, size - halo), slice(halo, size - halo))
    torch.testing.assert_close(tile[inner], expected[inner], atol=1e-5, rtol=0)
    # The halo is not vacuous: zero padding does change the pixels at the tile edge.
    assert (tile[..., 0, :] - expected[..., 0, :]).abs().max() > 1e-4


def test_halo_grows_with_depth_and_kernel():
    assert unet_halo(1, 3) < unet_halo(2, 3) < unet_halo(4, 3) < unet_halo(4, 5)
    assert unet_halo(3, 1) == 2**3 - 1  # 1x1 convolutions: only the pooling shift remains


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnx_export_opset17(tmp_path):
    import onnxruntime

    net = _tiny(2)
    x = torch.randn(1, 2, 32, 32)
    path = tmp_path / "unet.onnx"
    torch.onnx.export(
        net,
        (x,),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "b", 2: "y", 3: "x"}, "output": {0: "b", 2: "y", 3: "x"}},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(2, 2, 48, 64)  # a different size than exported with
    (result,) = session.run(None, {"input": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(result, net(other).numpy(), atol=1e-4)


def test_spec_builds_and_rebuilds_from_architecture(registry):
    spec = registry.spec("backbone", "unet")
    params = PlainUNetParams(depth=2, first_filters=8)
    assert spec.size_divisor(params) == 4
    assert spec.halo(params) == unet_halo(2, 3)
    net = spec.build(params, ndim=3, in_channels=1, out_channels=4)
    assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 4, 8, 8, 8)
    # The export path: the self-contained source file plus kwargs rebuild the same network.
    arch = spec.architecture
    assert arch is not None and arch.file.is_file()
    namespace: dict = {}
    exec(compile(arch.file.read_text(), str(arch.file), "exec"), namespace)
    rebuilt = namespace[arch.callable_name](**arch.kwargs(params, 3, 1, 4))
    rebuilt.load_state_dict(net.state_dict())  # strict: identical parameter names and shapes


def test_source_file_imports_only_torch(registry):
    source = registry.spec("backbone", "unet").architecture.file.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"torch", "typing", "math"}


@pytest.mark.parametrize("bad", [{"depth": 7}, {"depth": 0}, {"kernel_size": 4}, {"first_filters": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"drop_out": 0.1}])
def test_params_reject_invalid(bad):
    with pytest.raises(ValidationError):
        UNetParams(**bad)


def test_params_defaults_are_the_paper_settings():
    """The family's defaults are the paper's network; the ``unet`` backbone's default adds the default
    recipe's dropout (chosen on DSB2018 validation data), so the paper's network is ``dropout=0`` away."""
    assert UNetParams().model_dump() == {"depth": 4, "first_filters": 32, "kernel_size": 3, "batch_norm": True, "dropout": 0.0}
    assert PlainUNetParams().model_dump() == {**UNetParams().model_dump(), "dropout": 0.2, "halve_second_conv": False}
    for params in (UNetParams, PlainUNetParams):
        assert all(field.description for field in params.model_fields.values())


def test_halved_second_convolution_is_the_original_shape(registry):
    """``halve_second_conv``: the CSBDeep/DenoiSeg U-Net's channel counts (5.50 M parameters at depth 4 / 32
    filters, against 7.85 M), same halo, and it passes the same conformance checks as the default shape."""
    from denoiseg_core.testing import check_backbone

    counts = {halve: sum(p.numel() for p in UNet(2, 1, 4, 4, 32, halve_second_conv=halve).parameters())
              for halve in (False, True)}
    assert counts == {False: 7_852_068, True: 5_500_548}
    net = UNet(2, 1, 4, depth=2, first_filters=8, halve_second_conv=True)
    assert net.bottleneck[-3].out_channels == 16 and net.decoders[0][-3].out_channels == 8
    assert net.decoders[-1][-3].out_channels == 8 and net.output.in_channels == 8
    check_backbone("unet", params={"depth": 2, "first_filters": 8, "halve_second_conv": True}, registry=registry)


@pytest.mark.parametrize("backbone", ["unet", "res_unet", "n2v2_unet"])
def test_dropout_acts_while_training_only_and_adds_no_weights(backbone, registry):
    """``dropout``: random while training, the identity in eval mode (the network then equals the same
    weights without dropout), no new state-dict entries, and the backbone stays exportable."""
    from denoiseg_core.testing import check_backbone

    spec = registry.get("backbone", backbone).spec
    params = {"depth": 2, "first_filters": 4}
    torch.manual_seed(0)
    with_dropout = spec.build(spec.params(**params, dropout=0.5), ndim=2, in_channels=2, out_channels=5)
    without = spec.build(spec.params(**params, dropout=0.0), ndim=2, in_channels=2, out_channels=5)
    assert with_dropout.state_dict().keys() == without.state_dict().keys()
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_dropout.eval()(x), without.eval()(x))
        with_dropout.train()
        assert not torch.equal(with_dropout(x), with_dropout(x))
    # off: the scripted network holds no dropout at all; on: the exported TorchScript still does not
    assert "aten::dropout" not in str(torch.jit.script(without).inlined_graph)
    assert "aten::dropout" in str(torch.jit.script(with_dropout).inlined_graph)
    scripted, how = export_torchscript(with_dropout, x, backbone)
    assert how == "scripted"
    assert "aten::dropout" not in str(torch.jit.load(io.BytesIO(scripted)).inlined_graph)
    assert isinstance(with_dropout.dropout, torch.nn.Dropout)  # the export changed a copy only
    # a package rebuilds the network for inference, without dropout
    assert spec.architecture.kwargs(spec.params(**params, dropout=0.5), 2, 2, 5)["dropout"] == 0.0
    check_backbone(backbone, params={**params, "dropout": 0.5}, registry=registry)
    with pytest.raises(ValidationError):
        spec.params(dropout=1.0)
