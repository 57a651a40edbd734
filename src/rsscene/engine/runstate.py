"""Run state and resume: what changes while training, which data a run was trained on, whether
a checkpoint can continue this run, the configuration a resume continues with, and the
background writes that save it."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsscene import __version__, checkpoint
from rsscene.checkpoint import Checkpoint
from rsscene.config import TrainConfig, field_names, from_dict
from rsscene.data.datasets import ImageList
from rsscene.engine import distributed
from rsscene.errors import UserError


@dataclass
class RunState:
    """Everything that changes while training and must survive a restart."""

    next_epoch: int = 0
    next_step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    # The epoch's training sums over all ranks up to an interruption mid-epoch.
    partial: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> RunState:
        st = ckpt.state
        return cls(ckpt.next_epoch, ckpt.next_step, st.history, st.best, st.partial)


def versions() -> dict[str, str]:
    import torchvision

    return {
        "rsscene": __version__,
        # A plain str: torch's TorchVersion subclass is refused by weights-only loading.
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def data_fingerprint(classes: list[str], images: ImageList) -> str:
    """Identifies the dataset: class names and the relative paths of the training images."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for p in images.paths:
        h.update(str(p.relative_to(images.root)).encode() + b"\0")
    return h.hexdigest()[:16]


def check_resume(
    ckpt: Checkpoint, cfg: TrainConfig, classes: list[str], fingerprint: str, path: str | Path
) -> None:
    """Refuse, naming every reason, a checkpoint that cannot continue this run."""
    problems = []
    if not ckpt.resumable:
        problems.append("it holds weights only (a best.pt); resume from the run's last.pt")
    if ckpt.arch != cfg.arch or ckpt.variant != cfg.variant:
        problems.append(f"it is a {ckpt.arch} {ckpt.variant}, this run a {cfg.arch} {cfg.variant}")
    # Settings that shape the model's input: another value would not fit the weights.
    for name in ("bands", "normalize"):
        saved, asked = ckpt.config.get(name), getattr(cfg, name)
        if name in ckpt.config and saved != asked:
            flag = name.replace("_", "-")
            problems.append(f"it was trained with --{flag} {saved}, this run asks for {asked}")
    if ckpt.class_names != classes:
        problems.append(f"its classes {ckpt.class_names} differ from {classes}")
    elif ckpt.data_fingerprint != fingerprint:
        problems.append(f"it was trained on other images than {cfg.data}")
    if problems:
        raise UserError(
            f"cannot resume from {path}: "
            + "; ".join(problems)
            + " (use --weights-only to start a new run from its weights)"
        )


def schedule_moved(ckpt: Checkpoint, per_process: int, world: int) -> bool:
    """Whether the schedule must be re-positioned because the effective batch changed (only
    allowed at an epoch boundary, since a mid-epoch position counts steps of the old size)."""
    saved = ckpt.config["batch_size"] * ckpt.world_size
    if saved == per_process * world:
        return False
    if ckpt.next_step:
        raise UserError(
            f"the checkpoint was saved mid-epoch with an effective batch of {saved};"
            f" this run's is {per_process} x {world} processes = {per_process * world}:"
            f" resume with a --batch-size and process count whose product is {saved}"
        )
    return True


def run_folder(resume: str | Path) -> Path:
    """The run folder a resume writes to: the folder given, or the checkpoint's."""
    path = Path(resume)
    return path if path.is_dir() else path.parent


def resume_config(run: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of a run, with the settings a resume may change, validated."""
    ckpt = checkpoint.load(run)
    saved = {k: v for k, v in ckpt.config.items() if k in field_names()}
    if "batch_size" not in saved:
        raise UserError(f"cannot resume from {run}: it holds no training configuration")
    # Keep the effective batch (and so the lr and steps it was tuned with) across a change in
    # the number of processes, e.g. from torchrun to one process, when it divides evenly.
    effective = saved["batch_size"] * ckpt.world_size
    if effective % distributed.world_size() == 0:
        saved["batch_size"] = effective // distributed.world_size()
    return from_dict({**saved, **{k: v for k, v in overrides.items() if v is not None}})


class BackgroundWrites:
    """The end of an epoch's files (last.pt, best.pt, metrics.csv, curves.png), written in one
    background thread while the next epoch trains: ResNet-18's last.pt with AdamW's moments is
    about 135 MB to serialise, hash and fsync. Writes run in order, at most one epoch's at a
    time; a failed write is raised by the next :meth:`submit` or :meth:`wait`. Each file is
    still replaced atomically, so a run killed mid-write resumes from the epoch before.
    ``threaded=False`` writes in the caller instead, as ``benchmarks/epoch_end.py`` compares."""

    def __init__(self, threaded: bool = True) -> None:
        self.threaded = threaded
        self._pool = ThreadPoolExecutor(1, "rsscene-writes") if threaded else None
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            write()
        else:
            self._pending = self._pool.submit(write)

    def wait(self) -> None:
        if self._pending is None:
            return
        try:
            self._pending.result()
        finally:
            # A Ctrl-C while waiting leaves the write pending: the next wait waits for it.
            if self._pending.done():
                self._pending = None
