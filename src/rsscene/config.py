"""Training settings: the default recipe, the tutorial's recipe, and config files.

Every setting lives in :class:`TrainConfig`; the CLI, a YAML/TOML file (``--config``) and
the library all fill the same fields. Settings left at ``None`` are resolved for the device
by :func:`resolve` (a GPU affords more epochs and pixels in the same wall time).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from rsscene.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("dihedral", "hflip", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig:
    """All settings of one training run. ``None`` means "chosen for the device"."""

    data: str | None = None
    arch: str = "resnet18"
    variant: str = "v1.5"
    epochs: int | None = None
    batch_size: int = 64
    img_size: int | None = None
    eval_size: int | None = None
    optimizer: str = "adamw"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    wd_norm_bias: bool = False
    schedule: str = "onecycle"
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    augment: str = "dihedral"
    crop_scale: tuple[float, float] = (1.0, 1.0)
    jitter: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    normalize: bool = True
    zero_init_residual: bool = True
    ema: float = 0.0
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    cache: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    max_grad_norm: float | None = None
    weights: str | None = None
    pretrained: bool = False
    freeze_backbone: bool = False
    sync_bn: bool = False
    strict: bool = False
    out: str | None = None
    tutorial: bool = False

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# The tutorial: ResNet-18 from scratch, Resize 224, horizontal flip, ToTensor, Adam 5e-4,
# batch 32, 30 epochs, float32, NCHW, decoding every image every epoch.
TUTORIAL = {
    "arch": "resnet18",
    "epochs": 30,
    "batch_size": 32,
    "img_size": 224,
    "eval_size": 224,
    "optimizer": "adam",
    "lr": 5e-4,
    "weight_decay": 0.0,
    "wd_norm_bias": True,
    "schedule": "constant",
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
    "augment": "hflip",
    "crop_scale": (1.0, 1.0),
    "jitter": 0.0,
    "normalize": False,
    "zero_init_residual": False,
    "cache": "none",
    "amp": "off",
    "channels_last": False,
}

# Peak learning rate and weight decay for a batch of 64, per optimizer. SGD's lr scales
# linearly with the batch (Goyal et al. 2017), Adam's with its square root (Malladi et al. 2022).
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.1, "weight_decay": 5e-4, "scaling": "linear"},
    "adamw": {"lr": 3e-3, "weight_decay": 0.05, "scaling": "sqrt"},
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "scaling": "sqrt"},
}
REFERENCE_BATCH = 64
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)

# Device-dependent defaults for the fields left at None.
DEVICE_DEFAULTS = {
    "cpu": {"epochs": 55, "img_size": 128},
    "gpu": {"epochs": 100, "img_size": 192},
}


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file, parsed as plain data (no object-building tags)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        # safe_load builds no objects: a !!python/... tag is what a malicious file would use.
        raise UserError(
            f"{path}: refused: {e.problem}; a config file holds plain values, never Python objects"
        ) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of setting names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise UserError(f"{path}: unknown settings {unknown}")
    return data


def build(overrides: dict[str, Any], file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the tutorial recipe if asked, then the file, then explicit flags."""
    merged: dict[str, Any] = {}
    file_values = read_config_file(file) if file else {}
    tutorial = overrides.get("tutorial") or file_values.get("tutorial")
    if tutorial:
        merged.update(TUTORIAL)
    merged.update(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**merged)
    if isinstance(cfg.crop_scale, list):
        cfg.crop_scale = tuple(cfg.crop_scale)
    validate(cfg)
    return cfg


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(options)}")


def validate(cfg: TrainConfig) -> None:
    from rsscene.data.datasets import CACHE_MODES
    from rsscene.models import MODELS, VARIANTS

    _choice("arch", cfg.arch, tuple(MODELS))
    _choice("variant", cfg.variant, VARIANTS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("augment", cfg.augment, AUGMENTS)
    _choice("amp", cfg.amp, AMP_MODES)
    _choice("cache", cfg.cache, CACHE_MODES)
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("img_size", "eval_size"):
        value = getattr(cfg, name)
        if value is not None and value < 32:
            raise UserError(f"--{name.replace('_', '-')} must be at least 32, got {value}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    for name in ("label_smoothing", "ema", "mixup", "cutmix", "jitter", "weight_decay"):
        if (getattr(cfg, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= cfg.label_smoothing < 1 or not 0 <= cfg.ema < 1:
        raise UserError("--label-smoothing and --ema must be in [0, 1)")


def resolve(cfg: TrainConfig, device_type: str, world: int = 1) -> TrainConfig:
    """Fill the settings left at ``None`` for the device and for ``world`` processes (each
    with ``cfg.batch_size`` images a step); returns a new config."""
    kind = "gpu" if device_type in ("cuda", "mps") else "cpu"
    defaults = DEVICE_DEFAULTS[kind]
    cfg = dataclasses.replace(cfg)
    if cfg.epochs is None:
        cfg.epochs = defaults["epochs"]
    if cfg.img_size is None:
        cfg.img_size = defaults["img_size"]
    if cfg.eval_size is None:
        # Random resized crops make objects look larger in training than in a full test image;
        # testing at a higher resolution restores their apparent size (Touvron et al. 2019).
        cfg.eval_size = (
            cfg.img_size if cfg.crop_scale == (1.0, 1.0) else (round(cfg.img_size * 1.25 / 16) * 16)
        )
    optim = OPTIMIZER_DEFAULTS[cfg.optimizer]
    if cfg.weight_decay is None:
        cfg.weight_decay = optim["weight_decay"]
    if cfg.lr is None:
        ratio = cfg.batch_size * world / REFERENCE_BATCH
        cfg.lr = optim["lr"] * (ratio if optim["scaling"] == "linear" else ratio**0.5)
    return cfg
