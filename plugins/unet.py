"""The built-in ``unet`` backbone, and what the U-Net family (``unet``, ``res_unet``, ``n2v2_unet``)
shares: parameters and one architecture, :class:`unet_arch.UNet` (plugins registered through
the ``denoiseg.plugins`` entry point)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field, field_validator
from torch import nn

from denoiseg_core.components import ArchitectureSource, BackboneSpec, ComponentParams
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins import unet_arch


_DROPOUT = (
    "dropout probability on the features of the bottleneck and of the decoder levels below the top, while training "
    "(a regulariser for few labels; off at inference and left out of exported models); 0: none, as the paper"
)


class UNetParams(ComponentParams):
    """Parameters of the U-Net family's backbones (DenoiSeg paper defaults)."""

    depth: int = Field(4, ge=1, le=6, description="number of down-sampling levels; sizes must be multiples of 2**depth")
    first_filters: int = Field(32, ge=1, description="feature channels at full resolution (doubled per level)")
    kernel_size: int = Field(3, ge=1, description="convolution kernel size (odd)")
    batch_norm: bool = Field(True, description="batch normalisation after every convolution")
    dropout: float = Field(0.0, ge=0, lt=1, description=_DROPOUT)

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return value


class PlainUNetParams(UNetParams):
    """Parameters of the ``unet`` backbone: the family's, with the default recipe's dropout, plus the
    original network's shape."""

    dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description=_DROPOUT + ". 0.2 is part of the default recipe, chosen on DSB2018 validation data (n20, 10 "
        "labelled crops, 3 seeds, cpu budget: validation AP@0.5 0.701 against 0.692 without)",
    )
    halve_second_conv: bool = Field(
        False,
        description="the original CSBDeep/DenoiSeg U-Net shape: the second convolution of the bottleneck and decoder "
        "blocks has the channels of the level above (5.50 M instead of 7.85 M parameters at depth 4 / 32 filters)",
    )


def unet_family_backbone(
    name: str, params: type[UNetParams], description: str, options: Callable[[UNetParams], dict]
) -> BackboneSpec:
    """A backbone of the U-Net family: :class:`unet_arch.UNet` built with the family's
    parameters plus the constructor ``options`` (block, pooling, top skip, ...) of the variant;
    its architecture source is ``unet_arch.py``, the same file for every variant."""

    def network_kwargs(params: UNetParams, ndim: int, in_channels: int, out_channels: int) -> dict:
        return {
            "ndim": ndim,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "depth": params.depth,
            "first_filters": params.first_filters,
            "kernel_size": params.kernel_size,
            "batch_norm": params.batch_norm,
            "dropout": params.dropout,
            **options(params),
        }

    def build(params: UNetParams, *, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
        return unet_arch.UNet(**network_kwargs(params, ndim, in_channels, out_channels))

    def architecture_kwargs(params: UNetParams, ndim: int, in_channels: int, out_channels: int) -> dict:
        # a package is for inference, where dropout does nothing: it rebuilds the network without it
        return {**network_kwargs(params, ndim, in_channels, out_channels), "dropout": 0.0}

    return BackboneSpec(
        name=name,
        params=params,
        build=build,
        size_divisor=lambda p: 2**p.depth,
        halo=lambda p: unet_arch.unet_halo(p.depth, p.kernel_size, options(p).get("pooling", "max")),
        description=description,
        architecture=ArchitectureSource(file=Path(unet_arch.__file__), callable_name="UNet", kwargs=architecture_kwargs),
        tags=("unet",),
    )


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        unet_family_backbone(
            "unet",
            PlainUNetParams,
            "U-Net (2D/3D): two convolutions per level, max-pooling, nearest upsampling, skip concatenation",
            lambda p: {"halve_second_conv": p.halve_second_conv},
        )
    ]
