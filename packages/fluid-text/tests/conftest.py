"""Session fixtures: a SentencePiece model trained on generated captions and a tiny random T5."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece

import fluid_text

COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "cyan",
    "magenta",
    "white",
    "black",
]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart", "ring"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "next to", "behind"]
COUNTS = ["one", "two", "three", "four", "five", "six"]
SIZES = ["small", "large", "tiny", "huge", "thin", "bright", "dark", "striped"]
SPM_VOCAB_SIZE = 64


def make_captions(num: int, seed: int) -> list[str]:
    """GenEval-like captions: single objects, pairs, counts, colours and positions."""
    rng = random.Random(seed)

    def thing() -> str:
        return f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"

    captions = []
    for _ in range(num):
        family = rng.randrange(4)
        if family == 0:
            captions.append(f"a photo of a {thing()}")
        elif family == 1:
            captions.append(f"a {thing()} {rng.choice(RELATIONS)} a {thing()}")
        elif family == 2:
            captions.append(f"a photo of {rng.choice(COUNTS)} {rng.choice(SHAPES)}s")
        else:
            captions.append(f"a photo of a {thing()} and a {thing()}")
    return captions


@pytest.fixture(scope="session")
def caption_maker():
    """``make_captions(num, seed)`` for tests that train their own SentencePiece models."""
    return make_captions


@pytest.fixture(scope="session")
def spm_vocab_size() -> int:
    return SPM_VOCAB_SIZE


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return make_captions(400, seed=0)


@pytest.fixture(scope="session")
def spiece_path(tmp_path_factory: pytest.TempPathFactory, captions: list[str]) -> Path:
    out = tmp_path_factory.mktemp("spm")
    return fluid_text.train_sentencepiece(captions, out, vocab_size=SPM_VOCAB_SIZE, seed=0)


@pytest.fixture(scope="session")
def sp(spiece_path: Path) -> sentencepiece.SentencePieceProcessor:
    """SentencePiece itself: the reference the transformers tokenizer must agree with."""
    return sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory, spiece_path: Path) -> Path:
    out = tmp_path_factory.mktemp("t5")
    config = fluid_text.shapes_t5_config(vocab_size=256)
    return fluid_text.build_random_t5(out, spiece_model=spiece_path, config=config, seed=0)


@pytest.fixture
def t5(t5_dir: Path) -> fluid_text.T5TextEncoder:
    return fluid_text.T5TextEncoder.from_pretrained(t5_dir)
