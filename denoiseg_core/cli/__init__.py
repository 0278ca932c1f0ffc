"""The ``denoiseg`` command line: one module per command group, joined here.

Plugins add commands through the ``denoiseg_register_commands`` hook (the ``zoo`` group
is added that way). A :class:`~denoiseg_core.errors.DenoiSegError` is printed as one
line on stderr with exit code 2, and so are OSErrors no command turned into one (a file
problem) and MemoryError (a setting too large for the machine); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from denoiseg_core.errors import DenoiSegError


def build_app() -> typer.Typer:
    from denoiseg_core.cli import config, demo, evaluate, plugins, predict, train
    from denoiseg_core.plugin_manager import get_plugin_manager

    app = typer.Typer(
        name="denoiseg",
        help="DenoiSeg: joint self-supervised denoising and few-shot segmentation of microscopy images.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for module in (train, predict, evaluate, demo):
        module.register(app)
    app.add_typer(plugins.app, name="plugins", help="Installed plugins and their components.")
    app.add_typer(config.app, name="config", help="Write a starting config or show how one resolves.")
    get_plugin_manager().hook.denoiseg_register_commands(app=app)
    return app


def main(argv: list[str] | None = None) -> None:
    try:
        app = build_app()
        app(args=argv, standalone_mode=True)
    except DenoiSegError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as exc:  # a file problem that no command anticipated: still one line naming the file
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"error: {where}{exc.strerror or exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except MemoryError:
        _out_of_memory()
    except RuntimeError as exc:  # torch's allocators report exhaustion as RuntimeError (OutOfMemoryError on CUDA)
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        _out_of_memory()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


def _out_of_memory() -> None:
    typer.secho(
        "error: out of memory: a setting asks for more memory than this machine has "
        "(e.g. training.batch_size, data.patch_size, --tile, --batch-size)",
        fg=typer.colors.RED,
        err=True,
    )
    sys.exit(2)
