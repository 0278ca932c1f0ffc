"""Helpers shared by the CLI tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from denoiseg_core.cli import main


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run ``denoiseg ARGS`` in-process through the real entry point: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def tree(folder: Path) -> set[str]:
    """Every path below ``folder``, relative to it (to check nothing else was written)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
