"""User-facing errors.

Anything that is the user's mistake (a missing file, a corrupt TIFF, an unknown component)
is raised as :class:`DenoiSegError`. The CLI prints its message as one line and exits
non-zero; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class DenoiSegError(Exception):
    """A problem with the user's input or setup, explained in one line."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class ConfigError(DenoiSegError):
    """The configuration names something that does not exist or has invalid values."""


class DataError(DenoiSegError):
    """An input image, mask or folder cannot be used."""


class PluginError(DenoiSegError):
    """A plugin is broken, misspells a hook, or registers a duplicate component."""
