"""The engine's shape: flags made from the config, the Trainer's public API, no import circles."""

from __future__ import annotations

import ast
import os
import re
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from rsscene.cli import RUN_FLAGS, build_parser, main
from rsscene.config import TrainConfig
from rsscene.data.datasets import BatchLoader, TrainData, list_images
from rsscene.engine.train import Trainer
from rsscene.models import create_model

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rsscene"
README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def train_parser():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices["train"]


def test_every_setting_has_a_flag_and_every_flag_a_setting() -> None:
    flags = {a.dest for a in train_parser()._actions if a.dest != "help"}
    settings = {f.name for f in fields(TrainConfig)}
    assert flags - set(RUN_FLAGS) == settings


def test_flags_fill_their_fields_with_the_fields_types() -> None:
    settings = {f.name for f in fields(TrainConfig)}
    args = train_parser().parse_args(
        ["data", "--batch-size", "7", "--lr", "0.01", "--crop-scale", "0.5,1", "--no-normalize"]
    )
    given = {k: v for k, v in vars(args).items() if v is not None and k in settings}
    assert given == {
        "data": "data",
        "batch_size": 7,
        "lr": 0.01,
        "crop_scale": (0.5, 1.0),
        "normalize": False,
    }
    # Flags not given stay None, so that a config file's values are not overridden.
    assert train_parser().parse_args([]).epochs is None


def test_a_config_file_value_is_parsed_as_its_flag_would(tmp_path: Path, capsys) -> None:
    from rsscene.config import build

    (tmp_path / "c.yaml").write_text("lr: 1e-3\ncrop-scale: [0.25, 1]\nepochs: '3'\n")
    cfg = build({"data": "x"}, tmp_path / "c.yaml")
    assert (cfg.lr, cfg.crop_scale, cfg.epochs) == (0.001, (0.25, 1.0), 3)
    (tmp_path / "bad.yaml").write_text("epochs: many\n")
    assert main(["train", "x", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "--epochs: expected int, got 'many'" in capsys.readouterr().err


def test_the_trainer_takes_its_parts(split: Path, tmp_path: Path) -> None:
    """A model, data and an optimizer of the caller's own, trained by the public API."""
    images = list_images(split / "train")
    test = list_images(split / "test", images.classes)
    data = TrainData(BatchLoader(images, 32), test=BatchLoader(test, 32))
    model = create_model("resnet18", num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = TrainConfig(epochs=2, batch_size=8, img_size=32, device="cpu", amp="off")
    trainer = Trainer(cfg, model, data, optimizer, run_dir=tmp_path / "run", log=lambda *_: None)
    assert trainer.optimizer is optimizer
    before = model.fc.weight.detach().clone()
    sums = trainer.train_epoch(0)
    assert sums["seen"] == trainer.steps_per_epoch * 8 and not torch.equal(model.fc.weight, before)
    report = trainer.fit()
    assert report["test"]["images"] == len(test) and (tmp_path / "run" / "last.pt").is_file()


def test_resume_validates_the_settings_it_overrides(split: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--batch-size", "8", "--img-size", "32", "--device", "cpu"]
    assert main(["train", str(split), *tiny, "--workers", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "rsscene train: error: --lr must be positive, got -1.0\n"


def test_the_readme_library_example_trains(split: Path, tmp_path: Path, monkeypatch) -> None:
    text = README.read_text()
    section = text[text.index("### Training from Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"sat2"' in code
    monkeypatch.chdir(tmp_path)
    os.symlink(split, tmp_path / "sat2")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert 0 <= report["test_accuracy"] <= 1
    assert (tmp_path / "runs" / "sat2-sgd" / "report.json").is_file()


# --------------------------------------------------------------------------- the code's shape
def _imports(path: Path) -> set[str]:
    """The rsscene modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rsscene")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rsscene"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                found.add(sub if is_module else node.module)
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_in_a_circle() -> None:
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in graph.get(node, ()):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    circles = [c for m in graph if (c := cycle_from(m, m, (m,)))]
    assert not circles, " -> ".join(circles[0])


def test_engine_functions_stay_short_and_train_holds_the_trainer_alone() -> None:
    for path in (PACKAGE / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.lineno} {node.name} has {length} lines"
    tree = ast.parse((PACKAGE / "engine" / "train.py").read_text())
    public = [
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef | ast.FunctionDef) and not n.name.startswith("_")
    ]
    assert public == ["Trainer"]


def test_background_writes_keep_their_order_and_raise_a_failure_at_the_next_call() -> None:
    from rsscene.engine.runstate import BackgroundWrites

    done: list[int] = []
    writes = BackgroundWrites()
    for i in range(3):
        writes.submit(lambda i=i: (time.sleep(0.05 * (3 - i)), done.append(i)))
    writes.wait()
    assert done == [0, 1, 2]

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writes.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writes.submit(lambda: done.append(3))
    assert done == [0, 1, 2]
    writes.wait()  # the failure was raised once


def test_the_recipe_optimizers_use_torch_fused_kernels_on_the_cpu() -> None:
    from rsscene.config import build, resolve
    from rsscene.engine.recipe import make_optimizer

    model = create_model("resnet18", num_classes=3)
    for name in ("adamw", "adam", "sgd"):
        cfg = resolve(build({"optimizer": name}), "cpu")
        optimizer = make_optimizer(cfg, model)
        assert all(group["fused"] for group in optimizer.param_groups), name
