"""The run configuration: one strict pydantic model, read from YAML with ``--set`` overrides.

Unknown keys anywhere are rejected. Component parameters are validated against the
parameter model each plugin declares (:func:`validate_components`), so a typo in a
backbone parameter fails before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from denoiseg_core.errors import ConfigError


class StrictModel(BaseModel):
    # allow_inf_nan=False: .inf or .nan in any setting (e.g. learning_rate) is refused up front
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ComponentConfig(StrictModel):
    """A component chosen by name, with its parameters (validated by the component's own model)."""

    name: str = Field(description="registered component name (see `denoiseg plugins list`)")
    params: dict[str, Any] = Field(default_factory=dict, description="component parameters; unset ones take defaults")


class ModelConfig(StrictModel):
    backbone: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="unet"))
    masking: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="n2v"))
    head: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="three_class"))


class DataConfig(StrictModel):
    train: Path | None = Field(
        None, description="folder with images/ (and masks/ for the labelled subset), or a DenoiSeg .npz file"
    )
    validation: Path | None = Field(None, description="validation folder (images/ + masks/); default: a held-out fraction")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of labelled images held out when no validation folder is given")
    n_labelled: int | None = Field(None, ge=0, description="keep labels for only this many training images (few-shot, seeded)")
    noise_sigma: float = Field(0.0, ge=0, description="add Gaussian noise of this sigma (image intensity units) to training images")
    patch_size: list[int] = Field(default_factory=lambda: [64, 64], description="training patch size (YX, or ZYX for 3D)")
    axes: Literal["auto", "YX", "ZYX", "CYX", "CZYX"] = Field("auto", description="axes of the input images; auto: YX for 2D, ZYX for 3D")
    pixel_limit: int | None = Field(None, gt=0, description="raise an error for images larger than this many pixels")

    @field_validator("patch_size")
    @classmethod
    def _patch_dims(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(s < 8 for s in v):
            raise ValueError("patch_size must have 2 (YX) or 3 (ZYX) entries, each >= 8")
        return v


class TrainingConfig(StrictModel):
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * denoising + (1 - alpha) * segmentation")
    epochs: int = Field(200, ge=1)
    steps_per_epoch: int = Field(400, ge=1)
    batch_size: int = Field(128, ge=1)
    labelled_fraction: float | None = Field(
        0.75,
        ge=0,
        le=1,
        description="fraction of each batch drawn from labelled patches (at the start, see labelled_fraction_final); "
        "None: uniform over all patches as in the paper (with 10 labelled crops among thousands that starves the "
        "segmentation term: on DSB2018 n20, 800 steps, test AP@0.5 0.35 uniform vs 0.56 with 0.25); a constant 0.75 "
        "is part of the default recipe chosen on validation data",
    )
    learning_rate: float = Field(4e-4, gt=0)
    lr_patience: int = Field(10, ge=1, description="epochs without validation improvement before the learning rate is halved")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    augment: bool = Field(True, description="8-fold rotation/flip augmentation")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast with fp32 weights, or fp32; auto: bf16 on CUDA and on CPUs with native bf16 "
        "(AMX or AVX512-BF16), fp32 otherwise",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes sampling patches; 0 samples in the training process (exactly repeatable)"
    )
    compile: bool = Field(False, description="torch.compile the network (falls back to eager with a warning if unavailable)")
    validation_batches: int | None = Field(None, ge=1, description="limit validation to this many batches")
    threshold_tuning: bool = Field(True, description="tune the head's instance settings (e.g. the foreground threshold) on validation data after training")
    best_metric: Literal["val_loss", "val_ap50", "val_ap50_tuned"] = Field(
        "val_ap50_tuned",
        description="what selects best.pt: highest validation AP@0.5 at the best foreground threshold of that epoch "
        "(val_ap50_tuned), at the fixed threshold 0.5 (val_ap50), or lowest validation loss (val_loss, as the paper); "
        "the AP metrics fall back to the loss without validation labels",
    )
    ema_decay: float | None = Field(
        0.99,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights (decay per step) and use it for validation, "
        "checkpoints and export; None: the raw weights (as the paper). On DSB2018 (n20, 10 labelled crops, 3 seeds) "
        "it raised validation AP@0.5 from 0.572 to 0.617 and test AP@0.5 from 0.572 to 0.627",
    )
    warm_start_epochs: int = Field(
        0,
        ge=0,
        description="self-supervised warm start: train Noise2Void only (alpha 1) for this many epochs before the joint "
        "loss; these epochs are not candidates for best.pt",
    )
    denoising_finish_fraction: float = Field(
        1 / 3,
        ge=0,
        lt=1,
        description="finish with Noise2Void only (alpha 1, batches drawn uniformly from all images, at learning_rate "
        "again) for this fraction of the epochs (at least one, and at least one joint epoch is kept): best_denoising.pt "
        "is then one of these epochs and best.pt never, so one run gives a segmentation checkpoint and a denoiser "
        "trained without the segmentation term pulling at it; ignored when alpha is 0 or 1 (one term only). Part of the default "
        "recipe: on DSB2018 (n20, 10 labelled crops, 3 seeds) best_denoising.pt rose from 33.63 to 34.34 dB "
        "PSNR, 0.24 dB below pure Noise2Void on the mean of two seeds, at no cost to segmentation (its best epochs came "
        "before the last third)",
    )
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW) when > 0; 0: plain Adam as the paper")
    intensity_jitter: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="augment patches by a random gain exp(u) and offset u (u uniform in [-j, j], normalised units) per "
        "patch; 0: none, as the paper; 0.2 is part of the default recipe chosen on validation data",
    )
    alpha_final: float | None = Field(
        None,
        ge=0,
        le=1,
        description="loss balancing schedule: alpha moves linearly from `alpha` to this value over the joint "
        "(post-warm-start) training steps; None: constant alpha. Validation losses use `alpha`, so epochs compare",
    )
    loss_weighting: Literal["fixed", "uncertainty"] = Field(
        "uncertainty",
        description="fixed: alpha weighs the two terms (as the paper); uncertainty: learned weights, each term times "
        "exp(-s) plus s/2 with one learned log-variance s per term (Kendall, Gal & Cipolla 2018); alpha then only "
        "weighs the validation loss, except that alpha 0 or 1 still trains one term only. Part of the default recipe, "
        "chosen on validation data: on DSB2018 (n20, 10 labelled crops, 3 seeds) validation AP@0.5 0.680 -> 0.688 "
        "at the cpu budget, higher on every seed",
    )
    labelled_fraction_final: float | None = Field(
        None,
        ge=0,
        le=1,
        description="labelled_fraction at the last training step before the denoising finish (if any), reached "
        "linearly from `labelled_fraction`; None: constant; ignored when labelled_fraction is None (uniform batches). "
        "Constant is the default, chosen on validation data: on DSB2018 (n20, cpu budget, 3 seeds) a fall from 0.75 to "
        "0.25 gave validation AP@0.5 0.691 with 10 labelled crops and 0.690 with 38, a constant 0.75 0.692 and 0.702",
    )
    elastic_deformation: float = Field(
        0.0,
        ge=0,
        description="augment half of the labelled patches by a smooth random elastic deformation of this many pixels "
        "(standard deviation of the displacement); those patches are left out of the denoising term (interpolation "
        "correlates their noise); 0: none, as the paper",
    )
    noise_augmentation: float = Field(
        0.0,
        ge=0,
        description="augment half of the labelled patches by adding pixel-wise Gaussian noise whose standard deviation "
        "is drawn uniformly from [0, this] (normalised units), so segmentation learns more noise levels than the labelled "
        "crops hold; those patches are left out of the denoising term (their noise is no longer the data's); 0: none, "
        "as the paper. Not in the default: on DSB2018 (n20, 10 labelled crops, screen budget, 3 seeds) 0.5 gave "
        "validation AP@0.5 0.685 against the default's 0.682, less than the seeds scatter",
    )
    semi_supervised: ComponentConfig | None = Field(
        default_factory=lambda: ComponentConfig(
            name="mean_teacher", params={"loss": "cross_entropy", "confidence": 0.9, "weight": 1.0}
        ),
        description="a semi-supervised objective on all patches (see `denoiseg plugins list`); its teacher is the EMA "
        "of the weights, so it needs ema_decay. Default: the EMA teacher's confident classes as pseudo-labels; "
        "null: labelled patches alone teach segmentation (as the paper)",
    )

    @model_validator(mode="after")
    def _teacher_needs_ema(self) -> TrainingConfig:
        if self.semi_supervised is not None and self.ema_decay is None:
            raise ValueError("semi_supervised needs ema_decay (its teacher is the moving average of the weights)")
        if self.alpha_final is not None and self.loss_weighting == "uncertainty":
            raise ValueError(
                "alpha_final schedules alpha, which loss_weighting 'uncertainty' (the default) replaces by learned "
                "weights: set training.loss_weighting to fixed"
            )
        if self.warm_start_epochs >= self.epochs:
            raise ValueError(f"warm_start_epochs ({self.warm_start_epochs}) must be less than epochs ({self.epochs})")
        return self
    validation_images: int | None = Field(
        None, ge=1, description="compute validation AP on at most this many validation images per epoch (all by default)"
    )

    @property
    def denoising_finish_epochs(self) -> int:
        """How many of the last epochs train denoising alone (``denoising_finish_fraction``)."""
        if not self.denoising_finish_fraction or not 0 < self.alpha < 1:
            return 0
        wanted = max(1, round(self.denoising_finish_fraction * self.epochs))
        return max(0, min(wanted, self.epochs - self.warm_start_epochs - 1))

    @property
    def denoising_finish_start(self) -> int:
        """The 0-based epoch where the denoising finish starts (``epochs`` when there is none): the
        joint epochs end here."""
        return self.epochs - self.denoising_finish_epochs


class DenoiSegConfig(StrictModel):
    """Everything a training run needs; saved in the run folder and in every checkpoint."""

    seed: int = 0
    run_dir: Path = Field(Path("runs/denoiseg"), description="where checkpoints, logs and plots go")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    plugins: dict[str, str] = Field(
        default_factory=dict, description="distributions providing the components (filled in when a run starts)"
    )


#: settings added after runs were first written whose default is not the behaviour before them: a run,
#: checkpoint or package written earlier holds a complete config without them and gets these values
#: (a user's partial YAML gets the defaults instead)
_BEHAVIOUR_BEFORE_ADDED = {"training": {"loss_weighting": "fixed", "denoising_finish_fraction": 0.0}}


def stored_config(raw: dict) -> DenoiSegConfig:
    """The config stored in a checkpoint or package (a complete dump), as the version that wrote it meant it."""
    raw = dict(raw)
    for section, settings in _BEHAVIOUR_BEFORE_ADDED.items():
        if isinstance(raw.get(section), dict):
            raw[section] = {**settings, **raw[section]}
    return DenoiSegConfig.model_validate(raw)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return f"{source}: invalid config: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.epochs=3"`` -> (["training", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. training.epochs=10")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _deep_merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "params":
            _deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def load_config(path: Path | None = None, overrides: list[str] = (), base: dict | None = None) -> DenoiSegConfig:
    """Read a YAML config (or start from ``base``/defaults) and apply ``--set`` overrides.

    The file and the overrides are merged into the defaults section by section, so
    ``--set model.backbone.params.depth=3`` keeps the default backbone name. A component's
    ``params`` are replaced as a whole when its section names them.
    """
    raw: dict = _deep_merge(DenoiSegConfig().model_dump(mode="json"), dict(base or {}))
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError("config file not found", path)
        from denoiseg_core.errors import DataError
        from denoiseg_core.io import load_yaml

        try:
            loaded = load_yaml(path.read_text(), path)  # limits: no alias bombs
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("config must be a YAML mapping", path)
        raw.update(loaded)
    raw = apply_overrides(raw, list(overrides))
    try:
        config = DenoiSegConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    # Relative data paths in a config file are relative to the file, not the shell's cwd.
    if path is not None:
        for field in ("train", "validation"):
            value = getattr(config.data, field)
            if value is not None and not value.is_absolute():
                setattr(config.data, field, (path.parent / value).resolve())
    return config


def validate_components(config: DenoiSegConfig, registry=None) -> dict[str, Any]:
    """Check every named component exists and its params are valid; return the params models.

    Returns ``{"backbone": BackboneParams(...), "masking": ..., "head": ...}``.
    """
    from denoiseg_core.plugin_manager import get_registry

    registry = registry or get_registry()
    out = {}
    chosen_components = [(kind, getattr(config.model, kind)) for kind in ("backbone", "masking", "head")]
    if config.training.semi_supervised is not None:
        chosen_components.append(("semi_supervised", config.training.semi_supervised))
    for kind, chosen in chosen_components:
        # config.plugins lets a missing component's error name the distribution to install.
        spec = registry.get(kind, chosen.name, plugins=config.plugins).spec
        try:
            out[kind] = spec.params.model_validate(chosen.params)
        except ValidationError as exc:
            section = "training.semi_supervised" if kind == "semi_supervised" else f"model.{kind}"
            raise ConfigError(_format_validation_error(exc, f"{section} ({chosen.name}) params")) from None
    return out


def fill_component_params(config: DenoiSegConfig, registry=None) -> DenoiSegConfig:
    """Write every component's parameters out in full (defaults included), in place.

    A run's config and checkpoints then keep the settings it trained with when a later version
    changes a component's default (e.g. the ``unet`` backbone's dropout), so a resumed run goes
    on as it started.
    """
    for kind, params in validate_components(config, registry).items():
        section = config.training if kind == "semi_supervised" else config.model
        getattr(section, kind).params = params.model_dump(mode="json")
    return config


def save_config(config: DenoiSegConfig, path: Path) -> None:
    from denoiseg_core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
