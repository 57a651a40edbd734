"""The serve command: a checkpoint behind an HTTP API and a web page."""

from __future__ import annotations

import argparse
import sys

from rsscene.cli.args import (
    add_checkpoint_args,
    byte_size,
    checkpoint_device,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)
from rsscene.errors import UserError
from rsscene.serve.hosts import LOOPBACK, served_host_names


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
