"""The bidirectional (BERT-like) trunk of the random-order variants, Fluid among them.

Every image position is present at every step: positions still to be generated carry a learned
mask token, so the shapes never change with the mask ratio (no gathering of visible tokens as in
MAR's encoder, which would make shapes data-dependent under XLA). Text enters through the
cross-attention of every block; a caller generating over many steps (64 for Fluid) computes the
text keys/values once with :meth:`MaskedTransformer.text_kv` and passes them to every call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import TextKV, TransformerConfig, Trunk


class MaskedTransformer(Trunk):
    """Bidirectional transformer over [B, N, D] embedded tokens with a learnable mask token.

    ``forward(x, mask, text, text_mask)`` replaces the positions where ``mask`` is True by the
    mask token, adds learned absolute positions, runs the blocks (self-attention over all N
    positions, cross-attention to the text) and returns the final-normed states [B, N, D].
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config, self_attention="bidirectional")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.width))  # [1, 1, D]
        self._init_parameters(self.mask_token)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        text_kv: TextKV | None = None,
    ) -> Tensor:
        """x [B, N, D] embedded tokens; mask [B, N] bool, True = masked -> h [B, N, D].

        Content of x at masked positions is ignored. Pass ``text`` [B, L, D] with ``text_mask``
        [B, L] bool (True = real token), or ``text_kv`` from :meth:`text_kv` to skip recomputing
        the text keys/values (for CFG, of the concatenated [cond; uncond] text, or
        ``TextKV.cat([cond, uncond])``).
        """
        batch, n = self._check_tokens(x, exact_length=True)
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
            raise ValueError(
                f"mask must be a bool [B, N] = [{batch}, {n}] tensor (True = masked); "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        text_kv = self._resolve_text_kv(batch, text, text_mask, text_kv)
        h = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # [B, N, D]
        h = h + self.pos_embed  # [B, N, D]
        return self._run_blocks(h, text_kv)
