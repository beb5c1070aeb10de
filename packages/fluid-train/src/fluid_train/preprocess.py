"""Encode image shards once into token + text-state shards (``fluid preprocess``, DESIGN.md §8).

The frozen parts — the image tokenizer and T5 — never need to run inside the training step:
this module runs them once over the data and writes webdataset shards that ``TrainLoader``
reads as ``encoded`` data. The same ``FrozenEncoders`` also serve training directly on image
shards (on the training device, outside the step, under ``no_grad``).

One output shard per input shard (same name), written to a temp file and renamed, so an
interrupted run resumes by skipping finished shards and several hosts can split the work with
``part=(k, n)``. Per sample::

    {key}.tokens.npy       VQ ids [N] int32, or the SD-VAE posterior mean [N, C] float32
    {key}.tokens_std.npy   SD-VAE posterior std [N, C] float32 (training samples mean + std·ε)
    {key}.text.npy         T5 hidden states of the real tokens only, [n, D_t] (trimmed; or
                           [L, D_t] with text_storage="padded"); float16 by default, bfloat16
                           stored as its bit pattern in a uint16 array (numpy has no bfloat16)
    {key}.text_mask.npy    [L] bool, True = real token (its first n entries); L = pad_to
    {key}.txt              the caption

The loader pads trimmed states back to ``[L, D_t]`` with zeros — what padded storage holds —
so training batches are the same either way. ``preprocess.json`` beside the shards records the
token layout, text length, width and storage, bytes per sample and the skip counts.

Where the encoders run (``EncodeRuntime``): the first CUDA device, or ``cuda:LOCAL_RANK`` under
``torchrun`` (one rank per GPU, each its own part: ``part`` from ``RANK``/``WORLD_SIZE``), or
every device of a torch_xla host through SPMD (the batch sharded over the devices; hosts are
parts, from the runtime's process index and count, and run in lockstep). bf16 on accelerators,
fp32 on CPUs unless asked. The weights are replicated on every device when they take at most
half of one device's memory (T5-XXL in bf16, 9.5 GB: TPU v4/v5p/v6e, GPUs of 24 GB or more),
else sharded over the xla mesh (TPU v5e, 16 GB); a GPU too small for them is refused.
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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import write_json_atomic
from .config import PreprocessOptions, TextDtype, TextStorage, replace_given
from .data import (
    SKIP_REASONS,
    SkipSample,
    decode_image_sample,
    describe_skips,
    expand_shards,
    iter_raw_samples,
    write_shard,
)
from .encoders import (  # noqa: F401 - re-exported: the names of this module's API
    EncodeRuntime,
    FrozenEncoders,
    compile_xla_encode,
    encoders_fit,
    load_text_encoder,
    load_tokenizer,
    text_encoder_width,
)

__all__ = [
    "EncodeRuntime",
    "FrozenEncoders",
    "PreprocessOptions",
    "PreprocessResult",
    "compile_xla_encode",
    "encoded_sample",
    "encoders_fit",
    "load_text_encoder",
    "load_tokenizer",
    "merge_manifests",
    "text_encoder_width",
    "preprocess",
]

logger = logging.getLogger(__name__)

PREPROCESS_FILE = "preprocess.json"


# ---------------------------------------------------------------------- the command


@dataclass(slots=True)
class PreprocessResult:
    out: Path
    shards: list[Path]  # written by this call
    reused: list[Path]  # already complete, skipped
    samples: int  # encoded by this call
    skipped: dict[str, int] = field(default_factory=dict)  # by reason, this call
    bytes_per_sample: float = 0.0  # mean stored bytes of a sample's entries, this call
    part: tuple[int, int] = (0, 1)  # the share this process encoded


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _text_array(hidden: np.ndarray | Tensor, dtype: TextDtype) -> np.ndarray:
    """``[n, D_t]`` states as stored: float16/float32, or bfloat16 bits in a uint16 array."""
    if dtype == "bfloat16":
        tensor = torch.as_tensor(np.asarray(hidden, dtype=np.float32)).to(torch.bfloat16)
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"text_dtype must be float16, bfloat16 or float32; got {dtype!r}")
    return np.asarray(hidden).astype(np.dtype(dtype))


def encoded_sample(
    key: str,
    *,
    tokens: np.ndarray,
    text_hidden: np.ndarray,
    text_mask: np.ndarray,
    token_std: np.ndarray | None = None,
    caption: str | None = None,
    text_dtype: TextDtype = "float16",
    text_storage: TextStorage = "trimmed",
) -> dict[str, Any]:
    """One sample of an encoded shard (the layout ``TrainLoader`` reads as ``encoded``).

    tokens ``[N]`` ids (stored int32) or ``[N, C]`` means (float32); token_std ``[N, C]``;
    text_hidden ``[L, D_t]`` (stored as ``text_dtype``; ``trimmed``: only its first n rows, n
    the real tokens of text_mask ``[L]`` bool, which must be a True prefix).
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(text_mask).astype(bool)
    hidden = np.asarray(text_hidden)
    if text_storage == "trimmed":
        real = int(mask.sum())
        if not mask[:real].all():
            raise ValueError(
                f"sample {key}: text_mask {mask.astype(int).tolist()} is not a prefix of real "
                "tokens; trimmed storage keeps the first rows only (use text_storage='padded')"
            )
        hidden = hidden[:real]
    elif text_storage != "padded":
        raise ValueError(f"text_storage must be 'trimmed' or 'padded'; got {text_storage!r}")
    discrete = np.issubdtype(tokens.dtype, np.integer)
    sample: dict[str, Any] = {
        "__key__": key,
        "tokens.npy": _npy(tokens.astype(np.int32 if discrete else np.float32)),
        "text.npy": _npy(_text_array(hidden, text_dtype)),
        "text_mask.npy": _npy(mask),
    }
    if token_std is not None:
        sample["tokens_std.npy"] = _npy(np.asarray(token_std).astype(np.float32))
    if caption is not None:
        sample["txt"] = caption
    return sample


def sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes of a sample's entries (the tar adds a 512-byte header per entry and pads each
    entry to 512 bytes)."""
    return sum(
        len(v.encode() if isinstance(v, str) else v)
        for k, v in sample.items()
        if not k.startswith("__")
    )


def _shard_name(url: str) -> str:
    name = url.rstrip("/").split("/")[-1].split("?")[0]
    if name.startswith("pipe:"):
        name = name.split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


def _encode_shard(
    url: str,
    encoders: FrozenEncoders,
    runtime: EncodeRuntime,
    *,
    image_size: int,
    skips: Counter[str],
    stats: Counter[str],
    text_dtype: TextDtype,
    text_storage: TextStorage,
    progress: Callable[[int], None] | None,
) -> Iterator[dict[str, Any]]:
    """The encoded samples of one image shard, in shard order; bad samples counted in skips,
    stored bytes in ``stats``."""

    def encode(batch: list[tuple[str, Tensor, str]]) -> Iterator[dict[str, Any]]:
        images = torch.stack([image for _, image, _ in batch])  # [B, 3, S, S]
        names = [f"shard {url} sample {key}" for key, _, _ in batch]
        inputs = encoders.host_inputs(images, [caption for _, _, caption in batch], names)
        arrays = runtime.encode(encoders, inputs)
        for i, (key, _, caption) in enumerate(batch):
            sample = encoded_sample(
                key,
                tokens=arrays["tokens"][i],
                token_std=arrays["token_std"][i] if "token_std" in arrays else None,
                text_hidden=arrays["text_hidden"][i],
                text_mask=arrays["text_mask"][i],
                caption=caption,
                text_dtype=text_dtype,
                text_storage=text_storage,
            )
            stats["bytes"] += sample_bytes(sample)
            stats["text_bytes"] += len(sample["text.npy"])
            stats["text_tokens"] += int(arrays["text_mask"][i].sum())
            yield sample
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
        if len(batch) == runtime.rows:
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
    options: PreprocessOptions | None = None,
    part: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> PreprocessResult:
    """Encode image shards ``data`` into ``out``; see the module docstring for the layout.

    ``options`` (a ``PreprocessOptions``, default its defaults) with ``overrides`` of its fields
    applied (``pad_to=24, device="cpu"``): ``image_size`` defaults to the tokenizer's; ``pad_to``
    (the training text length L) to the text encoder's max length; ``batch_size`` is images per
    encoder call (on xla per host, rounded up to a multiple of its devices);
    ``device``/``precision``/``shard_weights``: see ``EncodeRuntime``. ``part=(k, n)`` encodes
    every n-th input shard starting at k (one job's share), split again over torchrun ranks or
    xla hosts, whose part is read from the runtime.
    """
    if isinstance(overrides.get("device"), torch.device):
        overrides["device"] = str(overrides["device"])  # the options hold a device's name
    o = replace_given(options or PreprocessOptions(), overrides, what="preprocess option")
    runtime = EncodeRuntime(
        o.device,
        precision=o.precision,
        batch_size=o.batch_size,
        part=part,
        shard_weights=o.shard_weights,
    )
    k, n = runtime.part
    # Loaded on the CPU, then cast and placed by the runtime (replicated or sharded).
    if not isinstance(tokenizer, nn.Module):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(text_encoder, nn.Module):
        text_encoder = load_text_encoder(text_encoder)
    spec = tokenizer.spec
    size = o.image_size or spec.image_size
    length = o.pad_to or text_encoder.max_length
    encoders = runtime.place(FrozenEncoders(tokenizer, text_encoder, text_length=length))

    urls = expand_shards(data)
    names = [_shard_name(u) for u in urls]
    duplicates = sorted(name for name, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(
            f"input shards share output names {duplicates[:3]}; give shards unique file names"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult(out=out, shards=[], reused=[], samples=0, part=(k, n))
    totals: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for url, name in list(zip(urls, names, strict=True))[k::n]:
        target = out / name
        if target.is_file() and not o.overwrite:
            result.reused.append(target)
            continue
        skips: Counter[str] = Counter()
        written = write_shard(
            target,
            _encode_shard(
                url, encoders, runtime, image_size=size, skips=skips, stats=stats,
                text_dtype=o.text_dtype, text_storage=o.text_storage, progress=progress,
            ),
        )  # fmt: skip
        if sum(skips.values()):
            logger.warning(describe_skips(url, dict(skips)))
        totals.update(skips)
        result.shards.append(target)
        result.samples += written
    runtime.finish(encoders)
    result.skipped = {reason: totals.get(reason, 0) for reason in SKIP_REASONS}
    samples = max(result.samples, 1)
    result.bytes_per_sample = stats["bytes"] / samples
    # What padded storage of the same states would take (float16/bf16: 2 bytes per value).
    width = int(text_encoder.dim)
    padded_text = len(_npy(_text_array(np.zeros((length, width), np.float32), o.text_dtype)))
    manifest = {
        "format": 2,
        "tokens": {
            "kind": spec.kind,
            "grid": list(spec.grid),
            "token_dim": spec.token_dim,
            "vocab_size": spec.vocab_size,
            "image_size": size,
            "posterior_std": spec.kind == "continuous",
        },
        "text": {
            "length": length,
            "dim": width,
            "dtype": o.text_dtype,
            "storage": o.text_storage,
            "bf16_as": "uint16 bit pattern" if o.text_dtype == "bfloat16" else None,
        },
        "encoders": {
            "device": str(runtime.device),
            "dtype": str(runtime.dtype or torch.float32).removeprefix("torch."),
            "weights": "sharded" if runtime.sharded else "replicated",
        },
        "part": [k, n],
        "samples": result.samples,
        "skipped": result.skipped,
        "bytes": {
            "per_sample": result.bytes_per_sample,
            "text_per_sample": stats["text_bytes"] / samples,
            "text_per_sample_padded": padded_text if o.text_storage == "trimmed" else None,
            "mean_text_tokens": stats["text_tokens"] / samples,
            "total": stats["bytes"],
        },
        "source": list(urls),
    }
    write_json_atomic(
        out / (PREPROCESS_FILE if n == 1 else f"preprocess-{k}-of-{n}.json"), manifest
    )
    runtime.barrier()
    if n > 1 and runtime.process_index == 0 and runtime.process_count == n:
        try:  # every part has written its own (the barrier waited for them) ...
            merge_manifests(out, n)
        except FileNotFoundError as error:  # ... unless --out is not one shared filesystem
            logger.warning("preprocess.json not written: %s", error)
    return result


def merge_manifests(out: str | os.PathLike, parts: int) -> Path:
    """``preprocess-K-of-N.json`` of every part -> one ``preprocess.json`` (summed counts)."""
    out = Path(out)
    files = [out / f"preprocess-{k}-of-{parts}.json" for k in range(parts)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{out}: parts {missing[:3]} have not written their manifest")
    manifests = [json.loads(f.read_text()) for f in files]
    merged = dict(manifests[0])
    samples = sum(m["samples"] for m in manifests)
    merged["part"] = [0, 1]
    merged["parts"] = parts
    merged["samples"] = samples
    merged["skipped"] = {r: sum(m["skipped"].get(r, 0) for m in manifests) for r in SKIP_REASONS}
    total = sum(m["bytes"]["total"] for m in manifests)

    def weighted(key: str) -> float:  # a mean over parts, weighted by their samples
        return sum(m["bytes"][key] * m["samples"] for m in manifests) / max(samples, 1)

    merged["bytes"] = {
        **manifests[0]["bytes"],
        "per_sample": total / max(samples, 1),
        "text_per_sample": weighted("text_per_sample"),
        "mean_text_tokens": weighted("mean_text_tokens"),
        "total": total,
    }
    path = out / PREPROCESS_FILE
    write_json_atomic(path, merged)
    return path
