"""Opening bioimage.io model packages safely.

Every package is checked here before bioimageio.spec or bioimageio.core see it: it must
be a zip file, every member path must stay inside the folder it would be extracted to
(no absolute paths, drive letters or ``..``), and it must carry a model description, which
must parse as YAML within limits (no alias bombs). The description is then validated with file checks (every referenced file present, every
sha256 right); any problem is one line of :class:`~denoiseg_core.errors.DenoiSegError`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from denoiseg_core.errors import DenoiSegError

#: file names a bioimage.io description has inside a package (at its root)
DESCRIPTION_FILE_NAMES = ("rdf.yaml", "bioimageio.yaml")


class PackageError(DenoiSegError):
    """A model package is not a usable bioimage.io package."""


def _is_description_name(name: str) -> bool:
    return "/" not in name and (name in DESCRIPTION_FILE_NAMES or name.endswith(".bioimageio.yaml"))


def unsafe_member(name: str) -> bool:
    """True if extracting the zip member ``name`` could write outside the target folder."""
    if not name or "\\" in name or "\x00" in name:
        return True
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):  # /etc/x, C:/x
        return True
    return any(part == ".." for part in path.parts)


def check_package_zip(path: Path) -> list[str]:
    """Check that ``path`` is a zip with safe member paths and a model description.

    Returns the member names. Raises :class:`PackageError` otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError("package not found", path)
    if not path.is_file():
        raise PackageError("not a file (expected a bioimage.io model .zip)", path)
    if not zipfile.is_zipfile(path):
        raise PackageError("not a zip file (expected a bioimage.io model .zip)", path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if unsafe_member(name):
                    raise PackageError(f"unsafe member path {name!r} would escape the target folder; refusing the package", path)
            descriptions = [name for name in names if _is_description_name(name)]
            if not descriptions:
                raise PackageError(
                    "not a bioimage.io model package (no rdf.yaml or *.bioimageio.yaml at the top of the zip)", path
                )
            for name in descriptions:
                description = check_description_yaml(archive, name, path)
                missing = sorted(set(referenced_files(description)) - set(names))
                if missing:  # bioimageio.spec's own message for this is about a NoneType
                    raise PackageError(f"file {missing[0]!r} named in {name} is missing from the package", path)
                check_declared_sizes(description, name, path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"cannot read zip ({exc})", path) from None
    return names


def referenced_files(node: Any) -> list[str]:
    """Package-relative file names a description points to (``source:`` entries that are not URLs)."""
    found: list[str] = []
    if isinstance(node, dict):
        source = node.get("source")
        if isinstance(source, str) and "://" not in source and not source.startswith(("/", "doi:")):
            found.append(str(PurePosixPath(source)).removeprefix("./"))
        for value in node.values():
            found.extend(referenced_files(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(referenced_files(value))
    return found


#: the largest input size along one axis a package may declare (larger ones are a broken or
#: hostile description; bioimageio.spec's message for them is "No functions provided to try")
MAX_DECLARED_AXIS_SIZE = 65536


def check_declared_sizes(description: Any, name: str, path: Path) -> None:
    """One line for an input axis whose declared (minimum) size is absurdly large."""
    inputs = description.get("inputs") if isinstance(description, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        axes = tensor.get("axes") if isinstance(tensor, dict) else None
        for axis in axes if isinstance(axes, list) else []:
            size = axis.get("size") if isinstance(axis, dict) else None
            smallest = size.get("min") if isinstance(size, dict) else size
            if isinstance(smallest, int) and smallest > MAX_DECLARED_AXIS_SIZE:
                raise PackageError(
                    f"{name}: input {tensor.get('id', '?')!r} declares size {smallest:,} on axis {axis.get('id', '?')!r} "
                    f"(more than {MAX_DECLARED_AXIS_SIZE:,}); refusing the package",
                    path,
                )


def check_description_yaml(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    """Parse a package's description with limits before bioimageio.spec sees it: a syntax
    error, an oversized file or an alias bomb is one line, not a traceback or a hang."""
    from denoiseg_core.errors import DataError
    from denoiseg_core.io import MAX_YAML_BYTES, load_yaml

    if archive.getinfo(name).file_size > MAX_YAML_BYTES:
        raise PackageError(f"{name} is larger than {MAX_YAML_BYTES // 2**20} MiB; refusing the package", path)
    try:
        text = archive.read(name).decode("utf-8")
        return load_yaml(text, name)
    except UnicodeDecodeError:
        raise PackageError(f"{name} is not UTF-8 text", path) from None
    except DataError as exc:
        raise PackageError(f"{exc}", path) from None


def summary_reason(summary: Any, limit: int = 3) -> str:
    """The first few errors of a bioimageio ``ValidationSummary`` as one line."""
    messages = []
    for detail in summary.details:
        for error in detail.errors:
            location = ".".join(str(part) for part in error.loc)
            text = " ".join(str(error.msg).split())
            messages.append(f"{location}: {text}" if location else text)
    if not messages:
        return f"status {summary.status}"
    extra = f" (+{len(messages) - limit} more)" if len(messages) > limit else ""
    return "; ".join(messages[:limit]) + extra


def load_package(path: Path):
    """The validated ``ModelDescr`` (format 0.5) of a package; one-line error if unusable.

    Older 0.4 packages are converted to 0.5 by bioimageio.spec.
    """
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    path = Path(path)
    check_package_zip(path)
    try:
        descr = load_description(path, format_version="latest", perform_io_checks=True)
    except Exception as exc:  # bioimageio raises many types for broken yaml
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PackageError(f"cannot load the package description ({reason[:300]})", path) from None
    if isinstance(descr, InvalidDescr):
        raise PackageError(f"invalid bioimage.io package: {summary_reason(descr.validation_summary)}", path)
    if not isinstance(descr, v0_5.ModelDescr):
        raise PackageError(f"not a model package (resource type {getattr(descr, 'type', '?')!r})", path)
    return descr


def read_member(path: Path, name: str) -> bytes:
    """The bytes of one member of a (checked) package."""
    if unsafe_member(name):
        raise PackageError(f"unsafe file name {name!r} in the package description", path)
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(name)
    except KeyError:
        raise PackageError(f"file {name!r} named in the description is missing from the package", path) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackageError(f"cannot read {name!r} from the package ({type(exc).__name__})", path) from None


def source_name(file_descr: Any) -> str:
    """The package-relative name of a file a description entry points to."""
    source = file_descr.source
    # a packaged source is a relative path (or a path under the package's zip root)
    name = getattr(source, "path", None) or str(source)
    return PurePosixPath(str(name)).name
