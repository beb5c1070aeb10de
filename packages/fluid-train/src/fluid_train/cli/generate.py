"""``fluid generate``: images for prompts (PNG files + a contact sheet) or a GenEval folder.

``--model`` is a pipeline directory (holding fluid_pipeline.json) or a training run whose
export lives in ``RUN/pipeline/``. With ``--prompt``, images go to ``OUT/{prompt:05}_{k:02}.png``
with ``OUT/index.jsonl`` naming each file's prompt; with ``--metadata``, to GenEval's official
layout (``OUT/{index:05}/metadata.jsonl`` + ``samples/{k:04}.png``, written by fluid_eval).
Both write ``OUT/grid.png``: the images with their prompts underneath.

Every rank of ``torchrun --nproc-per-node N -m fluid_train.cli generate ...`` makes its share;
with ``--backend xla`` (one process per host) the batch is sharded over every device. An image
depends only on the seed, its prompt and sample index and the settings (batch size included),
not on the number of processes. An interrupted run started again with the same command
continues where it stopped and never rewrites a finished prompt.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluid_eval.cli import _run as exit_2_on_bad_input


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from prompts or GenEval metadata",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", metavar="TEXT", help="one or more prompts")
    source.add_argument(
        "--metadata", type=Path, metavar="FILE", help="GenEval evaluation_metadata.jsonl"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    add_sampling_arguments(parser)
    parser.set_defaults(func=exit_2_on_bad_input(run))


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model``: the trained pipeline of ``generate`` and ``eval coco | loss``."""
    parser.add_argument(
        "--model", required=True, help="pipeline directory or training run directory"
    )


def model_path(model: str) -> str:
    """The pipeline directory a --model names (a run resolves to RUN/pipeline), absolute."""
    from fluid_train.pipeline import find_pipeline

    return str(find_pipeline(model).resolve())


def add_sampling_arguments(
    parser: argparse.ArgumentParser, *, images_per_prompt: bool = True
) -> None:
    """The options of distributed generation, shared by ``generate`` and ``eval coco``."""
    from fluid_train.config import GenerationConfig

    from .options import add_config_flags

    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    # The sampling options are GenerationConfig's fields; left out, the model's own defaults
    # (its config's ``generation``) apply.
    add_config_flags(
        parser.add_argument_group("sampling (default: the model's)"), GenerationConfig,
        prefix="generation.", show_defaults=False,
    )  # fmt: skip
    if images_per_prompt:
        parser.add_argument(
            "--images-per-prompt", type=int, default=4, help="images per prompt (default 4)"
        )
    parser.add_argument(
        "--batch-size", type=int, default=16,
        help="images generated at once (default 16; xla: the global batch over all devices). "
        "Part of what fixes the images: chunks of batch-size // images-per-prompt prompts "
        "share one random stream",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=("auto", "eager", "xla"), default="auto",
        help="eager: this process's device; xla: SPMD over every device of every host "
        "(default auto: xla on a TPU host)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None,
        help="eager: torch device (default: cuda:LOCAL_RANK if available, else cpu)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationConfig fields given on the command line (the rest stay the model's)."""
    from fluid_train.config import GenerationConfig

    from .options import given_values

    return given_values(args, GenerationConfig, prefix="generation.")


def generate_prompts(
    pipeline: Any, prompts: Sequence[str], out: str | Path, *, images_per_prompt: int = 4,
    **settings: Any,
) -> list[Path]:  # fmt: skip
    """Write ``images_per_prompt`` PNGs per prompt, ``index.jsonl`` and ``grid.png``; return the
    PNGs. ``settings`` as :func:`fluid_train.sampling.generate_layout`."""
    from fluid_train.sampling import PromptFiles, generate_layout

    layout = PromptFiles(out, prompts, images_per_prompt=images_per_prompt)
    generate_layout(layout, pipeline, **settings)
    return layout.files()


def generate_geneval(
    pipeline: Any, metadata: str | Path, out: str | Path, *, images_per_prompt: int = 4,
    **settings: Any,
) -> Path:  # fmt: skip
    """Generate for a GenEval metadata file in the official layout, plus ``grid.png``;
    ``settings`` as :func:`fluid_train.sampling.generate_layout`."""
    from fluid_eval import load_metadata
    from fluid_train.sampling import GenEvalFolders, generate_layout

    layout = GenEvalFolders(out, load_metadata(metadata), images_per_prompt=images_per_prompt)
    # entry n is line n + 1 (load_metadata drops trailing blanks only)
    names = [f"{metadata} line {n + 1}" for n in range(len(layout.prompts))]
    generate_layout(layout, pipeline, names=names, **settings)
    return Path(out)


def run(args: argparse.Namespace) -> int:
    from fluid_train.sampling import prepare

    options = sampling_options(args)
    runner = prepare(args.model, backend=args.backend, device=args.device,
                     batch_size=args.batch_size, options=options)  # fmt: skip
    common = {
        "images_per_prompt": args.images_per_prompt,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "progress": not args.no_progress,
        "runner": runner,
        "model": model_path(args.model),
        **options,
    }
    if args.metadata is not None:
        out = generate_geneval(runner.pipeline, args.metadata, args.out, **common)
        message = f"wrote GenEval folders to {out} and {out / 'grid.png'}"
    else:
        files = generate_prompts(runner.pipeline, args.prompt, args.out, **common)
        message = f"wrote {len(files)} images to {args.out} and {Path(args.out) / 'grid.png'}"
    if runner.processes.is_writer:
        print(message)
    return 0
