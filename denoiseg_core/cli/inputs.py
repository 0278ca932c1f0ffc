"""What the commands that run a checkpoint on TIFF images share (``predict``, ``evaluate``):
the ``--trust-checkpoint`` and ``--tile`` options, loading the checkpoint, finding the inputs
and checking them against the model before any pixel is predicted, and the progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from denoiseg_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rich.console import Console

    from denoiseg_core.checkpoint import LoadedModel


#: help of ``--threshold`` (predict, evaluate)
THRESHOLD_HELP = (
    "the head's primary threshold (the foreground threshold of the built-in heads); "
    "default: the instance settings tuned during training, else the head's defaults"
)


def parse_tile(text: str | None, ndim: int) -> tuple[int, ...] | str | None:
    """``"256,256"`` -> (256, 256); ``"auto"`` stays; ``None`` -> None (whole image when small)."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--tile {text!r}: expected 'auto' or comma-separated sizes such as 256,256") from None
    if len(sizes) != ndim:
        raise ConfigError(f"--tile {text!r} has {len(sizes)} size(s) but the model works on {ndim}-D images")
    if any(s < 1 for s in sizes):
        raise ConfigError(f"--tile {text!r}: sizes must be positive")
    return sizes


def model_axes(model: LoadedModel) -> str:
    """The axes the model's training images had; ``auto`` means YX or ZYX with one channel."""
    return model.config.data.axes


def check_image_matches_model(
    path: Path, spatial_ndim: int, channels: int, model: LoadedModel
) -> None:
    """One-line error if an image's dimensionality or channel count differs from the model's."""
    if spatial_ndim != model.ndim:
        raise DataError(f"{spatial_ndim}-D image but the model was trained on {model.ndim}-D images", path)
    if channels != model.in_channels:
        raise DataError(f"image has {channels} channel(s) but the model was trained on {model.in_channels}", path)


def precheck_input(path: Path, model: LoadedModel) -> None:
    """Check an input's shape against the model from the TIFF header, without reading pixels.

    Unreadable files get :func:`~denoiseg_core.io.read_image`'s one-line error. Shapes the
    header check cannot judge are left to :func:`read_model_input`.
    """
    import tifffile

    from denoiseg_core.io import read_image

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception:
        read_image(path)  # raises the proper one-line DataError
        return
    axes = model_axes(model)
    if axes == "auto":
        if len(shape) == 3 and shape[-1] in (3, 4) and model.ndim == 2:
            raise DataError(f"shape {shape} looks like an RGB(A) image; convert it to a single-channel (grayscale) image", path)
        if len(shape) in (2, 3):
            check_image_matches_model(path, len(shape), 1, model)
    elif len(shape) == len(axes):
        channels = shape[0] if axes.startswith("C") else 1
        check_image_matches_model(path, len(axes) - axes.startswith("C"), channels, model)


def read_model_input(path: Path, model: LoadedModel) -> np.ndarray:
    """Read a TIFF as the model's ``(C, *spatial)`` float32 input, or fail with one line naming it."""
    from denoiseg_core.data import to_channel_first
    from denoiseg_core.io import read_image

    image = to_channel_first(read_image(path), model_axes(model), path)
    check_image_matches_model(path, image.ndim - 1, image.shape[0], model)
    return image


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """TIFF files given directly or found in given folders, in order, without duplicates."""
    from denoiseg_core.io import TIFF_SUFFIXES, list_images

    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files.extend(list_images(item))
        elif not item.exists():
            raise DataError("input not found", item)
        elif not item.is_file():  # a FIFO or device would block or stream forever
            raise DataError("not a regular file", item)
        elif item.suffix.lower() not in TIFF_SUFFIXES:
            raise DataError(f"not a TIFF file (expected {' or '.join(TIFF_SUFFIXES)})", item)
        else:
            files.append(item)
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def load_model(checkpoint: Path, trust_checkpoint: bool = False) -> LoadedModel:
    from denoiseg_core.checkpoint import load_checkpoint, trusting_checkpoints

    with trusting_checkpoints(trust_checkpoint):
        return load_checkpoint(checkpoint)


#: the ``--trust-checkpoint`` option of every command that reads a checkpoint
TrustCheckpointOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="load a checkpoint that needs full unpickling (it can run code from the file: only for files you trust)",
    ),
]

#: the ``--denoiser`` option of the commands that write or score denoised images
DenoiserOption = Annotated[
    str,
    typer.Option(
        help="checkpoint for the denoised images: 'auto' (given a run folder, its best_denoising.pt, the epoch "
        "that denoised validation images best, when there is one; else CHECKPOINT), 'same' (CHECKPOINT), or a .pt file"
    ),
]


#: the ``--denoiser`` choices that name no file of their own
DENOISER_RULES = ("auto", "same")


def names_denoiser_file(choice: str) -> bool:
    """Whether ``--denoiser`` names a checkpoint file rather than a rule (:data:`DENOISER_RULES`)."""
    return choice not in DENOISER_RULES


def load_denoiser(checkpoint: Path, choice: str, model: LoadedModel, trust_checkpoint: bool = False) -> LoadedModel | None:
    """The model that denoises when it is not ``model`` itself (``--denoiser``; None: ``model``)."""
    from denoiseg_core.checkpoint import run_denoiser_path

    if choice == "same":
        return None
    if choice == "auto":
        path = run_denoiser_path(checkpoint)
        if path is None:
            return None
    else:
        path = Path(choice)
    denoiser = load_model(path, trust_checkpoint)
    if (denoiser.ndim, denoiser.in_channels) != (model.ndim, model.in_channels):
        raise ConfigError(
            f"--denoiser {denoiser.path}: a {denoiser.ndim}D model of {denoiser.in_channels} "
            f"channel(s), but {model.path} is {model.ndim}D with {model.in_channels}"
        )
    return denoiser


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
        console=console,
        transient=True,
    )
