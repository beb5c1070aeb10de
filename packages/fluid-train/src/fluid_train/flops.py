"""Analytic FLOPs per image, and the parameter summary ``fluid info`` prints.

Counted: the matrix multiplications (2 FLOPs per multiply-add) of the text aligner, the trunk
(projections, MLPs and attention scores/values) and the head; element-wise work, norms and the
tokenizer/T5 are left out, as in the usual 6·N·D accounting. Self-attention is counted over
the full N×N scores for both trunks.

- Training: the forward pass of one image with fixed shapes — the trunk over all N tokens and
  the text length ``text_length``, the DiffLoss MLP over N · ``diffusion_batch_mul`` rows (or
  the tied logits over N rows) — times 3 for forward + backward, as the paper counts
  (training compute = model GFLOPs × batch × steps × 3).
- Sampling: CFG doubles every row. The aligner runs once on the caption (the null text is a
  learned vector) and every layer's text K/V once per prompt; random order runs the trunk over
  all N positions at each of K steps, raster once over N positions through the KV cache; each
  token goes through the head once when revealed — DiffLoss for ``sample_steps`` denoising
  steps, the softmax head as one logits row (MaskGIT confidence ordering: every still-masked
  row at every step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .masking import reveal_schedule
from .model import FluidConfig, FluidModel

TIME_EMBED_DIM = 256  # DiffLoss sinusoidal timestep features (DESIGN.md §4)


@dataclass(frozen=True, slots=True)
class FlopsBreakdown:
    """GFLOPs per image, per component."""

    text_aligner: float
    trunk: float
    head: float

    @property
    def total(self) -> float:
        return self.text_aligner + self.trunk + self.head


def _mm(m: float, k: float, n: float) -> float:
    """FLOPs of an [m, k] @ [k, n] product."""
    return 2.0 * m * k * n


def aligner_flops(config: FluidConfig) -> float:
    """Forward FLOPs of the text aligner on one caption of ``text_length`` tokens."""
    a, seq = config.aligner, config.text_length
    mlp = int(a.width * a.mlp_ratio)
    per_block = (
        _mm(seq, a.width, 3 * a.width)  # qkv
        + 2 * _mm(seq, a.width, seq)  # scores + weighted values
        + _mm(seq, a.width, a.width)  # output projection
        + _mm(seq, a.width, mlp)
        + _mm(seq, mlp, a.width)
    )
    return _mm(seq, a.text_dim, a.width) + a.depth * per_block


def text_kv_flops(config: FluidConfig) -> float:
    """FLOPs of every layer's cross-attention K/V projection of one caption."""
    b = config.backbone
    return b.depth * _mm(config.text_length, b.width, 2 * b.width)


def trunk_token_flops(config: FluidConfig, *, queries: int, keys: int) -> float:
    """Trunk FLOPs for ``queries`` positions attending to ``keys`` positions (text K/V excluded)."""
    b, seq = config.backbone, config.text_length
    d, mlp = b.width, b.mlp_width
    per_block = (
        _mm(queries, d, 3 * d)  # self-attention qkv
        + 2 * _mm(queries, d, keys)  # self-attention scores + values
        + _mm(queries, d, d)  # self-attention projection
        + _mm(queries, d, d)  # cross-attention queries
        + 2 * _mm(queries, d, seq)  # cross-attention scores + values
        + _mm(queries, d, d)  # cross-attention projection
        + _mm(queries, d, mlp)
        + _mm(queries, mlp, d)
    )
    return b.depth * per_block


def _diffloss_parts(config: FluidConfig) -> tuple[float, float, float]:
    """FLOPs of the DiffLoss MLP's parts for one row: (denoising pass without the condition
    and time embeddings, condition projection of z, timestep embedding MLP)."""
    c, d = config.token_dim, config.width
    w = config.diffloss.width or d
    denoise = (
        _mm(1, c, w)  # input projection of x_t
        + config.diffloss.depth * (_mm(1, w, 3 * w) + 2 * _mm(1, w, w))  # adaLN + 2 linears
        + _mm(1, w, 2 * w)  # final adaLN
        + _mm(1, w, 2 * c)  # mean + variance
    )
    return denoise, _mm(1, d, w), _mm(1, TIME_EMBED_DIM, w) + _mm(1, w, w)


def diffloss_row_flops(config: FluidConfig) -> float:
    """FLOPs of one training pass of the DiffLoss MLP over one token row (every row has its
    own t, so its own time embedding)."""
    return sum(_diffloss_parts(config))


def _embed_flops(config: FluidConfig, rows: float) -> float:
    # The continuous embedding is a linear layer; the discrete one a table lookup.
    return _mm(rows, config.token_dim, config.width) if config.tokens == "continuous" else 0.0


def train_flops(config: FluidConfig) -> FlopsBreakdown:
    """GFLOPs per image of one training step (forward × 3)."""
    n = config.num_tokens
    trunk = trunk_token_flops(config, queries=n, keys=n) + text_kv_flops(config)
    if config.tokens == "continuous":
        head = _embed_flops(
            config, n
        ) + n * config.diffloss.diffusion_batch_mul * diffloss_row_flops(config)
    else:
        head = _mm(n, config.width, config.vocab_size)
    return FlopsBreakdown(
        text_aligner=3 * aligner_flops(config) / 1e9, trunk=3 * trunk / 1e9, head=3 * head / 1e9
    )


def sample_flops(
    config: FluidConfig,
    *,
    num_steps: int | None = None,
    cfg: bool = True,
    batch_size: int = 1,
    order_policy: str | None = None,
) -> FlopsBreakdown:
    """GFLOPs per image of sampling (default: the config's steps, CFG on) in batches of
    ``batch_size`` images: the DiffLoss sampler embeds each diffusion step's t once per call,
    shared by the batch, and projects each row's z once per call, not once per step."""
    n = config.num_tokens
    rows = 2 if cfg else 1  # CFG runs [cond; uncond]
    steps = num_steps or config.generation.num_steps
    policy = order_policy or config.generation.order_policy
    if config.order == "random":
        trunk = steps * rows * trunk_token_flops(config, queries=n, keys=n)
        embed = steps * _embed_flops(config, n)  # embedded once, then stacked for CFG
    else:
        trunk = rows * trunk_token_flops(config, queries=n, keys=n)
        embed = _embed_flops(config, n)
    trunk += rows * text_kv_flops(config)
    if config.tokens == "continuous":
        denoise, condition, time_embed = _diffloss_parts(config)
        calls = steps if config.order == "random" else n  # head calls per batch
        per_call = config.diffloss.sample_steps * time_embed / batch_size
        head = embed + n * rows * (config.diffloss.sample_steps * denoise + condition)
        head += calls * per_call
    else:
        logit_rows = n
        if config.order == "random" and policy == "confidence":
            schedule = [n, *reveal_schedule(n, steps)[:-1]]  # masked before each step
            logit_rows = sum(schedule)
        head = rows * _mm(logit_rows, config.width, config.vocab_size)
    return FlopsBreakdown(
        text_aligner=aligner_flops(config) / 1e9, trunk=trunk / 1e9, head=head / 1e9
    )


def training_compute(config: FluidConfig, *, batch_size: int, steps: int) -> float:
    """Total training FLOPs as the paper counts them: model GFLOPs × batch × steps × 3."""
    return train_flops(config).total * 1e9 * batch_size * steps


def frozen_text_encoder_params(config: FluidConfig) -> int:
    """Parameters of the frozen T5 encoder the config's text states come from (the meta-device
    counts ``fluid_text.config.T5_ENCODER_PARAMS`` records: no transformers import)."""
    from fluid_text.config import T5_ENCODER_PARAMS

    try:
        return T5_ENCODER_PARAMS[config.text_encoder]
    except KeyError:
        raise ValueError(
            f"unknown text_encoder {config.text_encoder!r}; expected one of "
            f"{sorted(T5_ENCODER_PARAMS)}"
        ) from None


def model_summary(config: FluidConfig, *, preset: str | None = None) -> dict[str, Any]:
    """Everything ``fluid info`` reports, as a JSON-ready dict."""
    from .presets import PAPER_SIZES

    counts = FluidModel.count_params(config)
    train, sample = train_flops(config), sample_flops(config)
    summary: dict[str, Any] = {
        "preset": preset,
        "variant": config.variant,
        "tokens": config.tokens,
        "order": config.order,
        "num_tokens": config.num_tokens,
        "width": config.width,
        "depth": config.backbone.depth,
        "num_heads": config.backbone.num_heads,
        "trainable_params": counts.total,
        "frozen_params": frozen_text_encoder_params(config),
        "text_encoder": config.text_encoder,
        "components": {
            "text_aligner": counts.text_aligner,
            "trunk": counts.trunk,
            "head": counts.head,
        },
        "train_gflops_per_image": train.total,
        "sample_gflops_per_image": sample.total,
        "train_gflops_breakdown": asdict(train),
        "sample_gflops_breakdown": asdict(sample),
        "sample_steps": config.generation.num_steps
        if config.order == "random"
        else config.num_tokens,
    }
    if preset in PAPER_SIZES:
        table2 = PAPER_SIZES[preset].params
        summary["table2_params"] = table2
        summary["table2_rel_diff"] = counts.total / table2 - 1.0
    return summary
