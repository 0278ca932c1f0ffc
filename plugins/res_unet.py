"""The ``res_unet`` backbone: a U-Net whose levels are residual blocks."""

from __future__ import annotations

from denoiseg_core.components import BackboneSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.unet import UNetParams, unet_family_backbone


class ResUNetParams(UNetParams):
    """Parameters of the ``res_unet`` backbone (the same as the ``unet``'s)."""


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        unet_family_backbone(
            "res_unet",
            ResUNetParams,
            "residual U-Net (2D/3D): residual blocks with 1x1 shortcuts, max-pooling, skip concatenation",
            lambda p: {"block": "residual"},
        )
    ]
