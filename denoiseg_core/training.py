"""The DenoiSeg training loop.

One step: sample a batch of patches (some labelled), mask blind spots, run the network,
and minimise ``alpha * N2V masked MSE + (1 - alpha) * class-weighted cross-entropy``
(see :mod:`denoiseg_core.losses`). After every epoch: validation losses and AP, the CSV
log and the curves PNG, ``last.pt`` (with everything needed to resume) and ``best.pt``.
After the last epoch the foreground threshold is tuned on the validation images and
stored in both checkpoints.
"""

from __future__ import annotations

import csv
import io as _io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denoiseg_core.checkpoint import (
    Normalization,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from denoiseg_core.config import DenoiSegConfig, save_config, validate_components
from denoiseg_core.data import ImageRecord, PatchSampler, compute_normalization, load_training_data
from denoiseg_core.errors import ConfigError, DenoiSegError
from denoiseg_core.io import atomic_write_bytes, atomic_write_text
from denoiseg_core.losses import denoiseg_loss
from denoiseg_core.metrics import average_precision
from denoiseg_core.model import BuiltModel, InferenceNet, build_model
from denoiseg_core.plugin_manager import get_registry, plugin_versions
from denoiseg_core.prediction import choose_tile, predict_array

LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "train_denoise",
    "train_seg",
    "val_loss",
    "val_denoise",
    "val_seg",
    "val_ap50",
    "learning_rate",
    "seconds",
)
VALIDATION_PATCH_BATCHES = 4


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"training.device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {spec!r} but CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (with fp32 master weights), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochResult:
    values: dict[str, float]


@dataclass
class TrainingRun:
    """What :func:`train` returns."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, float]]
    threshold: float | None
    validation: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Holds the state of one training run; :meth:`fit` runs it to the end."""

    def __init__(
        self,
        config: DenoiSegConfig,
        *,
        resume: bool = False,
        init_from: Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.config = config
        self.progress = progress
        self.log = log
        self.run_dir = Path(config.run_dir)
        self.registry = get_registry()
        validate_components(config, self.registry)  # fail on unknown names/params before loading any data
        self.device = resolve_device(config.training.device)
        self.precision = resolve_precision(config.training.precision, self.device)

        last = self.run_dir / "last.pt"
        if resume:
            if not last.is_file():
                raise DenoiSegError("nothing to resume: no last.pt in the run folder", self.run_dir)
        elif last.exists():
            raise DenoiSegError(
                "run folder already holds a training run (use --resume to continue it, or choose another run_dir)",
                self.run_dir,
            )

        seed_everything(config.seed)
        self.train_records, self.val_records = load_training_data(config.data, seed=config.seed)
        first = self.train_records[0]
        self.ndim, self.in_channels = first.ndim, first.image.shape[0]
        self.config.plugins = plugin_versions(
            self.registry,
            [
                ("backbone", config.model.backbone.name),
                ("masking", config.model.masking.name),
                ("head", config.model.head.name),
            ],
        )
        self.built: BuiltModel = build_model(config, self.ndim, self.in_channels, self.registry)
        self.normalization = compute_normalization(self.train_records)
        if init_from is not None:
            self._init_weights(Path(init_from))
        divisor = self.built.size_divisor
        if any(s % divisor for s in config.data.patch_size):
            raise ConfigError(f"data.patch_size {config.data.patch_size} must be a multiple of {divisor} for this backbone")

        self.net = self.built.net.to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.training.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.training.lr_factor, patience=config.training.lr_patience
        )
        self.sampler = PatchSampler(
            self.train_records,
            config.data.patch_size,
            self.normalization,
            self.built.head.targets,
            labelled_fraction=config.training.labelled_fraction,
            augment=config.training.augment,
            seed=config.seed,
        )
        self.val_sampler = PatchSampler(
            self.val_records,
            config.data.patch_size,
            self.normalization,
            self.built.head.targets,
            labelled_fraction=None,
            augment=False,
            seed=config.seed + 1,
        )
        self.rng = np.random.default_rng(config.seed)
        self.mask_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_value: float | None = None
        self._fixed_val_batches = self._make_validation_batches()

        if resume:
            self._load_training_state(last)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir / "config.yaml")

    # ------------------------------------------------------------------ set-up helpers
    def _init_weights(self, source: Path) -> None:
        """Start from the weights (and normalisation) of a checkpoint or a denoiseg bioimage.io package."""
        if source.suffix == ".zip":
            from denoiseg_zoo.importing import checkpoint_state_from_package

            state = checkpoint_state_from_package(source)
        else:
            state = read_checkpoint_state(source)
        if state["ndim"] != self.ndim or state["in_channels"] != self.in_channels:
            raise DenoiSegError(
                f"model is for {state['ndim']}-D images with {state['in_channels']} channel(s); "
                f"the training data is {self.ndim}-D with {self.in_channels}",
                source,
            )
        try:
            self.built.net.load_state_dict(state["model_state"])
        except RuntimeError as exc:
            raise DenoiSegError(
                f"weights do not fit the configured model ({str(exc).splitlines()[0]}); "
                "use the same backbone and head settings as the source model",
                source,
            ) from None
        # Keep the source model's normalisation: its weights expect inputs scaled that way.
        self.normalization = Normalization(**state["normalization"])

    def _make_validation_batches(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A fixed set of validation patches so validation losses are comparable across epochs."""
        rng = np.random.default_rng(self.config.seed + 12345)
        batch = min(self.config.training.batch_size, 64)
        n = self.config.training.validation_batches or VALIDATION_PATCH_BATCHES
        return [self.val_sampler.sample(batch, rng) for _ in range(n)]

    # ------------------------------------------------------------------ state
    def _training_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best_value": self.best_value,
            "numpy_rng": self.rng.bit_generator.state,
            "mask_generator": self.mask_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def _load_training_state(self, path: Path) -> None:
        state = read_checkpoint_state(path)
        saved = DenoiSegConfig.model_validate(state["config"])
        if saved.model != self.config.model:
            raise ConfigError(f"{path}: the model settings differ from the run being resumed; resume with the run's own config")
        self.net.load_state_dict(state["model_state"])
        self.normalization = Normalization(**state["normalization"])
        ts = state["training_state"]
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.history = list(ts["history"])
        self.best_value = ts["best_value"]
        self.rng.bit_generator.state = ts["numpy_rng"]
        self.mask_generator.set_state(ts["mask_generator"])
        torch.set_rng_state(ts["torch_rng"])
        random.setstate(ts["python_rng"])
        self.epoch = int(state["epoch"])
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}")

    def _save(self, name: str, threshold: float | None = None, extra: dict | None = None) -> Path:
        path = self.run_dir / name
        save_checkpoint(
            path,
            config=self.config,
            built=self.built,
            normalization=self.normalization,
            threshold=threshold,
            epoch=self.epoch,
            training_state=self._training_state() if name == "last.pt" else None,
            extra=extra,
        )
        return path

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch):
        patches, targets, labelled = batch
        non_blocking = self.device.type == "cuda"
        return (
            torch.from_numpy(patches).to(self.device, non_blocking=non_blocking),
            torch.from_numpy(targets).to(self.device, non_blocking=non_blocking),
            torch.from_numpy(labelled).to(self.device, non_blocking=non_blocking),
        )

    def _losses(self, patches, targets, labelled, generator):
        masked, loss_mask = self.built.masking(patches, generator)
        with autocast(self.device, self.precision):
            output = self.net(masked)
        denoised, logits = self.net.split(output.float())
        return denoiseg_loss(
            denoised, patches, loss_mask, logits, targets, labelled, self.built.head, self.config.training.alpha
        )

    def train_step(self, batch) -> tuple[float, float, float]:
        self.net.train()
        patches, targets, labelled = self._to_device(batch)
        total, denoise, seg = self._losses(patches, targets, labelled, self.mask_generator)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return total.detach(), denoise.detach(), seg.detach()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.net.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 777)
        sums = torch.zeros(3, device=self.device)
        for batch in self._fixed_val_batches:
            total, denoise, seg = self._losses(*self._to_device(batch), generator)
            sums += torch.stack([total, denoise, seg])
        sums = (sums / len(self._fixed_val_batches)).tolist()
        result = {"val_loss": sums[0], "val_denoise": sums[1], "val_seg": sums[2]}
        limit = self.config.training.validation_images
        probabilities = self.predict_probabilities(self.val_records[:limit] if limit else self.val_records)
        scores = [
            average_precision(rec.labels, self.built.head.instances(prob, 0.5))
            for rec, prob in zip(self.val_records, probabilities)
            if rec.labels is not None
        ]
        result["val_ap50"] = float(np.mean(scores)) if scores else math.nan
        return result

    def predict_probabilities(self, records: list[ImageRecord]) -> list[np.ndarray]:
        """Segmentation probabilities of whole validation images (tiled), in eval mode."""
        inference = InferenceNet(self.net, self.built.head).eval()
        mean = np.asarray(self.normalization.mean, np.float32).reshape((-1,) + (1,) * self.ndim)
        std = np.asarray(self.normalization.std, np.float32).reshape((-1,) + (1,) * self.ndim)
        out = []
        for rec in records:
            result = predict_array(
                inference,
                (rec.image - mean) / std,
                divisor=self.built.size_divisor,
                halo=self.built.halo,
                tile=choose_tile(None, rec.spatial_shape, self.built.size_divisor, self.built.halo),
                device=self.device,
                precision=self.precision,
            )
            out.append(result[self.in_channels :])
        return out

    # ------------------------------------------------------------------ epochs
    def fit(self) -> TrainingRun:
        cfg = self.config.training
        self.log(
            f"training on {self.device} ({self.precision}): {len(self.train_records)} images "
            f"({self.sampler.labelled_count} labelled), {len(self.val_records)} validation images, "
            f"{self.net.__class__.__name__} with {sum(p.numel() for p in self.net.parameters()):,} parameters"
        )
        with _progress(self.progress) as progress:
            task = progress.add_task("training", total=cfg.epochs * cfg.steps_per_epoch, completed=self.epoch * cfg.steps_per_epoch)
            while self.epoch < cfg.epochs:
                started = time.perf_counter()
                sums = torch.zeros(3)
                for step in range(cfg.steps_per_epoch):
                    batch = self.sampler.sample(cfg.batch_size, self.rng)
                    losses = self.train_step(batch)
                    sums += torch.stack([x.float().cpu() for x in losses])
                    if step % 5 == 0 or step == cfg.steps_per_epoch - 1:
                        avg = sums / (step + 1)
                        progress.update(
                            task,
                            description=f"epoch {self.epoch + 1}/{cfg.epochs} loss {avg[0]:.4f} (dn {avg[1]:.4f}, seg {avg[2]:.4f})",
                        )
                    progress.advance(task)
                train = (sums / cfg.steps_per_epoch).tolist()
                self.epoch += 1
                values = {
                    "epoch": self.epoch,
                    "train_loss": train[0],
                    "train_denoise": train[1],
                    "train_seg": train[2],
                    **self.validate(),
                    "learning_rate": self.optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - started,
                }
                self.history.append(values)
                self.scheduler.step(values["val_loss"])
                improved = self._is_improvement(values)
                self._save("last.pt")
                if improved:
                    self._save("best.pt")
                self._write_log()
                progress.console.print(
                    f"epoch {self.epoch:>3}: train {values['train_loss']:.4f}  val {values['val_loss']:.4f}"
                    f"  val AP@0.5 {values['val_ap50']:.3f}  lr {values['learning_rate']:.2e}"
                    + ("  (best)" if improved else "")
                )
        return self._finish()

    def _is_improvement(self, values: dict[str, float]) -> bool:
        metric = self.config.training.best_metric
        value = values[metric]
        if math.isnan(value):
            metric, value = "val_loss", values["val_loss"]
        if self.best_value is None or (value < self.best_value if metric == "val_loss" else value > self.best_value):
            self.best_value = value
            return True
        return False

    def _finish(self) -> TrainingRun:
        best_path = self.run_dir / "best.pt"
        if not best_path.exists():  # e.g. resumed a finished run
            self._save("best.pt")
        best_state = read_checkpoint_state(best_path)
        threshold, validation = None, {}
        if self.config.training.threshold_tuning and any(r.labels is not None for r in self.val_records):
            # Tune with the best weights, then restore the last ones (both checkpoints get the threshold).
            last_weights = {k: v.clone() for k, v in self.net.state_dict().items()}
            self.net.load_state_dict(best_state["model_state"])
            threshold, validation = self.tune_threshold()
            self.log(f"foreground threshold tuned on {validation['n_images']} validation images: {threshold:.2f} (AP@0.5 {validation['ap50']:.3f})")
            self._save("best.pt", threshold=threshold, extra={"validation": validation})
            self.net.load_state_dict(last_weights)
        self._save("last.pt", threshold=threshold, extra={"validation": validation})
        return TrainingRun(self.run_dir, best_path, self.run_dir / "last.pt", self.history, threshold, validation)

    def tune_threshold(self) -> tuple[float, dict[str, Any]]:
        """The foreground threshold maximising mean validation AP@0.5 over the head's candidates."""
        records = [r for r in self.val_records if r.labels is not None]
        probabilities = self.predict_probabilities(records)
        candidates = tuple(self.built.head.threshold_candidates)
        scores = []
        for t in candidates:
            scores.append(float(np.mean([average_precision(r.labels, self.built.head.instances(p, t)) for r, p in zip(records, probabilities)])))
        best = int(np.argmax(scores))
        return float(candidates[best]), {
            "ap50": scores[best],
            "n_images": len(records),
            "thresholds": list(map(float, candidates)),
            "ap50_per_threshold": scores,
        }

    def _write_log(self) -> None:
        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
        atomic_write_text(self.run_dir / "log.csv", buffer.getvalue())
        try:
            atomic_write_bytes(self.run_dir / "training_curves.png", plot_history(self.history))
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
    axes[2].plot(epochs, [h["val_ap50"] for h in history], color="tab:green")
    axes[2].set_title("validation AP@0.5 (threshold 0.5)")
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train(
    config: DenoiSegConfig,
    *,
    resume: bool = False,
    init_from: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainingRun:
    """Train (or resume) the run described by ``config``; returns where the checkpoints are."""
    return Trainer(config, resume=resume, init_from=init_from, progress=progress, log=log).fit()


def resume_config(run_dir: Path) -> DenoiSegConfig:
    """The config of an existing run, read from its ``last.pt`` (the config travels in the checkpoint)."""
    state = read_checkpoint_state(Path(run_dir) / "last.pt")
    config = DenoiSegConfig.model_validate(state["config"])
    config.run_dir = Path(run_dir)
    return config


__all__ = ["Trainer", "TrainingRun", "train", "resume_config", "resolve_device", "resolve_precision", "load_checkpoint"]
