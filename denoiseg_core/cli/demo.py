"""``denoiseg demo``: the whole workflow on built-in synthetic data, in a few minutes on a laptop CPU.

It writes a noisy nuclei-like dataset (a few images labelled), trains a small DenoiSeg
model, predicts and evaluates the held-out test images, exports a tested bioimage.io
package, and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from denoiseg_core.errors import DenoiSegError

#: The demo's training settings: a smaller U-Net and a short schedule than the paper's so it
#: finishes in minutes on 2 CPU cores; every other setting is the default.
DEMO_OVERRIDES = {
    "model": {"backbone": {"name": "unet", "params": {"depth": 3, "first_filters": 16}}},
    "data": {"patch_size": [64, 64]},
    "training": {
        "epochs": 12,
        "steps_per_epoch": 40,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "lr_patience": 3,
    },
}


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for data, run, predictions and the exported model")] = Path(
        "denoiseg-demo"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace an existing demo folder's results")] = False,
    export: Annotated[bool, typer.Option(help="export and test a bioimage.io package at the end")] = True,
    epochs: Annotated[int, typer.Option(help="training epochs (the demo default is tuned for ~5 minutes on 2 cores)")] = DEMO_OVERRIDES[
        "training"
    ]["epochs"],
    seed: Annotated[int, typer.Option(help="seed for data and training")] = 0,
) -> None:
    """Run the whole workflow on synthetic data: make data, train, predict, evaluate, export."""
    import shutil

    from denoiseg_core.checkpoint import load_checkpoint
    from denoiseg_core.cli.inputs import load_denoiser
    from denoiseg_core.config import load_config
    from denoiseg_core.evaluation import results_json
    from denoiseg_core.io import atomic_write_text
    from denoiseg_core.synthetic import write_synthetic_dataset
    from denoiseg_core.training import train

    started = time.perf_counter()
    run_dir = out / "run"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DenoiSegError("demo folder exists and is not empty (use --overwrite or another --out)", out)
        # Only remove what the demo itself makes.
        for name in ("data", "run", "predictions", "evaluation.json", "denoiseg-demo-model.zip"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    typer.echo(f"[1/5] writing a synthetic noisy nuclei dataset to {out / 'data'}")
    folders = write_synthetic_dataset(out / "data", seed=seed)

    overrides = json.loads(json.dumps(DEMO_OVERRIDES))
    overrides["training"]["epochs"] = epochs
    base = {
        "seed": seed,
        "run_dir": str(run_dir),
        "data": {"train": str(folders["train"]), "validation": str(folders["val"]), **overrides["data"]},
        "model": overrides["model"],
        "training": overrides["training"],
    }
    config = load_config(None, base=base)
    weighting = "learned loss weights" if config.training.loss_weighting == "uncertainty" else f"alpha {config.training.alpha}"
    typer.echo(f"[2/5] training ({weighting}) -> {run_dir}")
    result = train(config, log=typer.echo)

    typer.echo("[3/5] predicting the test images")
    model = load_checkpoint(result.best_checkpoint)
    # the denoised images come from the epoch that denoised the validation images best (as `predict RUN_FOLDER`)
    denoiser = load_denoiser(result.run_dir, "auto", model)
    evaluation = _predict_and_evaluate(model, folders, out / "predictions", denoiser)
    atomic_write_text(out / "evaluation.json", results_json(evaluation))

    from denoiseg_core.metrics import format_table

    typer.echo("[4/5] evaluation on the held-out synthetic test images:")
    typer.echo(format_table(evaluation))
    if "psnr" in evaluation:
        source = (denoiser or model).path.name
        typer.echo(f"PSNR: denoised {evaluation['psnr']:.2f} dB by {source} (noisy input {evaluation['psnr_input']:.2f} dB)")

    package = None
    if export:
        typer.echo("[5/5] exporting a bioimage.io model package (tested with bioimageio.core)")
        package = _export(result.best_checkpoint, out / "denoiseg-demo-model.zip", folders)
    else:
        typer.echo("[5/5] export skipped (--no-export)")

    minutes = (time.perf_counter() - started) / 60
    typer.echo("")
    typer.echo(f"demo finished in {minutes:.1f} min")
    typer.echo(f"  data:            {out / 'data'}")
    typer.echo(f"  run (checkpoints, log.csv, training_curves.png): {run_dir}")
    typer.echo(f"  predictions:     {out / 'predictions'}")
    typer.echo(f"  evaluation:      {out / 'evaluation.json'}  (AP@0.5 {evaluation['ap50']:.3f}, SEG {evaluation['seg']:.3f})")
    if package is not None:
        typer.echo(f"  bioimage.io model: {package}")


def _predict_and_evaluate(model, folders: dict[str, Path], out: Path, denoiser=None) -> dict:
    """Scores on the test images (PSNR against their clean versions), writing each one's denoised image and labels."""
    import numpy as np

    from denoiseg_core.data import load_folder
    from denoiseg_core.evaluation import ScoredImage, evaluate
    from denoiseg_core.io import read_image, write_tiff

    def images():
        for record in load_folder(folders["test"], require_masks=True):
            clean_path = folders["test"] / "clean" / record.path.name
            clean = read_image(clean_path).astype(np.float32)[np.newaxis] if clean_path.exists() else None
            yield ScoredImage(record.path.name, record.image, record.labels, clean)

    def write(image: ScoredImage, prediction, labels: np.ndarray) -> None:
        stem = Path(image.name).stem
        write_tiff(out / f"{stem}_denoised.tif", prediction.denoised[0].astype(np.float32), overwrite=True)
        write_tiff(out / f"{stem}_labels.tif", labels.astype(np.uint16), overwrite=True)

    return evaluate(model, images(), on_prediction=write, denoiser=denoiser)


def _export(checkpoint: Path, target: Path, folders: dict[str, Path]) -> Path | None:
    """Export through the plugin hook (denoiseg's zoo implements it); None if no plugin exports."""
    from denoiseg_core.plugin_manager import get_plugin_manager

    samples = sorted((folders["test"] / "images").glob("*.tif"))[:1]
    masks = [folders["test"] / "masks" / p.name for p in samples]
    package = get_plugin_manager().hook.denoiseg_export_package(
        checkpoint=checkpoint, out=target, samples=samples, masks=masks, log=typer.echo
    )
    if package is None:
        typer.echo("  (no installed plugin exports model packages; export skipped)")
    return package


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
