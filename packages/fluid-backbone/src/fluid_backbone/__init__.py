"""Transformer trunks for Fluid: a bidirectional masked trunk and a causal, KV-cached trunk.

Both take embedded image tokens [B, N, D] and text states [B, L, D] with a padding mask
[B, L] (True = real token), and return final-normed hidden states [B, N, D].
"""

from __future__ import annotations

from .__about__ import __version__
from .causal import CausalTransformer, KVCache
from .layers import Block, TextKV, TransformerConfig, block_num_params, sincos_2d
from .masked import MaskedTransformer

__all__ = [
    "Block",
    "CausalTransformer",
    "KVCache",
    "MaskedTransformer",
    "TextKV",
    "TransformerConfig",
    "__version__",
    "block_num_params",
    "sincos_2d",
]
