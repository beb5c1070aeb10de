"""Judging a trained shapes-world model: GenEval and FID on a fixed prompt set, chance levels,
the loss curve and the contact sheet."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import GenerationConfig
from ..runlog import read_metrics  # noqa: F401 - re-exported: the experiments read runs with it
from .cache import StageCache, Stages
from .settings import DemoSettings, WorldSettings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fluid_eval.shapes import LayoutConfig

    from ..pipeline import FluidPipeline

__all__ = [
    "PromptSet",
    "chance_levels",
    "contact_grid",
    "evaluate_pipeline",
    "plot_loss",
    "read_metrics",
]


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


@dataclass(frozen=True, slots=True)
class PromptSet:
    """A fixed set of shapes-world GenEval prompts with ground-truth renders (the FID reference):
    ``num`` prompts balanced over the families, ``samples`` images each, drawn with
    ``prompt_seed`` (the demo's and the study's evaluation set: 43)."""

    num: int
    samples: int
    prompt_seed: int = 43

    def build(self, cache: str | os.PathLike, world: WorldSettings, *, seed: int, stages: Stages) -> tuple[Path, Path]:  # fmt: skip
        """The metadata file and the truth folder, built once in the stage cache."""
        from fluid_eval import render_metadata, write_prompts

        key = {
            "num": self.num, "samples": self.samples, "size": world.image_size,
            "layout": world.layout_key(), "seed": seed,
        }  # fmt: skip
        if self.prompt_seed != 43:  # the key the demo's entries were written under stays
            key["prompt_seed"] = self.prompt_seed
        with StageCache(cache, stages).entry("prompts", key, stage="prompts") as entry:
            if entry.build:
                write_prompts(entry.build / "prompts.jsonl", self.num, seed=self.prompt_seed + seed)
                render_metadata(
                    entry.build / "prompts.jsonl", entry.build / "truth", n_samples=self.samples,
                    size=world.image_size, seed=seed, layout=world.layout_config(),
                )  # fmt: skip
        return entry.path / "prompts.jsonl", entry.path / "truth"


def evaluate_pipeline(
    pipeline: str | os.PathLike | FluidPipeline,
    settings: DemoSettings,
    out_dir: str | os.PathLike,
    *,
    cache: str | os.PathLike,
    seed: int = 0,
    stages: Stages | None = None,
    generation: GenerationConfig | None = None,
    prompts: PromptSet | None = None,
    fid_resamples: int = 0,
    chance: bool = True,
) -> dict[str, Any]:
    """Generate for a fixed prompt set and score: GenEval, FID, per-family chance levels.

    ``generation`` (default ``settings.generation``) and ``prompts`` (default: the settings'
    ``num_prompts`` x ``samples_per_prompt`` evaluation set) choose what is generated;
    ``fid_resamples`` adds FID's bootstrap standard error, ``chance=False`` skips the chance
    levels and the ground truth's own score. ``pipeline``: a saved pipeline's directory, or
    one already loaded."""
    from fluid_eval import ShapesDetector, compute_fid, score_folder
    from fluid_eval.geneval import load_metadata, write_generations

    from ..pipeline import FluidPipeline

    stages = stages or Stages(print)
    generation = generation or settings.generation
    prompts = prompts or PromptSet(settings.num_prompts, settings.samples_per_prompt)
    out = Path(out_dir)
    n, k = prompts.num, prompts.samples
    world = settings.world
    metadata_file, truth = prompts.build(cache, world, seed=seed, stages=stages)
    metadata = load_metadata(metadata_file)

    if not isinstance(pipeline, FluidPipeline):
        pipeline = FluidPipeline.from_pretrained(pipeline)
    what = (
        f"{n} prompts x {k} images, cfg {generation.cfg:g}, temperature {generation.temperature:g}"
    )
    with stages.stage("generate", what):
        sampler = pipeline.sampler(generation, seed=seed)  # raster ignores num_steps
        generated = out / "generated"
        shutil.rmtree(generated, ignore_errors=True)
        with stages.bar(n, "generate", "prompt") as bar:
            write_generations(
                sampler, metadata, generated, n_samples=k, batch_size=settings.gen_batch_size,
                progress=lambda done, total: bar.update(done - bar.n),
            )  # fmt: skip
    with stages.stage("evaluate", "shapes-world GenEval and FID"):
        detector = ShapesDetector()
        report = score_folder(generated, detector, metadata_file=metadata_file)
        fid = compute_fid(truth, generated, resamples=fid_resamples)
        result = {
            "geneval": report.to_dict(),
            "geneval_stderr": report.standard_errors(),
            "fid": fid.fid,
            "fid_stderr": fid.stderr,
            "generation": dataclasses.asdict(generation),
            "metadata_file": str(metadata_file),
            "metadata": metadata,
            "generated": str(generated),
        }
        if chance:
            result["chance"], result["ground_truth_geneval"] = _reference_scores(
                metadata, metadata_file, truth, detector, samples=k, world=world, seed=seed
            )
    return result


def _reference_scores(
    metadata: Sequence[dict[str, Any]], metadata_file: Path, truth: Path, detector: Any, *,
    samples: int, world: WorldSettings, seed: int,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """A prompt set's per-family chance levels and its ground-truth renders' own score
    (``metadata``: the entries of ``metadata_file``)."""
    from fluid_eval import score_folder

    chance = _chance(
        metadata, detector, samples=samples, size=world.image_size,
        layout=world.layout_config(), seed=seed,
    )  # fmt: skip
    return chance, score_folder(truth, detector, metadata_file=metadata_file).overall


def chance_levels(
    world: WorldSettings,
    prompts: PromptSet,
    *,
    cache: str | os.PathLike,
    seed: int = 0,
    stages: Stages | None = None,
) -> tuple[dict[str, float], float]:
    """Per-family chance levels of a prompt set and its ground-truth renders' own score (the
    detector's ceiling): the same for every model judged on it."""
    from fluid_eval import ShapesDetector
    from fluid_eval.geneval import load_metadata

    stages = stages or Stages(print)
    metadata_file, truth = prompts.build(cache, world, seed=seed, stages=stages)
    return _reference_scores(
        load_metadata(metadata_file), metadata_file, truth, ShapesDetector(),
        samples=prompts.samples, world=world, seed=seed,
    )  # fmt: skip


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
