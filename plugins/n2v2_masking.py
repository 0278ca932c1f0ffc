"""The ``n2v2`` masking strategy: N2V2 blind spots with median replacement (Höck et al. 2022).

Blind spots are placed exactly like the ``n2v`` strategy (stratified: one random pixel per
grid box of ``100 / percentage`` pixels, per patch and channel). Each blind spot is then
replaced by the median of its ``(2 * radius + 1)**ndim`` neighbourhood *without* the
centre pixel, so the network never sees the true value at the position it must predict
(N2V's "uniform_withCP" can copy it, which N2V2 identified as one source of checkerboard
artefacts). Neighbours outside the patch are left out of the median rather than clipped,
so pixels at the edge are not counted twice. ``torch.nanmedian`` takes the lower of the
two middle values for an even count.

The neighbourhood helpers here are shared with the ``struct_n2v`` strategy.
"""

from __future__ import annotations

import itertools

import torch
from pydantic import Field

from denoiseg_core.components import ComponentParams, MaskingSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.n2v_masking import N2VMasking


#: at most this many neighbour values are gathered at once (about 16 MB of float32)
_MAX_GATHERED = 2**22


class N2V2Params(ComponentParams):
    """Parameters of the ``n2v2`` masking strategy."""

    percentage: float = Field(1.5, gt=0, le=50, description="percent of pixels masked per patch and channel")
    radius: int = Field(
        5, ge=1, le=10, description="neighbourhood radius whose median (centre excluded) replaces a blind spot"
    )


def neighbourhood_offsets(ndim: int, radius: int, device: torch.device, exclude_centre: bool = True) -> torch.Tensor:
    """All offsets of the ``(2 * radius + 1)**ndim`` cube as a ``(M, ndim)`` long tensor."""
    steps = range(-radius, radius + 1)
    offsets = torch.tensor(list(itertools.product(steps, repeat=ndim)), dtype=torch.long, device=device)
    if exclude_centre:
        offsets = offsets[(offsets != 0).any(dim=1)]
    return offsets


def blind_spot_points(loss_mask: torch.Tensor) -> torch.Tensor:
    """The ``(K, 2 + ndim)`` indices ``(n, c, *position)`` of every True pixel of ``loss_mask``."""
    return loss_mask.nonzero()


def gather_neighbours(patches: torch.Tensor, points: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Values at ``points + offsets``: a ``(K, M)`` tensor, NaN where a neighbour is outside the patch.

    ``points`` is ``(K, 2 + ndim)`` (batch, channel, position), ``offsets`` ``(M, ndim)``.
    """
    positions = points[:, None, 2:] + offsets[None]  # (K, M, ndim)
    inside = inside_patch(positions, patches.shape)
    spatial = torch.tensor(patches.shape[2:], device=patches.device)
    positions = torch.minimum(positions.clamp(min=0), spatial - 1)
    values = patches.reshape(-1)[flat_index(points[:, None], positions, patches.shape)].float()
    return torch.where(inside, values, torch.full_like(values, float("nan")))


def inside_patch(positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Whether each ``(..., ndim)`` position lies inside the spatial extent of ``shape``."""
    spatial = torch.tensor(shape[2:], device=positions.device)
    return ((positions >= 0) & (positions < spatial)).all(dim=-1)


def flat_index(points: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Linear index into a flattened ``shape = (N, C, *spatial)`` tensor.

    ``points[..., :2]`` holds (batch, channel) and broadcasts against ``positions``
    ``(..., ndim)``, which must lie inside the patch.
    """
    index = points[..., 0] * shape[1] + points[..., 1]
    for axis in range(positions.shape[-1]):  # 2-3 axes, not pixels
        index = index * shape[2 + axis] + positions[..., axis]
    return index


class N2V2Masking:
    """Callable ``(patches (N, C, *spatial), generator) -> (masked_input, loss_mask)``."""

    def __init__(self, percentage: float = 1.5, radius: int = 5):
        self.percentage = float(percentage)
        self.radius = int(radius)
        # Placement of the blind spots is N2V's; only the replacement differs.
        self._placement = N2VMasking(percentage=percentage, radius=radius)

    def __repr__(self) -> str:
        return f"N2V2Masking(percentage={self.percentage}, radius={self.radius})"

    def __call__(
        self, patches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, loss_mask = self._placement(patches, generator)
        points = blind_spot_points(loss_mask)
        offsets = neighbourhood_offsets(patches.ndim - 2, self.radius, patches.device)
        # Chunks of blind spots bound the (points x neighbours) memory: a 3D radius-5
        # neighbourhood has 1330 pixels. The loop is over chunks, not pixels.
        chunk = max(1, _MAX_GATHERED // len(offsets))
        medians = torch.cat(
            [torch.nanmedian(gather_neighbours(patches, part, offsets), dim=1).values for part in points.split(chunk)]
        )
        masked = patches.clone()
        masked[loss_mask] = medians.to(patches.dtype)  # nonzero() and boolean indexing share the order
        return masked, loss_mask


def build_n2v2(params: N2V2Params) -> N2V2Masking:
    return N2V2Masking(percentage=params.percentage, radius=params.radius)


@hookimpl
def denoiseg_register_masking_strategies() -> list[MaskingSpec]:
    return [
        MaskingSpec(
            name="n2v2",
            params=N2V2Params,
            build=build_n2v2,
            description="N2V2 stratified blind spots replaced by the neighbourhood median without the centre pixel",
        )
    ]
