"""``denoiseg predict``: denoise and segment TIFF images with a trained checkpoint.

Every output path is checked before any image is read or predicted, so a refused run
writes nothing; each file is written atomically, so an interrupted run never leaves a
half-written TIFF, and ``--skip-existing`` continues an interrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from denoiseg_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rich.console import Console

    from denoiseg_core.checkpoint import LoadedModel

OUTPUT_KINDS = ("denoised", "labels", "probabilities")


# --------------------------------------------------------------------------- shared with `evaluate`


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
SkipExistingOption = Annotated[
    bool,
    typer.Option(
        "--skip-existing",
        help="skip inputs whose outputs all exist (continue an interrupted run); redo any that were cut off",
    ),
]


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when the labels fit (smaller files, opens everywhere), else int32."""
    return np.dtype(np.uint16) if labels.size == 0 or labels.max() < 2**16 else np.dtype(np.int32)


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


# --------------------------------------------------------------------------- predict


def plan_outputs(
    files: Sequence[Path],
    out: Path,
    probabilities: bool,
    overwrite: bool,
    skip_existing: bool = False,
    protected: Sequence[Path] = (),
) -> list[dict[str, Path] | None]:
    """The output paths of every input (None: skipped, its outputs exist and ``skip_existing``);
    errors before any work if an output exists (without ``overwrite``), is an input (or one of
    ``protected``, e.g. the checkpoint), or would be written by two inputs."""
    from denoiseg_core.io import plan_batch_outputs

    kinds = OUTPUT_KINDS if probabilities else OUTPUT_KINDS[:2]
    plans = []
    for file in files:
        stem = file.name[: -len(file.suffix)] if file.suffix else file.name
        plans.append({kind: out / f"{stem}_{kind}.tif" for kind in kinds})
    todo = plan_batch_outputs(
        [list(plan.values()) for plan in plans],
        inputs=[*files, *protected],
        overwrite=overwrite,
        skip_existing=skip_existing,
    )
    return [plan if run else None for plan, run in zip(plans, todo)]


def predict_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint .pt file or run folder (uses best.pt, else last.pt)")],
    inputs: Annotated[list[Path], typer.Argument(help="TIFF images and/or folders of TIFF images")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    probabilities: Annotated[
        bool, typer.Option("--probabilities/--no-probabilities", help="also write NAME_probabilities.tif (K, *spatial)")
    ] = False,
    threshold: Annotated[
        float | None, typer.Option(help="foreground threshold (default: the one tuned during training, else 0.5)")
    ] = None,
    tile: Annotated[
        str | None,
        typer.Option(
            help="tile size, e.g. 256,256 or 'auto' (default: whole image up to 1024x1024 pixels, tiles above);"
            " grown if needed to cover the network's receptive field"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="tiles per forward pass")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast where the device has fast bf16, else fp32), fp32 or bf16")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace existing output files")] = False,
    skip_existing: SkipExistingOption = False,
    trust_checkpoint: TrustCheckpointOption = False,
) -> None:
    """Denoise and segment images: writes NAME_denoised.tif and NAME_labels.tif for each input."""
    from rich.table import Table

    from denoiseg_core.io import write_tiff
    from denoiseg_core.prediction import predict_image, segment
    from denoiseg_core.runtime import resolve_device

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: use auto, fp32 or bf16")
    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"--threshold {threshold}: must be between 0 and 1")
    model = load_model(checkpoint, trust_checkpoint)
    tile_size = parse_tile(tile, model.ndim)
    target = resolve_device(device)
    files = collect_inputs(inputs)
    all_plans = plan_outputs(files, out, probabilities, overwrite, skip_existing, protected=[model.path])
    skipped = sum(plan is None for plan in all_plans)
    files, plans = [f for f, p in zip(files, all_plans) if p is not None], [p for p in all_plans if p is not None]
    for file in files:
        precheck_input(file, model)
    keep_channel_axis = model_axes(model).startswith("C")
    used_threshold = threshold if threshold is not None else (model.threshold if model.threshold is not None else 0.5)

    console = stderr_console()
    rows = []
    with progress_bar(console) as progress:
        task = progress.add_task("predicting", total=len(files), current="")
        for file, plan in zip(files, plans):
            progress.update(task, current=file.name)
            start = time.perf_counter()
            image = read_model_input(file, model)
            prediction = predict_image(
                model, image, tile=tile_size, batch_size=batch_size, device=target, precision=precision
            )
            labels = segment(model, prediction, used_threshold)
            denoised = prediction.denoised if keep_channel_axis else prediction.denoised[0]
            written = tuple(files)
            replace = overwrite or skip_existing  # skip_existing: outputs of a cut-off image are redone
            # labels last: with --skip-existing an image counts as done only once all its outputs exist
            write_tiff(plan["denoised"], denoised.astype(np.float32, copy=False), overwrite=replace, inputs=written)
            if probabilities:
                write_tiff(plan["probabilities"], prediction.probabilities, overwrite=replace, inputs=written)
            write_tiff(plan["labels"], labels.astype(labels_dtype(labels)), overwrite=replace, inputs=written)
            objects = int(np.count_nonzero(np.unique(labels)))
            rows.append((file.name, "x".join(map(str, image.shape[1:])), objects, time.perf_counter() - start))
            progress.advance(task)

    note = f", {skipped} skipped (outputs exist)" if skipped else ""
    table = Table(title=f"denoiseg predict: {len(files)} image(s){note} -> {out}  (threshold {used_threshold:.2f})")
    for column, justify in (("image", "left"), ("shape", "right"), ("objects", "right"), ("seconds", "right")):
        table.add_column(column, justify=justify)
    for name, shape, objects, seconds in rows:
        table.add_row(name, shape, str(objects), f"{seconds:.1f}")
    from rich.console import Console

    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
