"""Training settings: the default recipe, the tutorial's recipe, and config files.

Every setting lives in :class:`TrainConfig`; the CLI, a YAML/TOML file (``--config``) and
the library all fill the same fields. Settings left at ``None`` are resolved for the device
by :func:`resolve` (a GPU affords more epochs and pixels in the same wall time).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rsscene.data.bands import parse_band_spec
from rsscene.data.datasets import CACHE_MODES
from rsscene.device import AMP_MODES
from rsscene.errors import UserError
from rsscene.models import MODELS, VARIANTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("dihedral", "hflip", "none")
LOGGERS = ("csv", "tensorboard", "mlflow")
SAMPLERS = ("uniform", "balanced")
# torch.compile's modes; reduce-overhead and max-autotune replay the forward and backward
# passes as CUDA graphs on a GPU (a launch each instead of hundreds), which a CPU lacks.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

# Peak learning rate and weight decay for a batch of 64, per optimizer. SGD's lr scales
# linearly with the batch (Goyal et al. 2017), Adam's with its square root (Malladi et al. 2022).
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.1, "weight_decay": 5e-4, "scaling": "linear"},
    "adamw": {"lr": 3e-3, "weight_decay": 0.05, "scaling": "sqrt"},
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "scaling": "sqrt"},
}
REFERENCE_BATCH = 64
MIN_SIZE = 32
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)

# Device-dependent defaults for the fields left at None. The CPU's resolution rises: the early
# epochs at 96 px cost less, the last ones at 128 px see the fine detail that
# many-class sets need (chosen on three validation splits, docs/results.md). The start size
# comes with the default resolution only: a given --img-size trains at that size throughout.
DEVICE_DEFAULTS = {
    "cpu": {"epochs": 28, "img_size": 128, "start_size": 96},
    "gpu": {"epochs": 100, "img_size": 192, "start_size": None},
}


def float_pair(text: str) -> tuple[float, float]:
    """``MIN,MAX`` as two floats; a ValueError names what was given."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected MIN,MAX, got {text}") from None
    return lo, hi


def setting(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    positional: bool = False,
) -> Any:
    """A :class:`TrainConfig` field with what its ``rsscene train`` flag needs: help text,
    choices, a parser for its value (default: the field's type) and a metavar."""
    meta = {"help": help, "choices": choices, "parse": parse, "metavar": metavar}
    return field(default=default, metadata={**meta, "positional": positional})


_WD = ", ".join(f"{name} {d['weight_decay']:g}" for name, d in OPTIMIZER_DEFAULTS.items())


@dataclass
class TrainConfig:
    """All settings of one training run. ``None`` means "chosen for the device".

    Each field is also a flag of ``rsscene train`` (``batch_size`` is ``--batch-size``), made
    from its metadata, and a key of a ``--config`` file.
    """

    data: str | None = setting(
        help="split folder with train/ and test/ (or val/)", positional=True, metavar="DATA"
    )
    arch: str = setting("resnet18", "architecture", choices=tuple(MODELS))
    variant: str = setting(
        "v1.5", "v1.5: stride on the 3x3 conv; v1: as the paper", choices=VARIANTS
    )
    epochs: int | None = setting(help="epochs (default: 28 on a CPU, 100 on a GPU)")
    batch_size: int = setting(64, "images per step, per process")
    img_size: int | None = setting(
        help="training resolution (default: 128 on a CPU, from --start-size 96; 192 on a GPU)"
    )
    eval_size: int | None = setting(
        help="test resolution (default: the training one; 1.25x it with crops)"
    )
    start_size: int | None = setting(
        help="progressive resizing: train the first epochs at this lower resolution, rising"
        " to --img-size over the --ramp part of the schedule (default: 96 on a CPU when"
        " --img-size is not given, else off)",
        metavar="PX",
    )
    ramp: tuple[float, float] = setting(
        (0.5, 0.85),
        "where progressive resizing rises from --start-size to --img-size, as fractions of"
        " the epochs",
        parse=float_pair,
        metavar="FROM,TO",
    )
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float | None = setting(help="peak learning rate (default scales with the global batch)")
    momentum: float = setting(0.9, "SGD momentum (Nesterov when above 0)")
    weight_decay: float | None = setting(help=f"weight decay (default: {_WD})")
    wd_norm_bias: bool = setting(False, "weight decay on norm and bias too")
    schedule: str = setting("onecycle", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = setting(2.0, "linear warm-up, in epochs")
    label_smoothing: float = setting(0.1, "label smoothing")
    class_weights: str = setting(
        "none",
        "loss weight per class: none, balanced (inverse class frequency) or a YAML/JSON FILE"
        " mapping each class to its weight",
        metavar="none|balanced|FILE",
    )
    sampler: str = setting(
        "uniform",
        "uniform: each training image once an epoch; balanced: draw every class equally often",
        choices=SAMPLERS,
    )
    augment: str = setting(
        "dihedral", "flips/rotations: the 8 of the square, hflip or none", choices=AUGMENTS
    )
    crop_scale: tuple[float, float] = setting(
        (1.0, 1.0),
        "random resized crop area, e.g. 0.25,1 (1,1: the whole image)",
        parse=float_pair,
        metavar="MIN,MAX",
    )
    jitter: float = setting(0.1, "colour jitter strength")
    mixup: float = setting(0.0, "mixup alpha (0 = off)")
    cutmix: float = setting(0.0, "cutmix alpha (0 = off)")
    bands: str | None = setting(
        help="bands of multi-band (GeoTIFF) files: all, 1-based indexes such as 4,3,2, or"
        " names the files carry; standardised by per-band mean/std of the training images"
        " (default: 8-bit RGB with ImageNet mean/std)",
        metavar="BANDS",
    )
    normalize: bool = setting(True, "standardise inputs (ImageNet mean/std, or the bands')")
    zero_init_residual: bool = setting(True, "start each residual branch at zero")
    ema: float = setting(0.0, "EMA of weights (0 = off)", metavar="DECAY")
    eval_every: int = setting(
        1,
        "evaluate the held-out splits every K epochs (the last epoch always); best.pt is"
        " chosen among the evaluated epochs",
        metavar="K",
    )
    seed: int = setting(0, "seed of every random draw")
    workers: int | None = setting(help="decoding processes (default: the CPUs, up to 8)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    cache: str = setting("auto", "decoded image store", choices=CACHE_MODES)
    amp: str = setting("auto", "mixed precision", choices=AMP_MODES)
    channels_last: bool = setting(True, "channels_last memory format")
    compile: bool = setting(False, "torch.compile the model")
    compile_mode: str = setting(
        "default",
        "torch.compile's mode with --compile (reduce-overhead, max-autotune: CUDA graphs on a GPU)",
        choices=COMPILE_MODES,
    )
    deterministic: bool = setting(False, "deterministic algorithms (slower)")
    max_grad_norm: float | None = setting(help="clip gradients to this norm")
    weights: str | None = setting(
        help="start from a torchvision .pth or rsscene checkpoint", metavar="PATH"
    )
    pretrained: bool = setting(False, "start from torchvision's ImageNet weights (from its cache)")
    freeze_backbone: bool = setting(False, "train the classifier only")
    sync_bn: bool = setting(False, "SyncBatchNorm under torchrun")
    strict: bool = setting(False, "fail on any unreadable image")
    out: str | None = setting(help="run folder (default runs/ARCH-TIMESTAMP)", metavar="DIR")
    save_interval: float = setting(
        60.0,
        "least seconds between writes of last.pt, best.pt and curves.png, made at an epoch's"
        " end (also after the first and the last epoch, and when the run stops on Ctrl-C,"
        " SIGTERM or an error); 0 = every epoch",
        metavar="SECONDS",
    )
    log: str = setting(
        "csv",
        "metrics.csv only, or also tensorboard (RUN/tensorboard) or mlflow"
        " (MLFLOW_TRACKING_URI, default ./mlruns)",
        choices=LOGGERS,
    )
    tutorial: bool = setting(
        False, "the tutorial's recipe: Resize 224, flip, Adam 5e-4, batch 32, 30 epochs, float32"
    )

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


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file, parsed as plain data (no object-building tags)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    # A byte-order mark says which Unicode encoding an editor saved (Windows' "Unicode" is
    # UTF-16); without one, the file is UTF-8.
    boms = {
        codecs.BOM_UTF16_LE: "utf-16",
        codecs.BOM_UTF16_BE: "utf-16",
        codecs.BOM_UTF8: "utf-8-sig",
    }
    encoding = next((e for bom, e in boms.items() if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not {encoding.upper()} text (byte {e.start}); save the config file as UTF-8"
        ) from None
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


def setting_types() -> dict[str, type]:
    """Each field's value type, ``None`` left out (``int | None`` gives ``int``)."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = typing.get_origin(hint) or hint
        out[name] = args[0] if base in (typing.Union, types.UnionType) else base
    return out


def _coerce(name: str, value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` setting: text parsed as its flag parses it, an int widened to a
    float, a pair made a tuple of floats; anything else is refused."""
    if value is None or (type(value) is kind and kind is not tuple):
        return value
    parse = next(f.metadata["parse"] for f in fields(TrainConfig) if f.name == name) or kind
    try:
        if isinstance(value, str) and kind is not bool:
            return parse(value)
        if kind is float and type(value) is int:
            return float(value)
        if kind is tuple and isinstance(value, list | tuple) and len(value) == 2:
            return tuple(float(v) for v in value)
    except (ValueError, TypeError):
        pass
    raise UserError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {value!r}")


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A validated config from setting names and values; names it does not know are refused."""
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise UserError(f"unknown settings {unknown}")
    kinds = setting_types()
    cfg = TrainConfig(**{k: _coerce(k, v, kinds[k]) for k, v in values.items()})
    validate(cfg)
    return cfg


def from_saved(values: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint or config.json saved (``TrainConfig.to_dict()``), typed again:
    pairs become tuples, and settings this version does not know (or that were added since)
    are dropped (or take their defaults). Not validated: it is a record of what ran."""
    kinds = setting_types()
    known = {k: v for k, v in values.items() if k in kinds}
    for name, value in known.items():
        if kinds[name] is tuple and isinstance(value, list):
            known[name] = tuple(value)
    return TrainConfig(**known)


def build(overrides: dict[str, Any], file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the tutorial recipe if asked, then the file, then explicit flags."""
    merged: dict[str, Any] = {}
    file_values = read_config_file(file) if file else {}
    tutorial = overrides.get("tutorial") or file_values.get("tutorial")
    if tutorial:
        merged.update(TUTORIAL)
    merged.update(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    cfg = from_dict(merged)
    if cfg.class_weights not in ("none", "balanced"):
        # Saved absolute, so that a resume or a torchrun restart elsewhere finds the same file.
        cfg.class_weights = str(Path(cfg.class_weights).resolve())
    return cfg


def check_size(name: str, value: int | None) -> None:
    """Refuse an input side the network cannot take: its five halvings need 32 px."""
    if value is not None and value < MIN_SIZE:
        raise UserError(f"--{name.replace('_', '-')} must be at least {MIN_SIZE}, got {value}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(options)}")


def validate(cfg: TrainConfig) -> None:
    """Refuse, in one line naming the flag, any value no run could use."""
    _choice("arch", cfg.arch, tuple(MODELS))
    _choice("variant", cfg.variant, VARIANTS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("augment", cfg.augment, AUGMENTS)
    _choice("amp", cfg.amp, AMP_MODES)
    _choice("compile_mode", cfg.compile_mode, COMPILE_MODES)
    if cfg.compile_mode != "default" and not cfg.compile:
        raise UserError(f"--compile-mode {cfg.compile_mode} needs --compile")
    _choice("cache", cfg.cache, CACHE_MODES)
    _choice("log", cfg.log, LOGGERS)
    _choice("sampler", cfg.sampler, SAMPLERS)
    if cfg.class_weights not in ("none", "balanced") and not Path(cfg.class_weights).is_file():
        raise UserError(
            f"--class-weights {cfg.class_weights}: no such file (give none, balanced or a FILE)"
        )
    for name in ("epochs", "batch_size", "eval_every"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("img_size", "eval_size", "start_size"):
        check_size(name, getattr(cfg, name))
    if not cfg.save_interval >= 0:
        raise UserError(f"--save-interval must be at least 0, got {cfg.save_interval}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    lo, hi = cfg.ramp
    if not 0 <= lo <= hi <= 1:
        raise UserError(f"--ramp must satisfy 0 <= from <= to <= 1, got {lo} {hi}")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    for name in ("label_smoothing", "ema", "mixup", "cutmix", "jitter", "weight_decay"):
        if (getattr(cfg, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    for name in ("momentum", "warmup_epochs", "max_grad_norm", "workers"):
        if (getattr(cfg, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= cfg.label_smoothing < 1 or not 0 <= cfg.ema < 1:
        raise UserError("--label-smoothing and --ema must be in [0, 1)")
    if cfg.bands is not None:
        try:
            cfg.bands = parse_band_spec(cfg.bands)
        except ValueError as e:
            raise UserError(str(e)) from None


def is_resolved(cfg: TrainConfig, device_type: str, world: int = 1) -> bool:
    """Whether ``cfg`` came from :func:`resolve` for this device and process count."""
    return getattr(cfg, "_resolved_for", None) == (_kind(device_type), world)


def _kind(device_type: str) -> str:
    return "gpu" if device_type in ("cuda", "mps") else "cpu"


def resolve(cfg: TrainConfig, device_type: str, world: int = 1) -> TrainConfig:
    """Fill the settings left at ``None`` for the device and for ``world`` processes (each
    with ``cfg.batch_size`` images a step); returns a new config, marked as resolved for
    them. Refuses a ``--start-size`` above the training resolution, which may only be known
    here."""
    kind = _kind(device_type)
    defaults = DEVICE_DEFAULTS[kind]
    cfg = dataclasses.replace(cfg)
    if cfg.epochs is None:
        cfg.epochs = defaults["epochs"]
    if cfg.img_size is None:
        cfg.img_size = defaults["img_size"]
        if cfg.start_size is None:
            cfg.start_size = defaults["start_size"]
    if cfg.start_size is not None and cfg.start_size > cfg.img_size:
        raise UserError(
            f"--start-size {cfg.start_size} is above --img-size {cfg.img_size}: progressive"
            " resizing starts lower"
        )
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
    # Not a field: it is no setting, so it is neither a flag nor in config.json, and a copy
    # made with dataclasses.replace (whose values may differ) is not marked.
    cfg._resolved_for = (kind, world)
    return cfg
