"""The ``struct_n2v`` masking strategy: structured blind spots for correlated noise (Broaddus et al. 2020).

Noise that is correlated along one image axis (scan lines of a point-scanning or sCMOS
camera) lets a blind-spot network predict a pixel's noise from its neighbours on that
line. structN2V therefore hides the whole line segment: the ``2 * span`` pixels on each
side of a blind spot along ``axis`` are overwritten with uniform random values between the
minimum and maximum of their patch and channel (the "noise" fill of structN2V), and the
blind spot itself gets the value of a random pixel of its ``(2 * radius + 1)**ndim``
neighbourhood that is *not* on the hidden line segment (not the centre either), so the
replacement carries no correlated noise of the centre. An offset that would leave the
patch is flipped on that axis (clipping could land on the centre or the line).

Blind spots are placed like the ``n2v`` strategy (stratified per patch and channel).
The loss mask is only the blind spots; the line pixels are input corruption only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from denoiseg_core.components import ComponentParams, MaskingSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.n2v2_masking import blind_spot_points, flat_index, inside_patch, neighbourhood_offsets
from denoiseg_plugins.n2v_masking import N2VMasking


class StructN2VParams(ComponentParams):
    """Parameters of the ``struct_n2v`` masking strategy."""

    axis: Literal["x", "y"] = Field("x", description="image axis along which the noise is correlated")
    span: int = Field(2, ge=1, le=16, description="pixels hidden on each side of a blind spot along `axis`")
    percentage: float = Field(
        1.5, gt=0, le=20, description="percent of pixels that are blind spots, per patch and channel"
    )
    radius: int = Field(
        5, ge=1, le=10, description="neighbourhood radius from which a blind spot's replacement is drawn"
    )


class StructN2VMasking:
    """Callable ``(patches (N, C, *spatial), generator) -> (masked_input, loss_mask)``."""

    def __init__(self, axis: str = "x", span: int = 2, percentage: float = 1.5, radius: int = 5):
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
        self.axis = axis
        self.span = int(span)
        self.percentage = float(percentage)
        self.radius = int(radius)
        self._placement = N2VMasking(percentage=percentage, radius=radius)

    def __repr__(self) -> str:
        fields = f"axis={self.axis!r}, span={self.span}, percentage={self.percentage}, radius={self.radius}"
        return f"StructN2VMasking({fields})"

    def _line_offsets(self, ndim: int, device: torch.device) -> torch.Tensor:
        """Offsets ``(2 * span, ndim)`` of the hidden line segment, the centre excluded."""
        along = torch.cat([torch.arange(-self.span, 0), torch.arange(1, self.span + 1)]).to(device)
        offsets = torch.zeros((2 * self.span, ndim), dtype=torch.long, device=device)
        offsets[:, ndim - 1 if self.axis == "x" else ndim - 2] = along
        return offsets

    def __call__(
        self, patches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if patches.ndim < 4:
            raise ValueError(
                f"expected patches (N, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(patches.shape)}"
            )
        device = patches.device
        rand_device = generator.device if generator is not None else device
        ndim = patches.ndim - 2
        _, loss_mask = self._placement(patches, generator)
        points = blind_spot_points(loss_mask)  # (K, 2 + ndim)
        line = self._line_offsets(ndim, device)

        # The centre's replacement: a random neighbour off the hidden line.
        candidates = neighbourhood_offsets(ndim, self.radius, device)
        on_line = (candidates[:, None, :] == line[None]).all(dim=-1).any(dim=1)
        candidates = candidates[~on_line]
        pick = torch.randint(len(candidates), (len(points),), generator=generator, device=rand_device).to(device)
        offsets = candidates[pick]
        spatial = torch.tensor(patches.shape[2:], device=device)
        # An offset leaving the patch is flipped on that axis: still a candidate (the set is
        # symmetric), never the centre or the line, unlike mirroring the position.
        outside = (points[:, 2:] + offsets < 0) | (points[:, 2:] + offsets >= spatial)
        source = points[:, 2:] + torch.where(outside, -offsets, offsets)
        source = torch.minimum(source.clamp(min=0), spatial - 1)  # only for radius >= patch size / 2
        flat = patches.reshape(-1)
        centre_values = flat[flat_index(points, source, patches.shape)]

        # The hidden line: uniform noise over each (patch, channel)'s value range.
        positions = points[:, None, 2:] + line[None]  # (K, 2 * span, ndim)
        inside = inside_patch(positions, patches.shape)
        line_index = flat_index(points[:, None], torch.where(inside[..., None], positions, 0), patches.shape)[inside]
        plane = line_index // spatial.prod()
        low = patches.reshape(patches.shape[0] * patches.shape[1], -1).amin(dim=1)
        high = patches.reshape(patches.shape[0] * patches.shape[1], -1).amax(dim=1)
        uniform = torch.rand(line_index.shape, generator=generator, device=rand_device).to(device, patches.dtype)

        masked = flat.clone()
        masked[line_index] = low[plane] + uniform * (high[plane] - low[plane])
        masked[flat_index(points, points[:, 2:], patches.shape)] = centre_values  # blind spots win over lines
        return masked.view_as(patches), loss_mask


def build_struct_n2v(params: StructN2VParams) -> StructN2VMasking:
    return StructN2VMasking(axis=params.axis, span=params.span, percentage=params.percentage, radius=params.radius)


@hookimpl
def denoiseg_register_masking_strategies() -> list[MaskingSpec]:
    return [
        MaskingSpec(
            name="struct_n2v",
            params=StructN2VParams,
            build=build_struct_n2v,
            description="structN2V: blind spots plus a hidden line segment along x or y, for line-correlated noise",
        )
    ]
