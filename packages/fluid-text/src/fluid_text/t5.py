"""Frozen T5 text encoder: SentencePiece tokenization + ``transformers.T5EncoderModel``.

The paper conditions on T5-XXL encoder states (``google/t5-v1_1-xxl``, 4.76B encoder parameters),
prompts cut to 128 tokens. ``T5TextEncoder.from_pretrained(dir)`` reads that public layout from a
local directory (``spiece.model`` + ``config.json`` + PyTorch weights; a full encoder-decoder
checkpoint loads its encoder half). Nothing is ever downloaded: small worlds build their own
random T5 with ``build_random_t5``.

    size                 d_model  layers  heads  d_kv  d_ff   vocab  encoder params
    t5_v1_1_xxl_config   4096     24      64     64    10240  32128  4,762,310,656
    shapes_t5_config     64       2       4      16    128    512    ~0.1M
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import T5Config, T5EncoderModel

from .config import SHAPES_T5_SIZES, T5_V1_1_XXL_SIZES
from .spm import SPIECE_MODEL_NAME
from .states import TextStates

DEFAULT_MAX_LENGTH = 128
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder takes; its tail was cut."""


# ------------------------------------------------------------------------------------ presets


def _t5_v1_1_config(**sizes: int | float) -> T5Config:
    """A T5 v1.1 config (gated-GELU, untied embeddings, T5's id layout) of the given sizes."""
    return T5Config(
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **sizes,
    )


def t5_v1_1_xxl_config() -> T5Config:
    """The public ``google/t5-v1_1-xxl`` configuration (encoder: 4,762,310,656 parameters)."""
    return _t5_v1_1_config(**T5_V1_1_XXL_SIZES)


def shapes_t5_config(vocab_size: int = 512) -> T5Config:
    """A tiny T5 (d_model 64, 2 layers, ~0.1M parameters) for the shapes world and tests.

    ``vocab_size`` is the embedding size: at least the SentencePiece pieces plus T5's 100
    sentinel ids (``build_random_t5`` checks it).
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
    return _t5_v1_1_config(vocab_size=vocab_size, **SHAPES_T5_SIZES)


def count_t5_encoder_params(config: T5Config) -> int:
    """Parameters of ``T5EncoderModel(config)``, counted on the meta device (nothing allocated)."""
    if not isinstance(config, T5Config):
        raise TypeError(f"config must be a transformers.T5Config; got {type(config).__name__}")
    with torch.device("meta"):
        # T5EncoderModel edits the config it is given (use_cache, is_encoder_decoder): copy it.
        model = T5EncoderModel(copy.deepcopy(config))
    # parameters() yields the tied embedding (shared == encoder.embed_tokens) once.
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ encoder


class T5TextEncoder(nn.Module):
    """Prompts -> frozen T5 encoder states ``TextStates(hidden [B, L, d_model], mask [B, L])``.

    The T5 is frozen: no parameter requires grad and the module never leaves eval mode
    (``train()`` is a no-op), so it can sit inside a trainable model. Encoding runs under
    ``torch.no_grad`` (not inference mode: its outputs feed trainable layers that save their
    inputs for backward).
    """

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        super().__init__()
        if not isinstance(model, T5EncoderModel):
            raise TypeError(
                f"model must be a transformers.T5EncoderModel; got {type(model).__name__}"
            )
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file is None or not Path(vocab_file).is_file():
            raise ValueError(
                "tokenizer must be a T5 tokenizer loaded from a spiece.model "
                f"(tokenizer.vocab_file); got vocab_file={vocab_file!r}"
            )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} ids but the T5 embedding has only "
                f"{model.config.vocab_size} rows (config.vocab_size)"
            )
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer must define eos and pad tokens (T5 layout: eos 1, pad 0)")
        self.max_length = _check_positive_int("max_length", max_length)
        self.model = model
        self.tokenizer = tokenizer
        # Kept so save_pretrained can always write the public layout, even if the source is gone.
        self._spiece_model = Path(vocab_file).read_bytes()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    # -- loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike[str],
        subfolder: str | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype: torch.dtype | None = None,
    ) -> T5TextEncoder:
        """Load from a local directory in the public T5 layout.

        The directory holds ``spiece.model``, ``config.json`` and PyTorch weights
        (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded). ``dtype`` (e.g.
        ``torch.bfloat16``) loads the weights in that precision; None means float32 whatever
        the saved precision (transformers 4 and 5 have different defaults otherwise).
        """
        root = Path(path) / subfolder if subfolder else Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"T5 directory {root} does not exist")
        for name in (SPIECE_MODEL_NAME, "config.json"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"T5 directory {root} has no {name}")
        if not any((root / name).is_file() for name in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"T5 directory {root} has no PyTorch weights; expected one of {list(_WEIGHT_FILES)}"
            )
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None; got {dtype!r}")
        tokenizer = load_t5_tokenizer(root)
        # transformers 5 renamed torch_dtype to dtype.
        dtype_kwarg = {
            "dtype" if _TRANSFORMERS_MAJOR >= 5 else "torch_dtype": dtype or torch.float32
        }
        model = T5EncoderModel.from_pretrained(str(root), local_files_only=True, **dtype_kwarg)
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(self, path: str | PathLike[str]) -> None:
        """Write the public layout: ``config.json``, ``model.safetensors``, ``spiece.model``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        (out / SPIECE_MODEL_NAME).write_bytes(self._spiece_model)

    # -- properties

    @property
    def dim(self) -> int:
        """Width of the text states (T5's d_model)."""
        return int(self.model.config.d_model)

    @property
    def config(self) -> T5Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> T5TextEncoder:
        """Stays in eval mode whatever ``mode`` says: the T5 is frozen (dropout off)."""
        return super().train(False)

    # -- tokenization and encoding

    def tokenize(
        self,
        prompts: Sequence[str],
        *,
        pad_to: int | None = None,
        names: Sequence[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prompts -> ``(ids [B, L] int64, mask [B, L] bool)`` on the CPU.

        Each prompt gets T5's EOS appended and is cut to ``max_length`` tokens (EOS included)
        with a ``PromptTruncatedWarning`` naming it: ``prompt i`` of this call, or ``names[i]``
        (the caller's name for it, e.g. ``shard 00012.tar sample 000120003``). ``pad_to=None``
        pads to the longest prompt; ``pad_to=L`` gives exactly L columns (fixed shapes),
        cutting longer prompts to L.
        """
        return self._tokenize(prompts, pad_to, names=names, stacklevel=3)

    def _tokenize(
        self,
        prompts: Sequence[str],
        pad_to: int | None,
        *,
        stacklevel: int,
        names: Sequence[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        # stacklevel points the truncation warning at the caller's line, not at this package.
        _check_prompts(prompts)
        if names is not None and len(names) != len(prompts):
            raise ValueError(f"{len(names)} names for {len(prompts)} prompts")
        limit = self.max_length
        if pad_to is not None:
            limit = min(limit, _check_positive_int("pad_to", pad_to))
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        # Without special tokens and without truncation, so the full length can be reported.
        pieces = self.tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
        rows: list[list[int]] = []
        for index, ids in enumerate(pieces):
            num_tokens = len(ids) + 1  # + EOS
            if num_tokens > limit:
                if names is None:
                    name = f"prompt {index}"
                else:
                    text = prompts[index]
                    shown = text if len(text) <= 40 else text[:37] + "..."
                    name = f"{names[index]} ({shown!r})"
                warnings.warn(
                    f"{name} has {num_tokens} tokens; max is {limit} (truncated)",
                    PromptTruncatedWarning,
                    stacklevel=stacklevel,
                )
                ids = ids[: limit - 1]  # T5 keeps the EOS after cutting the text
            rows.append([*ids, eos])
        length = pad_to if pad_to is not None else max(len(row) for row in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(rows), length), dtype=torch.bool)  # [B, L]
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[index, : len(row)] = True
        return ids, mask

    def encode_ids(self, ids: Tensor, mask: Tensor) -> TextStates:
        """Token ids ``[B, L]`` + mask ``[B, L]`` (from ``tokenize``) -> frozen T5 states."""
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"ids must be an int64 [B, L] tensor; got {ids.dtype} {list(ids.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(
                f"mask must be a bool tensor shaped like ids {list(ids.shape)}; "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        ids, mask = ids.to(self.device), mask.to(self.device)
        attention: Tensor = mask.long()
        if ids.device.type == "xla" and _TRANSFORMERS_MAJOR >= 5:
            # transformers 5 reads a 2-D mask on the host (``mask.all()``, to skip it when
            # nothing is padded): a graph break every call on XLA. A ready additive 4-D mask
            # [B, 1, 1, L] is used as given, added to the position bias.
            blocked = torch.finfo(self.dtype).min
            additive = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
            attention = additive.masked_fill(~mask, blocked)[:, None, None, :]
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
        # Padded positions hold whatever T5 computed there; zero them so states are canonical.
        hidden = hidden.masked_fill(~mask[..., None], 0.0)  # [B, L, d_model]
        return TextStates(hidden=hidden, mask=mask)

    def encode(
        self,
        prompts: Sequence[str],
        *,
        pad_to: int | None = None,
        names: Sequence[str] | None = None,
    ) -> TextStates:
        """Prompts -> ``TextStates(hidden [B, L, d_model], mask [B, L])``; ``pad_to`` and
        ``names`` (the truncation warnings' names) as in ``tokenize``."""
        ids, mask = self._tokenize(prompts, pad_to, names=names, stacklevel=3)
        return self.encode_ids(ids, mask)

    def forward(self, prompts: Sequence[str], *, pad_to: int | None = None) -> TextStates:
        return self.encode(prompts, pad_to=pad_to)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_length={self.max_length}, vocab={len(self.tokenizer)}"


def load_t5_tokenizer(path: str | PathLike[str]) -> Any:
    """The ``transformers`` T5 tokenizer of a local directory holding ``spiece.model``.

    transformers 5 has a single (Rust-backed) ``T5Tokenizer``; 4.x calls it ``T5TokenizerFast``.
    Both convert ``spiece.model`` into the same ids as SentencePiece itself.
    """
    root = Path(path)
    if not (root / SPIECE_MODEL_NAME).is_file():
        raise FileNotFoundError(f"tokenizer directory {root} has no {SPIECE_MODEL_NAME}")
    tokenizer_cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    return tokenizer_cls.from_pretrained(str(root), local_files_only=True)


# ------------------------------------------------------------------------------ small worlds


def build_random_t5(
    out_dir: str | PathLike[str],
    *,
    spiece_model: str | PathLike[str],
    config: T5Config | None = None,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised T5 encoder + tokenizer in the public layout; return the dir.

    ``config=None`` uses ``shapes_t5_config`` with the embedding sized to the tokenizer
    (pieces + 100 sentinels, rounded up to a multiple of 128 as T5 does). The weights are a
    function of ``seed`` only; the global RNG state is left untouched.
    The result loads with ``T5TextEncoder.from_pretrained(out_dir)``.
    """
    source = Path(spiece_model)
    if not source.is_file():
        raise FileNotFoundError(f"spiece_model {source} does not exist")
    if config is not None and not isinstance(config, T5Config):
        raise TypeError(
            f"config must be a transformers.T5Config or None; got {type(config).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / SPIECE_MODEL_NAME
    if not (target.exists() and target.samefile(source)):
        target.write_bytes(source.read_bytes())
    tokenizer = load_t5_tokenizer(out)
    if config is None:
        config = shapes_t5_config(vocab_size=128 * math.ceil(len(tokenizer) / 128))
    elif len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"config.vocab_size {config.vocab_size} is smaller than the tokenizer of "
            f"{source} ({len(tokenizer)} ids incl. sentinels)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(copy.deepcopy(config))
    T5TextEncoder(model, tokenizer).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------- helpers


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _check_prompts(prompts: object) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str; got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; expected at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a str; got {type(prompt).__name__}")
