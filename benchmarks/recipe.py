"""Accuracy and wall time: the tutorial's recipe against rsscene's default, in one run.

    python benchmarks/recipe.py --data ../shared/data/aid5 --seeds 3
    python benchmarks/recipe.py --data ../shared/data/aid5 --ablation      # one row per part changed
    python benchmarks/recipe.py --data ../shared/data/aid5 --ablation sgd crop   # some parts
    python benchmarks/recipe.py --data ../shared/data/aid5 --train-ratio 0.2 0.5 --seeds 3

DATA may be a raw one-folder-per-class dataset or an already prepared split. Without
``--train-ratio`` a raw dataset is split once here (``--test-ratio 0.1 --seed 0``, as the
README's first figures are) and the seeds vary the training only. With ``--train-ratio`` every
seed splits the raw dataset again at that training ratio: the papers' protocol, one row per
recipe and ratio. Each recipe's repeats are an ``rsscene bench`` (:func:`rsscene.bench.run_bench`)
in the work folder, so with ``--workdir`` an interrupted benchmark continues where it stopped.
All recipes train from scratch, one after the other in this process; the table gives the
final-epoch test accuracy (OA, the honest number) with AA, kappa and macro-F1, wall time and
the ratios to the tutorial's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rsscene.bench import run_bench, summarize
from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import generate

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


def raw_dataset(data: Path | None, workdir: Path) -> Path:
    """DATA, or built-in scenes drawn into the work folder."""
    if data is not None:
        return data
    raw = workdir / "scenes"
    if not raw.is_dir():
        generate(raw, per_class=30, size=64, seed=0)
    return raw


def split_once(data: Path, workdir: Path) -> Path:
    """DATA if it is a split, else its split with --test-ratio 0.1 --seed 0 (kept in the work
    folder, so that a continued benchmark reuses it)."""
    if (data / "train").is_dir():
        return data
    dst = workdir / "split"
    if not (dst / "split.json").is_file():
        prepare(data, dst, test_ratio=0.1, seed=0, mode="symlink", force=True)
    return dst


def slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "-").replace(",", "")


def table(results: dict[str, dict], base_name: str | None) -> list[str]:
    """One Markdown row per recipe and split, as mean ± sd over its repeats."""
    head = "| recipe | split | seeds | OA | AA | kappa | macro-F1 | TTA | wall time | time ratio |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, split), runs in results.items():
        s = summarize(runs)
        base = results.get((base_name, split))
        ratio = s["seconds"]["mean"] / summarize(base)["seconds"]["mean"] if base else None
        pct = [f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}%" for k in ("oa", "aa")]
        lines.append(
            f"| {name} | {split} | {len(runs)} | {' | '.join(pct)}"
            f" | {s['kappa']['mean']:.3f} ± {s['kappa']['std']:.3f}"
            f" | {100 * s['macro_f1']['mean']:.1f}% | {100 * s['tta_oa']['mean']:.1f}%"
            f" | {s['seconds']['mean'] / 60:.1f} min | {f'{ratio:.2f}' if ratio else '-'} |"
        )
    return lines


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
        "--eval-every",
        type=int,
        default=1,
        metavar="K",
        help="both recipes evaluate every K epochs and at the last (default 1: every epoch)",
    )
    parser.add_argument(
        "--ablation",
        nargs="*",
        choices=sorted(ABLATIONS),
        metavar="PART",
        help=f"add one row per part changed: all, or some of {', '.join(ABLATIONS)}",
    )
    parser.add_argument(
        "--train-ratio",
        type=float,
        nargs="+",
        metavar="R",
        help="the papers' protocol: split the raw DATA again per seed at each training ratio",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    parser.add_argument("--workdir", type=Path, help="keep runs here (default: a temp folder)")
    args = parser.parse_args(argv)

    common: dict = {"arch": args.arch, "eval_every": args.eval_every}
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
        data = raw_dataset(args.data, workdir)
        if args.train_ratio:
            splits = {f"train {r:.0%}, new split per seed": (data, r) for r in args.train_ratio}
        else:
            splits = {"test 10%, seed 0": (split_once(data, workdir), None)}
        results: dict[tuple[str, str], list[dict]] = {}
        for name, settings in recipes.items():
            seeds = args.tutorial_seeds if settings.get("tutorial") else args.seeds
            for label, (data, ratio) in splits.items():
                out = workdir / slug(name) / (f"train-{ratio:g}" if ratio else "fixed-split")
                record = run_bench(data, out, build(settings), repeats=seeds, train_ratio=ratio)
                results[name, label] = record["repeats"]

    base = "tutorial (--tutorial)" if not args.skip_tutorial else None
    lines = [
        f"{args.arch} on {args.data or 'built-in scenes'}; final-epoch test metrics, mean ± sd"
        " over the seeds",
        "",
        *table(results, base),
    ]
    print("\n" + "\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        rows = [{"recipe": n, "split": s, "runs": runs} for (n, s), runs in results.items()]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
