"""The zoo's plugin: the ``denoiseg zoo`` command group, and the hooks through which the
core reads packages (``train --init-from MODEL.zip``) and exports them (``denoiseg demo``)
without importing the zoo.

``export`` writes a tested bioimage.io package, ``test`` runs bioimageio.core's test on
any package, ``predict`` runs a package with tiling (and writes instance labels for
denoiseg packages), ``import`` turns a denoiseg package back into a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiseg_core.hookspecs import hookimpl


def _echo(message: str) -> None:
    typer.echo(message, err=True)


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint file or run folder (best.pt is used)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="package to write (MODEL.zip)")],
    name: Annotated[Optional[str], typer.Option(help="model name (5-128 letters, digits, spaces, _+-())")] = None,
    author: Annotated[Optional[list[str]], typer.Option("--author", help="author name (repeat for several)")] = None,
    description: Annotated[Optional[str], typer.Option(help="one-paragraph description")] = None,
    license: Annotated[str, typer.Option(help="SPDX license id of the weights")] = "CC-BY-4.0",
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="extra tag (repeat for several)")] = None,
    sample: Annotated[Optional[list[Path]], typer.Option("--sample", help="sample image (TIFF) for test tensors and covers; repeatable")] = None,
    mask: Annotated[Optional[list[Path]], typer.Option("--mask", help="instance mask of each --sample, to report its scores")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing package")] = False,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="load a checkpoint that needs full unpickling (only for files you trust)")
    ] = False,
) -> None:
    """Export a checkpoint as a tested bioimage.io model package (TorchScript, ONNX, state dict)."""
    from denoiseg_core.checkpoint import trusting_checkpoints
    from denoiseg_core.io import check_outputs, remove_stale_temporaries
    from denoiseg_zoo.export import ExportOptions, export_package

    options = ExportOptions(
        name=name,
        authors=author or (),
        description=description,
        license=license,
        tags=tag or (),
        samples=sample or (),
        masks=mask or (),
        overwrite=overwrite,
    )
    # before any work: the package may replace none of its inputs and must be writable
    check_outputs([out], inputs=[checkpoint, *(sample or []), *(mask or [])], overwrite=overwrite, what="package")
    remove_stale_temporaries([out])  # a killed export's .NAME.xxxx.partial.zip
    with trusting_checkpoints(trust_checkpoint):
        result = export_package(checkpoint, out, options, log=_echo)
    typer.echo(f"package written and tested (torchscript {result.torchscript_how}, onnx, pytorch_state_dict): {result.path}")


TrustCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-package-code",
        help="also run weight formats that execute Python code from the package (pytorch_state_dict's "
        "architecture): only for packages you trust",
    ),
]


def test_command(
    package: Annotated[Path, typer.Argument(help="bioimage.io model package (.zip)")],
    trust_package_code: TrustCodeOption = False,
) -> None:
    """Run bioimageio.core's model test (TorchScript and ONNX; every format with --trust-package-code)."""
    from denoiseg_zoo.runtime import format_summary, test_package

    summary = test_package(package, trust_code=trust_package_code)
    typer.echo(format_summary(summary))
    if summary.status != "passed":
        raise typer.Exit(1)


def predict_command(
    package: Annotated[Path, typer.Argument(help="bioimage.io model package (.zip)")],
    inputs: Annotated[list[Path], typer.Argument(help="input images (TIFF)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    tile: Annotated[int, typer.Option(help="largest tile edge in pixels (rounded to the sizes the package accepts)")] = 512,
    overwrite: Annotated[bool, typer.Option(help="replace existing outputs")] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="skip inputs whose outputs all exist (continue an interrupted run)")
    ] = False,
    trust_package_code: TrustCodeOption = False,
) -> None:
    """Run a package on images with tiling (bioimageio.core); denoiseg packages also give instance labels."""
    from denoiseg_core.errors import DataError
    from denoiseg_core.io import read_image
    from denoiseg_zoo.runtime import (
        check_targets,
        create_pipeline,
        load_runnable,
        output_paths,
        predict_package,
        preferred_weight_format,
        read_finite_image,
        write_prediction,
    )

    if tile < 1:
        raise typer.BadParameter("--tile must be positive")
    descr = load_runnable(package)
    preferred_weight_format(descr, trust_package_code, package)  # refuse code-running weights before any work
    for path in inputs:
        if not Path(path).is_file():
            read_image(Path(path))  # one-line error for a missing input or a FIFO before any work
    if Path(package).resolve() in {Path(p).resolve() for p in inputs}:
        raise DataError("the package is also given as an input image", package)
    targets = output_paths(descr, inputs, out)
    todo = check_targets(targets, overwrite, skip_existing, package=package)
    replace = overwrite or skip_existing  # skip_existing: outputs of a cut-off image are redone
    pipeline = create_pipeline(descr, trust_package_code, package)
    try:
        for (path, entries), run in zip(targets, todo):
            if not run:
                typer.echo(f"{path}: skipped (outputs exist)")
                continue
            outputs = predict_package(descr, read_finite_image(path), path, tile=tile, pipeline=pipeline)
            write_prediction(descr, outputs, entries, inputs, replace, package=package)
            typer.echo(f"{path}: " + ", ".join(str(p) for _, p in entries))
    finally:
        pipeline.unload()


def import_command(
    package: Annotated[Path, typer.Argument(help="denoiseg bioimage.io package (.zip)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint to write (.pt)")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint")] = False,
) -> None:
    """Turn a denoiseg package back into a checkpoint (to predict with or fine-tune)."""
    from denoiseg_zoo.importing import import_package

    path = import_package(package, out, overwrite=overwrite)
    typer.echo(f"checkpoint written: {path}")


def build_zoo_app() -> typer.Typer:
    zoo_app = typer.Typer(no_args_is_help=True, help="BioImage Model Zoo packages: export, test, predict, import.")
    zoo_app.command("export")(export_command)
    zoo_app.command("test")(test_command)
    zoo_app.command("predict")(predict_command)
    zoo_app.command("import")(import_command)
    return zoo_app


@hookimpl
def denoiseg_register_commands(app: typer.Typer) -> None:
    app.add_typer(build_zoo_app(), name="zoo")


@hookimpl
def denoiseg_read_package_weights(path: Path) -> dict:
    from denoiseg_zoo.importing import checkpoint_state_from_package

    return checkpoint_state_from_package(path)


@hookimpl
def denoiseg_export_package(checkpoint: Path, out: Path, samples: list[Path], masks: list[Path], log: Callable[[str], None]) -> Path:
    from denoiseg_zoo.export import export_package

    return export_package(checkpoint, out, samples=samples, sample_masks=masks, overwrite=True, log=log).path
