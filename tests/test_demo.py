"""The demo runs the whole pipeline end to end (in a small setting, to keep CI short)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_ends_with_its_accuracy_line(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "rsscene",
        "demo",
        "--out",
        str(out),
        "--per-class",
        "12",
        "--epochs",
        "1",
        "--img-size",
        "32",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    pattern = r"demo finished in \d+\.\d min: test accuracy \d+\.\d% \(\d+\.\d% with 8-way TTA\)"
    assert re.fullmatch(pattern, last), last
    for path in ("run/curves.png", "run/eval/confusion.png", "run/last.pt", "split/split.json"):
        assert (out / path).is_file(), path
    # A second demo into the same folder replaces the first; a foreign folder is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = subprocess.run(
        [sys.executable, "-m", "rsscene", "demo", "--out", str(foreign)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "not an earlier demo" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
