from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece

import fluid_text


def test_trained_model_has_t5_id_layout(
    spiece_path: Path, sp: sentencepiece.SentencePieceProcessor, spm_vocab_size: int
):
    assert spiece_path.name == "spiece.model"
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.get_piece_size() == spm_vocab_size
    assert (fluid_text.T5_PAD_ID, fluid_text.T5_EOS_ID, fluid_text.T5_UNK_ID) == (0, 1, 2)
    # Captions of the corpus are covered without unknown pieces.
    assert sp.unk_id() not in sp.encode("a photo of a small red circle to the left of a star")


def test_training_is_deterministic_and_seeded_from_a_one_shot_iterator(
    tmp_path: Path, caption_maker
):
    make_captions = caption_maker
    captions = make_captions(300, seed=1)
    first = fluid_text.train_sentencepiece(iter(captions), tmp_path / "a", vocab_size=48, seed=3)
    second = fluid_text.train_sentencepiece(
        (c for c in captions), tmp_path / "b", vocab_size=48, seed=3
    )
    assert first.read_bytes() == second.read_bytes()
    other = fluid_text.train_sentencepiece(
        make_captions(300, seed=2), tmp_path / "c", vocab_size=48
    )
    assert other.read_bytes() != first.read_bytes()


def test_vocab_limit_hard_names_the_maximum_and_soft_caps(tmp_path: Path, caption_maker):
    captions = caption_maker(200, seed=0)
    with pytest.raises(ValueError, match=r"vocab_size 5000 is too high .* at most \d+ pieces"):
        fluid_text.train_sentencepiece(captions, tmp_path / "hard", vocab_size=5000)
    path = fluid_text.train_sentencepiece(
        captions, tmp_path / "soft", vocab_size=5000, vocab_limit="soft"
    )
    size = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    assert 3 < size < 5000


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "match"),
    [
        ([], {"vocab_size": 16}, ValueError, "texts is empty"),
        (["a red circle", 7], {"vocab_size": 16}, TypeError, r"texts\[1\] must be a str; got int"),
        ("a red circle", {"vocab_size": 16}, TypeError, "single str"),
        (["a red circle"], {"vocab_size": 3}, ValueError, "vocab_size must be an int > 3"),
        (["a red circle"], {"vocab_size": 16, "vocab_limit": "exact"}, ValueError, "vocab_limit"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, texts, kwargs, error, match):
    with pytest.raises(error, match=match):
        fluid_text.train_sentencepiece(texts, tmp_path, **kwargs)
    assert not (tmp_path / "spiece.model").exists()
