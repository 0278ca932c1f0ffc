"""``denoiseg config``: write a starting config, or show how a config resolves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)


def _commented_yaml(model, indent: int = 0) -> list[str]:
    """YAML of a pydantic model with each field's description as a comment above it."""
    import yaml
    from pydantic import BaseModel

    lines: list[str] = []
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(_commented_yaml(value, indent + 2))
        else:
            dumped = yaml.safe_dump({name: value if not isinstance(value, Path) else str(value)}, default_flow_style=True, sort_keys=False)
            lines.append(pad + dumped.strip().removeprefix("{").removesuffix("}"))
    return lines


@app.command("init")
def init_command(
    path: Annotated[Path, typer.Argument(help="where to write the config (YAML)")],
    train: Annotated[Optional[Path], typer.Option(help="training data folder (images/ + masks/) or .npz")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """Write a config with every setting at its default, each explained by a comment."""
    from denoiseg_core.config import DenoiSegConfig
    from denoiseg_core.io import atomic_write_text, check_outputs

    check_outputs([path], inputs=[train] if train is not None else [], overwrite=overwrite, what="config")
    config = DenoiSegConfig()
    if train is not None:
        config.data.train = train
    text = "# denoiseg training config: edit, then run `denoiseg train " + str(path) + "`\n"
    atomic_write_text(path, text + "\n".join(_commented_yaml(config)) + "\n")
    typer.echo(f"wrote {path}")


@app.command("show")
def show_command(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; omit for the defaults")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. training.epochs=10")] = None,
) -> None:
    """Print a config as training would use it (defaults filled in, overrides applied, components checked)."""
    import yaml

    from denoiseg_core.config import load_config, validate_components

    cfg = load_config(config, list(set_ or []))
    params = validate_components(cfg)
    dumped = cfg.model_dump(mode="json")
    for kind, model in params.items():
        dumped["model"][kind]["params"] = model.model_dump(mode="json")
    typer.echo(yaml.safe_dump(dumped, sort_keys=False).rstrip())
