"""A plain 2D/3D U-Net (Ronneberger et al. 2015, as configured in DenoiSeg).

This file is self-contained on purpose: it imports only ``torch``, ``typing`` and
``math``, because the bioimage.io export ships it verbatim as the architecture source
of ``pytorch_state_dict`` weights. It uses only plain operations (convolution, batch
norm, ReLU, max-pooling, nearest-neighbour upsampling by a fixed factor of 2,
concatenation) so that it can be scripted with TorchScript, exported to ONNX opset 17,
and run by old libtorch builds (1.13, deepImageJ).
"""

from typing import List

import torch
from torch import nn

__all__ = ["UNet", "unet_halo"]


def _conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class _ConvBlock(nn.Sequential):
    """Two ``kernel_size`` convolutions, each followed by (batch norm and) ReLU; the second
    one has ``second_channels`` outputs (default: ``out_channels``)."""

    def __init__(
        self, ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool, second_channels: int = 0
    ):
        layers: List[nn.Module] = []
        channels = in_channels
        for width in (out_channels, second_channels or out_channels):
            layers.append(_conv(ndim, channels, width, kernel_size))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width) if ndim == 2 else nn.BatchNorm3d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        super().__init__(*layers)


class _NearestUpsample2x(nn.Module):
    """Nearest-neighbour upsampling by 2 along every spatial axis (2D and 3D).

    Written with reshape/expand rather than ``nn.Upsample``: scripting ``F.interpolate``
    serialises all of its branches, including operators old runtimes (libtorch 1.13,
    deepImageJ) do not have, so their TorchScript would not load.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        unsqueezed: List[int] = [shape[0], shape[1]]
        expanded: List[int] = [shape[0], shape[1]]
        upsampled: List[int] = [shape[0], shape[1]]
        for size in shape[2:]:
            unsqueezed += [size, 1]
            expanded += [size, 2]
            upsampled.append(2 * size)
        return x.reshape(unsqueezed).expand(expanded).reshape(upsampled)


class UNet(nn.Module):
    """U-Net mapping ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.

    Every spatial size must be a multiple of ``2**depth``. Level ``i`` (0 = full
    resolution) has ``first_filters * 2**i`` channels; the bottleneck has
    ``first_filters * 2**depth``. Decoder levels upsample (nearest, factor 2),
    concatenate the encoder features of the same level and apply two convolutions.
    A final 1x1 convolution produces ``out_channels`` (no activation).

    ``halve_second_conv``: the shape of the original CSBDeep U-Net that DenoiSeg used: the
    second convolution of the bottleneck and of each decoder level below the top has the
    channels of the level above it (fewer parameters and FLOPs; 5.50 M instead of 7.85 M
    parameters at depth 4 with 32 filters).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        depth: int = 4,
        first_filters: int = 32,
        kernel_size: int = 3,
        batch_norm: bool = True,
        halve_second_conv: bool = False,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"UNet supports ndim 2 or 3, got {ndim}")
        if depth < 1:
            raise ValueError(f"UNet depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"UNet kernel_size must be odd, got {kernel_size}")
        self.ndim = ndim
        self.depth = depth

        filters = [first_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoders.append(_ConvBlock(ndim, channels, filters[level], kernel_size, batch_norm))
            channels = filters[level]
        self.pool = nn.MaxPool2d(2) if ndim == 2 else nn.MaxPool3d(2)
        up_channels = filters[depth - 1] if halve_second_conv else filters[depth]
        self.bottleneck = _ConvBlock(ndim, channels, filters[depth], kernel_size, batch_norm, up_channels)
        self.upsample = _NearestUpsample2x()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            second = filters[max(0, level - 1)] if halve_second_conv else filters[level]
            self.decoders.append(
                _ConvBlock(ndim, up_channels + filters[level], filters[level], kernel_size, batch_norm, second)
            )
            up_channels = second
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.output = conv_cls(up_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        level = len(skips) - 1
        for decoder in self.decoders:
            x = self.upsample(x)
            x = decoder(torch.cat([x, skips[level]], dim=1))
            level -= 1
        return self.output(x)


def unet_halo(depth: int, kernel_size: int) -> int:
    """Pixels at a tile's edge whose output can differ from whole-image inference.

    This is the one-sided radius of the receptive field: zero padding at a tile edge
    only reaches outputs within that distance. A ``kernel_size`` convolution at level
    ``i`` reaches ``(kernel_size // 2) * 2**i`` full-resolution pixels; there are two per
    encoder and decoder level and two in the bottleneck. A max-pool from level ``i`` and
    its matching nearest upsampling together widen the dependence by at most ``2**i``
    pixels on either side. Valid only if tiles start at multiples of ``2**depth``
    (otherwise pooling windows do not line up and no halo makes tiles agree).
    """
    reach = kernel_size // 2
    convs = reach * (4 * (2**depth - 1) + 2 * 2**depth)
    resampling = 2**depth - 1
    return convs + resampling
