"""The ``n2v2_unet`` backbone: the N2V2 U-Net (blur-pool down-sampling, no top skip connection)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from denoiseg_core.components import ArchitectureSource, BackboneSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins import n2v2_unet_arch
from denoiseg_plugins.unet import UNetParams, unet_architecture_kwargs
from denoiseg_plugins.unet_arch import unet_halo


class N2V2UNetParams(UNetParams):
    """Parameters of the ``n2v2_unet`` backbone (the same as the ``unet``'s)."""


def build_n2v2_unet(params: N2V2UNetParams, *, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """The N2V2 U-Net for ``ndim``-D images with the given channel counts."""
    return n2v2_unet_arch.N2V2UNet(**unet_architecture_kwargs(params, ndim, in_channels, out_channels))


def n2v2_unet_halo(params: N2V2UNetParams) -> int:
    """The U-Net's halo plus the wider reach of max-blur-pooling.

    At level ``i`` the 2-wide max-pool and the 3-tap blur each reach one more level-``i``
    pixel (``2**i`` full-resolution pixels) than plain 2x max-pooling.
    """
    return unet_halo(params.depth, params.kernel_size) + 2 * (2**params.depth - 1)


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name="n2v2_unet",
            params=N2V2UNetParams,
            build=build_n2v2_unet,
            size_divisor=lambda p: 2**p.depth,
            halo=n2v2_unet_halo,
            description="N2V2 U-Net (2D/3D): max-blur-pool down-sampling, no top-level skip (less checkerboard)",
            architecture=ArchitectureSource(
                file=Path(n2v2_unet_arch.__file__),
                callable_name="N2V2UNet",
                kwargs=unet_architecture_kwargs,
            ),
        )
    ]
