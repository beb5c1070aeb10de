"""Continuous image tokens: the Stable Diffusion KL-VAE with MAR's 2x2 patch grouping.

An image [B, 3, 256, 256] in [-1, 1] is encoded by `diffusers.AutoencoderKL` (the public
sd-vae-ft-ema layout, f=8) into a latent [B, 4, 32, 32]; the latent is shifted and scaled by
the VAE config (``(z - shift_factor) * scaling_factor``, so tokens have about unit variance),
then every 2x2 patch becomes one token: [B, 256, 16] with channels in (c, p, q) order, raster
order over the 16x16 grid. `decode` inverts each step exactly and runs the VAE decoder.

The tokenizer is a frozen part of Fluid: it is built in eval mode with gradients off;
`train_vae` (training.py) switches them on only while it trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL

from .layouts import downsample_factor, sd_vae_ft_ema_config
from .spec import (
    TokenizerSpec,
    check_images,
    group_patches,
    image_size_for,
    model_dir,
    ungroup_patches,
    write_fluid_config,
)


def _autoencoderkl_class() -> type[AutoencoderKL]:
    """``diffusers.AutoencoderKL``, imported on first use (diffusers pulls in much of transformers)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL


@dataclass(frozen=True, slots=True)
class LatentMoments:
    """The VAE posterior in token space: tokens ~ N(mean, std**2), both [B, N, C].

    Preprocessing stores these once; training draws a fresh sample per step, as MAR does.
    """

    mean: Tensor  # [B, N, C]
    std: Tensor  # [B, N, C]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


class SDVAETokenizer(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] <-> continuous tokens [B, (S/(f*p))**2, C*p*p]."""

    def __init__(self, vae: AutoencoderKL, *, image_size: int = 256, patch_size: int = 2) -> None:
        super().__init__()
        if not isinstance(vae, _autoencoderkl_class()):
            raise ValueError(f"vae must be a diffusers AutoencoderKL; got {type(vae).__name__}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1; got {patch_size}")
        self.vae = vae
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        stride = self.downsample_factor * self.patch_size
        if self.image_size <= 0 or self.image_size % stride:
            raise ValueError(
                f"image_size must be a positive multiple of {stride} (VAE factor "
                f"{self.downsample_factor} x patch {self.patch_size}); got {image_size}"
            )
        self.eval()
        self.requires_grad_(False)

    # ---- construction and persistence -------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any] | None = None,
        *,
        image_size: int = 256,
        patch_size: int = 2,
        seed: int | None = None,
    ) -> SDVAETokenizer:
        """A randomly initialised tokenizer; `config=None` is the sd-vae-ft-ema layout."""
        config = sd_vae_ft_ema_config() if config is None else dict(config)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            vae = _autoencoderkl_class().from_config(config)
        return cls(vae, image_size=image_size, patch_size=patch_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        *,
        image_size: int | None = None,
        patch_size: int | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> SDVAETokenizer:
        """Load a local diffusers AutoencoderKL directory (e.g. a downloaded sd-vae-ft-ema).

        image_size / patch_size: explicit arguments win, then fluid_tokenizer.json written by
        `save_pretrained`, then 256 px and 2x2 (the paper's setting).
        """
        root = model_dir(path, subfolder)
        size, patch = image_size_for(root, image_size, patch_size, default_patch=2)
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        vae = _autoencoderkl_class().from_pretrained(root, **kwargs)
        return cls(vae, image_size=size, patch_size=patch)

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + diffusion_pytorch_model.safetensors (diffusers) + fluid_tokenizer.json."""
        path = Path(path)
        self.vae.save_pretrained(path, safe_serialization=True)
        write_fluid_config(
            path, kind="continuous", image_size=self.image_size, patch_size=self.patch_size
        )

    # ---- geometry ---------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return downsample_factor(self.vae.config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = self.vae.config.get("shift_factor")
        return 0.0 if shift is None else float(shift)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // (self.downsample_factor * self.patch_size)
        return (side, side)

    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(
            kind="continuous",
            image_size=self.image_size,
            grid=self.grid,
            token_dim=self.latent_channels * self.patch_size**2,
            vocab_size=None,
        )

    # ---- latents <-> tokens -----------------------------------------------------------------

    def latents_to_tokens(self, latents: Tensor) -> Tensor:
        """Raw VAE latents [B, c, h, w] -> tokens [B, N, c*p*p] (shifted, scaled, grouped)."""
        scaled = (latents - self.shift_factor) * self.scaling_factor  # [B, c, h, w]
        return group_patches(scaled, self.patch_size)  # [B, N, c*p*p]

    def tokens_to_latents(self, tokens: Tensor) -> Tensor:
        """Tokens [B, N, c*p*p] -> raw VAE latents [B, c, h, w]; inverse of latents_to_tokens."""
        self._check_tokens(tokens)
        latents = ungroup_patches(tokens, self.grid, self.patch_size)  # [B, c, h, w]
        return latents / self.scaling_factor + self.shift_factor

    def _check_tokens(self, tokens: Tensor) -> None:
        spec = self.spec
        expected = [spec.num_tokens, spec.token_dim]
        if not isinstance(tokens, Tensor) or not tokens.is_floating_point():
            got = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(
                f"tokens must be a float tensor [B, {expected[0]}, {expected[1]}]; got {got}"
            )
        if tokens.ndim != 3 or list(tokens.shape[1:]) != expected:
            raise ValueError(
                f"tokens must be [B, {expected[0]}, {expected[1]}] for a {spec.grid[0]}x"
                f"{spec.grid[1]} grid of {spec.token_dim}-channel tokens; got {list(tokens.shape)}"
            )

    # ---- the two verbs ----------------------------------------------------------------------

    def encode_moments(self, images: Tensor) -> LatentMoments:
        """The posterior N(mean, std**2) in token space, each [B, N, C] float32."""
        check_images(images, self.image_size)
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        mean = self.latents_to_tokens(posterior.mean.float())  # [B, N, C]
        # std scales with the latent (the shift drops out); grouping is a pure permutation.
        std = group_patches(posterior.std.float() * self.scaling_factor, self.patch_size)
        return LatentMoments(mean=mean, std=std)

    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> tokens [B, N, C] float32.

        The posterior mean by default; `sample=True` draws from the posterior (seeded by
        `generator`), which is what training on VAE tokens uses.
        """
        moments = self.encode_moments(images)
        return moments.sample(generator) if sample else moments.mean

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens [B, N, C] -> images [B, 3, S, S] float32, clamped to [-1, 1]."""
        latents = self.tokens_to_latents(tokens)  # [B, c, h, w]
        images = self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample  # [B, 3, S, S]
        return images.float().clamp(-1.0, 1.0)

    def forward(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        return self.encode(images, sample=sample, generator=generator)


@torch.no_grad()
def calibrate_scaling_factor(
    tokenizer: SDVAETokenizer,
    images: Tensor | Iterable[Tensor | tuple[Tensor, ...]],
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Set the VAE's scaling_factor to 1 / std of its (shifted) latents and return it.

    As Stable Diffusion did for its VAE: tokens then have unit variance, the scale the
    diffusion head's noise schedule assumes. Latents are posterior samples (what training
    sees), drawn with a seeded generator. The value is stored in the VAE config, so
    `save_pretrained` / `from_pretrained` keep it.
    """
    vae = tokenizer.vae
    device = vae.device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    total, total_sq, count = 0.0, 0.0, 0
    for index, batch in enumerate(batches):
        if isinstance(batch, (tuple, list)):  # (images, ...) from a DataLoader
            batch = batch[0]
        check_images(batch, tokenizer.image_size, name=f"images batch {index}")
        posterior = vae.encode(batch.to(device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).double() - tokenizer.shift_factor
        total += float(latents.sum())
        total_sq += float(latents.square().sum())
        count += latents.numel()
    if count < 2:
        raise ValueError("images must hold at least one image to calibrate the scaling factor")
    variance = total_sq / count - (total / count) ** 2
    if variance <= 0.0:
        raise ValueError("the VAE latents have zero variance on these images; cannot calibrate")
    scaling_factor = float(variance**-0.5)
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor
