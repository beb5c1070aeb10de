"""Train a SentencePiece unigram model with T5's id layout, for worlds without a public one.

T5's ``spiece.model`` reserves ids 0, 1, 2 for ``<pad>``, ``</s>`` and ``<unk>`` and has no BOS;
``transformers``' T5 tokenizer and ``T5EncoderModel`` rely on exactly that layout (pad 0 is
also the decoder start id, eos 1 is appended to every prompt). A model trained here drops into a
directory next to a ``config.json`` and loads like ``google/t5-v1_1-xxl``.

The module is called ``spm`` rather than ``sentencepiece`` so it never shadows the library.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from os import PathLike
from pathlib import Path
from typing import Literal

import sentencepiece

SPIECE_MODEL_NAME = "spiece.model"

# T5's reserved ids (the public spiece.model and transformers' T5 tokenizer agree on these).
T5_PAD_ID = 0
T5_EOS_ID = 1
T5_UNK_ID = 2


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | PathLike[str],
    *,
    vocab_size: int,
    seed: int = 0,
    vocab_limit: Literal["hard", "soft"] = "hard",
    character_coverage: float = 1.0,
) -> Path:
    """Train a unigram SentencePiece model in-process and write ``out_dir/spiece.model``.

    The id layout is T5's: pad 0, eos 1, unk 2, no bos. Training is single-threaded and
    seeded, so the same texts, ``vocab_size`` and ``seed`` give a byte-identical model.

    Args:
        texts: the training sentences (any iterable, consumed once; one caption per item).
        out_dir: directory to write ``spiece.model`` into (created if missing).
        vocab_size: number of pieces including the three reserved ones.
        seed: seed of SentencePiece's random generator (sentence sampling/shuffling).
        vocab_limit: ``"hard"`` — the model has exactly ``vocab_size`` pieces, or a
            ``ValueError`` says how many the corpus supports; ``"soft"`` — at most
            ``vocab_size`` (small corpora of short captions support only a few dozen pieces).
        character_coverage: fraction of characters covered by the vocabulary; 1.0 keeps
            every character of a small corpus out of ``<unk>``.

    Returns:
        The path of the written ``spiece.model``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str (one sentence each); got a single str")
    if not isinstance(vocab_size, int) or vocab_size <= T5_UNK_ID + 1:
        raise ValueError(
            f"vocab_size must be an int > {T5_UNK_ID + 1} (3 ids are reserved); got {vocab_size!r}"
        )
    if vocab_limit not in ("hard", "soft"):
        raise ValueError(f"vocab_limit must be 'hard' or 'soft'; got {vocab_limit!r}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1]; got {character_coverage}")

    counter = _Counter(texts)
    model = io.BytesIO()
    # The generator is process-global inside SentencePiece; seeding it right before training is
    # what makes the run reproducible (together with one thread: multi-threaded EM is not).
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(counter),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=vocab_limit == "hard",
            character_coverage=character_coverage,
            pad_id=T5_PAD_ID,
            eos_id=T5_EOS_ID,
            unk_id=T5_UNK_ID,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if counter.error is not None:
            # SentencePiece wraps exceptions of the iterator in a RuntimeError; give back ours.
            raise counter.error from None
        if counter.count == 0:
            raise ValueError("texts is empty; expected at least one sentence") from error
        found = re.search(r"value <= (\d+)", str(error))
        if found is not None:
            raise ValueError(
                f"vocab_size {vocab_size} is too high for these {counter.count} texts: they "
                f"support at most {found.group(1)} pieces (or pass vocab_limit='soft')"
            ) from error
        raise
    if counter.count == 0:
        raise ValueError("texts is empty; expected at least one sentence")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPIECE_MODEL_NAME
    path.write_bytes(model.getvalue())
    return path


class _Counter:
    """Iterates over the training texts once, checking types and counting them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.count = 0
        self.error: TypeError | None = None

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(self._texts):
            if not isinstance(text, str):
                self.error = TypeError(f"texts[{index}] must be a str; got {type(text).__name__}")
                raise self.error
            self.count += 1
            yield text
