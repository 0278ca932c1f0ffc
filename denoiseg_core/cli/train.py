"""``denoiseg train``: train a DenoiSeg model from a YAML config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiseg_core.errors import DenoiSegError


def train_command(
    config: Annotated[
        Optional[Path], typer.Argument(help="YAML config (see README); omit with --resume")
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="override a config value, e.g. --set training.epochs=20 (repeatable)"),
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option(help="continue the interrupted run in this run folder from its last.pt")
    ] = None,
    init_from: Annotated[
        Optional[Path],
        typer.Option("--init-from", help="start from the weights of a checkpoint (.pt) or a denoiseg bioimage.io package (.zip)"),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="load --resume/--init-from checkpoints that need full unpickling (it can run code: only for files you trust)",
        ),
    ] = False,
) -> None:
    """Train a model: denoising on all images, segmentation on the labelled ones."""
    from denoiseg_core.checkpoint import trusting_checkpoints
    from denoiseg_core.config import load_config, parse_override
    from denoiseg_core.errors import ConfigError
    from denoiseg_core.training import resume_config, train

    if resume is not None:
        if config is not None:
            raise DenoiSegError("give either CONFIG or --resume RUN, not both (the run's config is inside its checkpoint)")
        for text in set_ or []:
            # Only the schedule may change on resume (e.g. more epochs); model/data/seed stay as trained.
            keys, _ = parse_override(text)
            if keys[0] != "training":
                raise ConfigError(f"--set {text!r}: only training.* settings may change when resuming a run")
        with trusting_checkpoints(trust_checkpoint):
            cfg = resume_config(resume)
        if set_:
            cfg = load_config(None, list(set_), base=cfg.model_dump(mode="json"))
    else:
        if config is None:
            raise DenoiSegError("missing CONFIG (a YAML file) or --resume RUN")
        cfg = load_config(config, list(set_ or []))
    with trusting_checkpoints(trust_checkpoint):
        result = train(cfg, resume=resume is not None, init_from=init_from, progress=progress, log=typer.echo)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    typer.echo(f"best checkpoint: {result.best_checkpoint}")
    typer.echo(f"last checkpoint: {result.last_checkpoint}")
    if result.instance_settings is not None:
        typer.echo(f"tuned instance settings: {result.instance_settings.describe()} (validation AP@0.5 {result.validation['ap50']:.3f})")
    typer.echo(f"log: {result.run_dir / 'log.csv'}  curves: {result.run_dir / 'training_curves.png'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
