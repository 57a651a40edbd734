"""Interruptions, numerical faults, untrusted files and user mistakes never lose work or crash."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from rsscene import checkpoint
from rsscene.cli import main
from rsscene.data.prepare import MANIFEST_NAME, prepare
from rsscene.data.transforms import Augment
from rsscene.errors import UserError
from test_images import CLASSES, encode, noise, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--epochs", "1", "--batch-size", "8", "--img-size", "32", "--eval-size", "32"]
TINY += ["--device", "cpu", "--workers", "0", "--amp", "off"]


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status (usage errors included) and stderr of ``rsscene ARGV``, run in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- SIGTERM and resume
def rsscene(*argv: object, **kwargs) -> subprocess.Popen:
    # One thread in every run: the thread count changes float sums, so runs compare only alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rsscene", *map(str, argv)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs
    )


@pytest.mark.parametrize(
    "imbalance",
    [[], ["--sampler", "balanced", "--class-weights", "balanced"]],
    ids=["uniform", "balanced-sampler-and-weights"],
)
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(
    split: Path, tmp_path: Path, capsys, imbalance: list[str]
) -> None:
    # 35 training images in batches of 8: 4 steps an epoch.
    flags = [*TINY, "--epochs", "2", "--deterministic", "--seed", "3", *imbalance]
    stopped = rsscene("train", split, *flags, "--out", tmp_path / "stopped")
    log: list[str] = []

    def stop_in_epoch_2() -> None:
        for line in stopped.stdout:
            log.append(line)
            if line.startswith("epoch 1/2"):
                stopped.send_signal(signal.SIGTERM)  # handled after epoch 2's current step

    watcher = threading.Thread(target=stop_in_epoch_2)
    watcher.start()
    # The reference runs here meanwhile, on one thread like the subprocess.
    assert cli(["train", split, *flags, "--out", tmp_path / "straight"], capsys)[0] == 0
    watcher.join(timeout=300)
    assert stopped.wait(timeout=300) == 128 + signal.SIGTERM, "".join(log)
    assert f"Resume with: rsscene train --resume {tmp_path / 'stopped'}" in log[-1]
    saved = checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert saved.next_epoch == 1 and 0 < saved.next_step < 4, log[-1]  # mid-epoch 2

    assert cli(["train", "--resume", tmp_path / "stopped"], capsys)[0] == 0
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    losses = [[r["train_loss"] for r in c.state.history] for c in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


# --------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("clip", [["--max-grad-norm", "1"], []], ids=["clipped", "unclipped"])
def test_divergence_stops_with_one_line_naming_epoch_and_step(
    clip: list[str], split: Path, tmp_path: Path, capsys
) -> None:
    argv = ["train", split, *TINY, "--lr", "1e30", *clip, "--out", tmp_path]
    code, err = cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("rsscene train: error: loss became NaN/Inf at epoch 1, step ")
    assert "no checkpoint was saved" in err and not (tmp_path / "last.pt").exists()


def test_divergence_in_epoch_2_keeps_epoch_1s_checkpoint(
    split: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    calls = []

    class PoisonedAfterFiveSteps(Augment):
        def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            calls.append(1)
            out = super().__call__(x, generator)
            return out * float("nan") if len(calls) > 5 else out

    monkeypatch.setattr("rsscene.engine.recipe.Augment", PoisonedAfterFiveSteps)
    code, err = cli(["train", split, *TINY, "--epochs", "2", "--out", tmp_path], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "loss became NaN/Inf at epoch 2, step 2" in err  # 4 steps an epoch
    assert f"the last good checkpoint is {tmp_path / 'last.pt'}" in err
    ckpt = checkpoint.load(tmp_path / "last.pt")
    assert ckpt.next_epoch == 1 and ckpt.next_step == 0
    assert all(torch.isfinite(t).all() for t in ckpt.model.values() if t.is_floating_point())


# --------------------------------------------------------------------------- untrusted files
def test_a_yaml_config_cannot_run_code(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    code, err = cli(["train", "--config", config], capsys)
    assert code == 2 and err.startswith(f"rsscene train: error: {config}: refused:")
    assert len(err.splitlines()) == 1 and not marker.exists()


@pytest.mark.parametrize("entry", ["train/../../victim.txt", "/tmp/victim.txt", "test/a/../b/c"])
def test_force_never_deletes_outside_the_split(entry: str, scenes: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    prepare(scenes, dst, test_ratio=0.3, classes=["ship", "bridge"])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["files"].append({"file": entry.replace("/tmp/", f"{tmp_path}/")})
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a part/CLASS/file path"):
        prepare(scenes, dst, test_ratio=0.3, classes=["ship", "bridge"], force=True)
    assert victim.read_text() == "keep me"


# --------------------------------------------------------------------------- user mistakes
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good checkpoint, wrong ones, config files and an image, for the cases below."""
    root = tmp_path_factory.mktemp("mistakes")
    found = {
        "ckpt": tiny_checkpoint(root / "tiny.pt"),
        "random": root / "random.pt",
        "torchvision": root / "resnet18.pth",
        "arch_yaml": root / "arch.yaml",
        "image": root / "x.png",
    }
    found["random"].write_bytes(os.urandom(4096))
    torch.save(checkpoint.load(found["ckpt"]).model, found["torchvision"])
    found["arch_yaml"].write_text("arch: resnet9\n")
    found["image"].write_bytes(encode(noise(), "PNG"))
    found["labelled"] = root / "labelled"  # class folders named as the checkpoint's classes
    for i, name in enumerate(CLASSES):
        (found["labelled"] / name).mkdir(parents=True)
        (found["labelled"] / name / "x.png").write_bytes(encode(noise(seed=i), "PNG"))
    return found


MISTAKES: dict[str, Callable[[dict[str, Path], Path, Path], list]] = {
    "train: missing folder": lambda f, d, t: ["train", t / "absent"],
    "prepare: missing folder": lambda f, d, t: ["prepare", t / "absent", t / "out"],
    "evaluate: missing folder": lambda f, d, t: ["evaluate", f["ckpt"], t / "absent"],
    "predict: missing checkpoint": lambda f, d, t: ["predict", t / "absent.pt", f["image"]],
    "resume: missing run": lambda f, d, t: ["train", "--resume", t / "absent"],
    "train: unknown arch": lambda f, d, t: ["train", d, "--arch", "resnet9"],
    "train: unknown arch in a config": lambda f, d, t: ["train", d, "--config", f["arch_yaml"]],
    "train: missing config": lambda f, d, t: ["train", d, "--config", t / "absent.yaml"],
    "train: --epochs 0": lambda f, d, t: ["train", d, "--epochs", "0"],
    "train: --lr -1": lambda f, d, t: ["train", d, "--lr", "-1"],
    "train: --crop-scale 2": lambda f, d, t: ["train", d, "--crop-scale", "2"],
    "train: --save-interval -1": lambda f, d, t: ["train", d, "--save-interval", "-1"],
    "train: --device tpu": lambda f, d, t: ["train", d, "--device", "tpu"],
    "train: --class-weights absent": lambda f, d, t: ["train", d, "--class-weights", t / "w"],
    "train: --sampler odd": lambda f, d, t: ["train", d, "--sampler", "odd"],
    "predict: --topk abc": lambda f, d, t: ["predict", f["ckpt"], f["image"], "--topk", "abc"],
    "predict: --output x.txt": lambda f, d, t: ["predict", f["ckpt"], f["image"], "-o", "x.txt"],
    "evaluate: random file": lambda f, d, t: ["evaluate", f["random"], d],
    "predict: torchvision .pth": lambda f, d, t: ["predict", f["torchvision"], f["image"]],
    "evaluate: torchvision .pth": lambda f, d, t: ["evaluate", f["torchvision"], d],
    "no command at all": lambda f, d, t: [],
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_gives_one_line_and_status_2(
    case: str, files: dict[str, Path], split: Path, tmp_path: Path, capsys
) -> None:
    code, err = cli(MISTAKES[case](files, split, tmp_path), capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("rsscene") and "Traceback" not in err
    if "torchvision" in case:
        assert "not an rsscene checkpoint (plain torchvision weights can only start" in err


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_with_debug_raises_for_its_traceback(
    case: str, files: dict[str, Path], split: Path, tmp_path: Path, capsys
) -> None:
    argv = [str(a) for a in MISTAKES[case](files, split, tmp_path)]
    _, err = cli(argv, capsys)
    usage = err.rstrip().endswith("--help)")  # argparse's: found before any code runs
    try:
        main(["--debug", *argv])
    except SystemExit as e:
        # A usage mistake stays one line: the traceback would only show argparse's insides.
        assert usage and e.code == 2, f"--debug hid the traceback of: {err}"
        assert len(capsys.readouterr().err.splitlines()) == 1
    except Exception as e:  # the traceback: Python prints it, as `rsscene` lets it through
        assert not usage and str(e) in err, (e, err)
    else:
        pytest.fail(f"rsscene --debug {' '.join(argv)} neither raised nor exited")


def test_debug_prints_the_traceback_from_the_command_line(files: dict[str, Path]) -> None:
    done = rsscene("--debug", "predict", files["random"], files["image"])
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 1 and out.startswith("Traceback (most recent call last):"), out
    assert "rsscene.checkpoint.CheckpointError:" in out and "not a readable checkpoint" in out


def test_a_full_disk_at_the_first_save_gives_one_line(
    split: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, err = cli(["train", split, *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("rsscene train: error: cannot write checkpoint") and "No space" in err
    assert not list((tmp_path / "run").glob("*.pt*"))


def test_a_full_disk_when_writing_results_gives_one_line(
    files: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    def full(self: Path, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "predictions.json"
    code, err = cli(["predict", files["ckpt"], files["image"], "-o", out], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"rsscene predict: error: {out}: No space left on device"


# --------------------------------------------------------------------------- unwritable outputs
def refuse_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Make every write under ``root`` fail with ``code``, as a disk that is read-only
    (EROFS) or not ours (EACCES) would: root, which the tests run as, ignores permissions."""

    def refused(path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(
            root
        )

    def fail(path: object) -> NoReturn:
        raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if refused(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


OUTPUTS: dict[str, Callable[[dict[str, Path], Path, Path], list]] = {
    "predict -o csv": lambda f, d, o: ["predict", f["ckpt"], f["image"], "-o", o / "p.csv"],
    "evaluate -o": lambda f, d, o: ["evaluate", f["ckpt"], f["labelled"], "-o", o / "eval"],
    "cam --out": lambda f, d, o: ["cam", f["ckpt"], f["image"], "--out", o / "cams"],
    "export --out": lambda f, d, o: [
        "export",
        f["ckpt"],
        "--format",
        "torchscript",
        "--out",
        o / "m.ts",
    ],
    "train --out": lambda f, d, o: ["train", d, *TINY, "--out", o / "run"],
    "prepare DST": lambda f, d, o: ["prepare", d / "test", o / "split"],
    "synth DST": lambda f, d, o: ["synth", o / "scenes", "--per-class", "1", "--size", "32"],
}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["denied", "read-only"])
@pytest.mark.parametrize("case", OUTPUTS)
def test_an_unwritable_output_gives_one_line(
    case: str, code: int, files: dict[str, Path], split: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    refuse_writes(monkeypatch, out, code)
    status, err = cli(OUTPUTS[case](files, split, out), capsys)
    last = err.splitlines()[-1] if err else ""
    assert status == 2 and "Traceback" not in err, err
    assert last.startswith(f"rsscene {case.split()[0]}: error:") and str(out) in last, err
    assert last.endswith(os.strerror(code)), err


# --------------------------------------------------------------------------- integrity
def test_a_short_write_from_torch_on_a_full_disk_gives_one_line(
    split: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    def short(*args, **kwargs) -> NoReturn:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short)
    code, err = cli(["train", split, *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        err.startswith("rsscene train: error: cannot write checkpoint") and "stopped short" in err
    )
    assert not list((tmp_path / "run").glob("*.pt*"))


def test_train_refuses_an_earlier_run_unless_resumed_or_forced(
    split: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert cli(["train", split, *TINY, "--out", run], capsys)[0] == 0
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.old").write_text("old")
    before = (run / "last.pt").read_bytes()
    code, err = cli(["train", split, *TINY, "--out", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{run} holds a run" in err and "--resume" in err and "--force" in err
    assert (run / "last.pt").read_bytes() == before
    assert cli(["train", split, *TINY, "--out", run, "--force"], capsys)[0] == 0
    assert not (run / "tensorboard").exists()  # nothing of the old run beside the new one
    assert checkpoint.load(run / "last.pt").next_epoch == 1
    code, err = cli(["train", "--resume", run, "--bands", "all"], capsys)
    assert code == 2 and "trained without --bands (8-bit RGB), this run asks for all" in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one image", "1 training image: a step needs at least 2 images"),
        ("utf-16 config", None),
        ("bands 4,,3", "an empty band between commas"),
        ("read-only tensorboard", "--log tensorboard: cannot write to"),
    ],
)
def test_more_mistakes_give_one_line(
    case: str, message: str | None, split: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    argv = ["train", split, *TINY, "--out", tmp_path / "run"]
    if case == "one image":
        data = tmp_path / "one"
        for part in ("train", "test"):
            (data / part / "a").mkdir(parents=True)
            (data / part / "a" / "x.png").write_bytes(encode(noise(40, 40), "PNG"))
        argv[1] = data
    elif case == "utf-16 config":
        (tmp_path / "c.yaml").write_text("epochs: 1\nlr: 0.002\n", encoding="utf-16")
        from rsscene.config import read_config_file

        assert read_config_file(tmp_path / "c.yaml") == {"epochs": 1, "lr": 0.002}
        (tmp_path / "c.yaml").write_bytes(b"epochs: 1\n\xff\xfe\xfa")
        argv += ["--config", tmp_path / "c.yaml"]
        message = "not UTF-8 text (byte 10); save the config file as UTF-8"
    elif case == "bands 4,,3":
        argv += ["--bands", "4,,3"]
    else:
        import tempfile

        def read_only(*args, **kwargs) -> NoReturn:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
        argv += ["--log", "tensorboard"]
    code, err = cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err


def test_the_demo_stopped_by_sigterm_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = rsscene("demo", "--out", out, "--per-class", "8", "--epochs", "40", "--img-size", "32")
    lines = []
    for line in done.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):
            done.send_signal(signal.SIGTERM)
            break
    rest = done.stdout.read()
    assert done.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "Traceback" not in rest and "SIGTERM: stopped after epoch" in rest, rest
    assert "demo: run it again to start over" in rest
    # The stopped demo's folder is its own: the same command starts over there.
    again = rsscene("demo", "--out", out, "--per-class", "4", "--epochs", "1", "--img-size", "32")
    assert again.wait(timeout=300) == 0, again.stdout.read()


def test_a_number_flag_given_nan_says_it_is_not_a_number(files: dict[str, Path], capsys) -> None:
    code, err = cli(["map", files["ckpt"], files["image"], "--out", "x", "--tile-m", "nan"], capsys)
    assert code == 2 and "--tile-m: expected a number, got nan" in err


def test_multiband_training_files_without_bands_say_why_in_the_last_line(
    tmp_path: Path, capsys
) -> None:
    import numpy as np
    import tifffile

    for part in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(2):
                pixels = np.full((13, 32, 32), 100 * i, dtype=np.uint16)
                tifffile.imwrite(
                    tmp_path / part / name / f"{i}.tif", pixels, planarconfig="separate"
                )
    code, err = cli(["train", tmp_path, *TINY, "--out", tmp_path / "run"], capsys)
    last = err.splitlines()[-1]
    assert code == 2 and "no readable training image; 4 left out" in last, err
    assert "has 13 bands" in last and "--bands" in last and "cannot be shared" not in err
