"""The U-Net family in 2D/3D: the plain U-Net (Ronneberger et al. 2015, as configured in
DenoiSeg), its residual variant (He et al. 2016) and the N2V2 U-Net (Höck et al. 2022), as
options of one :class:`UNet`.

* ``block``: ``"plain"`` (two convolutions, each with batch norm and ReLU) or
  ``"residual"`` (``relu(conv-bn-relu-conv-bn(x) + shortcut(x))``, the shortcut a 1x1
  convolution where the channel count changes);
* ``pooling``: ``"max"`` (2x max-pooling) or ``"max_blur"`` (N2V2's anti-aliased
  "max-blur-pool", Zhang 2019: a 2-wide max-pool with stride 1, then a fixed binomial
  ``[1, 2, 1] / 4`` blur per axis with stride 2, written as a depth-wise convolution);
* ``top_skip``: the skip connection of the top (full-resolution) level; N2V2 drops it
  because it hands the blind-spot-free input straight to the output (checkerboard artefacts);
* ``halve_second_conv``: the shape of the original CSBDeep U-Net (plain blocks only);
* ``dropout``: element-wise dropout on the bottleneck's and the lower decoder levels' features
  while training (a regulariser for few labels; an identity at inference and in exports).

This file is self-contained on purpose: it imports only ``torch`` and ``typing``, because
the bioimage.io export ships it verbatim as the architecture source of
``pytorch_state_dict`` weights. It uses only plain operations (convolution, batch norm,
ReLU, max-pooling, slicing, concatenation) so that it can be scripted with TorchScript,
exported to ONNX opset 17, and run by old libtorch builds (1.13, deepImageJ).
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCKS", "POOLINGS", "MaxBlurPool", "UNet", "unet_halo"]

#: the ``block`` and ``pooling`` options of :class:`UNet`
BLOCKS = ("plain", "residual")
POOLINGS = ("max", "max_blur")


def _conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _batch_norm(ndim: int, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if ndim == 2 else nn.BatchNorm3d(channels)


def _conv_layers(
    ndim: int, in_channels: int, widths: List[int], kernel_size: int, batch_norm: bool, last_relu: bool
) -> List[nn.Module]:
    """One convolution per entry of ``widths``, each followed by (batch norm and) ReLU; the
    last one without ReLU unless ``last_relu``."""
    layers: List[nn.Module] = []
    channels = in_channels
    for index, width in enumerate(widths):
        layers.append(_conv(ndim, channels, width, kernel_size))
        if batch_norm:
            layers.append(_batch_norm(ndim, width))
        if last_relu or index < len(widths) - 1:
            layers.append(nn.ReLU(inplace=True))
        channels = width
    return layers


class _ConvBlock(nn.Sequential):
    """Two ``kernel_size`` convolutions, each followed by (batch norm and) ReLU; the second
    one has ``second_channels`` outputs."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool, second_channels: int):
        super().__init__(*_conv_layers(ndim, in_channels, [out_channels, second_channels], kernel_size, batch_norm, True))


class _ResidualBlock(nn.Module):
    """``relu(conv-bn-relu-conv-bn(x) + shortcut(x))``; the shortcut is a 1x1 convolution
    when the channel count changes, the identity otherwise."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool):
        super().__init__()
        self.body = nn.Sequential(*_conv_layers(ndim, in_channels, [out_channels, out_channels], kernel_size, batch_norm, False))
        self.shortcut: nn.Module = nn.Identity() if in_channels == out_channels else _conv(ndim, in_channels, out_channels, 1)
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


class UNet(nn.Module):
    """U-Net mapping ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.

    Every spatial size must be a multiple of ``2**depth``. Level ``i`` (0 = full
    resolution) has ``first_filters * 2**i`` channels; the bottleneck has
    ``first_filters * 2**depth``. Decoder levels upsample (nearest, factor 2),
    concatenate the encoder features of the same level (the top level only with
    ``top_skip``) and apply a block. A final 1x1 convolution produces ``out_channels``
    (no activation). ``block``, ``pooling`` and ``top_skip``: see the module docstring.

    ``halve_second_conv``: the shape of the original CSBDeep U-Net that DenoiSeg used: the
    second convolution of the bottleneck and of each decoder level below the top has the
    channels of the level above it (fewer parameters and FLOPs; 5.50 M instead of 7.85 M
    parameters at depth 4 with 32 filters).

    ``dropout``: the probability with which dropout zeroes features of the bottleneck and of
    every decoder level below the top while training (the top level feeds the output
    convolution directly). It holds no weights, so the state dict is that of ``dropout=0``.
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
        block: str = "plain",
        pooling: str = "max",
        top_skip: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"UNet supports ndim 2 or 3, got {ndim}")
        if depth < 1:
            raise ValueError(f"UNet depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"UNet kernel_size must be odd, got {kernel_size}")
        if block not in BLOCKS:
            raise ValueError(f"UNet block must be one of {BLOCKS}, got {block!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"UNet pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet dropout must be in [0, 1), got {dropout}")
        if halve_second_conv and block != "plain":
            raise ValueError("UNet halve_second_conv needs plain blocks (a residual block keeps its width)")
        self.ndim = ndim
        self.depth = depth
        self.top_skip = top_skip

        def make_block(in_ch: int, out_ch: int, second_ch: int) -> nn.Module:
            if block == "residual":
                return _ResidualBlock(ndim, in_ch, out_ch, kernel_size, batch_norm)
            return _ConvBlock(ndim, in_ch, out_ch, kernel_size, batch_norm, second_ch)

        filters = [first_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        # pooling modules hold no weights (the blur kernel is not persistent): the state
        # dict has the same keys for every pooling
        self.pools = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoders.append(make_block(channels, filters[level], filters[level]))
            pool = MaxBlurPool(ndim, filters[level]) if pooling == "max_blur" else (nn.MaxPool2d(2) if ndim == 2 else nn.MaxPool3d(2))
            self.pools.append(pool)
            channels = filters[level]
        up_channels = filters[depth - 1] if halve_second_conv else filters[depth]
        self.bottleneck = make_block(channels, filters[depth], up_channels)
        self.upsample = _NearestUpsample2x()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            second = filters[max(0, level - 1)] if halve_second_conv else filters[level]
            skip_channels = filters[level] if top_skip or level > 0 else 0
            self.decoders.append(make_block(up_channels + skip_channels, filters[level], second))
            up_channels = second
        self.output = _conv(ndim, up_channels, out_channels, 1)
        # an identity when off, so the default network's TorchScript and ONNX graphs hold no dropout node
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.dropout(self.bottleneck(x))
        level = len(skips) - 1
        for decoder in self.decoders:
            x = self.upsample(x)
            if self.top_skip or level > 0:
                x = torch.cat([x, skips[level]], dim=1)
            x = decoder(x)
            if level > 0:
                x = self.dropout(x)
            level -= 1
        return self.output(x)


def unet_halo(depth: int, kernel_size: int, pooling: str = "max") -> int:
    """Pixels at a tile's edge whose output can differ from whole-image inference.

    This is the one-sided radius of the receptive field: zero padding at a tile edge
    only reaches outputs within that distance. A ``kernel_size`` convolution at level
    ``i`` reaches ``(kernel_size // 2) * 2**i`` full-resolution pixels; there are two per
    encoder and decoder level and two in the bottleneck (a residual block's 1x1 shortcut
    reaches no further). A max-pool from level ``i`` and its matching nearest upsampling
    together widen the dependence by at most ``2**i`` pixels on either side; with
    ``max_blur`` pooling the 2-wide max-pool and the 3-tap blur each reach one more
    level-``i`` pixel (``2**i`` full-resolution pixels). Valid only if tiles start at
    multiples of ``2**depth`` (otherwise pooling windows do not line up and no halo makes
    tiles agree).
    """
    reach = kernel_size // 2
    convs = reach * (4 * (2**depth - 1) + 2 * 2**depth)
    resampling = 2**depth - 1
    blur = 2 * (2**depth - 1) if pooling == "max_blur" else 0
    return convs + resampling + blur
