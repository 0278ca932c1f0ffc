"""Writing the three weight formats of a package and checking they run in old runtimes.

* TorchScript: the plain inference network, scripted (traced only if scripting fails).
  deepImageJ's engines wrap libtorch 1.13 to 2.0; those read TorchScript archives up to
  file-format version :data:`MAX_TORCHSCRIPT_FILE_VERSION` and know only long-standing
  operators, so both are checked.
* ONNX: one self-contained file (no external data) at opset :data:`ONNX_OPSET`, checked
  with ``onnx.checker``.
* PyTorch state dict: the network's weights under the keys of the generated architecture.
"""

from __future__ import annotations

import copy
import io
import warnings
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from denoiseg_core.errors import DenoiSegError

#: ONNX opset written (<= 18: the newest deepImageJ's ONNX engine takes)
ONNX_OPSET = 17
MAX_ONNX_OPSET = 18
#: newest TorchScript file-format version libtorch 1.13 (and 2.0) can read
MAX_TORCHSCRIPT_FILE_VERSION = 10

#: TorchScript operators a network may use to be loadable by libtorch 1.13: the plain
#: convolutional building blocks plus TorchScript's control-flow and list plumbing.
LONG_STANDING_TORCHSCRIPT_OPS = frozenset(
    {
        "aten::__getitem__", "aten::add", "aten::add_", "aten::append", "aten::avg_pool2d", "aten::avg_pool3d",
        "aten::batch_norm", "aten::cat", "aten::contiguous", "aten::conv1d", "aten::conv2d", "aten::conv3d",
        "aten::conv_transpose2d", "aten::conv_transpose3d", "aten::dim", "aten::dropout", "aten::elu", "aten::eq",
        "aten::floordiv", "aten::ge", "aten::group_norm", "aten::gt", "aten::instance_norm", "aten::layer_norm",
        "aten::le", "aten::leaky_relu", "aten::leaky_relu_", "aten::len", "aten::lt", "aten::max_pool2d",
        "aten::max_pool3d", "aten::mul", "aten::ne", "aten::neg", "aten::pad", "aten::relu", "aten::relu_",
        "aten::remainder", "aten::sigmoid", "aten::size", "aten::slice", "aten::softmax", "aten::stack", "aten::sub",
        "aten::tanh", "aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::upsample_nearest3d",
        "aten::upsample_trilinear3d", "aten::format", "aten::warn", "aten::__is__", "aten::__isnot__", "aten::Int",
        "aten::Bool", "aten::Float", "aten::__not__", "aten::__and__", "aten::__or__", "aten::constant_pad_nd",
        "aten::reflection_pad2d", "aten::replication_pad2d", "aten::reflection_pad3d", "aten::replication_pad3d",
        "aten::view", "aten::reshape", "aten::permute", "aten::clamp", "aten::silu", "aten::gelu", "aten::interpolate",
        "aten::list", "aten::mul_", "aten::div", "aten::to", "aten::upsample_nearest1d", "aten::upsample_linear1d",
        "aten::upsample_bicubic2d", "aten::_convolution", "aten::floor", "aten::ceil", "aten::__range_length", "aten::__derive_index",
    }
)


def torchscript_op_kinds(module: torch.jit.ScriptModule) -> set[str]:
    """Every ``aten::`` operator in a scripted module's inlined graph (nested blocks included)."""
    kinds: set[str] = set()

    def visit(nodes: Iterable[torch._C.Node]) -> None:
        for node in nodes:
            kinds.add(node.kind())
            for block in node.blocks():
                visit(block.nodes())

    visit(module.inlined_graph.nodes())
    return {kind for kind in kinds if kind.startswith("aten::")}


def torchscript_file_version(data: bytes) -> int:
    """The file-format version recorded in a TorchScript archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.split("/", 1)[-1] in (".data/version", "version")]
        if not names:
            raise DenoiSegError("TorchScript archive has no version record")
        return int(archive.read(names[0]).decode().strip())


def _plain_copy(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net).cpu().eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def export_torchscript(net: nn.Module, example: torch.Tensor, backbone_name: str) -> tuple[bytes, str]:
    """Serialised TorchScript of ``net`` and how it was made ("scripted" or "traced").

    Scripting keeps shape-dependent logic; tracing is the fallback for networks TorchScript
    cannot compile and is checked on a second input size.
    """
    net = _plain_copy(net)
    try:
        module = torch.jit.script(net)
        how = "scripted"
    except Exception as script_error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                module = torch.jit.trace(net, example, check_trace=False)
            how = "traced"
        except Exception as trace_error:
            raise DenoiSegError(
                f"backbone {backbone_name!r} cannot be exported to TorchScript: scripting failed "
                f"({type(script_error).__name__}: {str(script_error).splitlines()[0] if str(script_error) else ''}) "
                f"and tracing failed ({type(trace_error).__name__})"
            ) from None
    unknown = torchscript_op_kinds(module) - LONG_STANDING_TORCHSCRIPT_OPS
    if unknown:
        raise DenoiSegError(
            f"backbone {backbone_name!r} uses TorchScript operators that old runtimes (libtorch 1.13, deepImageJ) "
            f"may not know: {', '.join(sorted(unknown))}"
        )
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    data = buffer.getvalue()
    version = torchscript_file_version(data)
    if version > MAX_TORCHSCRIPT_FILE_VERSION:
        raise DenoiSegError(
            f"backbone {backbone_name!r}: TorchScript file-format version {version} is newer than libtorch 1.13 "
            f"reads ({MAX_TORCHSCRIPT_FILE_VERSION}); an operator with a newer schema is used"
        )
    return data, how


def export_onnx(net: nn.Module, example: torch.Tensor, backbone_name: str, opset: int = ONNX_OPSET) -> bytes:
    """A single-file ONNX model of ``net`` with dynamic batch and spatial axes, checked by onnx."""
    net = _plain_copy(net)
    dynamic = {0: "batch", **{axis: f"space{axis - 1}" for axis in range(2, example.ndim)}}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
            torch.onnx.export(
                net,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": dynamic, "output": dynamic},
                do_constant_folding=True,
            )
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DenoiSegError(f"backbone {backbone_name!r} cannot be exported to ONNX ({type(exc).__name__}: {first})") from None
    data = buffer.getvalue()
    check_onnx(data, backbone_name)
    return data


def check_onnx(data: bytes, what: str) -> None:
    """One-line error unless ``data`` is a valid, self-contained ONNX model at opset <= 18."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise DenoiSegError(f"{what}: exported ONNX model is invalid ({str(exc).splitlines()[0]})") from None
    opsets = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not opsets or max(opsets) > MAX_ONNX_OPSET:
        raise DenoiSegError(f"{what}: ONNX opset {opsets} is newer than {MAX_ONNX_OPSET}")
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        raise DenoiSegError(f"{what}: ONNX model refers to external data; it must be one file")


def state_dict_bytes(net: nn.Module) -> bytes:
    """``torch.save`` of the network's state dict (plain tensors only: loadable with weights_only)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, buffer)
    return buffer.getvalue()


def run_torchscript(data: bytes, array: np.ndarray) -> np.ndarray:
    """Run serialised TorchScript on a batch (used by the export's self-check and tests)."""
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))).numpy()


def run_onnx(data: bytes, array: np.ndarray) -> np.ndarray:
    """Run a serialised ONNX model with onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array, dtype=np.float32)})[0]
