"""The commands that read a trained checkpoint: evaluate, predict, cam, export and map."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rsscene.cli.args import (
    TTA_HELP,
    add_checkpoint_args,
    checkpoint_device,
    nothing_read,
    open_predictor,
    positive_float,
    positive_int,
    show_bands,
    warn_skipped,
)
from rsscene.device import AMP_MODES, Dist
from rsscene.errors import UserError
from rsscene.mapping.stack import RESAMPLING

if TYPE_CHECKING:
    from rsscene.inference import Predictor


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


# --------------------------------------------------------------------------- cam
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
    predictor.pre = predictor.pre.shown_as(args.show_bands)
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
        help="classify whole scenes tile by tile into (georeferenced) land-use maps",
        description="Cut SCENE into windows, predict them in batches and write classes.tif"
        " (classes.png without georeference), overlay.png, tiles.csv/.geojson and summary.json"
        " to --out. With several scenes (files, folders, glob patterns), each scene's map goes"
        " to DIR/<scene name>/ and DIR gets region.json, one tiles file and classes.vrt (a"
        " mosaic, where the scenes share a CRS); the same command again skips the scenes"
        " mapped already and remaps those whose file, checkpoint or settings changed."
        " GeoTIFFs are read window by window (pip install 'rsscene[geo]').",
    )
    add_checkpoint_args(p, batch_size=True, tta=TTA_HELP)
    p.add_argument(
        "scene",
        nargs="*",
        metavar="SCENE",
        help="a GeoTIFF or any image rsscene reads; or several, folders of them, glob patterns;"
        " a STAC item or item collection (JSON)",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    add_band_file_args(p)
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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the earlier map --out holds, whatever scene or settings made it (a"
        " region: also remove the maps of scenes no longer given)",
    )
    p.set_defaults(func=cmd_map)


def _open_on_rank(args: argparse.Namespace) -> tuple[Predictor, Dist]:
    """CKPT's model on ``--device``; under torchrun, on this rank's device, in the job whose
    ranks share the map (Gloo on the CPU, NCCL on CUDA with a GPU each)."""
    from rsscene.device import select_device, setup
    from rsscene.inference import Predictor

    device = select_device(args.device)
    dist = setup(device.type)
    return Predictor(args.checkpoint, device=str(dist.device(device))), dist


def add_band_file_args(parser: argparse.ArgumentParser) -> None:
    """map's options for bands in separate files: a STAC item's assets, or --band-files."""
    bands = parser.add_argument_group("bands in separate files (pip install 'rsscene[geo]')")
    bands.add_argument(
        "--assets",
        nargs="+",
        metavar="NAME",
        help="a STAC item's band assets, by key or band name, in the model's band order"
        " (default: the model's band names; red, green, blue or visual for an RGB model)",
    )
    bands.add_argument(
        "--band-files",
        nargs="+",
        metavar="FILE",
        help="one scene stacked from these files, in the model's band order, on the finest"
        " file's grid",
    )
    bands.add_argument(
        "--resampling",
        choices=RESAMPLING,
        default="bilinear",
        help="how coarser bands meet the finest grid: bilinear (default) or nearest",
    )


def cmd_map(args: argparse.Namespace) -> int:
    from rsscene.device import teardown
    from rsscene.errors import Interrupted
    from rsscene.mapping import format_summary, map_scene
    from rsscene.mapping.region import (
        collect_scenes,
        format_region,
        map_region,
        maps_a_region,
        stop_on_sigterm,
    )
    from rsscene.mapping.stack import is_stac, with_stacks

    options = {
        "tile": args.tile,
        "tile_m": args.tile_m,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "tta": args.tta,
        "tiles": args.tiles,
        "probabilities": args.probabilities,
        "truth": args.truth,
        "amp": args.amp,
        "force": args.force,
        "progress": True,
    }
    if not args.scene and not args.band_files:
        raise UserError("give a SCENE (a file, folder, pattern or STAC item) or --band-files")
    stacked = bool(args.band_files) or any(is_stac(s) for s in args.scene)
    plain = [s for s in args.scene if not is_stac(s)]
    # How many scenes a STAC file holds is known once it is read: a region unless one.
    region = None if stacked else maps_a_region(plain)
    if plain and (region or stacked):
        collect_scenes(plain)  # a scene that is missing is said before the model loads
    dist = Dist()
    try:
        with stop_on_sigterm():
            predictor, dist = _open_on_rank(args)
            scenes = with_stacks(
                args.scene, predictor.pre, args.assets, args.band_files, args.resampling
            )
            region = region or len(scenes) != 1
            if not region:  # one scene: its map in --out itself, as always
                summary = map_scene(predictor, scenes[0], args.out, dist=dist, **options)
                if dist.main:  # every rank has the summary: one prints it
                    print(format_summary(summary, args.out))
                return 0
            summary = map_region(predictor, scenes, args.out, log=print, dist=dist, **options)
    except Interrupted as e:
        if region is not False:
            print(f"rsscene map: {e}", file=sys.stderr)
        else:
            print(f"rsscene map: {e}; --out {args.out} is as it was", file=sys.stderr)
        return 128 + e.signum
    finally:
        teardown()
    if dist.main:
        print(format_region(summary, args.out))
    return 0
