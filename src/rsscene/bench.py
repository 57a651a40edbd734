"""``rsscene bench``: the protocol of scene-classification papers. A raw dataset is split
again for each repeat (seed S+i, the training ratio of each class trains, the rest tests),
a model is trained on each split and its final weights evaluated, and the repeats are
summarised as mean ± standard deviation of OA, AA, kappa and macro-F1, with wall times::

    DIR/bench.json, DIR/bench.md        the table, rewritten after every repeat
    DIR/repeat-I/split/                 the repeat's split (symlinks into DATA)
    DIR/repeat-I/run/                   its run folder (report.json, last.pt, ...)
    DIR/repeat-I/result.json            its numbers, written once the repeat is finished

Running the same command again continues: a repeat with ``result.json`` is skipped, one
interrupted during training resumes from its ``last.pt`` (the Trainer's resume, so it ends
with the weights an uninterrupted run would have), and one interrupted before its training
started begins again. An already prepared split can be given instead of a raw dataset: the
repeats then train with seeds S+i on that one split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsscene.config import TrainConfig, resolve
from rsscene.data.images import is_image_file
from rsscene.data.prepare import MANIFEST_NAME, prepare
from rsscene.device import select_device
from rsscene.engine.runstate import claim_run_folder, resume_config
from rsscene.engine.train import Trainer
from rsscene.errors import Interrupted, UserError

METRICS = {"oa": "OA", "aa": "AA", "kappa": "kappa", "macro_f1": "macro-F1"}
# Settings that change how a run is watched or fed, not its numbers: a bench may continue
# with other values of these.
NOT_PROTOCOL = ("data", "out", "log", "workers")


def protocol(
    data: Path, cfg: TrainConfig, train_ratio: float | None, val_ratio: float
) -> dict[str, Any]:
    """What makes the repeats of a bench comparable: a bench continues only under the same."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_PROTOCOL}
    return {
        "data": str(data.resolve()),
        # Images per class folder: repeats of a dataset that changed are not averaged.
        "contents": _contents(data),
        "train_ratio": train_ratio,
        "val_ratio": val_ratio,
        "settings": settings,
    }


def _contents(data: Path) -> dict[str, int]:
    """Image files per class folder (per part and class for a split dataset)."""
    folders = sorted(p for p in data.glob("*/") if p.is_dir() and not p.name.startswith("."))
    if (data / "train").is_dir():
        folders = sorted(c for part in folders for c in part.glob("*/") if c.is_dir())
    return {
        str(f.relative_to(data)): sum(1 for p in f.rglob("*") if is_image_file(p)) for f in folders
    }


def _started(out: Path) -> bool:
    """Whether any repeat in ``out`` has trained (a result, a checkpoint or a metrics row)."""
    marks = ("result.json", "run/last.pt", "run/metrics.csv")
    return any((r / m).exists() for r in out.glob("repeat-*") for m in marks)


def _check_data(data: Path, train_ratio: float | None, val_ratio: float) -> bool:
    """Whether ``data`` is raw (to be split per repeat); refuses a ratio it cannot use."""
    if not data.is_dir():
        raise UserError(f"{data}: no such folder")
    raw = not (data / "train").is_dir()
    if raw and train_ratio is None:
        raise UserError(f"{data} is a raw dataset (one folder per class): give --train-ratio R")
    if not raw and (train_ratio is not None or val_ratio):
        raise UserError(
            f"{data} is already split (it has train/): --train-ratio and --val-ratio need the"
            " raw one-folder-per-class dataset"
        )
    return raw


def _open(out: Path, wanted: dict[str, Any]) -> None:
    """Start ``out``, or check that the bench there ran under the same protocol."""
    record = out / "bench.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text())["protocol"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{record}: not a bench record (damaged?); choose another --out"
            ) from None
        # A setting added since that bench was written ran at its default there; a bench
        # written before the contents were recorded is not compared on them.
        defaults = protocol(Path(), TrainConfig(), None, 0.0)["settings"]
        saved = {**saved, "settings": {**defaults, **saved.get("settings", {})}}
        saved.setdefault("contents", wanted["contents"])
        if saved != wanted and not _started(out):
            # Nothing was trained under the old settings (a mistake refused at the start):
            # the corrected command starts the bench afresh.
            for old in [*out.glob("repeat-*"), out / "bench.md", record]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        elif saved != wanted:
            changed = sorted(
                k for k in {*saved, *wanted} if k != "settings" and saved.get(k) != wanted.get(k)
            )
            old, new = saved["settings"], wanted["settings"]
            changed += sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            raise UserError(
                f"{out} holds a bench run with other settings ({', '.join(changed)} differ);"
                " give the same ones (and data) to continue it, or another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no bench.json; choose another --out DIR")
    out.mkdir(parents=True, exist_ok=True)


def _split(
    data: Path, folder: Path, seed: int, train_ratio: float | None, val_ratio: float
) -> tuple[Path, dict[str, int]]:
    """The repeat's split (made now unless a finished one is there) and its image counts."""
    if train_ratio is None:
        split = data
    else:
        split = folder / "split"
        if not (split / MANIFEST_NAME).is_file():
            prepare(
                data, split, train_ratio=train_ratio, val_ratio=val_ratio, seed=seed,
                mode="symlink", force=True,
            )  # fmt: skip
    counts = {
        part: sum(1 for p in (split / part).glob("*/*") if not p.name.startswith("."))
        for part in ("train", "val", "test")
        if (split / part).is_dir()
    }
    return split, counts


def _train(cfg: TrainConfig, run: Path, log: Callable[..., Any]) -> dict[str, Any]:
    """Train (or resume) the repeat's run; returns its final report."""
    if (run / "last.pt").is_file():
        log(f"resuming {run}")
        return Trainer.from_config(resume_config(run, {}), resume=run, log=log).fit()
    # The repeat's folder is the bench's own: what an interrupted first epoch left is replaced.
    claim_run_folder(run, force=True)
    return Trainer.from_config(cfg, log=log).fit()


def run_repeat(
    data: Path,
    folder: Path,
    cfg: TrainConfig,
    train_ratio: float | None,
    val_ratio: float,
    log: Callable[..., Any] = print,
) -> dict[str, Any]:
    """One repeat in ``folder``, with ``cfg.seed`` for the split and the training; returns
    and writes its result (``result.json``). An interruption keeps the time spent so far."""
    spent_file = folder / "elapsed.json"
    spent = json.loads(spent_file.read_text())["seconds"] if spent_file.is_file() else 0.0
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        split, counts = _split(data, folder, cfg.seed, train_ratio, val_ratio)
        run = folder / "run"
        report = _train(dataclasses.replace(cfg, data=str(split), out=str(run)), run, log)
    except Interrupted:
        seconds = spent + time.perf_counter() - started
        spent_file.write_text(json.dumps({"seconds": seconds}) + "\n")
        raise
    result = {
        "seed": cfg.seed,
        "images": counts,
        **report["metrics"],
        "tta_oa": report["test_accuracy_tta"],
        "val_oa": report["val_accuracy"],
        "seconds": round(spent + time.perf_counter() - started, 1),
        "train_seconds": report["train_seconds"],
        "split": str(split),
        "run": str(run),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each metric and of the wall time."""
    out: dict[str, dict[str, float]] = {}
    if not results:
        return out
    for key in (*METRICS, "tta_oa", "seconds"):
        values = [r[key] for r in results]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": statistics.fmean(values), "std": sd}
    return out


def _duration(seconds: float, sd: float | None = None) -> str:
    if seconds < 120:
        return f"{seconds:.0f}" + (f" ± {sd:.0f}" if sd is not None else "") + " s"
    minutes = f"{seconds / 60:.1f}" + (f" ± {sd / 60:.1f}" if sd is not None else "")
    return f"{minutes} min"


def markdown(title: str, results: list[dict[str, Any]]) -> str:
    """The repeats and their mean ± std as a Markdown table (percentages, kappa as is)."""

    def cell(key: str, value: float, sd: float | None = None) -> str:
        if key == "kappa":
            return f"{value:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        return f"{100 * value:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "") + "%"

    head = ["repeat", "seed", "train / test images", *METRICS.values(), "wall time"]
    lines = [f"{title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        images = f"{r['images']['train']} / {r['images']['test']}"
        values = [cell(k, r[k]) for k in METRICS]
        lines.append(
            f"| {i} | {r['seed']} | {images} | {' | '.join(values)} | {_duration(r['seconds'])} |"
        )
    if results:
        s = summarize(results)
        values = [cell(k, s[k]["mean"], s[k]["std"]) for k in METRICS]
        wall = _duration(s["seconds"]["mean"], s["seconds"]["std"])
        lines.append(f"| **mean ± std** | | | {' | '.join(values)} | {wall} |")
    return "\n".join(lines) + "\n"


def run_bench(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    repeats: int,
    train_ratio: float | None = None,
    val_ratio: float = 0.0,
    log: Callable[..., Any] = print,
) -> dict[str, Any]:
    """Run (or continue) ``repeats`` repeats of ``cfg`` on ``data`` in ``out``; returns what
    ``bench.json`` holds: the protocol, every repeat's result and their summary."""
    data, out = Path(data), Path(out)
    _check_data(data, train_ratio, val_ratio)
    # Settings only the device decides (a --start-size above its resolution) are refused now,
    # before anything is written.
    resolve(cfg, select_device(cfg.device).type)
    wanted = protocol(data, cfg, train_ratio, val_ratio)
    _open(out, wanted)
    ratio = f"training ratio {train_ratio:.0%}" if train_ratio is not None else "its split"
    title = f"{cfg.arch}{' (tutorial recipe)' if cfg.tutorial else ''} on {data.name}, {ratio}"
    results: list[dict[str, Any]] = []
    _write(out, wanted, title, results)  # from now on a rerun knows the protocol
    for i in range(repeats):
        folder = out / f"repeat-{i}"
        if (folder / "result.json").is_file():
            results.append(json.loads((folder / "result.json").read_text()))
            log(f"repeat {i + 1}/{repeats}: finished earlier, skipped")
            continue
        log(f"repeat {i + 1}/{repeats} (seed {cfg.seed + i}) in {folder}")
        seeded = dataclasses.replace(cfg, seed=cfg.seed + i)
        results.append(run_repeat(data, folder, seeded, train_ratio, val_ratio, log))
        _write(out, wanted, title, results)
    return _write(out, wanted, title, results)


def _write(
    out: Path, wanted: dict[str, Any], title: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    record = {"protocol": wanted, "repeats": results, "summary": summarize(results)}
    # Whole or not at all: a rerun reads it to know what it continues.
    partial = out / ".bench.json.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, out / "bench.json")
    (out / "bench.md").write_text(markdown(title, results))
    return record
