"""What a plugin registers: backbones, masking strategies, segmentation heads and
semi-supervised objectives.

Each component is a small frozen record with a unique ``name``, a pydantic model of its
parameters (``params``, strict: unknown parameters are rejected) and a factory. The
factories receive a validated instance of ``params``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class ComponentParams(BaseModel):
    """Base class for component parameter models: unknown keys are an error."""

    # allow_inf_nan=False: .inf/.nan in a component parameter is refused like in the config
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(ComponentParams):
    """For components that take no parameters."""


@dataclass(frozen=True)
class ArchitectureSource:
    """How a backbone is rebuilt outside denoiseg (bioimage.io ``pytorch_state_dict`` weights).

    ``file`` is a self-contained Python source file (imports only torch) defining
    ``callable_name``; ``kwargs(params, ndim, in_channels, out_channels)`` returns the
    keyword arguments that rebuild the same network from it.
    """

    file: Path
    callable_name: str
    kwargs: Callable[[ComponentParams, int, int, int], dict]


@dataclass(frozen=True)
class BackboneSpec:
    """A network backbone.

    ``build(params, ndim=, in_channels=, out_channels=)`` returns an ``nn.Module`` mapping
    ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.
    ``size_divisor(params)`` is the factor every spatial size must be a multiple of (e.g.
    ``2**depth`` for a U-Net); ``halo(params)`` the number of pixels at a tile's edge
    that differ from whole-image inference and must be discarded when tiling.
    """

    kind: ClassVar[str] = "backbone"
    name: str
    params: type[ComponentParams]
    build: Callable[..., nn.Module]
    size_divisor: Callable[[ComponentParams], int]
    halo: Callable[[ComponentParams], int]
    description: str = ""
    supported_ndims: tuple[int, ...] = (2, 3)
    architecture: ArchitectureSource | None = None


@runtime_checkable
class MaskingStrategy(Protocol):
    """Produces blind-spot training inputs for the self-supervised denoising term."""

    def __call__(
        self, patches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch ``(N, C, *spatial)``.

        Returns ``(masked_input, loss_mask)``: the network input with blind-spot pixels
        replaced, and a boolean tensor of the same shape that is True where the denoising
        loss is computed. Must be vectorised (no Python loop over pixels) and run on the
        device of ``patches``.
        """
        ...


@dataclass(frozen=True)
class MaskingSpec:
    """A masking strategy: ``build(params)`` returns a :class:`MaskingStrategy`."""

    kind: ClassVar[str] = "masking"
    name: str
    params: type[ComponentParams]
    build: Callable[[ComponentParams], MaskingStrategy]
    description: str = ""


class SegmentationHead(Protocol):
    """The segmentation side of the network: targets, loss, activation, instances."""

    #: number of segmentation channels the backbone must produce for this head
    num_classes: int
    #: a name per segmentation channel, e.g. ("background", "foreground", "border")
    channel_names: tuple[str, ...]

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Turn one instance label image (0 = background) into the training target.

        Returns an int64 class-index array of the same shape as ``labels``.
        """
        ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Segmentation loss of a batch.

        ``logits`` is ``(N, num_classes, *spatial)``, ``targets`` ``(N, *spatial)`` int64,
        ``labelled`` a bool ``(N,)`` that is False for patches without annotation. Only
        labelled patches contribute; with none labelled the result is a zero that still
        belongs to the graph.
        """
        ...

    def activation(self) -> nn.Module:
        """A scriptable module turning logits ``(N, num_classes, *spatial)`` into probabilities
        (e.g. ``nn.Softmax(dim=1)``); it is part of the exported network."""
        ...

    def instances(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        """Probabilities ``(num_classes, *spatial)`` of one image to an instance label image."""
        ...

    #: foreground-probability thresholds tried when tuning on validation data
    threshold_candidates: tuple[float, ...]


@dataclass(frozen=True)
class HeadSpec:
    """A segmentation head: ``build(params)`` returns a :class:`SegmentationHead`."""

    kind: ClassVar[str] = "head"
    name: str
    params: type[ComponentParams]
    build: Callable[[ComponentParams], SegmentationHead]
    description: str = ""


class SemiSupervisedObjective(Protocol):
    """An extra training term that also learns segmentation from unlabelled patches.

    Called once per training step after the student's forward pass. ``teacher(x)`` returns
    the segmentation logits of the moving-average (EMA) network for an input batch ``x``
    (no gradient); ``progress`` is the fraction of the joint training done, in [0, 1], for
    ramping the term in. Returns a scalar that is added to the loss (already weighted).
    """

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
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SemiSupervisedSpec:
    """A semi-supervised objective: ``build(params)`` returns a :class:`SemiSupervisedObjective`."""

    kind: ClassVar[str] = "semi_supervised"
    name: str
    params: type[ComponentParams]
    build: Callable[[ComponentParams], SemiSupervisedObjective]
    description: str = ""


ComponentSpec = BackboneSpec | MaskingSpec | HeadSpec | SemiSupervisedSpec


@dataclass(frozen=True)
class RegisteredComponent:
    """A component together with where it came from."""

    spec: ComponentSpec
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.name
