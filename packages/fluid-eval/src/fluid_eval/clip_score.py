"""CLIP-style text-image alignment (CLIPScore) with an ``open_clip`` model from local weights.

Score per pair = ``100 * max(cos(image embedding, text embedding), 0)``, the convention of
torchmetrics' ``CLIPScore``. ``open_clip`` is an optional extra (``fluid-eval[clip]``),
imported only when a model is loaded; weights come from a local file, never a download.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from .geneval import to_pil_images


class ClipModel(Protocol):
    def encode_image(self, images: Tensor) -> Tensor: ...
    def encode_text(self, tokens: Tensor) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class ClipBundle:
    """A CLIP model with the image transform and tokenizer it was trained with."""

    model: ClipModel
    preprocess: Callable[[Image.Image], Tensor]  # PIL -> [3, S, S]
    tokenizer: Callable[[list[str]], Tensor]  # prompts -> [B, L] ids


@dataclass(frozen=True, slots=True)
class ClipScoreResult:
    mean: float
    scores: tuple[float, ...]  # one per (image, prompt) pair


def load_open_clip(
    model_name: str, weights_path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> ClipBundle:
    """An ``open_clip`` architecture (e.g. 'ViT-L-14') with weights from a local file."""
    try:
        import open_clip
    except ImportError:
        raise ImportError(
            "clip_score needs open_clip: pip install 'fluid-eval[clip]' (open_clip_torch)"
        ) from None
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"CLIP weights file {weights_path} does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(weights_path), device=device
    )
    model.eval()
    return ClipBundle(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model_name)
    )


@torch.no_grad()
def clip_score(
    images: Any,
    prompts: Sequence[str],
    clip: ClipBundle,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> ClipScoreResult:
    """CLIPScore of each image with its prompt (images: PIL list or ``[B, 3, H, W]`` in [-1, 1])."""
    pil = to_pil_images(images)
    if len(pil) != len(prompts):
        raise ValueError(
            f"got {len(pil)} images for {len(prompts)} prompts; expected one image per prompt"
        )
    if not pil:
        raise ValueError("clip_score needs at least one image-prompt pair")
    if device is None:
        first = next(iter(getattr(clip.model, "parameters", lambda: iter(()))()), None)
        device = first.device if first is not None else torch.device("cpu")
    scores: list[float] = []
    for start in range(0, len(pil), batch_size):
        chunk = pil[start : start + batch_size]
        pixels = torch.stack([clip.preprocess(im) for im in chunk]).to(device)  # [b, 3, S, S]
        tokens = clip.tokenizer(list(prompts[start : start + batch_size])).to(device)  # [b, L]
        image_emb = torch.nn.functional.normalize(
            clip.model.encode_image(pixels).float(), dim=-1
        )  # [b, D]
        text_emb = torch.nn.functional.normalize(
            clip.model.encode_text(tokens).float(), dim=-1
        )  # [b, D]
        cosine = (image_emb * text_emb).sum(dim=-1)  # [b]
        scores.extend((100.0 * cosine.clamp(min=0)).tolist())
    return ClipScoreResult(mean=float(sum(scores) / len(scores)), scores=tuple(scores))
