"""The core never imports the exporter or the built-in components: it reaches them only
through plugin hooks, so that either can be left out or replaced."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import denoiseg_core
from denoiseg_core import checkpoint, plugin_manager
from denoiseg_core.checkpoint import read_package_state
from denoiseg_core.cli import demo
from denoiseg_core.errors import DataError, DenoiSegError

FORBIDDEN = ("denoiseg_zoo", "denoiseg_plugins")
CORE = Path(denoiseg_core.__file__).resolve().parent


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import anywhere in ``tree`` (also inside functions), and of
    every string literal passed to ``importlib.import_module``/``__import__``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    return found


def test_no_core_module_imports_the_exporter_or_the_built_in_plugins():
    offences = []
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20, "the core package was not found"
    for path in files:
        for line, module in imported_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if module.split(".")[0] in FORBIDDEN:
                offences.append(f"{path.relative_to(CORE.parent)}:{line} imports {module}")
    assert not offences, "the core must reach these only through plugin hooks:\n" + "\n".join(offences)


def test_the_import_finder_sees_every_form_of_import():
    source = (
        "import denoiseg_zoo.export\n"
        "def f():\n"
        "    from denoiseg_plugins.unet import UNetParams\n"
        "    import importlib\n"
        "    return importlib.import_module('denoiseg_zoo.importing'), __import__('denoiseg_plugins')\n"
    )
    assert [module for _, module in imported_names(ast.parse(source))] == [
        "denoiseg_zoo.export", "denoiseg_plugins.unet", "importlib", "denoiseg_zoo.importing", "denoiseg_plugins",
    ]


# --------------------------------------------------------------------------- the package hooks


def _without_plugins(monkeypatch) -> None:
    """An installation where no plugin is installed (not even denoiseg's own)."""
    bare = plugin_manager.get_plugin_manager(load_entry_points=False)
    monkeypatch.setattr(plugin_manager, "get_plugin_manager", lambda: bare)
    monkeypatch.setattr(checkpoint, "get_plugin_manager", lambda: bare)


def test_init_from_a_package_asks_the_zoo_through_the_hook(tmp_path):
    implementations = plugin_manager.get_plugin_manager().hook.denoiseg_read_package_weights.get_hookimpls()
    assert [impl.plugin.__name__ for impl in implementations] == ["denoiseg_zoo.commands"]
    not_a_package = tmp_path / "model.zip"
    not_a_package.write_bytes(b"not a zip file")
    with pytest.raises(DenoiSegError) as error:  # the zoo's own one-line refusal
        read_package_state(not_a_package)
    assert "model.zip" in str(error.value) and "\n" not in str(error.value)


def test_init_from_a_package_without_a_plugin_that_reads_it_is_one_clear_error(tmp_path, monkeypatch):
    _without_plugins(monkeypatch)
    with pytest.raises(DataError, match="no installed plugin reads model packages") as error:
        read_package_state(tmp_path / "model.zip")
    assert error.value.path == tmp_path / "model.zip"


def test_the_demo_exports_through_the_hook(tmp_path, monkeypatch, capsys):
    folders = {"test": tmp_path / "test"}
    with pytest.raises(DenoiSegError, match="checkpoint not found"):  # the zoo's exporter answered
        demo._export(tmp_path / "missing.pt", tmp_path / "model.zip", folders)
    _without_plugins(monkeypatch)
    assert demo._export(tmp_path / "missing.pt", tmp_path / "model.zip", folders) is None
    assert "no installed plugin exports model packages" in capsys.readouterr().out
