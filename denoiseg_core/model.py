"""The DenoiSeg network: one backbone whose output channels are split into the denoised
image and the segmentation head's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from denoiseg_core.components import BackboneSpec, ComponentParams, HeadSpec, MaskingSpec, SegmentationHead
from denoiseg_core.config import DenoiSegConfig, validate_components
from denoiseg_core.plugin_manager import Registry, get_registry


class DenoiSegNet(nn.Module):
    """``forward(x)`` returns raw outputs ``(N, in_channels + num_classes, *spatial)``:
    first the denoised channels (normalised intensity), then the segmentation logits."""

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``output`` -> (denoised, segmentation logits)."""
        return output[:, : self.in_channels], output[:, self.in_channels :]


class InferenceNet(nn.Module):
    """The plain inference network (what is exported): raw input in, normalised-denoised
    channels and segmentation probabilities out, concatenated on the channel axis.

    Normalisation stays outside (bioimage.io pre/postprocessing); the head's activation
    (softmax for the 3-class head) is inside because deepImageJ has no softmax op.
    This is also what ``denoiseg predict`` runs.
    """

    def __init__(self, net: DenoiSegNet, head: SegmentationHead):
        super().__init__()
        self.net = net
        self.in_channels = net.in_channels
        self.activation = head.activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 before the activation: under bf16 autocast probabilities must still sum to 1.
        out = self.net(x).float()
        denoised = out[:, : self.in_channels]
        probs = self.activation(out[:, self.in_channels :])
        return torch.cat([denoised, probs], dim=1)


@dataclass
class BuiltModel:
    """A network plus the validated components it was built from."""

    net: DenoiSegNet
    head: SegmentationHead
    masking: object
    backbone_spec: BackboneSpec
    backbone_params: ComponentParams
    head_spec: HeadSpec
    masking_spec: MaskingSpec
    ndim: int
    in_channels: int

    @property
    def size_divisor(self) -> int:
        return int(self.backbone_spec.size_divisor(self.backbone_params))

    @property
    def halo(self) -> int:
        return int(self.backbone_spec.halo(self.backbone_params))


def build_model(config: DenoiSegConfig, ndim: int, in_channels: int, registry: Registry | None = None) -> BuiltModel:
    """Build the network and components named in ``config`` for ``ndim``-D images with ``in_channels`` channels."""
    registry = registry or get_registry()
    params = validate_components(config, registry)
    backbone_spec: BackboneSpec = registry.spec("backbone", config.model.backbone.name)
    masking_spec: MaskingSpec = registry.spec("masking", config.model.masking.name)
    head_spec: HeadSpec = registry.spec("head", config.model.head.name)
    if ndim not in backbone_spec.supported_ndims:
        from denoiseg_core.errors import ConfigError

        raise ConfigError(
            f"backbone {backbone_spec.name!r} supports {backbone_spec.supported_ndims}-D images, not {ndim}-D"
        )
    head = head_spec.build(params["head"])
    masking = masking_spec.build(params["masking"])
    backbone = backbone_spec.build(
        params["backbone"], ndim=ndim, in_channels=in_channels, out_channels=in_channels + head.num_classes
    )
    return BuiltModel(
        net=DenoiSegNet(backbone, in_channels, head.num_classes),
        head=head,
        masking=masking,
        backbone_spec=backbone_spec,
        backbone_params=params["backbone"],
        head_spec=head_spec,
        masking_spec=masking_spec,
        ndim=ndim,
        in_channels=in_channels,
    )
