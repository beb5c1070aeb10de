"""The text states every part of fluid_text hands on: hidden states plus a padding mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class TextStates:
    """Per-token text states of a batch of prompts.

    ``hidden`` is ``[B, L, D]``; ``mask`` is ``[B, L]`` bool with True marking a real token.
    Padded positions carry zeros in ``hidden`` so that saved states are reproducible.
    """

    hidden: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] bool, True = real token

    def __post_init__(self) -> None:
        # Static shape/dtype checks only: safe inside a traced (XLA) step.
        if self.hidden.ndim != 3:
            raise ValueError(f"hidden must be [B, L, D]; got {list(self.hidden.shape)}")
        if self.mask.dtype != torch.bool or self.mask.shape != self.hidden.shape[:2]:
            raise ValueError(
                f"mask must be a bool [B, L] = {list(self.hidden.shape[:2])} tensor; "
                f"got {self.mask.dtype} {list(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def dim(self) -> int:
        return self.hidden.shape[2]
