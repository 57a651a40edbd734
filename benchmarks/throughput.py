"""Training and inference images/s of three loops on the same images, model and device.

(a) the tutorial's loop: torchvision ``ImageFolder`` decoding and resizing every image every
    step (Resize, RandomHorizontalFlip, ToTensor), DataLoader defaults, float32, NCHW, Adam;
    inference in ``no_grad`` with the same per-image pipeline.
(b) a loop in the style of torchvision's classification reference script: ImageFolder with
    DataLoader workers, RandomResizedCrop/flip/ToTensor/Normalize, autocast where the device
    has a fast low precision (bf16 on a CPU that supports it, bf16 or fp16 on CUDA), SGD;
    inference under autocast in ``inference_mode``.
(c) rsscene itself: a :class:`rsscene.engine.train.Trainer` given the images through its
    public API (decoded cache, batch augmentation, channels_last, autocast), its own epoch
    loop timed, and :func:`rsscene.engine.evaluate.predict` for inference.

Each loop runs in its own process, one after the other, so each has its own peak RSS and
none inherits another's memory. Each trains ``--warmup`` steps untimed, then ``--steps``
timed, and infers ``--warmup`` batches untimed, then ``--infer-batches`` timed::

    python benchmarks/throughput.py --data ../shared/data/aid5 --arch resnet18 --img-size 224

Without ``--data`` it generates rsscene's built-in scenes into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from rsscene.config import COMPILE_MODES, TUTORIAL, TrainConfig
from rsscene.data.datasets import BatchLoader, TrainData, list_images
from rsscene.data.synthetic import CLASSES, generate
from rsscene.data.transforms import MEAN, STD
from rsscene.device import amp_dtype, autocast, default_workers, select_device, synchronize
from rsscene.engine import recipe
from rsscene.engine.evaluate import predict
from rsscene.engine.train import Trainer
from rsscene.models import create_model

LOOPS = {
    "a": "(a) tutorial",
    "b": "(b) torchvision reference",
    "c": "(c) rsscene",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="split folder (its train/) or class folders; default: scenes")
    p.add_argument("--arch", default="resnet18", help="resnet18, resnet50, ... (default resnet18)")
    p.add_argument("--img-size", type=int, default=224, help="train and inference resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (and batches) first")
    p.add_argument("--infer-batches", type=int, help="timed inference batches (default --steps)")
    p.add_argument("--workers", type=int, default=default_workers(), help="for (b) and (c)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="count wall seconds (default) or each loop's own CPU seconds, which other work on a"
        " shared CPU cannot inflate (with --threads 1 --workers 0, or workers' time is missed)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads per loop (default torch's)")
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="(c) trains a torch.compile'd model in this mode (reduce-overhead: CUDA graphs on a"
        " GPU); compiling falls in the --warmup steps",
    )
    p.add_argument("--loops", default="abc", help="which loops to run (default abc)")
    p.add_argument("--scenes", type=int, help="generated scenes (default: enough for the steps)")
    p.add_argument("--scene-size", type=int, default=256, help="generated scenes' size (px)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    # Set by the parent for the process that runs one loop.
    p.add_argument("--loop", choices=sorted(LOOPS), help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.infer_batches is None:
        args.infer_batches = args.steps
    if min(args.steps, args.infer_batches, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --infer-batches and --batch-size must be positive, --warmup >= 0")
    if set(args.loops) - set(LOOPS) or not args.loops:
        p.error(f"--loops takes letters among {''.join(LOOPS)}")
    return args


# --------------------------------------------------------------------------- timing
def clocks() -> tuple[float, float]:
    """Wall and CPU seconds: the CPU time of this process is what other processes cannot steal."""
    return time.perf_counter(), time.process_time()


def rates(images: int, start: tuple[float, float]) -> dict[str, float]:
    """Images per wall second and per CPU second since ``start``."""
    spent = [max(now - then, 1e-9) for now, then in zip(clocks(), start, strict=True)]
    return {"wall": images / spent[0], "cpu": images / spent[1]}


def images_per_s(
    batches: Iterator[Any],
    step: Callable[[Any], int],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    """Run ``step`` (which returns its batch's image count) ``warmup`` times, then time ``steps``."""
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)
    start, seen = clocks(), 0
    for _ in range(steps):
        seen += step(next(batches))
    synchronize(device)
    return rates(seen, start)


def forever(loader: DataLoader) -> Iterator[Any]:
    return itertools.chain.from_iterable(itertools.repeat(loader))


# --------------------------------------------------------------------------- (a) and (b)
def torchvision_loop(args: argparse.Namespace, device: torch.device, reference: bool) -> dict:
    """The tutorial's loop, or the reference script's (``reference``): both per-image pipelines."""
    size = args.img_size
    if reference:
        normalize = transforms.Normalize(MEAN, STD)
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        eval_tf = transforms.Compose(
            [transforms.Resize((size, size)), transforms.ToTensor(), normalize]
        )
        workers, dtype = args.workers, amp_dtype("auto", device)
    else:
        # A (size, size) pair: the tutorial's Resize(224) on its square images, and square
        # batches on any other.
        train_tf = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
        eval_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
        workers, dtype = 0, None
    loader_args = dict(
        batch_size=args.batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=reference and device.type == "cuda",
        drop_last=True,
    )
    train_set = datasets.ImageFolder(args.images, train_tf)
    model = create_model(args.arch, num_classes=len(train_set.classes)).to(device)
    if reference:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=TUTORIAL["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        x, y = (t.to(device, non_blocking=reference) for t in batch)
        with autocast(device, dtype):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # both scripts log the running loss every step
        return len(y)

    def infer_step(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        x, y = (t.to(device, non_blocking=reference) for t in batch)
        with autocast(device, dtype):
            correct = (model(x).argmax(1) == y).sum()
        correct.item()  # both count correct predictions batch by batch
        return len(y)

    model.train()
    train = images_per_s(
        forever(DataLoader(train_set, shuffle=True, **loader_args)),
        train_step,
        args.warmup,
        args.steps,
        device,
    )
    model.eval()
    with torch.no_grad() if not reference else torch.inference_mode():
        infer = images_per_s(
            forever(DataLoader(datasets.ImageFolder(args.images, eval_tf), **loader_args)),
            infer_step,
            args.warmup,
            args.infer_batches,
            device,
        )
    return {
        "train": train,
        "infer": infer,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "layout": "NCHW",
        "workers": workers,
    }


# --------------------------------------------------------------------------- (c)
def rsscene_loop(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """A :class:`Trainer` given the images as its data: its own epoch loop timed over
    ``--steps`` steps after ``--warmup``, then :func:`predict` for inference."""
    cfg = TrainConfig(
        arch=args.arch,
        batch_size=args.batch_size,
        img_size=args.img_size,
        eval_size=args.img_size,  # inference at the same resolution as the other loops
        device=str(device),
        workers=args.workers,
        compile=args.compile is not None,
        compile_mode=args.compile or "default",
        out=str(work / "run"),
    )
    start = time.perf_counter()
    images = list_images(args.images)
    data = TrainData(BatchLoader(images, args.img_size, cfg.cache, args.workers, device))
    model, _ = recipe.build_model(cfg, len(images.classes))
    trainer = Trainer(cfg, model, data, device=device, log=lambda *_: None)
    setup = time.perf_counter() - start
    loader = data.train

    def batches(count: int, epoch: int) -> list[list[int]]:
        # Successive permutations when one epoch of data is too short for ``count`` steps.
        out: list[list[int]] = []
        for n in itertools.count():
            if len(out) >= count:
                return out[:count]
            out += trainer.epoch_batches(2 * n + epoch)

    def infer(rows: list[int]) -> None:
        predict(
            trainer.eval_model,
            loader,
            rows,
            size=trainer.cfg.eval_size,
            normalize=trainer.cfg.normalize,
            batch_size=args.batch_size,
            amp_dtype=trainer.amp,
            channels_last=trainer.cfg.channels_last,
        )

    trainer.train_epoch(0, batches(args.warmup, 0))
    synchronize(device)
    start = clocks()
    trainer.train_epoch(1, batches(args.steps, 1))
    synchronize(device)
    train = rates(args.steps * args.batch_size, start)
    rows = [i % len(loader) for i in range((args.warmup + args.infer_batches) * args.batch_size)]
    infer(rows[: args.warmup * args.batch_size])
    synchronize(device)
    start = clocks()
    infer(rows[args.warmup * args.batch_size :])
    synchronize(device)
    cache = loader.cache.images if loader.cache is not None else None
    return {
        "train": train,
        "infer": rates(args.infer_batches * args.batch_size, start),
        "precision": str(trainer.amp or torch.float32).removeprefix("torch."),
        "layout": "channels_last" if trainer.cfg.channels_last else "NCHW",
        "workers": args.workers,
        "cache": loader.mode,
        "cache_mib": cache.nbytes / 2**20 if cache is not None else 0.0,
        "cache_shape": list(cache.shape) if cache is not None else None,
        "setup_s": setup,
    }


def run_loop(args: argparse.Namespace) -> dict:
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rsscene-bench-") as tmp:
        if args.loop == "c":
            result = rsscene_loop(args, device, Path(tmp))
        else:
            result = torchvision_loop(args, device, reference=args.loop == "b")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"loop": LOOPS[args.loop], **result, "peak_rss_mib": usage.ru_maxrss / 1024}


# --------------------------------------------------------------------------- the table
def format_table(rows: list[dict], clock: str) -> str:
    """A markdown table of images per ``clock`` second ("wall" or "cpu") and ratios to (a)."""
    base = next((r for r in rows if r["loop"] == LOOPS["a"]), None)
    unit = "img/s" if clock == "wall" else "img/CPU-s"
    header = ["loop", f"train {unit}", f"infer {unit}", "train x(a)", "infer x(a)", "peak RSS MiB"]
    lines = []
    for r in rows:
        train, infer = r["train"][clock], r["infer"][clock]
        ratio = (
            (f"{train / base['train'][clock]:.2f}", f"{infer / base['infer'][clock]:.2f}")
            if base
            else ("-", "-")
        )
        lines.append(
            [
                r["loop"],
                f"{train:.1f}",
                f"{infer:.1f}",
                *ratio,
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    out.append(
        "|"
        + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    for line in lines:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        line = f"{r['loop']}: {r['precision']}, {r['layout']}, "
        if "cache" not in r:
            by = f"{r['workers']} DataLoader workers" if r["workers"] else "the training process"
            out.append(line + f"every image decoded every step by {by}")
            continue
        shape = " x ".join(map(str, r["cache_shape"])) if r["cache_shape"] else "-"
        out.append(
            line + f"decoded cache {r['cache']}: {r['cache_mib']:.1f} MiB (uint8 {shape}),"
            f" built by {r['workers']} workers in {r['setup_s']:.1f} s (set-up, untimed: once"
            " per run in memory, once per dataset on disk)"
        )
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def image_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The class folders to read, and a description of them."""
    if args.data:
        root = Path(args.data)
        root = root / "train" if (root / "train").is_dir() else root
        return root, str(root)
    need = max(args.warmup, args.steps, args.infer_batches) * args.batch_size
    per_class = math.ceil((args.scenes or need) / len(CLASSES))
    generate(tmp / "scenes", per_class=per_class, size=args.scene_size)
    return tmp / "scenes", f"{per_class * len(CLASSES)} generated scenes at {args.scene_size} px"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop:
        Path(args.result).write_text(json.dumps(run_loop(args)))
        return 0
    argv = sys.argv[1:] if argv is None else list(argv)
    device = select_device(args.device)
    with tempfile.TemporaryDirectory(prefix="rsscene-bench-") as tmp:
        images, described = image_folder(args, Path(tmp))
        n_images = len(list_images(images))
        if n_images < args.batch_size:
            raise SystemExit(f"{described}: {n_images} images, fewer than one batch")
        rows = []
        for loop in args.loops:
            result = Path(tmp) / f"{loop}.json"
            command = [sys.executable, __file__, *argv, "--loop", loop, "--images", str(images)]
            subprocess.run([*command, "--result", str(result)], check=True)
            rows.append(json.loads(result.read_text()))
    settings = {
        "arch": args.arch,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "device": f"{device} ({device_name(device)}, {len(os.sched_getaffinity(0))} CPUs)",
        "threads": args.threads or torch.get_num_threads(),
        "compile (c)": args.compile or "off",
        "clock": args.clock,
        "steps": args.steps,
        "warmup": args.warmup,
        "infer_batches": args.infer_batches,
        "images": f"{n_images} ({described})",
        "torch": str(torch.__version__),
    }
    print(", ".join(f"{k} {v}" for k, v in settings.items()))
    print(format_table(rows, args.clock))
    for line in notes(rows):
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
