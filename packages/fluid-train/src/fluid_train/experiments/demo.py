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
half-written one (``experiments.cache``). ``fluid_train.experiments.study`` builds on the
same stages.

Budgets (``--budget``): ``small`` (about 5 minutes on 2 CPU cores), ``default`` (about 15) and
``large`` (about 30) are fixed settings, reproducible from the seed; a number of minutes scales
the training steps of the nearest named budget below it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Log, Stages
from .evaluation import contact_grid, evaluate_pipeline, plot_loss, read_metrics
from .settings import DemoSettings, demo_settings
from .world import World, build_world

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..trainer import TrainResult

__all__ = ["DemoReport", "run_demo", "train_model"]


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
    time_limit_s: float | None = None,
    resume: bool = False,
    ckpt_every: int | None = None,
) -> TrainResult:
    """Train one model on the encoded shapes world with the real trainer (for at most
    ``time_limit_s`` seconds); ``result.pipeline`` is the exported EMA pipeline.

    A fresh run replaces ``run_dir``; ``resume=True`` continues it from its newest checkpoint
    (written every ``ckpt_every`` steps, default: at the end) up to ``settings.steps``.

    The recipe is the paper's (AdamW β=(0.9, 0.95), weight decay 0.02, linear warmup to a
    constant learning rate, gradient clipping, EMA every step), scaled down: warmup, steps,
    batch and EMA decay fit a run of minutes.
    """
    from ..recipe import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
    from ..trainer import train

    run = Path(run_dir)
    if not resume:
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: stages 1-4 are the cache
    config = TrainConfig(
        out=str(run),
        preset=settings.preset,
        model=settings.model_config(tokens=tokens, order=order),
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
        ckpt_every=min(ckpt_every or settings.steps, settings.steps),
        keep_checkpoints=1,
        resume=resume,
        progress=progress,
        time_limit_s=time_limit_s,
    )
    result = train(config)
    if result.preempted is not None:
        raise KeyboardInterrupt(
            f"training {run} was stopped by {result.preempted} after step {result.step}; its "
            f"checkpoint {result.checkpoint} is kept (the study resumes from it)"
        )
    if result.pipeline is None:
        raise RuntimeError(f"training {run} exported no pipeline")
    return result


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
    trained_steps: int  # settings.steps, or fewer where the time budget ran out first
    time_limited: bool
    train_time_limit_s: float | None  # what the budget left for training
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


def run_demo(
    out: str | os.PathLike = "demo",
    *,
    budget: str | float = "default",
    settings: DemoSettings | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    log: Log = print,
    progress: bool = True,
) -> DemoReport:
    """Run every stage (module docstring) and write ``out/report.json``, ``grid.png``, ``loss.png``.

    ``settings`` replaces the budget's settings; ``cache`` defaults to ``out/cache``. Torch's
    thread count is the caller's (``fluid demo`` sets it with
    :func:`fluid_train.experiments.machine.configure_cpu`).
    """
    from ..model import FluidModel

    start = time.perf_counter()
    budget_name = str(budget) if settings is None else "custom"
    settings = settings or demo_settings(budget)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "cache"
    stages = Stages(log, progress=progress)
    world = build_world(cache, settings.world, seed=seed, stages=stages)
    config = settings.model_config()
    params = FluidModel.count_params(config).total
    time_limit = None
    if settings.minutes is not None:
        # Size training to what the budget leaves on this machine: the steps are a cap.
        left = settings.minutes * 60 - (time.perf_counter() - start) - settings.after_train_s
        if left < 1.0:
            log(f"[train] the {settings.minutes:g}-minute budget is spent before training")
        time_limit = max(left, 1.0)
    limit_text = "" if time_limit is None else f", at most {time_limit:.0f} s"
    with stages.stage("train", f"Fluid {settings.preset} ({params / 1e6:.2f}M params), up to {settings.steps} steps of {settings.batch_size}{limit_text}"):  # fmt: skip
        trained = train_model(
            world, settings, out / "run", seed=seed, progress=progress, time_limit_s=time_limit
        )
    if trained.time_limited:
        log(f"[train] the budget allowed {trained.step} of {settings.steps} steps")
    pipeline = trained.pipeline
    result = evaluate_pipeline(pipeline, settings, out, cache=cache, seed=seed, stages=stages)
    metrics = read_metrics(out / "run")
    files = {
        "grid": str(contact_grid(Path(result["generated"]), result["metadata"], out / "grid.png")),
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
        trained_steps=trained.step,
        time_limited=trained.time_limited,
        train_time_limit_s=time_limit,
        params=params,
        settings={**settings.to_dict(), "budget": budget_name},
        seed=seed,
        files=files,
    )
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log(report.format())
    return report
