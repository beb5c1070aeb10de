"""``fluid study`` at a seconds scale: 2 variants x 2 sizes, the table, fits and figures, and a
resumed study that keeps finished runs."""

from __future__ import annotations

import json
import math

import pytest

from fluid_train.cli import main
from fluid_train.config import GenerationConfig
from fluid_train.experiments import (
    VARIANTS,
    DemoSettings,
    SizeSpec,
    Stages,
    StudySettings,
    WorldSettings,
    build_world,
    format_table,
    run_study,
    steps_for_budget,
)
from fluid_train.model import FluidModel

WORLD = WorldSettings(
    num_images=96,
    num_val=16,
    shard_size=48,
    vae_images=32,
    vae_steps=3,
    vq_steps=3,
    vae_batch_size=8,
)
TINY = StudySettings(
    world=WORLD,
    sizes=(
        SizeSpec("xs", "debug"),
        SizeSpec("s", "debug", {"backbone.width": 48, "aligner.width": 48}),
    ),
    variants=("raster-discrete", "random-continuous"),
    steps=4,
    milestones=(0.5,),
    train=DemoSettings(
        batch_size=8,
        warmup_steps=2,
        num_prompts=6,
        samples_per_prompt=1,
        generation=GenerationConfig(num_steps=4, cfg=3.0, temperature=1.0),
    ),
    tune_prompts=6,
    tune_samples=1,
    tune_cfg=(1.0, 3.0),
    tune_temperature=(1.0,),
    fid_resamples=4,
    val_batch_size=8,
)
LABELS = ("raster-discrete", "random-continuous", "random-continuous-noreadout")
RUNS = {f"{v}-{s}" for v in LABELS for s in ("xs", "s")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(out, settings=TINY, log=lambda _: None)


@pytest.mark.slow
def test_table_fits_and_figures(study):
    out, payload = study
    results = payload["results"]
    assert {f"{r['variant']}-{r['size']}" for r in results} == RUNS
    for r in results:
        assert r["steps"] == 4 and r["val_loss"] > 0 and r["fid"] > 0 and 0 <= r["geneval"] <= 1
        assert r["fid_stderr"] > 0 and r["geneval_stderr"] >= 0 and r["images"] == 6
        assert set(r["geneval_tasks_stderr"]) == set(r["geneval_tasks"])
        # Tuned on the tuning prompts: every grid point scored, each metric's choice its best.
        assert len(r["tuning"]) == 2
        best = max(r["tuning"], key=lambda t: t["geneval"])
        assert r["inference"]["geneval"]["cfg"] == best["generation"]["cfg"]
        assert r["inference"]["fid"] == min(r["tuning"], key=lambda t: t["fid"])["generation"]
        # Fluid is also measured half way (milestones=(0.5,)); the others only at the end.
        steps = [m["step"] for m in r["milestones"]]
        assert steps == ([2] if r["variant"] == "random-continuous" else [])
    by_label = {(r["variant"], r["size"]): r for r in results}
    assert not by_label[("random-continuous-noreadout", "s")]["readout"]
    assert by_label[("random-continuous", "s")]["readout"]
    by_run = {(r["variant"], r["size"]): r for r in results}
    # Larger trunk, more parameters; discrete and continuous losses are different objectives.
    assert (
        by_run[("random-continuous", "s")]["params"] > by_run[("random-continuous", "xs")]["params"]
    )
    assert set(payload["fits"]) == set(LABELS)
    for variant, fit in payload["fits"].items():
        pts = [r for r in results if r["variant"] == variant]
        (small, large) = sorted(pts, key=lambda r: r["params"])
        # Two points: the fit passes through both (slope = log-loss ratio / log-size ratio).
        slope = math.log(large["val_loss"] / small["val_loss"]) / math.log(
            large["params"] / small["params"]
        )
        assert fit["exponent"] == pytest.approx(slope, rel=1e-6, abs=1e-9)
    # Figures 8 and 9 correlate Fluid's loss with its metrics along training (2 sizes x 2 steps).
    assert set(payload["correlations"]) == {"fid", "geneval"}
    assert payload["correlations"]["fid"]["num_points"] == 4
    assert set(payload["findings"]) == {"a", "b", "c", "d", "readout"}
    verdicts = {k: payload["findings"][k]["verdict"] for k in "abcd"}
    # Two variants, one of each token kind and order: (b) and (c) have no pair to compare.
    assert verdicts["b"] == verdicts["c"] == "not measurable"
    assert {verdicts["a"], verdicts["d"]} <= {"reproduced", "partly reproduced", "not reproduced"}
    assert len(payload["findings"]["readout"]) == 2  # one line per size
    assert set(payload["chance"]) and 0 <= payload["ground_truth_geneval"] <= 1
    for figure in ("fig5", "fig6", "fig8", "fig9", "fig13"):
        assert (out / next(p for p in payload["plots"].values() if figure in p)).is_file()
    table = (out / "results.md").read_text()
    assert table.startswith(format_table(results, payload["fits"]))
    assert "| finding | paper | miniature | verdict |" in table
    assert table.count("| raster-discrete |") == 3  # two runs + one fit row
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 4 and len(saved["results"]) == 6


def test_each_metric_takes_its_own_best_grid_point():
    from fluid_train.experiments.study import _best_settings

    grid = ["cfg3", "cfg5", "cfg7"]
    tuning = [{"geneval": 0.4, "fid": 2.0}, {"geneval": 0.6, "fid": 3.0}, {"geneval": 0.6, "fid": 1.5}]  # fmt: skip
    assert _best_settings(grid, tuning) == {"geneval": "cfg5", "fid": "cfg7"}  # ties: the first


@pytest.mark.slow
def test_resume_keeps_finished_runs(study):
    out, payload = study
    # One run lost its result (as if interrupted): only that one is trained again.
    (out / "runs" / "random-continuous-s" / "result.json").unlink()
    log: list[str] = []
    again = run_study(out, settings=TINY, log=log.append)
    kept = [line for line in log if "finished earlier, kept" in line]
    trained = [line for line in log if ": training " in line]
    assert len(kept) == 5 and len(trained) == 1 and "random-continuous-s: training" in trained[0]
    # Its milestone had been measured and is kept; only the rest of the training runs.
    assert not any("random-continuous-s step 2:" in line for line in log)
    before = {(r["variant"], r["size"]): r["val_loss"] for r in payload["results"]}
    after = {(r["variant"], r["size"]): r["val_loss"] for r in again["results"]}
    assert after == pytest.approx(before, rel=1e-5)  # same seed, same cache: the same run


def test_settings_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="variants"):
        StudySettings(variants=("raster-pixels",))
    with pytest.raises(ValueError, match="sizes"):
        StudySettings(sizes=(SizeSpec("a", "debug"), SizeSpec("a", "debug")))
    assert main(["study", "--out", str(tmp_path), "--sizes", "s,xxl"]) == 2
    assert "xxl" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path), "--budget", "0"]) == 2
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_budget_picks_steps_from_the_slowest_run(study):
    out, _ = study
    world = build_world(
        out / "cache", WORLD, tokens=("continuous", "discrete"), stages=Stages(lambda _: None)
    )
    short = steps_for_budget(0.02, TINY, world=world, probe_steps=2)
    long = steps_for_budget(2.0, TINY, world=world, probe_steps=2)
    assert 1 <= short < long


def test_defaults_train_every_variant_on_the_demo_world_and_recipe():
    """The README's study: the demo's world (cells, 32 px, 4x4 tokens) and recipe (sin-cos
    positions, batch 64) for all four variants; Fluid also without its readout loss, and
    measured along training; three sizes smallest first."""
    settings = StudySettings()
    assert settings.world == WorldSettings() and settings.world.layout == "cells"
    assert settings.train.batch_size == 64 and settings.steps == 6000
    assert settings.train.num_prompts * settings.train.samples_per_prompt >= 384
    runs = settings.runs()
    assert len(runs) == 15 and [r.size.name for r in runs[::5]] == ["xs", "s", "m"]
    assert {r.label for r in runs} == {*VARIANTS, "random-continuous-noreadout"}
    params = []
    for run in runs:
        config = settings.run_settings(run.size, readout=run.readout).model_config(
            tokens=run.tokens, order=run.order
        )
        assert config.grid == (4, 4) and config.backbone.pos_init == "sincos"
        if run.tokens == "continuous":
            assert config.diffloss.regression_weight == (1.0 if run.readout else 0.0)
        assert run.milestones == ((1500, 3000) if run.label == "random-continuous" else ())
        if run.label == "random-continuous":
            params.append(FluidModel.count_params(config).total)
    assert params == sorted(params) and params[-1] > 4 * params[0]
    assert len(settings.tuning_grid()) == 4


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="no_readout"):
        StudySettings(no_readout=("random-discrete",))
    with pytest.raises(ValueError, match="milestones"):
        StudySettings(milestones=(1.5,))
    with pytest.raises(ValueError, match="milestone_variants"):
        StudySettings(milestone_variants=("random-pixels",))


def test_a_run_is_held_by_one_worker_and_a_dead_workers_run_is_free(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from fluid_train.experiments.workers import claimed

    run = tmp_path / "runs" / "random-continuous-xs"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    with claimed(run) as holder:
        assert holder is None  # held by this process
        with claimed(run) as second:  # another claim (another worker) finds it held
            assert second == me
        # ... and so does another process, atomically (one flock call, no read-then-write)
        probe = (
            "import json, sys; from pathlib import Path; "
            "from fluid_train.experiments.workers import claimed\n"
            "with claimed(Path(sys.argv[1])) as h: print(json.dumps(h))"
        )
        other = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True, check=True)  # fmt: skip
        assert json.loads(other.stdout) == me
    with claimed(run) as holder:  # given back when the block ended
        assert holder is None
    # A worker killed while holding a run: the kernel drops its lock, the run is free.
    hold = "import sys, time; from pathlib import Path; from fluid_train.experiments.workers import claimed\nwith claimed(Path(sys.argv[1])) as h:\n    print(h, flush=True); time.sleep(60)"  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert worker.stdout.readline().strip() == "None"  # it holds the run
        with claimed(run) as holder:
            assert holder == {"pid": worker.pid, "host": socket.gethostname()}
    finally:
        worker.kill()
        worker.wait()
    with claimed(run) as holder:
        assert holder is None
