"""The N2V2 U-Net (Höck et al. 2022): blur-pool down-sampling and no top-level skip connection.

N2V2 traces the checkerboard artefacts of Noise2Void to max-pooling (aliasing) and to the
full-resolution skip connection (which hands the blind-spot-free input straight to the
output). This U-Net therefore

* down-samples with "max-blur-pool" (Zhang 2019): a 2-wide max-pool with stride 1, then a
  fixed binomial ``[1, 2, 1] / 4`` blur per axis applied with stride 2, written as a plain
  depth-wise convolution so that it scripts and exports to ONNX;
* drops the skip connection of the top (full-resolution) level: the last decoder level
  sees only the up-sampled features.

This file is self-contained on purpose (it imports only ``torch`` and ``typing``): the
bioimage.io export ships it verbatim as the architecture of ``pytorch_state_dict`` weights.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["N2V2UNet", "MaxBlurPool"]


def _conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class _ConvBlock(nn.Sequential):
    """Two ``kernel_size`` convolutions, each followed by (batch norm and) ReLU."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool):
        layers: List[nn.Module] = []
        channels = in_channels
        for _ in range(2):
            layers.append(_conv(ndim, channels, out_channels, kernel_size))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels) if ndim == 2 else nn.BatchNorm3d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            channels = out_channels
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


def _replicate_edges(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Replicate-pad every spatial axis by ``before`` and ``after`` (0 or 1) edge pixels.

    ``F.pad(mode="replicate")`` scripts to ``aten::pad``, which libtorch before 1.13 (older
    deepImageJ engines) does not have; slicing and concatenation load everywhere.
    """
    for axis in range(2, x.dim()):
        parts: List[torch.Tensor] = []
        if before > 0:
            parts.append(x.narrow(axis, 0, 1))
        parts.append(x)
        if after > 0:
            parts.append(x.narrow(axis, x.size(axis) - 1, 1))
        x = torch.cat(parts, dim=axis)
    return x


class MaxBlurPool(nn.Module):
    """Anti-aliased 2x down-sampling: max-pool (2 wide, stride 1), then a stride-2 binomial blur.

    Sizes are halved exactly (the max-pool and the blur pad by replicating the edge).
    The blur kernel is a fixed, non-persistent buffer, so it is not in the state dict.
    """

    def __init__(self, ndim: int, channels: int):
        super().__init__()
        self.ndim = ndim
        self.channels = channels
        taps = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kernel = taps
        for _ in range(ndim - 1):
            kernel = kernel[..., None] * taps
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ndim == 2:
            x = F.max_pool2d(_replicate_edges(x, 0, 1), kernel_size=2, stride=1)
            return F.conv2d(_replicate_edges(x, 1, 1), self.kernel, stride=2, groups=self.channels)
        x = F.max_pool3d(_replicate_edges(x, 0, 1), kernel_size=2, stride=1)
        return F.conv3d(_replicate_edges(x, 1, 1), self.kernel, stride=2, groups=self.channels)


class N2V2UNet(nn.Module):
    """N2V2 U-Net mapping ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.

    Every spatial size must be a multiple of ``2**depth``. Level ``i`` has
    ``first_filters * 2**i`` channels. Decoder levels upsample (nearest, factor 2),
    concatenate the encoder features of the same level (except at the top level) and
    apply two convolutions; a final 1x1 convolution gives ``out_channels``.
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
            raise ValueError(f"N2V2UNet supports ndim 2 or 3, got {ndim}")
        if depth < 1:
            raise ValueError(f"N2V2UNet depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"N2V2UNet kernel_size must be odd, got {kernel_size}")
        self.depth = depth

        filters = [first_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoders.append(_ConvBlock(ndim, channels, filters[level], kernel_size, batch_norm))
            self.pools.append(MaxBlurPool(ndim, filters[level]))
            channels = filters[level]
        self.bottleneck = _ConvBlock(ndim, channels, filters[depth], kernel_size, batch_norm)
        self.upsample = _NearestUpsample2x()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            skip_channels = filters[level] if level > 0 else 0  # no top-level skip connection
            self.decoders.append(
                _ConvBlock(ndim, filters[level + 1] + skip_channels, filters[level], kernel_size, batch_norm)
            )
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.output = conv_cls(filters[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        level = len(skips) - 1
        for decoder in self.decoders:
            x = self.upsample(x)
            if level > 0:
                x = torch.cat([x, skips[level]], dim=1)
            x = decoder(x)
            level -= 1
        return self.output(x)
