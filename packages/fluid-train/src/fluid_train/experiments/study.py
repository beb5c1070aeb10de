"""``fluid study``: the paper's comparison of the four variants over model sizes, in miniature.

On the shapes world (the stages of ``fluid_train.experiments.world``: data, the VAE and VQ tokenizers, the
small frozen T5, encoded shards — all cached), every run of ``StudySettings.runs()`` (a variant
at a size; the continuous ones of ``no_readout`` also without the readout loss) is trained with
the real trainer and the same recipe for the same number of steps (the paper trains every model
for the same steps), then measured:

- validation loss on held-out scenes: the training objective without the auxiliary readout
  term, so runs with and without it compare (``fluid_eval.loss``);
- CFG and temperature tuned on a second prompt set (``_prompt_sets``), separately for GenEval
  and for FID;
- FID (shapes feature net, bootstrap standard error) and shapes-world GenEval (binomial
  standard errors per family) on the evaluation prompt set, each at its tuned setting.

The ``milestone_variants`` (Fluid) are also measured at ``milestones`` of their training
(Figures 8, 9). The study then tests the paper's four findings (``findings``) and writes::

    study.json              the settings (the step count is fixed on the first call)
    runs/<run>/             the trainer's run directory, milestones/<step>.json, result.json
    results.json            every run's numbers, the fits, correlations and findings
    results.md              the tables: runs, fits, findings
    fig5_loss_vs_params.png, fig6_metrics_vs_params.png, fig8_loss_vs_fid.png,
    fig9_loss_vs_geneval.png, fig13_geneval_families.png

Resumable: a run with a ``result.json`` written under the same settings is kept, an evaluated
milestone is kept, and an interrupted training continues from its newest checkpoint.

Several workers (``fluid study`` started more than once on the same ``DIR``, e.g. one per
core with ``--threads 1``) share the runs: each holds a run while it trains it through a lock
on its ``worker.lock`` (``workers.claimed``; the kernel frees it when the worker dies), and
every worker writes the report once all runs are finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from .cache import Log, Stages
from .demo import train_model
from .evaluation import PromptSet, chance_levels, evaluate_pipeline
from .findings import findings, format_findings
from .settings import SizeSpec, StudyRun, StudySettings
from .workers import claimed
from .world import World, build_world

__all__ = ["format_table", "run_study", "steps_for_budget"]

CKPT_EVERY = 1000  # steps between a run's checkpoints (what an interruption can lose)
TUNE_PROMPT_SEED = 1043  # the tuning prompts' draw (the evaluation prompts': 43)
WAIT_S = 30.0  # how often a worker with nothing left looks for the others' results


# ------------------------------------------------------------------------------ timing


def _step_seconds(
    settings: StudySettings, world: World, size: SizeSpec, tokens: str, probe_steps: int = 3
) -> float:
    """Seconds of one optimisation step (best of ``probe_steps``, after a warm-up step) of the
    ``size`` model for ``tokens`` on a real batch."""
    from ..data import TrainLoader
    from ..model import FluidModel, TrainBatch

    config = settings.run_settings(size).model_config(tokens=tokens, order="random")
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
    return min(times[1:])


def steps_for_budget(
    minutes_per_run: float, settings: StudySettings, *, world: World, probe_steps: int = 3
) -> int:
    """Training steps that fit ``minutes_per_run`` for the slowest run of the grid.

    Times ``probe_steps`` optimisation steps (after one warm-up step) of the largest size of
    each token kind on real batches and leaves a quarter of the budget for evaluation.
    """
    from ..model import FluidModel

    size = max(settings.sizes, key=lambda s: FluidModel.count_params(settings.run_settings(s).model_config()).total)  # fmt: skip
    tokens = sorted({v.split("-")[1] for v in settings.variants})
    slowest = max(_step_seconds(settings, world, size, t, probe_steps) for t in tokens)
    return max(1, int(minutes_per_run * 60 * 0.75 / slowest))


class _Clock:
    """The study's ETA: each run's predicted seconds (probed step time x steps, plus its
    evaluations), rescaled by how the finished runs compared with their predictions."""

    EVAL_GUESS_S = 40.0  # one tuned evaluation, until one has been measured

    def __init__(self, predicted_train: dict[str, float], evaluations: dict[str, int]) -> None:
        self.predicted_train = predicted_train
        self.evaluations = evaluations
        self.train_ratio: list[float] = []
        self.eval_seconds: list[float] = []

    def record(self, name: str, train_s: float | None, eval_s: list[float]) -> None:
        if train_s:
            self.train_ratio.append(train_s / self.predicted_train[name])
        self.eval_seconds.extend(eval_s)

    def estimate(self, name: str) -> float:
        ratio = sum(self.train_ratio) / len(self.train_ratio) if self.train_ratio else 1.2
        per_eval = (
            sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else self.EVAL_GUESS_S
        )  # fmt: skip
        return self.predicted_train[name] * ratio + self.evaluations[name] * per_eval


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _study_clock(
    settings: StudySettings, world: World, runs: Sequence[StudyRun], tokens: Sequence[str]
) -> _Clock:
    """The ETA's clock: one step-time probe per (size, token kind)."""
    step_s = {
        (size.name, t): _step_seconds(settings, world, size, t) for size in settings.sizes for t in tokens
    }  # fmt: skip
    return _Clock(
        {r.name: step_s[(r.size.name, r.tokens)] * settings.steps for r in runs},
        {r.name: len(r.milestones) + 1 for r in runs},
    )


# ------------------------------------------------------------------------------ measuring


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


def _validation_loss(model: Any, val_shards: Sequence[str], batch_size: int) -> tuple[float, float]:
    """The held-out objective of ``model`` (a FluidModel) and its standard error, without the
    DiffLoss head's readout term: the paper's objective, whether or not it was trained with it."""
    from fluid_eval.loss import validation_loss

    def loss(batch: Any) -> tuple[torch.Tensor, float]:
        return model.training_loss(batch, auxiliary=False).loss, float(batch.tokens.shape[0])

    result = validation_loss(loss, _val_batches(val_shards, batch_size), seed=0)
    return result.mean, result.std_error


def _prompt_sets(settings: StudySettings) -> tuple[PromptSet, PromptSet]:
    """The tuning and the evaluation prompt sets of every run.

    The tuning prompts are drawn with another seed, but they are not held out: the world's
    grammar has 3 single-object and 6 two-object prompts, and the evaluation set holds every
    one of them. 29 of the default 48 tuning prompts also stand in the evaluation set, so
    the tuning differs from the evaluation in its draws (samples, renders) more than in its
    prompts."""
    train = settings.train
    return (
        PromptSet(settings.tune_prompts, settings.tune_samples, prompt_seed=TUNE_PROMPT_SEED),
        PromptSet(train.num_prompts, train.samples_per_prompt),
    )


def _best_settings(grid: Sequence[Any], tuning: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's best grid point: the highest GenEval, the lowest FID (ties: the first)."""
    return {
        "geneval": grid[max(range(len(grid)), key=lambda i: tuning[i]["geneval"])],
        "fid": grid[min(range(len(grid)), key=lambda i: tuning[i]["fid"])],
    }


def _tuned_scores(
    pipeline: Any, settings: StudySettings, run: StudyRun, out: Path, *,
    cache: Path, seed: int, stages: Stages,
) -> dict[str, Any]:  # fmt: skip
    """Tune CFG and temperature on the tuning prompts (GenEval and FID each), then score the
    evaluation prompts at each metric's setting (``pipeline``: the run's loaded pipeline)."""
    run_settings = settings.run_settings(run.size, readout=run.readout)
    tune_set, eval_set = _prompt_sets(settings)
    common = {"cache": cache, "seed": seed, "stages": stages, "chance": False}
    grid, tuning = settings.tuning_grid(), []
    for n, generation in enumerate(grid):
        r = evaluate_pipeline(pipeline, run_settings, out / f"tune-{n}", generation=generation, prompts=tune_set, **common)  # fmt: skip
        tuning.append({"generation": r["generation"], "geneval": r["geneval"]["overall"], "fid": r["fid"]})  # fmt: skip
        shutil.rmtree(out / f"tune-{n}", ignore_errors=True)
    best = _best_settings(grid, tuning)
    evals = {}
    for metric, generation in best.items():
        if metric == "fid" and generation == best["geneval"]:
            evals["fid"] = evals["geneval"]
            continue
        # FID's bootstrap only where its FID is kept (the GenEval setting's FID is dropped
        # when FID has a setting of its own).
        keeps_fid = metric == "fid" or best["fid"] == best["geneval"]
        evals[metric] = evaluate_pipeline(
            pipeline, run_settings, out / f"eval-{metric}", generation=generation,
            prompts=eval_set, fid_resamples=settings.fid_resamples if keeps_fid else 0, **common,
        )  # fmt: skip
    geneval = evals["geneval"]
    return {
        "fid": evals["fid"]["fid"],
        "fid_stderr": evals["fid"]["fid_stderr"],
        "geneval": geneval["geneval"]["overall"],
        "geneval_stderr": geneval["geneval_stderr"]["overall"],
        "geneval_tasks": geneval["geneval"]["tasks"],
        "geneval_tasks_stderr": geneval["geneval_stderr"]["tasks"],
        "images": geneval["geneval"]["num_images"],
        "inference": {m: dataclasses.asdict(g) for m, g in best.items()},
        "tuning": tuning,
    }


def _read_if(path: Path, key: Any) -> dict[str, Any] | None:
    """The ``result`` stored at ``path`` when it was written under ``key``."""
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done["result"] if done.get("key") == key else None


def _write(path: Path, key: Any, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "result": result}, indent=2, default=str) + "\n")  # fmt: skip


def _run_one(
    run: StudyRun, settings: StudySettings, world: World, out: Path, key: Any, *,
    cache: Path, seed: int, log: Log, progress: bool,
) -> tuple[dict[str, Any], float | None, list[float]]:  # fmt: skip
    """Train ``run`` to each milestone and to the end, measuring at each; resumes a partial
    run. Returns the result, the seconds trained in this call (None when none) and the seconds
    of each evaluation made."""
    from ..model import FluidModel
    from ..pipeline import FluidPipeline

    run_settings = settings.run_settings(run.size, readout=run.readout)
    config = run_settings.model_config(tokens=run.tokens, order=run.order)
    params = FluidModel.count_params(config).total
    run_dir = out / "runs" / run.name
    key_file = run_dir / "key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        log(f"[study] {run.name}: settings changed since it was started; training it afresh")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2) + "\n")

    stages = Stages(log, progress=progress)
    points, train_s, eval_s = [], 0.0, []
    for target in (*run.milestones, settings.steps):
        point_file = run_dir / "milestones" / f"{target:06d}.json"
        point = _read_if(point_file, key)
        if point is None:
            start = time.perf_counter()
            stage_settings = dataclasses.replace(run_settings, steps=target, ema_decay=run_settings.ema)  # fmt: skip
            with stages.stage("train", f"{run.name} ({params / 1e6:.2f}M params) to step {target} of {settings.steps}"):  # fmt: skip
                pipeline = train_model(
                    world, stage_settings, run_dir / "run", tokens=run.tokens, order=run.order,
                    seed=seed, progress=progress, resume=True, ckpt_every=CKPT_EVERY,
                ).pipeline  # fmt: skip
            train_s += time.perf_counter() - start
            start = time.perf_counter()
            loaded = FluidPipeline.from_pretrained(pipeline)  # validated and sampled alike
            with stages.stage("validate", "validation loss on the held-out scenes"):
                val_loss, val_se = _validation_loss(loaded.model, world.encoded[run.tokens][1], settings.val_batch_size)  # fmt: skip
            scores = _tuned_scores(loaded, settings, run, run_dir / f"step-{target}", cache=cache, seed=seed, stages=stages)  # fmt: skip
            point = {"step": target, "val_loss": val_loss, "val_loss_stderr": val_se, **scores}
            _write(point_file, key, point)
            eval_s.append(time.perf_counter() - start)
            log(
                f"[study] {run.name} step {target}: val loss {val_loss:.4f}, "
                f"FID {point['fid']:.2f} ± {point['fid_stderr']:.2f}, "
                f"GenEval {point['geneval']:.3f} ± {point['geneval_stderr']:.3f}"
            )
        points.append(point)
    final = points[-1]
    result = {
        "run": run.name,
        "variant": run.label,
        "order": run.order,
        "tokens": run.tokens,
        "readout": run.readout,
        "size": run.size.name,
        "preset": run.size.preset,
        "size_overrides": run.size.overrides,
        "params": params,
        "steps": settings.steps,
        **{k: v for k, v in final.items() if k != "step"},
        "milestones": points[:-1],
        "seconds": {"train": round(train_s, 1), "evaluate": round(sum(eval_s), 1)},
    }
    return result, (train_s or None), eval_s


# ------------------------------------------------------------------------------ reporting


def format_table(results: Sequence[dict[str, Any]], fits: dict[str, Any]) -> str:
    """The runs as a markdown table, then the power-law fits of validation loss per variant."""
    lines = [
        "| variant | size | params | val loss | FID | GenEval | inference (GenEval) | train s |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        g = r["inference"]["geneval"]
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['params'] / 1e6:.2f}M "
            f"| {r['val_loss']:.4f} ± {r['val_loss_stderr']:.4f} "
            f"| {r['fid']:.2f} ± {r['fid_stderr']:.2f} | {r['geneval']:.3f} ± {r['geneval_stderr']:.3f} "
            f"| cfg {g['cfg']:g}, T {g['temperature']:g} | {r['seconds']['train']:.0f} |"
        )
    if fits:
        lines += ["", "| variant | power law L = a·N^b | b ± s.e. | R² |", "|---|---|---:|---:|"]
        for variant, fit in fits.items():
            lines.append(
                f"| {variant} | {fit['coefficient']:.3g}·N^{fit['exponent']:.4f} "
                f"| {fit['exponent']:.4f} ± {fit['exponent_stderr']:.4f} | {fit['r_squared']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _figures(results: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Fits and Figures 5, 6 (final runs), 8, 9 (Fluid along training) and 13 (families)."""
    from fluid_eval.scaling import ScalingPoint, plot_geneval_families, scaling_report

    finals = [ScalingPoint(r["variant"], r["params"], r["val_loss"], r["fid"], r["geneval"]) for r in results]  # fmt: skip
    # Figures 8, 9 and the correlations: Fluid's checkpoints along training, at every size.
    along = [
        ScalingPoint(f"{r['variant']} {r['size']}", r["params"], p["val_loss"], p["fid"], p["geneval"])
        for r in results
        if r["milestones"]
        for p in (*r["milestones"], r)
    ]  # fmt: skip
    report = scaling_report(finals, out, along=along).to_dict()
    largest = results[-1]["size"]
    top = [r for r in results if r["size"] == largest]
    report["plots"]["fig13"] = str(plot_geneval_families(
        {r["variant"]: r["geneval_tasks"] for r in top}, out / "fig13_geneval_families.png",
        errors={r["variant"]: r["geneval_tasks_stderr"] for r in top},
        title=f"GenEval per family, size {largest}",
    ))  # fmt: skip
    return report


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
    """Train and measure every run of ``settings`` not yet finished in ``out``; write the
    tables, fits, findings and figures; return the ``results.json`` payload.

    ``minutes_per_run`` (instead of ``settings.steps``) picks the step count by timing the
    slowest run on this machine; the count is then stored in ``out/study.json``, so a resumed
    study trains its remaining runs exactly as the first call would have.
    """
    start = time.perf_counter()
    settings = settings or StudySettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "cache"
    tokens = sorted({v.split("-")[1] for v in settings.variants})
    world = build_world(cache, settings.world, seed=seed, tokens=tokens, stages=Stages(log, progress=progress))  # fmt: skip

    saved_file = out / "study.json"
    if saved_file.is_file() and minutes_per_run is not None:  # the step count of the first call
        saved = json.loads(saved_file.read_text())
        settings = dataclasses.replace(settings, steps=int(saved["settings"]["steps"]))
    elif minutes_per_run is not None:
        steps = steps_for_budget(minutes_per_run, settings, world=world)
        log(f"[study] {minutes_per_run:g} min per run -> {steps} steps for every run")
        settings = dataclasses.replace(settings, steps=steps)
    record = {"settings": settings.to_dict(), "seed": seed}
    saved_file.write_text(json.dumps(record, indent=2, default=str) + "\n")

    runs = settings.runs()
    clock: _Clock | None = None  # the step-time probes run once a run is left to train
    found: dict[str, dict[str, Any]] = {}
    pending, first_pass, announced = list(enumerate(runs, 1)), True, set()
    while pending:
        waiting = []
        for n, run in pending:
            key = json.loads(json.dumps({**record, "run": dataclasses.asdict(run)}, default=str))
            result_file = out / "runs" / run.name / "result.json"
            done = _read_if(result_file, key)
            if done is not None:
                how = "finished earlier, kept" if first_pass else "finished by another worker"
                log(f"[study] {n}/{len(runs)} {run.name}: {how}")
                found[run.name] = done
                continue
            with claimed(out / "runs" / run.name) as holder:
                if holder is not None:  # another worker trains it; its result is read later
                    if run.name not in announced:
                        log(f"[study] {n}/{len(runs)} {run.name}: trained by worker {holder['pid']} on {holder['host']}")  # fmt: skip
                        announced.add(run.name)
                    waiting.append((n, run))
                    continue
                done = _read_if(result_file, key)  # finished while this worker claimed it
                if done is None:
                    clock = clock or _study_clock(settings, world, runs, tokens)
                    held = {r.name for _, r in waiting}  # other workers train these
                    left = sum(clock.estimate(r.name) for _, r in pending if r.name not in found.keys() | held)  # fmt: skip
                    eta = time.strftime("%H:%M", time.localtime(time.time() + left))
                    log(
                        f"[study] {n}/{len(runs)} {run.name}: training {settings.steps} steps, "
                        f"~{_minutes(clock.estimate(run.name))}; this worker's remaining runs "
                        f"~{_minutes(left)}, ETA {eta}"
                    )
                    done, train_s, eval_s = _run_one(run, settings, world, out, key, cache=cache, seed=seed, log=log, progress=progress)  # fmt: skip
                    clock.record(run.name, train_s, eval_s)
                    _write(result_file, key, done)
                found[run.name] = done
        if waiting and (first_pass or len(waiting) < len(pending)):
            log(f"[study] waiting for {len(waiting)} run(s) other workers are training")
        pending, first_pass = waiting, False
        if pending:
            time.sleep(WAIT_S)
    results = [found[r.name] for r in runs]

    report = _figures(results, out)
    chance, truth = chance_levels(
        settings.world, _prompt_sets(settings)[1], cache=cache, seed=seed,
        stages=Stages(log, progress=progress),
    )  # fmt: skip
    measured = findings(results, report["correlations"])
    payload = {
        "results": results,
        **report,
        "findings": measured,
        "chance": chance,
        "ground_truth_geneval": truth,
        "steps": settings.steps,
        "elapsed_s": time.perf_counter() - start,
        "settings": record["settings"],
    }
    # Every worker writes the report at the end: whole files, never a half-written one.
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    table = format_table(results, report["fits"]) + "\n" + format_findings(measured)
    write_text_atomic(out / "results.md", table)
    log(table)
    return payload
