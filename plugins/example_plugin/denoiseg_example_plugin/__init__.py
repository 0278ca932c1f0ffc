"""denoiseg-example-plugin: registers the ``tiny_resnet`` backbone and the ``distance_map``
segmentation head (see :mod:`denoiseg_example_plugin.distance_head`) with denoiseg.

denoiseg imports this module through the ``denoiseg.plugins`` entry point declared in
this distribution's ``pyproject.toml`` and calls the hook implementations below.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from torch import nn

from denoiseg_core.components import ArchitectureSource, BackboneSpec, ComponentParams, HeadSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_example_plugin import tiny_resnet_arch
from denoiseg_example_plugin.distance_head import DISTANCE_MAP

__version__ = "0.1.0"


class TinyResNetParams(ComponentParams):
    """Parameters of ``tiny_resnet``; unknown keys are rejected (``ComponentParams`` forbids extras)."""

    width: int = Field(16, ge=1, description="feature channels of every layer")
    blocks: int = Field(3, ge=0, description="number of residual blocks")
    kernel_size: int = Field(3, ge=1, description="convolution kernel size (odd)")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return value


def _architecture_kwargs(params: TinyResNetParams, ndim: int, in_channels: int, out_channels: int) -> dict:
    """Keyword arguments that rebuild the network from ``tiny_resnet_arch.py`` alone (bioimage.io)."""
    return {
        "ndim": ndim,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "width": params.width,
        "blocks": params.blocks,
        "kernel_size": params.kernel_size,
    }


def build_tiny_resnet(params: TinyResNetParams, *, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    return tiny_resnet_arch.TinyResNet(**_architecture_kwargs(params, ndim, in_channels, out_channels))


def tiny_resnet_halo(params: TinyResNetParams) -> int:
    """Receptive-field radius: the stem plus two convolutions per block, ``kernel_size // 2`` each."""
    return (1 + 2 * params.blocks) * (params.kernel_size // 2)


@hookimpl
def denoiseg_register_backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name="tiny_resnet",
            params=TinyResNetParams,
            build=build_tiny_resnet,
            size_divisor=lambda params: 1,  # no down-sampling: any size works
            halo=tiny_resnet_halo,
            description="tiny full-resolution residual network (example third-party plugin)",
            architecture=ArchitectureSource(
                file=Path(tiny_resnet_arch.__file__),
                callable_name="TinyResNet",
                kwargs=_architecture_kwargs,
            ),
        )
    ]


@hookimpl
def denoiseg_register_heads() -> list[HeadSpec]:
    return [DISTANCE_MAP]
