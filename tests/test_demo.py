"""``fluid demo`` end to end at a seconds scale: every stage runs, the report is complete, and a
second run reuses the cached data, tokenizer, text encoder and encoded shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from PIL import Image

import fluid_train.experiments.machine as machine
from fluid_eval import ShapesDetector
from fluid_eval.shapes import LayoutConfig
from fluid_tokenizers import SDVAETokenizer
from fluid_train.cli import main
from fluid_train.config import GenerationConfig
from fluid_train.experiments import (
    DemoSettings,
    Stages,
    WorldSettings,
    build_world,
    demo_settings,
    run_demo,
)

TASKS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
CACHED_STAGES = ("data", "tokenizer", "text", "encode", "prompts")

TINY = DemoSettings(
    world=WorldSettings(
        num_images=96, num_val=16, shard_size=48, vae_images=32, vae_steps=3, vae_batch_size=8
    ),
    preset="debug",
    steps=6,
    batch_size=8,
    warmup_steps=2,
    num_prompts=6,
    samples_per_prompt=2,
    generation=GenerationConfig(num_steps=4, cfg=4.0, temperature=1.2),
    gen_batch_size=12,
)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    first = run_demo(out, settings=TINY, seed=1, log=lines.append, progress=False)
    first_report = json.loads((out / "report.json").read_text())
    second = run_demo(out, settings=TINY, seed=1, log=lines.append, progress=False)
    return out, first, first_report, second, lines


@pytest.mark.slow
def test_report_structure_and_every_stage(demo_runs):
    out, first, report, _, lines = demo_runs
    assert TASKS == set(report["geneval"]) == set(report["chance"])
    assert 0.0 <= report["geneval_overall"] <= 1.0
    assert report["geneval_overall"] == pytest.approx(sum(report["geneval"].values()) / 6)
    assert report["fid"] > 0.0
    # The detector reads its own ground truth back: the ceiling of the scores.
    assert report["ground_truth_geneval"] > 0.9
    stages = {"data", "tokenizer", "text", "encode", "train", "generate", "evaluate"}
    assert stages <= set(report["stage_seconds"])
    assert report["elapsed_s"] >= sum(report["stage_seconds"][s] for s in stages)
    assert report["settings"]["steps"] == 6 and report["settings"]["preset"] == "debug"
    # No budget in TINY: every step trains and nothing limits the time.
    assert report["trained_steps"] == 6 and not report["time_limited"]
    assert report["train_time_limit_s"] is None
    assert report["settings"]["world"]["num_images"] == 96
    # The world's layout reaches the evaluation: every ground-truth object in one token cell.
    assert report["settings"]["world"]["layout"] == "cells"
    detector, truth = (
        ShapesDetector(),
        list((out / "cache").glob("prompts-*/truth/*/samples/*.png")),
    )
    assert len(truth) == 12
    for path in truth:
        with Image.open(path) as image:
            for found in detector.detect(image):
                x0, y0, x1, y1 = found.box
                assert x0 // 8 == x1 // 8 and y0 // 8 == y1 // 8, (path, found.box)
    train_config = json.loads((out / "run" / "train_config.json").read_text())
    assert train_config["train"]["data"]["memory_mb"] == 1024  # the encoded world is read once
    # The model is laid out on the world's token grid: one token per 8x8 pixels.
    size = TINY.world.image_size
    model_config = json.loads((out / "run" / "pipeline" / "model" / "config.json").read_text())
    grid = [size // 8, size // 8]
    assert model_config["backbone"]["grid"] == grid and model_config["image_size"] == size
    assert report["settings"]["model"]["backbone.grid"] == [size // 8, size // 8]
    with Image.open(next((out / "generated").glob("*/samples/*.png"))) as image:
        assert image.size == (size, size)
    # The demo's model trains with the auxiliary readout loss and exports it.
    assert report["settings"]["model"]["diffloss.regression_weight"] == 1.0
    pipeline = json.loads((out / "run" / "pipeline" / "model" / "config.json").read_text())
    assert pipeline["diffloss"]["regression_weight"] == 1.0
    # The training ran through the real trainer: one metrics line per logged step, to the end.
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and report["final_loss"] == metrics[-1]["loss"]
    assert (out / "run" / "pipeline" / "fluid_pipeline.json").is_file()
    # 6 prompts x 2 samples in GenEval's layout, a grid and a loss curve.
    generated = sorted((out / "generated").glob("*/samples/*.png"))
    assert len(generated) == 12
    with Image.open(out / "grid.png") as grid, Image.open(out / "loss.png") as loss:
        assert grid.size[0] > 128 and loss.size[0] > 100
    assert any(line.startswith("GenEval overall") or "GenEval overall" in line for line in lines)
    assert all(first.cached[s] is False for s in CACHED_STAGES)


@pytest.mark.slow
def test_second_run_reuses_the_cache(demo_runs):
    out, first, report, second, lines = demo_runs
    assert all(second.cached[s] is True for s in CACHED_STAGES)
    assert sum(1 for line in lines if "cached:" in line) == len(CACHED_STAGES)
    # Same seed, same cached inputs, same trainer: the same model and the same scores.
    assert second.final_loss == pytest.approx(first.final_loss, rel=1e-5)
    assert second.geneval == report["geneval"]
    assert len(list((out / "cache").iterdir())) == len(CACHED_STAGES)


def test_two_builders_of_one_cache_entry_keep_the_first_to_finish(tmp_path):
    from fluid_train.experiments import StageCache, Stages

    cache = StageCache(tmp_path, Stages(lambda _: None))
    other = (
        "import sys; from pathlib import Path\n"
        "from fluid_train.experiments import StageCache, Stages\n"
        "cache = StageCache(Path(sys.argv[1]), Stages(lambda _: None))\n"
        "with cache.entry('data', {'n': 1}, stage='data') as e:\n"
        "    (e.build / 'who').write_text('other')\n"
    )
    with cache.entry("data", {"n": 1}, stage="data") as entry:
        (entry.build / "who").write_text("this")
        # Another worker builds the same entry meanwhile, in a folder of its own, and finishes.
        subprocess.run([sys.executable, "-c", other, str(tmp_path)], check=True)
    assert (entry.path / "who").read_text() == "other" and (entry.path / "done.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.path.name]  # no build left
    with pytest.raises(RuntimeError), cache.entry("data", {"n": 2}, stage="data") as failed:
        raise RuntimeError("the build failed")
    assert not failed.path.exists() and not failed.build.exists()  # nothing half-written


def test_cache_key_follows_the_settings(tmp_path):
    world = WorldSettings(num_images=8, num_val=4, shard_size=8)
    log: list[str] = []
    with pytest.raises(ValueError, match="tokens"):
        build_world(tmp_path, world, tokens=("pixels",), stages=Stages(log.append))
    assert not list(tmp_path.iterdir())  # refused before any work
    first = build_world(tmp_path, world, tokens=(), stages=Stages(log.append))
    assert len(first.train_shards) == 1 and len(first.val_shards) == 1
    assert (first.text_encoder / "spiece.model").is_file()
    # A different number of scenes is a different data entry, and so a different text entry.
    other = build_world(
        tmp_path, replace(world, num_images=9), tokens=(), stages=Stages(log.append)
    )
    assert other.keys["data"] != first.keys["data"] and other.keys["text"] != first.keys["text"]
    # The same settings again: every entry comes from the cache.
    stages = Stages(log.append)
    again = build_world(tmp_path, world, tokens=(), stages=stages)
    assert again.keys == first.keys and stages.cached == {"data": True, "text": True}
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["data"] * 2 + ["text"] * 2


def _scenes(shard):
    from fluid_eval.shapes import Scene
    from fluid_train.data import iter_raw_samples

    return [Scene.from_dict(json.loads(raw["json"])["scene"]) for raw in iter_raw_samples(shard)]


def _one_object_per_cell(scene, cells: int) -> bool:
    seen = set()
    for o in scene.objects:
        x0, y0, x1, y1 = (int(v * cells * (1 - 1e-9)) for v in o.box)
        if x0 != x1 or y0 != y1 or (x0, y0) in seen:
            return False
        seen.add((x0, y0))
    return True


def test_the_worlds_layout_reaches_its_scenes(tmp_path):
    # "cells" (the demo's default): every object of every training and held-out scene inside
    # its own token cell; "free" is a different cache entry whose objects straddle cells.
    cells = WorldSettings(num_images=40, num_val=8, shard_size=40)
    assert cells.layout == "cells" and cells.layout_config().cells == 4
    world = build_world(tmp_path, cells, tokens=(), stages=Stages(lambda _: None))
    scenes = _scenes(world.train_shards[0]) + _scenes(world.val_shards[0])
    assert len(scenes) == 48 and all(_one_object_per_cell(s, 4) for s in scenes)
    free = build_world(
        tmp_path, replace(cells, layout="free"), tokens=(), stages=Stages(lambda _: None)
    )
    assert free.keys["data"] != world.keys["data"]
    assert not all(_one_object_per_cell(s, 4) for s in _scenes(free.train_shards[0]))
    with pytest.raises(ValueError, match="layout must be 'cells' or 'free'; got 'grid'"):
        WorldSettings(layout="grid")


def test_the_data_key_follows_the_layouts_geometry(monkeypatch):
    # Same layout name, other object sizes: a different data entry, not a stale one.
    before = WorldSettings().data_key()
    assert before["layout"]["cells"] == 4
    monkeypatch.setattr(
        WorldSettings, "layout_config", lambda self: LayoutConfig.in_cells(4, min_size=0.15)
    )
    assert WorldSettings().data_key() != before


def test_the_model_follows_the_worlds_token_layout():
    # The settings' model follows the world (presets.token_layout); a variant's tokens/order
    # go on top.
    settings = DemoSettings(world=WorldSettings(image_size=48))
    config = settings.model_config(tokens="discrete")
    assert config.grid == (6, 6) and config.num_tokens == 36 and config.tokens == "discrete"
    assert config.backbone.pos_init == "sincos" and config.image_size == 48
    # `model` overrides beat the layout: a non-square grid of the same 36 tokens stays as set.
    wide = {"backbone.grid": (3, 12)}
    own = DemoSettings(world=WorldSettings(image_size=48), model=wide)
    assert own.model_config().grid == (3, 12) and own.model_config().num_tokens == 36


def test_tokenizer_key_follows_the_kl_weight(tmp_path):
    world = WorldSettings(
        num_images=8, num_val=4, shard_size=8, image_size=32, vae_images=8, vae_steps=2,
        vae_batch_size=4,
    )  # fmt: skip
    log: list[str] = []
    first = build_world(tmp_path, world, tokens=("continuous",), stages=Stages(log.append))
    stages = Stages(log.append)
    other = build_world(
        tmp_path, replace(world, vae_kl_weight=1e-2), tokens=("continuous",), stages=stages
    )
    assert other.keys["data"] == first.keys["data"] and stages.cached["data"] is True
    assert other.tokenizers["continuous"] != first.tokenizers["continuous"]
    assert stages.cached["tokenizer"] is False
    # ... and the weight reaches the training: same data and seed, different weights.
    a, b = (
        SDVAETokenizer.from_pretrained(w.tokenizers["continuous"]).state_dict()
        for w in (first, other)
    )
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(machine, "_busy_cores", lambda: 1.2)
    assert machine.auto_threads() == 3
    monkeypatch.setattr(machine, "_busy_cores", lambda: 7.0)  # oversubscribed: still one thread
    assert machine.auto_threads() == 1
    # Without /proc/stat the one-minute load average decides.
    monkeypatch.setattr(machine, "_busy_cores", lambda: None)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (2.4, 0.0, 0.0), raising=False)
    assert machine.auto_threads() == 2


def test_busy_cores_reads_the_machine():
    busy = machine._busy_cores(window_s=0.05)
    if busy is None:  # no /proc/stat here: the fallback above is what runs
        assert not os.path.exists("/proc/stat")
        return
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
    # A process spinning on one core shows up as (most of) a busy core.
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        busy = machine._busy_cores(window_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6


def test_budgets():
    assert (
        demo_settings("small").steps < demo_settings("default").steps < demo_settings("large").steps
    )
    # Minutes: the nearest named budget below, with training scaled to the extra time.
    assert demo_settings(15).steps == demo_settings("default").steps
    assert demo_settings(20).steps > demo_settings("default").steps
    assert demo_settings(20).world == demo_settings("default").world
    assert demo_settings("default").minutes == 15 and demo_settings(20).minutes == 20
    for bad in ("huge", "-3", 0.1):
        with pytest.raises(ValueError, match="budget"):
            demo_settings(bad)


def test_a_budget_sizes_training_to_the_time_it_leaves(demo_runs, tmp_path):
    """A slow machine trains fewer steps instead of running past its minutes: the stages before
    training (cached here) take their time, training gets what the budget leaves."""
    out = demo_runs[0]
    lines: list[str] = []
    settings = replace(TINY, steps=100_000, minutes=0.01, after_train_s=0.0)
    report = run_demo(
        tmp_path, settings=settings, seed=1, cache=out / "cache", log=lines.append, progress=False
    )
    assert report.time_limited and 0 < report.trained_steps < 100_000
    assert report.train_time_limit_s == 1.0  # the floor: the budget was spent before training
    assert any("budget is spent before training" in line for line in lines)
    assert any(f"allowed {report.trained_steps} of 100000 steps" in line for line in lines)
    assert (tmp_path / "grid.png").is_file() and report.geneval_overall >= 0.0


def test_cli_rejects_a_bad_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--budget", "forever"]) == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
