"""``rsscene demo``: synth → prepare → train → evaluate → predict on built-in scenes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import generate
from rsscene.engine.evaluate import evaluate_checkpoint
from rsscene.engine.train import Trainer
from rsscene.errors import UserError
from rsscene.inference import Predictor, collect_images

# Sized, by measurement, to finish in under 5 minutes on a 2-core laptop CPU: many small scenes
# at a small size; the rest is the default recipe (AdamW, one-cycle, the 8 flips/rotations).
SCENES = {"per_class": 300, "size": 64}
RECIPE = {
    "arch": "resnet18",
    "epochs": 50,
    "batch_size": 64,
    "img_size": 56,
    "eval_size": 64,
    "crop_scale": (0.35, 1.0),
}


def run_demo(
    out: str | Path = "rsscene-demo",
    per_class: int | None = None,
    epochs: int | None = None,
    img_size: int | None = None,
    device: str = "auto",
) -> dict:
    """Run the whole pipeline in ``out`` and print where everything is; returns the report."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        # Only an earlier demo (finished or stopped) is replaced: anything else in the folder
        # may be the user's.
        if not any((out / mark).exists() for mark in ("demo.done", "demo.started")):
            raise UserError(f"{out} exists and is not an earlier demo; choose another --out DIR")
        shutil.rmtree(out)
    started = time.perf_counter()
    per_class = per_class or SCENES["per_class"]
    raw, split, run = out / "scenes", out / "split", out / "run"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.started").write_text("")

    print(f"[1/5] synth: {per_class} built-in scenes per class -> {raw}")
    generate(raw, per_class=per_class, size=SCENES["size"], seed=0)
    print(f"[2/5] prepare: stratified 80/20 split -> {split}")
    prepare(raw, split, test_ratio=0.2, seed=0, mode="hardlink")
    print("[3/5] train: ResNet-18 from scratch")
    settings = {**RECIPE, "data": str(split), "device": device, "out": str(run)}
    if epochs:
        settings["epochs"] = epochs
    if img_size:
        settings.update(img_size=img_size, eval_size=img_size)
    cfg = build(settings)
    Trainer.from_config(cfg).fit()
    print("[4/5] evaluate: last.pt on the test split")
    report = evaluate_checkpoint(run / "last.pt", split, out=run / "eval", tta=True)
    print("[5/5] predict: three test images")
    files, _ = collect_images([split / "test"])
    predictor = Predictor(run / "last.pt")
    results, _ = predictor.predict_files(files[:: max(1, len(files) // 3)][:3], topk=2)
    for r in results:
        print(f"  {r.source}: " + ", ".join(f"{c} {p:.2f}" for c, p in r.top))
    (out / "demo.done").write_text("")
    minutes = (time.perf_counter() - started) / 60
    print(f"\ncurves:           {run / 'curves.png'}")
    print(f"confusion matrix: {run / 'eval' / 'confusion.png'}")
    print(f"checkpoint:       {run / 'last.pt'}")
    print(
        f"demo finished in {minutes:.1f} min: test accuracy {report['accuracy']:.1%}"
        f" ({report['tta_accuracy']:.1%} with 8-way TTA)"
    )
    return report
