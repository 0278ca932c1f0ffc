"""The self-contained architecture source shipped with ``pytorch_state_dict`` weights.

A bioimage.io consumer rebuilds the network from one Python file. The exported network
is denoiseg's inference network (backbone, then the head's activation on the
segmentation channels), so the file is the backbone plugin's own architecture source
(``BackboneSpec.architecture.file``, which imports only torch) with a small wrapper class
appended that applies the head's activation as the head describes it
(``HeadOutputs.activation_code``, a torch expression). The wrapper keeps the backbone as its
``backbone`` attribute, so its state dict has exactly the keys of denoiseg's ``DenoiSegNet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from denoiseg_core.errors import DenoiSegError
from denoiseg_core.exportability import check_self_contained
from denoiseg_core.model import BuiltModel

#: name of the wrapper class appended to the backbone's architecture source
WRAPPER_CALLABLE = "DenoiSegInferenceModel"

_WRAPPER_TEMPLATE = '''

# ---------------------------------------------------------------------------------------
# Appended by `denoiseg zoo export`: the exported DenoiSeg inference network.
import torch


class {wrapper}(torch.nn.Module):
    """The ``{backbone}`` backbone; its first ``denoised_channels`` output channels are the
    denoised image (normalised intensities), the rest the logits of the ``{head}`` head,
    to which the head's activation is applied."""

    def __init__(self, denoised_channels: int, backbone_kwargs: dict):
        super().__init__()
        self.denoised_channels = int(denoised_channels)
        self.backbone = {callable}(**backbone_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        segmentation = out[:, self.denoised_channels :]
        return torch.cat([out[:, : self.denoised_channels], {activation_code}], dim=1)
'''


@dataclass(frozen=True)
class ArchitectureExport:
    """The generated architecture source and how to call it."""

    source: str
    callable_name: str
    kwargs: dict


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
    source = path.read_text(encoding="utf-8").rstrip() + "\n" + _WRAPPER_TEMPLATE.format(
        wrapper=WRAPPER_CALLABLE,
        backbone=spec.name,
        head=built.head_spec.name,
        callable=arch.callable_name,
        activation_code=built.head.outputs().activation_code,
    )
    return ArchitectureExport(
        source=source,
        callable_name=WRAPPER_CALLABLE,
        kwargs={"denoised_channels": built.in_channels, "backbone_kwargs": backbone_kwargs},
    )
