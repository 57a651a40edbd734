"""Where a run's numbers go. ``metrics.csv`` and ``curves.png`` are always written; ``--log
tensorboard`` or ``--log mlflow`` also sends every epoch's scalars, the final metrics and the
figures there. Those backends are optional extras, imported only when asked for.

The Trainer sees one interface, :class:`RunLog`: :meth:`~RunLog.epoch` after each epoch,
:meth:`~RunLog.finish` with the final report and its figures, :meth:`~RunLog.close` at the end.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from rsscene.errors import UserError

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_aa",
    "test_kappa",
    "val_acc",
    "lr",
    "images_per_s",
    "seconds",
]
# metrics.csv's columns as TensorBoard tags: one chart per quantity, train and test together.
TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "val_acc": "accuracy/val",
    "test_aa": "average_accuracy/test",
    "test_kappa": "kappa/test",
    "lr": "lr",
    "images_per_s": "speed/images_per_s",
    "seconds": "speed/epoch_seconds",
}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric columns of an epoch's row (``val_acc`` is empty without a val split)."""
    return {k: float(row[k]) for k in TAGS if row.get(k) not in (None, "")}


def final_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The run's headline numbers, as logged once at its end."""
    return {f"final_{k}": float(v) for k, v in report["metrics"].items()} | {
        "final_tta_accuracy": float(report["test_accuracy_tta"])
    }


class Backend(Protocol):
    def epoch(self, history: list[dict[str, Any]]) -> None: ...
    def finish(self, report: dict[str, Any], files: dict[str, Path]) -> None: ...
    def close(self) -> None: ...


class CsvLog:
    """``metrics.csv``, rewritten whole from the history after each epoch (``curves.png`` is
    drawn with ``last.pt``: see the Trainer's save interval)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def epoch(self, history: list[dict[str, Any]]) -> None:
        with (self.run_dir / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    def finish(self, report: dict[str, Any], files: dict[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass


def _missing(backend: str, package: str, error: ModuleNotFoundError) -> UserError:
    return UserError(
        f"--log {backend} needs {package} ({error.name} is missing):"
        f' pip install "rsscene[{backend}]"'
    )


class TensorBoardLog:
    """Event files in ``RUN/tensorboard``: scalars per epoch, the figures at the end. A
    resumed run first drops the events of the epochs it will train again."""

    def __init__(self, run_dir: Path, start_epoch: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError as e:
            raise _missing("tensorboard", "tensorboard", e) from None
        folder = run_dir / "tensorboard"
        try:
            # Tried here first: SummaryWriter's own failure leaves its writer thread raising
            # on stderr and names the file as bytes.
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(
                f"--log tensorboard: cannot write to {folder} ({e.strerror or e})"
            ) from None
        self.writer = SummaryWriter(
            str(folder), purge_step=start_epoch + 1 if start_epoch else None
        )
        self.step = start_epoch

    def epoch(self, history: list[dict[str, Any]]) -> None:
        row = history[-1]
        self.step = int(row["epoch"])
        for key, value in scalars(row).items():
            self.writer.add_scalar(TAGS[key], value, self.step)
        self.writer.flush()

    def finish(self, report: dict[str, Any], files: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for key, value in final_metrics(report).items():
            self.writer.add_scalar(key.replace("final_", "final/"), value, self.step)
        for name, path in files.items():
            if path.suffix == ".png":
                pixels = np.asarray(Image.open(path).convert("RGB"))
                self.writer.add_image(name, pixels, self.step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowLog:
    """One MLflow run per rsscene run, in ``MLFLOW_TRACKING_URI`` (default: the file store
    ``./mlruns``) under ``MLFLOW_EXPERIMENT_NAME`` (default ``rsscene``). Its id is kept in
    ``RUN/mlflow.json``, so that a resumed run goes on logging into the same MLflow run."""

    def __init__(self, run_dir: Path, params: dict[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ModuleNotFoundError as e:
            raise _missing("mlflow", "mlflow (mlflow-skinny is enough)", e) from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked to keep it; it is the one store
            # that needs no database or server, and mlflow-skinny has no database driver.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        self.finished = False
        saved = run_dir / "mlflow.json"
        known = json.loads(saved.read_text()) if saved.is_file() else {}
        if known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create(run_dir.name, params)
            saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        # Params cannot change once logged; the settings a resume continues with go in a tag.
        self.client.set_tag(self.run_id, "rsscene.config", json.dumps(params))

    def _create(self, name: str, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rsscene")
        found = self.client.get_experiment_by_name(experiment_name)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment_name)
        run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        values = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items()]
        for i in range(0, len(values), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run_id, params=values[i : i + 100])
        return run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def epoch(self, history: list[dict[str, Any]]) -> None:
        self._metrics(scalars(history[-1]), int(history[-1]["epoch"]))

    def finish(self, report: dict[str, Any], files: dict[str, Path]) -> None:
        self._metrics(final_metrics(report), int(report["epochs"]))
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if not self.finished:  # interrupted or failed; a resume sets it running again
            self.client.set_terminated(self.run_id, "KILLED")


class RunLog:
    """The run's loggers: the CSV files, plus the backend ``kind`` names."""

    def __init__(self, kind: str, run_dir: Path, start_epoch: int, params: dict[str, Any]):
        self.backends: list[Backend] = [CsvLog(run_dir)]
        if kind == "tensorboard":
            self.backends.append(TensorBoardLog(run_dir, start_epoch))
        elif kind == "mlflow":
            self.backends.append(MlflowLog(run_dir, params))

    def epoch(self, history: list[dict[str, Any]]) -> None:
        """After an epoch: ``history`` holds every epoch's row so far, the newest last."""
        for backend in self.backends:
            backend.epoch(history)

    def finish(self, report: dict[str, Any], files: dict[str, Path]) -> None:
        """At the end: the final report (with ``metrics``) and the files to keep with it."""
        for backend in self.backends:
            backend.finish(report, files)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
