"""Run the ``denoiseg`` CLI with a SIGKILL injected at an atomic write (fault-injection tests).

``DENOISEG_KILL_AT=NAME:N:WHEN`` kills this process with SIGKILL at the N-th atomic write
onto a file called NAME: ``before`` the temporary file is renamed onto it (the temporary
``.NAME.xxxx.part`` is complete but orphaned, NAME keeps its old content) or right ``after``;
``stop`` sends SIGSTOP instead, before the rename (the process pauses there, holding what it holds).
Usage: ``python tests/fault_driver.py train config.yaml ...`` (the arguments of ``denoiseg``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

_real_replace = os.replace
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, str]:
    name, nth, when = spec.split(":")
    if when not in ("before", "after", "stop"):
        raise SystemExit(f"DENOISEG_KILL_AT: WHEN must be before, after or stop, got {when!r}")
    return name, int(nth), when


def _replace_then_maybe_die(src, dst, *args, **kwargs):
    name, nth, when = _parse(os.environ["DENOISEG_KILL_AT"])
    hit = False
    if Path(dst).name == name:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == nth
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if hit and when == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    result = _real_replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


if __name__ == "__main__":
    if os.environ.get("DENOISEG_KILL_AT"):
        os.replace = _replace_then_maybe_die  # denoiseg_core.io renames through os.replace
    from denoiseg_core.cli import main

    main(sys.argv[1:])
