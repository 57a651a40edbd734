"""The documentation keeps up with the code: the README (a landing page) and docs/ (the site).

Every ``rsscene`` command line they show parses with the real parser, the Python examples
marked ``<!-- runnable -->`` run on tiny data, every relative link and anchor resolves, the
README stays short and its Chinese counterpart shows the same commands, and the site builds
with ``mkdocs build --strict`` (skipped where MkDocs is not installed, a failure in CI).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rsscene.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_ZH = ROOT / "README.zh-CN.md"
MAX_README_LINES = 220
# The Quick start's two commands, exactly as every README has shown them.
QUICK_START = ["pip install -e . && rsscene demo", 'pip install -e ".[test]" && pytest']
# What `mkdocs build` needs: the docs extra of pyproject.toml.
DOCS_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
DOCS_MODULES += ("mkdocs_jupyter",)
DOCS_NEEDS = 'the site build needs the docs extra (pip install -e ".[docs]")'

pytestmark = pytest.mark.usefixtures("one_thread")


def pages() -> list[Path]:
    """The README and every page of the site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


# --------------------------------------------------------------------------- reading Markdown
@dataclass
class Block:
    """A fenced code block: where it is, its language, its text, and its runnable marker
    (None: unmarked; "": run here; otherwise the test file that runs it)."""

    path: Path
    line: int
    lang: str
    body: str
    runnable: str | None

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i].removeprefix(indent))
            i += 1
        marker = re.fullmatch(
            r"<!--\s*runnable(?::\s*(\S+))?\s*-->", lines[start - 1].strip() if start else ""
        )
        runnable = (marker.group(1) or "") if marker else None
        found.append(Block(path, start + 1, lang, "\n".join(body), runnable))
        i += 1
    return found


def prose(path: Path) -> str:
    """The page without its fenced blocks (inline code kept)."""
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", path.read_text(), flags=re.M | re.S)


# --------------------------------------------------------------------------- (a) commands
# A command, possibly after a prompt, environment settings, `&&` or `;`, or `-m` (torchrun,
# python -m): where the words after `rsscene` are to be parsed.
COMMAND = re.compile(r"(^|&&|;|\s-m)\s*(\w+=\S*\s+)*rsscene(\s|$)")


def command_lines(block: Block) -> list[tuple[str, list[str]]]:
    """(the line, the arguments after ``rsscene``) for every rsscene command in a shell block.
    Backslash continuations are joined; in a block with ``$`` prompts only those lines are
    commands, the others being their output."""
    if block.lang not in ("", "bash", "sh", "shell", "console"):
        return []
    lines = re.sub(r"\\\n\s*", " ", block.body).splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    found = []
    for line in lines:
        if not COMMAND.search(line.strip()):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        words = list(lex)
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in (";", "&&", "||", "|", "&"):
                command.append(word)
                continue
            while command and re.fullmatch(r"\w+=.*", command[0]):
                command.pop(0)  # OMP_NUM_THREADS=4 torchrun ...
            # rsscene ..., or torchrun / python -m torch.distributed.run ... -m rsscene ...
            starts = [i + 1 for i, w in enumerate(command) if w == "rsscene"]
            starts = [i for i in starts if i == 1 or command[i - 2] == "-m"]
            if starts:
                found.append((line, command[starts[0] :]))
            command = []
    return found


def all_commands() -> list[tuple[str, str, list[str]]]:
    return [
        (b.where, line, argv)
        for page in pages()
        for b in blocks(page)
        for line, argv in command_lines(b)
    ]


def parse_error(argv: list[str]) -> str | None:
    """None where ``rsscene ARGV`` parses (``--help`` included), else argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip() or f"exit status {e.code}"
    return None


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_the_pages_show_the_commands_the_tests_parse() -> None:
    found = all_commands()
    argvs = {" ".join(argv) for _, _, argv in found}
    # The extraction itself: a prompt, a continuation, `&&`, torchrun and an env prefix.
    assert "info --variant v1" in argvs
    assert "demo" in argvs
    assert any(a.startswith("prepare NWPU-RESISC45 sat2 --classes") for a in argvs)
    assert any(a.endswith("--out runs/r50 --auto-resume") for a in argvs)
    assert "train sat2 --device cpu" in argvs
    # Every command of the parser is shown somewhere.
    shown = {argv[0] for _, _, argv in found if argv}
    assert shown >= set(subcommands())


COMMANDS = all_commands()


@pytest.mark.parametrize(
    "where,line,argv", COMMANDS, ids=[f"{w}:{' '.join(a[:1])}" for w, _, a in COMMANDS]
)
def test_every_command_line_parses(where: str, line: str, argv: list[str]) -> None:
    error = parse_error(argv)
    assert error is None, f"{where}: `{line.strip()}` does not parse: {error}"


def test_a_stale_flag_is_caught() -> None:
    assert parse_error(["train", "sat2", "--epochs", "3"]) is None
    assert "unrecognized arguments: --epoch-count" in parse_error(
        ["train", "sat2", "--epoch-count", "3"]
    )
    (only,) = command_lines(
        Block(README, 1, "bash", "OMP_NUM_THREADS=4 torchrun \\\n  -m rsscene train x  # c", None)
    )
    assert only[1] == ["train", "x"]
    (only,) = command_lines(
        Block(README, 1, "", "$ python -m torch.distributed.run -m rsscene info\nrsscene out", None)
    )
    assert only[1] == ["info"]


def test_commands_in_the_text_name_real_flags() -> None:
    """`rsscene CMD ... --flag` written inline in a sentence: each --flag is one of CMD's."""
    commands = subcommands()
    top = {s for a in build_parser()._actions for s in a.option_strings}
    stale = []
    for page in pages():
        for span in re.findall(r"`(rsscene [^`]+)`", prose(page)):
            words = span.split()
            if words[1] not in commands:
                continue
            known = top | {s for a in commands[words[1]]._actions for s in a.option_strings}
            stale += [
                f"{rel(page)}: `{span}`: {w}"
                for w in words[2:]
                if w.startswith("--") and w.split("=")[0] not in known
            ]
    assert not stale, "flags that rsscene does not have:\n" + "\n".join(stale)


# --------------------------------------------------------------------------- (b) examples
def runnable_blocks() -> list[Block]:
    return [
        b for page in sorted(DOCS.rglob("*.md")) for b in blocks(page) if b.runnable is not None
    ]


def test_the_runnable_examples_are_marked() -> None:
    marked = {(b.path.name, b.runnable) for b in runnable_blocks()}
    assert ("train.md", "tests/test_engine.py") in marked  # Training from Python
    assert {"getting-started.md", "multispectral.md", "export.md"} <= {
        name for name, how in marked if how == ""
    }
    for block in runnable_blocks():
        assert block.lang == "python", f"{block.where}: only Python blocks are run"
        if block.runnable:
            # Run by another test, which must read this page.
            assert block.path.name in (ROOT / block.runnable).read_text(), block.where


def _rgb_checkpoint(path: Path) -> Path:
    from rsscene import checkpoint
    from rsscene.data.bands import Preprocess
    from rsscene.models import create_model

    model = create_model("resnet18", num_classes=3)
    ckpt = checkpoint.Checkpoint(
        model=model.state_dict(),
        arch="resnet18",
        class_names=["crop", "lake", "town"],
        preprocess=Preprocess(size=32),
    )
    return checkpoint.save(ckpt, path)


def _band_checkpoint(path: Path) -> Path:
    from rsscene import checkpoint
    from rsscene.data.bands import Preprocess
    from rsscene.models import create_model

    pre = Preprocess(
        size=32,
        mean=[0.02] * 13,
        std=[0.01] * 13,
        bands=list(range(1, 14)),
        band_count=13,
        dtype="uint16",
    )
    model = create_model("resnet18", num_classes=3, in_channels=13)
    ckpt = checkpoint.Checkpoint(
        model=model.state_dict(),
        arch="resnet18",
        class_names=["crop", "lake", "town"],
        preprocess=pre,
    )
    return checkpoint.save(ckpt, path)


def _workspace(code: str, root: Path) -> dict:
    """Make, in ``root``, the files ``code`` names (tiny ones), and return the names the
    example leaves to its reader (``batch``: the images the example feeds)."""
    import tifffile
    import torch

    from rsscene.cli import main
    from rsscene.models import create_model

    given: dict = {}
    if "resnet50-0676ba61.pth" in code:  # as torchvision's file: the same keys, 1000 classes
        torch.save(create_model("resnet50").state_dict(), root / "resnet50-0676ba61.pth")
    if "runs/eurosat/best.pt" in code:
        _band_checkpoint(root / "runs" / "eurosat" / "best.pt")
    if "patch.tif" in code:  # a 13-band Sentinel-2-like patch, uint16
        rng = np.random.default_rng(0)
        tifffile.imwrite(
            root / "patch.tif",
            rng.integers(0, 3000, (13, 40, 40)).astype(np.uint16),
            photometric="minisblack",
            planarconfig="separate",
        )
    exports = {"model.onnx": "onnx", "model.ts": "torchscript"}
    exports = {name: fmt for name, fmt in exports.items() if name in code}
    if exports:
        if "onnxruntime" in code:
            pytest.importorskip("onnxruntime", reason='ONNX needs pip install "rsscene[export]"')
        ckpt = _rgb_checkpoint(root / "rgb.pt")
        for name, fmt in exports.items():
            with contextlib.redirect_stdout(io.StringIO()):
                done = main(["export", str(ckpt), "--format", fmt, "--out", str(root / name)])
            assert done == 0, f"rsscene export --format {fmt} failed"
        given["batch"] = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    return given


# What the examples say their names hold.
EXPECTED = {"reinitialised": ["fc.weight", "fc.bias"], "classes": ["crop", "lake", "town"]}


@pytest.mark.parametrize(
    "block", [b for b in runnable_blocks() if not b.runnable], ids=lambda b: b.where
)
def test_the_runnable_examples_run(block: Block, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = _workspace(block.body, tmp_path)
    exec(compile(block.body, block.where, "exec"), namespace)
    for name, value in EXPECTED.items():
        if name in namespace:
            assert namespace[name] == value, f"{block.where}: {name} = {namespace[name]!r}"
    for name in ("probs", "x"):
        value = namespace.get(name)
        if value is not None:
            value = value.detach().numpy() if hasattr(value, "detach") else value
            assert np.isfinite(value).all(), f"{block.where}: {name} is not finite"


# --------------------------------------------------------------------------- (c) links, size
def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (MkDocs) and GitHub give a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip()
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(path), re.M)}


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(path))  # links in code are not links
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{rel(path)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{rel(path)}: {target} (no such heading)")
    return broken


def test_the_readme_is_a_landing_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
    assert [b.body for b in blocks(README) if b.lang == "bash"][:2] == QUICK_START
    # Every page of the site is one click away.
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text()))
    for page in ["index.md", "getting-started.md", "prepare.md", "train.md", "evaluate.md"]:
        assert f"docs/{page}" in linked
    for page in ["multispectral.md", "map.md", "explain.md", "export.md", "serve.md"]:
        assert f"docs/{page}" in linked
    for page in ["torchrun.md", "results.md", "speed.md", "faults.md", "development.md"]:
        assert f"docs/{page}" in linked
    assert "docs/api/trainer.md" in linked


@pytest.mark.parametrize(
    "path", [README, README_ZH, *sorted(DOCS.rglob("*.md"))], ids=lambda p: rel(p)
)
def test_every_link_resolves(path: Path) -> None:
    assert not broken_links(path)


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n\n## The `x` part: one\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#the-x-part-one) [no](a.md#nope) [gone](c.md) `[code](d.md)`\n")
    got = [b.split(": ", 1)[1] for b in broken_links(page)]
    assert got == ["a.md#nope (no such heading)", "c.md (no such file)"]


# --------------------------------------------------------------------------- README.zh-CN.md
def test_the_chinese_readme_shows_the_same_commands() -> None:
    english = [b.body for b in blocks(README) if b.lang == "bash"]
    chinese = [b.body for b in blocks(README_ZH) if b.lang == "bash"]
    assert chinese == english
    assert len(README_ZH.read_text().splitlines()) <= MAX_README_LINES


# --------------------------------------------------------------------------- (d) the site
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def require(modules: tuple[str, ...]) -> None:
    """Skip, saying what is missing, where the docs extra is not installed; in CI (CI set)
    fail instead: CI must not stay green without having built the site."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        reason = f"{DOCS_NEEDS}; missing: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(
                f"CI must build the documentation site, and cannot: {reason}", pytrace=False
            )
        pytest.skip(reason)


def test_without_mkdocs_ci_fails_and_elsewhere_skips(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must build the documentation site"):
        require(("rsscene_no_such_module",))
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match=r"docs extra .*rsscene_no_such_module"):
        require(("rsscene_no_such_module",))


def test_the_site_builds_strict(tmp_path: Path) -> None:
    require(DOCS_MODULES)
    site = tmp_path / "site"
    where = ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)]
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *where],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing written into the working tree
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    # Every page is in the nav, and the API pages hold the docstrings.
    assert 'not included in the "nav"' not in log, log[-4000:]
    trainer = (site / "api" / "trainer" / "index.html").read_text()
    assert "from_config" in trainer and "train_epoch" in trainer
    assert "map_scene" in (site / "api" / "mapping" / "index.html").read_text()
