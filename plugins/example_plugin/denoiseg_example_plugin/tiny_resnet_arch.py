"""``TinyResNet``: a small full-resolution residual network (no down-sampling).

Self-contained on purpose (imports only ``torch`` and ``typing``): denoiseg's bioimage.io
export ships this file verbatim as the architecture of ``pytorch_state_dict`` weights.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["TinyResNet"]


class _Residual(nn.Module):
    """``relu(x + conv(relu(conv(x))))`` at constant width."""

    def __init__(self, ndim: int, width: int, kernel_size: int):
        super().__init__()
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv1 = conv_cls(width, width, kernel_size, padding=kernel_size // 2)
        self.conv2 = conv_cls(width, width, kernel_size, padding=kernel_size // 2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    """Maps ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)`` for any spatial size."""

    def __init__(
        self, ndim: int, in_channels: int, out_channels: int, width: int = 16, blocks: int = 3, kernel_size: int = 3
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"TinyResNet supports ndim 2 or 3, got {ndim}")
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.stem = conv_cls(in_channels, width, kernel_size, padding=kernel_size // 2)
        body: List[nn.Module] = [_Residual(ndim, width, kernel_size) for _ in range(blocks)]
        self.body = nn.Sequential(*body)
        self.head = conv_cls(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))
