"""The eager trainer end to end on tiny models: exact resume, NaN guard, bad data, export, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_train.backends import resolve_backend
from fluid_train.checkpoint import load_torch
from fluid_train.cli import train as train_cli
from fluid_train.data import write_shard
from fluid_train.model import FluidModel
from fluid_train.pipeline import FluidPipeline
from fluid_train.recipe import DataConfig, ScheduleConfig, TrainConfig
from fluid_train.trainer import NonFiniteLossError, train


def run_config(out: Path, shards: Path, **overrides) -> TrainConfig:
    values = dict(
        out=str(out),
        data=DataConfig(shards=[str(shards)], shuffle_buffer=4),
        batch_size=2,
        steps=8,
        log_every=1,
        ckpt_every=4,
        schedule=ScheduleConfig(warmup_steps=3),
        ema_decay=0.9,
        progress=False,
        backend="eager",
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_auto_backend_is_eager_without_an_accelerator():
    assert resolve_backend("auto") == "eager"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("tpu")


def test_resume_gives_identical_losses_and_ema(tmp_path, tiny_config, encoded_shards):
    config = tiny_config("continuous", "random")  # Fluid: random masks, t, noise, token samples
    # 12 samples: 8 steps x 2 cross an epoch
    data = encoded_shards(tmp_path / "data", config)
    straight = train(run_config(tmp_path / "a", data), model_config=config)

    first = train(run_config(tmp_path / "b", data, steps=4), model_config=config)
    assert first.step == 4
    with pytest.raises(FileExistsError, match="--resume"):
        train(run_config(tmp_path / "b", data), model_config=config)
    resumed = train(run_config(tmp_path / "b", data, resume=True), model_config=config)

    assert resumed.step == straight.step == 8
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit-identical, every step
    a, b = load_torch(straight.checkpoint), load_torch(resumed.checkpoint)
    for part in ("ema", "model"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    # EMA really averages: it differs from the live weights after 8 steps at decay 0.9
    name = (
        "trunk.blocks.0.attn.qkv.weight"
        if "trunk.blocks.0.attn.qkv.weight" in a["ema"]
        else next(iter(a["ema"]))
    )
    assert not torch.equal(a["ema"][name], a["model"][name])
    assert a["host"]["data"] == b["host"]["data"]
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["images_per_s"] > 0 and record["tokens_per_s"] == pytest.approx(
        record["images_per_s"] * config.num_tokens
    )
    assert record["lr"] == pytest.approx(1e-4) and record["epoch"] == 1


def test_time_limit_ends_the_run_like_its_last_step_and_resumes_exactly(
    tmp_path, tiny_config, monkeypatch, encoded_shards
):
    import fluid_train.trainer as trainer_module

    config = tiny_config("continuous", "random")
    data = encoded_shards(tmp_path / "data", config)
    straight = train(run_config(tmp_path / "a", data), model_config=config)
    clock = iter(range(10_000))  # a clock that ticks one second each time it is read
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    limited = train(run_config(tmp_path / "b", data, time_limit_s=6.0), model_config=config)
    monkeypatch.undo()
    assert limited.time_limited and limited.preempted is None
    assert 0 < limited.step < 8
    assert limited.checkpoint.name == f"step_{limited.step:08d}"  # checkpointed where it stopped
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()  # and exported
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[: limited.step]
    resumed = train(run_config(tmp_path / "b", data, resume=True), model_config=config)
    assert resumed.step == 8 and not resumed.time_limited
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert straight.step == 8
    with pytest.raises(ValueError, match="time_limit_s"):
        run_config(tmp_path / "c", data, time_limit_s=0)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path, tiny_config, monkeypatch, encoded_shards
):
    config = tiny_config("discrete", "random")
    data = encoded_shards(tmp_path / "data", config)
    run = tmp_path / "run"
    train(run_config(run, data, steps=3, ckpt_every=3), model_config=config)
    good = run / "checkpoints" / "step_00000003"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()}

    original = FluidModel.training_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # the 2nd step after resuming = step 5
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FluidModel, "training_loss", poisoned)
    # log_every is large: the only host read before step 6's checkpoint is the pre-save check.
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        train(
            run_config(run, data, steps=9, ckpt_every=3, log_every=100, resume=True),
            model_config=config,
        )
    assert info.value.step == 5 and info.value.last_checkpoint == good
    assert str(good) in str(info.value)
    assert (run / "checkpoints" / "latest").read_text().strip() == good.name
    assert not (run / "checkpoints" / "step_00000006").exists()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()} == files
    assert max(step for step, _ in losses(run)) == 3


# ---------------------------------------------------------------------- image shards


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_shards(root: Path) -> Path:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    for s in range(2):
        samples = [
            {"__key__": f"{s}{i:04d}", "png": png(c), "txt": f"a photo of color {i}"}
            for i, c in enumerate(colors)
        ]
        if s == 0:
            samples[1]["png"] = b"\x89PNG\r\n broken"  # unreadable image
            del samples[3]["txt"]  # no caption
        write_shard(root / f"{s:05d}.tar", samples)
    return root


def test_image_shards_skip_bad_samples_train_and_export(tmp_path, saved_encoders):
    tokenizer, text_encoder, pipe = saved_encoders
    data = image_shards(tmp_path / "images")
    run = tmp_path / "run"
    config = run_config(
        run, data, steps=4, ckpt_every=4, tokenizer=str(tokenizer), text_encoder=str(text_encoder),
        data=DataConfig(shards=[str(data)], shuffle_buffer=0, text_length=24),
    )  # fmt: skip
    result = train(config, model_config=pipe.model.config)  # 4 steps x 2 = all 8 good samples
    assert result.step == 4
    assert result.skipped["unreadable_image"] == 1 and result.skipped["missing_caption"] == 1
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped"]["unreadable_image"] == 1 and record["skipped"]["missing_caption"] == 1
    log = (run / "train.log").read_text()
    assert "00000.tar: 1 unreadable images skipped, 1 samples without a caption skipped" in log

    assert result.pipeline == run / "pipeline"
    exported = FluidPipeline.from_pretrained(run)  # a run directory finds its pipeline
    ema = load_torch(result.checkpoint)["ema"]
    for name, value in exported.model.named_parameters():
        assert torch.equal(value, ema[name])
    images = exported(["a photo of color 2"], num_steps=2, seed=0)
    assert images[0].size == (16, 16)


def test_image_shards_need_the_frozen_parts(tmp_path, tiny_config, saved_encoders):
    tokenizer, text_encoder, _ = saved_encoders
    data = image_shards(tmp_path / "images")
    with pytest.raises(ValueError, match="--tokenizer and --text-encoder"):
        train(run_config(tmp_path / "run", data), model_config=tiny_config())
    with pytest.raises(ValueError, match="gives continuous tokens .* expects discrete"):
        train(
            run_config(tmp_path / "run", data, tokenizer=str(tokenizer)),
            model_config=tiny_config("discrete", "raster"),
        )
    with pytest.raises(ValueError, match="has width 64; the model's aligner expects 16"):
        train(
            run_config(tmp_path / "run", data, text_encoder=str(text_encoder)),
            model_config=tiny_config(),
        )


def test_preprocess_then_train_from_the_command_line(tmp_path, saved_encoders, capsys):
    tokenizer, text_encoder, pipe = saved_encoders
    data = image_shards(tmp_path / "images")
    parser = argparse.ArgumentParser(prog="fluid")
    train_cli.register(parser.add_subparsers(dest="command", required=True))

    def fluid(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    encoded = tmp_path / "encoded"
    common = [
        "--data",
        str(data),
        "--tokenizer",
        str(tokenizer),
        "--text-encoder",
        str(text_encoder),
    ]
    assert (
        fluid("preprocess", *common, "--out", str(encoded), "--pad-to", "24", "--batch-size", "3")
        == 0
    )
    manifest = json.loads((encoded / "preprocess.json").read_text())
    assert manifest["samples"] == 8 and manifest["skipped"]["unreadable_image"] == 1
    assert manifest["tokens"]["posterior_std"] and manifest["text"]["length"] == 24

    # The stored sample equals the frozen parts run directly on that image and caption.
    sample = next(
        iter(__import__("webdataset").WebDataset(str(encoded / "00001.tar"), shardshuffle=False))
    )
    assert sample["__key__"] == "10000" and sample["txt"] == b"a photo of color 0"
    image = (
        torch.tensor([200, 30, 30], dtype=torch.float32)
        .div(127.5)
        .sub(1)
        .view(1, 3, 1, 1)
        .expand(1, 3, 16, 16)
    )
    with torch.no_grad():
        moments = pipe.tokenizer.encode_moments(image)
        states = pipe.text_encoder.encode(["a photo of color 0"], pad_to=24)
    load = lambda key: np.load(io.BytesIO(sample[key]))  # noqa: E731
    np.testing.assert_allclose(load("tokens.npy"), moments.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(load("tokens_std.npy"), moments.std[0].numpy(), atol=1e-5)
    real = int(states.mask[0].sum())  # stored trimmed to the caption's real tokens
    assert load("text.npy").shape == (real, states.hidden.shape[-1]) and real < 24
    np.testing.assert_allclose(load("text.npy"), states.hidden[0, :real].numpy(), atol=2e-3)
    assert load("text_mask.npy").tolist() == states.mask[0].tolist()
    assert manifest["text"]["storage"] == "trimmed"
    assert manifest["bytes"]["text_per_sample"] < manifest["bytes"]["text_per_sample_padded"]

    assert fluid("preprocess", *common, "--out", str(encoded)) == 0  # finished shards are reused
    assert "(2 already done)" in capsys.readouterr().out

    # The model: the debug preset turned into the tiny config by dotted overrides in a file.
    (tmp_path / "run.json").write_text(
        json.dumps({"batch_size": 2, "log_every": 1, "schedule": {"warmup_steps": 2},
                    "model": _model_overrides(pipe.model.config)})
    )  # fmt: skip
    run = tmp_path / "run"
    argv = ["train", "--data", str(encoded), "--out", str(run), "--steps", "2", "--config",
            str(tmp_path / "run.json"), "--preset", "debug", "--no-progress", "--device", "cpu",
            "--backend", "eager", "--tokenizer", str(tokenizer), "--text-encoder", str(text_encoder)]  # fmt: skip
    assert fluid(*argv) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and (run / "metrics.jsonl").is_file()
    assert (run / "pipeline" / "fluid_pipeline.json").is_file()  # T5 loaded only for the export
    assert [step for step, _ in losses(run)] == [1, 2]
    assert fluid(*argv) == 2  # the run exists and --resume was not given
    assert "--resume" in capsys.readouterr().err


def _model_overrides(config) -> dict:
    """Dotted overrides turning the debug preset into ``config`` (as a --config file holds them)."""
    values = dataclasses.asdict(config)
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
