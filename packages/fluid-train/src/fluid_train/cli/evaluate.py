"""``fluid eval geneval | fid | scaling | coco | loss``: scoring generations and models.

``geneval``, ``fid`` and ``scaling`` score files and live in fluid_eval; ``coco`` (zero-shot
FID on MS-COCO 2014: generation + FID) and ``loss`` (validation loss on held-out shards) need
a trained pipeline and are added here. Both use every rank under
``torchrun --nproc-per-node N -m fluid_train.cli eval ...``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from fluid_eval.cli import _run as exit_2_on_bad_input
from fluid_eval.cli import add_eval_commands

from .generate import add_model_argument, add_sampling_arguments, model_path, sampling_options


def register(subparsers: Any) -> None:
    parser = add_eval_commands(subparsers)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    _add_coco(sub)
    _add_loss(sub)


def _model_command(sub: Any, name: str, run: Any, *, help: str) -> argparse.ArgumentParser:
    """A command of a trained pipeline (``--model``): its description is ``run``'s docstring,
    and ``run`` answers bad input with exit status 2."""
    parser = sub.add_parser(name, help=help, description=inspect.cleandoc(run.__doc__))
    add_model_argument(parser)
    parser.set_defaults(func=exit_2_on_bad_input(run))
    return parser


# ---------------------------------------------------------------------- coco


def _add_coco(sub: Any) -> None:
    coco = _model_command(
        sub, "coco", _coco, help="zero-shot FID on MS-COCO 2014 (FID-30K): generate captions, score"
    )
    coco.add_argument("--captions", required=True, type=Path,
                      help="COCO captions file (annotations/captions_train2014.json layout)")  # fmt: skip
    coco.add_argument("--images", required=True, type=Path,
                      help="folder holding the captions file's images (train2014/)")  # fmt: skip
    coco.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="samples/, pairs.jsonl and report.json go here")  # fmt: skip
    coco.add_argument(
        "--num-pairs", type=int, default=30_000, help="caption-image pairs (default 30000)"
    )
    coco.add_argument("--pairs-seed", type=int, default=0,
                      help="seed of the pair draw (default 0)")  # fmt: skip
    coco.add_argument("--feature", choices=("inception", "shapes"), default="inception",
                      help="FID features: the standard Inception (needs --inception-weights) or "
                      "the shapes world's feature net (default inception)")  # fmt: skip
    coco.add_argument("--inception-weights", type=Path,
                      help="FID Inception weights file (pt_inception-2015-12-05-6726825d.pth)")  # fmt: skip
    coco.add_argument("--fid-batch-size", type=int, default=64)
    coco.add_argument("--fid-device", help="device of the FID network (default cuda if available, else cpu)")  # fmt: skip
    add_sampling_arguments(coco, images_per_prompt=False)


def _coco(args: argparse.Namespace) -> int:
    """Draw --num-pairs caption-image pairs (seeded) from a COCO captions file, generate one
    image per caption on every rank/device (resumable), compute FID against the real images
    center-cropped and resized to the model resolution, write OUT/report.json."""
    import torch

    from fluid_train.evaluation import coco_fid
    from fluid_train.sampling import prepare

    options = sampling_options(args)
    runner = prepare(args.model, backend=args.backend, device=args.device,
                     batch_size=args.batch_size, options=options)  # fmt: skip
    fid_device = args.fid_device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = coco_fid(
        runner, captions=args.captions, images=args.images, out=args.out, num=args.num_pairs,
        pairs_seed=args.pairs_seed, seed=args.seed, batch_size=args.batch_size,
        feature=args.feature, inception_weights=args.inception_weights,
        fid_batch_size=args.fid_batch_size, fid_device=fid_device,
        progress=not args.no_progress, options=options, model=model_path(args.model),
    )  # fmt: skip
    if report is not None:
        print(f"FID-{report['num_images']} ({args.feature} features): {report['fid']:.4f}  "
              f"(wall {report['wall_s']:.1f} s; {args.out / 'report.json'})")  # fmt: skip
    return 0


# ---------------------------------------------------------------------- loss


def _add_loss(sub: Any) -> None:
    loss = _model_command(
        sub, "loss", _loss, help="validation loss (the training objective) on held-out shards"
    )
    loss.add_argument("--data", required=True, nargs="+",
                      help="held-out shards: paths, directories, globs, {a..b} patterns, URLs")  # fmt: skip
    loss.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    loss.add_argument(
        "--seed", type=int, default=0, help="seed of the objective's noise (default 0)"
    )
    loss.add_argument("--out", type=Path, metavar="FILE", help="also write the result as JSON here")
    loss.add_argument(
        "--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)"
    )
    loss.add_argument("--json", action="store_true", help="print the result as JSON")


def _loss(args: argparse.Namespace) -> int:
    """The training objective of a trained pipeline averaged over held-out shards (encoded by
    `fluid preprocess`, or image shards encoded with the pipeline's tokenizer and T5), under a
    fixed seed per shard, weighted by images; ranks split the shards."""
    import os

    import torch

    from fluid_train.atomic import write_json_atomic
    from fluid_train.data import detect_kind, expand_shards
    from fluid_train.evaluation import shard_validation_loss
    from fluid_train.model import FluidModel
    from fluid_train.pipeline import FluidPipeline, find_pipeline
    from fluid_train.sampling import Processes

    processes = Processes.from_environment()
    device = args.device
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    shards = expand_shards(args.data)
    encoders = None
    if detect_kind(shards) == "images":
        from fluid_train.encoders import FrozenEncoders

        pipeline = FluidPipeline.from_pretrained(args.model, device=device)
        model = pipeline.model
        encoders = FrozenEncoders(pipeline.tokenizer, pipeline.text_encoder,
                                  text_length=model.config.text_length)  # fmt: skip
    else:
        model = FluidModel.from_pretrained(find_pipeline(args.model), subfolder="model").to(device)
    result = shard_validation_loss(model, shards, batch_size=args.batch_size, seed=args.seed,
                                   device=device, encoders=encoders, processes=processes)  # fmt: skip
    payload = {**result.to_dict(), "model": model_path(args.model), "data": args.data}
    if processes.is_writer:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, payload)
        text = (f"validation loss {result.mean:.5f} +- {result.std_error:.5f} over "
                f"{result.num_images} images in {result.num_shards} shards "
                f"({result.processes} processes)")  # fmt: skip
        print(json.dumps(payload, indent=2) if args.json else text)
    return 0
