"""What a plugin registers: backbones, masking strategies, segmentation heads and
semi-supervised objectives.

Each component is a small frozen record with a unique ``name``, a pydantic model of its
parameters (``params``, strict: unknown parameters are rejected) and a factory. The
factories receive a validated instance of ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from denoiseg_core.metrics import Tuning


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
    #: bioimage.io tags an exported package gets (e.g. ``("unet",)``)
    tags: tuple[str, ...] = ()


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


class InstanceSettings(BaseModel):
    """Base class of a head's instance settings (thresholds and the like), tuned on validation data.

    Strict like component parameters, and every field needs a ``description``. ``primary``
    names the field a single user-given threshold sets (``denoiseg predict --threshold``,
    the napari slider); it must be a float field in (0, 1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    primary: ClassVar[str] = "threshold"

    @property
    def primary_threshold(self) -> float:
        """The value of the primary field."""
        return float(getattr(self, self.primary))

    def with_threshold(self, value: float) -> InstanceSettings:
        """A copy with the primary field set to ``value`` (validated: a bad value raises ``ValidationError``)."""
        return type(self).model_validate({**self.model_dump(), self.primary: value})

    def describe(self) -> str:
        """One line for logs, e.g. ``threshold 0.45``."""
        return ", ".join(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in self)


@dataclass(frozen=True)
class TargetSpec:
    """The training target a head needs per label image.

    ``dtype``: a numpy dtype name (``"int64"`` class indices, ``"float32"`` maps, ...);
    ``channels``: ``None`` for a target of the label image's shape, ``k`` for ``(k, *shape)``.
    """

    dtype: str
    channels: int | None = None

    def shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(spatial) if self.channels is None else (self.channels, *spatial)


#: what a head's output channel holds: ``probability`` channels lie in [0, 1]
CHANNEL_ROLES = ("probability", "distance", "other")


@dataclass(frozen=True)
class OutputChannel:
    """One segmentation output channel (after the activation): its name, role and meaning."""

    name: str
    role: str
    description: str


@dataclass(frozen=True)
class HeadOutputs:
    """What an exporter needs to know about a head's outputs.

    ``channels``: one :class:`OutputChannel` per segmentation channel, in order.
    ``activation_code``: one Python expression, using only ``torch`` and the logits tensor
    ``segmentation`` ``(N, channels, *spatial)``, that computes the same as ``activation()``;
    it is written into the exported architecture file. ``summary``: one sentence on the
    channels for a README (e.g. "class probabilities (softmax, they sum to 1)").
    """

    channels: tuple[OutputChannel, ...]
    activation_code: str
    summary: str


class SegmentationHead(Protocol):
    """The segmentation side of the network, its whole life: the training target, loss and
    activation, instance settings (tuned on validation data) with the instance
    post-processing, and a description of its outputs for an exporter."""

    #: number of segmentation channels the backbone must produce for this head
    num_classes: int
    #: the training target per label image (the patch sampler allocates batches from it)
    target: TargetSpec
    #: the pydantic model of the instance settings
    settings: type[InstanceSettings]

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Turn one instance label image (0 = background) into the training target of ``target``'s
        dtype and shape."""
        ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Segmentation loss of a batch.

        ``logits`` is ``(N, num_classes, *spatial)``, ``targets`` a batch of ``targets()``
        ``(N, *target_shape)``, ``labelled`` a bool ``(N,)`` that is False for patches without
        annotation (their targets hold anything). Only labelled patches contribute; with none
        labelled the result is a zero that still belongs to the graph.
        """
        ...

    def activation(self) -> nn.Module:
        """A scriptable module turning logits ``(N, num_classes, *spatial)`` into the outputs
        (e.g. ``nn.Softmax(dim=1)``); it is part of the exported network."""
        ...

    def instances(self, outputs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
        """Activated outputs ``(num_classes, *spatial)`` of one image to an integer instance label image."""
        ...

    def tune(self, outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, quick: bool = False) -> Tuning:
        """The settings scoring best on images with known instance ``labels`` (see
        :func:`denoiseg_core.metrics.tune_by_grid`); ``quick``: a coarser search, for
        per-epoch validation."""
        ...

    def outputs(self) -> HeadOutputs:
        """The description of the outputs (channels, activation as code) for exporters."""
        ...

    def instances_text(self, settings: InstanceSettings) -> str:
        """A README paragraph (Markdown) on how instances are made from the outputs with ``settings``."""
        ...

    def imagej_macro(self, settings: InstanceSettings, denoised_channels: int) -> str | None:
        """An ImageJ macro computing the instances from an exported model's output (the denoised
        channels first, then this head's), with ``settings`` written in; ``None`` if there is none."""
        ...


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
