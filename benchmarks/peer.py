"""Time to accuracy: timm's training recipe, the tutorial's and rsscene's default, in one run
on the same split, ResNet-18 from scratch, drawn as test accuracy against training seconds.

    pip install "rsscene[peer]"          # timm, for this benchmark only
    python benchmarks/peer.py --data ../shared/data/aid5 --figure docs/peer-aid5.png
    python benchmarks/peer.py --data ../shared/data/siri12 --recipes timm default

The timm row is what a user of timm's ``train.py`` gets with the settings in :data:`TIMM`
(its defaults where not named): timm's own model, transforms (random resized crops with a
random interpolation, flips, colour jitter 0.4; test images resized by 1/crop_pct and
centre-cropped), optimizer (SGD, no weight decay on norm and bias), cosine schedule with
warm-up, label smoothing, bf16 autocast where the CPU has it, channels_last, and a
``DataLoader`` with workers decoding every image every epoch. The loop is train.py's, reduced
to one process (its CUDA-only prefetcher, which normalises on the GPU, is left out).

Every recipe is evaluated on the test part after each epoch, for the curve; the x axis and
the "training" column count only training time, so how often a recipe evaluates does not
move it. DATA is a split (train/ and test/) or a raw one-folder-per-class dataset, split
here with ``--test-ratio 0.1 --seed 0`` as the README's AID-5 figures are.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets

from recipe import split_once  # benchmarks/recipe.py: the same split as the README's
from rsscene.config import build
from rsscene.device import (
    amp_dtype,
    autocast,
    default_workers,
    select_device,
    synchronize,
)
from rsscene.engine.train import Trainer

# The timm recipe measured in issue 20: ResNet-18 from scratch at 128 px, random resized
# crops, SGD lr 0.2 with a cosine schedule and 3 warm-up epochs, horizontal and vertical
# flips, label smoothing 0.1, bf16, channels_last, batch 64, 40 epochs.
TIMM = {
    "epochs": 40,
    "img_size": 128,
    "batch_size": 64,
    "lr": 0.2,
    "momentum": 0.9,
    "weight_decay": 2e-5,  # train.py's default
    "warmup_epochs": 3,
    "warmup_lr": 1e-5,
    "smoothing": 0.1,
    "scale": (0.08, 1.0),
    "hflip": 0.5,
    "vflip": 0.5,
    "color_jitter": 0.4,
    "interpolation": "random",  # train.py's --train-interpolation default
}
RECIPES = ("timm", "tutorial", "default")
LABELS = {
    "timm": "timm train.py recipe",
    "tutorial": "tutorial (--tutorial)",
    "default": "rsscene default",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="split folder or class folders")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke tests)")
    p.add_argument("--img-size", type=int, help="override every recipe's size (smoke tests)")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="timm's DataLoader workers (default: the CPUs, up to 8; train.py's -j is 4)",
    )
    p.add_argument("--device", default="auto", help="every recipe's device: auto, cpu, cuda")
    p.add_argument("--figure", type=Path, help="accuracy against training seconds (PNG)")
    p.add_argument("--json", type=Path, help="every epoch of every recipe")
    p.add_argument("--workdir", type=Path, help="keep the split and runs (default: temp)")
    return p.parse_args(argv)


def run_timm(split: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    """timm's recipe; returns one row per epoch (training seconds, test accuracy)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import NativeScaler, random_seed

    hp = {**TIMM, **{k: v for k, v in (("epochs", args.epochs), ("img_size", args.img_size)) if v}}
    random_seed(args.seed)  # torch, numpy and random, as train.py seeds them
    device = select_device(args.device)
    amp = amp_dtype("auto", device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py sets it
    # train.py's loss scaler for float16 (bf16 needs none).
    scaler = NativeScaler() if amp == torch.float16 else None
    classes = sorted(p.name for p in (split / "train").iterdir() if p.is_dir())
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(classes))
    model = model.to(device, memory_format=torch.channels_last)
    config = resolve_data_config({"input_size": (3, hp["img_size"], hp["img_size"])}, model=model)
    train_tf = create_transform(
        **{**config, "interpolation": hp["interpolation"]},
        is_training=True,
        scale=hp["scale"],
        hflip=hp["hflip"],
        vflip=hp["vflip"],
        color_jitter=hp["color_jitter"],
    )
    test_tf = create_transform(**config)
    loader_args = {
        "batch_size": hp["batch_size"],
        "num_workers": args.workers,
        "persistent_workers": args.workers > 0,
    }
    train_set = datasets.ImageFolder(str(split / "train"), train_tf)
    test_set = datasets.ImageFolder(str(split / "test"), test_tf)
    if test_set.classes != train_set.classes:
        sys.exit(f"{split}: test/ has classes {test_set.classes}, train/ {train_set.classes}")
    train = DataLoader(train_set, shuffle=True, drop_last=True, **loader_args)
    test = DataLoader(test_set, **loader_args)
    optimizer = create_optimizer_v2(
        model, "sgd", lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=hp["momentum"]
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=hp["epochs"],
        warmup_epochs=hp["warmup_epochs"],
        warmup_lr=hp["warmup_lr"],
    )
    loss_fn = LabelSmoothingCrossEntropy(hp["smoothing"])
    rows = []
    for epoch in range(hp["epochs"]):
        model.train()
        start = time.perf_counter()
        for x, y in train:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                loss = loss_fn(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
        scheduler.step(epoch + 1)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append({"epoch": epoch + 1, "seconds": seconds, "test_acc": accuracy(model, test)})
        print(f"timm epoch {epoch + 1}/{hp['epochs']}: {rows[-1]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    device = next(model.parameters()).device
    amp = amp_dtype("auto", device)
    right = seen = 0
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x.to(device).contiguous(memory_format=torch.channels_last))
        right += int((logits.argmax(1).cpu() == y).sum())
        seen += len(y)
    return right / seen


def run_rsscene(split: Path, args: argparse.Namespace, out: Path, tutorial: bool) -> list[dict]:
    settings = {"data": str(split), "seed": args.seed, "tutorial": tutorial, "out": str(out)}
    settings["device"] = args.device
    if args.epochs:
        settings["epochs"] = args.epochs
    if args.img_size:
        settings.update(img_size=args.img_size, eval_size=args.img_size)
    trainer = Trainer.from_config(build(settings))
    trainer.fit()
    return [
        {"epoch": r["epoch"], "seconds": r["seconds"], "test_acc": r["test_acc"]}
        for r in trainer.state.history
    ]


def draw(results: dict[str, dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, r in results.items():
        t, acc = 0.0, []
        for row in r["epochs"]:
            t += row["seconds"]
            acc.append((t / 60, 100 * row["test_acc"]))
        ax.plot(*zip(*acc, strict=True), marker=".", label=LABELS[name])
    ax.set(xlabel="training time (min)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        split = split_once(args.data, workdir)
        for name in args.recipes:
            start = time.perf_counter()
            out = workdir / name
            if name == "timm":
                epochs = run_timm(split, args, out)
            else:
                epochs = run_rsscene(split, args, out, tutorial=name == "tutorial")
            wall = time.perf_counter() - start
            train = sum(row["seconds"] for row in epochs)
            results[name] = {"epochs": epochs, "train_seconds": train, "wall_seconds": wall}
    base = results.get("timm")
    print(
        f"\nResNet-18 on {args.data}, seed {args.seed}. Training: the epochs' steps (and"
        " timm's decoding) only; whole run: also decoding the images once (rsscene's cache),"
        " evaluating every epoch and the final report\n"
    )
    print(
        "| recipe | epochs | final test accuracy | best epoch's | training | x timm"
        " | whole run | x timm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        final, best = r["epochs"][-1]["test_acc"], max(row["test_acc"] for row in r["epochs"])
        cells = [f"{100 * final:.1f}%", f"{100 * best:.1f}%"]
        for key in ("train_seconds", "wall_seconds"):
            ratio = f"{r[key] / base[key]:.2f}" if base else "-"
            cells += [f"{r[key] / 60:.1f} min", ratio]
        print(f"| {LABELS[name]} | {len(r['epochs'])} | {' | '.join(cells)} |")
    if args.figure:
        draw(results, args.figure, f"ResNet-18 from scratch on {args.data.name}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
