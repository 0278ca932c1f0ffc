"""Guards of a training run against concurrent use, killed processes and numbers that cannot be right.

* :func:`check_run_folder`: a new run never goes into a folder that holds one, a resumed run
  needs its ``last.pt``.
* :func:`claim_run_folder`: an exclusive lock on the run folder for the whole training (a
  second ``denoiseg train`` into the same folder stops with one line), and removal of the
  temporary files a killed run left there.
* :func:`adopt_newer_best`: ``best.pt`` is written before ``last.pt``; if a kill fell between
  the two, resume keeps that ``best.pt`` (its weights and epoch agree) as the one to beat.
* :func:`check_finite_epoch`: a non-finite loss stops training before anything is saved, so
  the checkpoints keep the last good epoch.
* :func:`warn_about_training_data`: constant images and an empty labelled set are legal but
  almost always a mistake.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from denoiseg_core.errors import DataError, DenoiSegError

#: lock file inside a run folder (held with flock while a training runs; the kernel drops it
#: when the process dies, so a killed run never leaves the folder locked)
LOCK_NAME = ".denoiseg-train.lock"


class RunFolderLock:
    """An exclusive ``flock`` on a run folder's lock file, released by :meth:`release` or process exit."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """One line when ``run_dir`` holds a run and ``resume`` is off, or holds none to resume."""
    last = Path(run_dir) / "last.pt"
    if resume and not last.is_file():
        raise DenoiSegError("nothing to resume: no last.pt in the run folder", run_dir)
    if not resume and last.exists():
        raise DenoiSegError(
            "run folder already holds a training run (use --resume to continue it, or choose another run_dir)", run_dir
        )


def claim_run_folder(run_dir: Path, log: Callable[[str], None] = print) -> RunFolderLock:
    """Create ``run_dir`` if needed, lock it against a second training, and remove stale
    temporary files (``.NAME.xxxx.part``) that a killed run left behind."""
    import fcntl

    from denoiseg_core.io import TEMPORARY_SUFFIXES, os_reason

    run_dir = Path(run_dir)
    lock_path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DataError(f"cannot use as run folder ({os_reason(exc)})", run_dir) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DenoiSegError(
            f"run folder is in use by another training{f' (process {holder})' if holder else ''}; "
            "wait for it or choose another run_dir",
            run_dir,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    # We hold the lock: every temporary file here belongs to a run that was killed.
    stale = [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(TEMPORARY_SUFFIXES)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) left by an interrupted run: {', '.join(p.name for p in stale)}")
    return RunFolderLock(fd, lock_path)


def adopt_newer_best(run_dir: Path, last_epoch: int, best_value: float | None, log: Callable[[str], None]) -> float | None:
    """The best value to beat after resuming from ``last.pt`` of ``last_epoch``.

    ``best.pt`` is written before ``last.pt``, so a kill between the two leaves a ``best.pt``
    one epoch ahead. Its weights and recorded epoch agree, so it is kept, and its value is
    the one the redone epochs must beat (they would otherwise overwrite it with a worse one).
    """
    from denoiseg_core.checkpoint import read_checkpoint_state

    best_path = Path(run_dir) / "best.pt"
    if not best_path.is_file():
        return best_value
    state = read_checkpoint_state(best_path)
    recorded = (state.get("extra") or {}).get("best_value")
    if int(state.get("epoch") or 0) > last_epoch and isinstance(recorded, (int, float)):
        log(
            f"best.pt is from epoch {state['epoch']}, written just before the run was stopped; "
            f"keeping it (the redone epochs must beat {recorded:.4g})"
        )
        return float(recorded)
    return best_value


def check_finite_epoch(values: dict[str, float], epoch: int, run_dir: Path) -> None:
    """Stop with one line if an epoch's training or validation loss is NaN or infinite.

    Called before the epoch's checkpoints are written, so ``last.pt`` and ``best.pt`` keep the
    weights of the last good epoch.
    """
    bad = [k for k in ("train_loss", "val_loss") if k in values and not math.isfinite(values[k])]
    if bad:
        kept = f"the checkpoints keep epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
        raise DenoiSegError(
            f"training diverged: {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite in epoch {epoch}; "
            f"{kept} (lower training.learning_rate, try training.precision: fp32, or check the data)",
            run_dir,
        )


def warn_about_training_data(
    train_records: Sequence[Any], val_records: Sequence[Any], labelled_count: int, alpha: float, log: Callable[[str], None]
) -> None:
    """Warnings for data that trains but cannot train well: constant images (their normalised
    values explode or carry no signal) and no labelled images while segmentation is asked for."""
    for kind, records in (("training", train_records), ("validation", val_records)):
        constant = [r for r in records if r.image.size and float(r.image.min()) == float(r.image.max())]
        if constant:
            names = ", ".join(Path(r.path).name if r.path is not None else "(in memory)" for r in constant[:3])
            more = f" and {len(constant) - 3} more" if len(constant) > 3 else ""
            log(f"warning: {len(constant)} of {len(records)} {kind} images are constant (no signal to learn from): {names}{more}")
    if labelled_count == 0 and alpha < 1:
        log(
            f"warning: no labelled training images: only denoising is learnt (training.alpha {alpha} gives "
            "segmentation a weight, but there is nothing to learn it from)"
        )
