"""Checkpoints: weights plus everything needed to use them (config, normalisation, threshold,
versions), and for ``last.pt`` the optimizer/scheduler/RNG state to resume training."""

from __future__ import annotations

import io as _io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from denoiseg_core import __version__
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.errors import DataError
from denoiseg_core.io import atomic_write_bytes
from denoiseg_core.model import BuiltModel, InferenceNet, build_model

CHECKPOINT_FORMAT = "denoiseg-checkpoint/1"


@dataclass
class Normalization:
    """Per-channel dataset statistics; the network sees ``(x - mean) / std``."""

    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return {"mean": list(map(float, self.mean)), "std": list(map(float, self.std))}


@dataclass
class LoadedModel:
    """A checkpoint turned back into a usable model."""

    path: Path
    config: DenoiSegConfig
    built: BuiltModel
    normalization: Normalization
    threshold: float | None
    ndim: int
    in_channels: int
    versions: dict[str, Any]
    state: dict[str, Any] = field(repr=False)

    @property
    def net(self):
        return self.built.net

    @property
    def head(self):
        return self.built.head

    def inference_net(self) -> InferenceNet:
        net = InferenceNet(self.built.net, self.built.head)
        net.eval()
        return net


def save_checkpoint(
    path: Path,
    *,
    config: DenoiSegConfig,
    built: BuiltModel,
    normalization: Normalization,
    threshold: float | None = None,
    epoch: int = 0,
    training_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, then rename).

    ``model_state``: the weights to store (e.g. a moving average of them); default ``built.net``'s.
    """
    if model_state is None:
        model_state = built.net.state_dict()
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.model_dump(mode="json"),
        "versions": {"denoiseg": __version__, "torch": torch.__version__, "plugins": dict(config.plugins)},
        "ndim": built.ndim,
        "in_channels": built.in_channels,
        "normalization": normalization.to_dict(),
        "threshold": threshold,
        "epoch": epoch,
        "model_state": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},  # plain layout even after channels_last training
        "training_state": training_state,
        "extra": extra or {},
    }
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The raw checkpoint dictionary, or a one-line error if ``path`` is not a denoiseg checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DataError("checkpoint not found", path)
    try:
        # weights_only=False: the state holds plain Python containers and numpy RNG state.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"not a readable checkpoint ({type(exc).__name__})", path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"not a denoiseg checkpoint (expected format {CHECKPOINT_FORMAT})", path)
    return state


def load_checkpoint(path: Path, registry=None) -> LoadedModel:
    """Load a checkpoint into a model on the CPU, in eval mode."""
    path = Path(path)
    if path.is_dir():  # a run folder: prefer the best checkpoint
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    state = read_checkpoint_state(path)
    config = DenoiSegConfig.model_validate(state["config"])
    built = build_model(config, ndim=state["ndim"], in_channels=state["in_channels"], registry=registry)
    built.net.load_state_dict(state["model_state"])
    built.net.eval()
    return LoadedModel(
        path=path,
        config=config,
        built=built,
        normalization=Normalization(**state["normalization"]),
        threshold=state.get("threshold"),
        ndim=state["ndim"],
        in_channels=state["in_channels"],
        versions=state.get("versions", {}),
        state=state,
    )
