"""The napari extra stays optional: the CLI works in an environment where napari and Qt
cannot be imported (simulated by blocking those imports in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "npe2")


def test_cli_runs_without_napari(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from importlib.abc import MetaPathFinder

        class NoNapari(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"{{name}} is not installed (blocked by the test)")
                return None

        sys.meta_path.insert(0, NoNapari())
        from denoiseg_core.cli import main
        try:
            main(sys.argv[1:])
        finally:
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
            print("loaded:", loaded, file=sys.stderr)
        """
    )
    for argv in (["plugins", "list"], ["config", "init", str(tmp_path / "c.yaml")]):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        assert "loaded: []" in result.stderr, argv
    assert (tmp_path / "c.yaml").is_file()
    # the plugin's Qt-free parts import without napari too (the CLI never needs them)
    result = subprocess.run(
        [sys.executable, "-c", script.replace("from denoiseg_core.cli import main", "import denoiseg_napari.training_run, denoiseg_napari.predictor; main = lambda argv: None")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
