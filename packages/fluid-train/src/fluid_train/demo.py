"""``fluid demo``: the whole system, from nothing, on the shapes world, in minutes on a CPU.

One call runs every stage of the real pipeline at a small scale, caching what it can:

1. ``data``      shapes-world shards (``fluid_eval.shapes.write_shards``) + a held-out set
2. ``tokenizer`` the small SD-VAE-style tokenizer (``fluid_tokenizers.train_vae``), its scaling
                 factor calibrated so tokens have unit variance
3. ``text``      a SentencePiece model of the captions and the small frozen random T5
4. ``encode``    shards encoded once into tokens + T5 states (``fluid_train.preprocess``)
5. ``train``     Fluid (random order, continuous tokens) with the real trainer and recipe
                 (``fluid_train.trainer.train``), scaled down; the EMA weights are exported
6. ``generate``  images for a fixed, balanced set of held-out GenEval prompts, with CFG
7. ``evaluate``  shapes-world GenEval (``ShapesDetector``) and FID (``ShapesFeatureNet``)

and writes ``DIR/report.json``, ``DIR/grid.png`` (prompts with their images) and
``DIR/loss.png``. Stages 1-4 live in ``DIR/cache/<stage>-<key>/``, keyed by a hash of every
setting that produced them (and of the stages they came from), so a second run reuses them;
an entry is written to a temporary directory and renamed, so an interrupted run never leaves a
half-written one. ``fluid_train.study`` builds on the same stages.

Budgets (``--budget``): ``small`` (about 5 minutes on 2 CPU cores), ``default`` (about 15) and
``large`` (about 30) are fixed settings, reproducible from the seed; a number of minutes scales
the training steps of the nearest named budget below it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from fluid_eval.shapes import LayoutConfig

from .presets import get_preset, token_layout

if TYPE_CHECKING:
    from .model import FluidConfig

__all__ = [
    "BUDGETS",
    "DemoReport",
    "DemoSettings",
    "Stages",
    "World",
    "WorldSettings",
    "auto_threads",
    "build_world",
    "demo_settings",
    "evaluate_pipeline",
    "run_demo",
]

CACHE_FORMAT = 1  # bump when a stage's output layout changes: old entries are then ignored
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldSettings:
    """The data and frozen parts every model of the shapes world is trained on."""

    num_images: int = 12000  # training scenes (7,000 steps of 64: 37 epochs)
    num_val: int = 512  # held-out scenes (validation loss)
    # 32 px: 4x4 tokens. A CPU run of minutes learns 16 tokens per image far faster than 64
    # (GenEval 0.13 vs 0.04 after the same number of tokens trained on, README); the detector
    # reads 32 px renders as well as 64 px ones.
    image_size: int = 32
    # "cells": every object inside its own token cell, so one object is one token — a run of
    # minutes then draws clean one-colour shapes (GenEval 0.549 at the default budget vs 0.130
    # with objects straddling tokens, README). "free": the shapes world's free placement, as
    # `fluid study` uses.
    layout: Literal["cells", "free"] = "cells"
    shard_size: int = 500
    vae_images: int = 2000  # scenes the tokenizers train on
    vae_steps: int = 1000  # at 32 px: 250/256 held-out scenes reconstructed (300 steps: 24)
    vae_batch_size: int = 16
    vae_lr: float = 4e-3
    vae_kl_weight: float = 1e-4
    vq_steps: int = 300
    spm_vocab_size: int = 256  # at most; the captions' small grammar supports fewer pieces
    text_length: int = 16  # T5 padding length: captions are <= 12 word pieces + </s>

    def __post_init__(self) -> None:
        if self.layout not in ("cells", "free"):
            raise ValueError(f"world layout must be 'cells' or 'free'; got {self.layout!r}")

    def data_key(self) -> dict[str, Any]:
        """What the scenes depend on: the layout by its geometry, not its name, so an entry
        written with other sizes or gaps is never taken for this one."""
        keys = ("num_images", "num_val", "image_size", "shard_size")
        return {**{k: getattr(self, k) for k in keys}, "layout": self.layout_key()}

    def layout_key(self) -> dict[str, Any]:
        return dataclasses.asdict(self.layout_config())

    def layout_config(self) -> LayoutConfig:
        """How the world's scenes are laid out (``cells``: the token grid of this image size)."""
        if self.layout == "free":
            return LayoutConfig()
        return LayoutConfig.in_cells(token_layout(self.image_size)["grid"][0])


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSettings:
    """Everything a demo run depends on (besides the seed); written into the report."""

    world: WorldSettings = field(default_factory=WorldSettings)
    # At a fixed CPU budget the smallest shapes model, trained for more steps, does best:
    # shapes-s for 5,000 steps beat shapes-m for 3,000 in the same time (README).
    preset: str = "shapes-s"
    # get_preset overrides. One diffusion sample per token and step (the paper: 4) makes a
    # step ~1.8x cheaper; in a run of minutes more steps are worth more than more noise levels.
    # The auxiliary readout loss (DiffLossHead's regression_weight; the paper has none) lets
    # the trunk learn from its context in minutes: without it a linear probe of the trunk
    # finds almost nothing the visible half of an image says about the other half.
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "diffloss.diffusion_batch_mul": 1,
            "diffloss.regression_weight": 1.0,
        }
    )
    # ~10 minutes at the 737 images/s measured with both cores (a host's load moved it
    # between 737 and 910), leaving the 15-minute budget room for the fixed stages.
    steps: int = 7000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    # The paper's 0.9999 averages over ~10K steps; a short run that kept it would export
    # mostly its initial weights (0.9999**2000 = 0.82). None: a half-life of steps / 10, so
    # the initial weights keep 0.5**10 of the average.
    ema_decay: float | None = None
    num_prompts: int = 96  # balanced over the six GenEval families
    samples_per_prompt: int = 4
    gen_steps: int = 16  # random-order generation steps: one token per step on the 4x4 grid
    # Measured on the default model (192 images, +-0.035): temperature 1.2 with CFG 4 scored
    # 0.62, the paper's 1.0 with CFG 3 0.58, 1.5 0.56 (a short run under-disperses its head).
    cfg: float = 4.0
    temperature: float = 1.2
    gen_batch_size: int = 64

    def model_overrides(self, **extra: Any) -> dict[str, Any]:
        """``get_preset`` overrides: the world's token layout, then ``model``, then ``extra``."""
        return {**token_layout(self.world.image_size), **self.model, **extra}

    def model_config(self, **extra: Any) -> FluidConfig:
        """The model this run trains (``extra``: e.g. ``tokens=``, ``order=`` of a variant)."""
        return get_preset(self.preset, **self.model_overrides(**extra))

    @property
    def ema(self) -> float:
        """The EMA decay this run uses (``ema_decay``, or a half-life of a tenth of the steps)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 0.5 ** (10.0 / max(self.steps, 10))

    def to_dict(self) -> dict[str, Any]:
        """The settings as the report records them: ``model`` with the world's token layout."""
        return {**dataclasses.asdict(self), "model": self.model_overrides(), "ema_decay": self.ema}


TRAIN_SHARE = 0.8  # of a budget's minutes, spent training

# Measured on the 2-core CPU machine this project is developed on (see the README).
BUDGETS: dict[str, tuple[float, DemoSettings]] = {
    "small": (
        5.0,
        DemoSettings(world=WorldSettings(num_images=3000, vae_steps=600), steps=2500),
    ),
    "default": (15.0, DemoSettings()),
    "large": (30.0, DemoSettings(steps=18000)),
}


def demo_settings(budget: str | float = "default") -> DemoSettings:
    """The settings of a named budget, or of ``budget`` minutes (the largest named budget that
    fits, with its training steps scaled to the extra minutes)."""
    if isinstance(budget, str) and budget in BUDGETS:
        return BUDGETS[budget][1]
    try:
        minutes = float(budget)
    except (TypeError, ValueError):
        raise ValueError(
            f"budget must be one of {sorted(BUDGETS)} or a number of minutes; got {budget!r}"
        ) from None
    smallest = min(m for m, _ in BUDGETS.values())
    if not minutes >= smallest / 2:
        raise ValueError(f"budget must be at least {smallest / 2:g} minutes; got {minutes:g}")
    base_minutes, base = max(
        (entry for entry in BUDGETS.values() if entry[0] <= minutes),
        key=lambda entry: entry[0],
        default=min(BUDGETS.values(), key=lambda entry: entry[0]),
    )
    # Training takes about four fifths of a budget; the other stages are fixed costs.
    train_minutes = base_minutes * TRAIN_SHARE + (minutes - base_minutes)
    steps = max(10, round(base.steps * train_minutes / (base_minutes * TRAIN_SHARE)))
    return dataclasses.replace(base, steps=steps)


# ---------------------------------------------------------------------------------- stages


class Stages:
    """Timing and progress lines per stage; remembers which stages came from the cache."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.log(f"[{name}] {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.log(f"[{name}] done in {time.perf_counter() - start:.1f} s")


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextmanager
def _cache_entry(
    cache: Path, kind: str, settings: dict[str, Any], stages: Stages, name: str
) -> Iterator[tuple[Path, bool]]:
    """``(path, hit)`` of the entry for ``settings``. On a miss the body builds it in ``path``
    (a temporary directory, renamed into place when the body returns)."""
    final = cache / f"{kind}-{_digest({'kind': kind, **settings})}"
    if (final / "done.json").is_file():
        stages.cached[name] = True
        stages.log(f"[{name}] cached: {final}")
        yield final, True
        return
    stages.cached[name] = False
    tmp = cache / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp, False
    (tmp / "done.json").write_text(json.dumps({"kind": kind, **settings}, default=str) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _final_path(path: Path) -> Path:
    """The renamed location of a cache entry built under ``.tmp-<name>``."""
    return path.with_name(path.name.removeprefix(".tmp-"))


@dataclass(slots=True)
class World:
    """Paths of the shapes world's data and frozen parts (all inside the cache)."""

    train_shards: list[str]
    val_shards: list[str]
    text_encoder: Path
    tokenizers: dict[str, Path] = field(default_factory=dict)  # "continuous"/"discrete" -> dir
    encoded: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # (train, val)
    keys: dict[str, str] = field(default_factory=dict)  # stage -> cache entry name


def _shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def _load_images(shards: Sequence[str], limit: int, image_size: int) -> torch.Tensor:
    """Up to ``limit`` training images [M, 3, S, S] in [-1, 1] from image shards."""
    from .data import decode_image_sample, iter_raw_samples

    images: list[torch.Tensor] = []
    for url in shards:
        for raw in iter_raw_samples(url):
            images.append(decode_image_sample(raw, image_size)[0])
            if len(images) == limit:
                return torch.stack(images)
    return torch.stack(images)


def _captions(shards: Sequence[str]) -> Iterator[str]:
    from .data import iter_raw_samples

    for url in shards:
        for raw in iter_raw_samples(url):
            yield raw["txt"].decode() if isinstance(raw["txt"], bytes) else str(raw["txt"])


def _every(n: int, log: Log, what: str) -> Callable[[int, dict[str, float]], None]:
    def progress(step: int, metrics: dict[str, float]) -> None:
        if step % n == 0:
            log(f"  {what} step {step}: loss {metrics['loss']:.4f}")

    return progress


def build_world(
    cache: str | os.PathLike,
    world: WorldSettings,
    *,
    seed: int = 0,
    tokens: Sequence[str] = ("continuous",),
    stages: Stages | None = None,
) -> World:
    """Stages 1-4 for each token kind in ``tokens``: data, tokenizers, text, encoded shards."""
    from fluid_eval.shapes import write_shards

    unknown = sorted(set(tokens) - {"continuous", "discrete"})
    if unknown:
        raise ValueError(f"tokens must be 'continuous' and/or 'discrete'; got {list(tokens)}")
    stages = stages or Stages(print)
    cache = Path(cache)
    keys: dict[str, str] = {}
    data_settings = {**world.data_key(), "seed": seed}
    with stages.stage("data", f"{world.num_images} training + {world.num_val} held-out scenes"):
        with _cache_entry(cache, "data", data_settings, stages, "data") as (path, hit):
            if not hit:
                layout = world.layout_config()
                write_shards(
                    path / "train", world.num_images, seed, world.image_size, world.shard_size,
                    layout=layout,
                )  # fmt: skip
                # A different seed stream: held-out scenes share no (seed, index) with training.
                write_shards(
                    path / "val", world.num_val, seed + 1_000_003, world.image_size,
                    world.shard_size, layout=layout,
                )  # fmt: skip
        data = _final_path(path)
    keys["data"] = data.name
    train_images, val_images = _shards(data / "train"), _shards(data / "val")

    tokenizers: dict[str, Path] = {}
    for kind in tokens:
        tokenizers[kind] = _tokenizer(cache, world, kind, train_images, keys, seed, stages)

    with stages.stage("text", "SentencePiece model of the captions + small frozen T5"):
        settings = {
            "data": keys["data"],
            "vocab": world.spm_vocab_size,
            "words": True,
            "seed": seed,
        }
        with _cache_entry(cache, "text", settings, stages, "text") as (path, hit):
            if not hit:
                from fluid_text import build_random_t5, train_sentencepiece

                # The grammar has ~25 words; on captions alone, unigram SentencePiece keeps only
                # ~40 pieces and spells most words letter by letter. Each distinct word as one
                # more sentence makes every word a piece (a caption = its words, <= 12 ids).
                captions = list(_captions(train_images))
                words = sorted({word for caption in captions for word in caption.split()})
                spm = train_sentencepiece(
                    captions + words, path / "spm", vocab_size=world.spm_vocab_size, seed=seed,
                    vocab_limit="soft",
                )  # fmt: skip
                build_random_t5(path / "t5", spiece_model=spm, seed=seed)
        text = _final_path(path) / "t5"
    keys["text"] = text.parent.name

    encoded: dict[str, tuple[list[str], list[str]]] = {}
    for kind in tokens:
        with stages.stage("encode", f"{kind} tokens + T5 states of every scene, once"):
            settings = {"tokenizer": keys[kind], "text": keys["text"], "pad_to": world.text_length}
            with _cache_entry(cache, f"encoded-{kind}", settings, stages, "encode") as (path, hit):
                if not hit:
                    from .preprocess import preprocess

                    for split, shards in (("train", train_images), ("val", val_images)):
                        preprocess(
                            shards, tokenizer=tokenizers[kind], text_encoder=text,
                            out=path / split, pad_to=world.text_length, batch_size=64,
                            device="cpu",
                        )  # fmt: skip
            final = _final_path(path)
            encoded[kind] = (_shards(final / "train"), _shards(final / "val"))
            keys[f"encoded-{kind}"] = final.name
    return World(train_images, val_images, text, tokenizers, encoded, keys)


def _tokenizer(
    cache: Path,
    world: WorldSettings,
    kind: str,
    shards: list[str],
    keys: dict[str, str],
    seed: int,
    stages: Stages,
) -> Path:
    import fluid_tokenizers as ft

    name = "vae" if kind == "continuous" else "vq"
    steps = world.vae_steps if kind == "continuous" else world.vq_steps
    settings = {
        "data": keys["data"], "steps": steps, "images": world.vae_images, "seed": seed,
        "batch_size": world.vae_batch_size, "lr": world.vae_lr,
    }  # fmt: skip
    if kind == "continuous":
        settings["kl_weight"] = world.vae_kl_weight
    what = (
        "SD-VAE-style tokenizer (f=4, 16-ch tokens)"
        if name == "vae"
        else "VQ tokenizer (512 codes)"
    )
    with stages.stage("tokenizer", f"train the {what}, {steps} steps"):
        with _cache_entry(cache, name, settings, stages, "tokenizer") as (path, hit):
            if not hit:
                images = _load_images(shards, world.vae_images, world.image_size)
                common = {
                    "steps": steps, "batch_size": world.vae_batch_size, "lr": world.vae_lr,
                    "seed": seed, "progress": _every(max(steps // 4, 1), stages.log, name),
                }  # fmt: skip
                if name == "vae":
                    tok = ft.SDVAETokenizer.from_config(ft.shapes_vae_config(), image_size=world.image_size, seed=seed)  # fmt: skip
                    ft.train_vae(tok, images, kl_weight=world.vae_kl_weight, **common)
                    factor = ft.calibrate_scaling_factor(tok, images[:512], seed=seed)
                    stages.log(f"  scaling factor {factor:.4f} (tokens at unit variance)")
                else:
                    tok = ft.VQTokenizer.from_config(ft.shapes_vq_config(), image_size=world.image_size, seed=seed)  # fmt: skip
                    ft.train_vq(tok, images, **common)
                tok.save_pretrained(path)
    final = _final_path(path)
    keys[kind] = final.name
    return final


# ---------------------------------------------------------------------------------- training


def train_model(
    world: World,
    settings: DemoSettings,
    run_dir: str | os.PathLike,
    *,
    tokens: str = "continuous",
    order: str = "random",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train one model on the encoded shapes world with the real trainer; the EMA pipeline's dir.

    The recipe is the paper's (AdamW β=(0.9, 0.95), weight decay 0.02, linear warmup to a
    constant learning rate, gradient clipping, EMA every step), scaled down: warmup, steps,
    batch and EMA decay fit a run of minutes.
    """
    from .recipe import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
    from .trainer import train

    run = Path(run_dir)
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: stages 1-4 are the cache
    model = settings.model_overrides(tokens=tokens, order=order)
    config = TrainConfig(
        out=str(run),
        preset=settings.preset,
        model=model,
        # The encoded world (~14 KB a scene) stays in memory after the first epoch.
        data=DataConfig(
            shards=world.encoded[tokens][0], kind="encoded", shuffle_buffer=1000, memory_mb=1024
        ),
        tokenizer=str(world.tokenizers[tokens]),
        text_encoder=str(world.text_encoder),
        steps=settings.steps,
        batch_size=settings.batch_size,
        optim=OptimizerConfig(lr=settings.lr),
        schedule=ScheduleConfig(warmup_steps=settings.warmup_steps),
        ema_decay=settings.ema,
        backend="eager",
        device="cpu",
        seed=seed,
        log_every=max(1, settings.steps // 100),
        ckpt_every=settings.steps,
        keep_checkpoints=1,
        progress=progress,
    )
    result = train(config)
    if result.pipeline is None:
        raise RuntimeError(f"training {run} exported no pipeline")
    return result.pipeline


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


# ---------------------------------------------------------------------------------- evaluation


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

    from .pipeline import FluidPipeline

    stages = stages or Stages(print)
    out = Path(out_dir)
    n, k = settings.num_prompts, settings.samples_per_prompt
    world, layout = settings.world, settings.world.layout_config()
    prompts_settings = {
        "num": n, "samples": k, "size": world.image_size, "layout": world.layout_key(),
        "seed": seed,
    }  # fmt: skip
    with _cache_entry(Path(cache), "prompts", prompts_settings, stages, "prompts") as (path, hit):
        if not hit:
            write_prompts(path / "prompts.jsonl", n, seed=43 + seed)
            render_metadata(
                path / "prompts.jsonl", path / "truth", n_samples=k, size=world.image_size,
                seed=seed, layout=layout,
            )  # fmt: skip
    prompts = _final_path(path)
    metadata_file, truth = prompts / "prompts.jsonl", prompts / "truth"
    metadata = load_metadata(metadata_file)

    pipeline = FluidPipeline.from_pretrained(pipeline_dir)
    raster = pipeline.model.config.order == "raster"
    with stages.stage("generate", f"{n} prompts x {k} images, cfg {settings.cfg}"):
        options = {"cfg": settings.cfg, "temperature": settings.temperature}
        if not raster:
            options["num_steps"] = settings.gen_steps
        sampler = pipeline.sampler(seed=seed, **options)
        generated = out / "generated"
        shutil.rmtree(generated, ignore_errors=True)
        write_generations(
            sampler, metadata_file, generated, n_samples=k, batch_size=settings.gen_batch_size
        )
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


def _grid(
    generated: Path, metadata: Sequence[dict[str, Any]], path: Path, per_family: int = 4
) -> Path:
    """Contact sheet: the first image of the first ``per_family`` prompts of each family."""
    from PIL import Image

    from .pipeline import contact_sheet

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


# ---------------------------------------------------------------------------------- the demo


@dataclass(slots=True)
class DemoReport:
    """What ``report.json`` holds (§12 of DESIGN.md: geneval_overall, per-family, fid, elapsed)."""

    geneval_overall: float
    geneval: dict[str, float]  # family -> score
    chance: dict[str, float]  # family -> chance level (right images for the wrong prompt)
    ground_truth_geneval: float  # the ground-truth renders' score (the detector's ceiling)
    fid: float
    elapsed_s: float
    stage_seconds: dict[str, float]
    cached: dict[str, bool]
    final_loss: float | None
    params: int
    settings: dict[str, Any]
    seed: int
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"{'family':<16}{'score':>8}{'chance':>8}", "-" * 32]
        for family, score in self.geneval.items():
            lines.append(f"{family:<16}{score:>8.3f}{self.chance.get(family, float('nan')):>8.3f}")
        lines += [
            "-" * 32,
            f"{'GenEval overall':<16}{self.geneval_overall:>8.3f}   (ground truth {self.ground_truth_geneval:.3f})",
            f"{'FID (shapes)':<16}{self.fid:>8.2f}",
            f"{'elapsed':<16}{self.elapsed_s:>7.0f}s   "
            + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items()),
        ]
        return "\n".join(lines)


def _busy_cores(window_s: float = 0.5) -> float | None:
    """Cores busy right now (Linux ``/proc/stat`` over ``window_s``); None where unreadable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]  # the aggregate "cpu" line
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """Intra-op threads for this process: the cores not busy now, at least 1.

    On a shared machine, more threads than free cores is much slower than fewer: a training
    step of 64 px shapes-m took 4.3 s with 2 threads and 0.93 s with 1 while another job used
    a core of 2 (OpenMP workers wait on each other at every op). Busy cores are measured over
    half a second (``/proc/stat``), not read from the one-minute load average, which still
    counts a job that just ended (an install right before ``fluid demo``, say); the load
    average is the fallback where ``/proc/stat`` is missing.
    """
    cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(busy)))


def run_demo(
    out: str | os.PathLike = "demo",
    *,
    budget: str | float = "default",
    settings: DemoSettings | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    log: Log = print,
    progress: bool = True,
    threads: int | None = None,
) -> DemoReport:
    """Run every stage (module docstring) and write ``out/report.json``, ``grid.png``, ``loss.png``.

    ``settings`` replaces the budget's settings; ``cache`` defaults to ``out/cache``;
    ``threads`` (torch intra-op threads) defaults to :func:`auto_threads`.
    """
    from .model import FluidModel

    start = time.perf_counter()
    budget_name = str(budget) if settings is None else "custom"
    settings = settings or demo_settings(budget)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "cache"
    torch.set_num_threads(threads or auto_threads())
    # Tiny convolutions and MLPs on a CPU meet subnormal floats; flushing them to zero keeps
    # training ~10x faster (measured on the VAE) and changes no result above 1e-38.
    torch.set_flush_denormal(True)
    stages = Stages(log)
    world = build_world(cache, settings.world, seed=seed, stages=stages)
    config = settings.model_config()
    params = FluidModel.count_params(config).total
    with stages.stage("train", f"Fluid {settings.preset} ({params / 1e6:.2f}M params), {settings.steps} steps of {settings.batch_size}"):  # fmt: skip
        pipeline = train_model(world, settings, out / "run", seed=seed, progress=progress)
    result = evaluate_pipeline(pipeline, settings, out, cache=cache, seed=seed, stages=stages)
    metrics = read_metrics(out / "run")
    files = {
        "grid": str(_grid(Path(result["generated"]), result["metadata"], out / "grid.png")),
        "loss_curve": str(plot_loss(metrics, out / "loss.png", f"Fluid {settings.preset}")),
        "pipeline": str(pipeline),
        "generated": result["generated"],
        "prompts": result["metadata_file"],
    }
    geneval = result["geneval"]
    report = DemoReport(
        geneval_overall=geneval["overall"],
        geneval=geneval["tasks"],
        chance=result["chance"],
        ground_truth_geneval=result["ground_truth_geneval"],
        fid=result["fid"],
        elapsed_s=time.perf_counter() - start,
        stage_seconds={k: round(v, 2) for k, v in stages.seconds.items()},
        cached=stages.cached,
        final_loss=metrics[-1]["loss"] if metrics else None,
        params=params,
        settings={**settings.to_dict(), "budget": budget_name},
        seed=seed,
        files=files,
    )
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log(report.format())
    return report
