"""Print ``name==floor`` for every dependency pyproject.toml declares with ``>=`` (the lowest
release it admits), for pip; torch and torchvision are left out (see .ci/floors)."""

from __future__ import annotations

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

from packaging.requirements import Requirement

# A PyPI wheel of torch is a CUDA build of several GB, and torchvision must match it: the
# floors job keeps the machine's, and their floors rest on the APIs named in pyproject.toml.
KEPT = {"torch", "torchvision"}
EXTRAS = ("export", "serve", "test")


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project["dependencies"])
    for extra in EXTRAS:
        declared += project["optional-dependencies"][extra]
    pins = []
    for text in declared:
        req = Requirement(text)
        if req.name == project["name"] or req.name in KEPT:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        (lowest,) = [s.version for s in req.specifier if s.operator == ">="]
        pins.append(f"{req.name}=={lowest}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
