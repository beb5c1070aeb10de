"""Judging a trained shapes-world model: GenEval and FID on a fixed prompt set, chance levels,
the loss curve and the contact sheet."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import StageCache, Stages
from .settings import DemoSettings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fluid_eval.shapes import LayoutConfig

__all__ = ["evaluate_pipeline", "plot_loss", "read_metrics", "contact_grid"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """The training loss curve (mean loss of each logged window) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], "-", linewidth=1.2)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _chance(
    metadata: Sequence[dict[str, Any]],
    detector: Any,
    *,
    samples: int,
    size: int,
    layout: LayoutConfig,
    seed: int,
) -> dict[str, float]:
    """Per-family chance level: every prompt judged on scenes of the training distribution drawn
    without reading it (what a model that ignores the text would score)."""
    import numpy as np

    from fluid_eval.geneval import evaluate_image, summarize
    from fluid_eval.shapes import render_image, sample_training_pair

    rng = np.random.default_rng([seed, 7])
    results = [
        evaluate_image(
            render_image(sample_training_pair(rng, layout=layout).scene, size), entry, detector
        )
        for entry in metadata
        for _ in range(samples)
    ]
    return dict(summarize(results).tasks)


def evaluate_pipeline(
    pipeline_dir: str | os.PathLike,
    settings: DemoSettings,
    out_dir: str | os.PathLike,
    *,
    cache: str | os.PathLike,
    seed: int = 0,
    stages: Stages | None = None,
) -> dict[str, Any]:
    """Generate for the fixed prompt set and score: GenEval, FID, per-family chance levels."""
    from fluid_eval import ShapesDetector, compute_fid, render_metadata, score_folder, write_prompts
    from fluid_eval.geneval import load_metadata, write_generations

    from ..pipeline import FluidPipeline

    stages = stages or Stages(print)
    out = Path(out_dir)
    n, k = settings.num_prompts, settings.samples_per_prompt
    world, layout = settings.world, settings.world.layout_config()
    prompts_settings = {
        "num": n, "samples": k, "size": world.image_size, "layout": world.layout_key(),
        "seed": seed,
    }  # fmt: skip
    with StageCache(cache, stages).entry("prompts", prompts_settings, stage="prompts") as entry:
        if entry.build:
            write_prompts(entry.build / "prompts.jsonl", n, seed=43 + seed)
            render_metadata(
                entry.build / "prompts.jsonl", entry.build / "truth", n_samples=k, size=world.image_size,
                seed=seed, layout=layout,
            )  # fmt: skip
    metadata_file, truth = entry.path / "prompts.jsonl", entry.path / "truth"
    metadata = load_metadata(metadata_file)

    pipeline = FluidPipeline.from_pretrained(pipeline_dir)
    with stages.stage("generate", f"{n} prompts x {k} images, cfg {settings.generation.cfg}"):
        sampler = pipeline.sampler(settings.generation, seed=seed)  # raster ignores num_steps
        generated = out / "generated"
        shutil.rmtree(generated, ignore_errors=True)
        with stages.bar(n, "generate", "prompt") as bar:
            write_generations(
                sampler, metadata_file, generated, n_samples=k, batch_size=settings.gen_batch_size,
                progress=lambda done, total: bar.update(done - bar.n),
            )  # fmt: skip
    with stages.stage("evaluate", "shapes-world GenEval and FID"):
        detector = ShapesDetector()
        report = score_folder(generated, detector, metadata_file=metadata_file)
        fid = compute_fid(truth, generated).fid
        truth_score = score_folder(truth, detector, metadata_file=metadata_file).overall
        chance = _chance(
            metadata, detector, samples=k, size=world.image_size, layout=layout, seed=seed
        )
    return {
        "geneval": report.to_dict(),
        "fid": fid,
        "chance": chance,
        "ground_truth_geneval": truth_score,
        "metadata_file": str(metadata_file),
        "metadata": metadata,
        "generated": str(generated),
    }


def contact_grid(
    generated: Path, metadata: Sequence[dict[str, Any]], path: Path, per_family: int = 4
) -> Path:
    """Contact sheet: the first image of the first ``per_family`` prompts of each family."""
    from PIL import Image

    from ..pipeline import contact_sheet

    picked: dict[str, list[int]] = {}
    for n, entry in enumerate(metadata):
        if len(picked.setdefault(entry["tag"], [])) < per_family:
            picked[entry["tag"]].append(n)
    order = [n for family in picked.values() for n in family]
    images = []
    for n in order:
        with Image.open(generated / f"{n:05d}" / "samples" / "0000.png") as im:
            images.append(im.convert("RGB").resize((128, 128), Image.Resampling.NEAREST))
    sheet = contact_sheet(images, [metadata[n]["prompt"] for n in order], columns=per_family * 2)
    sheet.save(path)
    return path
