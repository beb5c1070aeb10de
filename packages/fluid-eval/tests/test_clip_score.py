from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_eval.clip_score import ClipBundle, clip_score, load_open_clip


class _ColourClip(torch.nn.Module):
    """A CLIP stand-in: images embed as their mean colour, text as the colour word it names."""

    words = ("red", "green", "blue")

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # [B, 3]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float()  # [B, 3]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [[next(i for i, w in enumerate(self.words) if w in p)] for p in prompts]
        )


@pytest.fixture
def bundle() -> ClipBundle:
    model = _ColourClip()
    return ClipBundle(model=model, preprocess=model.preprocess, tokenizer=model.tokenize)


def test_clip_score_is_100_times_the_clamped_cosine(bundle) -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    purple = Image.new("RGB", (8, 8), (255, 0, 255))
    result = clip_score(
        [red, red, purple],
        ["a red square", "a green square", "a blue square"],
        bundle,
        batch_size=2,
    )
    assert result.scores == pytest.approx((100.0, 0.0, 100 / np.sqrt(2)))
    assert result.mean == pytest.approx(np.mean(result.scores))
    tensor = torch.full((1, 3, 8, 8), -1.0)
    tensor[:, 2] = 1.0  # blue in [-1, 1]: (-1, -1, 1)
    assert clip_score(tensor, ["blue"], bundle).scores == pytest.approx((100.0,))


def test_clip_score_checks_pairs(bundle) -> None:
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        clip_score([Image.new("RGB", (4, 4))] * 2, ["red"], bundle)


def test_open_clip_is_optional_and_named_when_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"fluid-eval\[clip\]"):
        load_open_clip("ViT-B-32", tmp_path / "weights.pt")
