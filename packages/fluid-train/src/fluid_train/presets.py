"""Model sizes: the paper's Table 2, a CPU-sized ``debug`` and the shapes-world presets.

Paper presets (256×256 images; 256 tokens of 16 channels from SD-VAE with 2×2 grouping, or
256 VQ ids of a 8192-code book; T5-XXL text states of width 4096; text aligner of 6 blocks and
DiffLoss of 3 residual blocks = 6 linear layers, both at the model width; MLP ratio 4).
Trainable parameters (text aligner + trunk + head + embeddings; T5 excluded) counted on the
meta device — ``fluid info PRESET`` prints them for any variant:

| preset      | blocks | width | heads | Table 2 | continuous (Fluid) | discrete         |
|-------------|--------|-------|-------|---------|--------------------|------------------|
| fluid-166m  | 12     | 768   | 12    | 166M    | 170.8M (+2.9%)     | 165.6M (-0.2%)   |
| fluid-369m  | 16     | 1024  | 16    | 369M    | 369.1M (+0.0%)     | 357.2M (-3.2%)   |
| fluid-665m  | 20     | 1280  | 16    | 665M    | 680.0M (+2.3%)     | 658.9M (-0.9%)   |
| fluid-1.1b  | 24     | 1536  | 16    | 1.1B    | 1.129B (+2.6%)     | 1.096B (-0.4%)   |
| fluid-3.1b  | 32     | 2304  | 24    | 3.1B    | 3.213B (+3.7%)     | 3.131B (+1.0%)   |
| fluid-10.5b | 34     | 4096  | 64    | 10.5B   | 10.68B (+1.7%)     | 10.39B (-1.1%)   |

Raster and random order have the same count (the causal trunk's start token replaces the
masked trunk's mask token); continuous = DiffLoss head, discrete = tied softmax head.

Shapes-world presets (64×64 images; 8×8 tokens of 16 channels from the shapes VAE, f=4 with
2×2 grouping, or 8×8 ids of the 512-code shapes VQ; the small frozen T5 of
``fluid_text.shapes_t5_config``) are sized for CPU training; ``debug`` is the smallest model
that exercises every code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluid_backbone.config import TransformerConfig
from fluid_heads.config import DiffLossConfig
from fluid_text.config import SHAPES_T5_SIZES, T5_V1_1_XXL_SIZES, AlignerConfig
from fluid_tokenizers.layouts import (
    sd_vae_ft_ema_config,
    shapes_vae_config,
    token_pixels,
)

from .config import FluidConfig

# Torch-free (configs only): the command line reads preset names and defaults from here.


@dataclass(frozen=True, slots=True)
class PaperSize:
    """One row of the paper's Table 2."""

    depth: int
    width: int
    num_heads: int
    params: int  # the Table 2 figure
    tpu_v5_sec_per_image: float  # sampling speed reported by the paper


PAPER_SIZES: dict[str, PaperSize] = {
    "fluid-166m": PaperSize(12, 768, 12, 166_000_000, 0.047),
    "fluid-369m": PaperSize(16, 1024, 16, 369_000_000, 0.078),
    "fluid-665m": PaperSize(20, 1280, 16, 665_000_000, 0.110),
    "fluid-1.1b": PaperSize(24, 1536, 16, 1_100_000_000, 0.180),
    "fluid-3.1b": PaperSize(32, 2304, 24, 3_100_000_000, 0.483),
    "fluid-10.5b": PaperSize(34, 4096, 64, 10_500_000_000, 1.571),
}

PAPER_IMAGE_SIZE = 256
# SD-VAE (f=8) with 2x2 grouping: 16 px per token side, 16x16 tokens at 256 px.
PAPER_TOKEN_PIXELS = token_pixels(sd_vae_ft_ema_config(), patch_size=2)


def _paper(size: PaperSize) -> FluidConfig:
    side = PAPER_IMAGE_SIZE // PAPER_TOKEN_PIXELS
    return FluidConfig(
        backbone=TransformerConfig(
            width=size.width, depth=size.depth, num_heads=size.num_heads, grid=(side, side)
        ),
        aligner=AlignerConfig(
            text_dim=T5_V1_1_XXL_SIZES["d_model"], width=size.width, depth=6,
            num_heads=size.num_heads,
        ),  # fmt: skip
        diffloss=DiffLossConfig(depth=3),
        token_dim=16,
        vocab_size=8192,
        image_size=PAPER_IMAGE_SIZE,
        text_encoder="t5-v1_1-xxl",
        text_length=128,
    )


# One token per 8x8 pixels, as the shapes VAE (f=4) with 2x2 grouping gives it; the shapes VQ
# (f=8) was built to match (tests/test_presets.py holds the two tokenizers to the same grid).
SHAPES_TOKEN_PIXELS = token_pixels(shapes_vae_config(), patch_size=2)
SHAPES_IMAGE_SIZE = 64  # the presets' default world


def token_layout(image_size: int) -> dict[str, Any]:
    """``get_preset`` overrides laying a shapes-world model out for ``image_size`` pixels: a
    square grid of ``image_size / 8`` tokens a side (``token_layout(32)``: 4x4 tokens)."""
    pixels = SHAPES_TOKEN_PIXELS
    if not isinstance(image_size, int) or image_size < pixels or image_size % pixels:
        raise ValueError(
            f"image_size must be a positive multiple of {pixels} pixels; got {image_size!r}"
        )
    side = image_size // pixels
    return {"image_size": image_size, "backbone.grid": (side, side)}


def _shapes_world(
    *,
    width: int,
    depth: int,
    num_heads: int,
    aligner_depth: int,
    diffloss_depth: int = 3,
    diffloss_width: int | None = None,
    sample_steps: int = 100,
) -> FluidConfig:
    side = SHAPES_IMAGE_SIZE // SHAPES_TOKEN_PIXELS
    return FluidConfig(
        # Sin-cos positions: a run of minutes cannot learn 2-D neighbourhoods from std-0.02 ones.
        backbone=TransformerConfig(
            width=width, depth=depth, num_heads=num_heads, grid=(side, side), pos_init="sincos"
        ),
        aligner=AlignerConfig(
            text_dim=SHAPES_T5_SIZES["d_model"], width=width, depth=aligner_depth,
            num_heads=num_heads,
        ),  # fmt: skip
        diffloss=DiffLossConfig(
            depth=diffloss_depth, width=diffloss_width, sample_steps=sample_steps
        ),
        token_dim=16,
        vocab_size=512,
        image_size=SHAPES_IMAGE_SIZE,
        text_encoder="shapes-t5",
        text_length=32,
    )


def debug() -> FluidConfig:
    """CPU-sized: every code path, shapes-world token layout (76K parameters; discrete 68K)."""
    return _shapes_world(
        width=32, depth=2, num_heads=2, aligner_depth=1, diffloss_depth=2, sample_steps=50
    )


# The shapes-world sizes span 5.7x in parameters (width 96 -> 176, depth 3 -> 6), so the
# miniature scaling study (`fluid study`) trains all three for the same steps in minutes each;
# `fluid demo` trains shapes-s, laid out for its 32 px world by `token_layout(32)` (4x4 tokens).


def shapes_s() -> FluidConfig:
    """Shapes world, small: the demo's model (0.78M parameters; discrete 0.62M)."""
    return _shapes_world(width=96, depth=3, num_heads=4, aligner_depth=1)


def shapes_m() -> FluidConfig:
    """Shapes world, medium: trains in minutes on 2 CPU cores (1.83M parameters; discrete
    1.54M)."""
    return _shapes_world(width=128, depth=4, num_heads=4, aligner_depth=2)


def shapes_l() -> FluidConfig:
    """Shapes world, large (4.42M parameters; discrete 3.86M)."""
    return _shapes_world(width=176, depth=6, num_heads=4, aligner_depth=2)


_PRESETS: dict[str, Callable[[], FluidConfig]] = {
    **{name: (lambda size=size: _paper(size)) for name, size in PAPER_SIZES.items()},
    "debug": debug,
    "shapes-s": shapes_s,
    "shapes-m": shapes_m,
    "shapes-l": shapes_l,
}


def list_presets() -> list[str]:
    """Preset names: the paper's sizes (small to large), then ``debug`` and the shapes world."""
    return list(_PRESETS)


def get_preset(name: str, **overrides: Any) -> FluidConfig:
    """The config of preset ``name`` with ``overrides`` applied (see :meth:`FluidConfig.replace`).

    ``get_preset("fluid-166m", tokens="discrete", order="raster")`` gives the raster-discrete
    variant at the 166M size; dotted keys reach child configs (``**{"backbone.depth": 4}``).
    """
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}") from None
    config = factory()
    return config.replace(**overrides) if overrides else config
