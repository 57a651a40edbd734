"""Checkpoints: atomic saves that survive SIGKILL and a full disk, verified and safe loads."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, CheckpointError
from rsscene.cli import main
from rsscene.models import create_model
from test_images import CLASSES, tiny_checkpoint

MARK = 1.2345  # a value easy to find among the bytes of a saved file


def payload(fill: float = MARK) -> Checkpoint:
    state = {"fc.weight": torch.full((3, 64), fill), "fc.bias": torch.zeros(3)}
    return Checkpoint(state, "resnet18", ["a", "b", "c"])


def test_save_leaves_only_the_file_and_load_verifies(tmp_path: Path) -> None:
    path = checkpoint.save(payload(), tmp_path / "run" / "last.pt")
    checkpoint.save(payload(2.0), path)  # replacing an existing file
    assert os.listdir(path.parent) == ["last.pt"]
    ckpt = checkpoint.load(path)
    raw = torch.load(path, weights_only=True)
    assert (raw["format"], raw["format_version"]) == (checkpoint.FORMAT, checkpoint.FORMAT_VERSION)
    assert raw["sha256"] == checkpoint.weights_digest(ckpt.model)
    assert (ckpt.model["fc.weight"] == 2.0).all()


def test_a_flipped_byte_in_the_weights_fails_the_checksum(tmp_path: Path) -> None:
    path = checkpoint.save(payload(), tmp_path / "last.pt")
    data = bytearray(path.read_bytes())
    at = bytes(data).find(torch.full((4,), MARK).numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_a_truncated_file_is_not_readable(keep: float, tmp_path: Path) -> None:
    path = checkpoint.save(payload(), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(path)


# What a damaged checkpoint may be refused as: each a one-line error naming the file.
DAMAGE = (
    "not a readable checkpoint",
    "checksum mismatch: the weights are corrupt",
    "checksum mismatch: what describes the weights",
    "refused as unsafe",  # a damaged pickle can name a global that was never there
    "not an rsscene checkpoint",
    "checkpoint lacks",
    "cannot read",
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(at=st.floats(0, 1), value=st.integers(1, 255), cut=st.booleans())
def test_damaged_files_are_refused_in_one_line_or_load_unchanged(
    at: float, value: int, cut: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.pt"
    checkpoint.save(payload(), path)
    original = checkpoint.load(path)
    data = bytearray(path.read_bytes())
    i = min(int(at * len(data)), len(data) - 1)
    if cut:
        del data[i:]
    else:
        data[i] ^= value  # never 0: the byte changes
    path.write_bytes(data)
    try:
        loaded = checkpoint.load(path)
    except CheckpointError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert any(kind in message for kind in DAMAGE), message
    else:
        # Only a byte that nothing reads (zip padding, a timestamp) may change nothing.
        assert not cut
        assert loaded.model.keys() == original.model.keys()
        assert all(torch.equal(loaded.model[k], v) for k, v in original.model.items())
        assert dataclasses.replace(loaded, model={}) == dataclasses.replace(original, model={})


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ResNet-18 checkpoint as predict loads it, and an image to predict."""
    root = tmp_path_factory.mktemp("damage")
    image = root / "x.png"
    Image.new("RGB", (40, 40), (90, 120, 60)).save(image)
    return tiny_checkpoint(root / "good.pt"), image


def damaged(data: bytes, how: str) -> bytes:
    out = bytearray(data)
    if how == "truncated":
        del out[len(out) // 2 :]
    elif how == "a weight byte flipped":
        out[len(out) // 2] ^= 0x10
    elif how == "the pickle's opcodes damaged":
        at = data.index(b"data.pkl") + 200  # inside the pickled dict, past the zip header
        out[at : at + 8] = b"\xff" * 8
    elif how == "the zip directory zeroed":
        at = data.rindex(b"PK\x01\x02")
        out[at : at + 46] = bytes(46)
    return bytes(out)


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "a weight byte flipped",
        "the pickle's opcodes damaged",
        "the zip directory zeroed",
    ],
)
def test_a_damaged_checkpoint_exits_2_with_one_line(how, real_checkpoint, tmp_path, capsys) -> None:
    good, image = real_checkpoint
    path = tmp_path / "damaged.pt"
    path.write_bytes(damaged(good.read_bytes(), how))
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rsscene predict: error: {path}: ") and len(err.splitlines()) == 1, err
    assert any(kind in err for kind in DAMAGE), err


def test_a_changed_class_name_is_refused(real_checkpoint, tmp_path, capsys) -> None:
    good, image = real_checkpoint
    data = good.read_bytes()
    at = data.index(CLASSES[0].encode())
    path = tmp_path / "renamed.pt"
    path.write_bytes(data[:at] + b"X" + data[at + 1 :])
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch: what describes the weights" in err and len(err.splitlines()) == 1


def test_a_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Files written before the description had its own checksum: the weights' is checked."""
    path = tiny_checkpoint(tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    del raw["meta_sha256"]
    torch.save({**raw, "format_version": 1}, path)
    assert checkpoint.load(path).class_names == CLASSES
    raw["model"]["fc.bias"] += 1
    torch.save({**raw, "format_version": 1}, path)
    with pytest.raises(CheckpointError, match="checksum mismatch: the weights are corrupt"):
        checkpoint.load(path)


def test_a_full_disk_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = checkpoint.save(payload(), tmp_path / "last.pt")
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint.save(payload(3.0), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


# The driver forks a child that saves last.pt (ResNet-18 weights all equal to a step counter)
# in a loop, SIGKILLs it at a random moment, then loads the file; it prints what it found.
# Serialising takes most of a save, so every other kill waits for the temporary file to appear
# and lands while it is being written.
KILL_LOOP = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    from rsscene import checkpoint
    from rsscene.models import create_model

    path, rounds = sys.argv[1], int(sys.argv[2])
    folder = os.path.dirname(path)
    state = create_model("resnet18", num_classes=3).state_dict()

    def save(step):
        for t in state.values():
            t.fill_(step)
        checkpoint.save(checkpoint.Checkpoint(state, "resnet18", ["a", "b", "c"]), path)

    save(0)
    rng, found = random.Random(0), []
    for r in range(rounds):
        pid = os.fork()
        if pid == 0:
            for step in range(1000 * (r + 1), 1000 * (r + 2)):
                save(step)
            os._exit(0)
        if r % 2:
            deadline = time.monotonic() + 60
            while not any(n.endswith(".tmp") for n in os.listdir(folder)):
                assert time.monotonic() < deadline, "no save started"
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            time.sleep(rng.uniform(0.05, 1.0))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ckpt = checkpoint.load(path)  # raises on a torn file or a wrong checksum
        step = int(ckpt.model["fc.bias"][0])
        assert all((t == step).all() for t in ckpt.model.values()), step
        # SIGKILL leaves the half-written temporary file behind; the next save removes it.
        temps = [n for n in os.listdir(folder) if n.endswith(".tmp")]
        save(step)
        left = sorted(os.listdir(folder))
        assert left == ["last.pt"], left
        found.append({"step": step, "temps": len(temps)})
    print(json.dumps(found))
    """
)


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILL_LOOP, str(tmp_path / "last.pt"), "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rounds = json.loads(done.stdout)
    steps = [r["step"] for r in rounds]
    assert len(rounds) == 20 and steps == sorted(steps)
    assert any(s > 0 for s in steps)  # some saves completed before a kill...
    assert sum(r["temps"] for r in rounds) > 0  # ...and some kills landed mid-write


# --------------------------------------------------------------------------- untrusted files
class MakesAFile:
    """Unpickling this would create ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("command", ["predict", "evaluate", "train --weights", "train --resume"])
def test_a_pickle_that_runs_code_is_refused(
    command: str, split: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = create_model("resnet18", num_classes=3).state_dict()
    torch.save({**checkpoint.to_payload(payload()), "model": state, "x": MakesAFile(marker)}, evil)
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    argv = {
        "predict": ["predict", str(evil), str(images)],
        "evaluate": ["evaluate", str(evil), str(images.parent)],
        "train --weights": ["train", str(split), "--weights", str(evil), "--device", "cpu"],
        "train --resume": ["train", "--resume", str(evil)],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused as unsafe" in err
    assert len(err.splitlines()) == 1 and not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n" + os.urandom(500), "not a readable checkpoint"),
        ("torchvision", "not an rsscene checkpoint"),
        ("no class names", "lacks 'class_names'"),
        ("unknown arch", "no model rsscene can build"),
    ],
)
def test_wrong_checkpoints_give_one_line(content, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "wrong.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "torchvision":
        torch.save(create_model("resnet18", num_classes=3).state_dict(), path)
    elif content == "no class names":
        raw = checkpoint.to_payload(payload())
        torch.save({k: v for k, v in raw.items() if k != "class_names"}, path)
    else:
        tiny_checkpoint(path)
        ckpt = checkpoint.load(path)
        checkpoint.save(dataclasses.replace(ckpt, arch="resnet9"), path)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene predict: error:") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": checkpoint.FORMAT_VERSION + 1}, "is newer than this rsscene reads"),
        ({"sha256": None}, "lacks the checksum of its weights"),
    ],
)
def test_a_newer_format_or_a_missing_checksum_is_refused(
    change: dict, message: str, tmp_path: Path, capsys
) -> None:
    path = tiny_checkpoint(tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in {**raw, **change}.items() if v is not None}, path)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    if "format_version" in change:
        version = checkpoint.FORMAT_VERSION
        assert f"format {version + 1} is newer" in err and f"(format {version})" in err


def test_pretrained_weights_are_checked_by_hash_and_read_weights_only(
    split: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from rsscene.models.weights import verified_state_dict

    marker = tmp_path / "marker"
    state = create_model("resnet18", num_classes=3).state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({**state, "x": MakesAFile(marker)}, cached)
    # A file replaced in torchvision's cache is refused by its hash before it is read...
    argv = ["train", str(split), "--pretrained", "--device", "cpu", "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not f37072fd as published" in err and len(err.splitlines()) == 1
    # ...and one whose hash did match would still be read weights-only.
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        verified_state_dict(cached, digest[:8])
    assert not marker.exists()
