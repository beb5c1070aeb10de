"""``fluid demo``: train a small Fluid model on the shapes world from nothing and judge it.

Everything here is ``fluid_train.experiments.run_demo(out, budget=..., seed=...)`` from Python;
this entry also sets the process's torch threads (``experiments.machine.configure_cpu``).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the built-in end-to-end run: data, tokenizer, T5, training, GenEval and FID",
        description=(
            "From nothing, in one run: shapes-world shards, the small VAE tokenizer, a "
            "SentencePiece model + small frozen T5, preprocessing, Fluid trained with the real "
            "trainer and recipe (scaled down), generation for held-out GenEval prompts with CFG, "
            "shapes-world GenEval and FID. Writes OUT/report.json, OUT/grid.png and "
            "OUT/loss.png. Data, tokenizer, text encoder and encoded shards are cached in "
            "OUT/cache (keyed by their settings), so a second run reuses them."
        ),
    )
    parser.add_argument("--out", default="demo", help="output directory (default: demo)")
    parser.add_argument(
        "--budget",
        default="default",
        help="small (~5 min), default (~15 min), large (~30 min) on 2 CPU cores, or a number "
        "of minutes (default: default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    parser.add_argument("--cache", default=None, help="cache directory (default: OUT/cache)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    parser.add_argument("--no-progress", action="store_true", help="no training progress bar")
    parser.set_defaults(func=run)


def quiet_libraries() -> None:
    """Hide the loading chatter of transformers/diffusers (progress bars, accelerate hints)."""
    import warnings

    for name in ("transformers", "diffusers"):
        try:
            logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")


def run(args: argparse.Namespace) -> int:
    from fluid_train.experiments.settings import demo_settings

    try:
        demo_settings(args.budget)  # a bad --budget fails here, before any work
    except ValueError as error:
        print(f"fluid demo: error: {error}", file=sys.stderr)
        return 2
    from fluid_train.experiments.demo import run_demo
    from fluid_train.experiments.machine import configure_cpu

    quiet_libraries()
    configure_cpu()
    report = run_demo(
        args.out,
        budget=args.budget,
        seed=args.seed,
        cache=args.cache,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0
