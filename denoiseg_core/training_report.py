"""What a training run shows and writes about itself: a progress bar with the running loss,
one line per epoch, and in the run folder the log (``log.csv``) and the curves
(``training_curves.png``). Nothing here changes the run."""

from __future__ import annotations

import csv
import io as _io
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from denoiseg_core.io import atomic_write_bytes, atomic_write_text

LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "train_denoise",
    "train_seg",
    "val_loss",
    "val_denoise",
    "val_seg",
    "val_ap50",
    "val_ap50_tuned",
    "val_threshold",
    "learning_rate",
    "seconds",
)
#: seconds between live-loss updates of the progress bar (each one waits for the device)
PROGRESS_INTERVAL = 1.0


class TrainingReport:
    """The progress bar and epoch lines (``progress=False``: epoch lines only), and the run
    folder's ``log.csv`` and ``training_curves.png``."""

    def __init__(self, run_dir: Path, *, progress: bool, log: Callable[[str], None]):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log
        self._bar = _NullProgress()  # rich's Progress while :meth:`bar` runs
        self._task = 0
        self._last_update = 0.0

    @contextmanager
    def bar(self, total_steps: int, done_steps: int) -> Iterator[None]:
        """Shows the progress bar (over all steps of the run) while the block runs."""
        with _progress(self.progress) as bar:
            self._bar, self._task = bar, bar.add_task("training", total=total_steps, completed=done_steps)
            try:
                yield
            finally:
                self._bar = _NullProgress()

    def epoch_started(self) -> None:
        self._last_update = time.perf_counter()

    def step_done(self, epoch: int, epochs: int, steps_done: int, steps: int, loss_sums: torch.Tensor) -> None:
        """Advance the bar by one step of ``epoch`` (counted from 1); every
        :data:`PROGRESS_INTERVAL` seconds and at the epoch's last step it shows the epoch's mean
        losses so far (``loss_sums``: total, denoising, segmentation summed over ``steps_done``
        steps; reading them waits for the device)."""
        now = time.perf_counter()
        if self.progress and (now - self._last_update >= PROGRESS_INTERVAL or steps_done == steps):
            self._last_update = now
            total, denoise, seg = (loss_sums / steps_done).tolist()
            self._bar.update(self._task, description=f"epoch {epoch}/{epochs} loss {total:.4f} (dn {denoise:.4f}, seg {seg:.4f})")
        self._bar.advance(self._task)

    def epoch_done(self, values: dict[str, float], *, denoising_only: str | None, best: bool) -> None:
        """The line of a finished epoch (``denoising_only``: the phase in which it trained denoising
        only, e.g. "warm start"; ``best``: it is ``best.pt``)."""
        self._bar.console.print(
            f"epoch {values['epoch']:>3}: train {values['train_loss']:.4f}  val {values['val_loss']:.4f}"
            f"  val AP@0.5 {values['val_ap50']:.3f} (tuned {values['val_ap50_tuned']:.3f} at {values['val_threshold']:.2f})"
            f"  lr {values['learning_rate']:.2e}"
            + (f"  ({denoising_only}: denoising only)" if denoising_only else "")
            + ("  (best)" if best else "")
        )

    def write(self, history: list[dict[str, float]]) -> None:
        """``log.csv`` and ``training_curves.png`` of ``history`` (one row per epoch)."""
        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
        atomic_write_text(self.run_dir / "log.csv", buffer.getvalue())
        try:
            atomic_write_bytes(self.run_dir / "training_curves.png", plot_history(history))
        except Exception as exc:  # a plotting problem must never kill a training run
            self.log(f"warning: could not draw training curves ({exc})")


def plot_history(history: list[dict[str, float]]) -> bytes:
    """PNG bytes of loss curves (train/val, both terms) and validation AP against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes[:2], ("denoise", "seg"), ("denoising loss (N2V MSE)", "segmentation loss (weighted CE)")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[2].plot(epochs, [h["val_ap50"] for h in history], color="tab:green", label="threshold 0.5")
    axes[2].plot(epochs, [h.get("val_ap50_tuned", math.nan) for h in history], color="tab:olive", label="best threshold")
    axes[2].legend()
    axes[2].set_title("validation AP@0.5")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylim(0, 1)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


class _NullProgress:
    """Stands in for rich's Progress when progress bars are off (tests, logs)."""

    class _Console:
        @staticmethod
        def print(*args, **kwargs):
            print(*args)

    console = _Console()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
