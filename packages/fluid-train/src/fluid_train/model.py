"""The full model: text aligner + trunk + token head, for the four variants of the paper.

``FluidConfig.tokens`` × ``FluidConfig.order`` picks the variant (DESIGN.md §1):

| tokens \\ order | raster                            | random                              |
|----------------|-----------------------------------|-------------------------------------|
| discrete       | CausalTransformer + SoftmaxHead    | MaskedTransformer + SoftmaxHead      |
| continuous     | CausalTransformer + DiffLossHead   | MaskedTransformer + DiffLossHead (Fluid) |

The frozen T5 encoder is not part of the model: it runs once per caption (in preprocessing or
in the pipeline), and the model takes its hidden states. ``training_loss`` is the whole
training objective with fixed shapes — masks built by sort/compare, mask-weighted losses, all
randomness drawn on the batch's device, no ``.item()`` — so the step compiles once under XLA.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluid_backbone import CausalTransformer, MaskedTransformer
from fluid_heads import DiffLossConfig, DiffLossHead, SoftmaxHead
from fluid_text import TextAligner, TextStates

from .__about__ import __version__
from .config import FluidConfig, GenerationConfig
from .masking import training_mask

__all__ = [
    "DiffLossConfig",
    "FluidConfig",
    "FluidModel",
    "GenerationConfig",
    "LossOutput",
    "ParamCounts",
    "TrainBatch",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(slots=True)
class TrainBatch:
    """One training batch: image tokens and the frozen T5 states of their captions."""

    tokens: Tensor  # [B, N] int64 (discrete) or [B, N, C] float (continuous: posterior mean)
    text_hidden: Tensor  # [B, L, D_t] float
    text_mask: Tensor  # [B, L] bool, True = real token
    token_std: Tensor | None = None  # [B, N, C]: tokens are sampled mean + std * eps in the step

    def to(self, device: torch.device | str) -> TrainBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(
            tokens=move(self.tokens),
            text_hidden=move(self.text_hidden),
            text_mask=move(self.text_mask),
            token_std=move(self.token_std),
        )


@dataclass(slots=True)
class LossOutput:
    """The training loss and detached diagnostics (tensors: never synchronised in the step)."""

    loss: Tensor  # scalar, differentiable
    mask_ratio: Tensor  # scalar, fraction of tokens predicted (1 for raster)
    text_drop_rate: Tensor  # scalar, fraction of captions replaced by the null text


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Trainable parameters per component (T5 excluded)."""

    text_aligner: int
    trunk: int
    head: int  # includes the token input embedding (tied with the logits for discrete)

    @property
    def total(self) -> int:
        return self.text_aligner + self.trunk + self.head


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class FluidModel(nn.Module):
    """Text aligner + trunk + head. The head owns the token embedding, so the trunk is agnostic."""

    def __init__(self, config: FluidConfig) -> None:
        super().__init__()
        if not isinstance(config, FluidConfig):
            raise TypeError(f"config must be a FluidConfig; got {type(config).__name__}")
        self.config = config
        self.text_aligner = TextAligner(config.aligner)
        trunk_cls = MaskedTransformer if config.order == "random" else CausalTransformer
        self.trunk = trunk_cls(config.backbone)
        if config.tokens == "continuous":
            self.head: DiffLossHead | SoftmaxHead = DiffLossHead.from_config(
                config.token_dim, config.width, config.diffloss
            )
        else:
            self.head = SoftmaxHead(config.vocab_size, config.width)

    # ---- text -------------------------------------------------------------------------------

    def align_text(self, hidden: Tensor, mask: Tensor, *, drop: Tensor | None = None) -> TextStates:
        """T5 states [B, L, D_t] + mask [B, L] -> aligned text [B, L, D]; ``drop`` [B] -> null text."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text hidden states must be [B, L, {self.config.text_dim}] (the T5 width); "
                f"got {list(hidden.shape)}"
            )
        weight_dtype = self.trunk.pos_embed.dtype
        return self.text_aligner(hidden.to(weight_dtype), mask, drop=drop)

    # ---- training -----------------------------------------------------------------------------

    def _check_batch(self, batch: TrainBatch) -> None:
        cfg, tokens = self.config, batch.tokens
        n = cfg.num_tokens
        if cfg.tokens == "discrete":
            if tokens.ndim != 2 or tokens.shape[1] != n or tokens.dtype != torch.long:
                raise ValueError(
                    f"discrete tokens must be [B, {n}] int64; got {tokens.dtype} {list(tokens.shape)}"
                )
            if batch.token_std is not None:
                raise ValueError(
                    "token_std is only for continuous tokens; got it with discrete ids"
                )
        else:
            c = cfg.token_dim
            if (
                tokens.ndim != 3
                or tuple(tokens.shape[1:]) != (n, c)
                or not tokens.is_floating_point()
            ):
                raise ValueError(
                    f"continuous tokens must be float [B, {n}, {c}]; got {tokens.dtype} {list(tokens.shape)}"
                )
            if batch.token_std is not None and batch.token_std.shape != tokens.shape:
                raise ValueError(
                    f"token_std must match tokens {list(tokens.shape)}; got {list(batch.token_std.shape)}"
                )
        if (
            batch.text_hidden.shape[0] != tokens.shape[0]
            or batch.text_mask.shape != batch.text_hidden.shape[:2]
        ):
            raise ValueError(
                f"text_hidden [B, L, D_t] and text_mask [B, L] must share the token batch "
                f"{tokens.shape[0]}; got {list(batch.text_hidden.shape)} and {list(batch.text_mask.shape)}"
            )

    def training_loss(self, batch: TrainBatch, *, auxiliary: bool = True) -> LossOutput:
        """The training objective of this variant on one batch (fixed shapes, no host syncs);
        ``auxiliary=False`` leaves out the DiffLoss head's readout term (the paper's objective,
        e.g. for validation loss)."""
        self._check_batch(batch)
        cfg = self.config
        tokens = batch.tokens
        device = tokens.device
        bsz, n = tokens.shape[0], cfg.num_tokens
        if batch.token_std is not None:
            # Training targets are posterior samples of the tokenizer, drawn fresh every step.
            tokens = tokens + batch.token_std * torch.randn_like(tokens)

        drop = torch.rand(bsz, device=device) < cfg.text_drop_prob  # [B] bool
        text = self.align_text(batch.text_hidden, batch.text_mask, drop=drop)  # hidden [B, L, D]
        x = self.head.embed(tokens)  # [B, N, D]

        if cfg.order == "random":
            mask = training_mask(bsz, n, device=device)  # [B, N] bool, True = to predict
            h = self.trunk(x, mask, text.hidden, text.mask)  # [B, N, D]
            weight = mask.reshape(bsz * n)  # [B*N] only masked tokens count
            mask_ratio = mask.float().mean()
        else:
            h = self.trunk(x, text.hidden, text.mask)  # [B, N, D]; h[:, i] predicts token i
            weight = None  # teacher forcing: every token counts
            mask_ratio = torch.ones((), device=device)

        target = tokens.reshape(bsz * n, *tokens.shape[2:])  # [B*N] or [B*N, C]
        z = h.reshape(bsz * n, -1)
        if cfg.tokens == "continuous":  # the readout term is the DiffLoss head's alone
            loss = self.head.loss(target, z, weight, readout=auxiliary)
        else:
            loss = self.head.loss(target, z, weight)
        return LossOutput(
            loss=loss,
            mask_ratio=mask_ratio.detach(),
            text_drop_rate=drop.float().mean().detach(),
        )

    # ---- generation ---------------------------------------------------------------------------

    def generate(
        self,
        text_hidden: Tensor,
        text_mask: Tensor,
        options: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Sample image tokens for T5 states [B, L, D_t]; see :func:`fluid_train.generation.generate`."""
        from .generation import generate

        return generate(self, text_hidden, text_mask, options, **kwargs)

    # ---- sizes ----------------------------------------------------------------------------------

    def param_counts(self) -> ParamCounts:
        """Trainable parameters of this model, per component."""
        return ParamCounts(
            text_aligner=_count(self.text_aligner), trunk=_count(self.trunk), head=_count(self.head)
        )

    @staticmethod
    def count_params(config: FluidConfig) -> ParamCounts:
        """Trainable parameters of ``config``, built on the meta device (nothing is allocated)."""
        with torch.device("meta"):
            model = FluidModel(config)
        return model.param_counts()

    # ---- save / load ----------------------------------------------------------------------------

    def save_pretrained(
        self, path: str | os.PathLike, *, weights: Mapping[str, Tensor] | None = None
    ) -> None:
        """Write ``config.json`` + ``model.safetensors``; ``weights`` (e.g. the EMA) replace the
        model's own. ``weights`` must hold every parameter; buffers it lacks come from the model."""
        from safetensors.torch import save_file

        state = {k: v for k, v in self.state_dict().items()}
        if weights is not None:
            unknown = sorted(set(weights) - set(state))
            if unknown:
                raise ValueError(f"weights has entries this model does not: {unknown[:5]}")
            missing = sorted(name for name, _ in self.named_parameters() if name not in weights)
            if missing:
                raise ValueError(f"weights lacks {len(missing)} parameters, e.g. {missing[:5]}")
            for name, value in weights.items():
                if value.shape != state[name].shape:
                    raise ValueError(
                        f"weights[{name!r}] is {list(value.shape)}; the model has {list(state[name].shape)}"
                    )
                state[name] = value
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        # safetensors refuses entries that share storage (tied or aliased weights): copy those.
        tensors, seen = {}, set()
        for name, value in state.items():
            value = value.detach().to("cpu").contiguous()
            ptr = value.untyped_storage().data_ptr()
            tensors[name] = value.clone() if ptr in seen else value
            seen.add(ptr)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "_class_name": "FluidModel",
            "_fluid_train_version": __version__,
            **self.config.to_dict(),
        }
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> FluidModel:
        """Load a model written by :meth:`save_pretrained` from a local directory."""
        from safetensors.torch import load_file

        root = Path(path) / subfolder if subfolder else Path(path)
        config_file, weights_file = root / CONFIG_NAME, root / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found: expected a FluidModel saved by save_pretrained"
                )
        model = cls(FluidConfig.from_dict(json.loads(config_file.read_text())))
        model.load_state_dict(load_file(str(weights_file)), strict=True)
        return model.to(device).eval()
