"""``denoiseg zoo import``: a denoiseg bioimage.io package back to a checkpoint.

The package's ``config.denoiseg`` section holds the training config, normalisation,
threshold and dimensionality; its ``pytorch_state_dict`` weights have exactly the keys of
denoiseg's network (see :mod:`denoiseg_zoo.architecture`). The result has the layout of
:func:`denoiseg_core.checkpoint.save_checkpoint` without training state, so it can be
predicted with, evaluated, or fine-tuned (``denoiseg train --init-from``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from denoiseg_core import __version__
from denoiseg_core.checkpoint import CHECKPOINT_FORMAT, check_normalization, write_checkpoint_state
from denoiseg_core.config import stored_config
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.io import check_outputs
from denoiseg_core.model import build_model

from denoiseg_zoo.archive import PackageError, load_package, read_member, source_name
from denoiseg_zoo.runtime import denoiseg_section, package_head


def checkpoint_state_from_package(path: Path) -> dict[str, Any]:
    """The checkpoint dictionary (``denoiseg-checkpoint/1``) of a denoiseg package.

    Raises :class:`~denoiseg_core.errors.DenoiSegError` with one line if the package is
    unsafe, invalid, not made by denoiseg, or needs components that are not installed.
    """
    path = Path(path)
    descr = load_package(path)
    section = denoiseg_section(descr)
    if section is None:
        raise PackageError("not a denoiseg package (no config.denoiseg); only denoiseg packages become checkpoints", path)
    entry = descr.weights.pytorch_state_dict
    if entry is None:
        raise PackageError("the package has no pytorch_state_dict weights", path)
    try:
        state_dict = torch.load(io.BytesIO(read_member(path, source_name(entry))), map_location="cpu", weights_only=True)
    except DenoiSegError:
        raise
    except Exception as exc:
        raise PackageError(f"cannot read the pytorch_state_dict weights ({type(exc).__name__})", path) from None
    try:
        config = stored_config(section["training_config"])
        ndim, in_channels = int(section["ndim"]), int(section["in_channels"])
        normalization = {"mean": [float(v) for v in section["normalization"]["mean"]],
                         "std": [float(v) for v in section["normalization"]["std"]]}
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise PackageError(f"config.denoiseg is incomplete or invalid ({type(exc).__name__}: {str(exc).splitlines()[0]})", path) from None
    check_normalization(normalization, path)
    # the network is rebuilt from the installed plugin the package names, never from its Python files
    built = build_model(config, ndim=ndim, in_channels=in_channels)
    try:
        built.net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"the weights do not fit the packaged network ({str(exc).splitlines()[0]})", path) from None
    try:
        settings = package_head(section)[1]
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise PackageError(f"config.denoiseg has no valid instance settings ({type(exc).__name__}: {str(exc).splitlines()[0]})", path) from None
    tuned = section.get("instance_settings_tuned", section.get("threshold_tuned", True))
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.model_dump(mode="json"),
        "versions": {
            "denoiseg": __version__,
            "torch": str(torch.__version__),
            "plugins": dict(config.plugins),
            "package_denoiseg": section.get("denoiseg_version"),
        },
        "ndim": ndim,
        "in_channels": in_channels,
        "normalization": normalization,
        "instance_settings": settings.model_dump(mode="json") if tuned else None,
        "epoch": int(section.get("epoch") or 0),
        "model_state": {k: v.detach().cpu() for k, v in built.net.state_dict().items()},
        "training_state": None,
        "extra": {"imported_from": str(path), "package_name": descr.name, "package_evaluation": section.get("evaluation") or {}},
    }


def import_package(path: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the checkpoint of a denoiseg package to ``out`` (atomically; never over an existing file unless asked)."""
    out = Path(out)
    check_outputs([out], inputs=[path], overwrite=overwrite)
    state = checkpoint_state_from_package(path)
    write_checkpoint_state(out, state)  # plain data: loads with weights_only=True
    return out
