"""The training loop: device, mixed precision, channels_last, DDP, checkpoints, signals.

:func:`train` runs one configuration end to end and writes a self-describing run folder::

    RUN/config.json   every resolved setting, class names, versions
    RUN/metrics.csv   one row per epoch
    RUN/last.pt       the latest state (weights, optimizer, schedule, progress)
    RUN/best.pt       the weights of the epoch with the best accuracy on the selection split
    RUN/curves.png    loss and accuracy per epoch
    RUN/report.json   the final evaluation (plus confusion.json/.png, misclassified.csv)

Randomness in the loop comes only from generators seeded by (seed, epoch, step, rank), so a
run resumed from any step reproduces the uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rsscene import __version__, checkpoint
from rsscene.config import TrainConfig, resolve
from rsscene.data.datasets import BatchLoader, Split, chunks, open_split
from rsscene.data.transforms import MEAN, STD, Augment, to_device
from rsscene.engine import distributed
from rsscene.engine.evaluate import (
    autocast,
    confusion_matrix,
    predict,
    report_from_predictions,
    summarize,
    write_reports,
)
from rsscene.errors import UserError
from rsscene.models import create_model, load_backbone

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "val_acc",
    "lr",
    "images_per_s",
    "seconds",
]


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; ``last.pt`` was saved after the current step."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class Diverged(UserError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- device and precision
def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here")
    return device


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 (AVX-512 BF16 or AMX); elsewhere bf16 is slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on this device, or None for float32."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    # torchrun's processes on one node share its CPUs.
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# --------------------------------------------------------------------------- recipe pieces
def param_groups(model: nn.Module, weight_decay: float, wd_norm_bias: bool) -> list[dict]:
    """Weight decay on conv/linear weights only, unless ``wd_norm_bias`` (as in timm)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 or wd_norm_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.wd_norm_bias)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then the schedule's decay."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return 0.05 + 0.95 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mix_batch(
    x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, g: torch.Generator
) -> Tensor:
    """Mixup or CutMix (one of them per batch, chosen at random) in place on ``x``; soft targets."""
    target = F.one_hot(y, num_classes).float()
    if mixup <= 0 and cutmix <= 0:
        return target
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=g).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    gamma = torch.distributions.Gamma(torch.tensor([alpha, alpha]), torch.tensor([1.0, 1.0]))
    # Seed a private RNG for the Beta draw: torch.distributions only samples from the global one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        a, b = gamma.sample().tolist()
    lam = a / (a + b)
    perm = to_device(torch.randperm(x.shape[0], generator=g), x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy = int(torch.randint(0, h, (1,), generator=g))
        cx = int(torch.randint(0, w, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x.mul_(lam).add_(x[perm] * (1 - lam))
    return target * lam + target[perm.to(target.device)] * (1 - lam)


def data_fingerprint(split: Split) -> str:
    """Identifies the dataset: class names and the relative paths of the training images."""
    h = hashlib.sha256(json.dumps(split.classes).encode())
    for p in split.train.paths:
        h.update(str(p.relative_to(split.train.root)).encode() + b"\0")
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    import torchvision

    return {
        "rsscene": __version__,
        # A plain str: torch's TorchVersion subclass is refused by weights-only loading.
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def load_pretrained(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights through torchvision's own cache (downloads if online)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise UserError(
            f"--pretrained: torchvision's ImageNet weights for {arch} are not in its cache"
            f" ({cached}) and could not be downloaded ({type(e).__name__}); fetch {weights.url}"
            " on a connected machine and pass it with --weights PATH"
        ) from None


# --------------------------------------------------------------------------- the run
@dataclass
class RunState:
    """Everything that changes while training and must survive a restart."""

    next_epoch: int = 0
    next_step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        resume: str | Path | None = None,
        log: Any = print,
    ) -> None:
        self.log = log
        self.device = select_device(cfg.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.state = RunState()
        ckpt = checkpoint.load(resume) if resume else None
        # A step averages over all processes' batches, so the lr follows the global batch.
        self.cfg = resolve(cfg, self.device.type, world=self.dist.world)
        cfg = self.cfg
        self.amp = amp_dtype(cfg.amp, self.device)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)

        self.split = open_split(cfg.data)
        self.classes = self.split.classes
        self.fingerprint = data_fingerprint(self.split)
        if ckpt is not None:
            self._check_resume(ckpt, resume)
        workers = default_workers() if cfg.workers is None else cfg.workers
        store = max(cfg.img_size, cfg.eval_size)
        self.train_data = BatchLoader(
            self.split.train, store, cfg.cache, workers, self.device, cfg.strict, self.dist.main
        )
        # Evaluation decodes into a store even with --cache none: an unreadable test image must
        # be left out and counted, not replaced by another as in training.
        eval_cache = "memory" if cfg.cache == "none" else cfg.cache
        held_out = {"test": self.split.test, "val": self.split.val}
        self.eval_data = {
            name: BatchLoader(
                images, cfg.eval_size, eval_cache, workers, self.device, cfg.strict, self.dist.main
            )
            for name, images in held_out.items()
            if images is not None
        }
        self.select = "val" if "val" in self.eval_data else "test"
        self.augment = Augment(
            cfg.img_size,
            scale=cfg.crop_scale,
            dihedral=cfg.augment == "dihedral",
            hflip=cfg.augment == "hflip",
            jitter=cfg.jitter,
            crop=cfg.crop_scale != (1.0, 1.0),
            normalize=cfg.normalize,
        )
        self._build_model(ckpt)
        self.global_batch = cfg.batch_size * self.dist.world
        n = len(self.train_data)
        if n < self.dist.world:
            raise UserError(
                f"{n} training images cannot be shared among {self.dist.world} processes"
            )
        self.steps_per_epoch = len(chunks(list(range(n)), self.global_batch, drop_last=True))
        total = self.steps_per_epoch * cfg.epochs
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )
        if ckpt is not None:  # _check_resume refused checkpoints without state
            self._restore(ckpt)
        self.run_dir = (
            Path(resume)
            if resume and Path(resume).is_dir()
            else (Path(resume).parent if resume else self._new_run_dir())
        )
        where = self.dist.gather((self.state.next_epoch, self.state.next_step))
        if len(set(where)) > 1:
            raise UserError(
                f"the processes would resume at different (epoch, step): {where} by rank; all"
                f" nodes must read the same {self.run_dir / 'last.pt'} (a shared filesystem)"
            )
        self.stop_signal: int | None = None

    # ----------------------------------------------------------------------- set-up
    def _new_run_dir(self) -> Path:
        if self.cfg.out:
            return Path(self.cfg.out)
        # Rank 0's clock names the folder: the ranks' own could read different seconds.
        stamp = self.dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
        return Path("runs") / f"{self.cfg.arch}-{stamp}"

    def _check_resume(self, ckpt: dict, path: str | Path) -> None:
        problems = []
        if "state" not in ckpt:
            problems.append("it holds weights only (a best.pt); resume from the run's last.pt")
        if ckpt["arch"] != self.cfg.arch or ckpt.get("variant", "v1.5") != self.cfg.variant:
            problems.append(
                f"it is a {ckpt['arch']} {ckpt.get('variant')}, this run a"
                f" {self.cfg.arch} {self.cfg.variant}"
            )
        if ckpt["class_names"] != self.classes:
            problems.append(f"its classes {ckpt['class_names']} differ from {self.classes}")
        elif ckpt.get("data_fingerprint") != self.fingerprint:
            problems.append(f"it was trained on other images than {self.cfg.data}")
        if problems:
            raise UserError(
                f"cannot resume from {path}: "
                + "; ".join(problems)
                + " (use --weights-only to start a new run from its weights)"
            )

    def _build_model(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        net = create_model(
            cfg.arch,
            num_classes=len(self.classes),
            variant=cfg.variant,
            zero_init_residual=cfg.zero_init_residual,
        )
        start = None
        if cfg.weights:
            start = checkpoint.read_state_dict(cfg.weights)
            source = cfg.weights
        elif cfg.pretrained:
            start = load_pretrained(cfg.arch)
            source = f"torchvision {cfg.arch} ImageNet weights"
        if start is not None and ckpt is None:
            try:
                reinit = load_backbone(net, start)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"--weights {source}: {str(e)[:300]}") from None
            if reinit and self.dist.main:
                self.log(
                    f"loaded {source}; classifier re-initialised for {len(self.classes)}"
                    " classes (the file's has another size)"
                )
        if cfg.freeze_backbone:
            for name, p in net.named_parameters():
                p.requires_grad = name.startswith("fc.")
        if cfg.sync_bn and self.dist.enabled:
            net = distributed.convert_sync_batchnorm(net, self.device.type)
        net = net.to(self.device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.ema = None
        if cfg.ema > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True
            )
        forward = net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            forward = torch.compile(forward)
        self.forward = forward
        self.optimizer = make_optimizer(cfg, net)

    def _restore(self, ckpt: dict) -> None:
        st = ckpt["state"]
        self.net.load_state_dict(st.get("model", ckpt["model"]))
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema"):
            self.ema.load_state_dict(st["ema"])
        saved_batch = ckpt["config"]["batch_size"] * ckpt.get("world_size", 1)
        if saved_batch != self.global_batch:
            if ckpt["next_step"]:
                raise UserError(
                    f"the checkpoint was saved mid-epoch with an effective batch of {saved_batch};"
                    f" this run's is {self.cfg.batch_size} x {self.dist.world} processes ="
                    f" {self.global_batch}: resume with a --batch-size and process count whose"
                    f" product is {saved_batch}"
                )
            # Steps have another size now: continue the schedule at the same epoch.
            self.scheduler.last_epoch = ckpt["next_epoch"] * self.steps_per_epoch - 1
            self.scheduler.step()
        self.state = RunState(
            next_epoch=ckpt["next_epoch"],
            next_step=ckpt["next_step"],
            history=st["history"],
            best=st["best"],
            partial=st["partial"],
        )
        torch.set_rng_state(st["rng"])

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    # ----------------------------------------------------------------------- checkpoints
    def payload(self, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint: weights and what inference needs, plus, when ``resumable``, the
        optimizer, schedule and progress that ``--resume`` continues from."""
        payload: dict[str, Any] = {
            "model": self.eval_model.state_dict(),
            "arch": self.cfg.arch,
            "variant": self.cfg.variant,
            "class_names": self.classes,
            "preprocess": {
                "size": self.cfg.eval_size,
                "mean": list(MEAN) if self.cfg.normalize else None,
                "std": list(STD) if self.cfg.normalize else None,
            },
            "config": self.cfg.to_dict(),
            "data_fingerprint": self.fingerprint,
            "next_epoch": self.state.next_epoch,
            "next_step": self.state.next_step,
            "world_size": self.dist.world,
            "versions": versions(),
        }
        if not resumable:
            return payload
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "history": self.state.history,
            "best": self.state.best,
            "partial": self.state.partial,
            "rng": torch.get_rng_state(),
        }
        if self.ema is not None:
            state["model"] = self.net.state_dict()
            state["ema"] = self.ema.state_dict()
        return {**payload, "state": state}

    def save(self, name: str, resumable: bool = True) -> Path:
        return checkpoint.save(self.payload(resumable), self.run_dir / name)

    def write_files(self) -> None:
        from rsscene.plots import plot_curves

        with (self.run_dir / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.state.history)
        plot_curves(self.state.history, self.run_dir / "curves.png")

    # ----------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_signal = signum

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of each global batch of the epoch's permutation."""
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed, epoch, -1, 0))
        perm = torch.randperm(len(self.train_data), generator=g).tolist()
        global_batches = chunks(perm, self.global_batch, drop_last=True)
        rank, world = self.dist.rank, self.dist.world
        return [b[rank * len(b) // world : (rank + 1) * len(b) // world] for b in global_batches]

    def fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = {
                **cfg.to_dict(),
                "class_names": self.classes,
                "versions": versions(),
                "device": str(self.device),
                "amp": str(self.amp).replace("torch.", ""),
                "world_size": self.dist.world,
                "effective_batch": self.global_batch,
            }
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            self.log(
                f"{cfg.arch} ({cfg.variant}) on {self.device}"
                f"{' x' + str(self.dist.world) if self.dist.enabled else ''},"
                f" {len(self.train_data)} train / {len(self.eval_data['test'])} test images,"
                f" {len(self.classes)} classes, {cfg.epochs} epochs, batch {cfg.batch_size}"
                f" (effective {self.global_batch}), lr {cfg.lr:g}, {cfg.img_size}px train /"
                f" {cfg.eval_size}px test, amp {str(self.amp).replace('torch.', '')},"
                f" cache {self.train_data.mode} -> {self.run_dir}"
            )
            for name, loader in [("train", self.train_data), *self.eval_data.items()]:
                if loader.skipped:
                    self.log(f"{name}: skipped {len(loader.skipped)} unreadable file(s):")
                    for path, reason in loader.skipped:
                        self.log(f"  {path}: {reason}")
            if self.state.next_epoch or self.state.next_step:
                self.log(
                    f"resuming at epoch {self.state.next_epoch + 1}, step {self.state.next_step + 1}"
                )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for epoch in range(self.state.next_epoch, cfg.epochs):
                self._train_epoch(epoch)
            return self._finish()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _train_epoch(self, epoch: int) -> None:
        cfg, main = self.cfg, self.dist.main
        batches = self.epoch_batches(epoch)
        start = self.state.next_step if epoch == self.state.next_epoch else 0
        # The sums saved by an interrupted run are over all ranks; counted once, at the end.
        part = self.state.partial if start else {}
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        elapsed = float(part.get("seconds", 0.0))
        bad_step = torch.tensor(-1, device=self.device)
        self.forward.train()
        if cfg.freeze_backbone:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        bar = tqdm(
            total=len(batches),
            initial=start,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (main and sys.stderr.isatty()),
            leave=False,
            unit="batch",
        )
        t0 = time.perf_counter()
        step = start
        for step, batch in enumerate(self.train_data.batches(batches[start:]), start=start):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, step, self.dist.rank))
            x = self.augment(batch.images, g)
            target = mix_batch(x, batch.labels, len(self.classes), cfg.mixup, cfg.cutmix, g)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = self.forward(x)
                loss = F.cross_entropy(
                    logits.float(), target.to(self.device), label_smoothing=cfg.label_smoothing
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.max_grad_norm:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.net)
            # Accumulate on the device; the host reads these only every few steps.
            detached = loss.detach()
            # A Python scalar, not torch.tensor(step, device=...): that copy would sync the GPU.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(detached), step, bad_step)
            loss_sum += detached.double() * len(batch.labels)
            correct += (logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch.labels)
            bar.update(1)
            if not (self.device.type == "cpu" or step % 20 == 19 or step == len(batches) - 1):
                continue
            # The host reads the device only here, and one reduction makes every rank stop, or
            # raise, at the same step.
            stop = torch.tensor(int(self.stop_signal is not None), device=self.device)
            stop, bad = self.dist.all_max(torch.stack([stop, bad_step])).tolist()
            if bad >= 0:
                raise self._diverged(epoch, bad)
            if not bar.disable:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{rate:.0f}",
                )
            if stop:
                self.state.next_epoch, self.state.next_step = epoch, step + 1
                self.state.partial = {
                    **self._epoch_sums(loss_sum, correct, seen, part),
                    "seconds": elapsed + time.perf_counter() - t0,
                }
                self._interrupt(epoch, step)
        bar.close()
        train_seconds = time.perf_counter() - t0
        sums = self._epoch_sums(loss_sum, correct, seen, part)
        images_per_s = seen * self.dist.world / max(train_seconds, 1e-9)
        self.dist.sync_buffers(self.net, *([self.ema] if self.ema is not None else []))
        results = {name: self.evaluate(loader) for name, loader in self.eval_data.items()}
        row = {
            "epoch": epoch + 1,
            "train_loss": round(sums["loss_sum"] / max(sums["seen"], 1), 5),
            "train_acc": round(sums["correct"] / max(sums["seen"], 1), 5),
            "test_loss": round(results["test"]["loss"], 5),
            "test_acc": round(results["test"]["accuracy"], 5),
            "val_acc": round(results["val"]["accuracy"], 5) if "val" in results else "",
            "lr": f"{self.scheduler.get_last_lr()[0]:.6g}",
            "images_per_s": round(images_per_s, 1),
            "seconds": round(elapsed + train_seconds, 2),
        }
        self.state.history.append(row)
        self.state.next_epoch, self.state.next_step, self.state.partial = epoch + 1, 0, {}
        selected = results[self.select]["accuracy"]
        improved = not self.state.best or selected > self.state.best["accuracy"]
        if improved:
            self.state.best = {"epoch": epoch + 1, "accuracy": selected, "split": self.select}
        if main:
            self.save("last.pt")
            if improved:
                # Weights only: a third of the size with AdamW's two moments, and a run is
                # resumed from last.pt.
                self.save("best.pt", resumable=False)
            self.write_files()
            val = f" val_acc {row['val_acc']:.4f}" if "val" in results else ""
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs} train_loss {row['train_loss']:.4f}"
                f" train_acc {row['train_acc']:.4f} test_loss {row['test_loss']:.4f}"
                f" test_acc {row['test_acc']:.4f}{val} lr {row['lr']}"
                f" {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s"
            )
        self.dist.barrier()

    def _epoch_sums(
        self, loss_sum: Tensor, correct: Tensor, seen: int, part: dict[str, float]
    ) -> dict[str, float]:
        """The epoch's training loss sum, correct and seen counts over all ranks so far."""
        local = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))])
        totals = self.dist.all_sum(local).tolist()
        return {
            name: total + part.get(name, 0)
            for name, total in zip(("loss_sum", "correct", "seen"), totals, strict=True)
        }

    def _diverged(self, epoch: int, step: int) -> Diverged:
        last = self.run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        return Diverged(
            f"loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}; training stopped and"
            f" {kept}. Try a lower --lr or --max-grad-norm 1"
        )

    def _interrupt(self, epoch: int, step: int) -> None:
        signum = self.stop_signal or signal.SIGINT
        if self.dist.main:
            self.save("last.pt")
            self.write_files() if self.state.history else None
        self.dist.barrier()
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{name}: stopped after epoch {epoch + 1} step {step + 1}; saved"
            f" {self.run_dir / 'last.pt'}. Resume with: rsscene train --resume {self.run_dir}",
            signum,
        )

    def evaluate(self, loader: BatchLoader, tta: bool = False) -> dict[str, Any]:
        """Metrics over the whole loader, each image counted once across all ranks."""
        rows = list(range(self.dist.rank, len(loader), self.dist.world))
        preds = predict(
            self.eval_model,
            loader,
            rows,
            size=self.cfg.eval_size,
            normalize=self.cfg.normalize,
            batch_size=2 * self.cfg.batch_size,
            tta=tta,
            amp_dtype=self.amp,
            channels_last=self.cfg.channels_last,
        )
        if not self.dist.enabled:
            return report_from_predictions(preds, self.classes)
        k = len(self.classes)
        cm = confusion_matrix(preds.logits.argmax(1), preds.labels, k).to(self.device)
        loss = (
            F.cross_entropy(preds.logits, preds.labels, reduction="sum")
            if len(rows)
            else torch.tensor(0.0)
        )
        top5 = preds.logits.topk(min(5, k), 1).indices.eq(preds.labels[:, None]).any(1).sum()
        extra = torch.stack([loss.double(), top5.double()]).to(self.device)
        self.dist.all_sum(cm)
        self.dist.all_sum(extra)
        return summarize(
            cm.cpu(),
            self.classes,
            extra[0].item(),
            {1: int(cm.diag().sum()), 5: int(extra[1].item())},
        )

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        final = self.evaluate(self.eval_data["test"])
        tta = self.evaluate(self.eval_data["test"], tta=True)
        report = {
            "headline": "test accuracy of the final epoch's weights",
            "test_accuracy": final["accuracy"],
            "test_accuracy_tta": tta["accuracy"],
            "best": {
                **self.state.best,
                "note": (
                    "best.pt is the epoch with the highest accuracy on the held-out validation split"
                    if self.select == "val"
                    else "best.pt was selected on the test split itself, so its accuracy is optimistic;"
                    " report the final epoch's"
                ),
            },
            "epochs": cfg.epochs,
            "train_seconds": round(sum(float(r["seconds"]) for r in self.state.history), 2),
            "arch": cfg.arch,
            "class_names": self.classes,
            "test": final,
        }
        if self.dist.main:
            self.write_files()
            test = self.eval_data["test"]
            preds = predict(
                self.eval_model,
                test,
                size=cfg.eval_size,
                normalize=cfg.normalize,
                batch_size=2 * cfg.batch_size,
                amp_dtype=self.amp,
                channels_last=cfg.channels_last,
            )
            write_reports(
                final,
                preds,
                test.paths,
                self.run_dir,
                title=f"{cfg.arch}, final epoch: test accuracy {final['accuracy']:.1%}",
            )
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            self.log(
                f"final test accuracy {final['accuracy']:.2%} (with 8-way TTA"
                f" {tta['accuracy']:.2%}); best {self.state.best['split']} accuracy"
                f" {self.state.best['accuracy']:.2%} at epoch {self.state.best['epoch']};"
                f" run folder {self.run_dir}"
            )
            if self.train_data.replaced:
                self.log(
                    f"replaced {self.train_data.replaced} training sample(s) whose file could not"
                    " be read by another image of the same class (files named in the warnings)"
                )
        return report


def train(
    cfg: TrainConfig, resume: str | Path | None = None, log: Any = print
) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` (or continue the run in ``resume``); returns (run folder, final report)."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, log=log)
        report = trainer.fit()
        return trainer.run_dir, report
    except Exception as e:
        # Under torchrun another process's crash surfaces here as a communication error
        # (torchrun then names the root cause): say where the run can continue from.
        if (
            trainer is not None
            and trainer.dist.enabled
            and not isinstance(e, (UserError, Interrupted))
            and (trainer.run_dir / "last.pt").is_file()
        ):
            print(
                f"rank {trainer.dist.rank}: training stopped ({type(e).__name__}); the last"
                f" checkpoint is {trainer.run_dir / 'last.pt'}: continue with"
                f" --resume {trainer.run_dir}",
                file=sys.stderr,
            )
        raise
    finally:
        distributed.teardown()


def resume_config(run: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of a run, with the settings a resume may change."""
    ckpt = checkpoint.load(run)
    saved = TrainConfig(
        **{
            k: v
            for k, v in ckpt["config"].items()
            if k in {f.name for f in dataclasses.fields(TrainConfig)}
        }
    )
    if isinstance(saved.crop_scale, list):
        saved.crop_scale = tuple(saved.crop_scale)
    # Keep the effective batch (and so the lr and steps it was tuned with) across a change in
    # the number of processes, e.g. from torchrun to one process, when it divides evenly.
    effective = saved.batch_size * ckpt.get("world_size", 1)
    if effective % distributed.world_size() == 0:
        saved.batch_size = effective // distributed.world_size()
    return dataclasses.replace(saved, **{k: v for k, v in overrides.items() if v is not None})
