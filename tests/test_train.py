"""train, evaluate and predict on a tiny generated dataset."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import shared_data, tiny_config
from rsscene import checkpoint
from rsscene.cli import main
from rsscene.config import build, resolve
from rsscene.data.prepare import prepare
from rsscene.engine.evaluate import evaluate_checkpoint
from rsscene.engine.recipe import lr_factor, train_size
from rsscene.engine.runstate import resume_config
from rsscene.engine.train import Trainer
from rsscene.errors import UserError

RUN_FILES = ["config.json", "metrics.csv", "last.pt", "best.pt", "curves.png", "report.json"]


@pytest.fixture(scope="module")
def run(split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r18"
    Trainer.from_config(tiny_config(split, out), log=lambda *_: None).fit()
    return out


def test_train_writes_a_complete_run_folder(run: Path) -> None:
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["class_names"] == ["airplane", "bridge", "palace", "ship", "stadium"]
    assert config["versions"]["torch"] == torch.__version__
    ckpt = checkpoint.load(run / "last.pt")
    for key in ("model", "arch", "class_names", "config", "state"):
        assert getattr(ckpt, key)
    for key in ("optimizer", "scheduler", "history", "rng"):
        assert getattr(ckpt.state, key) is not None


def test_evaluate_best_matches_the_logged_epoch(run: Path, split: Path) -> None:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    best = checkpoint.load(run / "best.pt")
    epoch = best.next_epoch
    logged = float(rows[epoch - 1]["test_acc"])
    report = evaluate_checkpoint(run / "best.pt", split)
    assert report["accuracy"] == pytest.approx(logged, abs=1e-5)


def test_confusion_matrix_sums_to_test_images_and_recall_is_its_diagonal(
    run: Path, split: Path, tmp_path: Path
) -> None:
    report = evaluate_checkpoint(run / "last.pt", split, out=tmp_path)
    cm = torch.tensor(report["confusion"])
    n_test = sum(1 for p in (split / "test").rglob("*.png"))
    assert cm.sum().item() == n_test == report["images"]
    for i, name in enumerate(report["classes"]):
        row = cm[i].sum().item()
        assert report["per_class"][name]["recall"] == pytest.approx(cm[i, i].item() / row)
    for name in ("report.json", "confusion.json", "confusion.png", "misclassified.csv"):
        assert (tmp_path / name).is_file()
    wrong = list(csv.DictReader((tmp_path / "misclassified.csv").open()))
    assert len(wrong) == n_test - cm.diag().sum().item()


def test_predict_prints_class_names(run: Path, split: Path, tmp_path: Path, capsys) -> None:
    image = next((split / "test" / "ship").iterdir())
    out = tmp_path / "preds.json"
    assert (
        main(["predict", str(run), str(image), str(split / "test" / "bridge"), "-o", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert str(image) in printed
    assert any(name in printed for name in ("airplane", "bridge", "palace", "ship", "stadium"))
    saved = json.loads(out.read_text())
    n_bridge = len(list((split / "test" / "bridge").iterdir()))
    assert len(saved["predictions"]) == 1 + n_bridge
    probs = [t["probability"] for t in saved["predictions"][0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_resume_equals_an_uninterrupted_run(split: Path, tmp_path: Path) -> None:
    quiet = {"log": lambda *_: None}
    straight = tmp_path / "straight"
    Trainer.from_config(tiny_config(split, straight, epochs=4, schedule="constant"), **quiet).fit()
    halves = tmp_path / "halves"
    Trainer.from_config(tiny_config(split, halves, epochs=2, schedule="constant"), **quiet).fit()
    Trainer.from_config(resume_config(halves, {"epochs": 4}), resume=halves, **quiet).fit()
    a = checkpoint.load(straight / "last.pt").model
    b = checkpoint.load(halves / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((halves / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_resume_refuses_another_arch(run: Path, capsys) -> None:
    assert main(["train", "--resume", str(run), "--arch", "resnet34"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_best_holds_weights_only_and_is_not_resumed(run: Path, capsys) -> None:
    best = checkpoint.load(run / "best.pt")
    assert best.state is None
    assert set(best.model) == set(checkpoint.load(run / "last.pt").model)
    # AdamW keeps two moments per weight: the full state is about three times the weights.
    assert (run / "best.pt").stat().st_size < 0.5 * (run / "last.pt").stat().st_size
    assert main(["train", "--resume", str(run / "best.pt")]) == 2
    assert "holds weights only" in capsys.readouterr().err


def test_tutorial_flag_sets_the_tutorial_recipe(split: Path) -> None:
    from rsscene.config import build

    cfg = build({"data": str(split), "tutorial": True, "epochs": 1})
    assert (cfg.arch, cfg.batch_size, cfg.img_size, cfg.optimizer, cfg.lr) == (
        "resnet18",
        32,
        224,
        "adam",
        5e-4,
    )
    assert (cfg.amp, cfg.channels_last, cfg.cache, cfg.augment) == ("off", False, "none", "hflip")
    assert cfg.epochs == 1  # flags still override the recipe


def test_default_lr_and_weight_decay_follow_the_optimizer_and_global_batch() -> None:
    from rsscene.config import TrainConfig, resolve

    sgd = resolve(TrainConfig(optimizer="sgd", batch_size=32), "cpu", world=4)
    assert (sgd.lr, sgd.weight_decay) == (pytest.approx(0.1 * 128 / 64), 5e-4)
    adamw = resolve(TrainConfig(batch_size=32), "cpu", world=8)
    assert (adamw.optimizer, adamw.lr, adamw.weight_decay) == ("adamw", pytest.approx(6e-3), 0.05)
    given = resolve(TrainConfig(lr=0.01, weight_decay=0.0), "cpu", world=8)
    assert (given.lr, given.weight_decay) == (0.01, 0.0)


def test_test_resolution_follows_the_crop() -> None:
    from rsscene.config import TrainConfig, resolve

    whole = resolve(TrainConfig(), "cpu")
    assert (whole.crop_scale, whole.img_size, whole.eval_size) == ((1.0, 1.0), 128, 128)
    # Crops zoom in during training, so the full test image is shown larger to match.
    cropped = resolve(TrainConfig(crop_scale=(0.25, 1.0), img_size=128), "cpu")
    assert (cropped.img_size, cropped.eval_size) == (128, 160)
    assert resolve(TrainConfig(crop_scale=(0.25, 1.0), eval_size=144), "cpu").eval_size == 144


def test_the_cpu_default_rises_from_96_to_128_px_unless_a_resolution_is_given() -> None:
    cpu = resolve(build({}), "cpu")
    assert (cpu.start_size, cpu.img_size, cpu.eval_size, cpu.epochs) == (96, 128, 128, 28)
    assert [train_size(cpu, e) for e in range(cpu.epochs)] == [96] * 17 + [112] * 5 + [128] * 6
    # A given resolution is trained at throughout; a given start size rises to the default.
    assert resolve(build({"img_size": 112}), "cpu").start_size is None
    assert resolve(build({"start_size": 64}), "cpu").start_size == 64
    gpu = resolve(build({}), "cuda")
    assert (gpu.start_size, gpu.img_size, gpu.epochs) == (None, 192, 100)


def test_config_file_sets_defaults_and_flags_override(split: Path, tmp_path: Path) -> None:
    from rsscene.config import build

    (tmp_path / "c.yaml").write_text("arch: resnet34\nepochs: 7\nlr: 0.05\n")
    (tmp_path / "c.toml").write_text('arch = "resnet50"\nepochs = 3\n')
    cfg = build({"data": str(split), "epochs": 2}, tmp_path / "c.yaml")
    assert (cfg.arch, cfg.epochs, cfg.lr) == ("resnet34", 2, 0.05)
    assert build({"data": str(split)}, tmp_path / "c.toml").arch == "resnet50"


def test_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10, "onecycle") < lr_factor(9, 100, 10, "onecycle") < 1
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "constant") == 1.0


def test_real_aid5_end_to_end_beats_chance(tmp_path: Path) -> None:
    aid5 = shared_data("aid5")
    split = tmp_path / "aid5"
    prepare(aid5, split, test_ratio=0.1, seed=0, mode="symlink")
    out = tmp_path / "run"
    cfg = tiny_config(
        split, out, img_size=32, eval_size=32, batch_size=32, amp="auto", deterministic=False
    )
    report = Trainer.from_config(cfg, log=lambda *_: None).fit()
    assert report["test"]["images"] == 163
    evaluated = evaluate_checkpoint(out / "last.pt", split)
    assert evaluated["accuracy"] == pytest.approx(report["test_accuracy"], abs=0.02)
    assert evaluated["accuracy"] > 0.2


def test_recipe_benchmark_runs_in_a_tiny_setting(capsys, tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe.py"
    spec = importlib.util.spec_from_file_location("recipe_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "results.json"
    argv = ["--epochs", "1", "--img-size", "32", "--seeds", "2", "--ablation", "sgd"]
    argv += ["--train-ratio", "0.5", "--json", str(results), "--workdir", str(tmp_path)]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "| tutorial (--tutorial) | train 50%, new split per seed | 1 |" in out
    assert "| rsscene default | train 50%, new split per seed | 2 |" in out and "time ratio" in out
    rows = {row["recipe"]: row["runs"] for row in json.loads(results.read_text())}
    # The tutorial's recipe costs several default runs, so it gets its own (smaller) seed count.
    assert [len(rows["tutorial (--tutorial)"]), len(rows["rsscene default"])] == [1, 2]
    assert len(rows["SGD (Nesterov) instead of AdamW"]) == 2
    # Each seed of a recipe is a repeat of rsscene bench: a split of its own at the ratio.
    default = rows["rsscene default"]
    assert (
        default[0]["images"] == {"train": 75, "test": 75}
        and default[0]["split"] != default[1]["split"]
    )
    assert {"oa", "aa", "kappa", "macro_f1", "seconds"} <= set(default[0])


def test_best_is_selected_on_val_when_the_split_has_one(scenes: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    prepare(scenes, split, test_ratio=0.2, val_ratio=0.2, seed=0)
    report = Trainer.from_config(
        tiny_config(split, tmp_path / "run", epochs=1), log=lambda *_: None
    ).fit()
    assert report["best"]["split"] == "val"
    assert "validation" in report["best"]["note"]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert rows[0]["val_acc"] != ""
    # The final weights' validation accuracy, what benchmarks/candidates.py chooses by.
    val = evaluate_checkpoint(tmp_path / "run" / "last.pt", split / "val")
    assert report["val_accuracy"] == pytest.approx(val["accuracy"], abs=1e-6)
    assert report["val_accuracy"] == pytest.approx(float(rows[0]["val_acc"]), abs=1e-5)


def test_progressive_resizing_trains_low_first_and_ends_at_the_test_resolution(
    split: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    cfg = tiny_config(split, tmp_path / "run", epochs=3, img_size=64, eval_size=64)
    cfg.start_size, cfg.ramp = 32, (0.0, 0.67)
    trainer = Trainer.from_config(cfg, log=lines.append)
    sizes: list[tuple[bool, int]] = []
    trainer.net.register_forward_pre_hook(
        lambda module, args: sizes.append((module.training, args[0].shape[-1]))
    )
    trainer.fit()
    per_epoch = trainer.steps_per_epoch
    trained = [s for training, s in sizes if training]
    assert trained == [32] * per_epoch + [48] * per_epoch + [64] * per_epoch
    assert {s for training, s in sizes if not training} == {64}
    assert "32->64px train / 64px test" in lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [re.search(r" (\d+)px ", line)[1] for line in epochs] == ["32", "48", "64"]


def test_the_progressive_schedule_holds_rises_in_16_px_steps_and_is_checked() -> None:
    cfg = build({"img_size": 128, "epochs": 20, "start_size": 64, "ramp": "0.5,0.9"})
    sizes = [train_size(cfg, e) for e in range(20)]
    assert sizes[:11] == [64] * 11 and sizes[-2:] == [128, 128]
    assert sizes == sorted(sizes) and all(s % 16 == 0 for s in sizes)
    assert [train_size(build({"img_size": 96, "epochs": 9}), e) for e in range(9)] == [96] * 9
    with pytest.raises(UserError, match="--start-size 160 is above --img-size 128"):
        resolve(build({"img_size": 128, "start_size": 160}), "cpu")
    with pytest.raises(UserError, match="--start-size 144 is above --img-size 128"):
        resolve(build({"start_size": 144}), "cpu")  # the CPU default's 128 px
    with pytest.raises(UserError, match="--ramp"):
        build({"start_size": 64, "ramp": "0.9,0.5"})


def test_eval_every_skips_evaluations_but_not_the_last_or_the_weights(
    split: Path, tmp_path: Path
) -> None:
    quiet = {"log": lambda *_: None}
    every = tmp_path / "every"
    Trainer.from_config(tiny_config(split, every, epochs=3), **quiet).fit()
    sparse = tmp_path / "sparse"
    Trainer.from_config(tiny_config(split, sparse, epochs=3, eval_every=2), **quiet).fit()
    rows = list(csv.DictReader((sparse / "metrics.csv").open()))
    assert [r["test_acc"] != "" for r in rows] == [False, True, True]
    full = list(csv.DictReader((every / "metrics.csv").open()))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full]
    assert rows[-1]["test_acc"] == full[-1]["test_acc"]
    assert checkpoint.load(sparse / "best.pt").next_epoch in (2, 3)
    a, b = checkpoint.load(every / "last.pt").model, checkpoint.load(sparse / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_save_interval_holds_back_last_pt_and_a_stop_writes_it(
    split: Path, tmp_path: Path
) -> None:
    def train(save_interval: float, fail_at: int | None = None) -> tuple[Path, list]:
        """last.pt's next_epoch on disk as each epoch starts (None: no file yet)."""
        cfg = tiny_config(split, tmp_path / f"{save_interval}-{fail_at}", epochs=4)
        cfg.save_interval = save_interval
        trainer = Trainer.from_config(cfg, log=lambda *_: None)
        train_epoch, seen = trainer.train_epoch, []

        def checked(epoch: int, batches: list[list[int]] | None = None) -> dict[str, float]:
            trainer.writes.wait()
            last = trainer.run_dir / "last.pt"
            seen.append(checkpoint.load(last).next_epoch if last.is_file() else None)
            if epoch == fail_at:
                raise RuntimeError("the data disk went away")
            return train_epoch(epoch, batches)

        trainer.train_epoch = checked
        if fail_at is None:
            trainer.fit()
        else:
            with pytest.raises(RuntimeError, match="the data disk went away"):
                trainer.fit()
        return trainer.run_dir, seen

    run, seen = train(0)
    assert seen == [None, 1, 2, 3] and checkpoint.load(run / "last.pt").next_epoch == 4
    run, seen = train(3600)
    assert seen == [None, 1, 1, 1] and checkpoint.load(run / "last.pt").next_epoch == 4
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # the rows are not held back

    run, seen = train(3600, fail_at=2)
    assert seen == [None, 1, 1]
    last = checkpoint.load(run / "last.pt")
    assert last.next_epoch == 2 and len(last.state.history) == 2
    assert checkpoint.load(run / "best.pt").next_epoch == last.state.best["epoch"]
    assert (run / "curves.png").is_file()


def test_a_resume_applies_the_lr_and_optimizer_it_records(
    split: Path, tmp_path: Path, capsys
) -> None:
    tiny = ["--batch-size", "8", "--img-size", "32", "--device", "cpu", "--workers", "0"]
    run = tmp_path / "run"
    flags = ["--epochs", "2", "--schedule", "constant", "--lr", "0.01", "--save-interval", "0"]
    assert main(["train", str(split), *tiny, *flags, "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "0.5"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["lr"]) for r in rows] == [0.01, 0.01, 0.5]
    assert json.loads((run / "config.json").read_text())["lr"] == 0.5
    out = capsys.readouterr().out
    assert "resume: applying --lr 0.01 -> 0.5, --epochs 2 -> 3 from step" in out
    # Another optimizer: built from the new settings, its state afresh, and no KeyError.
    assert main(["train", "--resume", str(run), "--epochs", "4", "--optimizer", "sgd"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["lr"]) for r in rows][-1] == 0.5
    assert "its state starts afresh" in capsys.readouterr().out
    saved = checkpoint.load(run / "last.pt").state.optimizer["param_groups"][0]
    assert saved["lr"] == 0.5 and saved["momentum"] == 0.9 and saved["nesterov"]


def test_the_report_gives_the_seconds_of_each_phase(split: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    report = Trainer.from_config(tiny_config(split, tmp_path / "run"), log=lines.append).fit()
    phases = report["seconds_by_phase"]
    assert list(phases) == ["start-up", "cache", "training", "evaluation", "writes", "tta"]
    assert phases["training"] == report["train_seconds"] > 0
    assert all(phases[k] > 0 for k in ("start-up", "cache", "evaluation", "tta"))
    assert phases["writes"] >= 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["seconds_by_phase"] == phases
    assert lines[-1].startswith("seconds by phase: start-up ") and " tta " in lines[-1]
