"""The recipe: paper defaults, config files and flags, parameter groups, schedule, EMA."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fluid_train.cli import train as train_cli
from fluid_train.ema import EMA
from fluid_train.model import FluidModel
from fluid_train.presets import get_preset
from fluid_train.recipe import (
    DataConfig,
    ScheduleConfig,
    TrainConfig,
    build_optimizer,
    clean_name,
    learning_rate,
    param_groups,
)


def test_defaults_are_the_paper_recipe():
    config = TrainConfig(out="run")
    assert config.optim.lr == 1e-4 and config.optim.betas == (0.9, 0.95)
    assert config.optim.weight_decay == 0.02 and config.optim.grad_clip == 3.0
    assert config.schedule.warmup_steps == 65_000 and config.schedule.decay == "constant"
    assert config.ema_decay == 0.9999
    assert config.batch_size == 2048 and config.steps == 1_000_000
    assert config.precision == "auto"


def test_config_files_nest_coerce_and_reject_unknown_keys(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'out = "r"\nsteps = 10\n[optim]\nlr = 3\nbetas = [0.8, 0.9]\n[data]\nshards = "a.tar"\n'
    )
    config = TrainConfig.from_file(toml, optim={"weight_decay": 0.1})
    assert config.optim.lr == 3.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.9) and config.optim.weight_decay == 0.1
    assert config.data.shards == ["a.tar"] and config.steps == 10
    round_trip = tmp_path / "run.json"
    round_trip.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_file(round_trip) == config
    with pytest.raises(ValueError, match="optim.lrr"):
        TrainConfig.from_dict({"out": "r", "optim": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(out="r", batch_size=0)
    with pytest.raises(ValueError, match="data.memory_mb must be >= 0"):
        DataConfig(memory_mb=-1)
    (tmp_path / "x.yaml").write_text("out: r\n")
    with pytest.raises(ValueError, match="must end in .json or .toml"):
        TrainConfig.from_file(tmp_path / "x.yaml")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        TrainConfig.from_file(tmp_path / "nope.toml")


def test_cli_flags_override_the_config_file(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(
        json.dumps({"out": "r", "steps": 5, "optim": {"lr": 2e-4}, "data": {"shards": ["x"]}})
    )
    parser = argparse.ArgumentParser(prog="fluid")
    train_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["train", "--config", str(file), "--steps", "7", "--grad-clip", "0", "--tokens", "discrete",
         "--model", "backbone.depth=3", "--warmup", "10", "--memory-mb", "256"]
    )  # fmt: skip
    config = train_cli.build_train_config(args)
    assert config.steps == 7 and config.optim.lr == 2e-4  # flag wins; file kept
    assert config.data.memory_mb == 256 and config.data.shards == ["x"]
    assert config.optim.grad_clip is None and config.schedule.warmup_steps == 10
    assert (config.model.tokens, config.model.backbone.depth) == ("discrete", 3)
    assert config.model.replace(tokens="continuous", **{"backbone.depth": 2}) == get_preset(
        config.preset
    )  # every other field is the preset's
    with pytest.raises(ValueError, match="--out"):
        train_cli.build_train_config(parser.parse_args(["train", "--data", "x"]))
    assert args.func is train_cli.run_train


def test_param_groups_follow_mar(tiny_config):
    model = FluidModel(tiny_config("continuous", "random"))
    groups = param_groups(model, 0.02)
    decay, no_decay = (set(g["names"]) for g in groups)
    names = {n for n, p in model.named_parameters()}
    assert decay | no_decay == names and not decay & no_decay  # every parameter, once
    assert groups[0]["weight_decay"] == 0.02 and groups[1]["weight_decay"] == 0.0
    diffusion_mlp = {n for n in names if n.startswith("head.net.")}
    assert diffusion_mlp and diffusion_mlp <= no_decay  # the whole DiffLoss MLP, as MAR
    assert "head.token_embed.weight" in decay  # the token input embedding is an ordinary layer
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay)
    assert {n for n in names if params[n].ndim < 2} <= no_decay  # biases, norms, 1-D
    assert any(n.startswith("trunk.") for n in decay) and any(
        n.startswith("text_aligner.") for n in decay
    )
    assert (
        clean_name("trunk.blocks.0._orig_module.attn.qkv.weight")
        == "trunk.blocks.0.attn.qkv.weight"
    )


def test_learning_rate_warmup_and_decay():
    schedule = ScheduleConfig(warmup_steps=4)

    def lr(step, schedule=schedule, total=100):
        return float(
            learning_rate(torch.tensor(step), lr=1e-3, schedule=schedule, total_steps=total)
        )

    assert [round(lr(s), 8) for s in range(6)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert lr(10**6) == pytest.approx(1e-3)  # constant forever (the paper)
    cosine = ScheduleConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.1)
    assert lr(0, cosine) == pytest.approx(1e-3, rel=1e-3)
    assert lr(49, cosine) == pytest.approx(
        1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-4
    )
    assert lr(99, cosine) == pytest.approx(1e-4)
    linear = ScheduleConfig(warmup_steps=0, decay="linear")
    assert lr(49, linear) == pytest.approx(5e-4)


def test_optimizer_reads_the_shared_lr_tensor(tiny_config):
    model = FluidModel(tiny_config("discrete", "raster"))
    lr = torch.tensor(0.0)
    optimizer = build_optimizer(model, TrainConfig(out="r").optim, lr=lr, capturable=False)
    assert all(g["lr"] is lr for g in optimizer.param_groups)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # lr 0: nothing moves (decay is scaled by lr too)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    lr.fill_(1e-2)
    optimizer.step()
    moved = [(p - a).abs().max().item() for a, p in zip(before, model.parameters(), strict=True)]
    assert min(moved) > 5e-3  # Adam's first step moves every parameter by about lr


def test_ema_tracks_and_exports_averages(tiny_config):
    model = FluidModel(tiny_config("discrete", "raster"))
    ema = EMA(model, 0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, average in ema.items():
        assert torch.allclose(average, start[name] + 0.5)
    state = ema.averaged_state_dict(model)
    assert set(state) == set(model.state_dict())  # tied names and buffers included
    fresh = FluidModel(model.config)
    fresh.load_state_dict(state)
    assert all(torch.allclose(p, start[n] + 0.5) for n, p in fresh.named_parameters())
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({})
