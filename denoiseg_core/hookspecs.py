"""The hooks a denoiseg plugin can implement.

A plugin is any importable module or object exposed through the ``denoiseg.plugins``
entry-point group. It implements one or more of the hooks below with the
:data:`hookimpl` marker::

    from denoiseg_core.hookspecs import hookimpl
    from denoiseg_core.components import BackboneSpec

    @hookimpl
    def denoiseg_register_backbones():
        return [BackboneSpec(name="my_net", params=MyNetParams, build=build_my_net)]

Every hook name starts with ``denoiseg_``; a plugin function with that prefix that
matches no hook here is an error (see :func:`denoiseg_core.plugin_manager.get_plugin_manager`).
The built-in components in ``denoiseg_plugins`` use exactly these hooks, and the core
reaches the model-package exporter (``denoiseg_zoo``) only through them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from denoiseg_core.components import BackboneSpec, HeadSpec, MaskingSpec, SemiSupervisedSpec

PROJECT_NAME = "denoiseg"
ENTRY_POINT_GROUP = "denoiseg.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def denoiseg_register_backbones() -> list[BackboneSpec]:
    """Return the network backbones this plugin provides.

    A backbone maps ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)`` for
    2D and/or 3D input; the engine chooses ``out_channels`` (denoised channels plus the
    head's segmentation channels).
    """


@hookspec
def denoiseg_register_masking_strategies() -> list[MaskingSpec]:
    """Return the blind-spot masking strategies (Noise2Void family) this plugin provides."""


@hookspec
def denoiseg_register_heads() -> list[HeadSpec]:
    """Return the segmentation heads this plugin provides.

    A head owns its training targets (built from instance labels), its loss term, the
    activation that turns logits into probabilities, and its instance post-processing.
    """


@hookspec
def denoiseg_register_semi_supervised_objectives() -> list[SemiSupervisedSpec]:
    """Return semi-supervised objectives (e.g. consistency with a mean teacher) this plugin provides.

    Chosen with ``training.semi_supervised``; the objective adds a term that learns
    segmentation from unlabelled patches too (see :class:`~denoiseg_core.components.SemiSupervisedObjective`).
    """


@hookspec
def denoiseg_register_commands(app: typer.Typer) -> None:
    """Add commands or command groups to the ``denoiseg`` CLI (``app.add_typer`` / ``app.command``)."""


@hookspec(firstresult=True)
def denoiseg_read_package_weights(path: Path) -> dict[str, Any] | None:
    """Read a model package (``denoiseg train --init-from MODEL.zip``) into a checkpoint dictionary.

    Return what :func:`denoiseg_core.checkpoint.read_checkpoint_state` returns for a
    checkpoint (format ``denoiseg-checkpoint/1``: config, ndim, in_channels, normalization,
    model_state, ...), or ``None`` for a package this plugin does not read; raise a
    :class:`~denoiseg_core.errors.DenoiSegError` naming ``path`` for one it cannot. Never run
    code from the package. The first plugin that answers wins; denoiseg's zoo reads
    bioimage.io packages it exported.
    """


@hookspec(firstresult=True)
def denoiseg_export_package(
    checkpoint: Path, out: Path, samples: list[Path], masks: list[Path], log: Callable[[str], None]
) -> Path | None:
    """Export ``checkpoint`` as a tested model package at ``out`` (replacing one there), with
    ``samples`` (TIFF images; may be empty) and their instance ``masks`` for test data, covers
    and scores; report progress through ``log``. Return the package's path, or ``None`` if this
    plugin does not export. ``denoiseg demo`` exports through it; denoiseg's zoo writes
    bioimage.io packages.
    """
