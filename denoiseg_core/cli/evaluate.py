"""``denoiseg evaluate``: segmentation metrics (AP@0.5, mAP, SEG) and optionally denoising
PSNR of a checkpoint on images with ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from denoiseg_core.cli import inputs
from denoiseg_core.errors import ConfigError, DataError


def find_partner(image: Path, folder: Path, what: str) -> Path:
    """The file in ``folder`` with ``image``'s name (any TIFF suffix), or a one-line error naming the image."""
    from denoiseg_core.io import TIFF_SUFFIXES

    exact = folder / image.name
    if exact.is_file():
        return exact
    stem = image.name[: -len(image.suffix)]
    for suffix in TIFF_SUFFIXES + tuple(s.upper() for s in TIFF_SUFFIXES):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(f"no {what} with the same name in {folder}", image)


def _check_folder(folder: Path, option: str) -> None:
    if not folder.exists():
        raise DataError(f"{option} folder not found", folder)
    if not folder.is_dir():
        raise DataError(f"{option} must be a folder", folder)


def evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint .pt file or run folder (uses best.pt, else last.pt)")],
    images: Annotated[Path, typer.Option("--images", help="folder of (noisy) input images")],
    masks: Annotated[Path, typer.Option("--masks", help="folder of ground-truth instance masks, same file names")],
    clean: Annotated[
        Path | None, typer.Option("--clean", help="folder of noise-free images, same file names: also report PSNR")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write all metrics to this JSON file")] = None,
    threshold: Annotated[
        float | None, typer.Option(help=inputs.THRESHOLD_HELP)
    ] = None,
    tile: Annotated[
        str | None, typer.Option(help="tile size, e.g. 256,256 or 'auto' (default: whole image when small)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="tiles per forward pass")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32, bf16 or auto (bf16 autocast where the device has fast bf16); default: the run's "
            "training precision, at which its threshold was tuned"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --json file")] = False,
    denoiser: inputs.DenoiserOption = "auto",
    trust_checkpoint: inputs.TrustCheckpointOption = False,
) -> None:
    """Predict every image in --images and score it against the mask of the same name."""
    from denoiseg_core.data import to_channel_first, validate_mask
    from denoiseg_core.evaluation import ScoredImage, evaluate, instance_settings, results_json
    from denoiseg_core.io import atomic_write_text, check_outputs, read_image
    from denoiseg_core.metrics import format_table
    from denoiseg_core.runtime import resolve_device, resolve_precision

    if clean is None and inputs.names_denoiser_file(denoiser):
        raise ConfigError(f"--denoiser {denoiser}: the denoiser is only scored by PSNR, which needs --clean (the noise-free images)")
    model = inputs.load_model(checkpoint, trust_checkpoint)
    # only PSNR needs the denoised images
    denoising_model = inputs.load_denoiser(checkpoint, denoiser, model, trust_checkpoint) if clean is not None else None
    tile_size = inputs.parse_tile(tile, model.ndim)
    target = resolve_device(device)
    chosen_precision = resolve_precision(precision, target) if precision is not None else None
    _check_folder(images, "--images")
    _check_folder(masks, "--masks")
    if clean is not None:
        _check_folder(clean, "--clean")
    files = inputs.collect_inputs([images])
    # pair everything up front: a missing mask fails before minutes of prediction
    mask_files = [find_partner(f, masks, "mask") for f in files]
    clean_files = [find_partner(f, clean, "clean image") for f in files] if clean is not None else None
    if json_path is not None:
        # the report may replace none of the inputs: images, masks, the checkpoint and its run's checkpoints
        check_outputs(
            [json_path],
            inputs=[*files, *mask_files, *(clean_files or []), model.path, *model.path.parent.glob("*.pt"),
                    *([denoising_model.path] if denoising_model is not None else [])],
            overwrite=overwrite,
            what="JSON report",
        )
    for file in files:
        inputs.precheck_input(file, model)

    def scored_images(progress, task) -> Iterator[ScoredImage]:
        for index, file in enumerate(files):
            progress.update(task, current=file.name)
            image = inputs.read_model_input(file, model)
            mask = validate_mask(read_image(mask_files[index]), image.shape[1:], mask_files[index])
            reference = None
            if clean_files is not None:
                clean_path = clean_files[index]
                reference = to_channel_first(read_image(clean_path), inputs.model_axes(model), clean_path)
                if reference.shape != image.shape:
                    raise DataError(
                        f"clean image shape {reference.shape[1:]} differs from the input's {image.shape[1:]}", clean_path
                    )
                if float(reference.max() - reference.min()) <= 0:
                    raise DataError("clean image is constant; PSNR is undefined", clean_path)
            yield ScoredImage(file.name, image, mask, reference)

    with inputs.progress_bar(inputs.stderr_console()) as progress:
        task = progress.add_task("evaluating", total=len(files), current="")
        results = evaluate(
            model,
            scored_images(progress, task),
            threshold=threshold,
            tile=tile_size,
            batch_size=batch_size,
            device=target,
            precision=chosen_precision,
            on_prediction=lambda *_: progress.advance(task),
            denoiser=denoising_model,
        )
    results["checkpoint"] = str(model.path)
    if clean_files is not None:
        results["denoising_checkpoint"] = str((denoising_model or model).path)

    typer.echo(format_table(results))
    typer.echo(f"instance settings: {instance_settings(model, threshold).describe()}, precision: {results['precision']}")
    if clean_files is not None:
        typer.echo(
            f"PSNR: denoised {results['psnr']:.2f} dB (noisy input {results['psnr_input']:.2f} dB), "
            f"denoised by {results['denoising_checkpoint']}"
        )
    if json_path is not None:
        atomic_write_text(json_path, results_json(results))
        typer.echo(f"metrics written to {json_path}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
