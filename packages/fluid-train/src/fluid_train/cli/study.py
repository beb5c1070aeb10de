"""``fluid study``: the four variants x model sizes on the shapes world, with scaling fits.

Everything here is ``fluid_train.experiments.run_study(out, settings=..., minutes_per_run=...)``;
this entry also sets the process's torch threads (``experiments.machine.configure_cpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from fluid_train.experiments.settings import SIZES, VARIANTS, StudySettings

    defaults = StudySettings()
    default_sizes = ",".join(s.name for s in defaults.sizes)

    parser = subparsers.add_parser(
        "study",
        help="the paper's comparison in miniature: 4 variants x sizes, loss/FID/GenEval, fits",
        description=(
            "Train every (variant, size) pair on the shapes world with the same recipe and the "
            "same number of steps (Fluid also without its readout loss); tune CFG and "
            "temperature per run on a second prompt set; measure validation loss, FID and GenEval "
            "with standard errors, Fluid also along training; test the paper's four findings; "
            "write OUT/results.md, OUT/results.json and Figures 5, 6, 8, 9 and 13 as PNG. "
            "Resumable: finished runs, evaluated milestones and checkpoints in OUT are kept."
        ),
    )
    parser.add_argument("--out", default="study", help="output directory (default: study)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument(
        "--budget",
        type=float,
        default=None,
        help="minutes per run: the step count is chosen so the slowest run fits",
    )
    steps.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps of every run (default: {defaults.steps})",
    )
    parser.add_argument(
        "--sizes",
        default=default_sizes,
        help=f"comma-separated sizes among {','.join(SIZES)} (default: {default_sizes})",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated variants among {','.join(VARIANTS)} (default: all four)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    parser.add_argument("--cache", default=None, help="cache directory (default: OUT/cache)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of this process (default: the cores not busy now); with several "
        "workers on one OUT, e.g. one per core with --threads 1",
    )
    parser.set_defaults(func=run)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    from fluid_train.cli.demo import quiet_libraries
    from fluid_train.experiments.settings import SIZES, StudySettings

    try:
        unknown = [s for s in _split(args.sizes) if s not in SIZES]
        if unknown:
            raise ValueError(f"--sizes: unknown size(s) {unknown}; expected some of {list(SIZES)}")
        settings = StudySettings(
            sizes=tuple(SIZES[s] for s in _split(args.sizes)),
            variants=tuple(_split(args.variants)),
        )
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        if args.budget is not None and not args.budget > 0:
            raise ValueError(f"--budget must be > 0 minutes; got {args.budget}")
    except ValueError as error:
        print(f"fluid study: error: {error}", file=sys.stderr)
        return 2
    minutes = args.budget
    from fluid_train.experiments.machine import configure_cpu
    from fluid_train.experiments.study import run_study

    quiet_libraries()
    configure_cpu(args.threads)
    run_study(
        args.out,
        settings=settings,
        minutes_per_run=minutes,
        seed=args.seed,
        cache=args.cache,
        progress=args.progress,
    )
    return 0
