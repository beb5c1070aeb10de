"""SDVAETokenizer: shapes, scaling, sampling, persistence, input checks, the public layout."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from fluid_tokenizers import (
    SDVAETokenizer,
    calibrate_scaling_factor,
    group_patches,
    sd_vae_ft_ema_config,
    shapes_vae_config,
)


@pytest.fixture
def tiny(tiny_vae_config) -> SDVAETokenizer:
    return SDVAETokenizer.from_config(tiny_vae_config, image_size=32, seed=0)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_shapes_spec_and_frozen(tiny: SDVAETokenizer) -> None:
    spec = tiny.spec
    assert (spec.kind, spec.grid, spec.token_dim, spec.vocab_size) == (
        "continuous",
        (4, 4),
        16,
        None,
    )
    assert not tiny.training and not tiny.vae.training
    assert not any(p.requires_grad for p in tiny.parameters())
    tokens = tiny.encode(_images(2, 32))
    assert tokens.shape == (2, 16, 16) and tokens.dtype == torch.float32
    images = tiny.decode(tokens)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_tokens_are_shifted_scaled_grouped_latents(tiny_vae_config) -> None:
    config = {**tiny_vae_config, "scaling_factor": 0.5, "shift_factor": 0.25}
    tokenizer = SDVAETokenizer.from_config(config, image_size=32, seed=0)
    images = _images(2, 32)
    mean = tokenizer.vae.encode(images).latent_dist.mean  # [2, 4, 8, 8]
    expected = group_patches((mean - 0.25) * 0.5, 2)
    torch.testing.assert_close(tokenizer.encode(images), expected)
    # decode feeds the VAE exactly the latent it produced
    reference = tokenizer.vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(tokenizer.decode(expected), reference, rtol=1e-5, atol=1e-5)


def test_sample_differs_from_mean_and_is_seeded(tiny: SDVAETokenizer) -> None:
    images = _images(2, 32)
    mean = tiny.encode(images)
    first = tiny.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    again = tiny.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    other = tiny.encode(images, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, mean)
    # the sample is mean + std * noise in token space
    moments = tiny.encode_moments(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, moments.mean + moments.std * noise)


def test_save_load_round_trip(tiny: SDVAETokenizer, tmp_path) -> None:
    tiny.vae.register_to_config(scaling_factor=0.7)
    tiny.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "config.json").is_file()
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    fluid = json.loads((tmp_path / "vae" / "fluid_tokenizer.json").read_text())
    assert (fluid["image_size"], fluid["patch_size"]) == (32, 2)

    loaded = SDVAETokenizer.from_pretrained(tmp_path, subfolder="vae")
    assert loaded.image_size == 32 and loaded.scaling_factor == 0.7
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = _images(2, 32)
    tokens = tiny.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), tiny.decode(tokens))


def test_public_directory_without_fluid_file_loads(tiny_vae_config, tmp_path) -> None:
    # A plain diffusers save (as downloaded from the hub) has no fluid_tokenizer.json.
    vae = AutoencoderKL.from_config(tiny_vae_config)
    vae.save_pretrained(tmp_path)
    tokenizer = SDVAETokenizer.from_pretrained(tmp_path, image_size=64)
    assert tokenizer.spec.grid == (8, 8)
    assert SDVAETokenizer.from_pretrained(tmp_path).image_size == 256
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SDVAETokenizer.from_pretrained(tmp_path, subfolder="vae")


def test_calibrate_scaling_factor_gives_unit_variance(tiny: SDVAETokenizer, tmp_path) -> None:
    images = _images(8, 32, seed=3)
    factor = calibrate_scaling_factor(tiny, images, batch_size=4)
    assert tiny.scaling_factor == pytest.approx(factor)
    tokens = tiny.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert float(tokens.std()) == pytest.approx(1.0, rel=0.05)
    tiny.save_pretrained(tmp_path)
    assert SDVAETokenizer.from_pretrained(tmp_path).scaling_factor == pytest.approx(factor)


def test_bad_inputs_raise_clear_errors(tiny: SDVAETokenizer) -> None:
    with pytest.raises(
        ValueError, match=r"images must be .*\[B, 3, 32, 32\].*got \[1, 3, 64, 64\]"
    ):
        tiny.encode(_images(1, 64))
    with pytest.raises(ValueError, match=r"got \[1, 4, 32, 32\]"):
        tiny.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="got dtype torch.uint8"):
        tiny.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]; got values in \[0, 255\]"):
        tiny.encode(torch.full((1, 3, 32, 32), 255.0).index_fill_(1, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"tokens must be \[B, 16, 16\].*got \[1, 16, 12\]"):
        tiny.decode(torch.zeros(1, 16, 12))
    with pytest.raises(ValueError, match=r"tokens must be \[B, 16, 16\].*got \[1, 64, 16\]"):
        tiny.decode(torch.zeros(1, 64, 16))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8"):
        SDVAETokenizer(tiny.vae, image_size=36)


def test_shapes_world_config_layout() -> None:
    tokenizer = SDVAETokenizer.from_config(shapes_vae_config(), image_size=64, seed=0)
    assert tokenizer.downsample_factor == 4
    spec = tokenizer.spec
    assert (spec.grid, spec.num_tokens, spec.token_dim) == ((8, 8), 64, 16)


@pytest.fixture(scope="module")
def sd_vae_ft_ema() -> SDVAETokenizer:
    # The full public layout with random weights (83.65M parameters), built once.
    return SDVAETokenizer.from_config(seed=0)


@pytest.mark.slow
def test_sd_vae_ft_ema_layout_gives_256_tokens_of_16(sd_vae_ft_ema: SDVAETokenizer) -> None:
    config = sd_vae_ft_ema_config()
    assert sd_vae_ft_ema.scaling_factor == 0.18215
    assert list(sd_vae_ft_ema.vae.config.block_out_channels) == config["block_out_channels"]
    assert sum(p.numel() for p in sd_vae_ft_ema.parameters()) == 83_653_863
    image = _images(1, 256, seed=5)
    with torch.no_grad():
        tokens = sd_vae_ft_ema.encode(image)
        mean = sd_vae_ft_ema.vae.encode(image).latent_dist.mean  # [1, 4, 32, 32]
    assert tokens.shape == (1, 256, 16)
    # reference grouping written out independently of einops: token (i, j) channel (c, p, q)
    reference = (
        (mean * 0.18215)
        .reshape(1, 4, 16, 2, 16, 2)  # [b, c, i, p, j, q]
        .permute(0, 2, 4, 1, 3, 5)  # [b, i, j, c, p, q]
        .reshape(1, 256, 16)
    )
    torch.testing.assert_close(tokens, reference)
