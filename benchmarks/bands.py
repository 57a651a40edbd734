"""All bands against the RGB bands of the same multispectral images, side by side.

    python benchmarks/bands.py --data ../shared/data/eurosat-ms --seeds 3

Splits DATA (raw class folders of multi-band GeoTIFFs) once, with ``--test-ratio`` and
seed 0, then trains the default recipe from scratch on that split for each band choice and
each seed (0..N-1), one after the other in this process: ``--bands all`` and ``--bands
4,3,2`` (Sentinel-2's red, green, blue in EuroSAT's band order) unless ``--choices`` says
otherwise. Prints final-epoch test accuracy per seed and its mean ± standard deviation.
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
from rsscene.engine.train import Trainer


def run_one(split: Path, out: Path, bands: str, seed: int, settings: dict) -> dict:
    cfg = build({"data": str(split), "bands": bands, "seed": seed, "out": str(out), **settings})
    started = time.perf_counter()
    report = Trainer.from_config(cfg, log=lambda *_: None).fit()
    return {
        "bands": bands,
        "seed": seed,
        "accuracy": report["test_accuracy"],
        "tta_accuracy": report["test_accuracy_tta"],
        "test_images": report["test"]["images"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="raw class folders of GeoTIFFs")
    parser.add_argument("--choices", nargs="+", default=["all", "4,3,2"], help="--bands values")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for each choice")
    parser.add_argument("--test-ratio", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--workdir", type=Path, help="keep the split and runs here")
    args = parser.parse_args(argv)
    settings = {
        "epochs": args.epochs,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        split = work / "split"
        prepare(args.data, split, test_ratio=args.test_ratio, seed=0, mode="symlink", force=True)
        runs = []
        for bands in args.choices:
            for seed in range(args.seeds):
                out = work / f"bands-{bands.replace(',', '-')}-seed{seed}"
                runs.append(run_one(split, out, bands, seed, settings))
                r = runs[-1]
                print(
                    f"--bands {bands:<8} seed {seed}: test accuracy {r['accuracy']:.1%}"
                    f" (TTA {r['tta_accuracy']:.1%}) on {r['test_images']} images,"
                    f" {r['seconds']:.0f} s",
                    flush=True,
                )
    print("\n| --bands | seeds | test accuracy (mean ± std) | per seed | with 8-way TTA | s/run |")
    print("|---|---:|---:|---|---:|---:|")
    for bands in args.choices:
        rows = [r for r in runs if r["bands"] == bands]
        accs = [100 * r["accuracy"] for r in rows]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        tta = statistics.mean(100 * r["tta_accuracy"] for r in rows)
        seconds = statistics.mean(r["seconds"] for r in rows)
        print(
            f"| {bands} | {len(rows)} | {statistics.mean(accs):.1f} ± {spread:.1f}% |"
            f" {', '.join(f'{a:.1f}' for a in accs)} | {tta:.1f}% | {seconds:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "runs": runs}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
