"""The built-in ``unet`` backbone (plugin registered through the ``denoiseg.plugins`` entry point)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from torch import nn

from denoiseg_core.components import ArchitectureSource, BackboneSpec, ComponentParams
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins import unet_arch


class UNetParams(ComponentParams):
    """Parameters of the ``unet`` backbone (DenoiSeg paper defaults)."""

    depth: int = Field(4, ge=1, le=6, description="number of down-sampling levels; sizes must be multiples of 2**depth")
    first_filters: int = Field(32, ge=1, description="feature channels at full resolution (doubled per level)")
    kernel_size: int = Field(3, ge=1, description="convolution kernel size (odd)")
    batch_norm: bool = Field(True, description="batch normalisation after every convolution")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return value


def unet_architecture_kwargs(params: UNetParams, ndim: int, in_channels: int, out_channels: int) -> dict:
    """Constructor arguments of the U-Net family's architecture classes (shared with
    ``n2v2_unet`` and ``res_unet``, which take the same parameters)."""
    return {
        "ndim": ndim,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "depth": params.depth,
        "first_filters": params.first_filters,
        "kernel_size": params.kernel_size,
        "batch_norm": params.batch_norm,
    }


class PlainUNetParams(UNetParams):
    """Parameters of the ``unet`` backbone: the family's, plus the original network's shape."""

    halve_second_conv: bool = Field(
        False,
        description="the original CSBDeep/DenoiSeg U-Net shape: the second convolution of the bottleneck and decoder "
        "blocks has the channels of the level above (5.50 M instead of 7.85 M parameters at depth 4 / 32 filters)",
    )


def plain_unet_kwargs(params: PlainUNetParams, ndim: int, in_channels: int, out_channels: int) -> dict:
    """Constructor arguments of :class:`unet_arch.UNet`."""
    return {**unet_architecture_kwargs(params, ndim, in_channels, out_channels), "halve_second_conv": params.halve_second_conv}


def build_unet(params: PlainUNetParams, *, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """The U-Net for ``ndim``-D images with the given channel counts."""
    return unet_arch.UNet(**plain_unet_kwargs(params, ndim, in_channels, out_channels))


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name="unet",
            params=PlainUNetParams,
            build=build_unet,
            size_divisor=lambda p: 2**p.depth,
            halo=lambda p: unet_arch.unet_halo(p.depth, p.kernel_size),
            description="U-Net (2D/3D): two convolutions per level, max-pooling, nearest upsampling, skip concatenation",
            architecture=ArchitectureSource(
                file=Path(unet_arch.__file__),
                callable_name="UNet",
                kwargs=plain_unet_kwargs,
            ),
        )
    ]
