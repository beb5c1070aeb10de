"""``fluid train`` and ``fluid preprocess``: parse, build a ``TrainConfig``, call the library.

Precedence: recipe defaults (the paper) < ``--config FILE`` (JSON or TOML, nested like
``TrainConfig``) < flags. Everything here is ``fluid_train.trainer.train(config)`` and
``fluid_train.preprocess.preprocess(...)`` from Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_preprocess(subparsers)


# ---------------------------------------------------------------------- fluid train


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on webdataset shards (eager or torch_xla SPMD)",
        description=(
            "Train a preset on image shards (img2dataset layout; the frozen tokenizer and T5 run "
            "outside the step) or on shards written by `fluid preprocess`. Writes "
            "RUN/metrics.jsonl, RUN/checkpoints/ (atomic; --resume continues exactly) and, at "
            "the end, the EMA weights as RUN/pipeline/. Defaults are the paper's recipe; "
            "--config FILE (JSON/TOML) and flags override them."
        ),
    )
    from fluid_train.config import FluidConfig, TrainConfig
    from fluid_train.presets import list_presets

    from .options import add_config_flags

    p.add_argument("--config", metavar="FILE", help="JSON/TOML file with TrainConfig fields")
    add_config_flags(p, TrainConfig)
    model = p.add_argument_group("model (overrides of the preset)")
    add_config_flags(model, FluidConfig, prefix="model.", nested=False, show_defaults=False)
    model.add_argument(
        "--model",
        dest="model_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, JSON value (e.g. backbone.depth=4); repeatable",
    )
    p.epilog = f"presets: {', '.join(list_presets())}"
    p.set_defaults(func=run_train)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of ``fluid train``'s arguments (file values, then flags)."""
    from fluid_train.config import FluidConfig, TrainConfig, load_config_file, merge

    from .options import given_values

    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values = merge(values, given_values(args, TrainConfig))
    model = dict(values.get("model") or {})
    model.update(given_values(args, FluidConfig, prefix="model.", nested=False))
    for item in args.model_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model expects KEY=VALUE (e.g. backbone.depth=4); got {item!r}")
        model[key] = _parse_value(value)
    if model:
        values["model"] = model
    if "out" not in values:
        raise ValueError("fluid train needs --out RUN (or `out` in the --config file)")
    if not values.get("data", {}).get("shards"):
        raise ValueError("fluid train needs --data SHARDS (or data.shards in the --config file)")
    return TrainConfig.from_dict(values)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


# Exit statuses of `fluid train` besides 0 (done) and 2 (bad input or no resumable checkpoint).
EXIT_NON_FINITE = 3  # NaN/inf loss; nothing written after it
EXIT_WRITE_ERROR = 4  # a checkpoint/export write failed (ENOSPC, EIO); the previous one is intact
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: stopped after a checkpoint; rerun with --resume (EX_TEMPFAIL)


def run_train(args: argparse.Namespace) -> int:
    from fluid_train.checkpoint import CheckpointError, WriteError
    from fluid_train.trainer import NonFiniteLossError, train

    _setup_logging()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun: an uncaught error of this rank goes into torchrun's failure report.
        from torch.distributed.elastic.multiprocessing.errors import record

        train = record(train)
    try:
        config = build_train_config(args)
        result = train(config)
    except NonFiniteLossError as error:
        print(f"fluid train: {error}", file=sys.stderr)
        return EXIT_NON_FINITE
    except WriteError as error:
        print(f"fluid train: error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as error:
        print(f"fluid train: error: {error}", file=sys.stderr)
        return 2
    reports = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 reports for all
    if result.preempted is not None:
        if reports:
            print(
                f"stopped by {result.preempted} after step {result.step}; checkpoint: "
                f"{result.checkpoint}; continue with --resume",
                file=sys.stderr,
            )
        return EXIT_PREEMPTED
    if not reports:
        return 0
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"trained {result.step} steps, loss {loss}")
    print(f"metrics:    {result.metrics}")
    print(f"checkpoint: {result.checkpoint}")
    if result.pipeline is not None:
        print(f"exported:   {result.pipeline}")
    skipped = sum(result.skipped.values())
    if skipped:
        print(f"skipped samples: {skipped} ({result.skipped})")
    return 0


# ---------------------------------------------------------------------- fluid preprocess


def _register_preprocess(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="encode image shards once into token + T5-state shards",
        description=(
            "Run the frozen tokenizer and T5 once over image shards and write shards of tokens "
            "(VQ ids, or SD-VAE posterior mean and std) and T5 states stored at the caption's "
            "real length (the loader pads them) that `fluid train` reads directly. One output "
            "shard per input shard; finished shards are skipped when re-run, so an interrupted "
            "job resumes. Runs on every device of a TPU host (SPMD; hosts split the shards by "
            "their process index), or under `torchrun --nproc-per-node N` one rank per GPU."
        ),
    )
    from fluid_train.config import PreprocessOptions

    from .options import add_config_flags

    p.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="image shards")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="saved tokenizer directory")
    p.add_argument(
        "--text-encoder", required=True, metavar="DIR", help="saved T5 encoder directory"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    add_config_flags(p, PreprocessOptions)
    p.add_argument(
        "--part", default="0/1", metavar="K/N",
        help="encode input shards K, K+N, ... (split again over torchrun ranks / xla hosts)",
    )  # fmt: skip
    p.set_defaults(func=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fluid_train.config import PreprocessOptions, config_from_dict
    from fluid_train.preprocess import preprocess

    from .options import given_values

    _setup_logging()
    try:
        k, _, n = args.part.partition("/")
        part = (int(k), int(n))
    except ValueError:
        print(f"fluid preprocess: error: --part must be K/N; got {args.part!r}", file=sys.stderr)
        return 2
    with tqdm(unit="img", desc="preprocess") as bar:
        try:
            options = config_from_dict(PreprocessOptions, given_values(args, PreprocessOptions))
            result = preprocess(
                args.data, tokenizer=args.tokenizer, text_encoder=args.text_encoder,
                out=args.out, options=options, part=part, progress=bar.update,
            )  # fmt: skip
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            print(f"fluid preprocess: error: {error}", file=sys.stderr)
            return 2
    k, n = result.part
    print(
        f"encoded {result.samples} samples into {len(result.shards)} shard(s) in {result.out} "
        f"({len(result.reused)} already done){f', part {k} of {n}' if n > 1 else ''}; "
        f"skipped {result.skipped}; {result.bytes_per_sample / 1024:.1f} KiB per sample"
    )
    return 0
