"""What the commands share: argparse types, the flags made from TrainConfig, and the flags
and helpers of the commands that read a checkpoint (CKPT, --device, --batch-size, --tta)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rsscene.errors import UserError

if TYPE_CHECKING:
    from rsscene.inference import Predictor


# --------------------------------------------------------------------------- types
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


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def grid_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x8, got {text}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive ROWSxCOLS, got {text}")
    return rows, cols


def show_bands(text: str) -> list[int]:
    """Three 1-based band indexes, ``R,G,B`` (an argparse type)."""
    from rsscene.data.bands import parse_display

    try:
        return parse_display(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text}")
    if value < 0:
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


# --------------------------------------------------------------------------- settings
# Flags of train that are not settings of a run.
RUN_FLAGS = ("config", "resume", "auto_resume", "weights_only", "force")


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
