"""rsscene bench: repeated splits at a training ratio, end to end, continued after a stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from rsscene import checkpoint
from rsscene.cli import main
from rsscene.engine.train import Trainer
from rsscene.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--epochs", "1", "--batch-size", "8", "--img-size", "32", "--device", "cpu"]
TINY += ["--workers", "0", "--amp", "off", "--deterministic"]


def bench(*argv: object) -> int:
    return main(["bench", *map(str, argv)])


def count_trainings(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    started: list[object] = []
    original = Trainer.from_config.__func__

    def counted(cls, cfg, resume=None, log=print):
        started.append(cfg.seed)
        return original(cls, cfg, resume, log)

    monkeypatch.setattr(Trainer, "from_config", classmethod(counted))
    return started


@pytest.fixture(scope="module")
def two_repeats(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "b"
    assert bench(scenes, "--train-ratio", "0.5", "--repeats", "2", "--out", out, *TINY) == 0
    return out


def test_bench_splits_again_per_repeat_and_writes_the_table(two_repeats: Path) -> None:
    record = json.loads((two_repeats / "bench.json").read_text())
    repeats = record["repeats"]
    assert [r["seed"] for r in repeats] == [0, 1]
    assert all(r["images"] == {"train": 25, "test": 25} for r in repeats)  # 50% of 10 a class
    trained = [
        {p.name for p in (two_repeats / f"repeat-{i}" / "split" / "train").glob("*/*")}
        for i in (0, 1)
    ]
    assert trained[0] != trained[1]  # another random split for each repeat
    for i, r in enumerate(repeats):
        report = json.loads((two_repeats / f"repeat-{i}" / "run" / "report.json").read_text())
        assert r["oa"] == report["test_accuracy"] and r["kappa"] == report["test"]["kappa"]
        assert r["aa"] == report["test"]["average_accuracy"] and r["seconds"] > 0
    oa = [r["oa"] for r in repeats]
    assert record["summary"]["oa"]["mean"] == pytest.approx(sum(oa) / 2)
    assert record["summary"]["oa"]["std"] == pytest.approx(abs(oa[0] - oa[1]) / 2**0.5)
    table = (two_repeats / "bench.md").read_text()
    assert (
        "| repeat | seed | train / test images | OA | AA | kappa | macro-F1 | wall time |" in table
    )
    assert f"| **mean ± std** | | | {100 * sum(oa) / 2:.1f} ± " in table


def test_a_bench_run_again_skips_its_finished_repeats(
    two_repeats: Path, scenes: Path, monkeypatch, capsys
) -> None:
    before = (two_repeats / "repeat-0" / "result.json").read_text()
    started = count_trainings(monkeypatch)
    assert bench(scenes, "--train-ratio", "0.5", "--repeats", "3", "--out", two_repeats, *TINY) == 0
    assert started == [2]  # only the new repeat trained
    assert (two_repeats / "repeat-0" / "result.json").read_text() == before
    assert "repeat 1/3: finished earlier, skipped" in capsys.readouterr().out
    assert len(json.loads((two_repeats / "bench.json").read_text())["repeats"]) == 3
    # Other settings would mix two protocols in one table: refused, in one line.
    argv = [scenes, "--train-ratio", "0.5", "--repeats", "3", "--out", two_repeats, *TINY]
    assert bench(*argv, "--lr", "0.01") == 2
    assert "holds a bench run with other settings (lr differ)" in capsys.readouterr().err
    # A bench written before a setting existed ran at its default: it continues.
    record = json.loads((two_repeats / "bench.json").read_text())
    del record["protocol"]["settings"]["eval_every"]
    (two_repeats / "bench.json").write_text(json.dumps(record))
    assert bench(*argv) == 0


def test_a_repeat_stopped_mid_training_resumes_from_its_checkpoint(
    scenes: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    argv = [scenes, "--train-ratio", "0.5", "--repeats", "1", "--out", tmp_path, *TINY]
    argv += ["--epochs", "2"]
    original = Trainer.train_epoch

    def sigterm_in_epoch_2(self, epoch, batches=None):
        if epoch == 1:
            self.stop_signal = signal.SIGTERM  # as the handler does: stop after this step
        return original(self, epoch, batches)

    monkeypatch.setattr(Trainer, "train_epoch", sigterm_in_epoch_2)
    assert bench(*argv) == 128 + signal.SIGTERM
    assert "run the same command again" in capsys.readouterr().err
    run = tmp_path / "repeat-0" / "run"
    assert checkpoint.load(run / "last.pt").next_epoch == 1
    assert not (tmp_path / "repeat-0" / "result.json").exists()

    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert bench(*argv) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    history = checkpoint.load(run / "last.pt").state.history
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((tmp_path / "repeat-0" / "result.json").read_text())["seconds"] > 0


def test_bench_needs_a_ratio_for_a_raw_dataset(scenes: Path, tmp_path: Path, capsys) -> None:
    assert bench(scenes, "--out", tmp_path / "b") == 2
    assert "give --train-ratio" in capsys.readouterr().err


def test_a_bench_refuses_changed_data_and_a_mistake_leaves_nothing_to_undo(
    scenes: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    out = tmp_path / "b"
    argv = [data, "--train-ratio", "0.5", "--repeats", "1", "--out", out, *TINY]
    # A setting only the device decides, refused before anything is written.
    assert bench(*argv, "--start-size", "64") == 2
    assert "--start-size 64 is above --img-size 32" in capsys.readouterr().err
    assert not out.exists()
    assert bench(*argv) == 0
    # An image added to a class: the repeats would average two datasets; refused.
    first = next((data / "airplane").iterdir())
    shutil.copy(first, data / "airplane" / f"copy{first.suffix}")
    assert bench(*argv[:4], "2", *argv[5:]) == 2
    assert "other settings (contents differ)" in capsys.readouterr().err
    assert len(json.loads((out / "bench.json").read_text())["repeats"]) == 1


def test_a_bench_refused_after_its_start_is_corrected_by_the_next_command(
    scenes: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "b"
    argv = [scenes, "--train-ratio", "0.5", "--repeats", "1", "--out", out, *TINY]

    def refused(*args, **kwargs):
        raise UserError("--class-weights w.yaml: the weight of 'ship' is not a positive number")

    monkeypatch.setattr(Trainer, "from_config", refused)
    assert bench(*argv, "--lr", "0.5") == 2
    assert (out / "bench.json").is_file()  # written before the mistake was found
    monkeypatch.undo()
    assert bench(*argv) == 0  # other settings, but nothing had trained: started afresh
    record = json.loads((out / "bench.json").read_text())
    assert record["protocol"]["settings"]["lr"] is None and len(record["repeats"]) == 1
