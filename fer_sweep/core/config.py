"""The typed schema of a run's config, checked once, up front, before any data is read.

Hydra composes YAML; this module merges the result into dataclasses so that a wrong type, an
unknown key or an out-of-range value is reported as one clear message naming the setting and
the fix, instead of surfacing as a crash an hour into a sweep.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fer_sweep.errors import ConfigError

# MLflow's conventions decide the store when nothing is set (fer_sweep.sweep.store reads them).
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fer_sweep"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: object, options: tuple[str, ...]) -> None:
    _require(value in options, f"{key}={value!r} is not one of {', '.join(options)}.")


@dataclass
class DataConfig:
    name: str = "fer2013"
    synthetic: bool = False
    root: str = "data/fer2013"
    format: str = "auto"
    val_fraction: float = 0.2
    split_seed: int = 0
    limit_per_class: int | None = None
    cache_dir: str | None = None
    mean: float | None = None
    std: float | None = None
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, ("auto", "folder", "csv"))
        _require(
            0.0 < self.val_fraction < 1.0,
            f"data.val_fraction={self.val_fraction} must lie strictly between 0 and 1 "
            "(the study uses 0.2).",
        )
        _require(
            self.limit_per_class is None or self.limit_per_class > 0,
            f"data.limit_per_class={self.limit_per_class} must be a positive number of "
            "images per class, or null for all images.",
        )
        _require(self.std is None or self.std > 0, f"data.std={self.std} must be positive.")
        _require(
            (self.mean is None) == (self.std is None),
            "data.mean and data.std must be pinned together (or both null to compute them).",
        )


@dataclass
class ModelConfig:
    name: str = "cnn2"
    builder: str = "cnn"
    # conv_net
    conv_channels: list[int] = field(default_factory=lambda: [10, 20])
    kernel_size: int = 3
    padding: int = 0
    pool: int = 2
    batchnorm: bool = False
    # resnet
    stem_channels: int = 64
    stem_stride: int = 1  # 2: the stem halves 48x48 to 24x24 (4x fewer operations after it)
    stages: list[dict[str, int]] = field(default_factory=list)
    pool_size: int = 6
    # head
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _one_of("model.builder", self.builder, ("cnn", "resnet"))
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must lie in [0, 1).")
        _require(all(h > 0 for h in self.hidden), f"model.hidden={self.hidden} must be positive.")
        _require(
            self.dropout == 0 or bool(self.hidden),
            f"model.dropout={self.dropout} acts after the head's hidden layers and model="
            f"{self.name} has none (model.hidden=[]): add one (model.hidden=[500]) or set "
            "model.dropout=0.",
        )
        if self.builder == "cnn":
            _require(
                bool(self.conv_channels) and all(c > 0 for c in self.conv_channels),
                f"model.conv_channels={self.conv_channels} must be a non-empty list of "
                "positive integers.",
            )
            _require(
                self.kernel_size >= 1 and self.padding >= 0 and self.pool >= 1,
                f"model: need kernel_size >= 1, padding >= 0, pool >= 1; got "
                f"{self.kernel_size}, {self.padding}, {self.pool}.",
            )
        else:
            _require(
                self.stem_channels >= 1 and self.stem_stride >= 1 and self.pool_size >= 1,
                f"model: stem_channels, stem_stride and pool_size must be positive, got "
                f"{self.stem_channels}, {self.stem_stride}, {self.pool_size}.",
            )
            _require(
                bool(self.stages),
                "model.stages must be a non-empty list of "
                "{channels, blocks, stride} for builder resnet.",
            )
            for i, stage in enumerate(self.stages):
                _require(
                    {"channels", "blocks"} <= set(stage) <= {"channels", "blocks", "stride"},
                    f"model.stages[{i}] needs keys channels, blocks (and optional stride); "
                    f"got {sorted(stage)}.",
                )
                _require(
                    all(v >= 1 for v in stage.values()),
                    f"model.stages[{i}] values must be positive, got {dict(stage)}.",
                )

    def builder_kwargs(self) -> dict[str, Any]:
        """Only the keys the chosen builder takes."""
        head = {"hidden": list(self.hidden), "dropout": self.dropout}
        if self.builder == "cnn":
            return {
                "conv_channels": list(self.conv_channels),
                "kernel_size": self.kernel_size,
                "padding": self.padding,
                "pool": self.pool,
                "batchnorm": self.batchnorm,
                **head,
            }
        return {
            "stem_channels": self.stem_channels,
            "stem_stride": self.stem_stride,
            "stages": [dict(s) for s in self.stages],
            "pool_size": self.pool_size,
            **head,
        }


@dataclass
class TransformsConfig:
    name: str = "norm"
    rotation: float = 0.0
    translate: float = 0.0
    hflip: bool = False
    # RandomErasing(p=erase, scale=erase_scale, ratio=(0.3, 3.3), value=0): a random box of
    # each chosen training image set to the mean grey (0 after normalization)
    erase: float = 0.0
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])
    # RandomCrop(crop): each training image a random crop x crop window (0: none); evaluation
    # sees the whole image, so the model must not depend on the image size (model.builder=resnet)
    crop: int = 0

    def __post_init__(self) -> None:
        _require(
            self.crop >= 0,
            f"transforms.crop={self.crop} must be a size in pixels, or 0 for no crop.",
        )
        _require(  # every source is decoded to 48x48 (core.dataset.IMAGE_SIZE)
            self.crop <= 48,
            f"transforms.crop={self.crop} is larger than the 48x48 images; choose a crop of at "
            "most 48 pixels, or transforms.crop=0 for none.",
        )
        _require(
            0.0 <= self.erase <= 1.0,
            f"transforms.erase={self.erase} is a probability per image, 0..1.",
        )
        _require(
            len(self.erase_scale) == 2 and 0.0 < self.erase_scale[0] <= self.erase_scale[1] <= 1.0,
            f"transforms.erase_scale={self.erase_scale} must be [min, max] fractions of the "
            "image area with 0 < min <= max <= 1 (torchvision's default: [0.02, 0.33]).",
        )
        _require(
            0.0 <= self.rotation <= 180.0,
            f"transforms.rotation={self.rotation} must be in degrees, 0..180.",
        )
        _require(
            0.0 <= self.translate < 1.0,
            f"transforms.translate={self.translate} is a fraction of the image, 0..1.",
        )


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        _one_of("optimizer.name", self.name, ("sgd", "adam", "adamw"))
        _require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0 (the study uses 0.01).")
        _require(
            self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0."
        )
        _require(self.momentum >= 0, f"optimizer.momentum={self.momentum} must be >= 0.")
        if self.name == "sgd":
            _require(
                not self.nesterov or self.momentum > 0,
                "optimizer.nesterov=true needs momentum: set optimizer.momentum (e.g. 0.9).",
            )
        else:
            _require(
                self.momentum == 0 and not self.nesterov,
                f"optimizer.momentum and optimizer.nesterov are SGD's; {self.name} takes "
                "optimizer.betas instead.",
            )
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optimizer.betas={self.betas} must be two numbers in [0, 1) (Adam's default: "
            "[0.9, 0.999]).",
        )


@dataclass
class SchedulerConfig:
    name: str = "plateau"  # plateau: ReduceLROnPlateau on the validation loss (the study's)
    factor: float = 0.1  # plateau: lr *= factor after `patience` epochs without improvement
    patience: int = 10
    min_lr: float = 0.0  # plateau's floor; cosine's final rate
    # onecycle: per step, warm up from lr/div_factor to optimizer.lr over warmup of the steps,
    # then cosine down to lr/(div_factor*final_div_factor) (torch's OneCycleLR, no momentum cycle)
    warmup: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self) -> None:
        _one_of("scheduler.name", self.name, ("plateau", "cosine", "onecycle", "none"))
        _require(
            0.0 < self.warmup < 1.0,
            f"scheduler.warmup={self.warmup} is the fraction of steps spent warming up, in (0, 1).",
        )
        _require(
            self.div_factor >= 1.0 and self.final_div_factor >= 1.0,
            f"scheduler.div_factor={self.div_factor} and final_div_factor="
            f"{self.final_div_factor} must be >= 1.",
        )
        _require(0.0 < self.factor < 1.0, f"scheduler.factor={self.factor} must be in (0, 1).")
        _require(self.patience >= 0, f"scheduler.patience={self.patience} must be >= 0.")


# trainer.amp: the booleans of earlier configs and the usual spellings, mapped to the three states.
_PRECISION_ALIASES = {
    "true": "bf16",
    "false": "fp32",
    "bfloat16": "bf16",
    "float32": "fp32",
    "off": "fp32",
    "none": "fp32",
}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # epochs without a better validation loss; null = off

    def __post_init__(self) -> None:
        _require(
            self.patience is None or self.patience > 0,
            f"trainer.early_stopping.patience={self.patience} must be a positive number "
            "of epochs, or null (off).",
        )


@dataclass
class TrainerConfig:
    epochs: int = 100  # the study's recipe: 100 epochs, batch 100, cross-entropy
    batch_size: int = 100
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) one-hot + e uniform targets
    # weight averaging: validate, keep and log an exponential moving average of the weights (and
    # batch-norm statistics), updated after every optimizer step with this decay; 0 = off
    ema_decay: float = 0.0
    # validate the un-averaged weights too after every epoch: val_acc_raw and val_loss_raw
    # (~4 % more time with ema_decay; without, they are val_acc and val_loss). A search over
    # ema_decay prunes on them (hydra.sweeper.prune_on): early on, a long average still holds
    # the first epochs' weights and would lose to a short one whatever its merit
    val_raw: bool = False
    eval_batch_size: int = 1000  # evaluation runs without autograd, in large batches
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    seed: int = 0
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512-BF16/AMX), else fp32
    amp: str = "auto"  # auto | bf16 | fp32
    # channels_last memory format: every model's CPU step was faster in it (small CNNs 1.7x, the
    # ResNet 2.4x, docs/performance.md), and cuDNN's bf16 kernels want it on GPUs
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch intra-op threads; null = torch's default
    progress: bool = True  # a progress bar per epoch
    # <run id>.pt (the run's state) and <run id>.best-<epoch>.pt (its best weights), deleted at
    # the end
    checkpoint_dir: str = "checkpoints"
    resume: str | None = None  # null | auto | <mlflow run id>: continue an interrupted run
    checkpoint_every_s: float = 60.0  # at most one checkpoint per this many s; 0 = every epoch
    deterministic: bool = False  # CUDA: deterministic kernels (slower); CPU runs always are
    # stop after N epochs without a better validation loss (null = off)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    stop_at_min_lr: bool = False  # stop once the plateau scheduler cannot lower the rate
    # minutes of wall time for the whole job: trains as many epochs (up to trainer.epochs) as
    # fit, measured on this machine before training (fer_sweep/budget.py); null = off
    time_budget_min: float | None = None

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"trainer.epochs={self.epochs} must be a positive integer.")
        _require(
            -(2**63) <= self.seed < 2**64,
            f"trainer.seed={self.seed} is outside torch.manual_seed's range [-2**63, 2**64 - 1].",
        )
        _require(
            self.time_budget_min is None or self.time_budget_min > 0,
            f"trainer.time_budget_min={self.time_budget_min} must be a positive number of "
            "minutes, or null (train trainer.epochs epochs).",
        )
        _require(
            self.batch_size > 0, f"trainer.batch_size={self.batch_size} must be a positive integer."
        )
        _require(
            0.0 <= self.label_smoothing < 1.0,
            f"trainer.label_smoothing={self.label_smoothing} must lie in [0, 1) (0: off).",
        )
        _require(
            0.0 <= self.ema_decay < 1.0,
            f"trainer.ema_decay={self.ema_decay} must lie in [0, 1) (0: off; 0.99 averages "
            "about the last 100 optimizer steps).",
        )
        _require(
            self.eval_batch_size > 0,
            f"trainer.eval_batch_size={self.eval_batch_size} must be positive.",
        )
        _require(
            bool(_DEVICE.match(self.device)),
            f"trainer.device={self.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps.",
        )
        self.amp = str(self.amp).lower()
        self.amp = _PRECISION_ALIASES.get(self.amp, self.amp)
        _require(
            self.amp in ("auto", "bf16", "fp32"),
            f"trainer.amp={self.amp!r}: use auto (bf16 where the device is fast at it), "
            "bf16 or fp32.",
        )
        _require(
            self.checkpoint_every_s >= 0,
            f"trainer.checkpoint_every_s={self.checkpoint_every_s} must be >= 0 (0: every epoch).",
        )
        _require(
            self.threads is None or self.threads > 0,
            f"trainer.threads={self.threads} must be a positive integer or null.",
        )


@dataclass
class EvalConfig:
    # test-time augmentation (extra metrics): none | flip | shift | flip_shift (identity, mirror,
    # 4 shifts) | flip_x_shift (identity and 4 shifts, each also mirrored: 10 views)
    tta: str = "none"
    tta_shift: int = 2  # pixels of the shifted views

    def __post_init__(self) -> None:
        _one_of("eval.tta", self.tta, ("none", "flip", "shift", "flip_shift", "flip_x_shift"))
        _require(
            0 < self.tta_shift < 12,
            f"eval.tta_shift={self.tta_shift} must be a shift of 1 to 11 pixels (2-3 suit 48x48 "
            "faces).",
        )


@dataclass
class MlflowConfig:
    tracking_uri: str = DEFAULT_URI  # conf/mlflow/default.yaml: $MLFLOW_TRACKING_URI first
    experiment: str = DEFAULT_EXPERIMENT  # ... and $MLFLOW_EXPERIMENT_NAME
    run_name: str | None = None  # null: "<model>-<transforms>"
    log_model: bool = True  # the best weights as an MLflow PyTorch model
    figures: bool = True  # learning curves, confusion matrix, misclassification panels

    def __post_init__(self) -> None:
        _require(bool(self.experiment), "mlflow.experiment must not be empty.")
        _require(
            bool(
                re.match(
                    r"^(sqlite|https?|postgresql|mysql|file|databricks)[:+]", self.tracking_uri
                )
            ),
            f"mlflow.tracking_uri={self.tracking_uri!r} is not a tracking URI: use "
            "sqlite:///path.db or http://host:port.",
        )


@dataclass
class SweepConfig:
    # null | latest | <parent run id>: finish that multirun under the same parent run
    resume: str | None = None
    # set by the Optuna sweeper on its worker jobs (0..n_jobs-1), never by hand
    worker: int | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        """Checks that span two groups (each group checks its own settings)."""
        _require(
            not self.trainer.stop_at_min_lr or self.scheduler.name == "plateau",
            f"trainer.stop_at_min_lr stops where the plateau scheduler cannot lower the rate; "
            f"scheduler={self.scheduler.name} has no such floor: use scheduler=plateau or "
            "trainer.stop_at_min_lr=false.",
        )
        _require(
            self.transforms.crop == 0 or self.model.builder == "resnet",
            f"transforms.crop={self.transforms.crop} trains on smaller images than it evaluates, "
            f"but model={self.model.name} (builder {self.model.builder!r}) flattens a fixed image "
            "size; use a resnet model (it pools to a fixed size) or transforms.crop=0.",
        )


# The config groups whose options start from the schema's defaults: conf/<group>/<option>.yaml
# lists only what the option changes (defaults: [schema, _self_]); Hydra's plugin
# hydra_plugins/fer_sweep_plugin registers each group's "schema" option from these dataclasses.
SCHEMA_GROUPS = {
    "data": DataConfig,
    "model": ModelConfig,
    "transforms": TransformsConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "mlflow": MlflowConfig,
}


def schema_defaults(group: str) -> dict[str, Any]:
    """Every setting of a config group with its default: the one place defaults are written."""
    return asdict(SCHEMA_GROUPS[group]())


def _did_you_mean(full_key: str) -> str:
    """A hint for a misspelled key of a known group (`+trainer.epochz=3`), else ''."""
    group, _, name = full_key.rpartition(".")
    section = next((f for f in fields(Config) if f.name == group), None)
    if section is None or not name:
        return ""
    close = difflib.get_close_matches(name, [f.name for f in fields(section.default_factory)], n=1)
    return f"; did you mean {group}.{close[0]}?" if close and close[0] != name else ""


def _readable(err: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = prefix + (getattr(err, "full_key", None) or "?")
    msg = getattr(err, "msg", str(err)).splitlines()[0]
    return ConfigError(f"invalid setting {key}: {msg}{_did_you_mean(key)}")


def validate(cfg: DictConfig) -> Config:
    """Resolve and type-check a composed config; raise ConfigError with one readable message."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise _readable(err) from None


def with_values(conf: Config, values: dict[str, Any]) -> Config:
    """``conf`` with dotted-key values set, each touched section re-checked by the schema (types,
    unknown keys, ranges) as ``validate`` would: milliseconds instead of a full validation, for
    the jobs of a grid that differ only in values (trainer.seed=range(0,300))."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, rest = key.partition(".")
        if not rest or section not in {f.name for f in fields(Config)}:
            raise ConfigError(f"invalid setting {key}: not a key of the config{_did_you_mean(key)}")
        sections.setdefault(section, {})[rest] = value
    out = copy.copy(conf)
    for section, items in sections.items():
        node = OmegaConf.structured(getattr(conf, section))
        try:
            for rest, value in items.items():
                OmegaConf.update(node, rest, value, merge=True)
            setattr(out, section, OmegaConf.to_object(node))
        except ConfigError:
            raise
        except OmegaConfBaseException as err:
            raise _readable(err, prefix=f"{section}.") from None
    out.__post_init__()  # the checks across groups, on the new values
    return out
