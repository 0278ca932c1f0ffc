"""Registers the ``denoiseg zoo`` command group through the plugin hook (being written)."""

from __future__ import annotations

import typer

from denoiseg_core.hookspecs import hookimpl


@hookimpl
def denoiseg_register_commands(app: typer.Typer) -> None:
    zoo_app = typer.Typer(no_args_is_help=True, help="BioImage Model Zoo packages: export, test, predict, import.")
    app.add_typer(zoo_app, name="zoo")
