"""The run folder, written by rank 0 from finished records::

    RUN/config.json   every resolved setting, class names, versions
    RUN/metrics.csv   one row per epoch (also sent to TensorBoard or MLflow with --log)
    RUN/last.pt       the latest state (weights, optimizer, schedule, progress)
    RUN/best.pt       the weights of the epoch with the best accuracy on the selection split
    RUN/curves.png    loss and accuracy per epoch
    RUN/report.json   the final evaluation (plus confusion.json/.png, misclassified.csv)

Each epoch's row goes to metrics.csv and ``--log``'s backend at once; last.pt, best.pt and the
curves at most every ``save_interval`` seconds (after the first and the last epoch too), and
whenever the run stops (:meth:`Recorder.settle`). The files are written by one background
thread while the next epoch trains.
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

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint
from rsscene.config import TrainConfig
from rsscene.data.datasets import TrainData
from rsscene.engine import loggers
from rsscene.engine.distributed import Dist
from rsscene.engine.evaluate import Predictions, write_reports
from rsscene.engine.runstate import BackgroundWrites
from rsscene.errors import Diverged, Interrupted, UserError


def new_run_dir(cfg: TrainConfig, dist: Dist) -> Path:
    """``cfg.out``, or ``runs/ARCH-TIMESTAMP`` named by rank 0's clock (the ranks' own
    could read different seconds)."""
    if cfg.out:
        return Path(cfg.out)
    stamp = dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.arch}-{stamp}"


def epoch_line(row: dict[str, Any], epochs: int, size: int | None = None) -> str:
    """An epoch's row as the log says it."""
    px = "" if size is None else f" {size}px"
    held = "".join(
        f" {key} {row[key]:.4f}" for key in ("test_loss", "test_acc", "val_acc") if row[key] != ""
    )
    return (
        f"epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.4f}"
        f" train_acc {row['train_acc']:.4f}{held} lr {row['lr']}{px}"
        f" {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s"
    )


class Recorder:
    """Owns ``run_dir``: config.json, metrics.csv and the loggers, last.pt/best.pt and the
    save interval, the curves, and the final report. The Trainer hands it finished records
    (the epoch's :class:`~rsscene.checkpoint.Checkpoint`, the final report) and says when an
    epoch ends; it decides what is written when."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, log: Callable[[str], Any] = print) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.log = log
        self.writes = BackgroundWrites()
        self.start_epoch = 0
        self._log: loggers.RunLog | None = None
        # The newest epoch-end state and best weights not yet on disk, and when last.pt was
        # last handed to the writes.
        self._unsaved: Checkpoint | None = None
        self._unsaved_best: Checkpoint | None = None
        self._saved_at: float | None = None

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def run_log(self) -> loggers.RunLog:
        """Where each epoch's row goes: metrics.csv, curves.png and ``--log``'s backend,
        opened at first use, after a resume has set the epoch to continue from."""
        if self._log is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = loggers.RunLog(
                self.cfg.log, self.run_dir, self.start_epoch, self.cfg.to_dict()
            )
        return self._log

    def start(
        self,
        record: dict[str, Any],
        data: TrainData,
        distributed: bool = False,
        resume_at: tuple[int, int] = (0, 0),
    ) -> None:
        """Write config.json (``record``: the resolved settings and what the run was given),
        say what is trained on what, and open the log now, so that a missing TensorBoard or
        MLflow is said before an epoch is spent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        r = record
        train_px = f"{r['img_size']}px"
        if r["start_size"] is not None:
            train_px = f"{r['start_size']}->{r['img_size']}px"
        self.log(
            f"{r['arch']} ({r['variant']}) on {r['device']}"
            f"{' x' + str(r['world_size']) if distributed else ''},"
            f" {len(data.train)} train / {len(data.test)} test images,"
            f" {len(data.classes)} classes, {r['epochs']} epochs, batch {r['batch_size']}"
            f" (effective {r['effective_batch']}), lr {r['lr']:g}, {train_px} train /"
            f" {r['eval_size']}px test, amp {r['amp']}, cache {data.train.mode} -> {self.run_dir}"
        )
        for name, loader in [("train", data.train), *data.held_out.items()]:
            if loader.skipped:
                self.log(f"{name}: skipped {len(loader.skipped)} unreadable file(s):")
                for path, reason in loader.skipped:
                    self.log(f"  {path}: {reason}")
        if any(resume_at):
            self.log(f"resuming at epoch {resume_at[0] + 1}, step {resume_at[1] + 1}")
        _ = self.run_log

    def epoch(
        self, state: Checkpoint, improved: bool, final: bool, size: int | None = None
    ) -> None:
        """Hand the epoch's row (metrics.csv, ``--log``'s backend) to the background writes,
        keep a CPU copy of ``state``, since the next steps change the weights and AdamW's
        moments in place, and say the row (with the epoch's training ``size``, if it varies).
        last.pt, best.pt and curves.png are written from that copy after this process's
        first epoch, once ``save_interval`` seconds have passed since they last were, at the
        ``final`` epoch, and when the run stops (:meth:`settle`)."""
        self.writes.wait()  # one copy at a time, and the previous epoch's files are complete
        self._unsaved = checkpoint.on_cpu(state)
        if improved:
            # best.pt holds weights only: a third of the size, and a run is resumed from last.pt.
            self._unsaved_best = dataclasses.replace(self._unsaved, state=None)
        history, run_log, files = self._unsaved.state.history, self.run_log, None
        now = time.monotonic()
        if self._saved_at is None or now - self._saved_at >= self.cfg.save_interval or final:
            files, self._saved_at = self._take_unsaved(), now

        def write() -> None:
            run_log.epoch(history)
            if files is not None:
                files()

        self.writes.submit(write)
        self.log(epoch_line(history[-1], self.cfg.epochs, size))

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

    def settle(self) -> None:
        """Finish the background writes and write what the save interval held back, while
        another error stops the run: that error is the one raised, and a failed write is said
        alongside it."""
        try:
            self.writes.wait()
            self._take_unsaved()()
        except Exception as e:
            self.log(f"also: the last epoch's files were not all written ({e})")

    def save_now(self, state: Checkpoint) -> Path:
        """last.pt at once (a run stopped mid-epoch), after the held-back files."""
        self.settle()
        return checkpoint.save(state, self.last)

    def diverged(self, epoch: int, step: int) -> Diverged:
        """The error of a loss gone NaN/Inf, once the files held back are written."""
        self.settle()
        kept = (
            f"the last good checkpoint is {self.last}"
            if self.last.exists()
            else "no checkpoint was saved"
        )
        return Diverged(
            f"loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}; training stopped and"
            f" {kept}. Try a lower --lr or --max-grad-norm 1"
        )

    def interrupted(self, signum: int, epoch: int, step: int) -> Interrupted:
        """The error of a run stopped by ``signum``, last.pt saved."""
        return Interrupted(
            f"{signal.Signals(signum).name}: stopped after epoch {epoch + 1} step {step + 1};"
            f" saved {self.last}. Resume with: rsscene train --resume {self.run_dir}",
            signum,
        )

    def say_where_to_continue(self, error: Exception, rank: int) -> None:
        """Under torchrun another process's crash surfaces as a communication error (torchrun
        then names the root cause): say where the run can continue from."""
        if not isinstance(error, UserError | Interrupted) and self.last.is_file():
            print(
                f"rank {rank}: training stopped ({type(error).__name__}); the last"
                f" checkpoint is {self.last}: continue with --resume {self.run_dir}",
                file=sys.stderr,
            )

    def finish(self, report: dict[str, Any], preds: Predictions, paths: list[Path]) -> None:
        """report.json, the test split's reports and figures, the log's final entry, and the
        final line."""
        final = report["test"]
        title = f"{report['arch']}, final epoch: test accuracy {final['accuracy']:.1%}"
        files = write_reports(final, preds, paths, self.run_dir, title=title)
        (self.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        kept = {"curves": self.run_dir / "curves.png", "confusion": files["confusion_png"]}
        kept["report"] = files["report"]
        self.run_log.finish(report, {k: f for k, f in kept.items() if f.is_file()})
        m, best = report["metrics"], report["best"]
        self.log(
            f"final test accuracy (OA) {m['oa']:.2%}, AA {m['aa']:.2%}, kappa"
            f" {m['kappa']:.4f}, macro-F1 {m['macro_f1']:.4f} (with 8-way TTA OA"
            f" {report['test_accuracy_tta']:.2%}); best {best['split']} accuracy"
            f" {best['accuracy']:.2%} at epoch {best['epoch']}; run folder {self.run_dir}"
        )
        phases = ", ".join(f"{k} {v:.1f}" for k, v in report["seconds_by_phase"].items())
        self.log(f"seconds by phase: {phases}")

    def close(self) -> None:
        """Wait for the writes (also after a second Ctrl-C), then close the log."""
        try:
            self.writes.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
