"""One sample at a time: shard lists, raw webdataset samples, decoding (images: center crop
and resize; encoded: tokens and T5 states, trimmed states padded back), skip reasons, and
writing shards. ``fluid_train.data`` builds the resumable training streams on top.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .atomic import atomic_file

__all__ = [
    "DataKind",
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "ShardEnd",
    "SkipSample",
    "center_crop_resize",
    "decode_encoded_sample",
    "decode_image_sample",
    "describe_skips",
    "detect_kind",
    "expand_shards",
    "image_to_tensor",
    "iter_raw_samples",
    "pad_text_states",
    "write_shard",
]

logger = logging.getLogger(__name__)

DataKind = Literal["images", "encoded"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Skip reasons -> how a log line names them ("3 unreadable images skipped").
SKIP_REASONS = {
    "unreadable_image": "unreadable images",
    "missing_image": "samples without an image",
    "missing_caption": "samples without a caption",
    "malformed": "malformed encoded samples",
    "read_error": "tar read errors",
}


@dataclass(frozen=True, slots=True)
class ShardEnd:
    """In a stream of raw samples: every sample of shard ``url`` has been yielded."""

    url: str


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a key of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------- shard lists


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from paths, directories (their ``*.tar``), globs, ``{000..099}`` brace
    patterns, ``::``-separated lists and any URL webdataset opens (``pipe:``, ``https://``,
    ``gs://`` through a pipe). Local paths must exist."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("data shards: got an empty list; expected paths, globs or URLs")
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            if _is_remote(url):
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"data shards: glob {url!r} matches no file")
                urls.extend(found)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"data shards: directory {url!r} holds no *.tar file")
                urls.extend(found)
            elif os.path.isfile(url):
                urls.append(url)
            else:
                raise FileNotFoundError(f"data shards: {url!r} does not exist")
    return urls


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def iter_raw_samples(url: str, skips: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard as ``{"__key__", "__url__", ext: bytes}`` dicts.

    Read errors (a truncated tar, a shard that cannot be opened) are counted in ``skips`` under
    ``read_error`` and end or skip the damaged part; they never raise.
    """

    def handler(error: Exception) -> bool:
        if skips is not None:
            skips["read_error"] += 1
        logger.warning("shard %s: read error skipped (%s)", url, error)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=handler)


def detect_kind(urls: Sequence[str]) -> DataKind:
    """``encoded`` when the first sample has ``tokens.npy``, else ``images``."""
    for url in urls[:3]:
        for sample in iter_raw_samples(url):
            return "encoded" if "tokens.npy" in sample else "images"
    raise ValueError(f"data shards {list(urls[:3])} hold no readable sample")


# ---------------------------------------------------------------------- decoding


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (used by MAR): halve with a box filter while the short side is
    at least 2·size, bicubic-resize the short side to ``size``, crop the center square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float ``[3, H, W]`` in ``[-1, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3] in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)  # [3, H, W]


def _caption(sample: dict[str, Any]) -> str:
    text = sample.get("txt")
    if text is None and "json" in sample:
        try:
            text = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            text = None
        if text is not None and not isinstance(text, str):
            text = None
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    text = (text or "").strip()
    if not text:
        raise SkipSample("missing_caption", sample.get("__key__", "?"))
    return text


def decode_image_sample(sample: dict[str, Any], image_size: int) -> tuple[Tensor, str]:
    """img2dataset sample -> (image ``[3, S, S]`` in ``[-1, 1]``, caption); raises SkipSample."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SkipSample("missing_image", sample.get("__key__", "?"))
    caption = _caption(sample)
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.load()
            image = center_crop_resize(image.convert("RGB"), image_size)
    except Exception as error:  # PIL raises many types for corrupt data
        raise SkipSample("unreadable_image", f"{sample.get('__key__', '?')}: {error}") from None
    return image_to_tensor(image), caption


def decode_encoded_sample(
    sample: dict[str, Any],
    expected: dict[str, tuple[int, ...]] | None = None,
    *,
    exact: bool = False,
    pad: bool = True,
) -> dict[str, Tensor]:
    """``fluid preprocess`` sample -> tensors ``tokens``, ``text_hidden`` (float32),
    ``text_mask`` (bool), optionally ``token_std``; raises SkipSample("malformed").

    ``expected`` maps names to shapes (``-1`` = any size); a mismatch is malformed, since it
    would change the compiled step's shapes. ``text_hidden`` is checked at its padded shape
    ``[L, D_t]`` (L = the mask's length), whether stored trimmed or padded. ``exact``: the
    sample must have exactly the entries ``expected`` names (how a stream holds every sample to
    its first one). ``pad=False`` leaves trimmed states at ``[n, D_t]`` (``pad_text_states``
    pads them later, e.g. at collation, so samples kept in memory stay small).
    """
    key = sample.get("__key__", "?")
    try:
        arrays = {
            "tokens": _load_npy(sample["tokens.npy"]),
            "text_hidden": _load_npy(sample["text.npy"]),
            "text_mask": _load_npy(sample["text_mask.npy"]),
        }
        if "tokens_std.npy" in sample:
            arrays["token_std"] = _load_npy(sample["tokens_std.npy"])
    except (KeyError, ValueError, OSError) as error:
        raise SkipSample("malformed", f"{key}: {error}") from None
    hidden, mask = arrays["text_hidden"], arrays["text_mask"]
    if hidden.ndim != 2 or mask.ndim != 1 or hidden.shape[0] > mask.shape[0]:
        raise SkipSample(
            "malformed",
            f"{key}: text is {list(hidden.shape)} with a mask of {list(mask.shape)}; expected "
            "[n, D] states with n <= the mask's length",
        )
    real = hidden.shape[0]
    if real < mask.shape[0] and not (mask[:real].all() and not mask[real:].any()):
        raise SkipSample(
            "malformed", f"{key}: text is trimmed to {real} rows but the mask is not {real} x True"
        )
    shapes = {name: array.shape for name, array in arrays.items()}
    shapes["text_hidden"] = (mask.shape[0], hidden.shape[1])  # as padded
    if expected is not None:
        if exact and set(arrays) != set(expected):
            raise SkipSample(
                "malformed", f"{key}: entries {sorted(arrays)}, expected {sorted(expected)}"
            )
        for name, shape in shapes.items():
            want = expected.get(name)
            if want is None:
                continue
            if len(want) != len(shape) or any(
                e not in (-1, a) for e, a in zip(want, shape, strict=True)
            ):
                raise SkipSample(
                    "malformed", f"{key}: {name} is {list(shape)}, expected {list(want)}"
                )
    out = {}
    for name, array in arrays.items():
        if name == "tokens":
            dtype = np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
        elif name == "text_mask":
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=bool))
        elif name == "text_hidden" and array.dtype == np.uint16:  # bfloat16 bits
            bits = torch.from_numpy(np.ascontiguousarray(array).view(np.int16))
            tensor = bits.view(torch.bfloat16).float()
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        out[name] = tensor
    return pad_text_states(out) if pad else out


def pad_text_states(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Trimmed ``text_hidden`` ``[n, D_t]`` (or ``[B, n, D_t]``) zero-padded to the length of
    ``text_mask`` — exactly what a padded shard stores (T5TextEncoder zeroes padded rows)."""
    hidden, length = tensors["text_hidden"], tensors["text_mask"].shape[-1]
    missing = length - hidden.shape[-2]
    if missing == 0:
        return tensors
    pad = hidden.new_zeros((*hidden.shape[:-2], missing, hidden.shape[-1]))
    return {**tensors, "text_hidden": torch.cat([hidden, pad], dim=-2)}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def describe_skips(url: str, counts: dict[str, int]) -> str:
    """``shard data/00012.tar: 3 unreadable images skipped, 1 samples without a caption skipped``"""
    parts = [f"{n} {SKIP_REASONS.get(reason, reason)} skipped" for reason, n in counts.items() if n]
    return f"shard {url}: " + ", ".join(parts)



def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` (``{"__key__": ..., ext: bytes | str}``) as one webdataset tar,
    atomically (temp file, fsync, rename); returns the number written."""
    count = 0
    with atomic_file(path) as f, wds.TarWriter(f) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count
