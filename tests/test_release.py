"""What a release carries: one version, the sdist and wheel with their package data and
py.typed, and metadata that twine accepts. .ci/run also installs the wheel and runs it."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import rsscene

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "rsscene"
NEEDS = 'building needs the build package (pip install build, or pip install -e ".[test]")'


def _missing(what: str) -> None:
    """A skip where a tool is missing, or in CI (CI set) a failure: CI must check the release."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must check the release, and cannot: {what}", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) built as a release is: the sdist from the tree, the wheel from the sdist.
    With the installed setuptools (--no-isolation), so that no download is needed."""
    if importlib.util.find_spec("build") is None:
        _missing(NEEDS)
    # Built without isolation, with the setuptools installed here: it must be one that
    # pyproject.toml's build-system admits (a new venv's own can be older).
    (needed,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    needed = Requirement(needed)
    have = importlib.metadata.version(needed.name)
    if not needed.specifier.contains(have):
        _missing(f"{needed.name} {have} is installed; building rsscene needs {needed}")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (sdist,) = out.glob("rsscene-*.tar.gz")
    (wheel,) = out.glob("rsscene-*.whl")
    return sdist, wheel


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "rsscene.__version__"}
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    (assigned,) = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
    ]
    assert assigned == rsscene.__version__
    # Nothing else spells the version out: the code imports it, the docs do not quote it.
    literal = re.compile(rf"(?<![\w.]){re.escape(rsscene.__version__)}(?![\w.])")
    files = [ROOT / "pyproject.toml", *ROOT.glob("README*.md"), *(ROOT / "docs").rglob("*.md")]
    files += [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    files += [p for p in (ROOT / ".ci").iterdir() if p.is_file()]
    quoting = [str(p.relative_to(ROOT)) for p in files if literal.search(p.read_text("utf-8"))]
    assert not quoting, f"{quoting} spell out the version {rsscene.__version__}"
    assigning = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"^__version__\s*=", p.read_text("utf-8"), re.M)
    ]
    assert assigning == ["src/rsscene/__init__.py"]
    # The changelog gathers what is not released yet, and has the entry of a released version.
    changelog = (ROOT / "CHANGELOG.md").read_text("utf-8")
    assert re.search(r"^## \[Unreleased\]", changelog, re.M)
    if not Version(rsscene.__version__).is_prerelease:  # dev and rc versions have none yet
        assert re.search(rf"^## \[{re.escape(rsscene.__version__)}\]", changelog, re.M)


def test_the_wheel_ships_every_module_its_package_data_and_py_typed(dist) -> None:
    _, wheel = dist
    assert wheel.name.startswith(f"rsscene-{rsscene.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(metadata))
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    sources = {
        f"rsscene/{p.relative_to(PACKAGE).as_posix()}"
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert {"rsscene/py.typed", "rsscene/serve/static/index.html"} <= sources
    assert sources - names == set(), "files of src/rsscene missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    assert meta["Version"] == rsscene.__version__
    assert meta["Requires-Python"] == ">=3.10"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert "rsscene = rsscene.cli:main" in scripts


def test_the_sdist_holds_what_the_wheel_is_built_from(dist) -> None:
    sdist, _ = dist
    top = f"rsscene-{rsscene.__version__}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read()
    for path in (
        "pyproject.toml",
        "README.md",
        "src/rsscene/__init__.py",
        "src/rsscene/py.typed",
        "src/rsscene/serve/static/index.html",
    ):
        assert f"{top}/{path}" in names
    assert email.message_from_bytes(pkg_info)["Version"] == rsscene.__version__


def test_twine_accepts_the_sdist_and_the_wheel(dist) -> None:
    if importlib.util.find_spec("twine") is None:
        _missing('twine checks the metadata (pip install twine, or pip install -e ".[test]")')
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
