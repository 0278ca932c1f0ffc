"""``denoiseg predict``: denoise and segment TIFF images with a trained checkpoint.

Every output path is checked before any image is read or predicted, so a refused run
writes nothing; each file is written atomically, so an interrupted run never leaves a
half-written TIFF, and ``--skip-existing`` continues an interrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from denoiseg_core.cli.inputs import (
    THRESHOLD_HELP,
    DenoiserOption,
    TrustCheckpointOption,
    collect_inputs,
    load_denoiser,
    load_model,
    model_axes,
    parse_tile,
    precheck_input,
    progress_bar,
    read_model_input,
    stderr_console,
)
from denoiseg_core.errors import ConfigError

OUTPUT_KINDS = ("denoised", "labels", "probabilities")

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
        float | None, typer.Option(help=THRESHOLD_HELP)
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
    denoiser: DenoiserOption = "auto",
    trust_checkpoint: TrustCheckpointOption = False,
) -> None:
    """Denoise and segment images: writes NAME_denoised.tif and NAME_labels.tif for each input."""
    from rich.table import Table

    from denoiseg_core.evaluation import instance_settings, segment
    from denoiseg_core.io import write_tiff
    from denoiseg_core.prediction import predict_image
    from denoiseg_core.runtime import resolve_device

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: use auto, fp32 or bf16")
    model = load_model(checkpoint, trust_checkpoint)
    denoising_model = load_denoiser(checkpoint, denoiser, model, trust_checkpoint)
    tile_size = parse_tile(tile, model.ndim)
    target = resolve_device(device)
    files = collect_inputs(inputs)
    protected = [model.path] + ([denoising_model.path] if denoising_model is not None else [])
    all_plans = plan_outputs(files, out, probabilities, overwrite, skip_existing, protected=protected)
    skipped = sum(plan is None for plan in all_plans)
    files, plans = [f for f, p in zip(files, all_plans) if p is not None], [p for p in all_plans if p is not None]
    for file in files:
        precheck_input(file, model)
    keep_channel_axis = model_axes(model).startswith("C")
    settings = instance_settings(model, threshold)

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
            labels = segment(model, prediction, settings)
            if denoising_model is not None:
                prediction = predict_image(
                    denoising_model, image, tile=tile_size, batch_size=batch_size, device=target, precision=precision
                )
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
    if denoising_model is not None:
        note += f", denoised by {denoising_model.path.name}"
    table = Table(title=f"denoiseg predict: {len(files)} image(s){note} -> {out}  ({settings.describe()})")
    for column, justify in (("image", "left"), ("shape", "right"), ("objects", "right"), ("seconds", "right")):
        table.add_column(column, justify=justify)
    for name, shape, objects, seconds in rows:
        table.add_row(name, shape, str(objects), f"{seconds:.1f}")
    from rich.console import Console

    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
