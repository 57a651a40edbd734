"""The :class:`Trainer`: given a model, data and an optimizer, it trains, evaluates after each
epoch (or every ``eval_every``), checkpoints, and writes a self-describing run folder::

    RUN/config.json   every resolved setting, class names, versions
    RUN/metrics.csv   one row per epoch (also sent to TensorBoard or MLflow with --log)
    RUN/last.pt       the latest state (weights, optimizer, schedule, progress)
    RUN/best.pt       the weights of the epoch with the best accuracy on the selection split
    RUN/curves.png    loss and accuracy per epoch
    RUN/report.json   the final evaluation (plus confusion.json/.png, misclassified.csv)

An epoch is a loop of steps with one sync point every few steps (the host reads the device
only there, and every rank stops or raises at the same step), then an end of epoch
(evaluate, choose best, log, and hand the files to a background thread that writes them while
the next epoch trains; last.pt, best.pt and the curves at most every ``save_interval``
seconds, and whenever the run stops). Randomness in the loop comes only from generators seeded
by (seed, epoch, step, rank), so a run resumed from any step reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, TrainingState
from rsscene.config import TrainConfig, resolve
from rsscene.data.datasets import Batch, BatchLoader, TrainData, chunks, typical_side
from rsscene.device import (
    amp_dtype,
    autocast,
    default_workers,
    select_device,
    set_determinism,
)
from rsscene.engine import distributed, loggers, recipe, runstate
from rsscene.engine.evaluate import (
    Predictions,
    headline,
    predict,
    report_from_predictions,
    write_reports,
)
from rsscene.errors import Diverged, Interrupted, UserError


class _Tally:
    """An epoch's running training sums, kept on the device until a sync point reads them."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.bad_step = torch.tensor(-1, device=device)
        self.seen = 0

    def add(self, step: int, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        # A Python scalar, not torch.tensor(step, device=...): that copy would sync the GPU.
        self.bad_step = torch.where(
            (self.bad_step < 0) & ~torch.isfinite(loss), step, self.bad_step
        )
        self.loss_sum += loss.double() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)


class Trainer:
    """Trains ``model`` on ``data`` with the settings of ``cfg``.

    ``optimizer`` defaults to the recipe's (``cfg.optimizer``, no weight decay on norm and
    bias); the schedule, augmentation, mixed precision, channels_last, EMA, DDP and
    ``torch.compile`` follow ``cfg``. :meth:`from_config` builds every part from a config, as
    ``rsscene train`` does. :meth:`fit` runs the whole schedule; :meth:`train_epoch` and
    :meth:`evaluate` are its pieces.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        data: TrainData,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | None = None,
        dist: distributed.Dist | None = None,
        run_dir: str | Path | None = None,
        log: Any = print,
    ) -> None:
        self.log = log
        self.device = device or select_device(cfg.device)
        self.dist = dist or distributed.Dist()
        self.cfg = resolve(cfg, self.device.type, world=self.dist.world)
        self.amp = amp_dtype(self.cfg.amp, self.device)
        self.data = data
        self.classes = data.classes
        self.fingerprint = runstate.data_fingerprint(self.classes, data.train.images)
        self.select = "val" if data.val is not None else "test"
        # What inference needs to feed the model as it was trained: bands, statistics, size.
        self.preprocess = dataclasses.replace(
            data.preprocess,
            size=self.cfg.eval_size,
            mean=data.preprocess.mean if self.cfg.normalize else None,
            std=data.preprocess.std if self.cfg.normalize else None,
            source_size=typical_side(data.train.images),
        )
        self.augment = recipe.make_augment(self.cfg, self.preprocess)
        weights = recipe.class_weights(self.cfg.class_weights, self.classes, data.train.labels)
        self.loss_weights = None if weights is None else weights.to(self.device)
        self._wrap(model)
        self.optimizer = optimizer or recipe.make_optimizer(self.cfg, self.net)
        self.global_batch = self.cfg.batch_size * self.dist.world
        n = len(data.train)
        if n < self.dist.world:
            raise UserError(
                f"{n} training images cannot be shared among {self.dist.world} processes"
            )
        self.steps_per_epoch = len(chunks(list(range(n)), self.global_batch, drop_last=True))
        self.scheduler = recipe.make_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )
        self.state = runstate.RunState()
        self.run_dir = Path(run_dir) if run_dir else self._new_run_dir()
        self.stop_signal: int | None = None
        self._owns_process_group = False
        self._results: dict[str, tuple[dict[str, Any], Predictions]] = {}
        self._log: loggers.RunLog | None = None
        self.writes = runstate.BackgroundWrites()
        # The newest epoch-end state and best weights not yet on disk, and when last.pt was
        # last handed to the writes (see _write_epoch).
        self._unsaved: Checkpoint | None = None
        self._unsaved_best: Checkpoint | None = None
        self._saved_at: float | None = None

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, resume: str | Path | None = None, log: Any = print
    ) -> Trainer:
        """Every part from ``cfg``: the split in ``cfg.data``, the model (with ``--weights``),
        the recipe's optimizer; under torchrun, the process group. With ``resume`` (a run
        folder or its ``last.pt``) the run continues where that checkpoint stopped."""
        device = select_device(cfg.device)
        dist = distributed.setup(device.type)
        try:
            if dist.enabled and device.type == "cuda":
                device = torch.device("cuda", dist.local_rank)
            cfg = resolve(cfg, device.type, world=dist.world)
            ckpt = checkpoint.load(resume) if resume else None
            set_determinism(cfg.deterministic, device)
            torch.manual_seed(cfg.seed)
            workers = default_workers() if cfg.workers is None else cfg.workers
            store = max(cfg.img_size, cfg.eval_size)
            data = TrainData.from_split(
                cfg.data,
                store,
                cfg.eval_size,
                cfg.cache,
                workers,
                device,
                cfg.strict,
                dist.main,
                cfg.bands,
            )
            # A resumed run takes its weights from the checkpoint, not from where it started.
            model, note = recipe.build_model(
                cfg, len(data.classes), ckpt is None, data.preprocess.channels
            )
            if note and dist.main:
                log(note)
            run_dir = runstate.run_folder(resume) if resume else None
            trainer = cls(cfg, model, data, device=device, dist=dist, run_dir=run_dir, log=log)
            trainer._owns_process_group = dist.enabled
            if ckpt is not None:
                trainer.restore(ckpt, resume)
            return trainer
        except BaseException:
            distributed.teardown()
            raise

    # ----------------------------------------------------------------------- set-up
    def _new_run_dir(self) -> Path:
        if self.cfg.out:
            return Path(self.cfg.out)
        # Rank 0's clock names the folder: the ranks' own could read different seconds.
        stamp = self.dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
        return Path("runs") / f"{self.cfg.arch}-{stamp}"

    def _wrap(self, model: nn.Module) -> None:
        """``net`` (the model on the device), ``ema`` and ``forward`` (DDP and/or compiled)."""
        cfg = self.cfg
        if cfg.sync_bn and self.dist.enabled:
            model = distributed.convert_sync_batchnorm(model, self.device.type)
        net = model.to(self.device)
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
        self.forward = torch.compile(forward) if cfg.compile else forward

    def restore(self, ckpt: Checkpoint, source: str | Path = "the checkpoint") -> None:
        """Continue from ``ckpt`` (read from ``source``), once it is checked to be a run of
        this model on this data: weights, optimizer, schedule, scaler, EMA, progress, RNG."""
        runstate.check_resume(ckpt, self.cfg, self.classes, self.fingerprint, source)
        st = ckpt.state
        self.net.load_state_dict(st.model or ckpt.model)
        self.optimizer.load_state_dict(st.optimizer)
        self.scheduler.load_state_dict(st.scheduler)
        if st.scaler:
            self.scaler.load_state_dict(st.scaler)
        if self.ema is not None and st.ema:
            self.ema.load_state_dict(st.ema)
        if runstate.schedule_moved(ckpt, self.cfg.batch_size, self.dist.world):
            # Steps have another size now: continue the schedule at the same epoch.
            self.scheduler.last_epoch = ckpt.next_epoch * self.steps_per_epoch - 1
            self.scheduler.step()
        self.state = runstate.RunState.from_checkpoint(ckpt)
        torch.set_rng_state(st.rng)
        where = self.dist.gather((self.state.next_epoch, self.state.next_step))
        if len(set(where)) > 1:
            raise UserError(
                f"the processes would resume at different (epoch, step): {where} by rank; all"
                f" nodes must read the same {self.run_dir / 'last.pt'} (a shared filesystem)"
            )

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    # ----------------------------------------------------------------------- checkpoints
    def checkpoint(self, resumable: bool = True) -> Checkpoint:
        """The run as a checkpoint: weights and what inference needs, plus, when
        ``resumable``, the optimizer, schedule and progress that ``--resume`` continues from."""
        state = None
        if resumable:
            state = TrainingState(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                history=self.state.history,
                best=self.state.best,
                partial=self.state.partial,
                rng=torch.get_rng_state(),
                scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                model=self.net.state_dict() if self.ema is not None else None,
                ema=self.ema.state_dict() if self.ema is not None else None,
            )
        return Checkpoint(
            model=self.eval_model.state_dict(),
            arch=self.cfg.arch,
            variant=self.cfg.variant,
            class_names=self.classes,
            preprocess=self.preprocess,
            config=self.cfg.to_dict(),
            data_fingerprint=self.fingerprint,
            next_epoch=self.state.next_epoch,
            next_step=self.state.next_step,
            world_size=self.dist.world,
            versions=runstate.versions(),
            state=state,
        )

    def save(self, name: str, resumable: bool = True) -> Path:
        return checkpoint.save(self.checkpoint(resumable), self.run_dir / name)

    @property
    def run_log(self) -> loggers.RunLog:
        """Where each epoch's row goes (rank 0): metrics.csv, curves.png and ``--log``'s
        backend, opened at first use, after a resume has set the epoch to continue from."""
        if self._log is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = loggers.RunLog(
                self.cfg.log, self.run_dir, self.state.next_epoch, self.cfg.to_dict()
            )
        return self._log

    def _start_run(self) -> None:
        """The run folder, its config.json, and the log's first lines (rank 0 only)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            **cfg.to_dict(),
            "class_names": self.classes,
            "versions": runstate.versions(),
            "device": str(self.device),
            "amp": str(self.amp).replace("torch.", ""),
            "world_size": self.dist.world,
            "effective_batch": self.global_batch,
        }
        if self.loss_weights is not None:
            config["class_weight_values"] = dict(
                zip(self.classes, self.loss_weights.tolist(), strict=True)
            )
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        train_px = f"{cfg.img_size}px"
        if cfg.start_size is not None:
            train_px = f"{cfg.start_size}->{cfg.img_size}px"
        self.log(
            f"{cfg.arch} ({cfg.variant}) on {self.device}"
            f"{' x' + str(self.dist.world) if self.dist.enabled else ''},"
            f" {len(self.data.train)} train / {len(self.data.test)} test images,"
            f" {len(self.classes)} classes, {cfg.epochs} epochs, batch {cfg.batch_size}"
            f" (effective {self.global_batch}), lr {cfg.lr:g}, {train_px} train /"
            f" {cfg.eval_size}px test, amp {str(self.amp).replace('torch.', '')},"
            f" cache {self.data.train.mode} -> {self.run_dir}"
        )
        for name, loader in [("train", self.data.train), *self.data.held_out.items()]:
            if loader.skipped:
                self.log(f"{name}: skipped {len(loader.skipped)} unreadable file(s):")
                for path, reason in loader.skipped:
                    self.log(f"  {path}: {reason}")
        if self.state.next_epoch or self.state.next_step:
            self.log(
                f"resuming at epoch {self.state.next_epoch + 1}, step {self.state.next_step + 1}"
            )
        # Opened now, so that a missing TensorBoard or MLflow is said before an epoch is spent.
        _ = self.run_log

    # ----------------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate the final weights; returns the report.

        SIGINT/SIGTERM stop after the current step with ``last.pt`` saved
        (:class:`~rsscene.errors.Interrupted`).
        """
        if self.data.test is None:
            raise UserError("training needs held-out test images (TrainData.test)")
        if self.dist.main:
            self._start_run()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for epoch in range(self.state.next_epoch, self.cfg.epochs):
                self.end_epoch(epoch, self.train_epoch(epoch))
            self.writes.wait()
            return self._finish()
        except Exception as e:
            self._settle_writes()
            self._say_where_to_continue(e)
            raise
        finally:
            try:
                self.writes.wait()  # also after a second Ctrl-C, before the log is closed
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
                if self._log is not None:
                    self._log.close()
                    self._log = None
                if self._owns_process_group:
                    distributed.teardown()

    def _settle_writes(self) -> None:
        """Finish the background writes and write what the save interval held back, while
        another error stops the run: that error is the one raised, and a failed write is said
        alongside it."""
        try:
            self.writes.wait()
            self._take_unsaved()()
        except Exception as e:
            self.log(f"also: the last epoch's files were not all written ({e})")

    def _say_where_to_continue(self, error: Exception) -> None:
        # Under torchrun another process's crash surfaces here as a communication error
        # (torchrun then names the root cause): say where the run can continue from.
        last = self.run_dir / "last.pt"
        if self.dist.enabled and not isinstance(error, UserError | Interrupted) and last.is_file():
            print(
                f"rank {self.dist.rank}: training stopped ({type(error).__name__}); the last"
                f" checkpoint is {last}: continue with --resume {self.run_dir}",
                file=sys.stderr,
            )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_signal = signum

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of each global batch of the epoch's permutation."""
        return recipe.epoch_batches(
            len(self.data.train),
            self.global_batch,
            self.cfg.seed,
            epoch,
            self.dist.rank,
            self.dist.world,
            labels=self.data.train.labels if self.cfg.sampler == "balanced" else None,
        )

    # ----------------------------------------------------------------------- an epoch
    def step(self, batch: Batch, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """One optimisation step on ``batch``; returns its (loss, logits), detached."""
        cfg = self.cfg
        x = self.augment(batch.images, g)
        target = recipe.mix_batch(x, batch.labels, len(self.classes), cfg.mixup, cfg.cutmix, g)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            logits = self.forward(x)
            loss = F.cross_entropy(
                logits.float(),
                target.to(self.device),
                weight=self.loss_weights,
                label_smoothing=cfg.label_smoothing,
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
        return loss.detach(), logits.detach()

    def _train_mode(self) -> None:
        self.forward.train()
        if self.cfg.freeze_backbone:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_epoch(self, epoch: int, batches: list[list[int]] | None = None) -> dict[str, float]:
        """The steps of one epoch over ``batches`` (default: the epoch's permutation, from
        the saved step when resuming). Returns the epoch's loss sum, correct and seen counts
        over all ranks, its seconds, and this session's images/s."""
        batches = self.epoch_batches(epoch) if batches is None else batches
        start = self.state.next_step if epoch == self.state.next_epoch else 0
        # The sums saved by an interrupted run are over all ranks; counted once, at the end.
        part = self.state.partial if start else {}
        tally = _Tally(self.device)
        self.augment.size = recipe.train_size(self.cfg, epoch)
        self._train_mode()
        bar = tqdm(
            total=len(batches),
            initial=start,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not (self.dist.main and sys.stderr.isatty()),
            leave=False,
            unit="batch",
        )
        t0 = time.perf_counter()
        for step, batch in enumerate(self.data.train.batches(batches[start:]), start=start):
            g = torch.Generator().manual_seed(
                recipe.step_seed(self.cfg.seed, epoch, step, self.dist.rank)
            )
            loss, logits = self.step(batch, g)
            tally.add(step, loss, logits, batch.labels)
            bar.update(1)
            # On a GPU the host reads the device only every 20 steps and at the end.
            if self.device.type == "cpu" or step % 20 == 19 or step == len(batches) - 1:
                self._sync(epoch, step, tally, bar, part, t0)
        bar.close()
        seconds = time.perf_counter() - t0
        return {
            **self._epoch_sums(tally, part),
            "seconds": part.get("seconds", 0.0) + seconds,
            "images_per_s": tally.seen * self.dist.world / max(seconds, 1e-9),
        }

    def _sync(
        self, epoch: int, step: int, tally: _Tally, bar: tqdm, part: dict[str, float], t0: float
    ) -> None:
        """The sync point: one reduction makes every rank stop, or raise, at the same step."""
        stop = torch.tensor(int(self.stop_signal is not None), device=self.device)
        stop, bad = self.dist.all_max(torch.stack([stop, tally.bad_step])).tolist()
        if bad >= 0:
            raise self._diverged(epoch, bad)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{tally.loss_sum.item() / tally.seen:.3f}",
                acc=f"{tally.correct.item() / tally.seen:.3f}",
                img_s=f"{tally.seen / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
        if stop:
            self.state.next_epoch, self.state.next_step = epoch, step + 1
            self.state.partial = {
                **self._epoch_sums(tally, part),
                "seconds": part.get("seconds", 0.0) + time.perf_counter() - t0,
            }
            self._interrupt(epoch, step)

    def _epoch_sums(self, tally: _Tally, part: dict[str, float]) -> dict[str, float]:
        """The epoch's training loss sum, correct and seen counts over all ranks so far."""
        loss_sum = tally.loss_sum
        local = torch.stack([loss_sum, tally.correct.double(), loss_sum.new_tensor(tally.seen)])
        totals = self.dist.all_sum(local).tolist()
        return {
            name: total + part.get(name, 0)
            for name, total in zip(("loss_sum", "correct", "seen"), totals, strict=True)
        }

    def _diverged(self, epoch: int, step: int) -> Diverged:
        self._settle_writes()
        last = self.run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        return Diverged(
            f"loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}; training stopped and"
            f" {kept}. Try a lower --lr or --max-grad-norm 1"
        )

    def _interrupt(self, epoch: int, step: int) -> None:
        signum = self.stop_signal or signal.SIGINT
        if self.dist.main:
            self._settle_writes()
            self.save("last.pt")  # metrics.csv already holds every finished epoch
        self.dist.barrier()
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{name}: stopped after epoch {epoch + 1} step {step + 1}; saved"
            f" {self.run_dir / 'last.pt'}. Resume with: rsscene train --resume {self.run_dir}",
            signum,
        )

    def end_epoch(self, epoch: int, sums: dict[str, float]) -> dict[str, Any]:
        """Evaluate (every ``eval_every`` epochs and at the last), choose best, log the
        epoch's row, and hand ``last.pt`` (and ``best.pt``), metrics.csv and the curves to the
        background writes."""
        self.dist.sync_buffers(self.net, *([self.ema] if self.ema is not None else []))
        evaluated = (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs
        held_out = self.data.held_out.items() if evaluated else ()
        self._results = {name: self.evaluate(loader) for name, loader in held_out}
        test, val = (
            self._results.get("test", ({}, None))[0],
            self._results.get("val", ({}, None))[0],
        )
        seen = max(sums["seen"], 1)
        row = {
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
            "lr": f"{self.scheduler.get_last_lr()[0]:.6g}",
            "images_per_s": round(sums["images_per_s"], 1),
            "seconds": round(sums["seconds"], 2),
        }
        self.state.history.append(row)
        self.state.next_epoch, self.state.next_step, self.state.partial = epoch + 1, 0, {}
        selected = self._results[self.select][0]["accuracy"] if evaluated else None
        improved = evaluated and (not self.state.best or selected > self.state.best["accuracy"])
        if improved:
            self.state.best = {"epoch": epoch + 1, "accuracy": selected, "split": self.select}
        if self.dist.main:
            self._write_epoch(epoch, improved)
            px = "" if self.cfg.start_size is None else f" {self.augment.size}px"
            held = "".join(
                f" {key} {row[key]:.4f}"
                for key in ("test_loss", "test_acc", "val_acc")
                if row[key] != ""
            )
            self.log(
                f"epoch {epoch + 1}/{self.cfg.epochs} train_loss {row['train_loss']:.4f}"
                f" train_acc {row['train_acc']:.4f}{held} lr {row['lr']}{px}"
                f" {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s"
            )
        self.dist.barrier()
        return row

    def _write_epoch(self, epoch: int, improved: bool) -> None:
        """Hand the epoch's row (metrics.csv, ``--log``'s backend) to the background writes,
        and keep a CPU copy of the state, since the next steps change the weights and AdamW's
        moments in place. last.pt, best.pt and curves.png are written from that copy after
        this process's first epoch, once ``save_interval`` seconds have passed since they
        last were, at the last epoch, and when the run stops (:meth:`_settle_writes`)."""
        self.writes.wait()  # one copy at a time, and the previous epoch's files are complete
        self._unsaved = checkpoint.on_cpu(self.checkpoint())
        if improved:
            # best.pt holds weights only: a third of the size, and a run is resumed from last.pt.
            self._unsaved_best = dataclasses.replace(self._unsaved, state=None)
        history, run_log, files = self._unsaved.state.history, self.run_log, None
        now = time.monotonic()
        if (
            self._saved_at is None
            or now - self._saved_at >= self.cfg.save_interval
            or epoch + 1 == self.cfg.epochs
        ):
            files, self._saved_at = self._take_unsaved(), now

        def write() -> None:
            run_log.epoch(history)
            if files is not None:
                files()

        self.writes.submit(write)

    def _take_unsaved(self) -> Callable[[], None]:
        """A function that writes the unsaved best.pt, last.pt and curves.png."""
        best, last, run_dir = self._unsaved_best, self._unsaved, self.run_dir
        self._unsaved_best = self._unsaved = None

        def write() -> None:
            from rsscene.plots import plot_curves

            # last.pt last: it names the best epoch, so best.pt must already hold it.
            if best is not None:
                checkpoint.save(best, run_dir / "best.pt")
            if last is not None:
                checkpoint.save(last, run_dir / "last.pt")
                plot_curves(last.state.history, run_dir / "curves.png")

        return write

    # ----------------------------------------------------------------------- evaluation
    def evaluate(
        self, loader: BatchLoader, tta: bool = False
    ) -> tuple[dict[str, Any], Predictions]:
        """The report and predictions of the evaluation model over the whole loader; each
        process predicts its share and every process receives all of them."""
        preds = predict(
            self.eval_model,
            loader,
            list(range(self.dist.rank, len(loader), self.dist.world)),
            size=self.cfg.eval_size,
            **self.preprocess.standardise,
            batch_size=2 * self.cfg.batch_size,
            tta=tta,
            amp_dtype=self.amp,
            channels_last=self.cfg.channels_last,
        )
        if self.dist.enabled:
            preds = Predictions.concat(self.dist.gather(preds))
        return report_from_predictions(preds, self.classes), preds

    def _finish(self) -> dict[str, Any]:
        """The final weights' test report (with 8-way TTA), written with its figures."""
        test = self.data.test
        # The last epoch's evaluation already saw these weights; a resumed finished run did not.
        final, preds = self._results.get("test") or self.evaluate(test)
        tta, _ = self.evaluate(test, tta=True)
        val = None
        if self.data.val is not None:
            val = (self._results.get("val") or self.evaluate(self.data.val))[0]["accuracy"]
        best_note = (
            "best.pt is the epoch with the highest accuracy on the held-out validation split"
            if self.select == "val"
            else "best.pt was selected on the test split itself, so its accuracy is optimistic;"
            " report the final epoch's"
        )
        report = {
            "headline": "test accuracy of the final epoch's weights",
            "test_accuracy": final["accuracy"],
            "test_accuracy_tta": tta["accuracy"],
            "metrics": headline(final),
            # The final weights on the validation split: what a recipe is chosen by.
            "val_accuracy": val,
            "best": {**self.state.best, "note": best_note},
            "epochs": self.cfg.epochs,
            "train_seconds": round(sum(float(r["seconds"]) for r in self.state.history), 2),
            "arch": self.cfg.arch,
            "class_names": self.classes,
            "test": final,
        }
        if self.dist.main:
            title = f"{self.cfg.arch}, final epoch: test accuracy {final['accuracy']:.1%}"
            files = write_reports(final, preds, test.paths, self.run_dir, title=title)
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            kept = {"curves": self.run_dir / "curves.png", "confusion": files["confusion_png"]}
            kept["report"] = files["report"]
            self.run_log.finish(report, {k: f for k, f in kept.items() if f.is_file()})
            m = report["metrics"]
            self.log(
                f"final test accuracy (OA) {m['oa']:.2%}, AA {m['aa']:.2%}, kappa"
                f" {m['kappa']:.4f}, macro-F1 {m['macro_f1']:.4f} (with 8-way TTA OA"
                f" {tta['accuracy']:.2%}); best {self.state.best['split']} accuracy"
                f" {self.state.best['accuracy']:.2%} at epoch {self.state.best['epoch']};"
                f" run folder {self.run_dir}"
            )
            if self.data.train.replaced:
                self.log(
                    f"replaced {self.data.train.replaced} training sample(s) whose file could"
                    " not be read by another image of the same class (files named in the"
                    " warnings)"
                )
        return report
