"""The commands that describe the models and make datasets: info, synth and prepare."""

from __future__ import annotations

import argparse
import json

from rsscene.cli.args import comma_list, grid_shape, positive_int, ratio
from rsscene.errors import UserError
from rsscene.models import MODELS, VARIANTS


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


# --------------------------------------------------------------------------- prepare
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
