"""Prompt warnings name the user's inputs once: prompts as given on the command line, metadata
lines, shard samples — not the rows of whatever batch or copy the T5 encoder saw."""

from __future__ import annotations

import contextlib
import json
import warnings

import torch

from fluid_text import PromptTruncatedWarning
from fluid_train.cli.generate import generate_geneval, generate_prompts
from fluid_train.preprocess import FrozenEncoders

LONG = " ".join(["a photo of a red circle left of a blue square"] * 3)  # > 32 T5 tokens


@contextlib.contextmanager
def counted_tokenizer(text_encoder):
    """The SentencePiece calls of ``text_encoder`` inside the block (a list, one item a call)."""
    tokenizer, calls = text_encoder.tokenizer, []

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    text_encoder.tokenizer = Counting()
    try:
        yield calls
    finally:
        text_encoder.tokenizer = tokenizer


def truncation_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PromptTruncatedWarning)]


def test_fluid_generate_warns_once_per_prompt_numbered_as_given(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("continuous", "random")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = generate_prompts(
            pipe, ["two blue squares", LONG, ""], tmp_path / "out", images_per_prompt=2,
            batch_size=3, progress=False, num_steps=1,
        )  # fmt: skip
    assert len(files) == 6
    messages = truncation_warnings(record)
    assert len(messages) == 1, messages  # one long prompt: one warning, not one per image
    assert messages[0].startswith(f"prompt 1 ({LONG[:37] + '...'!r}) has ")
    assert messages[0].endswith("tokens; max is 32 (truncated)")


def test_batched_generation_numbers_prompts_in_the_whole_list(tiny_pipeline):
    pipe = tiny_pipeline("discrete", "raster")
    with counted_tokenizer(pipe.text_encoder) as calls, warnings.catch_warnings(record=True) as record:  # fmt: skip
        warnings.simplefilter("always")
        pipe.generate_tokens(["a", "b", "c", LONG], batch_size=2, num_steps=1, seed=0)
    messages = truncation_warnings(record)
    assert len(messages) == 1 and messages[0].startswith(f"prompt 3 ({LONG[:37] + '...'!r}) has ")
    assert len(calls) == 2  # one SentencePiece pass per batch of 2, none for the warnings


def test_metadata_lines_and_shard_samples_are_named(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("continuous", "random")
    metadata = tmp_path / "evaluation_metadata.jsonl"
    entry = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    lines = [{**entry, "prompt": "a photo of a circle"}, {**entry, "prompt": LONG}]
    metadata.write_text("".join(json.dumps(e) + "\n" for e in lines))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        generate_geneval(
            pipe, metadata, tmp_path / "geneval", images_per_prompt=2, batch_size=4,
            progress=False, num_steps=1,
        )  # fmt: skip
    messages = truncation_warnings(record)
    assert len(messages) == 1 and messages[0].startswith(f"{metadata} line 2 "), messages

    encoders = FrozenEncoders(pipe.tokenizer, pipe.text_encoder, text_length=8)
    images = torch.zeros(2, 3, 16, 16)
    names = ["shard 00003.tar sample 30000", "shard 00003.tar sample 30001"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = encoders(images, ["red", LONG], names)
    messages = truncation_warnings(record)
    assert len(messages) == 1 and messages[0].startswith("shard 00003.tar sample 30001 ")
    assert "max is 8 (truncated)" in messages[0]
    assert out["text_mask"].shape == (2, 8) and out["text_mask"][1].all()
    # The encoder names the captions itself: one SentencePiece pass per batch (a training step
    # on image shards), not a second one for the warnings.
    with counted_tokenizer(pipe.text_encoder) as calls:
        encoders.host_inputs(images, ["red", LONG], names)
    assert len(calls) == 1
