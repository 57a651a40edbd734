"""What the end of an epoch costs the training loop: evaluation and the run's files.

    python benchmarks/epoch_end.py                   # ResNet-18, generated scenes
    python benchmarks/epoch_end.py --epochs 8 --train 160 --test 640

Four runs of the same training (same seed, same images, so the same weights), side by
side in this process:

1. every epoch evaluated, last.pt/best.pt/metrics.csv/curves.png written after every epoch,
   before the next one starts (as rsscene first did);
2. the same files written in the background while the next epoch trains (``--save-interval
   0``, the default before the interval);
3. last.pt, best.pt and curves.png written at most every ``--save-interval`` seconds (the
   default 60: after the first and last epochs here), metrics.csv every epoch;
4. ``--eval-every K`` as well: the held-out split evaluated every K epochs and at the last.

The test part is four times the training part by default, as at the papers' 20% training
ratio, where evaluating it after every epoch costs about as much as the training itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsscene.config import TrainConfig, build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import CLASSES, generate
from rsscene.engine.runstate import BackgroundWrites
from rsscene.engine.train import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train", type=int, default=160, help="training images (all classes)")
    p.add_argument("--test", type=int, default=640, help="test images (all classes)")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=5, metavar="K", help="for the third run")
    return p.parse_args(argv)


def run(
    split: Path, out: Path, args: argparse.Namespace, threaded: bool, every: int, interval: float
) -> dict:
    """Train once; returns the seconds per epoch, those not spent in training steps (the
    ends of epochs, the final evaluation) and the final weights."""
    cfg = build(
        {
            "data": str(split),
            "arch": args.arch,
            "epochs": args.epochs,
            "img_size": args.img_size,
            "eval_every": every,
            "save_interval": interval,
            "out": str(out),
        }
    )
    trainer = Trainer.from_config(cfg, log=lambda *_: None)
    trainer.recorder.writes = BackgroundWrites(threaded=threaded)
    start = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - start
    training = sum(row["seconds"] for row in trainer.state.history)
    return {
        "epoch": total / args.epochs,
        "other": (total - training) / args.epochs,
        "model": trainer.net.state_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default = TrainConfig.save_interval
    runs = {
        "eval and files every epoch, written in the loop": (False, 1, 0),
        "eval and files every epoch, written in the background": (True, 1, 0),
        f"eval every epoch, files every {default:g} s (the default)": (True, 1, default),
        f"--eval-every {args.eval_every}, files every {default:g} s": (
            True,
            args.eval_every,
            default,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw, split = Path(tmp) / "raw", Path(tmp) / "split"
        total = args.train + args.test
        generate(raw, per_class=total // len(CLASSES), size=128, seed=0)
        prepare(raw, split, test_ratio=args.test / total, seed=0)
        results = {
            name: run(split, Path(tmp) / f"run{i}", args, *settings)
            for i, (name, settings) in enumerate(runs.items())
        }
    first = next(iter(results.values()))
    same = all(
        torch.equal(first["model"][k], r["model"][k]) for r in results.values() for k in r["model"]
    )
    print(
        f"{args.arch}, {args.train} training / {args.test} test images at {args.img_size} px,"
        f" {args.epochs} epochs; final weights identical in every run: {same}\n"
    )
    print("| run | s / epoch | s / epoch not in training steps | x the first run's time |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        ratio = r["epoch"] / first["epoch"]
        print(f"| {name} | {r['epoch']:.2f} | {r['other']:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
