"""Checkpoints: weights plus everything needed to use them (config, normalisation, the tuned
instance settings, versions), and for ``last.pt`` the optimizer/scheduler/RNG state to resume training.

A checkpoint holds plain data only (dicts, lists, str, int, float, bool, None, tensors), so
it is read with ``torch.load(weights_only=True)``: a file that needs full unpickling (which
can run any code the file carries) is refused with one line, unless the user opts in with
``--trust-checkpoint`` (:func:`trusting_checkpoints`).
"""

from __future__ import annotations

import io as _io
import math
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from denoiseg_core import __version__
from denoiseg_core.components import InstanceSettings
from denoiseg_core.config import DenoiSegConfig, stored_config
from denoiseg_core.data import Normalization
from denoiseg_core.errors import DataError
from denoiseg_core.io import atomic_write_bytes
from denoiseg_core.model import BuiltModel, InferenceNet, build_model
from denoiseg_core.plugin_manager import get_plugin_manager

CHECKPOINT_FORMAT = "denoiseg-checkpoint/1"

#: the command-line flag that allows full unpickling (named in the refusal)
TRUST_FLAG = "--trust-checkpoint"

#: keys every checkpoint has; others (added by newer versions or plugins) load as they are
REQUIRED_KEYS = ("config", "ndim", "in_channels", "normalization", "model_state")
#: a run folder's checkpoint with the lowest validation denoising loss (written when denoising is trained)
BEST_DENOISING = "best_denoising.pt"

_full_unpickling_allowed: ContextVar[bool] = ContextVar("denoiseg_full_unpickling_allowed", default=False)


@contextmanager
def trusting_checkpoints(trusted: bool = True) -> Iterator[None]:
    """Within the block, checkpoints that need full unpickling are loaded (the user vouched for them)."""
    token = _full_unpickling_allowed.set(trusted)
    try:
        yield
    finally:
        _full_unpickling_allowed.reset(token)


def plain_data(value: Any) -> Any:
    """``value`` with every container and scalar turned into the plain types
    ``torch.load(weights_only=True)`` reads (e.g. torch's version string class, numpy scalars
    and arrays, tuples inside RNG states stay tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_data(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return plain_data(item())
    if hasattr(value, "__array__"):
        return torch.as_tensor(value)
    raise TypeError(f"checkpoints hold plain data only; got {type(value).__name__}")


@dataclass
class LoadedModel:
    """A checkpoint turned back into a usable model."""

    path: Path
    config: DenoiSegConfig
    built: BuiltModel
    normalization: Normalization
    #: the instance settings tuned during training (None: not tuned)
    tuned_settings: InstanceSettings | None
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

    @property
    def instance_settings(self) -> InstanceSettings:
        """The tuned instance settings, else the head's defaults."""
        return self.tuned_settings if self.tuned_settings is not None else self.built.head.settings()

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
    instance_settings: InstanceSettings | None = None,
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
        "versions": {"denoiseg": __version__, "torch": str(torch.__version__), "plugins": dict(config.plugins)},
        "ndim": built.ndim,
        "in_channels": built.in_channels,
        "normalization": normalization.to_dict(),
        "instance_settings": None if instance_settings is None else instance_settings.model_dump(mode="json"),
        "epoch": epoch,
        "model_state": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},  # plain layout even after channels_last training
        "training_state": training_state,
        "extra": extra or {},
    }
    write_checkpoint_state(path, state)


def write_checkpoint_state(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dictionary atomically, as plain data (loadable with ``weights_only=True``)."""
    buffer = _io.BytesIO()
    torch.save(plain_data(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The raw checkpoint dictionary, or a one-line error if ``path`` is not a usable denoiseg checkpoint.

    Read with ``weights_only=True``; a file that needs full unpickling is refused (it could
    run code) unless :func:`trusting_checkpoints` is active.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("checkpoint not found" if not path.exists() else "checkpoint is not a regular file", path)
    try:
        # TorchVersion is a str subclass that checkpoints of denoiseg <= 0.1 stored; safe to allow.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _full_unpickling_allowed.get():
            detail = _unsupported_global(exc)
            raise DataError(
                f"checkpoint holds Python objects beyond plain data{detail}; loading it could run code from the file, "
                f"so it is refused (re-run with {TRUST_FLAG} only if you trust where it came from)",
                path,
            ) from None
        state = _load_fully(path)
    except OSError as exc:
        raise DataError(f"cannot read checkpoint ({exc.strerror or type(exc).__name__})", path) from None
    except Exception as exc:
        raise DataError(f"not a readable checkpoint ({type(exc).__name__})", path) from None
    check_checkpoint_state(state, path)
    return state


def read_package_state(path: Path) -> dict[str, Any]:
    """The checkpoint dictionary of a model package (``train --init-from MODEL.zip``), read by the
    plugin that implements ``denoiseg_read_package_weights`` (denoiseg's zoo, for bioimage.io
    packages); a one-line error if no installed plugin reads it."""
    path = Path(path)
    state = get_plugin_manager().hook.denoiseg_read_package_weights(path=path)
    if state is None:
        raise DataError(
            "no installed plugin reads model packages (hook denoiseg_read_package_weights; "
            "denoiseg's zoo reads bioimage.io packages)", path,
        )
    check_checkpoint_state(state, path)
    return state


def check_checkpoint_state(state: Any, path: Path) -> None:
    """A one-line error naming ``path`` unless ``state`` is a complete denoiseg checkpoint dictionary."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"not a denoiseg checkpoint (expected format {CHECKPOINT_FORMAT})", path)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise DataError(f"checkpoint is incomplete (no {', '.join(missing)})", path)
    if not isinstance(state["model_state"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model_state"].values()):
        raise DataError("checkpoint model_state is not a dictionary of tensors", path)
    check_normalization(state["normalization"], path)


def _unsupported_global(exc: Exception) -> str:
    """`` (e.g. os.system)`` from torch's weights-only error, when it names the offending global."""
    import re

    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    return f" (e.g. {match.group(1)})" if match else ""


def _load_fully(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"not a readable checkpoint ({type(exc).__name__})", path) from None


def check_normalization(normalization: Any, path: Path) -> None:
    """Finite means and positive finite standard deviations, one per channel; else one line naming ``path``."""
    try:
        mean = [float(v) for v in normalization["mean"]]
        std = [float(v) for v in normalization["std"]]
    except (KeyError, TypeError, ValueError):
        raise DataError("checkpoint normalisation is not {mean: [...], std: [...]}", path) from None
    if len(mean) != len(std) or not mean:
        raise DataError("checkpoint normalisation has mismatched or empty mean/std", path)
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise DataError(
            f"checkpoint normalisation is not usable (mean {mean}, std {std}): every value must be finite "
            "and std positive", path,
        )


def load_checkpoint(path: Path, registry=None) -> LoadedModel:
    """Load a checkpoint into a model on the CPU, in eval mode."""
    path = Path(path)
    if path.is_dir():  # a run folder: prefer the best checkpoint
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    state = read_checkpoint_state(path)
    try:
        config = stored_config(state["config"])
    except ValidationError as exc:
        raise DataError(f"checkpoint config is invalid ({str(exc).splitlines()[0]})", path) from None
    built = build_model(config, ndim=state["ndim"], in_channels=state["in_channels"], registry=registry)
    load_weights(built.net, state["model_state"], path)
    built.net.eval()
    return LoadedModel(
        path=path,
        config=config,
        built=built,
        normalization=Normalization(**state["normalization"]),
        tuned_settings=_stored_settings(state, built.head, path),
        ndim=state["ndim"],
        in_channels=state["in_channels"],
        versions=state.get("versions", {}),
        state=state,
    )


def run_denoiser_path(source: Path) -> Path | None:
    """The checkpoint that denoises best for ``source``: a run folder's ``best_denoising.pt``; None
    when ``source`` is a checkpoint file or its run has none (its segmentation checkpoint denoises)."""
    path = Path(source) / BEST_DENOISING
    return path if Path(source).is_dir() and path.is_file() else None


def _stored_settings(state: dict[str, Any], head, path: Path) -> InstanceSettings | None:
    """The tuned instance settings of a checkpoint; one written before heads had settings
    stores a scalar ``threshold``, which becomes the head's primary threshold."""
    try:
        if state.get("instance_settings") is not None:
            return head.settings.model_validate(state["instance_settings"])
        if state.get("threshold") is not None:
            return head.settings().with_threshold(float(state["threshold"]))
    except ValidationError as exc:
        raise DataError(f"the checkpoint's instance settings are invalid ({str(exc).splitlines()[0]}: {exc.errors()[0]['msg']})", path) from None
    return None


def load_weights(net: torch.nn.Module, model_state: dict[str, Any], path: Path) -> None:
    """``net.load_state_dict(model_state)`` with a one-line error naming ``path`` when they do not fit."""
    try:
        net.load_state_dict(model_state)
    except (RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"the checkpoint's weights do not fit the network its config describes ({reason})", path) from None
