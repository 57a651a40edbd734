"""Run state and resume: what changes while training, which data a run was trained on, whether
a checkpoint can continue this run, the configuration a resume continues with, and the
background writes that save it."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsscene import __version__, checkpoint
from rsscene.checkpoint import Checkpoint, TrainingState
from rsscene.config import TrainConfig, from_dict, from_saved
from rsscene.data.bands import Preprocess
from rsscene.data.datasets import ImageList, TrainData
from rsscene.device import synchronize
from rsscene.engine import distributed
from rsscene.engine.evaluate import headline
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

    def training_state(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        net: torch.nn.Module,
        ema: torch.nn.Module | None,
    ) -> TrainingState:
        """What ``--resume`` continues from: these parts' states and this progress."""
        return TrainingState(
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            history=self.history,
            best=self.best,
            partial=self.partial,
            rng=torch.get_rng_state(),
            scaler=scaler.state_dict() if scaler.is_enabled() else {},
            # With EMA the checkpoint's weights are the average: the raw ones are kept here.
            model=net.state_dict() if ema is not None else None,
            ema=ema.state_dict() if ema is not None else None,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> RunState:
        st = ckpt.state
        return cls(ckpt.next_epoch, ckpt.next_step, st.history, st.best, st.partial)


def epoch_row(
    epoch: int,
    sums: dict[str, float],
    results: dict[str, tuple[dict[str, Any], Any]],
    lr: float,
) -> dict[str, Any]:
    """metrics.csv's row for ``epoch``: the training ``sums`` and the held-out ``results``
    (empty cells for a split not evaluated this epoch)."""
    test, val = results.get("test", ({}, None))[0], results.get("val", ({}, None))[0]
    seen = max(sums["seen"], 1)
    return {
        "epoch": epoch + 1,
        "train_loss": round(sums["loss_sum"] / seen, 5),
        "train_acc": round(sums["correct"] / seen, 5),
        **{
            column: round(part[key], 5) if part else ""
            for column, part, key in (
                ("test_loss", test, "loss"),
                ("test_acc", test, "accuracy"),
                ("test_aa", test, "average_accuracy"),
                ("test_kappa", test, "kappa"),
                ("val_acc", val, "accuracy"),
            )
        },
        "lr": f"{lr:.6g}",
        "images_per_s": round(sums["images_per_s"], 1),
        "seconds": round(sums["seconds"], 2),
    }


def run_record(
    cfg: TrainConfig,
    classes: list[str],
    device: torch.device,
    amp: torch.dtype | None,
    dist: distributed.Dist,
    loss_weights: torch.Tensor | None,
) -> dict[str, Any]:
    """config.json: every resolved setting and what the run was given."""
    record = {
        **cfg.to_dict(),
        "class_names": classes,
        "versions": versions(),
        "device": str(device),
        "amp": str(amp).replace("torch.", ""),
        "world_size": dist.world,
        "effective_batch": cfg.batch_size * dist.world,
    }
    if loss_weights is not None:
        record["class_weight_values"] = dict(zip(classes, loss_weights.tolist(), strict=True))
    return record


def final_report(
    cfg: TrainConfig,
    state: RunState,
    classes: list[str],
    final: dict[str, Any],
    tta: dict[str, Any],
    val_accuracy: float | None,
    phases: Phases | None = None,
) -> dict[str, Any]:
    """report.json: the final weights' test report (``final``, and ``tta``'s accuracy),
    their validation accuracy, and the best epoch."""
    best_note = (
        "best.pt is the epoch with the highest accuracy on the held-out validation split"
        if state.best.get("split") == "val"
        else "best.pt was selected on the test split itself, so its accuracy is optimistic;"
        " report the final epoch's"
    )
    train_seconds = round(sum(float(r["seconds"]) for r in state.history), 2)
    return {
        "headline": "test accuracy of the final epoch's weights",
        "test_accuracy": final["accuracy"],
        "test_accuracy_tta": tta["accuracy"],
        "metrics": headline(final),
        # The final weights on the validation split: what a recipe is chosen by.
        "val_accuracy": val_accuracy,
        "best": {**state.best, "note": best_note},
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "seconds_by_phase": (phases or Phases()).as_dict(train_seconds),
        "arch": cfg.arch,
        "class_names": classes,
        "test": final,
    }


def checked_preprocess(data: TrainData, cfg: TrainConfig) -> Preprocess:
    """The data's :class:`Preprocess`, refused where it disagrees with ``cfg`` (resolved):
    the model is tested and recorded as the data feeds it."""
    pre = data.preprocess
    if pre.size != cfg.eval_size or pre.normalize != cfg.normalize:
        raise UserError(
            f"the data feeds {pre.size} px images{'' if pre.normalize else ' unstandardised'},"
            f" the settings ask for --eval-size {cfg.eval_size}"
            f"{'' if cfg.normalize else ' --no-normalize'}: build both from the same settings"
        )
    return pre


class Phases:
    """This process's seconds in each phase of a run (start-up, cache, training, evaluation,
    writes, TTA), so that a change in speed shows where it came from. On a GPU each phase
    ends with a synchronisation, so its seconds are the device's too."""

    NAMES = ("start-up", "cache", "training", "evaluation", "writes", "tta")

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = dict.fromkeys(self.NAMES, 0.0)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None:
                synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self, training: float) -> dict[str, float]:
        """The phases, with ``training`` (the epochs' own seconds, a resumed run's earlier
        ones included) as the training phase."""
        return {k: round(training if k == "training" else v, 2) for k, v in self.seconds.items()}


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
    trained = from_saved(ckpt.config)
    for name in ("bands", "normalize"):
        saved, asked = getattr(trained, name), getattr(cfg, name)
        if saved != asked:
            flag = name.replace("_", "-")
            problems.append(
                f"it was trained {_setting(flag, saved)}, this run asks for {_asked(flag, asked)}"
            )
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


# The settings the optimizer and its schedule are built from.
OPTIMIZER_SETTINGS = ("optimizer", "lr", "weight_decay", "wd_norm_bias", "momentum")
SCHEDULE_SETTINGS = ("schedule", "warmup_epochs", "epochs")


def load_optimizer(
    ckpt: Checkpoint,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> list[str]:
    """Continue the saved optimizer and schedule in ``optimizer`` and ``scheduler``, which were
    built from this run's settings: where a resume changes them (``--lr``, ``--optimizer``,
    ``--weight-decay``, ``--schedule``, ...), the new settings apply from the saved step on,
    with the saved moments where the optimizer and its parameter groups are the same.
    Returns what a resume with changed settings should say."""
    st, saved = ckpt.state, from_saved(ckpt.config)
    changed = [
        k for k in (*OPTIMIZER_SETTINGS, *SCHEDULE_SETTINGS) if getattr(saved, k) != getattr(cfg, k)
    ]
    if not changed:
        optimizer.load_state_dict(st.optimizer)
        scheduler.load_state_dict(st.scheduler)
        return []
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base_lrs, notes = list(scheduler.base_lrs), []
    same_kind = saved.optimizer == cfg.optimizer
    if same_kind and len(st.optimizer["param_groups"]) == len(fresh):
        optimizer.load_state_dict(st.optimizer)
        for group, settings in zip(optimizer.param_groups, fresh, strict=True):
            group.update(settings)  # the saved moments, the new hyperparameters
    else:
        notes.append(
            f"resume: the optimizer is now {cfg.optimizer} (was {saved.optimizer}) or"
            " its parameter groups changed: its state starts afresh"
        )
    # The new schedule (and base learning rates) at the saved step.
    scheduler.load_state_dict(st.scheduler)
    scheduler.base_lrs = base_lrs
    scheduler.last_epoch -= 1
    scheduler.step()
    shown = ", ".join(
        f"--{k.replace('_', '-')} {getattr(saved, k)} -> {getattr(cfg, k)}" for k in changed
    )
    notes.append(f"resume: applying {shown} from step {scheduler.last_epoch}")
    return notes


def _asked(flag: str, value: Any) -> str:
    """A setting's value as a resume asks for it: ``4,3,2``, ``none (8-bit RGB)``."""
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if value is None:
        return "none" + (" (8-bit RGB)" if flag == "bands" else "")
    return str(value)


def _setting(flag: str, value: Any) -> str:
    """How a setting reads in a sentence: ``--bands 4,3,2``, ``without --bands``."""
    if value is None or value is False:
        return f"without --{flag}" + (" (8-bit RGB)" if flag == "bands" else "")
    return f"with --{flag}" if value is True else f"with --{flag} {value}"


def schedule_moved(ckpt: Checkpoint, per_process: int, world: int) -> bool:
    """Whether the schedule must be re-positioned because the effective batch changed (only
    allowed at an epoch boundary, since a mid-epoch position counts steps of the old size)."""
    saved = from_saved(ckpt.config).batch_size * ckpt.world_size
    if saved == per_process * world:
        return False
    if ckpt.next_step:
        raise UserError(
            f"the checkpoint was saved mid-epoch with an effective batch of {saved};"
            f" this run's is {per_process} x {world} processes = {per_process * world}:"
            f" resume with a --batch-size and process count whose product is {saved}"
        )
    return True


# What a run writes into its folder: a folder holding any of the first five holds a run.
RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", "report.json")
RUN_OUTPUTS = (
    *RUN_FILES,
    "curves.png",
    "confusion.json",
    "confusion.png",
    "misclassified.csv",
    "tensorboard",
)


def claim_run_folder(run_dir: Path, force: bool = False) -> None:
    """Refuse a folder that holds another run, before anything is decoded or written; with
    ``force`` that run's files are removed first, so that nothing of it stays beside the new
    one (TensorBoard's events included)."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not force:
        raise UserError(
            f"{run_dir} holds a run ({', '.join(found)}): continue it with --resume {run_dir},"
            " replace it with --force, or choose another --out"
        )
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_folder(resume: str | Path) -> Path:
    """The run folder a resume writes to: the folder given, or the checkpoint's."""
    path = Path(resume)
    return path if path.is_dir() else path.parent


# The checkpoint resume_config read, kept for the Trainer that resumes from it, so that a
# resume reads its (up to hundreds of MB) last.pt once: keyed by the file's path, size and
# modification time, and handed over once.
_loaded: tuple[tuple[str, int, int], Checkpoint] | None = None


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_resume(run: str | Path) -> Checkpoint:
    """The checkpoint a resume continues from (a run folder or its last.pt), read once for
    :func:`resume_config` and the Trainer together."""
    global _loaded
    path = checkpoint.resolve_path(run)
    held, _loaded = _loaded, None
    if held is not None and held[0] == _key(path):
        return held[1]
    return checkpoint.load(path)


def resume_config(run: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of a run, with the settings a resume may change, validated."""
    global _loaded
    path = checkpoint.resolve_path(run)
    ckpt = checkpoint.load(path)
    _loaded = (_key(path), ckpt)
    if "batch_size" not in ckpt.config:
        raise UserError(f"cannot resume from {run}: it holds no training configuration")
    saved = from_saved(ckpt.config)
    # Keep the effective batch (and so the lr and steps it was tuned with) across a change in
    # the number of processes, e.g. from torchrun to one process, when it divides evenly.
    effective = saved.batch_size * ckpt.world_size
    if effective % distributed.world_size() == 0:
        saved.batch_size = effective // distributed.world_size()
    given = {k: v for k, v in overrides.items() if v is not None}
    return from_dict({**saved.to_dict(), **given})


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
