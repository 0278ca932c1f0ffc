"""The self-contained architecture source shipped with ``pytorch_state_dict`` weights.

A bioimage.io consumer rebuilds the network from one Python file. The exported network
is denoiseg's inference network (backbone, then the head's activation on the
segmentation channels), so the file is the backbone plugin's own architecture source
(``BackboneSpec.architecture.file``, which imports only torch) with a small wrapper class
appended. The wrapper keeps the backbone as its ``backbone`` attribute, so its state dict
has exactly the keys of denoiseg's ``DenoiSegNet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from denoiseg_core.errors import DenoiSegError
from denoiseg_core.exportability import check_self_contained
from denoiseg_core.model import BuiltModel

#: name of the wrapper class appended to the backbone's architecture source
WRAPPER_CALLABLE = "DenoiSegInferenceModel"

#: how each supported head activation is written in the generated source
_ACTIVATION_CODE = {
    "softmax": "_denoiseg_torch.softmax(segmentation, dim=1)",
    "sigmoid": "_denoiseg_torch.sigmoid(segmentation)",
    "identity": "segmentation",
}

_WRAPPER_TEMPLATE = '''

# ---------------------------------------------------------------------------------------
# Appended by `denoiseg zoo export`: the exported DenoiSeg inference network.
import torch as _denoiseg_torch


class {wrapper}(_denoiseg_torch.nn.Module):
    """The ``{backbone}`` backbone; its first ``denoised_channels`` output channels are the
    denoised image (normalised intensities), the rest the segmentation head's channels, to
    which the head's activation ({activation}) is applied."""

    def __init__(self, denoised_channels: int, backbone_kwargs: dict):
        super().__init__()
        self.denoised_channels = int(denoised_channels)
        self.backbone = {callable}(**backbone_kwargs)

    def forward(self, x: _denoiseg_torch.Tensor) -> _denoiseg_torch.Tensor:
        out = self.backbone(x)
        segmentation = out[:, self.denoised_channels :]
        return _denoiseg_torch.cat([out[:, : self.denoised_channels], {activation_code}], dim=1)
'''


@dataclass(frozen=True)
class ArchitectureExport:
    """The generated architecture source and how to call it."""

    source: str
    callable_name: str
    kwargs: dict


def activation_kind(module: nn.Module, head_name: str) -> str:
    """``softmax``/``sigmoid``/``identity`` for a head's activation module, or a one-line error."""
    if isinstance(module, nn.Softmax):
        if module.dim != 1:
            raise DenoiSegError(f"head {head_name!r}: softmax over dim {module.dim} cannot be exported; use dim=1")
        return "softmax"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Identity):
        return "identity"
    raise DenoiSegError(
        f"head {head_name!r}: activation {type(module).__name__} cannot be written into the exported "
        "architecture (supported: Softmax(dim=1), Sigmoid, Identity)"
    )


def architecture_export(built: BuiltModel) -> ArchitectureExport:
    """The wrapper source for a built model; one-line error if its backbone declares none."""
    spec = built.backbone_spec
    arch = spec.architecture
    if arch is None:
        raise DenoiSegError(
            f"backbone {spec.name!r} does not declare its architecture source (BackboneSpec.architecture), "
            "so it cannot be exported as a bioimage.io package"
        )
    path = Path(arch.file)
    if not path.is_file():
        raise DenoiSegError(f"backbone {spec.name!r}: architecture source file not found", path)
    check_self_contained(path, spec.name)
    if not arch.callable_name.isidentifier():
        raise DenoiSegError(f"backbone {spec.name!r}: architecture callable {arch.callable_name!r} is not a Python name")
    out_channels = built.in_channels + built.head.num_classes
    try:
        backbone_kwargs = dict(arch.kwargs(built.backbone_params, built.ndim, built.in_channels, out_channels))
    except Exception as exc:
        raise DenoiSegError(f"backbone {spec.name!r}: architecture kwargs failed ({exc})") from None
    activation = activation_kind(built.head.activation(), built.head_spec.name)
    source = path.read_text(encoding="utf-8").rstrip() + "\n" + _WRAPPER_TEMPLATE.format(
        wrapper=WRAPPER_CALLABLE,
        backbone=spec.name,
        activation=activation,
        callable=arch.callable_name,
        activation_code=_ACTIVATION_CODE[activation],
    )
    return ArchitectureExport(
        source=source,
        callable_name=WRAPPER_CALLABLE,
        kwargs={"denoised_channels": built.in_channels, "backbone_kwargs": backbone_kwargs},
    )
