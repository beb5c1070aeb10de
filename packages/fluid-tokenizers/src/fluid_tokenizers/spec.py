"""What a tokenizer produces, the 2x2 patch grouping of latents, and input checks.

`TokenizerSpec` is the one fact the rest of Fluid needs about a tokenizer: discrete ids or
continuous vectors, how many, on which grid, and their width or vocabulary. The grouping
functions follow the MAR code exactly: a ``p x p`` patch of a ``C``-channel latent becomes one
token whose channels are ordered (c, p, q), i.e. ``'b c (h p) (w q) -> b (h w) (c p q)'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor

# Fluid's own settings live beside the diffusers files (config.json + safetensors) so that a
# public checkpoint directory loads unchanged and a saved Fluid tokenizer stays a valid
# diffusers model directory.
FLUID_CONFIG_NAME = "fluid_tokenizer.json"
DEFAULT_IMAGE_SIZE = 256

# Images are nominally in [-1, 1]; resampling and colour conversion overshoot by a hair.
_RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """The token interface of a tokenizer: kind, grid, and channels or vocabulary."""

    kind: Literal["continuous", "discrete"]
    image_size: int  # pixels (square)
    grid: tuple[int, int]  # token grid (rows, cols); N = rows * cols, raster order
    token_dim: int | None  # channels per token (continuous: latent_ch * patch**2)
    vocab_size: int | None  # codebook size (discrete)

    def __post_init__(self) -> None:
        if self.kind not in ("continuous", "discrete"):
            raise ValueError(f"kind must be 'continuous' or 'discrete'; got {self.kind!r}")
        if self.kind == "continuous" and (self.token_dim is None or self.vocab_size is not None):
            raise ValueError(
                "a continuous spec needs token_dim and no vocab_size; "
                f"got token_dim={self.token_dim}, vocab_size={self.vocab_size}"
            )
        if self.kind == "discrete" and (self.vocab_size is None or self.token_dim is not None):
            raise ValueError(
                "a discrete spec needs vocab_size and no token_dim; "
                f"got token_dim={self.token_dim}, vocab_size={self.vocab_size}"
            )

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def group_patches(latents: Tensor, patch_size: int = 2) -> Tensor:
    """[B, C, H, W] latents -> [B, (H/p)(W/p), C*p*p] tokens, channels in (c, p, q) order."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W]; got {list(latents.shape)}")
    _, _, height, width = latents.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latents of size {height}x{width} do not split into {patch_size}x{patch_size} patches"
        )
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def ungroup_patches(tokens: Tensor, grid: tuple[int, int], patch_size: int = 2) -> Tensor:
    """[B, rows*cols, C*p*p] tokens -> [B, C, rows*p, cols*p] latents; inverse of group_patches."""
    rows, cols = grid
    if tokens.ndim != 3 or tokens.shape[1] != rows * cols or tokens.shape[2] % patch_size**2:
        raise ValueError(
            f"tokens must be [B, {rows * cols}, C*{patch_size}*{patch_size}] for grid "
            f"{rows}x{cols}; got {list(tokens.shape)}"
        )
    return rearrange(
        tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=rows, w=cols, p=patch_size, q=patch_size
    )


def check_images(images: Tensor, image_size: int, *, name: str = "images") -> None:
    """Raise ValueError unless images is float [B, 3, image_size, image_size] in [-1, 1]."""
    expected = f"{name} must be a float tensor [B, 3, {image_size}, {image_size}] in [-1, 1]"
    if not isinstance(images, Tensor):
        raise ValueError(f"{expected}; got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{expected}; got dtype {images.dtype} (convert uint8 with x / 127.5 - 1)")
    if images.ndim != 4 or images.shape[1:] != (3, image_size, image_size):
        raise ValueError(f"{expected}; got {list(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"{expected}; got an empty batch")
    if images.device.type == "xla":
        # Reading values would run the lazy graph mid-trace (and, sharded, compile a gather
        # each call); on xla the range is the caller's to guarantee.
        return
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)
    if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{expected}; got values in [{low:.3g}, {high:.3g}]")


def image_size_for(
    path: Path, image_size: int | None, patch_size: int | None, default_patch: int
) -> tuple[int, int]:
    """Resolve (image_size, patch_size): explicit arguments, then fluid_tokenizer.json, then defaults."""
    saved: dict[str, Any] = {}
    fluid_file = path / FLUID_CONFIG_NAME
    if fluid_file.is_file():
        saved = json.loads(fluid_file.read_text())
    size = (
        image_size if image_size is not None else int(saved.get("image_size", DEFAULT_IMAGE_SIZE))
    )
    patch = patch_size if patch_size is not None else int(saved.get("patch_size", default_patch))
    return size, patch


def write_fluid_config(path: Path, **settings: Any) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / FLUID_CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def model_dir(path: str | Path, subfolder: str | None) -> Path:
    """The directory holding config.json, or a clear error when there is none."""
    root = Path(path) if subfolder is None else Path(path) / subfolder
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} has no config.json; expected a diffusers model directory "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    return root
