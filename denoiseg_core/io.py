"""File input/output: TIFF reading with one-line errors, atomic writes that never clobber inputs."""

from __future__ import annotations

import io as _io
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile

from denoiseg_core.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")


@contextmanager
def atomic_path(path: Path, suffix: str = ".part"):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` ends the temporary name (some writers pick the format from it, e.g. ``.zip``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(path: Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_image(path: Path) -> np.ndarray:
    """Read a TIFF image; any problem becomes a one-line :class:`DataError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    if not path.is_file():
        raise DataError("not a file", path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise DataError(f"not a TIFF file (expected {' or '.join(TIFF_SUFFIXES)})", path)
    try:
        array = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read TIFF ({reason})", path) from None
    array = np.asarray(array)
    if array.size == 0:
        raise DataError("image is empty", path)
    if array.dtype.kind not in "uifb":
        raise DataError(f"unsupported pixel type {array.dtype}", path)
    return array


def write_tiff(path: Path, array: np.ndarray, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write a TIFF atomically. Refuses to overwrite an existing file (unless asked) or any input."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == Path(p).resolve() for p in inputs):
        raise DataError("refusing to overwrite an input file", path)
    if path.exists() and not overwrite:
        raise DataError("output exists (use --overwrite to replace it)", path)
    buffer = _io.BytesIO()
    # minisblack: a (3, Y, X) stack (e.g. class probabilities) is channels, not an RGB picture
    tifffile.imwrite(
        buffer,
        np.ascontiguousarray(array),
        photometric="minisblack",
        compression="zlib" if array.dtype != np.float32 else None,
    )
    atomic_write_bytes(path, buffer.getvalue())


def list_images(folder: Path) -> list[Path]:
    """The TIFF files in ``folder``, sorted by name; errors if the folder is missing or has none."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError("folder not found", folder)
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError("no .tif/.tiff images in folder", folder)
    return files
