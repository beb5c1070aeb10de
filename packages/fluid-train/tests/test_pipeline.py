"""FluidPipeline: prompts -> PIL images, save/load, EMA export and ``fluid generate``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_train import FluidModel, FluidPipeline, find_pipeline
from fluid_train.cli import generate as generate_cli

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_pipeline_returns_pil_images(variant, tiny_pipeline):
    tokens, order = variant
    pipe = tiny_pipeline(tokens, order)
    images = pipe(PROMPTS, seed=0, num_steps=4, cfg=2.0)
    assert len(images) == 3
    assert all(
        isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in images
    )
    tensors = pipe.generate_tensors(PROMPTS[:2], seed=0, batch_size=1)
    assert tensors.shape == (2, 3, 16, 16) and tensors.min() >= -1 and tensors.max() <= 1


def test_same_seed_same_images(tiny_pipeline):
    pipe = tiny_pipeline("continuous", "random")
    a = _pixels(pipe(PROMPTS, seed=5, batch_size=2))
    b = _pixels(pipe(PROMPTS, seed=5, batch_size=2))
    c = _pixels(pipe(PROMPTS, seed=6, batch_size=2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("tokens", "order"), [("continuous", "random"), ("discrete", "raster")])
def test_save_load_generate_gives_identical_images(tmp_path, tokens, order, tiny_pipeline):
    pipe = tiny_pipeline(tokens, order)
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    manifest = json.loads((tmp_path / "run" / "pipeline" / "fluid_pipeline.json").read_text())
    assert manifest["variant"] == f"{order}-{tokens}"
    assert {manifest[p]["subfolder"] for p in ("tokenizer", "text_encoder", "model")} == {
        "tokenizer",
        "text_encoder",
        "model",
    }
    for part in ("tokenizer", "text_encoder", "model"):
        assert (tmp_path / "run" / "pipeline" / part / "config.json").is_file()
    # A run directory resolves to its exported pipeline.
    assert find_pipeline(tmp_path / "run") == tmp_path / "run" / "pipeline"
    loaded = FluidPipeline.from_pretrained(tmp_path / "run")
    assert np.array_equal(_pixels(pipe(PROMPTS, seed=3)), _pixels(loaded(PROMPTS, seed=3)))


def test_save_exports_the_ema_weights(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("continuous", "random")
    ema = {name: p.detach() + 0.01 for name, p in pipe.model.named_parameters()}
    pipe.save_pretrained(tmp_path, weights=ema)
    loaded = FluidModel.from_pretrained(tmp_path, subfolder="model")
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema[name]), name
    # The live model is untouched by the export.
    assert not torch.equal(next(pipe.model.parameters()), next(loaded.parameters()))


def test_mismatched_parts_are_rejected(tiny_pipeline):
    continuous = tiny_pipeline("continuous", "random")
    discrete = tiny_pipeline("discrete", "random")
    with pytest.raises(ValueError, match="tokenizer gives discrete tokens"):
        FluidPipeline(
            tokenizer=discrete.tokenizer,
            text_encoder=continuous.text_encoder,
            model=continuous.model,
        )
    with pytest.raises(FileNotFoundError, match="not a Fluid pipeline"):
        FluidPipeline.from_pretrained("/nonexistent/run")


def test_pipeline_is_a_fluid_eval_generator(tiny_pipeline):
    from fluid_eval import Generator

    pipe = tiny_pipeline("discrete", "random")
    assert isinstance(pipe, Generator) and isinstance(pipe.sampler(seed=0), Generator)
    sampler_a, sampler_b = pipe.sampler(seed=1, num_steps=2), pipe.sampler(seed=1, num_steps=2)
    first = [_pixels(sampler_a.generate(PROMPTS[:2])) for _ in range(2)]
    second = [_pixels(sampler_b.generate(PROMPTS[:2])) for _ in range(2)]
    assert all(
        np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )  # one seed, a reproducible sequence
    assert len(pipe.generate(PROMPTS)) == 3


def _run_generate(argv):
    parser = argparse.ArgumentParser(prog="fluid")
    generate_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", *argv])
    return args.func(args)


def test_fluid_generate_prompts_and_geneval_layout(tmp_path, tiny_pipeline):
    from fluid_eval import write_prompts

    tiny_pipeline("continuous", "random").save_pretrained(tmp_path / "run" / "pipeline")
    common = ["--model", str(tmp_path / "run"), "--steps", "2", "--cfg", "2", "--no-progress"]
    out = tmp_path / "prompts"
    argv = [
        *common,
        "--prompt",
        *PROMPTS[:2],
        "--out",
        str(out),
        "--images-per-prompt",
        "2",
        "--batch-size",
        "3",
    ]
    assert _run_generate(argv) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [
        "00000_00.png",
        "00000_01.png",
        "00001_00.png",
        "00001_01.png",
    ]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in index] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * 16 and grid.height > 2 * 16  # two columns, two rows, captions

    metadata = tmp_path / "evaluation_metadata.jsonl"
    entries = write_prompts(metadata, num=3)
    geneval = tmp_path / "geneval"
    assert (
        _run_generate(
            [*common, "--metadata", str(metadata), "--out", str(geneval), "--batch-size", "5"]
        )
        == 0
    )
    for n, entry in enumerate(entries):
        folder = geneval / f"{n:05}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == entry
        assert sorted(p.name for p in (folder / "samples").iterdir()) == [
            f"{k:04}.png" for k in range(4)
        ]
    assert (geneval / "grid.png").is_file()
