"""Encode image shards once into token + text-state shards (``fluid preprocess``, DESIGN.md §8).

The frozen parts — the image tokenizer and T5 — never need to run inside the training step:
this module runs them once over the data and writes webdataset shards that ``TrainLoader``
reads as ``encoded`` data. The same ``FrozenEncoders`` also serve training directly on image
shards (outside the compiled step, under ``no_grad``).

One output shard per input shard (same name), written to a temp file and renamed, so an
interrupted run resumes by skipping finished shards and several hosts can split the work with
``part=(k, n)``. Per sample::

    {key}.tokens.npy       VQ ids [N] int32, or the SD-VAE posterior mean [N, C] float32
    {key}.tokens_std.npy   SD-VAE posterior std [N, C] float32 (training samples mean + std·ε)
    {key}.text.npy         T5 hidden states [L, D_t] (float16 by default), L = pad_to
    {key}.text_mask.npy    [L] bool, True = real token
    {key}.txt              the caption

``preprocess.json`` beside the shards records the token layout, text length and width, and
the skip counts.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .data import (
    SKIP_REASONS,
    SkipSample,
    decode_image_sample,
    describe_skips,
    expand_shards,
    iter_raw_samples,
    write_json_atomic,
    write_shard,
)

__all__ = [
    "FrozenEncoders",
    "PreprocessResult",
    "encoded_sample",
    "load_text_encoder",
    "load_tokenizer",
    "text_encoder_width",
    "preprocess",
]

logger = logging.getLogger(__name__)

PREPROCESS_FILE = "preprocess.json"


# ---------------------------------------------------------------------- loading the parts


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """An ``SDVAETokenizer`` or ``VQTokenizer`` from a saved directory (diffusers layout; the
    class is read from ``config.json``'s ``_class_name``), or from a pipeline's ``tokenizer/``."""
    import fluid_tokenizers

    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "tokenizer"
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"tokenizer {root} has no config.json (a saved tokenizer dir)")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    classes = {"AutoencoderKL": "SDVAETokenizer", "VQModel": "VQTokenizer"}
    if class_name not in classes:
        raise ValueError(
            f"tokenizer {root}: config.json names {class_name!r}; expected AutoencoderKL "
            "(SD-VAE) or VQModel (VQ)"
        )
    tokenizer = getattr(fluid_tokenizers, classes[class_name]).from_pretrained(root)
    return tokenizer.to(device).eval().requires_grad_(False)


def load_text_encoder(
    path: str | os.PathLike,
    *,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The frozen ``T5TextEncoder`` of a saved directory (or a pipeline's ``text_encoder/``)."""
    from fluid_text import T5TextEncoder

    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "text_encoder"
    kwargs: dict[str, Any] = {"dtype": dtype}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return T5TextEncoder.from_pretrained(root, **kwargs).to(device)


def text_encoder_width(path: str | os.PathLike) -> int:
    """``d_model`` of a saved T5 encoder, read from its ``config.json`` (no weights loaded)."""
    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "text_encoder"
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"text encoder {root} has no config.json (a saved T5 encoder dir)")
    config = json.loads(config_file.read_text())
    if "d_model" not in config:
        raise ValueError(f"text encoder {config_file} has no d_model; expected a T5 config")
    return int(config["d_model"])


# ---------------------------------------------------------------------- encoding


class FrozenEncoders:
    """Images + captions -> the tensors of a training batch, with the frozen tokenizer and T5.

    Returns ``tokens`` ([B, N] ids or [B, N, C] posterior means), ``token_std`` (continuous
    tokenizers: the posterior std, so the training step samples a fresh token each time, as
    training on VAE samples does), ``text_hidden`` [B, L, D_t] float32 and ``text_mask`` [B, L]
    with L = ``text_length`` for every batch (fixed shapes).
    """

    def __init__(self, tokenizer: nn.Module, text_encoder: nn.Module, *, text_length: int) -> None:
        if text_length > text_encoder.max_length:
            raise ValueError(
                f"text_length {text_length} exceeds the text encoder's max_length "
                f"{text_encoder.max_length}"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_length = text_length
        self.spec = tokenizer.spec

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        images = images.to(self.device)
        if self.spec.kind == "discrete":
            return {"tokens": self.tokenizer.encode(images).long()}  # [B, N]
        moments = self.tokenizer.encode_moments(images)  # mean/std [B, N, C] float32
        return {"tokens": moments.mean.float(), "token_std": moments.std.float()}

    @torch.no_grad()
    def encode_captions(
        self, captions: Sequence[str], names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """``names`` (e.g. ``shard 00012.tar sample 000120003``) name the captions in warnings."""
        from .prompts import prompts_named

        with prompts_named(self.text_encoder, list(captions), names, limit=self.text_length):
            states = self.text_encoder.encode(list(captions), pad_to=self.text_length)
        return {"text_hidden": states.hidden.float(), "text_mask": states.mask.bool()}

    def __call__(
        self, images: Tensor, captions: Sequence[str], names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        return {**self.encode_images(images), **self.encode_captions(captions, names)}


# ---------------------------------------------------------------------- the command


@dataclass(slots=True)
class PreprocessResult:
    out: Path
    shards: list[Path]  # written by this call
    reused: list[Path]  # already complete, skipped
    samples: int  # encoded by this call
    skipped: dict[str, int] = field(default_factory=dict)  # by reason, this call


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encoded_sample(
    key: str,
    *,
    tokens: np.ndarray,
    text_hidden: np.ndarray,
    text_mask: np.ndarray,
    token_std: np.ndarray | None = None,
    caption: str | None = None,
    text_dtype: Literal["float16", "float32"] = "float16",
) -> dict[str, Any]:
    """One sample of an encoded shard (the layout ``TrainLoader`` reads as ``encoded``).

    tokens ``[N]`` ids (stored int32) or ``[N, C]`` means (float32); token_std ``[N, C]``;
    text_hidden ``[L, D_t]`` (stored as ``text_dtype``); text_mask ``[L]`` bool.
    """
    tokens = np.asarray(tokens)
    discrete = np.issubdtype(tokens.dtype, np.integer)
    sample: dict[str, Any] = {
        "__key__": key,
        "tokens.npy": _npy(tokens.astype(np.int32 if discrete else np.float32)),
        "text.npy": _npy(np.asarray(text_hidden).astype(np.dtype(text_dtype))),
        "text_mask.npy": _npy(np.asarray(text_mask).astype(bool)),
    }
    if token_std is not None:
        sample["tokens_std.npy"] = _npy(np.asarray(token_std).astype(np.float32))
    if caption is not None:
        sample["txt"] = caption
    return sample


def _shard_name(url: str) -> str:
    name = url.rstrip("/").split("/")[-1].split("?")[0]
    if name.startswith("pipe:"):
        name = name.split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


def _encode_shard(
    url: str,
    encoders: FrozenEncoders,
    *,
    image_size: int,
    batch_size: int,
    skips: Counter[str],
    text_dtype: Literal["float16", "float32"],
    progress: Callable[[int], None] | None,
) -> Iterator[dict[str, Any]]:
    """The encoded samples of one image shard, in shard order; bad samples counted in skips."""

    def encode(batch: list[tuple[str, Tensor, str]]) -> Iterator[dict[str, Any]]:
        images = torch.stack([image for _, image, _ in batch])  # [B, 3, S, S]
        names = [f"shard {url} sample {key}" for key, _, _ in batch]
        encoded = encoders(images, [caption for _, _, caption in batch], names)
        arrays = {name: t.cpu().numpy() for name, t in encoded.items()}
        for i, (key, _, caption) in enumerate(batch):
            yield encoded_sample(
                key,
                tokens=arrays["tokens"][i],
                token_std=arrays["token_std"][i] if "token_std" in arrays else None,
                text_hidden=arrays["text_hidden"][i],
                text_mask=arrays["text_mask"][i],
                caption=caption,
                text_dtype=text_dtype,
            )
        if progress is not None:
            progress(len(batch))

    batch: list[tuple[str, Tensor, str]] = []
    for raw in iter_raw_samples(url, skips):
        try:
            image, caption = decode_image_sample(raw, image_size)
        except SkipSample as skip:
            skips[skip.reason] += 1
            continue
        batch.append((raw["__key__"], image, caption))
        if len(batch) == batch_size:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def preprocess(
    data: str | Sequence[str],
    *,
    tokenizer: str | os.PathLike | nn.Module,
    text_encoder: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    image_size: int | None = None,
    pad_to: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    text_dtype: Literal["float16", "float32"] = "float16",
    part: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PreprocessResult:
    """Encode image shards ``data`` into ``out``; see the module docstring for the layout.

    ``image_size`` defaults to the tokenizer's; ``pad_to`` to the text encoder's max length.
    ``part=(k, n)`` encodes every n-th input shard starting at k (one host's share).
    """
    k, n = part
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"part must be (k, n) with 0 <= k < n; got {part}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not isinstance(tokenizer, nn.Module):
        tokenizer = load_tokenizer(tokenizer, device=device)
    if not isinstance(text_encoder, nn.Module):
        text_encoder = load_text_encoder(text_encoder, device=device)
    tokenizer.to(device)
    text_encoder.to(device)
    spec = tokenizer.spec
    size = image_size or spec.image_size
    length = pad_to or text_encoder.max_length
    encoders = FrozenEncoders(tokenizer, text_encoder, text_length=length)

    urls = expand_shards(data)
    names = [_shard_name(u) for u in urls]
    duplicates = sorted(name for name, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(
            f"input shards share output names {duplicates[:3]}; give shards unique file names"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult(out=out, shards=[], reused=[], samples=0)
    totals: Counter[str] = Counter()
    for url, name in list(zip(urls, names, strict=True))[k::n]:
        target = out / name
        if target.is_file() and not overwrite:
            result.reused.append(target)
            continue
        skips: Counter[str] = Counter()
        written = write_shard(
            target,
            _encode_shard(
                url, encoders, image_size=size, batch_size=batch_size, skips=skips,
                text_dtype=text_dtype, progress=progress,
            ),
        )  # fmt: skip
        if sum(skips.values()):
            logger.warning(describe_skips(url, dict(skips)))
        totals.update(skips)
        result.shards.append(target)
        result.samples += written
    result.skipped = {reason: totals.get(reason, 0) for reason in SKIP_REASONS}
    manifest = {
        "format": 1,
        "tokens": {
            "kind": spec.kind,
            "grid": list(spec.grid),
            "token_dim": spec.token_dim,
            "vocab_size": spec.vocab_size,
            "image_size": size,
            "posterior_std": spec.kind == "continuous",
        },
        "text": {"length": length, "dim": int(text_encoder.dim), "dtype": text_dtype},
        "part": [k, n],
        "samples": result.samples,
        "skipped": result.skipped,
        "source": list(urls),
    }
    write_json_atomic(
        out / (PREPROCESS_FILE if n == 1 else f"preprocess-{k}-of-{n}.json"), manifest
    )
    return result
