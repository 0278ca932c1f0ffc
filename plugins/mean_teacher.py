"""The built-in ``mean_teacher`` semi-supervised objective (Tarvainen & Valpola 2017 style).

With ten annotated patches most of the data never reaches the segmentation loss. This term
lets every patch teach segmentation: the moving-average (EMA) network, the teacher, segments
a differently rotated / flipped copy of the patch with fresh Gaussian noise added, its output
is turned back, and the student is pulled towards the teacher: ``loss: mse`` compares the
head's probabilities (squared difference per pixel, the classic mean teacher), ``loss:
cross_entropy`` takes the teacher's most likely class as a pseudo-label (FixMatch style; its
scale matches the supervised cross-entropy). Pixels where the teacher is less confident than
``confidence`` are ignored (0 keeps all). The weight ramps in with a sigmoid over the first
``ramp_up`` of the joint training, when the teacher is still poor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from typing import Literal

from pydantic import Field

from denoiseg_core.components import ComponentParams, SegmentationHead, SemiSupervisedSpec
from denoiseg_core.hookspecs import hookimpl


class MeanTeacherParams(ComponentParams):
    """Parameters of the ``mean_teacher`` objective."""

    weight: float = Field(3.0, ge=0, description="weight of the consistency term once ramped in")
    loss: Literal["mse", "cross_entropy"] = Field(
        "mse", description="mse: squared difference of probabilities; cross_entropy: teacher's class as pseudo-label"
    )
    ramp_up: float = Field(0.3, ge=0, le=1, description="fraction of the joint training over which the weight ramps in")
    noise: float = Field(0.1, ge=0, description="std of Gaussian noise added to the teacher's input (normalised units)")
    confidence: float = Field(0.0, ge=0, lt=1, description="ignore pixels where the teacher's top probability is below this")
    unlabelled_only: bool = Field(False, description="apply the term to unlabelled patches only (default: every patch)")


def sigmoid_ramp(progress: float, ramp_up: float) -> float:
    """``exp(-5 (1 - t)^2)`` for ``t = progress / ramp_up`` (Laine & Aila 2017), 1 after the ramp."""
    if ramp_up <= 0 or progress >= ramp_up:
        return 1.0
    t = max(progress, 0.0) / ramp_up
    return math.exp(-5.0 * (1.0 - t) ** 2)


def _transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _inverse(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -k, dims=(-2, -1))


class MeanTeacherConsistency:
    """Callable objective; see the module docstring."""

    def __init__(self, params: MeanTeacherParams):
        self.params = params

    def __repr__(self) -> str:
        return f"MeanTeacherConsistency({self.params!r})"

    def __call__(
        self,
        *,
        student_logits: torch.Tensor,
        patches: torch.Tensor,
        labelled: torch.Tensor,
        teacher: Callable[[torch.Tensor], torch.Tensor],
        head: SegmentationHead,
        progress: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        p = self.params
        weight = p.weight * sigmoid_ramp(progress, p.ramp_up)
        if weight == 0.0:
            return student_logits.sum() * 0.0
        rand_device = generator.device if generator is not None else patches.device
        draws = torch.randint(0, 8, (1,), generator=generator, device=rand_device).item()
        # rot90 keeps the shape only for square YX patches; otherwise only 180 degrees
        square = patches.shape[-1] == patches.shape[-2]
        k, flip = (draws % 4 if square else 2 * (draws % 2)), draws >= 4
        view = _transform(patches, k, flip)
        if p.noise > 0:
            noise = torch.randn(view.shape, generator=generator, device=rand_device).to(view.device)
            view = view + p.noise * noise
        with torch.no_grad():
            target = head.activation()(_inverse(teacher(view).float(), k, flip))
        probabilities = head.activation()(student_logits.float())
        if p.loss == "mse":
            per_pixel = ((probabilities - target) ** 2).sum(dim=1)  # (N, *spatial)
        else:
            pseudo = target.argmax(dim=1, keepdim=True)
            per_pixel = -torch.log(probabilities.gather(1, pseudo).squeeze(1).clamp(min=1e-6))
        keep = torch.ones_like(per_pixel)
        if p.confidence > 0:
            keep = keep * (target.amax(dim=1) >= p.confidence).to(keep.dtype)
        if p.unlabelled_only:
            unlabelled = (~labelled.to(device=keep.device, dtype=torch.bool)).to(keep.dtype)
            keep = keep * unlabelled.view(-1, *([1] * (keep.ndim - 1)))
        return weight * (per_pixel * keep).sum() / keep.sum().clamp(min=1.0)


@hookimpl
def denoiseg_register_semi_supervised_objectives() -> list[SemiSupervisedSpec]:
    return [
        SemiSupervisedSpec(
            name="mean_teacher",
            params=MeanTeacherParams,
            build=MeanTeacherConsistency,
            description="consistency of the student's segmentation with the EMA teacher's on a rotated/flipped, "
            "re-noised view of every patch, ramped in",
        )
    ]
