"""The ``rsscene`` command line: argument parsing only, one function per subcommand.

Each ``cmd_*`` function turns parsed arguments into a call to the library; a user's
mistake (:class:`rsscene.errors.UserError`) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rsscene import __version__
from rsscene.device import AMP_MODES
from rsscene.errors import UserError
from rsscene.models import MODELS, VARIANTS
from rsscene.serve.hosts import LOOPBACK, served_host_names

if TYPE_CHECKING:
    from rsscene.inference import Predictor


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes argparse's one-line message."""

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse_flag.__name__ = getattr(parse, "__name__", "value")
    return parse_flag


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --------------------------------------------------------------------------- info
def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="the ResNet family: blocks, output sizes, parameters, GFLOPs")
    p.add_argument("arch", nargs="?", choices=list(MODELS), help="one architecture (default: all)")
    p.add_argument("--variant", choices=VARIANTS, default="v1.5")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from rsscene.config import check_size
    from rsscene.models.summary import format_table, summarize

    check_size("img_size", args.img_size)
    archs = [args.arch] if args.arch else list(MODELS)
    rows = [summarize(a, args.variant, args.num_classes, args.img_size) for a in archs]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(
            f"ResNet {args.variant}, {args.img_size}x{args.img_size} input, "
            f"{args.num_classes} classes (GFLOPs = multiply-adds)"
        )
        print(format_table(rows))
    return 0


# --------------------------------------------------------------------------- prepare
def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="split a one-folder-per-class dataset into train/val/test",
        description="Check every image, then split SRC/CLASS/* into DST/{train,val,test}/CLASS/* "
        "(stratified, deterministic) with a manifest DST/split.json.",
    )
    p.add_argument("src", metavar="SRC", help="raw dataset: one folder per class")
    p.add_argument("dst", metavar="DST", help="where to write train/, val/, test/, split.json")
    p.add_argument("--classes", type=comma_list, help="comma-separated classes (default: all)")
    p.add_argument("--train-per-class", type=positive_int, metavar="N", help="exact train count")
    p.add_argument("--test-per-class", type=positive_int, metavar="N", help="exact test count")
    p.add_argument("--val-per-class", type=positive_int, metavar="N", help="exact val count")
    p.add_argument("--test-ratio", type=ratio, metavar="R", help="test share (default 0.1)")
    p.add_argument(
        "--train-ratio",
        type=ratio,
        metavar="R",
        help="train share of each class, the rest tests (the papers' training ratio)",
    )
    p.add_argument(
        "--val-ratio", type=ratio, default=0.0, metavar="R", help="val share (default 0)"
    )
    p.add_argument(
        "--split-file",
        metavar="FILE",
        help="reproduce a published split: lines 'PART FILE' (train/val/test, CLASS/name or"
        " name), or an rsscene split.json",
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--mode", choices=["copy", "hardlink", "symlink"], default="copy")
    p.add_argument("--force", action="store_true", help="replace a split prepare wrote in DST")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable image")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from rsscene.data.prepare import format_report, prepare

    result = prepare(
        args.src,
        args.dst,
        classes=args.classes,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        val_per_class=args.val_per_class,
        test_ratio=args.test_ratio,
        val_ratio=args.val_ratio,
        train_ratio=args.train_ratio,
        split_file=args.split_file,
        seed=args.seed,
        mode=args.mode,
        force=args.force,
        strict=args.strict,
    )
    print(format_report(result))
    return 0


# --------------------------------------------------------------------------- synth
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write built-in aerial scenes (one folder per class)")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--per-class", type=positive_int, default=100, metavar="N")
    p.add_argument("--size", type=positive_int, default=128, metavar="PX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=comma_list, help="subset of the built-in classes")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument(
        "--mosaic",
        type=grid_shape,
        metavar="ROWSxCOLS",
        help="write one large scene of ROWSxCOLS scenes instead (DST/mosaic.png, its truth in"
        " DST/mosaic.csv), for checking `rsscene map`",
    )
    p.set_defaults(func=cmd_synth)


def grid_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x8, got {text}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive ROWSxCOLS, got {text}")
    return rows, cols


def cmd_synth(args: argparse.Namespace) -> int:
    from rsscene.data.synthetic import CLASSES, generate, generate_mosaic

    if args.mosaic:
        rows, cols = args.mosaic
        try:
            generate_mosaic(args.dst, rows, cols, args.size, args.seed, args.classes or CLASSES)
        except ValueError as e:
            raise UserError(str(e)) from None
        print(f"wrote a {rows}x{cols} mosaic of {args.size} px scenes to {args.dst}/mosaic.png")
        return 0
    try:
        counts = generate(
            args.dst,
            args.per_class,
            args.size,
            args.seed,
            classes=args.classes or CLASSES,
            fmt=args.format,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    print(
        f"wrote {sum(counts.values())} scenes ({', '.join(f'{c} {n}' for c, n in counts.items())})"
        f" to {args.dst}"
    )
    return 0


# --------------------------------------------------------------------------- train
# Flags of train that are not settings of a run.
RUN_FLAGS = ("config", "resume", "auto_resume", "weights_only")


def add_setting_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """One flag per :class:`TrainConfig` field (but those in ``exclude``), from its metadata:
    ``--batch-size`` for ``batch_size``, ``--X/--no-X`` for booleans. Every default is None,
    so that only the flags given override a ``--config`` file."""
    from dataclasses import MISSING, fields

    from rsscene.config import TrainConfig, setting_types

    kinds = setting_types()
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        meta, kind = f.metadata, kinds[f.name]
        shown = "" if f.default in (None, MISSING) else f" (default: {f.default})"
        if isinstance(f.default, tuple):
            shown = f" (default: {','.join(f'{v:g}' for v in f.default)})"
        options = {"help": meta["help"] + shown, "default": None}
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if meta["positional"]:
            p.add_argument(f.name, nargs="?", **options)
        elif kind is bool:
            flag = f"--{f.name.replace('_', '-')}"
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            flag = f"--{f.name.replace('_', '-')}"
            parse = flag_type(meta["parse"]) if meta["parse"] else kind
            p.add_argument(flag, type=parse, choices=meta["choices"], **options)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a ResNet on DATA/train, evaluating on DATA/test every epoch",
        description="Train with rsscene's default recipe (or --tutorial's). Settings not given"
        " are chosen for the device; a --config file (YAML/TOML, same names) sets defaults that"
        " flags override.",
    )
    add_setting_flags(p)
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings")
    p.add_argument(
        "--resume", metavar="RUN", help="continue the run in this folder (or its last.pt)"
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from --out's last.pt if there is one, else start (for torchrun restarts)",
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="with --resume: start a new run from the checkpoint's weights only",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rsscene import config
    from rsscene.engine.runstate import resume_config
    from rsscene.engine.train import Trainer
    from rsscene.errors import Interrupted

    given = {k: v for k, v in vars(args).items() if k in config.field_names() and v is not None}
    if args.auto_resume:
        if args.resume or not args.out:
            raise UserError("--auto-resume needs --out RUN (and no --resume)")
        if (Path(args.out) / "last.pt").is_file():
            args.resume = args.out
    if args.resume and args.weights_only:
        given.setdefault("weights", args.resume)
        resume = None
    else:
        resume = args.resume
    if resume:
        cfg = resume_config(resume, given)
    else:
        if not given.get("data") and not args.config:
            raise UserError("DATA is required (a folder with train/ and test/), or --resume RUN")
        cfg = config.build(given, args.config)
        if not cfg.data:
            raise UserError("DATA is required (a folder with train/ and test/)")
    try:
        Trainer.from_config(cfg, resume=resume).fit()
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    return 0


# --------------------------------------------------------------------------- bench
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="the papers' protocol: repeated random splits at a training ratio, mean ± std",
        description="Split DATA again for each repeat (seed S+i: --train-ratio of each class"
        " trains, the rest tests), train and evaluate each, and write OA, AA, kappa and"
        " macro-F1 as mean ± std with wall times to DIR/bench.md and DIR/bench.json. Every"
        " flag of rsscene train applies to each repeat. The same command again continues an"
        " interrupted bench: finished repeats are skipped, an interrupted one resumes.",
    )
    p.add_argument("bench_data", metavar="DATA", help="raw dataset (one folder per class)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the repeats and table go")
    p.add_argument("--train-ratio", type=ratio, metavar="R", help="train share of each class")
    p.add_argument(
        "--val-ratio", type=ratio, default=0.0, metavar="R", help="val share (default 0)"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="random splits (default 5)")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of training settings")
    add_setting_flags(p, exclude=("data", "out"))
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from rsscene import config
    from rsscene.bench import run_bench
    from rsscene.errors import Interrupted

    given = {k: v for k, v in vars(args).items() if k in config.field_names() and v is not None}
    cfg = config.build(given, args.config)
    try:
        record = run_bench(
            args.bench_data,
            args.out,
            cfg,
            repeats=args.repeats,
            train_ratio=args.train_ratio,
            val_ratio=args.val_ratio,
        )
    except Interrupted as e:
        print(f"{e}\nbench: run the same command again to continue", file=sys.stderr)
        return 128 + e.signum
    from pathlib import Path

    print()
    print((Path(args.out) / "bench.md").read_text(), end="")
    print(f"\n{len(record['repeats'])} repeat(s); table in {args.out}/bench.md and bench.json")
    return 0


# --------------------------------------------------------------------------- checkpoints
TTA_HELP = "average the 8 flips/rotations"


def add_checkpoint_args(
    p: argparse.ArgumentParser, *, device: bool = True, batch_size: bool = False, tta: str = ""
) -> None:
    """CKPT and the flags shared by the commands that read one: ``--device`` (without it, the
    CPU), ``--batch-size`` where they batch images, and ``--tta`` where ``tta`` gives its help."""
    p.add_argument("checkpoint", metavar="CKPT", help="a .pt file or a run folder")
    if tta:
        p.add_argument("--tta", action="store_true", help=tta)
    if batch_size:
        p.add_argument("--batch-size", type=positive_int, default=64)
    if device:
        p.add_argument("--device", default="cpu")
    else:
        p.set_defaults(device="cpu")


def checkpoint_device(args: argparse.Namespace) -> str:
    """The device ``--device`` names, refused (UserError) where this machine lacks it."""
    from rsscene.device import select_device

    return str(select_device(args.device))


def open_predictor(args: argparse.Namespace) -> Predictor:
    """CKPT's model and preprocessing, on ``--device``."""
    from rsscene.inference import Predictor

    return Predictor(args.checkpoint, device=checkpoint_device(args))


def warn_skipped(errors: list[tuple[str, str]]) -> None:
    """One line per image left out, on stderr so that stdout holds only results."""
    for f, reason in errors:
        print(f"skipped {f}: {reason}", file=sys.stderr)


def nothing_read(verb: str, errors: list[tuple[str, str]]) -> UserError:
    """The error for a command that could read none of its images: the first reasons why."""
    detail = "; ".join(f"{f}: {r}" for f, r in errors[:3]) or "no image files found"
    more = f" and {len(errors) - 3} more" if len(errors) > 3 else ""
    return UserError(f"nothing to {verb} ({detail}{more})")


# --------------------------------------------------------------------------- evaluate
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class report and confusion matrix")
    add_checkpoint_args(p, batch_size=True, tta="also report 8-way flip/rotation TTA")
    p.add_argument("data", metavar="DATA", help="a split folder (its test part) or class folders")
    p.add_argument(
        "--output",
        "-o",
        metavar="DIR",
        help="write report.json, confusion.*, "
        "misclassified.csv here (default: beside the checkpoint, eval-DATA)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable image")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rsscene.engine.evaluate import evaluate_checkpoint, format_report

    ckpt = Path(args.checkpoint)
    out = args.output or (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval-{Path(args.data).name}"
    report = evaluate_checkpoint(
        ckpt,
        args.data,
        out=out,
        tta=args.tta,
        batch_size=args.batch_size,
        device=checkpoint_device(args),
        strict=args.strict,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    print(f"reports written to {out}")
    return 0


# --------------------------------------------------------------------------- predict
def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="class names and probabilities for images or folders")
    add_checkpoint_args(p, batch_size=True, tta=TTA_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH", help="images or folders (recursive)")
    p.add_argument("--topk", type=positive_int, default=3)
    p.add_argument("--output", "-o", metavar="FILE", help="write .csv or .json")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable image")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from rsscene.inference import (
        PREDICTION_FILES,
        collect_images,
        format_predictions,
        write_predictions,
    )

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix.lower() not in PREDICTION_FILES:
        raise UserError(f"--output {out}: use a .csv or .json file name")
    files, problems = collect_images(args.paths)
    predictor = open_predictor(args)
    results, errors = predictor.predict_files(files, args.topk, args.tta, args.batch_size)
    errors = problems + errors
    if errors and args.strict:
        raise UserError("unreadable: " + "; ".join(f"{f}: {r}" for f, r in errors))
    if not results:
        raise nothing_read("predict", errors)
    print(format_predictions(results))
    warn_skipped(errors)
    print(f"predicted {len(results)} image(s), skipped {len(errors)}", file=sys.stderr)
    if out is not None:
        write_predictions(out, results, errors, args.topk)
        print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on built-in scenes, no download")
    p.add_argument("--out", default="rsscene-demo", metavar="DIR")
    p.add_argument("--per-class", type=positive_int, default=None, metavar="N")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--img-size", type=positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from rsscene.demo import run_demo

    run_demo(
        args.out,
        per_class=args.per_class,
        epochs=args.epochs,
        img_size=args.img_size,
        device=args.device,
    )
    return 0


# --------------------------------------------------------------------------- cam
def show_bands(text: str) -> list[int]:
    """Three 1-based band indexes, ``R,G,B`` (an argparse type)."""
    from rsscene.data.bands import parse_display

    try:
        return parse_display(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cam(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cam", help="Grad-CAM overlays: where in each image the class was seen")
    add_checkpoint_args(p)
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="write NAME_cam.png files here")
    p.add_argument(
        "--layer", default="layer4", help="dotted module name (default: layer4, the last stage)"
    )
    p.add_argument(
        "--class", dest="class_name", metavar="NAME", help="explain this class, not the predicted"
    )
    p.add_argument(
        "--tta",
        choices=["no", "yes"],
        default="no",
        help="yes: class and probability from the 8 flips/rotations",
    )
    p.add_argument(
        "--show-bands",
        type=show_bands,
        metavar="R,G,B",
        help="multi-band models: the three bands (1-based, as in --bands) drawn as red, green,"
        " blue (default: the model's first three)",
    )
    p.set_defaults(func=cmd_cam)


def cmd_cam(args: argparse.Namespace) -> int:
    from rsscene.explain import write_cams

    predictor = open_predictor(args)
    if args.show_bands:
        predictor.pre.display = args.show_bands
    written, errors = write_cams(
        predictor, args.paths, args.out, args.class_name, args.layer, args.tta == "yes"
    )
    if not written:
        raise nothing_read("explain", errors)
    warn_skipped(errors)
    print(f"wrote {len(written)} Grad-CAM figure(s) to {args.out}, skipped {len(errors)}")
    return 0


# --------------------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write ONNX or TorchScript, checked against PyTorch",
        description="The exported model takes float32 RGB in 0..1 (N x 3 x S x S), or a"
        " multi-band model's bands divided by their scale (N x C x S x S), and returns class"
        " probabilities: normalisation and softmax are inside it.",
    )
    add_checkpoint_args(p, device=False)  # the file is traced and checked on the CPU
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument(
        "--sample",
        nargs="+",
        metavar="PATH",
        help="images or folders for the parity check (default: built-in scenes)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from rsscene.export import export, format_result

    predictor = open_predictor(args)
    result = export(predictor, args.format, args.out, args.sample)
    print(format_result(predictor, result))
    return 0 if result.ok else 1


# --------------------------------------------------------------------------- map
def add_map(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="classify a whole scene tile by tile into a (georeferenced) land-use map",
        description="Cut SCENE into windows, predict them in batches and write classes.tif"
        " (classes.png without georeference), overlay.png, tiles.csv/.geojson and summary.json"
        " to --out. GeoTIFFs are read window by window (pip install 'rsscene[geo]').",
    )
    add_checkpoint_args(p, batch_size=True, tta=TTA_HELP)
    p.add_argument("scene", metavar="SCENE", help="a GeoTIFF or any image rsscene reads")
    p.add_argument("--out", required=True, metavar="DIR")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--tile",
        type=positive_int,
        metavar="PX",
        help="window side in source pixels (default: the size of the training images)",
    )
    size.add_argument(
        "--tile-m", type=positive_float, metavar="M", help="window side in metres on the ground"
    )
    p.add_argument(
        "--stride",
        type=positive_int,
        metavar="PX",
        help="step between windows (default: the tile; smaller overlaps them, and overlapping"
        " windows average their probabilities; it must divide the tile)",
    )
    p.add_argument("--tiles", choices=["csv", "geojson"], default="csv", help="cell table format")
    p.add_argument("--probabilities", action="store_true", help="also write probabilities.tif")
    p.add_argument("--truth", metavar="CSV", help="row,col,class per cell: report tile accuracy")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="precision of the batches: auto (bf16 where the CPU or GPU has it), bf16, fp16 or"
        " off (float32, exactly as predict)",
    )
    p.set_defaults(func=cmd_map)


def cmd_map(args: argparse.Namespace) -> int:
    from rsscene.mapping import format_summary, map_scene

    summary = map_scene(
        open_predictor(args),
        args.scene,
        args.out,
        tile=args.tile,
        tile_m=args.tile_m,
        stride=args.stride,
        batch_size=args.batch_size,
        tta=args.tta,
        tiles=args.tiles,
        probabilities=args.probabilities,
        truth=args.truth,
        progress=sys.stderr.isatty(),
        amp=args.amp,
    )
    print(format_summary(summary, args.out))
    return 0


# --------------------------------------------------------------------------- serve
def byte_size(text: str) -> int:
    """``10MB``, ``512KB``, ``2MiB`` or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
    number = text.strip().upper().rstrip("BGIKM")
    unit = text.strip().upper()[len(number) :]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf, 1e999
        raise argparse.ArgumentTypeError(f"expected a size such as 10MB, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page: predictions and Grad-CAM")
    add_checkpoint_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="default: this machine only; 0.0.0.0 exposes it"
    )
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name clients may use in the Host header (repeatable); other names get 400",
    )
    p.add_argument(
        "--max-bytes", type=byte_size, default="10MB", metavar="SIZE", help="request body limit"
    )
    p.add_argument("--max-files", type=positive_int, default=16, help="images per request")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=40_000_000,
        metavar="N",
        help="decoded pixels per request, all images together (default 40_000_000)",
    )
    p.add_argument("--decode-workers", type=positive_int, default=2, help="images decoded at once")
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="seconds a client has to send the whole request body (default 60)",
    )
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=5.0,
        help="how long requests wait to share a model call",
    )
    p.add_argument("--max-batch", type=positive_int, default=32, help="images per model call")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import python_multipart  # noqa: F401 - fastapi needs it only when a form arrives
        import uvicorn

        from rsscene.serve.app import create_app
    except ModuleNotFoundError as e:
        raise UserError(
            f"serving needs fastapi, uvicorn and python-multipart ({e.name} is missing):"
            ' pip install "rsscene[serve]"'
        ) from None
    allowed = served_host_names(args.host, args.allow_host)
    app = create_app(
        args.checkpoint,
        device=checkpoint_device(args),
        max_bytes=args.max_bytes,
        max_files=args.max_files,
        topk=args.topk,
        batch_wait_ms=args.batch_wait_ms,
        max_batch=args.max_batch,
        max_pixels=args.max_pixels,
        decode_workers=args.decode_workers,
        body_timeout=args.body_timeout,
        allowed_hosts=allowed,
    )
    if args.host not in LOOPBACK:
        any_host = "; it answers to any Host name (--allow-host NAME restricts that)"
        print(
            f"warning: --host {args.host} lets other machines reach this server;"
            f" it has no authentication{any_host if allowed is None else ''}",
            file=sys.stderr,
        )
    predictor = app.state.predictor
    print(
        f"serving {args.checkpoint} ({predictor.arch}, {len(predictor.classes)} classes,"
        f" {predictor.size} px) on http://{args.host}:{args.port}/",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


# --------------------------------------------------------------------------- main
COMMANDS = [
    add_info,
    add_synth,
    add_prepare,
    add_train,
    add_bench,
    add_evaluate,
    add_predict,
    add_demo,
    add_cam,
    add_map,
    add_export,
    add_serve,
]


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error; the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rsscene",
        description="Train, evaluate and serve ResNet classifiers for remote-sensing scenes.",
    )
    parser.add_argument("--version", action="version", version=f"rsscene {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback for any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"rsscene {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full, permission denied, read-only disk: the machine's state, not a bug in
        # rsscene. An OSError without errno is raised by code, so it keeps its traceback.
        if args.debug or e.errno is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"rsscene {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"rsscene {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
