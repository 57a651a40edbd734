"""Class imbalance: no correction against --class-weights balanced and --sampler balanced.

    python benchmarks/imbalance.py --seeds 3 --workdir imbalance

Draws built-in scenes and writes a split list with a balanced test part (``--test-per-class``
per class) and a training part whose classes shrink by half each (``--train-counts``, 160 80
40 20 10 by default: 16 to 1), prepares it with ``rsscene prepare --split-file``, then runs
each variant as an ``rsscene bench`` of ``--seeds`` training seeds on that split, one after the
other in this process. The table gives balanced accuracy (AA, the mean per-class recall: the
number imbalance hurts), the recall of the smallest class, OA, kappa and macro-F1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from rsscene.bench import run_bench, summarize
from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import CLASSES, generate

VARIANTS = {
    "none": {},
    "--class-weights balanced": {"class_weights": "balanced"},
    "--sampler balanced": {"sampler": "balanced"},
}


def imbalanced_split(workdir: Path, train_counts: list[int], test: int, size: int) -> Path:
    """Scenes with a balanced test part and shrinking training classes, as a prepared split."""
    split = workdir / "split"
    if (split / "split.json").is_file():
        return split
    raw = workdir / "scenes"
    classes = CLASSES[: len(train_counts)]
    generate(raw, per_class=max(train_counts) + test, size=size, seed=0, classes=classes)
    lines = []
    for cls, n in zip(classes, train_counts, strict=True):
        names = sorted(p.name for p in (raw / cls).iterdir())
        lines += [f"test {cls}/{name}" for name in names[:test]]
        lines += [f"train {cls}/{name}" for name in names[test : test + n]]
    listing = workdir / "imbalanced.txt"
    listing.write_text("\n".join(lines) + "\n")
    prepare(raw, split, split_file=listing, mode="symlink")
    return split


def smallest_class_recall(run: str, smallest: str) -> float:
    report = json.loads((Path(run) / "report.json").read_text())
    return report["test"]["per_class"][smallest]["recall"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-counts", type=int, nargs="+", default=[160, 80, 40, 20, 10])
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--scene-size", type=int, default=48)
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--workdir", type=Path, help="keep runs here (default: a temp folder)")
    args = parser.parse_args(argv)

    settings = {"epochs": args.epochs, "img_size": args.img_size, "eval_size": args.img_size}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        split = imbalanced_split(workdir, args.train_counts, args.test_per_class, args.scene_size)
        smallest = CLASSES[args.train_counts.index(min(args.train_counts))]
        results = {}
        for name, change in VARIANTS.items():
            out = workdir / (name.strip("-").split()[0])
            record = run_bench(split, out, build({**settings, **change}), repeats=args.seeds)
            for r in record["repeats"]:
                r["smallest_recall"] = smallest_class_recall(r["run"], smallest)
            results[name] = record["repeats"]

    counts = " ".join(map(str, args.train_counts))
    lines = [
        f"training images per class {counts}, {args.test_per_class} test images per class;"
        f" mean ± sd over {args.seeds} seed(s)",
        "",
        f"| correction | AA (balanced accuracy) | recall of {smallest} | OA | kappa | macro-F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        s = summarize(runs)
        small = [r["smallest_recall"] for r in runs]
        sd = statistics.stdev(small) if len(small) > 1 else 0.0
        lines.append(
            f"| {name} | {100 * s['aa']['mean']:.1f} ± {100 * s['aa']['std']:.1f}%"
            f" | {100 * statistics.fmean(small):.1f} ± {100 * sd:.1f}%"
            f" | {100 * s['oa']['mean']:.1f}% | {s['kappa']['mean']:.3f}"
            f" | {100 * s['macro_f1']['mean']:.1f}% |"
        )
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
