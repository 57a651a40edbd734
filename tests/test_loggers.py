"""--log tensorboard and --log mlflow: each backend's own reader finds the run, resumed too."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from rsscene.engine.loggers import RunLog
from rsscene.engine.runstate import resume_config
from rsscene.engine.train import Trainer
from rsscene.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"log": lambda *_: None}


def train_then_resume(split: Path, run: Path, log: str) -> None:
    """One epoch, then a resume that trains a second: the backend must hold each once."""
    Trainer.from_config(tiny_config(split, run, epochs=1, log=log), **QUIET).fit()
    Trainer.from_config(resume_config(run, {"epochs": 2}), resume=run, **QUIET).fit()


def test_tensorboards_event_reader_reads_the_run(split: Path, tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="--log tensorboard needs the tensorboard extra",
    )
    run = tmp_path / "run"
    train_then_resume(split, run, "tensorboard")
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for key, tag in (("test_acc", "accuracy/test"), ("train_loss", "loss/train")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(int(r["epoch"]), pytest.approx(float(r[key]))) for r in rows]
    assert {"kappa/test", "average_accuracy/test", "lr", "final/oa"} <= set(
        events.Tags()["scalars"]
    )
    assert {"curves", "confusion"} <= set(events.Tags()["images"])


def test_mlflows_file_store_holds_the_run(split: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="--log mlflow needs the mlflow extra")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "aid5-tests")
    run = tmp_path / "run"
    train_then_resume(split, run, "mlflow")

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("aid5-tests")
    (found,) = client.search_runs([experiment.experiment_id])  # the resume logged into it
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    # Params are fixed at the start; the tag holds the settings the resume continued with.
    assert found.data.params["arch"] == "resnet18" and found.data.params["epochs"] == "1"
    assert json.loads(found.data.tags["rsscene.config"])["epochs"] == 2
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    history = client.get_metric_history(found.info.run_id, "test_acc")
    assert sorted((m.step, m.value) for m in history) == [
        (int(r["epoch"]), pytest.approx(float(r["test_acc"]))) for r in rows
    ]
    for key in ("final_oa", "final_aa", "final_kappa", "final_macro_f1"):
        assert key in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"curves.png", "confusion.png", "report.json"} <= artifacts


def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    for name in ("mlflow", "mlflow.tracking"):  # as if never installed, even once imported
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r'--log mlflow needs .* pip install "rsscene\[mlflow\]"'):
        RunLog("mlflow", tmp_path, 0, {})
