"""Discrete image tokens: a VQ-GAN style `diffusers.VQModel` (the public aMUSEd layout).

An image [B, 3, 256, 256] in [-1, 1] is encoded by five down blocks (f=16) into a latent
[B, 64, 16, 16]; each latent vector is replaced by the index of its nearest codebook entry
(8192 codes), giving ids [B, 256] int64 in raster order. `decode` looks the ids up in the
codebook (`lookup_from_codebook`) and runs the decoder.

Like the VAE tokenizer it is built frozen (eval mode, no gradients); `train_vq` trains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import VQModel

from .layouts import amused_vq_config, downsample_factor
from .spec import TokenizerSpec, check_images, image_size_for, model_dir, write_fluid_config


def _vqmodel_class() -> type[VQModel]:
    """``diffusers.VQModel``, imported on first use (diffusers pulls in much of transformers)."""
    from diffusers import VQModel

    return VQModel


class VQTokenizer(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] <-> ids [B, (S/f)**2] int64 in [0, vocab_size)."""

    def __init__(self, vq: VQModel, *, image_size: int = 256) -> None:
        super().__init__()
        if not isinstance(vq, _vqmodel_class()):
            raise ValueError(f"vq must be a diffusers VQModel; got {type(vq).__name__}")
        self.vq = vq
        self.image_size = int(image_size)
        if self.image_size <= 0 or self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size must be a positive multiple of the VQ factor "
                f"{self.downsample_factor}; got {image_size}"
            )
        self.eval()
        self.requires_grad_(False)

    # ---- construction and persistence -------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None = None, *, image_size: int = 256, seed: int | None = None
    ) -> VQTokenizer:
        """A randomly initialised tokenizer; `config=None` is the aMUSEd-256 layout."""
        config = amused_vq_config() if config is None else dict(config)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            vq = _vqmodel_class().from_config(config)
        return cls(vq, image_size=image_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        *,
        image_size: int | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> VQTokenizer:
        """Load a local diffusers VQModel directory (e.g. amused-256 with subfolder="vqvae").

        image_size: the argument, then fluid_tokenizer.json written by `save_pretrained`,
        then 256 px. (aMUSEd's config `sample_size` is not a pixel size, so it is not used.)
        """
        root = model_dir(path, subfolder)
        size, _ = image_size_for(root, image_size, None, default_patch=1)
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        vq = _vqmodel_class().from_pretrained(root, **kwargs)
        return cls(vq, image_size=size)

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + diffusion_pytorch_model.safetensors (diffusers) + fluid_tokenizer.json."""
        path = Path(path)
        self.vq.save_pretrained(path, safe_serialization=True)
        write_fluid_config(path, kind="discrete", image_size=self.image_size, patch_size=1)

    # ---- geometry ---------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return downsample_factor(self.vq.config)

    @property
    def vocab_size(self) -> int:
        return int(self.vq.config.num_vq_embeddings)

    @property
    def embed_dim(self) -> int:
        """Width of one codebook vector."""
        return int(self.vq.quantize.vq_embed_dim)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return (side, side)

    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(
            kind="discrete",
            image_size=self.image_size,
            grid=self.grid,
            token_dim=None,
            vocab_size=self.vocab_size,
        )

    # ---- ids <-> codebook vectors -----------------------------------------------------------

    def quantize(self, latents: Tensor) -> Tensor:
        """Pre-quantization latents [B, D, h, w] -> nearest-code ids [B, h*w] int64 (raster)."""
        batch = latents.shape[0]
        # VectorQuantizer flattens (b, h, w) row-major: ids come out in raster order.
        _, _, (_, _, ids) = self.vq.quantize(latents)  # [B*h*w] (or [B*h*w, 1])
        return ids.reshape(batch, -1).long()  # [B, N]

    def codebook_vectors(self, ids: Tensor) -> Tensor:
        """Ids [B, N] -> codebook vectors [B, D, rows, cols]."""
        self._check_ids(ids)
        rows, cols = self.grid
        shape = (ids.shape[0], rows, cols, self.embed_dim)
        return self.vq.quantize.get_codebook_entry(ids.reshape(-1), shape)  # [B, D, rows, cols]

    def _check_ids(self, ids: Tensor) -> None:
        spec = self.spec
        expected = f"ids must be an integer tensor [B, {spec.num_tokens}] in [0, {spec.vocab_size})"
        if not isinstance(ids, Tensor):
            raise ValueError(f"{expected}; got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{expected}; got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] != spec.num_tokens or ids.numel() == 0:
            raise ValueError(f"{expected}; got {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"{expected}; got values in [{low}, {high}]")

    # ---- the two verbs ----------------------------------------------------------------------

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> ids [B, N] int64, raster order."""
        check_images(images, self.image_size)
        latents = self.vq.encode(images.to(self.vq.device, self.vq.dtype)).latents  # [B, D, h, w]
        return self.quantize(latents)

    def decode(self, ids: Tensor) -> Tensor:
        """Ids [B, N] -> images [B, 3, S, S] float32, clamped to [-1, 1]."""
        self._check_ids(ids)
        ids = ids.long().to(self.vq.device)
        if self.vq.config.lookup_from_codebook:
            rows, cols = self.grid
            shape = (ids.shape[0], rows, cols, self.embed_dim)
            images = self.vq.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
        else:
            # Without lookup_from_codebook, VQModel.decode takes vectors: look them up here.
            quant = self.codebook_vectors(ids)  # [B, D, rows, cols]
            images = self.vq.decode(quant, force_not_quantize=True).sample
        return images.float().clamp(-1.0, 1.0)  # [B, 3, S, S]

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)
