"""The commands that train: train, bench (repeated splits, mean ± std) and demo."""

from __future__ import annotations

import argparse
import sys

from rsscene.cli.args import add_setting_flags, positive_int, ratio
from rsscene.errors import UserError


# --------------------------------------------------------------------------- train
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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run that --out holds (its checkpoints, metrics, reports, events)",
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
        # A torchrun restart before the first last.pt starts again over what it left.
        force = args.force or args.auto_resume
        Trainer.from_config(cfg, resume=resume, force=force).fit()
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
    from rsscene.errors import Interrupted

    try:
        run_demo(
            args.out,
            per_class=args.per_class,
            epochs=args.epochs,
            img_size=args.img_size,
            device=args.device,
        )
    except Interrupted as e:
        print(f"{e}\ndemo: run it again to start over", file=sys.stderr)
        return 128 + e.signum
    return 0
