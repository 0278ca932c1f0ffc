"""File input/output: TIFF reading with one-line errors, atomic writes that never clobber inputs."""

from __future__ import annotations

import glob
import io as _io
import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from denoiseg_core.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")


#: longest part of an output's name kept in its temporary name: ``.NAME.xxxxxxxx.part`` must
#: stay within the 255-byte file-name limit of common file systems
TEMPORARY_NAME_CHARS = 120

#: suffixes of the temporary files :func:`atomic_path` creates (``.zip``: packages)
TEMPORARY_SUFFIXES = (".part", ".partial.zip")


def temporary_prefix(path: Path) -> str:
    """The start of the temporary names of ``path`` (also how stale ones are recognised)."""
    return f".{Path(path).name[:TEMPORARY_NAME_CHARS]}."


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_reason(exc: OSError) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: '/x/.y.part'``."""
    return exc.strerror or type(exc).__name__


@contextmanager
def atomic_path(path: Path, suffix: str = ".part"):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` ends the temporary name (some writers pick the format from it, e.g. ``.zip``).
    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not
    mkstemp's 0600. Any OSError (read-only or full disk, a parent that is a file, a name too
    long) becomes a one-line :class:`DataError` naming ``path``; nothing is left under the
    final name or as a temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
    except OSError as exc:
        raise DataError(f"cannot write ({os_reason(exc)})", path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise DataError(f"cannot write ({os_reason(exc)})", path) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(targets: Iterable[Path]) -> list[Path]:
    """Delete the temporary files a killed writer left beside ``targets``; returns them.

    Only names :func:`atomic_path` makes for these targets are touched (``.NAME.xxxx.part``).
    """
    removed = []
    for target in targets:
        target = Path(target)
        if not target.parent.is_dir():
            continue
        prefix = temporary_prefix(target)
        for candidate in target.parent.glob(glob.escape(prefix) + "*"):
            if candidate.name.endswith(TEMPORARY_SUFFIXES) and candidate.is_file():
                try:
                    candidate.unlink()
                except OSError:
                    continue  # one we may not remove just stays; it is never read
                removed.append(candidate)
    return removed


def check_outputs(
    outputs: Iterable[Path], *, inputs: Iterable[Path] = (), overwrite: bool = False, what: str = "output"
) -> None:
    """The checks every command runs on its outputs before any work (the same ``--overwrite``
    rules everywhere): no output is an input, no two outputs are the same file, an existing
    output needs ``--overwrite``, an existing output must be a file, and its folder must be
    creatable and writable. Temporary files a killed run left beside the outputs are removed."""
    protected = {Path(p).resolve() for p in inputs}
    seen: set[Path] = set()
    folders: set[Path] = set()
    for output in outputs:
        output = Path(output)
        resolved = output.resolve()
        if resolved in protected:
            raise DataError(f"refusing to overwrite an input file with the {what}", output)
        if resolved in seen:
            raise DataError(f"two {what}s of this command would be written to the same file", output)
        seen.add(resolved)
        if output.exists() or output.is_symlink():
            if not output.is_file():
                raise DataError(f"{what} path exists and is not a file", output)
            if not overwrite:
                raise DataError(f"{what} exists (use --overwrite to replace it)", output)
        if len(output.name.encode()) > 255:
            raise DataError(f"{what} file name is longer than 255 bytes", output)
        folders.add(output.parent)
    for folder in folders:
        check_writable_folder(folder)
    remove_stale_temporaries(seen)  # left by a killed run of a command writing these outputs


def check_writable_folder(folder: Path) -> None:
    """Check, before any work and without creating anything, that files can be written in
    ``folder`` (or, if it does not exist yet, that it can be created)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError("cannot write below this path: it is not a folder", existing)
    if existing == folder:
        try:
            with tempfile.TemporaryFile(dir=folder):  # the real test (read-only mounts, ACLs); removed at once
                pass
        except OSError as exc:
            raise DataError(f"cannot write to this folder ({os_reason(exc)})", folder) from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise DataError("cannot create a folder here (permission denied)", existing)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
        with tifffile.TiffFile(path) as tif:
            series = len(tif.series)
            # tifffile.imread would return the first series only and drop the others silently
            if series > 1:
                raise DataError(f"TIFF holds {series} images (series); save one image per file", path)
            array = tif.asarray()
    except DataError:
        raise
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


def plan_batch_outputs(
    outputs_per_input: Sequence[Sequence[Path]],
    *,
    inputs: Iterable[Path],
    overwrite: bool,
    skip_existing: bool,
) -> list[bool]:
    """Check the outputs of a command that writes several files per input, before any work;
    returns for each input whether it still has to be processed.

    Outputs may never be inputs or collide with each other. An existing output needs
    ``--overwrite``; with ``--skip-existing`` an input whose outputs all exist is skipped (an
    interrupted run continues where it stopped) and the outputs of one that was cut off half
    way are written again. Temporary files a killed run left beside the outputs are removed
    (by :func:`check_outputs`).
    """
    from denoiseg_core.errors import ConfigError

    if overwrite and skip_existing:
        raise ConfigError("--overwrite and --skip-existing exclude each other (redo everything, or only what is missing)")
    everything = [Path(p) for outputs in outputs_per_input for p in outputs]
    check_outputs(everything, inputs=inputs, overwrite=True)  # inputs, collisions, folders; existence below
    todo = []
    for outputs in outputs_per_input:
        existing = [Path(p) for p in outputs if Path(p).exists()]
        if skip_existing and len(existing) == len(outputs):
            todo.append(False)
            continue
        if existing and not (overwrite or skip_existing):
            raise DataError(
                "output exists (use --overwrite to replace it, or --skip-existing to continue an interrupted run)",
                existing[0],
            )
        todo.append(True)
    return todo


#: limits for YAML read from files (configs, packages' rdf.yaml): aliases may not expand a
#: small file into a huge tree ("billion laughs"), which would hang whatever walks it
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_EXPANDED_NODES = 200_000


def load_yaml(text: str, source: Path | str) -> Any:
    """``yaml.safe_load`` with limits: one-line :class:`DataError` naming ``source`` for a
    syntax error, a file over :data:`MAX_YAML_BYTES`, or aliases that expand to more than
    :data:`MAX_YAML_EXPANDED_NODES` nodes."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise DataError(f"YAML file larger than {MAX_YAML_BYTES // 2**20} MiB", source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay shared here: no expansion yet
        if root is not None:
            expanded = _expanded_nodes(root, {})
            if expanded > MAX_YAML_EXPANDED_NODES:
                raise DataError(
                    f"YAML aliases expand to {expanded:,} nodes (limit {MAX_YAML_EXPANDED_NODES:,}); refusing it", source
                )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML ({' '.join(str(exc).split())[:200]})", source) from None
    except RecursionError:
        raise DataError("YAML is nested too deeply", source) from None


def _expanded_nodes(node: Any, memo: dict[int, int]) -> int:
    """How many nodes ``node`` becomes once every alias is copied out (shared nodes counted once per use)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded_nodes(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        count = 1
    memo[key] = min(count, 2**62)
    return memo[key]
