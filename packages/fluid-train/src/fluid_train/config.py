"""Every configuration of fluid-train, as typed dataclasses importable without torch.

A ``FluidConfig`` holds its children's configs whole — the trunk's (``TransformerConfig``, which
owns the token grid), the text aligner's and the DiffLoss head's — and a ``TrainConfig`` holds a
``FluidConfig``. One function, :func:`config_from_dict`, turns nested plain values (JSON, TOML,
command-line flags, ``KEY=VALUE`` overrides) into any of them, with errors that name the key and
the type it expected. The command line builds its flags from the ``help`` metadata of these
fields, so a flag, its type, its default and its help live here once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fluid_backbone.config import TransformerConfig
from fluid_heads.config import DiffLossConfig
from fluid_text.config import AlignerConfig

from .config_io import (
    check_choices,
    config_from_dict,
    load_config_file,
    merge,
    replace_given,
    with_overrides,
)

__all__ = [
    "CONFIG_FORMAT",
    "DataConfig",
    "DiffLossConfig",
    "FluidConfig",
    "GenerationConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PreprocessOptions",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config_file",
    "merge",
    "replace_given",
    "with_overrides",
]

# Version of the saved model config layout (``config.json``'s ``_format``). 1: the token grid
# also stood at the top level and ``backbone.num_tokens`` repeated it; 2: the grid lives in
# ``backbone.grid`` alone. ``FluidConfig.from_dict`` reads both.
CONFIG_FORMAT = 2

TokenKind = Literal["discrete", "continuous"]
Order = Literal["raster", "random"]
OrderPolicy = Literal["random", "confidence"]
CfgSchedule = Literal["linear", "constant"]
TextEncoderLayout = Literal["t5-v1_1-xxl", "shapes-t5"]
Backend = Literal["auto", "eager", "xla", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]
TextDtype = Literal["float16", "bfloat16", "float32"]  # encoded shards' T5 states
TextStorage = Literal["trimmed", "padded"]


def _check_positive(config: Any, *names: str, optional: bool = False) -> None:
    """ValueError naming the field unless each of ``names`` is a positive int (or, with
    ``optional``, None)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the command-line help (and, with ``flag=``, the flag's name)."""
    return {"help": text, **extra}


# ---------------------------------------------------------------------------------- model


@dataclass(kw_only=True, slots=True)
class GenerationConfig:
    """Sampling options: a model's defaults, and what a caller passes to override them."""

    num_steps: int = field(default=64, metadata=_help("random order: generation steps K (raster always takes N)", flag="--steps", metavar="K"))  # fmt: skip
    cfg: float = field(default=3.0, metadata=_help("classifier-free guidance scale (1 = off)"))
    cfg_schedule: CfgSchedule = field(default="linear", metadata=_help("guidance over the steps"))
    temperature: float = field(default=1.0, metadata=_help("softmax temperature / DiffLoss noise scale"))  # fmt: skip
    order_policy: OrderPolicy = field(default="random", metadata=_help("random-discrete: 'confidence' = MaskGIT's order"))  # fmt: skip
    choice_temperature: float = field(default=4.5, metadata=_help("MaskGIT's Gumbel temperature, annealed to 0"))  # fmt: skip
    top_k: int | None = field(default=None, metadata=_help("discrete: sample among the k most likely ids"))  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {self.num_steps!r}")
        if not self.cfg >= 1.0:
            raise ValueError(f"cfg must be >= 1 (1 = no guidance); got {self.cfg!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")
        if not self.choice_temperature >= 0:
            raise ValueError(f"choice_temperature must be >= 0; got {self.choice_temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive int; got {self.top_k!r}")


@dataclass(kw_only=True, slots=True)
class FluidConfig:
    """One Fluid model. Children's configs are held whole; the switches pick the variant.

    The token grid is ``backbone.grid`` (the trunk owns its positions); ``grid`` and
    ``num_tokens`` read it.
    """

    tokens: TokenKind = field(default="continuous", metadata=_help("variant: token kind"))
    order: Order = field(default="random", metadata=_help("variant: generation order"))
    backbone: TransformerConfig  # the trunk, and the token grid (rows, cols) in raster order
    aligner: AlignerConfig  # text aligner at the trunk width, input = the T5 width
    diffloss: DiffLossConfig = field(default_factory=DiffLossConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    token_dim: int | None = 16  # continuous: channels per token (SD-VAE 4 ch x 2x2 patch)
    vocab_size: int | None = 8192  # discrete: codebook size
    image_size: int = 256  # pixels of the images the tokenizer encodes
    text_encoder: TextEncoderLayout = "t5-v1_1-xxl"  # the frozen encoder feeding the aligner
    text_length: int = 128  # max text tokens (T5 max length); sizes FLOP counts and preprocessing
    text_drop_prob: float = 0.1  # captions replaced by the null text (for CFG)

    def __post_init__(self) -> None:
        check_choices(self)
        for name, cls in (
            ("backbone", TransformerConfig),
            ("aligner", AlignerConfig),
            ("diffloss", DiffLossConfig),
            ("generation", GenerationConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"FluidConfig.{name} must be a {cls.__name__}; got {type(getattr(self, name)).__name__}"
                )
        if self.aligner.width != self.backbone.width:
            raise ValueError(
                f"aligner.width ({self.aligner.width}) must equal backbone.width ({self.backbone.width})"
            )
        if self.tokens == "continuous" and not (self.token_dim and self.token_dim > 0):
            raise ValueError(f"continuous tokens need token_dim > 0; got {self.token_dim!r}")
        if self.tokens == "discrete" and not (self.vocab_size and self.vocab_size > 1):
            raise ValueError(f"discrete tokens need vocab_size > 1; got {self.vocab_size!r}")
        if not 0.0 <= self.text_drop_prob <= 1.0:
            raise ValueError(f"text_drop_prob must be in [0, 1]; got {self.text_drop_prob!r}")
        if self.text_length < 1:
            raise ValueError(f"text_length must be >= 1; got {self.text_length!r}")

    @property
    def variant(self) -> str:
        """``"random-continuous"`` (Fluid), ``"raster-discrete"``, ... (DESIGN.md §1)."""
        return f"{self.order}-{self.tokens}"

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (rows, cols): the trunk's ``backbone.grid``."""
        return self.backbone.grid

    @property
    def num_tokens(self) -> int:
        return self.backbone.num_tokens

    @property
    def width(self) -> int:
        return self.backbone.width

    @property
    def text_dim(self) -> int:
        return self.aligner.text_dim

    def check_frozen_parts(
        self, *, tokenizer: Any = None, text_width: int | None = None, where: str = ""
    ) -> None:
        """Raise ValueError unless a tokenizer ``spec`` (kind, grid, token_dim / vocab_size) and
        a T5 width fit this model; ``where`` names them in the message (e.g. their paths)."""
        at = f" {where}" if where else ""
        if tokenizer is not None:

            def describe(kind: str, token_dim: int | None, vocab: int | None) -> str:
                size = f"{token_dim} channels" if kind == "continuous" else f"{vocab} codes"
                return f"{kind} tokens ({size})"

            theirs = describe(tokenizer.kind, tokenizer.token_dim, tokenizer.vocab_size)
            ours = describe(self.tokens, self.token_dim, self.vocab_size)
            if theirs != ours or tuple(tokenizer.grid) != self.grid:
                raise ValueError(
                    f"tokenizer{at} gives {theirs} on a {tuple(tokenizer.grid)} grid; the model "
                    f"expects {ours} on {self.grid}"
                )
        if text_width is not None and text_width != self.text_dim:
            raise ValueError(
                f"text encoder{at} has width {text_width}; the model's aligner expects "
                f"{self.text_dim}"
            )

    def replace(self, **overrides: Any) -> FluidConfig:
        """A copy with fields replaced; ``"child.field"`` keys reach into a child config.

        ``cfg.replace(tokens="discrete", **{"backbone.depth": 2, "generation.cfg": 4.0})``
        """
        return config_from_dict(FluidConfig, with_overrides(dataclasses.asdict(self), overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, with the layout's ``_format``, as ``config.json`` stores them."""
        return {"_format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FluidConfig:
        """Read :meth:`to_dict`'s values, or a saved config of an earlier format."""
        data = dict(data)
        version = data.pop("_format", 1)
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        if version == 1:
            data = _upgrade_format_1(data)
        elif version != CONFIG_FORMAT:
            raise ValueError(
                f"model config format {version!r} is newer than this fluid-train reads "
                f"(format {CONFIG_FORMAT}); upgrade fluid-train"
            )
        return config_from_dict(cls, data)


def _upgrade_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the grid at the top level and ``backbone.num_tokens`` beside it."""
    backbone = dict(data.get("backbone", {}))
    grid = data.pop("grid", None) or backbone.get("grid")
    num_tokens = backbone.pop("num_tokens", None)
    if grid is None and num_tokens is not None:
        side = math.isqrt(num_tokens)
        grid = (side, side) if side * side == num_tokens else (1, num_tokens)
    if grid is not None:
        backbone["grid"] = list(grid)
        if num_tokens is not None and grid[0] * grid[1] != num_tokens:
            raise ValueError(
                f"saved model config: grid {list(grid)} does not hold backbone.num_tokens "
                f"{num_tokens}"
            )
    data["backbone"] = backbone
    return data


# ---------------------------------------------------------------------------------- training


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW and gradient clipping."""

    lr: float = field(default=1e-4, metadata=_help("peak learning rate, absolute (not batch-scaled)", flag="--lr"))  # fmt: skip
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = field(default=0.02, metadata=_help("AdamW weight decay", flag="--weight-decay"))  # fmt: skip
    # MAR's value; the paper clips but does not say at what.
    grad_clip: float | None = field(default=3.0, metadata=_help("max global grad norm (0 = off)", flag="--grad-clip"))  # fmt: skip

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON/TOML give lists
        if self.grad_clip == 0:
            self.grad_clip = None
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a finite number > 0; got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1); got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0, 0 or None (off); got {self.grad_clip}")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Linear warmup from lr/warmup to lr, then ``decay`` (the paper: constant)."""

    warmup_steps: int = field(default=65_000, metadata=_help("linear warmup steps", flag="--warmup"))  # fmt: skip
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0; got {self.warmup_steps}")
        check_choices(self, where="schedule.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training data comes from and how it is read (see fluid_train.data)."""

    shards: list[str] = field(default_factory=list, metadata=_help("shards: paths, dirs, globs, {a..b}, URLs", flag="--data", metavar="SHARDS"))  # fmt: skip
    kind: Literal["auto", "images", "encoded"] = "auto"  # raw img2dataset or `fluid preprocess`
    shuffle_buffer: int = field(default=1000, metadata=_help("shuffle buffer in samples (0 = shard order)"))  # fmt: skip
    num_workers: int = field(default=0, metadata=_help("data decoding processes per host"))
    text_length: int | None = field(default=None, metadata=_help("T5 padding length for image shards (default: the encoder's max)"))  # fmt: skip
    # Encoded shards up to this many MiB per host (their bytes in the tar) are kept in memory,
    # decoded, after their first epoch (0: every epoch reads the shards again).
    memory_mb: float = field(default=0, metadata=_help("encoded shards: MiB per host kept in memory after the first epoch"))  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if self.shuffle_buffer < 0 or self.num_workers < 0 or self.memory_mb < 0:
            raise ValueError(
                "data.shuffle_buffer, data.num_workers and data.memory_mb must be >= 0; "
                f"got {self.shuffle_buffer}, {self.num_workers} and {self.memory_mb}"
            )


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Device layout on the xla (SPMD) and fsdp (FSDP2) backends (see fluid_train.parallelize)."""

    # xla: slices on the `data` axis (None = slice count); fsdp: HSDP replicate groups, the
    # first axis of a (replicate, shard) mesh (None = the node count; 1 = plain FSDP).
    dcn_data_parallelism: int | None = field(default=None, metadata=_help("xla: slices on the data axis (default: the slice count); fsdp: HSDP replica groups (default: the node count; 1 = plain FSDP)"))  # fmt: skip
    activation_checkpointing: Literal["none", "block"] = field(default="none", metadata=_help("recompute blocks in the backward pass"))  # fmt: skip
    compile: bool = field(default=False, metadata=_help("fsdp: torch.compile each transformer block"))  # fmt: skip
    dist_timeout_s: float = field(default=600.0, metadata=_help("fsdp: seconds a rank waits on its peers before failing", flag="--dist-timeout", metavar="S"))  # fmt: skip

    def __post_init__(self) -> None:
        if self.dcn_data_parallelism is not None and self.dcn_data_parallelism < 1:
            raise ValueError(
                f"parallel.dcn_data_parallelism must be >= 1; got {self.dcn_data_parallelism}"
            )
        if not self.dist_timeout_s > 0:
            raise ValueError(f"parallel.dist_timeout_s must be > 0; got {self.dist_timeout_s}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one training run needs. ``fluid_train.trainer.train(config)`` runs it.

    ``model`` is the model to train; left out, it is the ``preset``'s. ``from_dict`` also takes
    ``model`` as overrides of the preset (``{"backbone": {"depth": 4}}`` or
    ``{"backbone.depth": 4}``), as config files and ``fluid train --model`` give it.
    """

    out: str = field(metadata=_help("run directory", flag="--out", metavar="RUN"))
    preset: str = field(default="debug", metadata=_help("model preset (fluid info lists them)"))
    model: FluidConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str | None = field(default=None, metadata=_help("saved tokenizer dir (image shards; pipeline export)", metavar="DIR"))  # fmt: skip
    text_encoder: str | None = field(default=None, metadata=_help("saved T5 encoder dir (image shards; pipeline export)", metavar="DIR"))  # fmt: skip
    steps: int = field(default=1_000_000, metadata=_help("total optimizer steps"))
    batch_size: int = field(default=2048, metadata=_help("global batch (all devices, all hosts) of one forward/backward"))  # fmt: skip
    grad_accum: int = field(default=1, metadata=_help("micro-batches of --batch-size per optimizer step", metavar="K"))  # fmt: skip
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema_decay: float = field(default=0.9999, metadata=_help("EMA decay per step"))
    precision: Precision = field(default="auto", metadata=_help("autocast (auto: bf16 on accelerators, fp32 on CPU)"))  # fmt: skip
    backend: Backend = field(default="auto", metadata=_help("auto: xla on a TPU host, fsdp under torchrun with >1 rank, else eager"))  # fmt: skip
    device: str | None = field(default=None, metadata=_help("eager device: cpu, cuda, cuda:1 (default: cuda if available)"))  # fmt: skip
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = field(default=0, metadata=_help("seed of the weights, data order and training noise"))  # fmt: skip
    log_every: int = field(default=100, metadata=_help("steps between metrics lines"))
    ckpt_every: int = field(default=5000, metadata=_help("steps between checkpoints"))
    # A wall-clock budget: the run ends at the first step boundary past it and finishes as at
    # ``steps`` (checkpoint, export); the schedule keeps ``steps`` as its length.
    time_limit_s: float | None = field(default=None, metadata=_help("stop after this many seconds of training, then checkpoint and export as at the end", flag="--time-limit", metavar="S"))  # fmt: skip
    keep_checkpoints: int = field(default=3, metadata=_help("checkpoints kept on disk"))
    resume: bool = field(default=False, metadata=_help("continue RUN from its latest checkpoint"))
    export: bool = field(default=True, metadata=_help("export RUN/pipeline from the EMA weights at the end"))  # fmt: skip
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        from .presets import get_preset

        _check_positive(self, "steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints")  # fmt: skip
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 seconds or None; got {self.time_limit_s}")
        check_choices(self)
        if self.model is None:
            self.model = get_preset(self.preset)
        elif not isinstance(self.model, FluidConfig):
            raise TypeError(
                f"TrainConfig.model must be a FluidConfig (e.g. get_preset(name, ...)); got "
                f"{type(self.model).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from nested plain values; unknown keys are an error naming the key."""
        from .presets import get_preset

        values = dict(values)
        model = values.pop("model", None)
        config = config_from_dict(cls, values)
        if model is None:
            return config
        if not isinstance(model, Mapping):
            raise ValueError(f"model must be a table of FluidConfig fields; got {model!r}")
        if "_format" in model:  # a whole saved model config
            config.model = FluidConfig.from_dict(model)
        else:  # overrides of the preset
            config.model = get_preset(config.preset).replace(**dict(model))
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a ``.json`` or ``.toml`` file; ``overrides`` (nested dicts merge) win."""
        return cls.from_dict(merge(load_config_file(path), overrides))


# ---------------------------------------------------------------------------------- preprocess


@dataclass(kw_only=True, slots=True)
class PreprocessOptions:
    """How ``fluid_train.preprocess.preprocess`` encodes image shards (``fluid preprocess``'s
    flags): the inputs, the output and the share of the work are its arguments."""

    image_size: int | None = field(default=None, metadata=_help("resize/crop size (default: the tokenizer's)", metavar="PX"))  # fmt: skip
    pad_to: int | None = field(default=None, metadata=_help("training text length L (default: the encoder's max length)", metavar="L"))  # fmt: skip
    batch_size: int = field(default=32, metadata=_help("images per encoder call, per host on xla (rounded up to a multiple of its devices)", metavar="N"))  # fmt: skip
    device: str | None = field(default=None, metadata=_help("cpu, cuda, cuda:I or xla (default: xla on a TPU host, else cuda if available)"))  # fmt: skip
    precision: Precision = field(default="auto", metadata=_help("encoder weights (auto: bf16 on accelerators, fp32 on CPUs)"))  # fmt: skip
    shard_weights: bool | None = field(default=None, metadata=_help("shard the encoders over the xla devices (default: when they take more than half of one device's memory)"))  # fmt: skip
    text_dtype: TextDtype = field(default="float16", metadata=_help("dtype of the stored T5 states"))  # fmt: skip
    text_storage: TextStorage = field(default="trimmed", metadata=_help("store T5 states at the caption's length, or padded to --pad-to"))  # fmt: skip
    overwrite: bool = field(default=False, metadata=_help("re-encode shards that exist"))

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size")
        _check_positive(self, "image_size", "pad_to", optional=True)
        check_choices(self)
