"""``fluid study``: the paper's comparison of the four variants over model sizes, in miniature.

On the shapes world (the stages of ``fluid_train.experiments.world``: data, the VAE and VQ tokenizers, the
small frozen T5, encoded shards — all cached), every (variant, size) pair is trained with the
real trainer and the same recipe for the same number of steps (the paper trains every model for
the same steps), then measured:

- validation loss on held-out scenes, the training objective (``fluid_eval.loss``);
- FID (shapes feature net) and shapes-world GenEval on a fixed, balanced prompt set;

and the study fits a power law of validation loss over parameters per variant
(``fluid_eval.scaling``) and draws Figures 5, 6, 8 and 9. Outputs in ``DIR``::

    study.json              the settings (the step count is fixed on the first call)
    runs/<variant>-<size>/  run directory (metrics, pipeline) + result.json when finished
    results.json            every result, the fits and the correlations
    results.md              the table
    fig5_loss_vs_params.png, fig6_metrics_vs_params.png, fig8_..., fig9_...

Resumable: a run with a ``result.json`` written under the same settings is kept and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .cache import Log, Stages
from .demo import train_model
from .evaluation import evaluate_pipeline
from .settings import SizeSpec, StudySettings
from .world import World, build_world

__all__ = ["format_table", "run_study", "steps_for_budget"]


def steps_for_budget(
    minutes_per_run: float, settings: StudySettings, *, world: World, probe_steps: int = 3
) -> int:
    """Training steps that fit ``minutes_per_run`` for the slowest run of the grid.

    Times ``probe_steps`` optimisation steps (after one warm-up step) of the largest size of
    each token kind on real batches and leaves a quarter of the budget for evaluation.
    """
    from ..data import TrainLoader
    from ..model import FluidModel, TrainBatch

    slowest = 0.0
    size = max(settings.sizes, key=lambda s: FluidModel.count_params(settings.run_settings(s).model_config()).total)  # fmt: skip
    for variant in settings.variants:
        order, tokens = variant.split("-")
        config = settings.run_settings(size).model_config(tokens=tokens, order=order)
        loader = TrainLoader(world.encoded[tokens][0], batch_size=settings.train.batch_size, image_size=config.image_size, kind="encoded", shuffle_buffer=0)  # fmt: skip
        tensors = next(iter(loader)).tensors
        batch = TrainBatch(tokens=tensors["tokens"], text_hidden=tensors["text_hidden"], text_mask=tensors["text_mask"], token_std=tensors.get("token_std"))  # fmt: skip
        torch.manual_seed(0)
        model = FluidModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(probe_steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model.training_loss(batch).loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        slowest = max(slowest, min(times[1:]))
    return max(1, int(minutes_per_run * 60 * 0.75 / slowest))


def _val_batches(shards: Sequence[str], batch_size: int) -> Iterator[Any]:
    """Held-out encoded samples in file order, as TrainBatches of ``batch_size`` (last partial)."""
    from ..data import decode_encoded_sample, iter_raw_samples
    from ..model import TrainBatch

    def collate(items: list[dict[str, torch.Tensor]]) -> TrainBatch:
        stack = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return TrainBatch(tokens=stack["tokens"], text_hidden=stack["text_hidden"], text_mask=stack["text_mask"], token_std=stack.get("token_std"))  # fmt: skip

    items: list[dict[str, torch.Tensor]] = []
    for url in shards:
        for raw in iter_raw_samples(url):
            items.append(decode_encoded_sample(raw))
            if len(items) == batch_size:
                yield collate(items)
                items = []
    if items:
        yield collate(items)


def _validation_loss(
    pipeline_dir: Path, val_shards: Sequence[str], batch_size: int
) -> tuple[float, float]:
    from fluid_eval.loss import validation_loss

    from ..model import FluidModel

    model = FluidModel.from_pretrained(pipeline_dir, subfolder="model")

    def loss(batch: Any) -> tuple[torch.Tensor, float]:
        return model.training_loss(batch).loss, float(batch.tokens.shape[0])

    result = validation_loss(loss, _val_batches(val_shards, batch_size), seed=0)
    return result.mean, result.std_error


def _run_one(
    variant: str, size: SizeSpec, settings: StudySettings, world: World, out: Path, *,
    cache: Path, seed: int, log: Log, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    from ..model import FluidModel

    order, tokens = variant.split("-")
    run_settings = settings.run_settings(size)
    config = run_settings.model_config(tokens=tokens, order=order)
    params = FluidModel.count_params(config).total
    run_dir = out / "runs" / f"{variant}-{size.name}"
    stages = Stages(log, progress=progress)
    with stages.stage("train", f"{variant} {size.name} ({params / 1e6:.2f}M params), {settings.steps} steps"):  # fmt: skip
        pipeline = train_model(
            world, run_settings, run_dir / "run", tokens=tokens, order=order, seed=seed,
            progress=progress,
        ).pipeline  # fmt: skip
    with stages.stage("validate", "validation loss on the held-out scenes"):
        val_loss, val_stderr = _validation_loss(pipeline, world.encoded[tokens][1], settings.val_batch_size)  # fmt: skip
    scores = evaluate_pipeline(
        pipeline, run_settings, run_dir, cache=cache, seed=seed, stages=stages
    )
    return {
        "variant": variant,
        "size": size.name,
        "preset": size.preset,
        "params": params,
        "steps": settings.steps,
        "val_loss": val_loss,
        "val_loss_stderr": val_stderr,
        "fid": scores["fid"],
        "geneval": scores["geneval"]["overall"],
        "geneval_tasks": scores["geneval"]["tasks"],
        "seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
    }


def format_table(results: Sequence[dict[str, Any]], fits: dict[str, Any]) -> str:
    """The results as a markdown table, then the power-law fits per variant."""
    lines = [
        "| variant | size | params | val loss | FID | GenEval | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['val_loss']:.4f} "
            f"| {r['fid']:.2f} | {r['geneval']:.3f} | {r['seconds'].get('train', 0):.0f} |"
        )
    if fits:
        lines += ["", "| variant | power law L = a·N^b | b ± s.e. | R² |", "|---|---|---:|---:|"]
        for variant, fit in fits.items():
            lines.append(
                f"| {variant} | {fit['coefficient']:.3g}·N^{fit['exponent']:.4f} "
                f"| {fit['exponent']:.4f} ± {fit['exponent_stderr']:.4f} | {fit['r_squared']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def run_study(
    out: str | os.PathLike = "study",
    *,
    settings: StudySettings | None = None,
    minutes_per_run: float | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    log: Log = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and measure every (variant, size) of ``settings`` not yet finished in ``out``; write
    the table, fits and figures; return the ``results.json`` payload.

    ``minutes_per_run`` (instead of ``settings.steps``) picks the step count by timing the
    slowest run on this machine; the count is then stored in ``out/study.json``, so a resumed
    study trains its remaining runs exactly as the first call would have.
    """
    from fluid_eval.scaling import ScalingPoint, scaling_report

    start = time.perf_counter()
    settings = settings or StudySettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "cache"
    tokens = sorted({v.split("-")[1] for v in settings.variants})
    world = build_world(cache, settings.world, seed=seed, tokens=tokens, stages=Stages(log, progress=progress))

    saved_file = out / "study.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        if minutes_per_run is not None:  # resume with the step count of the first call
            settings = dataclasses.replace(settings, steps=int(saved["settings"]["steps"]))
    elif minutes_per_run is not None:
        steps = steps_for_budget(minutes_per_run, settings, world=world)
        log(f"[study] {minutes_per_run:g} min per run -> {steps} steps for every run")
        settings = dataclasses.replace(settings, steps=steps)
    record = {"settings": settings.to_dict(), "seed": seed}
    saved_file.write_text(json.dumps(record, indent=2, default=str) + "\n")
    results: list[dict[str, Any]] = []
    for size in settings.sizes:
        for variant in settings.variants:
            result_file = out / "runs" / f"{variant}-{size.name}" / "result.json"
            key = {"settings": settings.to_dict(), "seed": seed, "size": dataclasses.asdict(size)}
            if result_file.is_file():
                done = json.loads(result_file.read_text())
                if done.get("key") == json.loads(json.dumps(key, default=str)):
                    log(f"[study] {variant} {size.name}: finished earlier, kept")
                    results.append(done["result"])
                    continue
            log(f"[study] {variant} {size.name}: training")
            result = _run_one(variant, size, settings, world, out, cache=cache, seed=seed, log=log, progress=progress)  # fmt: skip
            result_file.write_text(json.dumps({"key": key, "result": result}, indent=2, default=str) + "\n")  # fmt: skip
            results.append(result)
            log(f"[study] {variant} {size.name}: val loss {result['val_loss']:.4f}, FID {result['fid']:.2f}, GenEval {result['geneval']:.3f}")  # fmt: skip

    points = [
        ScalingPoint(r["variant"], r["params"], r["val_loss"], r["fid"], r["geneval"])
        for r in results
    ]
    report = scaling_report(points, out).to_dict()
    payload = {
        "results": results,
        **report,
        "steps": settings.steps,
        "elapsed_s": time.perf_counter() - start,
        "settings": record["settings"],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    table = format_table(results, report["fits"])
    (out / "results.md").write_text(table)
    log(table)
    return payload
