"""The engine's shape: flags made from the config, the Trainer's public API, no import circles."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import tiny_config
from rsscene.cli import RUN_FLAGS, build_parser, main
from rsscene.config import TrainConfig
from rsscene.data.datasets import BatchLoader, TrainData, list_images
from rsscene.engine.train import Trainer
from rsscene.models import create_model

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rsscene"
# The "Training from Python" example lives in the train guide (tests/test_docs.py checks the rest).
TRAIN_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "train.md"

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
    text = TRAIN_GUIDE.read_text()
    section = text[re.search(r"^#+ Training from Python$", text, re.M).start() :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"sat2"' in code
    monkeypatch.chdir(tmp_path)
    os.symlink(split, tmp_path / "sat2")
    namespace: dict = {}
    exec(compile(code, "docs/train.md", "exec"), namespace)
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


# A run of tiny_config's settings in a process of its own, channels_last weights written after
# every epoch; it prints the process's threads before training and after.
THREADS_SCRIPT = """
import json, os, sys
import torch
from rsscene.config import build
from rsscene.engine.train import Trainer

torch.set_num_threads(2)  # an OpenMP team of two, on any machine
torch.ones(512, 512).sum()  # the training thread's team exists before the count
trainer = Trainer.from_config(build(json.loads(sys.argv[1])), log=lambda *a: None)
before = len(os.listdir("/proc/self/task"))
trainer.fit()
print(before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_checkpoint_writer_thread_starts_no_openmp_team(split: Path, tmp_path: Path) -> None:
    """A torch operation in the writer thread starts a second OpenMP team, and on a CPU every
    later training step was about a tenth slower: the writes add their own thread only."""
    cfg = tiny_config(split, tmp_path / "run", epochs=3, save_interval=0, channels_last=True)
    done = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT, json.dumps(cfg.to_dict())],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    before, after = map(int, done.stdout.split())
    assert (tmp_path / "run" / "last.pt").is_file()
    assert after == before + 1, done.stdout


def test_the_recipe_optimizers_use_torch_fused_kernels_on_the_cpu() -> None:
    from rsscene.config import build, resolve
    from rsscene.engine.recipe import make_optimizer

    model = create_model("resnet18", num_classes=3)
    for name in ("adamw", "adam", "sgd"):
        cfg = resolve(build({"optimizer": name}), "cpu")
        optimizer = make_optimizer(cfg, model)
        assert all(group["fused"] for group in optimizer.param_groups), name


# Each module's layer: a module imports only from its own layer or below, and within its own
# layer only from its own package (data from data, models from models).
LAYERS = {
    "rsscene": 0,
    "rsscene.errors": 0,
    "rsscene.device": 1,
    "rsscene.data": 1,
    "rsscene.plots": 1,
    "rsscene.checkpoint": 2,
    "rsscene.models": 3,
    "rsscene.config": 4,
    "rsscene.inference": 5,
    "rsscene.explain": 6,
    "rsscene.export": 6,
    "rsscene.mapping": 6,
    "rsscene.engine": 7,
    "rsscene.bench": 8,
    "rsscene.demo": 8,
    "rsscene.serve": 8,
    "rsscene.cli": 9,
    "rsscene.__main__": 10,
}


def _layer(module: str) -> tuple[int, str]:
    """(layer, package) of a module: its own entry, else its package's."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return LAYERS[name], name
    raise AssertionError(f"{module} has no layer in LAYERS: give it one")


def test_imports_point_down_the_layers_never_up() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        layer, package = _layer(module)
        for imported in _imports(path):
            their_layer, their_package = _layer(imported)
            if their_layer > layer or (their_layer == layer and their_package != package):
                upward.append(f"{module} (layer {layer}) imports {imported} (layer {their_layer})")
    assert not upward, "\n".join(upward)
    # The two rules a newcomer most needs: the data and the models know no run and no command.
    for low in ("data", "models"):
        for path in (PACKAGE / low).rglob("*.py"):
            bad = {i for i in _imports(path) if i.split(".")[1] in ("engine", "config", "cli")}
            assert not bad, f"{path.name} imports {bad}"


def test_a_run_resolves_its_settings_once_and_a_resume_reads_its_checkpoint_once(
    split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_config
    from rsscene import checkpoint, config

    calls = {"resolve": 0, "load": 0}
    resolve, load = config.resolve, checkpoint.load

    def counted_resolve(*args, **kwargs):
        calls["resolve"] += 1
        return resolve(*args, **kwargs)

    def counted_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(config, "resolve", counted_resolve)
    monkeypatch.setattr(checkpoint, "load", counted_load)
    run = tmp_path / "run"
    Trainer.from_config(tiny_config(split, run, epochs=1), log=lambda *_: None).fit()
    assert calls == {"resolve": 1, "load": 0}
    # The Trainer built from parts resolves the caller's config itself, once.
    images = list_images(split / "train")
    data = TrainData(BatchLoader(images, 32), test=BatchLoader(list_images(split / "test"), 32))
    cfg = TrainConfig(epochs=1, batch_size=8, img_size=32, device="cpu", amp="off")
    model = create_model("resnet18", num_classes=len(data.classes))
    trainer = Trainer(cfg, model, data, run_dir=tmp_path / "parts", log=lambda *_: None)
    assert calls["resolve"] == 2 and trainer.cfg.eval_size == 32 and trainer.cfg.lr > 0
    # A resume: the command reads last.pt for the settings and the Trainer continues from it.
    assert main(["train", "--resume", str(run), "--epochs", "2", "--workers", "0"]) == 0
    assert calls == {"resolve": 3, "load": 1}
    assert checkpoint.load(run / "last.pt").next_epoch == 2


def test_the_data_builds_the_preprocess_and_the_trainer_refuses_another(
    split: Path, tmp_path: Path
) -> None:
    from rsscene.errors import UserError

    data = TrainData.from_split(split, store_size=48, eval_size=40, normalize=False)
    pre = data.preprocess
    assert (pre.size, pre.mean, pre.std, pre.source_size) == (40, None, None, 40)
    assert (data.train.size, data.test.size) == (48, 40)
    model = create_model("resnet18", num_classes=len(data.classes))
    cfg = TrainConfig(epochs=1, img_size=32, eval_size=40, device="cpu")
    with pytest.raises(
        UserError, match="40 px images unstandardised, the settings ask for --eval-size 40:"
    ):
        Trainer(cfg, model, data, run_dir=tmp_path / "run", log=lambda *_: None)
    cfg.normalize = False
    assert Trainer(cfg, model, data, run_dir=tmp_path / "run").preprocess is pre


def test_a_saved_config_reads_back_typed() -> None:
    from rsscene.config import build, from_saved

    cfg = build({"data": "d", "crop_scale": "0.5,1", "ramp": [0.2, 0.6], "lr": 0.01})
    saved = json.loads(json.dumps(cfg.to_dict()))  # as a checkpoint or config.json holds it
    assert isinstance(saved["crop_scale"], list)
    again = from_saved({**saved, "a_setting_of_a_newer_version": 1})
    assert again == cfg and again.crop_scale == (0.5, 1.0) and isinstance(again.ramp, tuple)
    del saved["eval_every"]  # a setting added since that run: its default
    assert from_saved(saved).eval_every == 1


def test_no_function_is_over_60_lines_but_the_scene_drawers() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "synthetic.py":  # each drawer paints one class: long by nature
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} {length}")
    assert not long, long


def test_compile_mode_is_one_of_torch_compiles(capsys) -> None:
    from rsscene.config import build
    from rsscene.errors import UserError

    assert build({"data": "d", "compile": True, "compile_mode": "reduce-overhead"}).compile
    with pytest.raises(UserError, match="--compile-mode 'fast' is not one of default, reduce"):
        build({"data": "d", "compile_mode": "fast"})
    # A mode alone would train uncompiled without a word.
    with pytest.raises(UserError, match="--compile-mode max-autotune needs --compile"):
        build({"data": "d", "compile_mode": "max-autotune"})
    with pytest.raises(SystemExit):
        main(["train", "d", "--compile", "--compile-mode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.slow
def test_cuda_graph_mode_compiles_on_a_cpu_and_steps_as_the_eager_model(
    split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reduce-overhead's CUDA graphs are a GPU's: on a CPU the model compiles without them,
    and its steps give the eager steps' losses and weights."""
    modes, compile_model = [], torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda m, **kw: modes.append(kw) or compile_model(m, **kw)
    )

    def two_steps(name: str, **settings: object) -> tuple[Trainer, dict[str, float], Tensor]:
        cfg = tiny_config(split, tmp_path / name, deterministic=False, **settings)
        trainer = Trainer.from_config(cfg, log=lambda *_: None)
        start = trainer.net.fc.weight.detach().clone()
        return trainer, trainer.train_epoch(0, trainer.epoch_batches(0)[:2]), start

    eager, eager_sums, start = two_steps("eager")
    compiled, sums, same_start = two_steps("compiled", compile=True, compile_mode="reduce-overhead")
    assert modes == [{"mode": "reduce-overhead"}] and hasattr(compiled.forward, "_orig_mod")
    assert torch.equal(start, same_start) and sums["seen"] == eager_sums["seen"] == 16
    assert sums["loss_sum"] == pytest.approx(eager_sums["loss_sum"], rel=1e-5)
    weights, eager_weights = compiled.net.fc.weight.detach(), eager.net.fc.weight.detach()
    # Two warm-up steps move the weights by about 2e-4; the two paths differ by about 1e-8.
    assert (eager_weights - start).abs().max() > 1e-4
    assert torch.allclose(weights, eager_weights, rtol=0, atol=1e-6)
