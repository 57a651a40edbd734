"""The :class:`Trainer`: given a model, data and an optimizer, it steps, evaluates after each
epoch (or every ``eval_every``) and says when an epoch ends; its
:class:`~rsscene.engine.recorder.Recorder` owns the run folder.

An epoch is a loop of steps with one sync point every few steps (the host reads the device
only there, and every rank stops or raises at the same step), then an end of epoch
(evaluate, choose best, and hand the epoch's state to the recorder, which writes it while the
next epoch trains). Randomness in the loop comes only from generators seeded by (seed, epoch,
step, rank), so a run resumed from any step reproduces the uninterrupted one.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rsscene import config
from rsscene.checkpoint import Checkpoint
from rsscene.config import TrainConfig
from rsscene.data.datasets import Batch, BatchLoader, TrainData
from rsscene.device import amp_dtype, autocast, select_device, set_determinism
from rsscene.engine import distributed, recipe, runstate
from rsscene.engine.evaluate import Predictions, predict, report_from_predictions
from rsscene.engine.recorder import Recorder, new_run_dir
from rsscene.errors import UserError


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

    def sums(self, dist: distributed.Dist, part: dict[str, float]) -> dict[str, float]:
        """The epoch's training loss sum, correct and seen counts over all ranks so far, plus
        ``part``: the sums an interrupted run saved for the start of this epoch."""
        local = torch.stack(
            [self.loss_sum, self.correct.double(), self.loss_sum.new_tensor(self.seen)]
        )
        totals = dist.all_sum(local).tolist()
        return {
            name: total + part.get(name, 0)
            for name, total in zip(("loss_sum", "correct", "seen"), totals, strict=True)
        }


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
        if not config.is_resolved(cfg, self.device.type, self.dist.world):
            cfg = config.resolve(cfg, self.device.type, world=self.dist.world)
        self.cfg = cfg
        self.amp = amp_dtype(cfg.amp, self.device)
        self.data = data
        self.classes = data.classes
        self.fingerprint = runstate.data_fingerprint(self.classes, data.train.images)
        self.select = "val" if data.val is not None else "test"
        # What inference needs to feed the model as it was trained, as the data built it.
        self.preprocess = runstate.checked_preprocess(data, cfg)
        weights = recipe.class_weights(cfg.class_weights, self.classes, data.train.labels)
        self.loss_weights = None if weights is None else weights.to(self.device)
        self.net, self.ema, self.forward = recipe.place_model(model, cfg, self.device, self.dist)
        self.optimizer = optimizer or recipe.make_optimizer(cfg, self.net)
        self.global_batch = cfg.batch_size * self.dist.world
        self.steps_per_epoch = recipe.steps_per_epoch(len(data.train), cfg.batch_size, self.dist)
        self.scheduler = recipe.make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )
        self.state = runstate.RunState()
        self.recorder = Recorder(
            Path(run_dir) if run_dir else new_run_dir(cfg, self.dist), cfg, log
        )
        self.phases = runstate.Phases(self.device)
        self.stop_signal: int | None = None
        self._owns_process_group = False
        self._results: dict[str, tuple[dict[str, Any], Predictions]] = {}

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        resume: str | Path | None = None,
        log: Any = print,
        force: bool = False,
    ) -> Trainer:
        """Every part from ``cfg``, as ``rsscene train`` builds them. A ``cfg.out`` that holds
        another run is refused unless ``resume`` continues it or ``force`` replaces it."""
        return _build(cfg, resume, log, force)

    # ----------------------------------------------------------------------- set-up
    def restore(self, ckpt: Checkpoint, source: str | Path = "the checkpoint") -> None:
        """Continue from ``ckpt`` (read from ``source``), once it is checked to be a run of
        this model on this data: weights, optimizer, schedule, scaler, EMA, progress, RNG."""
        runstate.check_resume(ckpt, self.cfg, self.classes, self.fingerprint, source)
        st = ckpt.state
        self.net.load_state_dict(st.model or ckpt.model)
        for note in runstate.load_optimizer(ckpt, self.cfg, self.optimizer, self.scheduler):
            if self.dist.main:
                self.log(note)
        for part, saved in [(self.scaler, st.scaler), (self.ema, st.ema)]:
            if part is not None and saved:
                part.load_state_dict(saved)
        if runstate.schedule_moved(ckpt, self.cfg.batch_size, self.dist.world):
            # Steps have another size now: continue the schedule at the same epoch.
            self.scheduler.last_epoch = ckpt.next_epoch * self.steps_per_epoch - 1
            self.scheduler.step()
        self.state = runstate.RunState.from_checkpoint(ckpt)
        self.recorder.start_epoch = self.state.next_epoch
        torch.set_rng_state(st.rng)
        where = self.dist.gather((self.state.next_epoch, self.state.next_step))
        if len(set(where)) > 1:
            raise UserError(
                f"the processes would resume at different (epoch, step): {where} by rank; all"
                f" nodes must read the same {self.recorder.last} (a shared filesystem)"
            )

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir

    @property
    def writes(self) -> runstate.BackgroundWrites:
        """The recorder's background writes: a loop of your own waits on them before reading
        the run's files."""
        return self.recorder.writes

    def checkpoint(self, resumable: bool = True) -> Checkpoint:
        """The run as a checkpoint: weights and what inference needs, plus, when
        ``resumable``, the optimizer, schedule and progress that ``--resume`` continues from."""
        state = None
        if resumable:
            state = self.state.training_state(
                self.optimizer, self.scheduler, self.scaler, self.net, self.ema
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

    # ----------------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate the final weights; returns the report.

        SIGINT/SIGTERM stop after the current step with ``last.pt`` saved
        (:class:`~rsscene.errors.Interrupted`).
        """
        if self.data.test is None:
            raise UserError("training needs held-out test images (TrainData.test)")
        if self.dist.main:
            where = (self.state.next_epoch, self.state.next_step)
            record = runstate.run_record(
                self.cfg, self.classes, self.device, self.amp, self.dist, self.loss_weights
            )
            self.recorder.start(record, self.data, self.dist.enabled, where)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for epoch in range(self.state.next_epoch, self.cfg.epochs):
                self.end_epoch(epoch, self.train_epoch(epoch))
            with self.phases.timed("writes"):
                self.writes.wait()
            return self._finish()
        except Exception as e:
            self.recorder.settle()
            if self.dist.enabled:
                self.recorder.say_where_to_continue(e, self.dist.rank)
            raise
        finally:
            try:
                self.recorder.close()
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
                if self._owns_process_group:
                    distributed.teardown()

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
        """One optimisation step on ``batch``; returns its (loss, logits), detached. Under
        CUDA graphs (``--compile-mode`` reduce-overhead or max-autotune on a GPU) the next
        step's replay overwrites these logits: read them first."""
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

    def train_epoch(self, epoch: int, batches: list[list[int]] | None = None) -> dict[str, float]:
        """The steps of one epoch over ``batches`` (default: the epoch's permutation, from
        the saved step when resuming). Returns the epoch's loss sum, correct and seen counts
        over all ranks, its seconds, and this session's images/s."""
        batches = self.epoch_batches(epoch) if batches is None else batches
        start = self.state.next_step if epoch == self.state.next_epoch else 0
        # The sums saved by an interrupted run are over all ranks; counted once, at the end.
        part = self.state.partial if start else {}
        tally = _Tally(self.device)
        self.augment = recipe.make_augment(
            self.cfg, self.preprocess, recipe.train_size(self.cfg, epoch)
        )
        recipe.train_mode(self.forward, self.net, self.cfg.freeze_backbone)
        shown = self.dist.main and sys.stderr.isatty()
        desc = f"epoch {epoch + 1}/{self.cfg.epochs}"
        bar = tqdm(total=len(batches), initial=start, desc=desc, disable=not shown, leave=False)
        t0 = time.perf_counter()
        for step, batch in enumerate(self.data.train.batches(batches[start:]), start=start):
            # On a GPU the augmentation's draws are made there, from a generator of its own.
            g = torch.Generator(self.device if self.device.type == "cuda" else "cpu")
            g.manual_seed(recipe.step_seed(self.cfg.seed, epoch, step, self.dist.rank))
            loss, logits = self.step(batch, g)
            tally.add(step, loss, logits, batch.labels)
            bar.update(1)
            # On a GPU the host reads the device only every 20 steps and at the end.
            if self.device.type == "cpu" or step % 20 == 19 or step == len(batches) - 1:
                self._sync(epoch, step, tally, bar, part, t0)
        bar.close()
        seconds = time.perf_counter() - t0
        return {
            **tally.sums(self.dist, part),
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
            raise self.recorder.diverged(epoch, bad)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{tally.loss_sum.item() / tally.seen:.3f}",
                acc=f"{tally.correct.item() / tally.seen:.3f}",
                img_s=f"{tally.seen / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
        if stop:
            self.state.next_epoch, self.state.next_step = epoch, step + 1
            self.state.partial = {
                **tally.sums(self.dist, part),
                "seconds": part.get("seconds", 0.0) + time.perf_counter() - t0,
            }
            self._interrupt(epoch, step)

    def _interrupt(self, epoch: int, step: int) -> None:
        signum = self.stop_signal or signal.SIGINT
        if self.dist.main:
            self.recorder.save_now(self.checkpoint())  # metrics.csv holds every finished epoch
        self.dist.barrier()
        raise self.recorder.interrupted(signum, epoch, step)

    def end_epoch(self, epoch: int, sums: dict[str, float]) -> dict[str, Any]:
        """Evaluate (every ``eval_every`` epochs and at the last), choose best, and hand the
        epoch's row and state to the recorder."""
        self.dist.sync_buffers(self.net, *([self.ema] if self.ema is not None else []))
        final = epoch + 1 == self.cfg.epochs
        evaluated = (epoch + 1) % self.cfg.eval_every == 0 or final
        held_out = self.data.held_out.items() if evaluated else ()
        with self.phases.timed("evaluation"):
            self._results = {name: self.evaluate(loader) for name, loader in held_out}
        row = runstate.epoch_row(epoch, sums, self._results, self.scheduler.get_last_lr()[0])
        self.state.history.append(row)
        self.state.next_epoch, self.state.next_step, self.state.partial = epoch + 1, 0, {}
        selected = self._results[self.select][0]["accuracy"] if evaluated else None
        improved = evaluated and (not self.state.best or selected > self.state.best["accuracy"])
        if improved:
            self.state.best = {"epoch": epoch + 1, "accuracy": selected, "split": self.select}
        if self.dist.main:
            size = None if self.cfg.start_size is None else recipe.train_size(self.cfg, epoch)
            with self.phases.timed("writes"):
                self.recorder.epoch(self.checkpoint(), improved, final, size)
        self.dist.barrier()
        return row

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
        """The final weights' test report (with 8-way TTA), handed to the recorder."""
        test = self.data.test
        # The last epoch's evaluation already saw these weights; a resumed finished run did not.
        with self.phases.timed("evaluation"):
            final, preds = self._results.get("test") or self.evaluate(test)
            val = None
            if self.data.val is not None:
                val = (self._results.get("val") or self.evaluate(self.data.val))[0]["accuracy"]
        with self.phases.timed("tta"):
            tta, _ = self.evaluate(test, tta=True)
        report = runstate.final_report(
            self.cfg, self.state, self.classes, final, tta, val, self.phases
        )
        if self.dist.main:
            self.recorder.finish(report, preds, test.paths)
            if self.data.train.replaced:
                self.log(
                    f"replaced {self.data.train.replaced} training sample(s) whose file could"
                    " not be read by another image of the same class (files named in the"
                    " warnings)"
                )
        return report


def _build(
    cfg: TrainConfig, resume: str | Path | None = None, log: Any = print, force: bool = False
) -> Trainer:
    """Every part from ``cfg``: the settings resolved for the device (once, here), the split in
    ``cfg.data``, the model (with ``--weights``), the recipe's optimizer; under torchrun, the
    process group. With ``resume`` (a run folder or its ``last.pt``) the run continues where
    that checkpoint stopped."""
    started = time.perf_counter()
    device = select_device(cfg.device)
    dist = distributed.setup(device.type)
    try:
        device = dist.device(device)
        cfg = config.resolve(cfg, device.type, world=dist.world)
        if resume is None and cfg.out and dist.main:
            runstate.claim_run_folder(Path(cfg.out), force)
        ckpt = runstate.load_resume(resume) if resume else None
        set_determinism(cfg.deterministic, device)
        torch.manual_seed(cfg.seed)
        cache_started = time.perf_counter()
        data = recipe.split_data(cfg, device, dist.main)
        cache = time.perf_counter() - cache_started
        # A resumed run takes its weights from the checkpoint, not from where it started.
        model, note = recipe.build_model(
            cfg, len(data.classes), ckpt is None, data.preprocess.channels
        )
        if note and dist.main:
            log(note)
        run_dir = runstate.run_folder(resume) if resume else None
        trainer = Trainer(cfg, model, data, device=device, dist=dist, run_dir=run_dir, log=log)
        trainer._owns_process_group = dist.enabled
        if ckpt is not None:
            trainer.restore(ckpt, resume)
        trainer.phases.seconds["cache"] = cache
        trainer.phases.seconds["start-up"] = time.perf_counter() - started - cache
        return trainer
    except BaseException:
        distributed.teardown()
        raise
