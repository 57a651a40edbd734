"""What the project promises about itself: slow tests exist, and its floors are checkable."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]


def test_pytest_m_slow_selects_tests() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "slow",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:]  # 5 would mean: nothing selected
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_serve.py::" in i for i in ids) and any(
        "test_distributed.py::" in i for i in ids
    )


def test_the_floors_job_pins_every_declared_dependency_at_its_floor() -> None:
    job = runpy.run_path(str(ROOT / ".ci" / "floors.py"))
    floors, tomllib = job["floors"], job["tomllib"]  # tomllib, or tomli on Python 3.10
    pins = dict(p.split("==") for p in floors(ROOT / "pyproject.toml"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [
        Requirement(r)
        for e in ("export", "serve", "test")
        for r in project["optional-dependencies"][e]
    ]
    for req in declared:
        if req.name in ("rsscene", "torch", "torchvision") or (
            req.marker and not req.marker.evaluate()
        ):
            assert req.name not in pins
        else:
            assert pins[req.name] == next(s.version for s in req.specifier if s.operator == ">=")
    # The module cli.py imports for forms, python_multipart, first ships unyanked in 0.0.15.
    assert pins["python-multipart"] == "0.0.15"
