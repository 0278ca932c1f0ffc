"""The built-in ``n2v`` masking strategy: Noise2Void blind spots (Krull et al. 2019).

Blind spots are stratified: each patch (and each channel on its own) is divided into a
grid of boxes whose volume is ``100 / percentage`` pixels, and one random pixel per box
is masked, so masked pixels cover the patch evenly. A masked pixel is replaced by the
value of a uniformly random pixel of its ``(2 * radius + 1)**ndim`` neighbourhood, the
centre included and coordinates clipped to the patch ("uniform_withCP" in N2V).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from denoiseg_core.components import ComponentParams, MaskingSpec
from denoiseg_core.hookspecs import hookimpl


class N2VParams(ComponentParams):
    """Parameters of the ``n2v`` masking strategy (paper defaults)."""

    percentage: float = Field(1.5, gt=0, le=50, description="percent of pixels masked per patch and channel")
    radius: int = Field(5, ge=1, description="neighbourhood radius from which replacement values are drawn")


class N2VMasking:
    """Callable ``(patches (N, C, *spatial), generator) -> (masked_input, loss_mask)``."""

    def __init__(self, percentage: float = 1.5, radius: int = 5):
        self.percentage = float(percentage)
        self.radius = int(radius)

    def __repr__(self) -> str:
        return f"N2VMasking(percentage={self.percentage}, radius={self.radius})"

    def __call__(
        self, patches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if patches.ndim < 4:
            raise ValueError(f"expected patches (N, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(patches.shape)}")
        device = patches.device
        batch, channels, *spatial = patches.shape
        ndim = len(spatial)
        box = (100.0 / self.percentage) ** (1.0 / ndim)
        grid = [math.ceil(size / box) for size in spatial]
        # Random numbers are drawn on the generator's device (a seeded CPU generator gives
        # the same masks for CPU and CUDA input) and then moved to the input's device.
        rand_device = generator.device if generator is not None else device
        shape = (batch, channels, *grid, ndim)
        within_box = torch.rand(shape, generator=generator, device=rand_device).to(device)
        offsets = torch.randint(
            -self.radius, self.radius + 1, shape, generator=generator, device=rand_device
        ).to(device)

        # Integer box edges floor(i * box) .. floor((i + 1) * box): boxes are disjoint, so
        # no pixel is picked twice. Points falling beyond the patch (in the last, partial
        # box) are dropped, which keeps the masked fraction at `percentage` on average.
        coords = []
        sources = []
        valid = torch.ones((batch, channels, *grid), dtype=torch.bool, device=device)
        for axis, (size, n_boxes) in enumerate(zip(spatial, grid)):  # loop over 2-3 axes only
            view = [1] * (2 + ndim)
            view[2 + axis] = n_boxes
            index = torch.arange(n_boxes, device=device, dtype=torch.float32).view(view)
            start = torch.floor(index * box)
            width = torch.floor((index + 1) * box) - start
            # min(): float rounding of rand * width must not reach the next box.
            step = torch.minimum(torch.floor(within_box[..., axis] * width), width - 1)
            coord = (start + step).long()
            valid &= coord < size
            coord = coord.clamp(max=size - 1)
            coords.append(coord)
            sources.append((coord + offsets[..., axis]).clamp(0, size - 1))

        target_index = self._flat_index(coords, batch, channels, spatial, device)[valid]
        source_index = self._flat_index(sources, batch, channels, spatial, device)[valid]
        flat = patches.reshape(-1)
        masked = flat.clone()
        masked[target_index] = flat[source_index]
        loss_mask = torch.zeros(flat.shape, dtype=torch.bool, device=device)
        loss_mask[target_index] = True
        return masked.view_as(patches), loss_mask.view_as(patches)

    @staticmethod
    def _flat_index(
        coords: list[torch.Tensor], batch: int, channels: int, spatial: list[int], device: torch.device
    ) -> torch.Tensor:
        """Linear index into the flattened ``(N, C, *spatial)`` tensor."""
        ndim = len(spatial)
        plane = torch.arange(batch * channels, device=device).view(batch, channels, *([1] * ndim))
        index = plane
        for coord, size in zip(coords, spatial):
            index = index * size + coord
        return index


def build_n2v(params: N2VParams) -> N2VMasking:
    return N2VMasking(percentage=params.percentage, radius=params.radius)


@hookimpl
def denoiseg_register_masking_strategies() -> list[MaskingSpec]:
    return [
        MaskingSpec(
            name="n2v",
            params=N2VParams,
            build=build_n2v,
            description="Noise2Void stratified blind spots with uniform neighbourhood replacement (centre allowed)",
        )
    ]
