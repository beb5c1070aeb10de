"""Exponential moving average of the trainable weights (evaluation and export use the EMA).

The paper keeps an EMA with decay 0.9999 updated every step. The averages live on the model's
device, in fp32, one tensor per trainable parameter, and are updated in place inside the
training step (``lerp_`` with a fixed weight: no host value changes between steps, so the step
still compiles once under XLA). Names are the clean parameter names (wrapper segments such as
FSDPv2's ``_orig_module`` removed), so an EMA state loads into an unwrapped model for export.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .recipe import clean_name

__all__ = ["EMA"]


class EMA:
    """``shadow ← decay · shadow + (1 − decay) · param`` for every trainable parameter."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = float(decay)
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("EMA needs a model with trainable parameters; got none")
        self.names: list[str] = [n for n, _ in named]
        self._params: list[nn.Parameter] = [p for _, p in named]
        with torch.no_grad():
            self.shadow: list[Tensor] = [p.detach().clone().float() for p in self._params]

    def __len__(self) -> int:
        return len(self.shadow)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return zip(self.names, self.shadow, strict=True)

    def pairs(self) -> Iterator[tuple[Tensor, nn.Parameter]]:
        """(average, live parameter) pairs — parallelize shards each average like its param."""
        return zip(self.shadow, self._params, strict=True)

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        for average, param in zip(self.shadow, self._params, strict=True):
            average.lerp_(param.detach().float(), weight)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.items())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy saved averages in place (keeps each tensor's device and sharding)."""
        missing = [n for n in self.names if n not in state]
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, average in self.items():
            saved = state[name]
            if tuple(saved.shape) != tuple(average.shape):
                raise ValueError(
                    f"EMA state {name} has shape {list(saved.shape)}; "
                    f"the model expects {list(average.shape)}"
                )
            average.copy_(saved.to(device=average.device, dtype=average.dtype))

    @torch.no_grad()
    def averaged_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s state dict on the CPU with clean names and every parameter replaced by
        its average; tied entries (one parameter under two names) both get the average, and
        buffers (e.g. running statistics) are taken from the live model."""
        by_param = {id(p): avg for avg, p in self.pairs()}
        out = {}
        for name, value in model.state_dict(keep_vars=True).items():
            average = by_param.get(id(value))
            tensor = (average if average is not None else value).detach()
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): every rank gathers
                tensor = tensor.full_tensor()
            out[clean_name(name)] = tensor.cpu()
        return out
