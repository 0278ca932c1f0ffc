"""What makes a network exportable as a bioimage.io model, in one place: the exporter
(``denoiseg zoo export``) writes its weights with these functions, and the conformance kit
(:func:`denoiseg_core.testing.check_backbone_export`,
:func:`~denoiseg_core.testing.check_architecture_source`) calls the same ones, so a backbone
that passes the kit passes the export.

* Architecture source: one Python file importing only torch and the standard library
  (:func:`check_self_contained`), from which a consumer rebuilds the network
  (:func:`build_from_source`) and loads its ``pytorch_state_dict`` weights strictly.
* TorchScript: the plain inference network, scripted (traced where scripting fails or
  serialises operators old runtimes lack). deepImageJ's engines wrap libtorch 1.7.1 to
  2.0 and ilastik's tiktorch similar builds; those read TorchScript archives up to
  file-format version :data:`MAX_TORCHSCRIPT_FILE_VERSION` and know only long-standing
  operators, so both are checked on the serialised code (what an old runtime parses).
* ONNX: one self-contained file (no external data) at opset :data:`ONNX_OPSET` and IR
  version <= :data:`MAX_ONNX_IR_VERSION`, checked with ``onnx.checker``.
* PyTorch state dict: the network's weights under the keys of the generated architecture.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import io
import re
import sys
import uuid
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from denoiseg_core.errors import DenoiSegError

#: modules an architecture source may import (a bioimage.io consumer has nothing else)
ARCHITECTURE_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch"}

#: ONNX opset written and the newest accepted: ONNX Runtime 1.13, the newest deepImageJ
#: (JDLL) runs, implements opset 17.
ONNX_OPSET = 17
MAX_ONNX_OPSET = 17
#: newest ONNX IR version ONNX Runtime 1.13 reads
MAX_ONNX_IR_VERSION = 8
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
        "aten::upsample_bicubic2d", "aten::_convolution", "aten::floor", "aten::ceil", "aten::__range_length",
        "aten::__derive_index",
        # reshaping and reductions, all in PyTorch since 1.0
        "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::transpose", "aten::select", "aten::narrow",
        "aten::clone", "aten::numel", "aten::mean", "aten::sum", "aten::max", "aten::min", "aten::exp", "aten::log",
        "aten::sqrt", "aten::abs", "aten::pow", "aten::where", "aten::matmul", "aten::linear", "aten::relu6",
        "aten::hardtanh", "aten::prelu", "aten::log_softmax", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d",
        "aten::adaptive_avg_pool3d", "aten::device", "aten::dtype", "aten::__contains__", "aten::_unwrap_optional",
        "aten::str",
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
    """An inference copy of ``net``: on the CPU, in eval mode, without gradients and without dropout
    modules (the identity at inference; a scripted one would still put a dropout call in the file)."""
    net = copy.deepcopy(net).cpu().eval()
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            parent, _, attribute = name.rpartition(".")
            setattr(net.get_submodule(parent), attribute, nn.Identity())
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


#: an operator call in TorchScript's serialised code: ``torch.NAME(`` (aten) or ``ops.NS.NAME(``
_OP_CALL = re.compile(r"(?<![\w.])(?:torch|ops\.(\w+))\.(\w+)\(")
_MANGLE = re.compile(r"___torch_mangle_\d+")
_DEFINITION = re.compile(r"^(class|def) (\w+)")
_REFERENCE = re.compile(r"__torch__\.([\w.]+)")


@dataclass(frozen=True)
class SerialisedOp:
    """An operator call found in a TorchScript archive's code and where it is."""

    op: str  #: e.g. ``aten::upsample_nearest2d``
    where: str  #: the class or function whose code calls it, e.g. ``torch.nn.functional.interpolate``


def _plain_name(name: str) -> str:
    """``__torch__.torch.nn.functional.___torch_mangle_16.interpolate`` -> ``torch.nn.functional.interpolate``."""
    return ".".join(part for part in name.removeprefix("__torch__.").split(".") if not _MANGLE.fullmatch(part))


def serialised_torchscript_code(data: bytes) -> dict[str, str]:
    """Each top-level class or function of a TorchScript archive's code, by plain qualified name.

    This is the code an old runtime parses when it loads the file: every branch of every
    scripted function is in it, also those the network never executes.
    """
    definitions: dict[str, str] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if "code" not in parts or not member.endswith(".py"):
                continue
            module = ".".join(parts[parts.index("code") + 1 :])[: -len(".py")]
            current, lines = None, []
            for line in archive.read(member).decode("utf-8").splitlines() + ["class _end"]:
                match = _DEFINITION.match(line)
                if match:
                    if current is not None:
                        definitions[current] = definitions.get(current, "") + "\n".join(lines) + "\n"
                    current, lines = _plain_name(f"{module}.{match.group(2)}"), []
                lines.append(line)
    return definitions


def serialised_torchscript_ops(data: bytes) -> list[SerialisedOp]:
    """Every operator call in a TorchScript archive's code (``prim::`` interpreter built-ins left out)."""
    found: set[SerialisedOp] = set()
    for where, code in serialised_torchscript_code(data).items():
        for namespace, name in _OP_CALL.findall(code):
            namespace = namespace or "aten"
            if namespace != "prim":
                found.add(SerialisedOp(op=f"{namespace}::{name}", where=where))
    return sorted(found, key=lambda o: (o.op, o.where))


def _network_paths(module: torch.jit.ScriptModule, data: bytes, where: str) -> list[str]:
    """The attribute paths of the network's submodules whose code reaches ``where`` (a class or function)."""
    code = serialised_torchscript_code(data)
    callers = {where}
    while True:  # every class or function that (transitively) refers to `where`
        more = {name for name, text in code.items() if {_plain_name(r) for r in _REFERENCE.findall(text)} & callers}
        if more <= callers:
            break
        callers |= more
    paths = []
    for path, submodule in module.named_modules():
        if _plain_name(submodule._c._type().qualified_name()) in callers:
            paths.append(path or "(top level)")
    return paths


def old_runtime_problems(module: torch.jit.ScriptModule, data: bytes) -> list[str]:
    """One description per operator in the archive that old runtimes may not have (empty if none)."""
    problems = []
    for found in serialised_torchscript_ops(data):
        if found.op in LONG_STANDING_TORCHSCRIPT_OPS:
            continue
        paths = [p for p in _network_paths(module, data, found.where) if p != "(top level)"]
        reached = f" (module {', '.join(repr(p) for p in paths[:3])})" if paths else ""
        problems.append(f"{found.op} in {found.where}{reached}")
    return problems


def _serialise(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__


def _trace(net: nn.Module, example: torch.Tensor, other_size: torch.Tensor) -> torch.jit.ScriptModule:
    """A trace of ``net`` that must compute the same as ``net`` on a second input size too
    (a trace that baked a size into its graph would fail there or differ)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        module = torch.jit.trace(net, example, check_trace=False)
    with torch.inference_mode():
        expected, actual = net(other_size), module(other_size)
    if expected.shape != actual.shape or not torch.allclose(expected, actual, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the trace computes something else at input size {tuple(other_size.shape)}")
    return module


def export_torchscript(
    net: nn.Module, example: torch.Tensor, backbone_name: str, step: int = 1
) -> tuple[bytes, str]:
    """Serialised TorchScript of ``net`` and how it was made ("scripted" or "traced").

    Scripting keeps shape-dependent logic but serialises every branch of the code it
    compiles. Where scripting fails, or serialises operators old runtimes (libtorch 1.13,
    deepImageJ) lack, the network is traced instead (only the operators it executes), and
    the trace is checked on an input ``step`` pixels larger per spatial axis. Either
    result is refused unless its code uses only :data:`LONG_STANDING_TORCHSCRIPT_OPS` and
    its file-format version is one libtorch 1.13 reads; the error names the operator and
    the module.
    """
    net = _plain_copy(net)
    other_size = torch.nn.functional.pad(example, [0, step] * (example.ndim - 2), mode="replicate")
    attempts: list[str] = []
    candidates: list[tuple[str, bytes, list[str]]] = []
    for how in ("scripted", "traced"):
        try:
            module = torch.jit.script(net) if how == "scripted" else _trace(net, example, other_size)
        except Exception as exc:
            attempts.append(f"{'scripting' if how == 'scripted' else 'tracing'} failed ({_first_line(exc)})")
            continue
        data = _serialise(module)
        problems = old_runtime_problems(module, data)
        if not problems:
            _check_file_version(data, backbone_name)
            return data, how
        candidates.append((how, data, problems))
    if not candidates:
        raise DenoiSegError(
            f"backbone {backbone_name!r} cannot be exported to TorchScript: {' and '.join(attempts)}"
        )
    how, _, problems = candidates[-1]  # the trace's problems where it worked: they are what the network executes
    raise DenoiSegError(
        f"backbone {backbone_name!r}: its TorchScript ({how}) uses operators that old runtimes "
        f"(libtorch 1.13, deepImageJ, ilastik) may not have: {'; '.join(problems)}"
    )


def _check_file_version(data: bytes, backbone_name: str) -> None:
    version = torchscript_file_version(data)
    if version > MAX_TORCHSCRIPT_FILE_VERSION:
        raise DenoiSegError(
            f"backbone {backbone_name!r}: TorchScript file-format version {version} is newer than libtorch 1.13 "
            f"reads ({MAX_TORCHSCRIPT_FILE_VERSION}); an operator with a newer schema is used"
        )


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
    """One-line error unless ``data`` is a valid, self-contained ONNX model that ONNX Runtime
    1.13 (deepImageJ) reads: opset <= :data:`MAX_ONNX_OPSET`, IR version <= :data:`MAX_ONNX_IR_VERSION`."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise DenoiSegError(f"{what}: exported ONNX model is invalid ({str(exc).splitlines()[0]})") from None
    opsets = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not opsets or max(opsets) > MAX_ONNX_OPSET:
        raise DenoiSegError(
            f"{what}: ONNX opset {max(opsets, default=None)} is newer than {MAX_ONNX_OPSET} (ONNX Runtime 1.13, deepImageJ)"
        )
    others = sorted({entry.domain for entry in model.opset_import if entry.domain not in ("", "ai.onnx")})
    if others:
        raise DenoiSegError(f"{what}: ONNX model uses operators outside the standard domain ({', '.join(others)})")
    if model.ir_version > MAX_ONNX_IR_VERSION:
        raise DenoiSegError(
            f"{what}: ONNX IR version {model.ir_version} is newer than {MAX_ONNX_IR_VERSION} (ONNX Runtime 1.13, deepImageJ)"
        )
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


# --------------------------------------------------------------------------- architecture source


def foreign_imports(source: str) -> list[str]:
    """The top-level modules (or relative imports) that Python ``source`` imports beyond
    :data:`ARCHITECTURE_IMPORTS`, anywhere in the file."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                modules.add("." * node.level + (node.module or ""))
            elif node.module:
                modules.add(node.module.split(".")[0])
    return sorted(modules - ARCHITECTURE_IMPORTS)


def check_self_contained(path: Path, backbone_name: str) -> None:
    """One-line error unless the architecture file at ``path`` imports only torch and the standard library."""
    foreign = foreign_imports(Path(path).read_text(encoding="utf-8"))
    if foreign:
        raise DenoiSegError(
            f"backbone {backbone_name!r}: architecture file {Path(path).name} is not self-contained "
            f"(it imports {', '.join(foreign)}; a bioimage.io consumer has only torch and the standard library)"
        )


def build_from_source(path: Path, callable_name: str, kwargs: dict) -> nn.Module:
    """Import ``callable_name`` from the source file at ``path`` (as a bioimage.io consumer would) and call it."""
    module_name = f"_denoiseg_architecture_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DenoiSegError("cannot import the architecture source", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and typing resolve names through sys.modules
    try:
        spec.loader.exec_module(module)
        return getattr(module, callable_name)(**kwargs)
    except Exception as exc:
        raise DenoiSegError(f"the architecture source does not build the network ({type(exc).__name__}: {exc})", path) from None
    finally:
        sys.modules.pop(module_name, None)


def check_architecture_rebuilds(
    path: Path,
    callable_name: str,
    kwargs: dict,
    state_dict: dict[str, torch.Tensor],
    reference: nn.Module,
    example: torch.Tensor,
    backbone_name: str,
) -> None:
    """What a ``pytorch_state_dict`` consumer does must give the trained network: the source at
    ``path`` rebuilt from ``kwargs`` alone loads ``state_dict`` strictly and computes what
    ``reference`` (eval mode) computes on ``example``; else a one-line error."""
    rebuilt = build_from_source(path, callable_name, kwargs)
    try:
        rebuilt.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise DenoiSegError(
            f"backbone {backbone_name!r}: the weights do not fit {callable_name} of its architecture source "
            f"({str(exc).strip().splitlines()[0]})"
        ) from None
    rebuilt.eval()
    with torch.inference_mode():
        expected, actual = reference(example), rebuilt(example)
    if expected.shape != actual.shape or not torch.allclose(expected, actual, rtol=1e-4, atol=1e-5):
        raise DenoiSegError(
            f"backbone {backbone_name!r}: the network rebuilt from its architecture source computes "
            "something else than the trained network"
        )
