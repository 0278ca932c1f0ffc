"""``denoiseg plugins``: what is installed and which parameters each component takes."""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python
from rich import box
from rich.console import Console
from rich.table import Table

from denoiseg_core.components import RegisteredComponent

app = typer.Typer(no_args_is_help=True)


def _type_name(annotation: Any) -> str:
    """A readable type: ``int``, ``tuple[float, float, float]``, ``Literal['outer', 'inner']``."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def component_params(comp: RegisteredComponent) -> list[dict[str, Any]]:
    """``[{name, type, default, description}, ...]`` for the component's parameters."""
    return [
        {
            "name": name,
            "type": _type_name(field.annotation),
            "default": to_jsonable_python(_default(field)),
            "required": field.is_required(),
            "description": field.description or "",
        }
        for name, field in comp.spec.params.model_fields.items()
    ]


def component_record(comp: RegisteredComponent) -> dict[str, Any]:
    return {
        "kind": comp.kind,
        "name": comp.name,
        "plugin": comp.plugin,
        "distribution": comp.distribution,
        "version": comp.version,
        "description": comp.spec.description,
        "params": component_params(comp),
    }


def _params_summary(comp: RegisteredComponent) -> str:
    """``"depth=4, first_filters=32, ..."`` with Python reprs of the defaults."""
    parts = []
    for name, field in comp.spec.params.model_fields.items():
        parts.append(f"{name} (required)" if field.is_required() else f"{name}={_default(field)!r}")
    return ", ".join(parts) or "-"


@app.command("list")
def list_components(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of a table")] = False,
) -> None:
    """List every registered backbone, masking strategy and head with its plugin and parameters."""
    from denoiseg_core.plugin_manager import get_registry

    components = get_registry().components()
    records = [component_record(comp) for comp in components]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    table = Table(title="denoiseg components", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("kind", "name", "distribution", "version"):
        table.add_column(column)
    table.add_column("plugin", overflow="fold")
    table.add_column("parameters (defaults)", ratio=1, overflow="fold")
    for comp, rec in zip(components, records):
        table.add_row(
            rec["kind"],
            rec["name"],
            rec["distribution"] or "-",
            rec["version"] or "-",
            rec["plugin"],
            _params_summary(comp),
        )
    Console().print(table)
