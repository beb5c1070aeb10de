"""``fluid study`` at a seconds scale: 2 variants x 2 sizes, the table, fits and figures, and a
resumed study that keeps finished runs."""

from __future__ import annotations

import json
import math

import pytest

from fluid_train.cli import main
from fluid_train.config import GenerationConfig
from fluid_train.experiments import (
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
    by_run = {(r["variant"], r["size"]): r for r in results}
    # Larger trunk, more parameters; discrete and continuous losses are different objectives.
    assert (
        by_run[("random-continuous", "s")]["params"] > by_run[("random-continuous", "xs")]["params"]
    )
    assert set(payload["fits"]) == set(TINY.variants)
    for variant, fit in payload["fits"].items():
        pts = [r for r in results if r["variant"] == variant]
        (small, large) = sorted(pts, key=lambda r: r["params"])
        # Two points: the fit passes through both (slope = log-loss ratio / log-size ratio).
        slope = math.log(large["val_loss"] / small["val_loss"]) / math.log(
            large["params"] / small["params"]
        )
        assert fit["exponent"] == pytest.approx(slope, rel=1e-6, abs=1e-9)
    for figure in ("fig5", "fig6", "fig8", "fig9"):
        assert (out / next(p for p in payload["plots"].values() if figure in p)).is_file()
    table = (out / "results.md").read_text()
    assert table == format_table(results, payload["fits"])
    assert table.count("| raster-discrete |") == 3  # two runs + one fit row
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 4 and len(saved["results"]) == 4


@pytest.mark.slow
def test_resume_keeps_finished_runs(study):
    out, payload = study
    # One run lost its result (as if interrupted): only that one is trained again.
    (out / "runs" / "random-continuous-s" / "result.json").unlink()
    log: list[str] = []
    again = run_study(out, settings=TINY, log=log.append)
    kept = [line for line in log if "finished earlier, kept" in line]
    trained = [line for line in log if line.endswith(": training")]
    assert len(kept) == 3 and trained == ["[study] random-continuous s: training"]
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


def test_defaults_are_the_readme_tables_settings():
    """The study's world and recipe are pinned: the demo's settings can move without changing
    what `fluid study` measures (64 px free layout, 8x8 tokens, 300-step VAE, batch 32, paper
    objective, CFG 3 at temperature 1)."""
    settings = StudySettings()
    assert settings.world.image_size == 64 and settings.world.vae_steps == 300
    assert settings.world.num_images == 8000 and settings.train.batch_size == 32
    assert settings.world.layout == "free"  # objects placed freely, not one per token cell
    assert (settings.train.generation.cfg, settings.train.generation.temperature) == (3.0, 1.0)
    for size in settings.sizes:
        config = settings.run_settings(size).model_config(tokens="continuous", order="random")
        assert config.grid == (8, 8) and config.image_size == 64
        assert config.backbone.pos_init == "normal"
        assert config.diffloss.regression_weight == 0.0
    m = settings.run_settings(SizeSpec("m", "shapes-m")).model_config()
    assert (m.backbone.width, m.backbone.depth) == (128, 4)
