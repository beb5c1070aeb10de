"""Command line for evaluation and the shapes world, shared by ``fluid-eval`` and ``fluid``.

``add_shapes_commands(subparsers)`` adds ``shapes make | prompts | render``;
``add_eval_commands(subparsers)`` adds ``eval geneval | fid | scaling``. ``fluid_train``'s
command modules call these, so both programs have one implementation. Each command parses,
calls the library and prints; errors in the input end the command with exit code 2 and a
message naming the input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .__about__ import __version__


def _run(work: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        try:
            return int(work(args) or 0)
        except (FileNotFoundError, ValueError, ImportError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return command


def _print(payload: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(payload, indent=2) if as_json else text)


# --------------------------------------------------------------------------------------------
# shapes


def _layout(args: argparse.Namespace) -> Any:
    from .shapes import LayoutConfig

    return LayoutConfig() if args.cells is None else LayoutConfig.in_cells(args.cells)


def _shapes_make(args: argparse.Namespace) -> int:
    from .shapes import write_shards

    paths = write_shards(
        args.out, args.num, seed=args.seed, size=args.size, shard_size=args.shard_size,
        layout=_layout(args),
    )  # fmt: skip
    print(
        f"wrote {args.num} samples in {len(paths)} shards to {args.out} ({paths[0].name} .. {paths[-1].name})"
    )
    return 0


def _shapes_prompts(args: argparse.Namespace) -> int:
    from .shapes import write_prompts

    entries = write_prompts(args.out, args.num, seed=args.seed)
    tags: dict[str, int] = {}
    for entry in entries:
        tags[entry["tag"]] = tags.get(entry["tag"], 0) + 1
    print(
        f"wrote {len(entries)} prompts to {args.out}: "
        + ", ".join(f"{k} {v}" for k, v in tags.items())
    )
    return 0


def _shapes_render(args: argparse.Namespace) -> int:
    from .shapes import render_metadata

    out = render_metadata(
        args.metadata, args.out, n_samples=args.samples, size=args.size, seed=args.seed,
        layout=_layout(args),
    )  # fmt: skip
    print(f"rendered ground-truth scenes for {args.metadata} into {out}")
    return 0


CELLS_HELP = (
    "one object inside each used cell of an N x N grid (the shapes tokenizers' token grid: "
    "image side / 8); default: free placement"
)


def add_shapes_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``shapes make | prompts | render`` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "shapes", help="the built-in shapes world: training shards, GenEval prompts, ground truth",
        description="The shapes world: flat shapes on black, captioned with GenEval's grammar.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="shapes_command", metavar="COMMAND", required=True)

    make = sub.add_parser("make", help="write training shards (webdataset, img2dataset layout)")
    make.add_argument("--out", required=True, help="output folder for 00000.tar, 00001.tar, ...")
    make.add_argument("--num", type=int, required=True, help="number of image-caption pairs")
    make.add_argument(
        "--seed", type=int, default=0, help="sample i depends only on (seed, i) (default 0)"
    )
    make.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    make.add_argument("--cells", type=int, metavar="N", help=CELLS_HELP)
    make.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    make.set_defaults(func=_run(_shapes_make))

    prompts = sub.add_parser(
        "prompts", help="write held-out prompts as GenEval evaluation_metadata.jsonl"
    )
    prompts.add_argument("--out", required=True, help="output .jsonl file")
    prompts.add_argument(
        "--num", type=int, default=96, help="prompts, balanced over the six tasks (default 96)"
    )
    prompts.add_argument(
        "--seed", type=int, default=43, help="seed (default 43, as GenEval's create_prompts.py)"
    )
    prompts.set_defaults(func=_run(_shapes_prompts))

    render = sub.add_parser(
        "render", help="render ground-truth scenes for a metadata file in GenEval's layout"
    )
    render.add_argument("--metadata", required=True, help="evaluation_metadata.jsonl")
    render.add_argument(
        "--out", required=True, help="output folder (<out>/00000/samples/0000.png, ...)"
    )
    render.add_argument("--samples", type=int, default=4, help="images per prompt (default 4)")
    render.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    render.add_argument("--cells", type=int, metavar="N", help=CELLS_HELP)
    render.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    render.set_defaults(func=_run(_shapes_render))
    return parser


# --------------------------------------------------------------------------------------------
# eval


def _eval_geneval(args: argparse.Namespace) -> int:
    from .detector import ShapesDetector
    from .geneval import GenEvalConfig, score_folder, write_results

    detectors = {"shapes": ShapesDetector}
    config = GenEvalConfig(position_threshold=args.position_threshold)
    report = score_folder(
        args.images, detectors[args.detector](), config=config, metadata_file=args.metadata
    )
    if args.results:
        write_results(report.results, args.results)
    _print(report.to_dict(), args.json, report.format())
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    from .fid import compute_fid

    result = compute_fid(
        args.real, args.fake, feature=args.feature, weights_path=args.weights, seed=args.seed,
        batch_size=args.batch_size, image_size=args.image_size, device=args.device,
    )  # fmt: skip
    payload = {"fid": result.fid, "feature": args.feature, "num_real": result.num_real,
               "num_fake": result.num_fake, "skipped": list(result.skipped)}  # fmt: skip
    text = f"FID ({args.feature} features): {result.fid:.4f}  ({result.num_real} real, {result.num_fake} generated"
    text += f", {len(result.skipped)} unreadable skipped)" if result.skipped else ")"
    _print(payload, args.json, text)
    return 0


def _eval_scaling(args: argparse.Namespace) -> int:
    from .scaling import load_points, scaling_report

    report = scaling_report(load_points(args.points), args.out)
    lines = [f"{v}: loss = {f.coefficient:.4g} * params^{f.exponent:.4f} (+- {f.exponent_stderr:.4f}, R2 {f.r_squared:.3f})"
             for v, f in report.fits.items()]  # fmt: skip
    lines += [
        f"Pearson r(loss, {k}) = {c.r:.3f} (p = {c.p_value:.3g}, n = {c.num_points})"
        for k, c in report.correlations.items()
    ]
    lines += [f"{k}: {p}" for k, p in report.plots.items()]
    _print(report.to_dict(), args.json, "\n".join(lines))
    return 0


def add_eval_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval geneval | fid | scaling`` to an argparse subparsers object."""
    parser = subparsers.add_parser("eval", help="score generations: GenEval, FID, scaling fits",
                                   description="Evaluate generated images and scaling runs.")  # fmt: skip
    sub = parser.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)

    geneval = sub.add_parser(
        "geneval", help="score a folder in GenEval's layout with GenEval's rules"
    )
    geneval.add_argument(
        "--images",
        required=True,
        help="folder with 00000/metadata.jsonl, 00000/samples/0000.png, ...",
    )
    geneval.add_argument(
        "--metadata",
        help="evaluation_metadata.jsonl: check each folder against its line, report missing prompts",
    )
    geneval.add_argument(
        "--detector", choices=["shapes"], default="shapes", help="object detector (default: shapes)"
    )
    geneval.add_argument(
        "--position-threshold",
        type=float,
        default=0.1,
        help="GenEval's position dead zone (default 0.1)",
    )
    geneval.add_argument("--results", help="also write per-image results.jsonl (official format)")
    geneval.add_argument("--json", action="store_true", help="print the report as JSON")
    geneval.set_defaults(func=_run(_eval_geneval))

    fid = sub.add_parser("fid", help="FID between two image folders, offline")
    fid.add_argument(
        "--real", required=True, help="folder of reference images (searched recursively)"
    )
    fid.add_argument(
        "--fake", required=True, help="folder of generated images (searched recursively)"
    )
    fid.add_argument("--feature", choices=["shapes", "inception"], default="shapes",
                     help="shapes: built-in random-feature net (shapes world); inception: needs --weights")  # fmt: skip
    fid.add_argument("--weights", help="FID Inception weights file (pt_inception-2015-12-05)")
    fid.add_argument(
        "--image-size", type=int, help="center-crop and resize to this side (COCO protocol: 256)"
    )
    fid.add_argument("--batch-size", type=int, default=64)
    fid.add_argument(
        "--seed", type=int, default=0, help="seed of the shapes feature net (default 0)"
    )
    fid.add_argument("--device", help="torch device (default cpu)")
    fid.add_argument("--json", action="store_true", help="print the result as JSON")
    fid.set_defaults(func=_run(_eval_fid))

    scaling = sub.add_parser("scaling", help="power-law fits, correlations and Figures 5, 6, 8, 9")
    scaling.add_argument(
        "--points",
        required=True,
        help="JSON list / JSONL of {variant, params, loss, fid?, geneval?}",
    )
    scaling.add_argument("--out", required=True, help="folder for the PNG figures")
    scaling.add_argument("--json", action="store_true", help="print fits and correlations as JSON")
    scaling.set_defaults(func=_run(_eval_scaling))
    return parser


def build_parser(prog: str = "fluid-eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fluid evaluation and the shapes world."
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_shapes_commands(subparsers)
    add_eval_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
