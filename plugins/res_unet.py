"""The ``res_unet`` backbone: a U-Net whose levels are residual blocks."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from denoiseg_core.components import ArchitectureSource, BackboneSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins import res_unet_arch
from denoiseg_plugins.unet import UNetParams, unet_architecture_kwargs
from denoiseg_plugins.unet_arch import unet_halo


class ResUNetParams(UNetParams):
    """Parameters of the ``res_unet`` backbone (the same as the ``unet``'s)."""


def build_res_unet(params: ResUNetParams, *, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """The residual U-Net for ``ndim``-D images with the given channel counts."""
    return res_unet_arch.ResUNet(**unet_architecture_kwargs(params, ndim, in_channels, out_channels))


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name="res_unet",
            params=ResUNetParams,
            build=build_res_unet,
            size_divisor=lambda p: 2**p.depth,
            # Two k x k convolutions per level like the U-Net (1x1 shortcuts reach no further).
            halo=lambda p: unet_halo(p.depth, p.kernel_size),
            description="residual U-Net (2D/3D): residual blocks with 1x1 shortcuts, max-pooling, skip concatenation",
            architecture=ArchitectureSource(
                file=Path(res_unet_arch.__file__),
                callable_name="ResUNet",
                kwargs=unet_architecture_kwargs,
            ),
        )
    ]
