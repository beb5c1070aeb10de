"""VQTokenizer: ids, codebook decoding, persistence, input checks, the aMUSEd layout."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import VQModel

from fluid_tokenizers import VQTokenizer, amused_vq_config, shapes_vq_config


@pytest.fixture
def tiny(tiny_vq_config) -> VQTokenizer:
    tokenizer = VQTokenizer.from_config(tiny_vq_config, image_size=32, seed=0)
    # diffusers initialises codes in +-1/K; spread them so ids vary across an image.
    tokenizer.vq.quantize.embedding.weight.data.normal_(generator=torch.Generator().manual_seed(1))
    return tokenizer


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _nearest_codes(tokenizer: VQTokenizer, images: torch.Tensor) -> torch.Tensor:
    """Reference ids: argmin over squared distances, flattened row-major per image."""
    latents = tokenizer.vq.encode(images).latents  # [B, D, h, w]
    vectors = latents.permute(0, 2, 3, 1).reshape(
        latents.shape[0], -1, latents.shape[1]
    )  # [B, N, D]
    codebook = tokenizer.vq.quantize.embedding.weight  # [K, D]
    distances = (vectors.unsqueeze(2) - codebook).square().sum(-1)  # [B, N, K]
    return distances.argmin(-1)


def test_encode_gives_nearest_code_ids_in_raster_order(tiny: VQTokenizer) -> None:
    spec = tiny.spec
    assert (spec.kind, spec.grid, spec.vocab_size, spec.token_dim) == ("discrete", (8, 8), 64, None)
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    images = _images(2, 32)
    with torch.no_grad():
        ids = tiny.encode(images)
        reference = _nearest_codes(tiny, images)
    assert ids.shape == (2, 64) and ids.dtype == torch.int64
    assert torch.equal(ids, reference)
    assert ids.unique().numel() > 1


@pytest.mark.parametrize("lookup_from_codebook", [True, False])
def test_decode_runs_the_decoder_on_codebook_vectors(tiny_vq_config, lookup_from_codebook) -> None:
    config = {**tiny_vq_config, "lookup_from_codebook": lookup_from_codebook}
    tokenizer = VQTokenizer.from_config(config, image_size=32, seed=0)
    vq = tokenizer.vq
    ids = torch.randint(64, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vectors = vq.quantize.embedding.weight[ids].reshape(2, 8, 8, 4).permute(0, 3, 1, 2)
        reference = vq.decoder(vq.post_quant_conv(vectors)).clamp(-1, 1)
        images = tokenizer.decode(ids)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, reference)


def test_save_load_round_trip(tiny: VQTokenizer, tmp_path) -> None:
    tiny.save_pretrained(tmp_path / "vqvae")
    assert (tmp_path / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    fluid = json.loads((tmp_path / "vqvae" / "fluid_tokenizer.json").read_text())
    assert (fluid["kind"], fluid["image_size"]) == ("discrete", 32)
    loaded = VQTokenizer.from_pretrained(tmp_path, subfolder="vqvae")
    assert loaded.image_size == 32 and not loaded.training
    images = _images(2, 32, seed=4)
    with torch.no_grad():
        ids = tiny.encode(images)
        assert torch.equal(loaded.encode(images), ids)
        assert torch.equal(loaded.decode(ids), tiny.decode(ids))


def test_public_directory_without_fluid_file_loads(tiny_vq_config, tmp_path) -> None:
    VQModel.from_config(tiny_vq_config).save_pretrained(tmp_path / "vqvae")
    assert VQTokenizer.from_pretrained(tmp_path, subfolder="vqvae").image_size == 256
    assert VQTokenizer.from_pretrained(tmp_path / "vqvae", image_size=64).spec.grid == (16, 16)


def test_bad_inputs_raise_clear_errors(tiny: VQTokenizer) -> None:
    with pytest.raises(
        ValueError, match=r"images must be .*\[B, 3, 32, 32\].*got \[2, 3, 48, 48\]"
    ):
        tiny.encode(_images(2, 48))
    with pytest.raises(ValueError, match=r"got \[1, 1, 32, 32\]"):
        tiny.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"ids must be .*\[B, 64\] in \[0, 64\); got \[1, 63\]"):
        tiny.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got values in \[0, 64\]"):
        tiny.decode(torch.full((1, 64), 64).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="got dtype torch.float32"):
        tiny.decode(torch.zeros(1, 64))
    with pytest.raises(
        ValueError, match="image_size must be a positive multiple of the VQ factor 4"
    ):
        VQTokenizer(tiny.vq, image_size=30)


def test_shapes_world_config_layout() -> None:
    tokenizer = VQTokenizer.from_config(shapes_vq_config(), image_size=64, seed=0)
    assert tokenizer.downsample_factor == 8
    assert (tokenizer.spec.grid, tokenizer.spec.vocab_size) == ((8, 8), 512)


@pytest.mark.slow
def test_amused_layout_gives_256_ids_below_8192() -> None:
    tokenizer = VQTokenizer.from_config(seed=0)  # 146.24M parameters, random weights
    config = amused_vq_config()
    assert list(tokenizer.vq.config.block_out_channels) == config["block_out_channels"]
    assert (tokenizer.downsample_factor, tokenizer.embed_dim, tokenizer.vocab_size) == (
        16,
        64,
        8192,
    )
    assert tokenizer.vq.config.lookup_from_codebook
    with torch.no_grad():
        ids = tokenizer.encode(_images(1, 256, seed=2))
    assert ids.shape == (1, 256) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 8192
