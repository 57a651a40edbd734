"""torchrun on the CPU (Gloo): one run folder, exact DDP arithmetic, failures and restarts."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rsscene import checkpoint
from rsscene.cli import main
from rsscene.engine.evaluate import evaluate_checkpoint
from rsscene.engine.recipe import lr_factor
from rsscene.engine.runstate import resume_config
from rsscene.engine.train import Trainer
from rsscene.errors import UserError

TINY = ("--device", "cpu", "--workers", "0", "--img-size", "32", "--eval-size", "32")
TINY += ("--amp", "off")
# One thread per process: the test machines are small, and torchrun would set it anyway.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="finds workers through /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: object, restarts: int = 0) -> list[str]:
    """torchrun with 2 processes of ``rsscene train``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master-port",
        str(free_port()),
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        "-m",
        "rsscene",
        "train",
        *map(str, args),
    ]


def rsscene_train(*args: object) -> list[str]:
    return [sys.executable, "-m", "rsscene", "train", *map(str, args)]


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run to the end; its combined output, after checking it succeeded."""
    done = subprocess.run(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def epochs(run_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def count_test_images(split: Path) -> int:
    return sum(1 for _ in (split / "test").glob("*/*.png"))


# --------------------------------------------------------------------------- workers by rank
def worker(launcher: int, rank: int) -> int:
    """The PID of the torchrun child process with ``RANK=rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or not ours to read
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no rank {rank} process under {launcher}")


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"torchrun ended early: {proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def spawn(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so that it can be killed whole), output piped."""
    return subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_rank_when(cmd: list[str], condition: Callable[[], bool], rank: int = 1) -> tuple[int, str]:
    """Start ``cmd``, SIGKILL its rank ``rank`` once ``condition`` holds; (exit status, output)."""
    proc = spawn(cmd)
    try:
        wait_for(condition, proc)
        os.kill(worker(proc.pid, rank), signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- acceptance
def test_two_processes_write_one_run_that_a_single_process_evaluation_confirms(
    split: Path, tmp_path: Path
) -> None:
    n_test = count_test_images(split)
    assert n_test % 2 == 1, "an odd test set gives the two ranks unequal shards"
    args = (*TINY, "--epochs", "1", "--batch-size", "4", "--optimizer", "sgd")
    output = run(torchrun(split, *args), cwd=tmp_path)

    # The default folder runs/ARCH-TIMESTAMP: one for both ranks, written by rank 0 alone.
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("resnet18-")
    assert output.count("epoch 1/1 train_loss") == 1
    assert "batch 4 (effective 8), lr 0.0125," in output
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["world_size"], config["effective_batch"]) == (2, 8)
    assert config["lr"] == pytest.approx(0.1 * 8 / 64)  # SGD's lr follows the global batch

    report = json.loads((run_dir / "report.json").read_text())
    assert report["test"]["images"] == n_test
    single = evaluate_checkpoint(run_dir / "last.pt", split)
    assert single["confusion"] == report["test"]["confusion"]
    assert single["accuracy"] == report["test_accuracy"]
    assert checkpoint.load(run_dir / "last.pt").world_size == 2


def test_ddp_steps_equal_one_process_with_the_whole_batch(split: Path, tmp_path: Path) -> None:
    exact = ("--augment", "none", "--crop-scale", "1,1", "--jitter", "0", "--deterministic")
    # SGD: Adam divides each update by the gradient's own size, which turns the last-bit
    # differences of another summation order into visible ones for near-zero gradients.
    exact += ("--sync-bn", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--epochs", "1")
    run(torchrun(split, *TINY, *exact, "--batch-size", "4", "--out", tmp_path / "ddp"))
    run(rsscene_train(split, *TINY, *exact, "--batch-size", "8", "--out", tmp_path / "one"))

    ddp = checkpoint.load(tmp_path / "ddp" / "last.pt")
    one = checkpoint.load(tmp_path / "one" / "last.pt")
    assert ddp.model.keys() == one.model.keys()
    for name, a in ddp.model.items():
        b = one.model[name]
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5), name
    (row_ddp,) = ddp.state.history
    (row_one,) = one.state.history
    assert row_ddp["train_loss"] == pytest.approx(row_one["train_loss"], abs=1e-4)
    assert row_ddp["test_acc"] == row_one["test_acc"]


@linux_only
def test_a_killed_rank_ends_the_job_and_one_process_resumes(split: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = torchrun(split, *TINY, "--epochs", "50", "--batch-size", "4", "--out", out)
    status, output = kill_rank_when(cmd, (out / "last.pt").is_file)

    assert status != 0
    assert "Signal 9 (SIGKILL)" in output  # torchrun's summary names the root cause
    assert f"rank 0: training stopped (RuntimeError); the last checkpoint is {out}" in output
    ckpt = checkpoint.load(out / "last.pt")
    done = ckpt.next_epoch
    assert done >= 1 and ckpt.next_step == 0

    run(rsscene_train("--resume", out, "--epochs", done + 1, *TINY))
    assert epochs(out) == list(range(1, done + 2))
    resumed = checkpoint.load(out / "last.pt")
    # The same effective batch as the 2 x 4 of the torchrun job, so the same lr and steps.
    assert (resumed.config["batch_size"], resumed.world_size) == (8, 1)


@linux_only
def test_torchrun_restarts_continue_with_auto_resume(split: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A single process starts the run, so the torchrun job continues a single-process run.
    run(rsscene_train(split, *TINY, "--epochs", "1", "--batch-size", "8", "--out", out))
    first = (out / "last.pt").stat().st_mtime_ns

    # Epochs to spare after the kill: last.pt is written in the background while the next
    # epoch trains, so the job may be an epoch further on when the kill lands.
    cmd = torchrun(split, *TINY, "--epochs", "6", "--out", out, "--auto-resume", restarts=1)
    status, output = kill_rank_when(cmd, lambda: (out / "last.pt").stat().st_mtime_ns != first)

    assert status == 0, output[-4000:]
    resumed = [int(e) for e in re.findall(r"resuming at epoch (\d+)", output)]
    assert resumed[0] == 2 and len(resumed) == 2 and resumed[1] >= 3, output[-4000:]
    assert epochs(out) == [1, 2, 3, 4, 5, 6]
    final = checkpoint.load(out / "last.pt")
    assert (final.config["batch_size"], final.world_size) == (4, 2)
    assert (out / "report.json").is_file()


# --------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def one_epoch(split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run at batch 8, started by --auto-resume in an empty folder."""
    out = tmp_path_factory.mktemp("auto") / "run"
    args = ["train", str(split), *TINY, "--epochs", "1", "--batch-size", "8", "--out", str(out)]
    assert main([*args, "--deterministic", "--auto-resume"]) == 0
    return out


def test_auto_resume_continues_the_run_in_out(one_epoch: Path, split: Path, tmp_path: Path) -> None:
    out = shutil.copytree(one_epoch, tmp_path / "run")
    before = (out / "metrics.csv").read_text().splitlines()
    args = ["train", str(split), *TINY, "--epochs", "2", "--out", str(out), "--auto-resume"]
    assert main(args) == 0
    after = (out / "metrics.csv").read_text().splitlines()
    assert after[:2] == before and epochs(out) == [1, 2]


def test_auto_resume_needs_out(split: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(split), "--auto-resume"]) == 2
    assert "--auto-resume needs --out" in capsys.readouterr().err


def test_another_effective_batch_resumes_the_schedule_at_the_same_epoch(
    one_epoch: Path, split: Path
) -> None:
    cfg = resume_config(one_epoch, {"batch_size": 4, "epochs": 2})
    trainer = Trainer.from_config(cfg, resume=one_epoch, log=lambda *_: None)
    steps = trainer.steps_per_epoch
    assert trainer.scheduler.last_epoch == steps
    warmup = round(cfg.warmup_epochs * steps)
    expected = cfg.lr * lr_factor(steps, 2 * steps, warmup, cfg.schedule)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_another_effective_batch_cannot_resume_mid_epoch(one_epoch: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.load(one_epoch / "last.pt")
    checkpoint.save(dataclasses.replace(ckpt, next_epoch=0, next_step=1), tmp_path / "last.pt")
    cfg = resume_config(tmp_path, {"batch_size": 4})
    with pytest.raises(UserError, match="mid-epoch with an effective batch of 8"):
        Trainer.from_config(cfg, resume=tmp_path, log=lambda *_: None)


def test_resume_keeps_the_effective_batch_when_the_process_count_changes(
    one_epoch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = checkpoint.load(one_epoch / "last.pt")
    checkpoint.save(dataclasses.replace(ckpt, world_size=2), tmp_path / "last.pt")  # 2 x 8 = 16
    assert resume_config(tmp_path, {}).batch_size == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_config(tmp_path, {}).batch_size == 4
    assert resume_config(tmp_path, {"batch_size": 2}).batch_size == 2
    monkeypatch.setenv("WORLD_SIZE", "3")  # 16 does not divide: the per-process batch stays
    assert resume_config(tmp_path, {}).batch_size == 8


@pytest.mark.slow
@linux_only
def test_sigterm_to_torchrun_saves_and_prints_the_resume_command(
    split: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = torchrun(split, *TINY, "--epochs", "50", "--batch-size", "2", "--out", out)
    proc = spawn(cmd)
    try:
        wait_for((out / "last.pt").is_file, proc)  # epoch 1 saved: now in epoch 2 or later
        saved = checkpoint.load(out / "last.pt").next_epoch
        proc.send_signal(signal.SIGTERM)  # to torchrun itself, as a scheduler would
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output[-4000:]
    assert f"Resume with: rsscene train --resume {out}" in output, output[-4000:]
    ckpt = checkpoint.load(out / "last.pt")
    # 35 images in global batches of 4: 9 steps an epoch, so the signal lands mid-epoch.
    assert (ckpt.next_epoch, ckpt.next_step) > (saved, 0), output[-4000:]
    run(rsscene_train("--resume", out, "--epochs", ckpt.next_epoch + 1, *TINY))
    assert epochs(out)[-1] == ckpt.next_epoch + 1
