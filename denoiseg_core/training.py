"""The DenoiSeg training loop.

One step: sample a batch of patches (some labelled), mask blind spots, run the network,
and minimise ``alpha * N2V masked MSE + (1 - alpha) * class-weighted cross-entropy``
(see :mod:`denoiseg_core.losses`). After every epoch: validation losses and AP, the CSV
log and the curves PNG, ``last.pt`` (with everything needed to resume) and ``best.pt``.
After the last epoch the head's instance settings (e.g. the foreground threshold) are
tuned on the validation images and stored in both checkpoints. The loop is here; what it carries from epoch to epoch and
saves to resume (weights, their moving average, optimizer, random streams, best values)
is :mod:`denoiseg_core.training_state`, what it shows and writes about itself (progress
bar, ``log.csv``, ``training_curves.png``) :mod:`denoiseg_core.training_report`, and how
it scores the network :mod:`denoiseg_core.evaluation`.

Speed (see ``benchmarks/throughput.py``): 2D networks train in channels_last layout;
``training.precision: auto`` uses bf16 autocast (float32 master weights and losses) where
the hardware has native bf16 (CUDA, AMX or AVX512-BF16 CPUs); losses are accumulated on
the device (no host sync per step); ``training.num_workers > 0`` samples patches in
DataLoader worker processes (pinned memory on CUDA); ``training.compile`` wraps the
network in ``torch.compile``; under ``torchrun`` the run is data-parallel (DDP, see
:mod:`denoiseg_core.runtime.distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denoiseg_core.checkpoint import BEST_DENOISING, read_checkpoint_state, read_package_state
from denoiseg_core.config import DenoiSegConfig, fill_component_params, save_config, stored_config, validate_components
from denoiseg_core.components import InstanceSettings
from denoiseg_core.data import (
    ImageRecord,
    Normalization,
    PatchSampler,
    PatchStream,
    compute_normalization,
    load_training_data,
)
from denoiseg_core.augmentation import add_noise, elastic_deform
from denoiseg_core.errors import ConfigError, DenoiSegError
from denoiseg_core.evaluation import LiveModel, run_precision, scored_records, tune_instance_settings, validation_ap50
from denoiseg_core.losses import denoiseg_loss
from denoiseg_core.model import BuiltModel, build_model
from denoiseg_core.plugin_manager import get_registry, plugin_versions
from denoiseg_core.runtime import (
    autocast,
    distributed,
    preferred_memory_format,
    resolve_device,
)
from denoiseg_core.safeguards import (
    adopt_newer_best,
    check_finite_epoch,
    check_run_folder,
    claim_run_folder,
    warn_about_training_data,
)
from denoiseg_core.training_report import TrainingReport
from denoiseg_core.training_state import (
    LabelledFractionSchedule,
    LinearRamp,
    RandomStreams,
    TrainingState,
    seed_everything,
)

VALIDATION_PATCH_BATCHES = 4
#: torch.compile backend used by ``training.compile`` (tests may pick a cheaper one)
COMPILE_BACKEND = "inductor"


@dataclass
class TrainingRun:
    """What :func:`train` returns."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, float]]
    #: the tuned instance settings (None: not tuned)
    instance_settings: InstanceSettings | None
    validation: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """One training run: data, network, steps and epochs; :meth:`fit` runs it to the end (its state is
    :attr:`state`, its output :attr:`report`)."""

    def __init__(
        self,
        config: DenoiSegConfig,
        *,
        resume: bool = False,
        init_from: Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        records: tuple[list[ImageRecord], list[ImageRecord]] | None = None,
    ):
        """``records``: ``(train, validation)`` image records built in memory (e.g. by a
        benchmark); when given, ``config.data`` is not read for data (patch size etc. still are)."""
        self.config = config = config.model_copy(deep=True)  # the plugin versions are recorded in it
        self.run_dir = Path(config.run_dir)
        self.registry = get_registry()
        validate_components(config, self.registry)  # fail on unknown names/params before loading any data
        self.device = resolve_device(config.training.device)  # 'auto': CUDA if available, else CPU
        # Under torchrun: one process per GPU (cuda:LOCAL_RANK) or several CPU processes.
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        self.log = log if self.is_main else (lambda _message: None)
        self.report = TrainingReport(self.run_dir, progress=progress and self.is_main, log=self.log)
        self.batch_size = distributed.per_rank_batch(config.training.batch_size, self.dist.world_size)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels once

        check_run_folder(self.run_dir, resume)
        seed_everything(config.seed)
        if records is None:
            self.train_records, self.val_records = load_training_data(config.data, seed=config.seed)
        else:
            self.train_records, self.val_records = list(records[0]), list(records[1])
        first = self.train_records[0]
        self.ndim, self.in_channels = first.ndim, first.image.shape[0]
        self.precision = run_precision(config, self.ndim, self.device)
        config.plugins = plugin_versions(
            self.registry,
            [
                ("backbone", config.model.backbone.name),
                ("masking", config.model.masking.name),
                ("head", config.model.head.name),
            ],
        )
        fill_component_params(config, self.registry)
        self.built: BuiltModel = build_model(config, self.ndim, self.in_channels, self.registry)
        self.normalization = compute_normalization(self.train_records)
        if init_from is not None:
            self._init_weights(Path(init_from))
        divisor = self.built.size_divisor
        if any(s % divisor for s in config.data.patch_size):
            raise ConfigError(f"data.patch_size {config.data.patch_size} must be a multiple of {divisor} for this backbone")

        self.memory_format = preferred_memory_format(self.ndim, self.device)
        self.net = self.built.net.to(self.device, memory_format=self.memory_format)
        self.state = TrainingState(
            self.net, config.training, RandomStreams(config.seed, self.dist.rank, self.device), self.device
        )
        # labelled_fraction over the run's steps (None: the sampler's constant fraction)
        cfg = config.training
        self._labelled_fraction_at: LabelledFractionSchedule | None = None
        ramped = cfg.labelled_fraction is not None and cfg.labelled_fraction_final is not None
        if ramped or cfg.denoising_finish_epochs:
            ramp = None
            finish_from = cfg.denoising_finish_start * cfg.steps_per_epoch
            if ramped:  # reached where the denoising finish starts
                ramp = LinearRamp(cfg.labelled_fraction, cfg.labelled_fraction_final, finish_from)
            self._labelled_fraction_at = LabelledFractionSchedule(
                ramp, finish_from if cfg.denoising_finish_epochs else None
            )
        self.semi_supervised = None
        if config.training.semi_supervised is not None:
            chosen = config.training.semi_supervised
            spec = self.registry.spec("semi_supervised", chosen.name)
            self.semi_supervised = spec.build(spec.params.model_validate(chosen.params))
        self.sampler = PatchSampler(
            self.train_records,
            config.data.patch_size,
            self.normalization,
            self.built.head.targets,
            self.built.head.target,
            labelled_fraction=config.training.labelled_fraction,
            augment=config.training.augment,
            seed=config.seed,
        )
        self.val_sampler = PatchSampler(
            self.val_records,
            config.data.patch_size,
            self.normalization,
            self.built.head.targets,
            self.built.head.target,
            labelled_fraction=None,
            augment=False,
            seed=config.seed + 1,
        )
        if self.is_main:
            warn_about_training_data(
                self.train_records, self.val_records, self.sampler.labelled_count, config.training.alpha, self.log
            )
        self._fixed_val_batches = self._make_validation_batches()

        # creates the folder; a second training into it stops here (held until fit() ends)
        self._run_lock = claim_run_folder(self.run_dir, self.log) if self.is_main else None
        if resume:
            self._resume(self.run_dir / "last.pt")
        if self.is_main:
            save_config(self.config, self.run_dir / "config.yaml")
        self.train_net: torch.nn.Module = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's weights now and averages gradients in every backward.
            self.train_net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._train_forward: Callable[[torch.Tensor], torch.Tensor] = self.train_net
        self._compile_pending = False
        if config.training.compile:
            self._set_up_compile()

    # what the run's state holds, as the loop and its callers (e.g. the napari widget) read it
    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def history(self) -> list[dict[str, float]]:
        return self.state.history

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def ema(self) -> torch.optim.swa_utils.AveragedModel | None:
        return self.state.ema

    @property
    def eval_net(self) -> torch.nn.Module:
        return self.state.eval_net

    # ------------------------------------------------------------------ set-up helpers
    def _set_up_compile(self) -> None:
        """``torch.compile`` the training forward; fall back to eager with a warning when
        compilation is unavailable (no compiler, unsupported platform) here or at the first step."""
        try:
            self._train_forward = torch.compile(self.train_net, backend=COMPILE_BACKEND)
            self._compile_pending = True
        except Exception as exc:  # noqa: BLE001 (torch.compile raises many kinds of errors; any means: no compile)
            self.log(f"warning: torch.compile is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); training without it")

    def _init_weights(self, source: Path) -> None:
        """Start from the weights (and normalisation) of a checkpoint or a denoiseg bioimage.io package."""
        if source.suffix == ".zip":
            state = read_package_state(source)
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

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, path: Path) -> None:
        checkpoint = read_checkpoint_state(path)
        # filled in as this run's config is (a checkpoint from before that lists only the params it was given)
        saved = fill_component_params(stored_config(checkpoint["config"]), self.registry)
        if saved.model != self.config.model:
            raise ConfigError(f"{path}: the model settings differ from the run being resumed; resume with the run's own config")
        self.state.restore(checkpoint, path)
        self.normalization = Normalization(**checkpoint["normalization"])
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}")
        if self.is_main:
            self.state.best.value = adopt_newer_best(self.run_dir, self.epoch, self.state.best.value, self.log)
            self.report.write(self.history)  # a kill after last.pt but before log.csv lost the last row

    def _save(self, name: str, settings: InstanceSettings | None = None, extra: dict | None = None, epoch: int | None = None) -> Path:
        path = self.run_dir / name
        self.state.save(
            path,
            config=self.config,
            built=self.built,
            normalization=self.normalization,
            resumable=name == "last.pt",
            instance_settings=settings,
            extra=extra,
            epoch=epoch,  # default the current epoch; best.pt after tuning keeps its own
        )
        return path

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch):
        """numpy arrays (or tensors from a DataLoader) -> tensors on the device; copies from
        pinned memory on CUDA so they overlap with compute."""
        cuda = self.device.type == "cuda"
        out = []
        for array in batch:
            tensor = torch.as_tensor(array)
            if cuda and not tensor.is_pinned():
                tensor = tensor.pin_memory()
            out.append(tensor.to(self.device, non_blocking=cuda))
        return tuple(out)

    def _losses(
        self,
        patches,
        targets,
        labelled,
        generator,
        forward=None,
        alpha=None,
        semi_supervised=None,
        learned_weights=False,
        no_denoising=None,
    ):
        """``(total, denoise, seg)`` of a batch; ``semi_supervised``: ``progress`` of the joint
        training when the semi-supervised term is to be added (training steps only);
        ``learned_weights``: weigh the terms by ``training.loss_weighting``'s learned weights rather
        than alpha (training steps); ``no_denoising``: bool ``(B,)``, patches left out of the denoising term."""
        masked, loss_mask = self.built.masking(patches, generator)
        if no_denoising is not None:
            loss_mask = loss_mask & ~no_denoising.view((-1,) + (1,) * (loss_mask.ndim - 1))
        masked = masked.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.precision):
            output = self._forward(forward if forward is not None else self.eval_net, masked)
        denoised, logits = self.net.split(output.float())
        alpha = self.config.training.alpha if alpha is None else alpha
        total, denoise, seg = denoiseg_loss(denoised, patches, loss_mask, logits, targets, labelled, self.built.head, alpha)
        # alpha 0 or 1 asks for one term only, whatever the weighting
        if learned_weights and self.state.loss_weighting is not None and 0 < alpha < 1:
            total = self.state.loss_weighting(denoise, seg, labelled.any())
        if semi_supervised is not None and self.semi_supervised is not None:
            total = total + self.semi_supervised(
                student_logits=logits,
                patches=patches,
                labelled=labelled,
                teacher=self._teacher_logits,
                head=self.built.head,
                progress=semi_supervised,
                generator=generator,
            )
        return total, denoise, seg

    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Segmentation logits of the moving-average network (eval mode, no gradient)."""
        teacher = self.ema.module
        teacher.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            output = teacher(inputs.contiguous(memory_format=self.memory_format))
        return self.net.split(output.float())[1]

    def _jitter_intensity(self, patches: torch.Tensor) -> torch.Tensor:
        """Random gain and offset per patch (``training.intensity_jitter``)."""
        jitter = self.config.training.intensity_jitter
        if jitter <= 0:
            return patches
        shape = (patches.shape[0], 2) + (1,) * (patches.ndim - 1)
        masks = self.state.streams.masks
        draws = torch.rand(shape, generator=masks, device=masks.device).to(patches.device)
        draws = (2 * draws - 1) * jitter
        return patches * torch.exp(draws[:, 0]) + draws[:, 1]

    def _deform_elastically(self, patches, targets, labelled):
        """Half of the labelled patches (and their targets) warped (``training.elastic_deformation``);
        returns the batch and which patches were warped (``None``: none)."""
        magnitude = self.config.training.elastic_deformation
        if magnitude <= 0:
            return patches, targets, None
        chosen = self._half_of_labelled(labelled)
        patches, targets = elastic_deform(patches, targets, chosen, magnitude, self.state.streams.masks)
        return patches, targets, chosen

    def _add_noise(self, patches, labelled):
        """Half of the labelled patches with extra Gaussian noise (``training.noise_augmentation``);
        returns the batch and which patches got it (``None``: none)."""
        max_sigma = self.config.training.noise_augmentation
        if max_sigma <= 0:
            return patches, None
        chosen = self._half_of_labelled(labelled)
        return add_noise(patches, chosen, max_sigma, self.state.streams.masks), chosen

    def _half_of_labelled(self, labelled: torch.Tensor) -> torch.Tensor:
        """A fair coin per patch (from the masks stream) picks about half of the ``labelled`` ones."""
        masks = self.state.streams.masks
        coin = torch.rand(labelled.shape[0], generator=masks, device=masks.device).to(labelled.device) < 0.5
        return labelled & coin

    def _alpha(self, step: int) -> float:
        """The denoising weight of a joint training step (``training.alpha`` to ``alpha_final``)."""
        cfg = self.config.training
        if cfg.alpha_final is None:
            return cfg.alpha
        return cfg.alpha + (cfg.alpha_final - cfg.alpha) * self._joint_progress(step)

    def denoising_only_phase(self, epoch: int) -> str | None:
        """Which Noise2Void-only phase the 0-based ``epoch`` belongs to (``"warm start"`` before the
        joint loss, ``"denoising finish"`` after it), or None for a joint epoch."""
        cfg = self.config.training
        if epoch < cfg.warm_start_epochs:
            return "warm start"
        if epoch >= cfg.denoising_finish_start:
            return "denoising finish"
        return None

    def _joint_progress(self, step: int) -> float:
        """Fraction of the joint training (between warm start and denoising finish) done at ``step``
        of the current epoch."""
        cfg = self.config.training
        done = (self.epoch - cfg.warm_start_epochs) * cfg.steps_per_epoch + step
        joint_steps = (cfg.denoising_finish_start - cfg.warm_start_epochs) * cfg.steps_per_epoch
        return min(1.0, max(0.0, done / max(1, joint_steps)))

    def _forward(self, forward, inputs: torch.Tensor) -> torch.Tensor:
        if not (self._compile_pending and forward is self._train_forward):
            return forward(inputs)
        try:  # torch.compile compiles lazily: the first call is where it can fail
            output = forward(inputs)
        except Exception as exc:  # noqa: BLE001 (any compiler failure means: train without it)
            self.log(f"warning: torch.compile failed ({type(exc).__name__}); training without it")
            self._train_forward = self.train_net
            output = self.train_net(inputs)
        self._compile_pending = False
        return output

    def train_step(self, batch, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step (``step`` of the current epoch); returns the detached loss
        terms as device tensors (``total, denoise, seg``), so the caller decides when to wait."""
        self.net.train()
        patches, targets, labelled = self._to_device(batch)
        patches = self._jitter_intensity(patches)
        patches, targets, deformed = self._deform_elastically(patches, targets, labelled)
        patches, noised = self._add_noise(patches, labelled)
        # warped or re-noised patches: their noise is no longer the data's, so they skip the denoising term
        no_denoising = deformed if noised is None else (noised if deformed is None else deformed | noised)
        warm = self.denoising_only_phase(self.epoch) is not None
        total, denoise, seg = self._losses(
            patches,
            targets,
            labelled,
            self.state.streams.masks,
            self._train_forward,
            alpha=1.0 if warm else self._alpha(step),
            semi_supervised=None if warm else self._joint_progress(step),
            learned_weights=not warm,
            no_denoising=no_denoising,
        )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.dist.enabled and self.state.loss_weighting is not None:
            # DDP averages the network's gradients only; the learned loss weights must agree across ranks too
            for parameter in self.state.loss_weighting.parameters():
                if parameter.grad is not None:
                    parameter.grad = distributed.all_reduce_mean(parameter.grad, self.dist)
        self.optimizer.step()
        self.state.step_done()
        return total.detach(), denoise.detach(), seg.detach()

    def batches(self) -> Iterator[tuple]:
        """Endless training batches of this rank's size.

        ``num_workers == 0``: sampled here from the run's patch stream (a seeded run is repeatable and
        resumes exactly). Otherwise worker processes sample them (:class:`PatchStream`,
        seeded by config seed, rank, worker and the epoch the loader started at; pinned
        memory on CUDA), overlapping data preparation with the training step.
        """
        workers = self.config.training.num_workers
        if workers == 0:
            index = self.epoch * self.config.training.steps_per_epoch
            while True:
                fraction = self._labelled_fraction_at(index) if self._labelled_fraction_at is not None else None
                yield self.sampler.sample(self.batch_size, self.state.streams.patches, fraction)
                index += 1
        from torch.utils.data import DataLoader

        stream = PatchStream(
            self.sampler,
            self.batch_size,
            seed=[self.config.seed, self.dist.rank, self.epoch],
            fraction_at=self._labelled_fraction_at,
            first_batch=self.epoch * self.config.training.steps_per_epoch,
        )
        loader = DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
        )
        yield from loader

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.eval_net.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 777)
        sums = torch.zeros(3, device=self.device)
        for batch in self._fixed_val_batches:
            total, denoise, seg = self._losses(*self._to_device(batch), generator)
            sums += torch.stack([total, denoise, seg])
        sums = (sums / len(self._fixed_val_batches)).tolist()
        result = {"val_loss": sums[0], "val_denoise": sums[1], "val_seg": sums[2]}
        limit = self.config.training.validation_images
        records = scored_records(self.val_records[:limit] if limit else self.val_records)
        if not records:
            return {**result, "val_ap50": math.nan, "val_ap50_tuned": math.nan, "val_threshold": math.nan}
        return {**result, **validation_ap50(self.live_model(), records, device=self.device, precision=self.precision)}

    def live_model(self) -> LiveModel:
        """The network that is validated (the moving average when there is one), as a model to evaluate."""
        return LiveModel.of(self.config, self.built, self.eval_net, self.normalization)

    # ------------------------------------------------------------------ epochs
    def fit(self) -> TrainingRun:
        try:
            return self._fit()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()

    def _fit(self) -> TrainingRun:
        cfg = self.config.training
        self.log(
            f"training on {self.device} ({self.precision}"
            + (f", {self.dist.world_size} processes, {self.batch_size} patches each" if self.dist.enabled else "")
            + f"): {len(self.train_records)} images "
            f"({self.sampler.labelled_count} labelled), {len(self.val_records)} validation images, "
            f"{self.net.__class__.__name__} with {sum(p.numel() for p in self.net.parameters()):,} parameters"
        )
        with self.report.bar(cfg.epochs * cfg.steps_per_epoch, self.epoch * cfg.steps_per_epoch):
            batches = self.batches()
            try:
                while self.epoch < cfg.epochs:
                    self._run_epoch(batches)
            finally:
                batches.close()  # stops DataLoader workers
        try:
            result = self._finish()
            # Ranks leave together: a rank tearing down gloo while rank 0 still tunes the
            # threshold made the early rank abort at exit.
            distributed.barrier(self.dist)
        finally:
            distributed.teardown(self.dist)
        return result

    def _run_epoch(self, batches: Iterator[tuple]) -> None:
        cfg = self.config.training
        if cfg.denoising_finish_epochs and self.epoch == cfg.denoising_finish_start:
            # The finish runs at the initial rate again: the joint epochs' plateaus (mostly segmentation
            # over-fitting the few labels) say nothing about how far denoising still has to go. (A half
            # cosine down to 0 instead denoised worse on DSB2018: 33.97 and 34.36 dB against 34.13 and 34.44.)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.learning_rate
        started = time.perf_counter()
        self.report.epoch_started()
        sums = torch.zeros(3, device=self.device)  # summed on the device: no host sync per step
        for step in range(cfg.steps_per_epoch):
            sums += torch.stack(self.train_step(next(batches), step)).float()
            self.report.step_done(self.epoch + 1, cfg.epochs, step + 1, cfg.steps_per_epoch, sums)
        train = (distributed.all_reduce_mean(sums, self.dist) / cfg.steps_per_epoch).tolist()
        self.state.epoch += 1
        validation = self.validate() if self.is_main else {}
        # The LR scheduler must see the same validation loss on every rank.
        val_keys = ("val_loss", "val_denoise", "val_seg", "val_ap50", "val_ap50_tuned", "val_threshold")
        shared = distributed.broadcast_values([validation.get(k, 0.0) for k in val_keys], self.dist, self.device)
        validation = dict(zip(val_keys, shared))
        values = {
            "epoch": self.epoch,
            "train_loss": train[0],
            "train_denoise": train[1],
            "train_seg": train[2],
            **validation,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        check_finite_epoch(values, self.epoch, self.run_dir)  # before any save: checkpoints keep the last good epoch
        self.history.append(values)
        phase = self.denoising_only_phase(self.epoch - 1)  # this epoch trained Noise2Void only unless None
        # The warm start runs at the full learning rate (the plateau count starts after it), so does the
        # finish (its validation loss, half segmentation, would only rise).
        if phase is None:
            self.state.scheduler.step(values["val_loss"])
        improved = phase is None and self.state.best.improves(values)
        # with a denoising finish, best_denoising.pt is one of its epochs: the validation denoising loss
        # moves by a few parts in a thousand, so a joint epoch could win by chance against a better denoiser
        finishing = cfg.denoising_finish_epochs == 0 or phase == "denoising finish"
        denoise_improved = finishing and self.state.best.improves_denoising(values)
        self._check_ranks_agree_on_loss_weights()
        if not self.is_main:
            return
        # best checkpoints first: a kill between the writes never leaves one behind last.pt
        if improved:
            self._save("best.pt", extra={"best_value": self.state.best.value})
        if denoise_improved:
            self._save(BEST_DENOISING)
        self._save("last.pt")
        self.report.write(self.history)
        self.report.epoch_done(values, denoising_only=phase, best=improved)

    def _check_ranks_agree_on_loss_weights(self) -> None:
        """Stop if the learned loss weights differ between ranks: DDP does not average their gradients
        (see :meth:`train_step`), and rank 0 saves only its own."""
        if not (self.dist.enabled and self.state.loss_weighting is not None):
            return
        own = self.state.loss_weighting.log_variances.detach().double().cpu()
        rank0 = torch.tensor(distributed.broadcast_values(own.tolist(), self.dist, self.device), dtype=torch.float64)
        # every rank learns whether any rank differs, so all stop together instead of one waiting forever
        differs = distributed.all_reduce_mean((own - rank0).abs().max().reshape(1).to(self.device), self.dist)
        if float(differs) > 1e-6:
            mine = "" if self.dist.rank == 0 else f"rank {self.dist.rank}: {own.tolist()}, "
            raise RuntimeError(
                f"epoch {self.epoch}: the learned loss weights differ between processes ({mine}rank 0: {rank0.tolist()})"
            )

    def _finish(self) -> TrainingRun:
        best_path = self.run_dir / "best.pt"
        if self.state.loss_weighting is not None and self.is_main:
            denoise_weight, seg_weight = self.state.loss_weighting.weights()
            self.log(f"learned loss weights: denoising {denoise_weight:.3g}, segmentation {seg_weight:.3g}")
        if not self.is_main:  # rank 0 tunes the instance settings and writes the final checkpoints
            return TrainingRun(self.run_dir, best_path, self.run_dir / "last.pt", self.history, None, {})
        if not best_path.exists():  # e.g. resumed a finished run
            self._save("best.pt")
        best_state = read_checkpoint_state(best_path)
        settings, validation = None, {}
        if self.config.training.threshold_tuning and scored_records(self.val_records):
            # Tune with the best weights, then restore the last ones (both checkpoints get the settings).
            last_weights = {k: v.clone() for k, v in self.eval_net.state_dict().items()}
            self.eval_net.load_state_dict(best_state["model_state"])
            settings, validation = tune_instance_settings(
                self.live_model(), scored_records(self.val_records), device=self.device, precision=self.precision
            )
            self.log(f"instance settings tuned on {validation['n_images']} validation images: {settings.describe()} (AP@0.5 {validation['ap50']:.3f})")
            self._save(
                "best.pt",
                settings=settings,
                extra={**(best_state.get("extra") or {}), "validation": validation},
                epoch=int(best_state["epoch"]),  # not the last epoch: these are the best epoch's weights
            )
            self.eval_net.load_state_dict(last_weights)
        self._save("last.pt", settings=settings, extra={"validation": validation})
        return TrainingRun(self.run_dir, best_path, self.run_dir / "last.pt", self.history, settings, validation)


def train(
    config: DenoiSegConfig,
    *,
    resume: bool = False,
    init_from: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    records: tuple[list[ImageRecord], list[ImageRecord]] | None = None,
) -> TrainingRun:
    """Train (or resume) the run described by ``config``; returns where the checkpoints are.

    ``records``: optional in-memory ``(train, validation)`` records instead of ``config.data``'s files.
    """
    return Trainer(config, resume=resume, init_from=init_from, progress=progress, log=log, records=records).fit()


def resume_config(run_dir: Path) -> DenoiSegConfig:
    """The config of an existing run, read from its ``last.pt`` (the config travels in the checkpoint)."""
    state = read_checkpoint_state(Path(run_dir) / "last.pt")
    config = stored_config(state["config"])
    config.run_dir = Path(run_dir)
    return config


__all__ = ["Trainer", "TrainingRun", "resume_config", "train"]
