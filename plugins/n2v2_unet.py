"""The ``n2v2_unet`` backbone: the N2V2 U-Net (blur-pool down-sampling, no top skip connection)."""

from __future__ import annotations

from denoiseg_core.components import BackboneSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.unet import UNetParams, unet_family_backbone


class N2V2UNetParams(UNetParams):
    """Parameters of the ``n2v2_unet`` backbone (the same as the ``unet``'s)."""


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        unet_family_backbone(
            "n2v2_unet",
            N2V2UNetParams,
            "N2V2 U-Net (2D/3D): max-blur-pool down-sampling, no top-level skip (less checkerboard)",
            lambda p: {"pooling": "max_blur", "top_skip": False},
        )
    ]
