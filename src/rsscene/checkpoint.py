"""The checkpoint: one typed record, written atomically by :func:`save`, read safely by :func:`load`.

On disk a checkpoint is a plain dict of tensors and primitives (so ``torch.load`` with
``weights_only=True`` reads it and any tool can inspect it), tagged with ``format`` and
``format_version`` and a SHA-256 of the weights. :func:`save` writes it to a temporary file,
fsyncs and renames it over the target, so ``last.pt`` is always either the previous complete
file or the new complete one. :func:`load` refuses a file that would run code when unpickled,
a newer format, a missing or wrong checksum (of the weights, and from format 2 of what
describes them: classes, architecture, preprocessing, settings), and malformed fields, each
with one clear line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsscene.data.bands import SCALES, Preprocess
from rsscene.data.transforms import MEAN, STD
from rsscene.errors import UserError

FORMAT = "rsscene-checkpoint"
# 2: the preprocess entry records the bands (bands, band_count, band_names, dtype, display)
# and the training images' side; ``meta_sha256`` covers everything but the weights and the
# training state. Version-1 files are read as 8-bit RGB with their mean/std.
FORMAT_VERSION = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or of the wrong kind."""


@dataclass
class TrainingState:
    """What ``--resume`` needs beyond the weights: optimizer, schedule and progress."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, Any]]
    best: dict[str, Any]
    partial: dict[str, float]
    rng: Tensor
    scaler: dict[str, Any] = field(default_factory=dict)
    # With EMA, Checkpoint.model holds the average; the raw weights and the average's state
    # are kept here.
    model: dict[str, Tensor] | None = None
    ema: dict[str, Any] | None = None


@dataclass
class Checkpoint:
    """Weights, what inference needs, and (``state``) what resuming needs."""

    model: dict[str, Tensor]
    arch: str
    class_names: list[str]
    variant: str = "v1.5"
    preprocess: Preprocess = field(default_factory=Preprocess)
    # The run's settings as plain data (TrainConfig.to_dict(), so that weights-only loading
    # reads them); rsscene.config.from_saved types them again for whoever reads them.
    config: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    next_epoch: int = 0
    next_step: int = 0
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    state: TrainingState | None = None

    @property
    def resumable(self) -> bool:
        return self.state is not None


# An integer type of each element size, to see any tensor's elements as NumPy can hold them.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state_dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            # NumPy, not torch, puts a channels_last tensor's bytes in order: this runs in the
            # checkpoint writer's thread, where a torch copy would start a second OpenMP team
            # that slowed every later training step on a CPU by about a tenth.
            h.update(np.ascontiguousarray(t.view(_BITS[t.element_size()]).numpy()))
    return h.hexdigest()


def description_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of everything in a payload but the weights, the training state and the checksums:
    the class names, architecture, preprocessing and settings that give the weights meaning."""
    described = {
        k: v for k, v in payload.items() if k not in ("model", "state", "sha256", "meta_sha256")
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _shallow(record: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every tensor of the state dicts.
    return {f.name: getattr(record, f.name) for f in fields(record)}


def to_payload(ckpt: Checkpoint) -> dict[str, Any]:
    """The plain dict written to disk (format, version and checksum included)."""
    payload = _shallow(ckpt)
    payload["preprocess"] = _shallow(ckpt.preprocess)
    if ckpt.state is None:
        del payload["state"]
    else:
        state = _shallow(ckpt.state)
        payload["state"] = {k: v for k, v in state.items() if v is not None}
    payload = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION}
    return {
        **payload,
        "sha256": weights_digest(ckpt.model),
        "meta_sha256": description_digest(payload),
    }


def on_cpu(value: Any) -> Any:
    """A copy of ``value`` (a Checkpoint, or anything inside one) whose tensors are CPU
    copies of their own: it can be written in another thread while training changes the
    originals, and that thread touches no device."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on_cpu(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: on_cpu(getattr(value, f.name)) for f in fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def save(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = to_payload(ckpt)
    # A process killed mid-save leaves its temp file; the next save of the same name removes it.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # Serialised straight into the file: through a BytesIO, 135 MB would be copied twice.
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except RuntimeError as e:
        # torch's zip writer reports a short write (a full disk, a quota) as "enforce fail at
        # inline_container.cc" instead of an OSError.
        Path(tmp).unlink(missing_ok=True)
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"cannot write checkpoint {path}: the write stopped short ({free:,} bytes free"
            " on its disk; a full disk or a quota?)"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def resolve_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``last.pt`` (else its ``best.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without last.pt or best.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def read(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors for every way it can fail."""
    path = resolve_path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the global a crafted file asks for; any other refusal is plain damage.
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused as unsafe: it asks for {unsafe.group(1)}, which weights-only"
                " loading does not allow; such a file may run code when unpickled, so it is"
                " not loaded"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint, corrupt or not a checkpoint at all"
        ) from None
    except Exception as e:
        # A damaged zip or pickle fails anywhere inside torch.load (KeyError, IndexError,
        # TypeError, UnicodeDecodeError, an OSError from seeking past a truncated end...):
        # the file opened, so all of them mean it is unusable.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable checkpoint, corrupt or truncated"
            f" ({type(e).__name__}: {detail[:200]})"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Model weights from an rsscene checkpoint or a torchvision-format ``.pth`` file."""
    obj = read(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{path}: holds no model weights (state_dict)")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values())


def _check_payload(raw: Any, path: Path) -> None:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an rsscene checkpoint (plain torchvision weights can only start a"
            " training run: rsscene train --weights FILE)"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this rsscene reads (format"
            f" {FORMAT_VERSION}); upgrade rsscene to load it"
        )
    for key in ("model", "arch", "class_names"):
        if key not in raw:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    names = raw["class_names"]
    if not _is_state_dict(raw["model"]):
        raise CheckpointError(f"{path}: its 'model' entry is not a state_dict of tensors")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: its 'class_names' entry is not a list of names")
    if not isinstance(raw.get("sha256"), str):
        raise CheckpointError(f"{path}: checkpoint lacks the checksum of its weights ('sha256')")
    if weights_digest(raw["model"]) != raw["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the weights are corrupt")
    if version >= 2 and raw.get("meta_sha256") != description_digest(raw):
        raise CheckpointError(
            f"{path}: checksum mismatch: what describes the weights (classes, architecture,"
            " preprocessing, settings) is corrupt or was edited"
        )


def _check_preprocess(pre: Preprocess) -> None:
    """Bands and statistics that fit together, or a ValueError saying what does not."""
    channels = pre.channels
    if pre.dtype not in SCALES:
        raise ValueError(f"unknown dtype {pre.dtype!r} in preprocess")
    for name in ("mean", "std"):
        values = getattr(pre, name)
        if values is not None and len(values) != channels:
            raise ValueError(f"preprocess has {len(values)} {name} values for {channels} bands")
    if pre.bands is not None and (
        not pre.bands
        or not all(isinstance(b, int) and 1 <= b <= (pre.band_count or b) for b in pre.bands)
    ):
        raise ValueError(f"preprocess bands {pre.bands} do not fit {pre.band_count} bands")


def from_payload(raw: dict[str, Any], path: Path) -> Checkpoint:
    """The record of a checked payload; unknown or ill-typed fields are refused."""
    known = {f.name for f in fields(Checkpoint)}
    values = {k: v for k, v in raw.items() if k in known}
    config = values.get("config") or {}
    try:
        pre = values.get("preprocess") or {}
        extra = {
            k: pre.get(k)
            for k in ("bands", "band_count", "band_names", "dtype", "display", "source_size")
        }
        values["preprocess"] = Preprocess(
            size=int(pre.get("size") or config.get("eval_size") or 224),
            mean=pre.get("mean", list(MEAN)),
            std=pre.get("std", list(STD)),
            **{k: v for k, v in extra.items() if v is not None},
        )
        _check_preprocess(values["preprocess"])
        if values.get("state") is not None:
            values["state"] = TrainingState(**values["state"])
        return Checkpoint(**values)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({e})") from None


def load(path: str | Path) -> Checkpoint:
    """Read and verify an rsscene checkpoint file or run folder (its last.pt, else best.pt)."""
    path = resolve_path(path)
    raw = read(path)
    _check_payload(raw, path)
    return from_payload(raw, path)
