"""fluid_text: prompts -> text states for Fluid.

A frozen T5 encoder (SentencePiece tokenization through ``transformers``), the trainable
``TextAligner`` with its learned null text for classifier-free guidance, and the tools that build
a small world's own SentencePiece model and random T5 in the public layout.

Submodules load on first use: the aligner does not import transformers; only the T5 names do.
"""

from __future__ import annotations

import importlib
from typing import Any

from .__about__ import __version__

# name -> submodule: loaded on first access (PEP 562), so importing the package is cheap.
_LAZY = {
    "config": ("AlignerConfig", "SHAPES_T5_SIZES", "T5_ENCODER_PARAMS", "T5_V1_1_XXL_SIZES"),
    "aligner": ("TextAligner",),
    "spm": (
        "T5_EOS_ID",
        "T5_PAD_ID",
        "T5_UNK_ID",
        "train_sentencepiece",
    ),
    "states": (
        "TextStates",
    ),
    "t5": (
        "DEFAULT_MAX_LENGTH",
        "PromptTruncatedWarning",
        "T5TextEncoder",
        "build_random_t5",
        "count_t5_encoder_params",
        "load_t5_tokenizer",
        "shapes_t5_config",
        "t5_v1_1_xxl_config",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *_LAZY_NAMES]
