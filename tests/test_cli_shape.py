"""The command line's shape: a package of small modules under an entry module that lists the
commands, one definition of the checkpoint commands' flags, and result formatting that lives
beside the library code making the result."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from rsscene.cli import build_parser
from rsscene.engine.evaluate import format_report
from rsscene.inference import Prediction, format_predictions, write_predictions

CLI = Path(__file__).resolve().parents[1] / "src" / "rsscene" / "cli"
# Argument parsing only; what grows past these belongs in the library, or in a new module.
MAX_MODULE_LINES = 600
MAX_ENTRY_LINES = 150
CHECKPOINT_COMMANDS = ("evaluate", "predict", "cam", "export", "map", "serve")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sub.choices


def test_every_cli_module_is_at_most_600_lines_and_the_entry_module_150() -> None:
    """The command line stays argument parsing, and ``cli/__init__.py`` only lists the commands:
    every module of the package is at most 600 lines, ``__init__.py`` at most 150."""
    modules = sorted(CLI.rglob("*.py"))
    assert CLI / "__init__.py" in modules
    for path in modules:
        lines = len(path.read_text().splitlines())
        limit = MAX_ENTRY_LINES if path == CLI / "__init__.py" else MAX_MODULE_LINES
        name = path.relative_to(CLI.parent)
        assert lines <= limit, f"{name} has {lines} lines (at most {limit})"


def test_checkpoint_commands_share_their_flags() -> None:
    commands = subcommands()
    seen: dict[str, tuple] = {}
    for name in CHECKPOINT_COMMANDS:
        positionals = [a.dest for a in commands[name]._actions if not a.option_strings]
        assert positionals[0] == "checkpoint", name
        # export has no --device flag: it traces and checks its file on the CPU.
        assert commands[name].get_default("device") == "cpu", name
        for a in commands[name]._actions:
            if a.dest in ("checkpoint", "device", "batch_size"):
                flag = (a.option_strings, a.metavar, a.default, a.type, a.help)
                assert seen.setdefault(a.dest, flag) == flag, (name, a.dest)
    assert set(seen) == {"checkpoint", "device", "batch_size"}
    assert seen["checkpoint"][1] == "CKPT"


def report() -> dict:
    per_class = {
        "forest": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
        "river": {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2},
    }
    return {
        "images": 4,
        "accuracy": 0.75,
        "average_accuracy": 0.75,
        "kappa": 0.5,
        "top5": 1.0,
        "macro": {"precision": 5 / 6, "recall": 0.75, "f1": 11 / 15},
        "per_class": per_class,
        "classes": list(per_class),
        "skipped": [{"file": "bad.png", "reason": "truncated"}],
    }


def test_format_report_prints_skipped_files_the_table_and_the_headline() -> None:
    assert format_report(report()).splitlines() == [
        "skipped bad.png: truncated",
        "class   precision  recall     f1  support",
        "forest      1.000   0.500  0.667        2",
        "river       0.667   1.000  0.800        2",
        "macro       0.833   0.750  0.733        4",
        "OA 0.7500  AA 0.7500  kappa 0.5000  macro-F1 0.7333  top5 1.0000  (4 images; skipped 1)",
    ]
    with_tta = format_report({**report(), "tta_accuracy": 1.0}).splitlines()[-1]
    assert with_tta.endswith("top5 1.0000  tta_accuracy 1.0000  (4 images; skipped 1)")


def test_predictions_as_a_table_csv_and_json(tmp_path: Path) -> None:
    results = [
        Prediction("a.png", [("forest", 0.9), ("river", 0.1)]),
        Prediction("dir/b.png", [("river", 0.6), ("forest", 0.4)]),
    ]
    assert format_predictions(results) == (
        "a.png      forest 0.900  river 0.100\ndir/b.png  river 0.600  forest 0.400"
    )
    skipped = [("c.png", "not an image")]
    write_predictions(tmp_path / "out" / "p.csv", results, skipped, topk=2)
    rows = list(csv.reader((tmp_path / "out" / "p.csv").open(newline="")))
    assert rows == [
        ["file", "class1", "prob1", "class2", "prob2"],
        ["a.png", "forest", "0.900000", "river", "0.100000"],
        ["dir/b.png", "river", "0.600000", "forest", "0.400000"],
    ]
    write_predictions(tmp_path / "p.JSON", results[:1], skipped, topk=2)
    text = (tmp_path / "p.JSON").read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == {
        "predictions": [
            {
                "file": "a.png",
                "top": [
                    {"class": "forest", "probability": 0.9},
                    {"class": "river", "probability": 0.1},
                ],
            }
        ],
        "skipped": [{"file": "c.png", "reason": "not an image"}],
    }
