"""A residual 2D/3D U-Net (U-Net levels built from residual blocks, He et al. 2016).

Each level is a residual block: two convolutions (with batch norm) whose output is added
to the block input (through a 1x1 convolution where the channel count changes), then a
ReLU. Identity paths make deeper or wider networks easier to train from scratch.

This file is self-contained on purpose (it imports only ``torch`` and ``typing``): the
bioimage.io export ships it verbatim as the architecture of ``pytorch_state_dict`` weights.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["ResUNet"]


class _ResidualBlock(nn.Module):
    """``relu(conv-bn-relu-conv-bn(x) + shortcut(x))``; the shortcut is a 1x1 convolution
    when the channel count changes, the identity otherwise."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool):
        super().__init__()
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        norm_cls = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        layers: List[nn.Module] = [conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2)]
        if batch_norm:
            layers.append(norm_cls(out_channels))
        layers.append(nn.ReLU(inplace=True))
        layers.append(conv_cls(out_channels, out_channels, kernel_size, padding=kernel_size // 2))
        if batch_norm:
            layers.append(norm_cls(out_channels))
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else conv_cls(in_channels, out_channels, 1)
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))


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


class ResUNet(nn.Module):
    """Residual U-Net mapping ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.

    Every spatial size must be a multiple of ``2**depth``. Level ``i`` has
    ``first_filters * 2**i`` channels; max-pooling down, nearest upsampling up,
    skip concatenation, a final 1x1 convolution (no activation).
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
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ResUNet supports ndim 2 or 3, got {ndim}")
        if depth < 1:
            raise ValueError(f"ResUNet depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ResUNet kernel_size must be odd, got {kernel_size}")
        filters = [first_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoders.append(_ResidualBlock(ndim, channels, filters[level], kernel_size, batch_norm))
            channels = filters[level]
        self.pool = nn.MaxPool2d(2) if ndim == 2 else nn.MaxPool3d(2)
        self.bottleneck = _ResidualBlock(ndim, channels, filters[depth], kernel_size, batch_norm)
        self.upsample = _NearestUpsample2x()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.decoders.append(
                _ResidualBlock(ndim, filters[level + 1] + filters[level], filters[level], kernel_size, batch_norm)
            )
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.output = conv_cls(filters[0], out_channels, 1)

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
