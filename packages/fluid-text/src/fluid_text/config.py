"""The text aligner's size: a plain dataclass, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SHAPES_T5_SIZES", "T5_ENCODER_PARAMS", "T5_V1_1_XXL_SIZES", "AlignerConfig"]


@dataclass(kw_only=True, slots=True)
class AlignerConfig:
    """The text aligner: a projection from the T5 width to the model width, then ``depth``
    bidirectional blocks (the paper: 6) at the model width."""

    text_dim: int  # width of the incoming text states (T5 d_model: 4096 for XXL)
    width: int  # model width the states are projected to
    depth: int = 6
    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("text_dim", "width", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AlignerConfig.{name} must be a positive int; got {value!r}")
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"AlignerConfig.width {self.width} must be divisible by num_heads {self.num_heads}"
            )
        if not self.mlp_ratio > 0 or self.mlp_hidden < 1:
            raise ValueError(f"AlignerConfig.mlp_ratio must be > 0; got {self.mlp_ratio}")
        if not self.norm_eps > 0:
            raise ValueError(f"AlignerConfig.norm_eps must be > 0; got {self.norm_eps}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


# The sizes of the two T5 encoder layouts Fluid uses (``t5.t5_v1_1_xxl_config`` and
# ``t5.shapes_t5_config`` build ``transformers.T5Config`` from them); here so that a model
# config can read the T5 width without importing transformers.
T5_V1_1_XXL_SIZES: dict[str, int | float] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "dropout_rate": 0.1,
}
SHAPES_T5_SIZES: dict[str, int | float] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
}

# The encoder parameters of the two layouts (``shapes_t5_config()`` at its default vocabulary),
# as ``t5.count_t5_encoder_params`` counts them on the meta device; recorded so that sizing a
# model (``fluid info``) needs no transformers. tests/test_t5.py recounts both.
T5_ENCODER_PARAMS: dict[str, int] = {
    "t5-v1_1-xxl": 4_762_310_656,
    "shapes-t5": 115_136,
}
