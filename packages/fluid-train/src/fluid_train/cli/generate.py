"""``fluid generate``: images for prompts (PNG files + a contact sheet) or a GenEval folder.

``--model`` is a pipeline directory (holding fluid_pipeline.json) or a training run whose
export lives in ``RUN/pipeline/``. With ``--prompt``, images go to ``OUT/{prompt:05}_{k:02}.png``
with ``OUT/index.jsonl`` naming each file's prompt; with ``--metadata``, to GenEval's official
layout (``OUT/{index:05}/metadata.jsonl`` + ``samples/{k:04}.png``, written by fluid_eval).
Both write ``OUT/grid.png``: the images with their prompts underneath.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_SHEET_IMAGES = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from prompts or GenEval metadata",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="pipeline directory or training run directory"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", metavar="TEXT", help="one or more prompts")
    source.add_argument(
        "--metadata", type=Path, metavar="FILE", help="GenEval evaluation_metadata.jsonl"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--steps", type=int, help="random-order generation steps (default: the model's, 64)"
    )
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    parser.add_argument(
        "--cfg-schedule", choices=("linear", "constant"), help="guidance schedule over steps"
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument(
        "--order-policy", choices=("random", "confidence"), help="random-discrete: reveal order"
    )
    parser.add_argument("--top-k", type=int, help="discrete tokens: sample among the k most likely")
    parser.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default 4)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images generated at once (default 16)"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "num_steps": args.steps,
        "cfg": args.cfg,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "order_policy": args.order_policy,
        "top_k": args.top_k,
    }
    return {k: v for k, v in options.items() if v is not None}


def generate_prompts(
    pipeline: Any,
    prompts: Sequence[str],
    out: str | Path,
    *,
    images_per_prompt: int = 4,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = True,
    **options: Any,
) -> list[Path]:
    """Write ``images_per_prompt`` PNGs per prompt, ``index.jsonl`` and ``grid.png``; return the PNGs."""
    from tqdm.auto import tqdm

    from fluid_train.pipeline import contact_sheet
    from fluid_train.prompts import prompts_named

    _check_counts(images_per_prompt, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i, _ in enumerate(prompts) for k in range(images_per_prompt)]
    sampler = pipeline.sampler(seed=seed, progress=progress, **options)
    files, images = [], []
    named = prompts_named(pipeline.text_encoder, list(prompts))  # once per prompt, not per image
    with named, tqdm(total=len(jobs), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = sampler.generate([prompts[i] for i, _ in chunk])
            for (i, k), image in zip(chunk, batch, strict=True):
                path = out / f"{i:05}_{k:02}.png"
                image.save(path)
                files.append(path)
                images.append(image)
            bar.update(len(chunk))
    with open(out / "index.jsonl", "w") as fp:
        for (i, k), path in zip(jobs, files, strict=True):
            fp.write(
                json.dumps(
                    {
                        "file": path.name,
                        "prompt": prompts[i],
                        "prompt_index": i,
                        "sample": k,
                        "seed": seed,
                    }
                )
                + "\n"
            )
    captions = [prompts[i] for i, _ in jobs]
    contact_sheet(
        images[:MAX_SHEET_IMAGES], captions[:MAX_SHEET_IMAGES], columns=images_per_prompt
    ).save(out / "grid.png")
    return files


def generate_geneval(
    pipeline: Any,
    metadata: str | Path,
    out: str | Path,
    *,
    images_per_prompt: int = 4,
    batch_size: int = 16,
    seed: int | None = 0,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Generate for a GenEval metadata file in the official layout, plus ``grid.png``."""
    from PIL import Image
    from tqdm.auto import tqdm

    from fluid_eval import load_metadata, write_generations
    from fluid_train.pipeline import contact_sheet
    from fluid_train.prompts import prompts_named

    _check_counts(images_per_prompt, batch_size)
    entries = load_metadata(metadata)
    out = Path(out)
    sampler = pipeline.sampler(seed=seed, progress=progress, **options)
    named = prompts_named(  # entry n is line n + 1 (load_metadata drops trailing blanks only)
        pipeline.text_encoder,
        [str(e["prompt"]) for e in entries],
        [f"{metadata} line {n + 1}" for n in range(len(entries))],
    )
    with (
        named,
        tqdm(total=len(entries), desc="prompts", unit="prompt", disable=not progress) as bar,
    ):
        write_generations(
            sampler,
            entries,
            out,
            n_samples=images_per_prompt,
            batch_size=batch_size,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    shown = entries[: max(1, MAX_SHEET_IMAGES // images_per_prompt)]
    images, captions = [], []
    for n, entry in enumerate(shown):
        for k in range(images_per_prompt):
            with Image.open(out / f"{n:05}" / "samples" / f"{k:04}.png") as image:
                images.append(image.convert("RGB"))
            captions.append(str(entry["prompt"]))
    contact_sheet(images, captions, columns=images_per_prompt).save(out / "grid.png")
    return out


def _check_counts(images_per_prompt: int, batch_size: int) -> None:
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1; got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")


def run(args: argparse.Namespace) -> int:
    import torch

    from fluid_train.pipeline import FluidPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = FluidPipeline.from_pretrained(args.model, device=device)
    common = {
        "images_per_prompt": args.images_per_prompt,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "progress": not args.no_progress,
        **sampling_options(args),
    }
    if args.metadata is not None:
        out = generate_geneval(pipeline, args.metadata, args.out, **common)
        print(f"wrote GenEval folders to {out} and {out / 'grid.png'}")
    else:
        files = generate_prompts(pipeline, args.prompt, args.out, **common)
        print(f"wrote {len(files)} images to {args.out} and {Path(args.out) / 'grid.png'}")
    return 0
