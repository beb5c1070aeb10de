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
    stacklevel: int = 2,
) -> int:
    """Warn (``PromptTruncatedWarning``) once for each prompt the encoder will cut, naming it
    ``names[i]`` (default ``prompt i``); returns how many. Encoders without a T5 tokenizer: 0."""
    from fluid_text import PromptTruncatedWarning

    tokenizer = getattr(text_encoder, "tokenizer", None)
    max_length = getattr(text_encoder, "max_length", None)
    if tokenizer is None or max_length is None or not prompts:
        return 0
    if names is not None and len(names) != len(prompts):
        raise ValueError(f"{len(names)} names for {len(prompts)} prompts")
    limit = max_length if limit is None else min(limit, max_length)
    # The same count as the encoder's: the pieces without special tokens, plus T5's EOS.
    pieces = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    cut = 0
    for index, (prompt, ids) in enumerate(zip(prompts, pieces, strict=True)):
        if len(ids) + 1 > limit:
            name = names[index] if names is not None else f"prompt {index}"
            shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            warnings.warn(
                f"{name} ({shown!r}) has {len(ids) + 1} tokens; max is {limit} (truncated)",
                PromptTruncatedWarning,
                stacklevel=stacklevel + 1,
            )
            cut += 1
    return cut


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

    warn_truncated(text_encoder, prompts, names, limit=limit, stacklevel=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        yield
