"""fluid_text: prompts -> text states for Fluid.

A frozen T5 encoder (SentencePiece tokenization through ``transformers``), the trainable
``TextAligner`` with its learned null text for classifier-free guidance, and the tools that build
a small world's own SentencePiece model and random T5 in the public layout.
"""

from __future__ import annotations

from .__about__ import __version__
from .aligner import AlignerConfig, TextAligner
from .spm import T5_EOS_ID, T5_PAD_ID, T5_UNK_ID, train_sentencepiece
from .states import TextStates
from .t5 import (
    DEFAULT_MAX_LENGTH,
    PromptTruncatedWarning,
    T5TextEncoder,
    build_random_t5,
    count_t5_encoder_params,
    load_t5_tokenizer,
    shapes_t5_config,
    t5_v1_1_xxl_config,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "T5_EOS_ID",
    "T5_PAD_ID",
    "T5_UNK_ID",
    "AlignerConfig",
    "PromptTruncatedWarning",
    "T5TextEncoder",
    "TextAligner",
    "TextStates",
    "__version__",
    "build_random_t5",
    "count_t5_encoder_params",
    "load_t5_tokenizer",
    "shapes_t5_config",
    "t5_v1_1_xxl_config",
    "train_sentencepiece",
]
