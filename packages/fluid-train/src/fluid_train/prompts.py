"""Prompt warnings that name each input as the user gave it, once.

The T5 encoder numbers the rows of each batch it sees, so a caller that batches, repeats
(``--images-per-prompt``) or reads prompts from a file would hear "prompt 3" for what the user
knows as prompt 0, or line 12 of a metadata file, or sample ``00042`` of a shard — once per copy.
``prompts_named`` warns first, once per prompt, with the caller's names, then silences the
encoder's own truncation warnings for the work inside it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["prompts_named", "warn_truncated"]


def warn_truncated(
    text_encoder: Any,
    prompts: Sequence[str],
    names: Sequence[str] | None = None,
    *,
    limit: int | None = None,
) -> None:
    """Warn (``PromptTruncatedWarning``) once for each prompt the encoder will cut, naming it
    ``names[i]`` (default ``prompt i``): the encoder's own warnings of one tokenization of
    the list. Encoders without ``tokenize`` (no T5 tokenizer) warn nothing."""
    if not prompts or not callable(getattr(text_encoder, "tokenize", None)):
        return
    if names is None:
        names = [f"prompt {i}" for i in range(len(prompts))]
    text_encoder.tokenize(list(prompts), pad_to=limit, names=names)


@contextlib.contextmanager
def prompts_named(
    text_encoder: Any,
    prompts: Sequence[str],
    names: Sequence[str] | None = None,
    *,
    limit: int | None = None,
) -> Iterator[None]:
    """``warn_truncated`` now, then no per-batch truncation warnings inside the block."""
    from fluid_text import PromptTruncatedWarning

    warn_truncated(text_encoder, prompts, names, limit=limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        yield
