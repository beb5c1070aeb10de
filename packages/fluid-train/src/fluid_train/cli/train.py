"""``fluid train`` and ``fluid preprocess``: parse, build a ``TrainConfig``, call the library.

Precedence: recipe defaults (the paper) < ``--config FILE`` (JSON or TOML, nested like
``TrainConfig``) < flags. Everything here is ``fluid_train.trainer.train(config)`` and
``fluid_train.preprocess.preprocess(...)`` from Python.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    p.add_argument("--preset", help="model preset (fluid info lists them); default debug")
    p.add_argument(
        "--data", nargs="+", metavar="SHARDS", help="shards: paths, dirs, globs, {a..b}, URLs"
    )
    p.add_argument("--out", metavar="RUN", help="run directory")
    p.add_argument("--config", metavar="FILE", help="JSON/TOML file with TrainConfig fields")
    p.add_argument("--steps", type=int, help="total optimizer steps (paper: 1M)")
    p.add_argument("--backend", choices=("auto", "eager", "xla"), help="default auto")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue RUN from its latest checkpoint",
    )
    p.add_argument("--batch-size", type=int, help="global batch (paper: 2048)")
    p.add_argument("--lr", type=float, help="peak learning rate, absolute (paper: 1e-4)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (paper: 65000)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (paper: 0.02)")
    p.add_argument("--grad-clip", type=float, help="max global grad norm (default 3.0; 0 = off)")
    p.add_argument("--ema-decay", type=float, help="EMA decay per step (paper: 0.9999)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="autocast (auto: bf16 on accelerators)",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="saved tokenizer (image shards; pipeline export)"
    )
    p.add_argument(
        "--text-encoder", metavar="DIR", help="saved T5 encoder (image shards; pipeline export)"
    )
    p.add_argument("--device", help="eager device: cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--log-every", type=int, help="steps between metrics lines (default 100)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 5000)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept on disk (default 3)")
    p.add_argument("--seed", type=int, help="seed of the weights, data order and training noise")
    p.add_argument("--num-workers", type=int, help="data decoding processes per host (default 0)")
    p.add_argument("--shuffle-buffer", type=int, help="shuffle buffer in samples (default 1000)")
    p.add_argument(
        "--memory-mb",
        type=float,
        help="encoded shards: MiB per host kept in memory after the first epoch (default 0)",
    )
    p.add_argument("--text-length", type=int, help="T5 padding length for image shards")
    p.add_argument(
        "--dcn-data-parallelism",
        type=int,
        help="xla: slices on the data axis (default: slice count)",
    )
    p.add_argument(
        "--activation-checkpointing", choices=("none", "block"), help="recompute blocks in backward"
    )
    p.add_argument("--tokens", choices=("discrete", "continuous"), help="variant: token kind")
    p.add_argument("--order", choices=("raster", "random"), help="variant: generation order")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, JSON value (e.g. backbone.depth=4); repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="do not export RUN/pipeline at the end")
    p.set_defaults(func=run_train)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of ``fluid train``'s arguments (file values, then flags)."""
    from fluid_train.recipe import TrainConfig, load_config_file, merge

    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    flags: dict[str, Any] = {
        "preset": args.preset,
        "out": args.out,
        "steps": args.steps,
        "backend": args.backend,
        "resume": args.resume,
        "batch_size": args.batch_size,
        "ema_decay": args.ema_decay,
        "precision": args.precision,
        "tokenizer": args.tokenizer,
        "text_encoder": args.text_encoder,
        "device": args.device,
        "log_every": args.log_every,
        "ckpt_every": args.ckpt_every,
        "keep_checkpoints": args.keep_checkpoints,
        "seed": args.seed,
        "progress": False if args.no_progress else None,
        "export": False if args.no_export else None,
        "optim": {"lr": args.lr, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip},
        "schedule": {"warmup_steps": args.warmup},
        "data": {
            "shards": args.data,
            "num_workers": args.num_workers,
            "shuffle_buffer": args.shuffle_buffer,
            "memory_mb": args.memory_mb,
            "text_length": args.text_length,
        },
        "parallel": {
            "dcn_data_parallelism": args.dcn_data_parallelism,
            "activation_checkpointing": args.activation_checkpointing,
        },
    }
    if args.grad_clip == 0:
        flags["optim"]["grad_clip"] = None
        values = merge(values, {"optim": {"grad_clip": None}})
    model = dict(values.get("model", {}))
    for name in ("tokens", "order"):
        if getattr(args, name):
            model[name] = getattr(args, name)
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model expects KEY=VALUE (e.g. backbone.depth=4); got {item!r}")
        model[key] = _parse_value(value)
    values = merge(values, _drop_none(flags))
    if model:
        values["model"] = model
    if "out" not in values:
        raise ValueError("fluid train needs --out RUN (or `out` in the --config file)")
    if not values.get("data", {}).get("shards"):
        raise ValueError("fluid train needs --data SHARDS (or data.shards in the --config file)")
    return TrainConfig.from_dict(values)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def run_train(args: argparse.Namespace) -> int:
    from fluid_train.trainer import NonFiniteLossError, train

    _setup_logging()
    try:
        config = build_train_config(args)
        result = train(config)
    except NonFiniteLossError as error:
        print(f"fluid train: {error}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"fluid train: error: {error}", file=sys.stderr)
        return 2
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
    p.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="image shards")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="saved tokenizer directory")
    p.add_argument(
        "--text-encoder", required=True, metavar="DIR", help="saved T5 encoder directory"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    p.add_argument(
        "--pad-to", type=int, help="training text length L (default: the encoder's max length)"
    )
    p.add_argument(
        "--batch-size", type=int, default=32,
        help="images per encoder call, per host on xla (default 32)",
    )  # fmt: skip
    p.add_argument("--image-size", type=int, help="resize/crop size (default: the tokenizer's)")
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:I or xla (default: xla on a TPU host, else cuda if available)",
    )
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="encoder weights (default auto: bf16 on accelerators, fp32 on CPUs)",
    )  # fmt: skip
    p.add_argument(
        "--shard-weights", action=argparse.BooleanOptionalAction, default=None,
        help="shard the encoders over the xla devices (default: when they take more than half "
        "of one device's memory)",
    )  # fmt: skip
    p.add_argument("--text-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument(
        "--text-storage", choices=("trimmed", "padded"), default="trimmed",
        help="store T5 states at the caption's length (default) or padded to --pad-to",
    )  # fmt: skip
    p.add_argument(
        "--part", default="0/1", metavar="K/N",
        help="encode input shards K, K+N, ... (split again over torchrun ranks / xla hosts)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="re-encode shards that exist")
    p.set_defaults(func=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fluid_train.preprocess import preprocess

    _setup_logging()
    try:
        k, _, n = args.part.partition("/")
        part = (int(k), int(n))
    except ValueError:
        print(f"fluid preprocess: error: --part must be K/N; got {args.part!r}", file=sys.stderr)
        return 2
    with tqdm(unit="img", desc="preprocess") as bar:
        try:
            result = preprocess(
                args.data,
                tokenizer=args.tokenizer,
                text_encoder=args.text_encoder,
                out=args.out,
                image_size=args.image_size,
                pad_to=args.pad_to,
                batch_size=args.batch_size,
                device=args.device,
                precision=args.precision,
                shard_weights=args.shard_weights,
                text_dtype=args.text_dtype,
                text_storage=args.text_storage,
                part=part,
                overwrite=args.overwrite,
                progress=bar.update,
            )
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
