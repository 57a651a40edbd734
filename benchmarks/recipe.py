"""Accuracy and wall time: the tutorial's recipe against rsscene's default, in one run.

    python benchmarks/recipe.py --data ../shared/data/aid5 --seeds 3
    python benchmarks/recipe.py --data ../shared/data/aid5 --ablation      # one row per part changed
    python benchmarks/recipe.py --data ../shared/data/aid5 --ablation sgd crop   # some parts

DATA may be a raw one-folder-per-class dataset (split here with ``--test-ratio 0.1
--seed 0``, as the README's figures are) or an already prepared split. Both recipes train
from scratch on the same split, one after the other in this process, and the table gives
final-epoch test accuracy (the honest number), wall time and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import generate
from rsscene.engine.train import Trainer

# Each row changes one part of the default recipe: switches it off, back to the tutorial's
# choice, or (crop) to the candidate that the default left out.
ABLATIONS = {
    "sgd": ("SGD (Nesterov) instead of AdamW", {"optimizer": "sgd"}),
    "rotations": ("no 90-degree rotations (flips only)", {"augment": "hflip"}),
    "crop": ("random resized crop (area 25-100%, test at 1.25x)", {"crop_scale": (0.25, 1.0)}),
    "smoothing": ("no label smoothing", {"label_smoothing": 0.0}),
    "jitter": ("no colour jitter", {"jitter": 0.0}),
    "zero-init": ("no zero-init residual", {"zero_init_residual": False}),
    "wd-norm": ("weight decay on norm and bias", {"wd_norm_bias": True}),
    "cosine": ("cosine instead of one-cycle", {"schedule": "cosine"}),
    "fp32": ("float32, NCHW", {"amp": "off", "channels_last": False}),
}


def split_dataset(data: Path | None, workdir: Path) -> Path:
    if data is None:
        raw = workdir / "scenes"
        generate(raw, per_class=30, size=64, seed=0)
        data = raw
    if (data / "train").is_dir():
        return data
    dst = workdir / "split"
    prepare(data, dst, test_ratio=0.1, seed=0, mode="symlink")
    return dst


def run_one(split: Path, out: Path, settings: dict, seed: int) -> dict:
    cfg = build({"data": str(split), "seed": seed, "out": str(out), **settings})
    started = time.perf_counter()
    report = Trainer.from_config(cfg, log=lambda *_: None).fit()
    return {
        "accuracy": report["test_accuracy"],
        "tta": report["test_accuracy_tta"],
        "seconds": time.perf_counter() - started,
    }


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="raw class folders or a split (default: scenes)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1")
    parser.add_argument(
        "--tutorial-seeds",
        type=int,
        default=1,
        help="seeds for the tutorial's recipe, which costs several default runs (default 1)",
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, help="override both recipes' epochs (smoke tests)")
    parser.add_argument("--img-size", type=int, help="override both recipes' sizes (smoke tests)")
    parser.add_argument("--skip-tutorial", action="store_true", help="default recipe only")
    parser.add_argument(
        "--ablation",
        nargs="*",
        choices=sorted(ABLATIONS),
        metavar="PART",
        help=f"add one row per part changed: all, or some of {', '.join(ABLATIONS)}",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--workdir", type=Path, help="keep runs here (default: a temp folder)")
    args = parser.parse_args(argv)

    common: dict = {"arch": args.arch}
    if args.epochs:
        common["epochs"] = args.epochs
    if args.img_size:
        common.update(img_size=args.img_size, eval_size=args.img_size)
    recipes = {"rsscene default": dict(common)}
    if not args.skip_tutorial:
        recipes = {"tutorial (--tutorial)": {**common, "tutorial": True}, **recipes}
    if args.ablation is not None:
        for key in args.ablation or ABLATIONS:
            name, change = ABLATIONS[key]
            recipes[name] = {**common, **change}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        split = split_dataset(args.data, workdir)
        results: dict[str, list[dict]] = {}
        for name, settings in recipes.items():
            seeds = args.tutorial_seeds if settings.get("tutorial") else args.seeds
            for seed in range(seeds):
                slug = name.split(" (")[0].replace(" ", "-").replace(",", "")
                result = run_one(split, workdir / f"{slug}-s{seed}", settings, seed)
                results.setdefault(name, []).append(result)
                print(
                    f"{name} seed {seed}: accuracy {result['accuracy']:.4f}"
                    f" (TTA {result['tta']:.4f}) in {result['seconds']:.0f}s",
                    flush=True,
                )

    base = results.get("tutorial (--tutorial)")
    width = max(len(n) for n in results)
    print(
        f"\n{args.arch} on {args.data or 'built-in scenes'};"
        " final-epoch test accuracy, mean ± sd over the seeds"
    )
    print(f"{'recipe':<{width}}  seeds  accuracy         TTA      time (s)  time ratio  acc. diff")
    for name, runs in results.items():
        acc, acc_sd = summary(runs, "accuracy")
        tta, _ = summary(runs, "tta")
        secs, _ = summary(runs, "seconds")
        ratio = f"{secs / summary(base, 'seconds')[0]:.2f}" if base else "-"
        diff = f"{100 * (acc - summary(base, 'accuracy')[0]):+.1f} pt" if base else "-"
        print(
            f"{name:<{width}}  {len(runs):>5}  {100 * acc:5.1f} ± {100 * acc_sd:3.1f}%  {100 * tta:5.1f}%"
            f"  {secs:8.0f}  {ratio:>10}  {diff:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
