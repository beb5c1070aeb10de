"""Presets (Table 2 sizes), FLOP counts and ``fluid info``."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fluid_train import FluidModel, get_preset, list_presets, model_summary
from fluid_train.cli import info
from fluid_train.flops import sample_flops, train_flops, training_compute
from fluid_train.presets import PAPER_SIZES, token_layout


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_presets_match_table_2_within_4_percent(name, variant):
    tokens, order = variant
    config = get_preset(name, tokens=tokens, order=order)
    size = PAPER_SIZES[name]
    assert (config.backbone.depth, config.width, config.backbone.num_heads) == (
        size.depth,
        size.width,
        size.num_heads,
    )
    assert (config.aligner.depth, config.diffloss.depth, config.backbone.mlp_ratio) == (6, 3, 4.0)
    assert (config.num_tokens, config.token_dim, config.vocab_size, config.text_dim) == (
        256,
        16,
        8192,
        4096,
    )
    counts = FluidModel.count_params(config)  # aligner and trunk on the meta device
    assert abs(counts.total / size.params - 1) < 0.04, (name, variant, counts)


def test_get_preset_overrides_and_errors():
    config = get_preset("fluid-166m", tokens="discrete", order="raster")
    assert config.variant == "raster-discrete" and config.width == 768
    deeper = get_preset("shapes-s", **{"backbone.depth": 6})
    assert deeper.backbone.depth == 6 and get_preset("shapes-s").backbone.depth != 6
    with pytest.raises(ValueError, match="unknown preset 'fluid-1m'"):
        get_preset("fluid-1m")
    assert list_presets()[:6] == list(PAPER_SIZES)
    assert {"debug", "shapes-s", "shapes-m", "shapes-l"} <= set(list_presets())


def test_shapes_presets_fit_the_shapes_world():
    from fluid_text import shapes_t5_config

    for name in ("debug", "shapes-s", "shapes-m", "shapes-l"):
        config = get_preset(name)
        assert (config.grid, config.token_dim, config.vocab_size, config.image_size) == (
            (8, 8),
            16,
            512,
            64,
        )
        assert config.text_dim == shapes_t5_config().d_model
    sizes = [
        FluidModel.count_params(get_preset(n)).total
        for n in ("debug", "shapes-s", "shapes-m", "shapes-l")
    ]
    assert sizes == sorted(sizes)


def _measured_forward_flops(model, batch) -> int:
    # The math SDPA backend runs attention as matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.training_loss(batch)
    return counter.get_total_flops()


def test_train_flops_match_a_flop_counter(variant, tiny_config, tiny_train_batch):
    tokens, order = variant
    config = tiny_config(tokens, order)
    batch = tiny_train_batch(config, 2)
    batch.text_mask[:] = True  # full-length text: the length the analytic count assumes
    measured = _measured_forward_flops(FluidModel(config), batch) / 2
    assert train_flops(config).total * 1e9 == pytest.approx(3 * measured, rel=1e-9)
    assert training_compute(config, batch_size=8, steps=10) == pytest.approx(3 * measured * 80)


def test_sample_flops_match_a_flop_counter(variant, tiny_model, tiny_text):
    tokens, order = variant
    model = tiny_model(tokens, order)
    hidden, mask = tiny_text(2)
    mask[:] = True
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.generate(hidden, mask, cfg=3.0)
    expected = sample_flops(model.config, cfg=True, batch_size=2).total * 1e9
    assert expected == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_confidence_ordering_flops_count_every_masked_row(tiny_model, tiny_text):
    model = tiny_model("discrete", "random")
    hidden, mask = tiny_text(1)
    mask[:] = True
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.generate(hidden, mask, cfg=3.0, order_policy="confidence")
    expected = sample_flops(model.config, cfg=True, order_policy="confidence").total * 1e9
    assert expected == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_fluid_166m_summary_is_consistent():
    summary = model_summary(get_preset("fluid-166m"), preset="fluid-166m")
    assert summary["trainable_params"] == sum(summary["components"].values())
    assert abs(summary["table2_rel_diff"]) < 0.04
    assert 4.6e9 < summary["frozen_params"] < 4.8e9  # the T5-XXL encoder
    # Sampling runs the trunk 64 times with CFG: far more than one training step per image.
    assert summary["sample_gflops_per_image"] > summary["train_gflops_per_image"]


def _run_info(argv, capsys):
    parser = argparse.ArgumentParser(prog="fluid")
    info.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["info", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_fluid_info_json_and_table(capsys):
    data = json.loads(
        _run_info(["fluid-166m", "--json", "--tokens", "discrete", "--order", "raster"], capsys)
    )
    expected = model_summary(
        get_preset("fluid-166m", tokens="discrete", order="raster"), preset="fluid-166m"
    )
    assert data == json.loads(json.dumps(expected))
    for key in (
        "trainable_params",
        "frozen_params",
        "train_gflops_per_image",
        "sample_gflops_per_image",
    ):
        assert key in data
    table = _run_info(["debug"], capsys)
    assert (
        "trainable_params" in table
        and "text_aligner" in table
        and "sample_gflops_per_image" in table
    )
    listing = _run_info([], capsys)
    assert all(name in listing for name in list_presets())


def test_train_flops_scale_with_model_size():
    small, large = (train_flops(get_preset(n)).total for n in ("fluid-166m", "fluid-10.5b"))
    # Roughly 6 * params * tokens: the 10.5B model costs ~60x the 166M one per image.
    assert 40 < large / small < 80
    assert torch.tensor(small).isfinite()


def test_token_layout():
    assert token_layout(64) == {"image_size": 64, "backbone.grid": (8, 8)}
    assert token_layout(32)["backbone.grid"] == (4, 4)
    for bad in (0, 20, 33.0):
        with pytest.raises(ValueError, match="image_size"):
            token_layout(bad)
    # The shapes presets are the 64 px layout.
    config = get_preset("shapes-s")
    assert (config.image_size, config.grid, config.num_tokens) == (64, (8, 8), 64)


@pytest.mark.parametrize("image_size", [32, 64])
def test_token_layout_is_the_shapes_tokenizers_grid(image_size):
    """One token per 8x8 pixels is a fact about the shapes tokenizers: checked against them."""
    import fluid_tokenizers as ft

    grid = token_layout(image_size)["backbone.grid"]
    vae = ft.SDVAETokenizer.from_config(ft.shapes_vae_config(), image_size=image_size)
    vq = ft.VQTokenizer.from_config(ft.shapes_vq_config(), image_size=image_size)
    assert tuple(vae.grid) == grid and tuple(vq.spec.grid) == grid
