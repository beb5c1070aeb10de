"""Training data: webdataset shards, read deterministically, resumably and without ever failing
on a bad sample (DESIGN.md §8).

Two kinds of shards, told apart by their entries:

- ``images``: the img2dataset layout — ``{key}.jpg|jpeg|png|webp``, ``{key}.txt`` (the caption),
  optional ``{key}.json`` (its ``caption`` is used when ``.txt`` is missing). Images are center
  cropped and resized to the model resolution (ADM/MAR's ``center_crop_arr``) to ``[-1, 1]``.
- ``encoded``: written by ``fluid preprocess`` — ``{key}.tokens.npy`` (VQ ids ``[N]`` or the
  SD-VAE posterior mean ``[N, C]``), optional ``{key}.tokens_std.npy`` ``[N, C]``,
  ``{key}.text.npy`` (frozen T5 states), ``{key}.text_mask.npy`` ``[L]`` (L = the training text
  length). The states are stored trimmed, ``[n, D_t]`` for a caption of n real tokens (the
  mask's True prefix), and padded with zeros to ``[L, D_t]`` by the loader; shards written
  before trimming hold ``[L, D_t]`` and load as they are. float16, float32, or bfloat16 stored
  as its bit pattern in a ``uint16`` array (numpy has no bfloat16).
  Up to ``memory_mb`` of them (counted as their bytes in the tar; float16 text states take
  twice that once decoded to float32) are kept in memory, decoded, after their first epoch
  (small datasets: parsing the tar and the ``.npy`` entries again took a third of a demo step).

Order and resumption. The shards are split into ``hosts × max(workers, 1)`` logical streams.
Each stream is an endless, deterministic sequence: epoch ``e`` permutes the shard list with the
seed, takes every S-th shard, reads them in order through a seeded shuffle buffer. A stream's
position is (epoch, raw samples read in that epoch); resuming re-reads the stream up to that
point without decoding. Batches come from the streams round-robin (what a ``DataLoader`` with
workers does), so the position of the whole loader is the per-stream positions plus the number
of batches taken, and a resumed run sees exactly the batches the uninterrupted run would have.

Bad samples (an image PIL cannot decode, no caption, no image, a malformed encoded entry, a tar
read error) are skipped and counted per shard and reason; the trainer logs
``shard data/00012.tar: 3 unreadable images skipped`` and writes the totals to metrics.jsonl.
"""

from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import samples as _samples
from .samples import *  # noqa: F403 - re-exported: the sample-level API, as samples.__all__ lists it
from .samples import (  # what the streams here use
    SKIP_REASONS,
    DataKind,
    ShardEnd,
    SkipSample,
    decode_encoded_sample,
    decode_image_sample,
    describe_skips,
    detect_kind,
    expand_shards,
    iter_raw_samples,
    pad_text_states,
)

# The streams built here, and the sample-level API they re-export.
__all__ = ["HostBatch", "ShardDataset", "TrainLoader", *_samples.__all__]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- streams


@dataclass(slots=True)
class StreamState:
    """Where one logical stream stands: raw samples read in ``epoch``, and its skip counts."""

    epoch: int = 0
    offset: int = 0
    skips: dict[str, dict[str, int]] = field(default_factory=dict)  # shard -> reason -> n

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "skips": self.skips}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        skips = {url: dict(c) for url, c in data.get("skips", {}).items()}
        return cls(epoch=int(data["epoch"]), offset=int(data["offset"]), skips=skips)


@dataclass(slots=True)
class HostBatch:
    """One batch on the host plus where its stream stood after it (for resumption)."""

    tensors: dict[str, Tensor]  # images: "images" [B, 3, S, S]; encoded: tokens, text_*, ...
    captions: list[str] | None  # images only
    stream: int  # the logical stream that produced it
    state: StreamState  # that stream's state after this batch
    finished: list[tuple[str, dict[str, int]]]  # shards finished since its previous batch


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches from a set of logical streams; a DataLoader worker serves one stream.

    With ``num_workers = 0`` the process serves its single local stream. ``rotation`` maps
    worker ``w`` to local stream ``(w + rotation) % W`` so that a resumed DataLoader, which
    always starts at worker 0, continues the round-robin where the previous run stopped.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        kind: DataKind,
        batch_size: int,
        image_size: int,
        seed: int,
        shuffle_buffer: int,
        streams: Sequence[int],
        num_streams: int,
        states: dict[int, StreamState],
        rotation: int = 0,
        expected: dict[str, tuple[int, ...]] | None = None,
        memory_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.kind = kind
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.streams = list(streams)
        self.num_streams = num_streams
        self.states = states
        self.rotation = rotation
        self.expected = expected  # shapes with -1 wildcards, from the model
        self.fixed: dict[str, tuple[int, ...]] | None = None  # exact, from the first sample
        # Shards kept in memory after their first reading: url -> (samples, read errors). A
        # sample's tensors replace its bytes once decoded, so later epochs neither parse the
        # tar nor decode; the order of samples, and so of batches, is the same either way.
        self.memory_bytes = memory_bytes
        self._memory: dict[str, tuple[list[dict[str, Any]], Counter[str]]] = {}
        self._memory_used = 0
        # (url, key) -> the decoded sample (or its SkipSample) of a shard kept in memory
        self._decoded: dict[tuple[str, str], Any] = {}

    def __iter__(self) -> Iterator[HostBatch]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            if len(self.streams) != 1:
                raise RuntimeError(f"without workers one stream is served; got {self.streams}")
            local = 0
        else:
            if info.num_workers != len(self.streams):
                raise RuntimeError(f"{info.num_workers} workers for {len(self.streams)} streams")
            local = (info.id + self.rotation) % info.num_workers
        stream = self.streams[local]
        yield from self._batches(stream, self.states.get(stream, StreamState()))

    # A stream: one epoch of its shards through the seeded shuffle buffer. Yields raw samples
    # and, once every sample of a shard has left the buffer, that shard's ShardEnd.
    def _shuffled(self, stream: int, epoch: int, read_errors: dict[str, Counter[str]]):
        order = list(self.urls)
        random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        mine = order[stream :: self.num_streams]
        rng = random.Random(f"{self.seed}-samples-{epoch}-{stream}")
        buffer: list[dict[str, Any]] = []
        pending: Counter[str] = Counter()  # samples of a shard not yet yielded
        done: set[str] = set()  # shards read to the end

        def emit(sample: dict[str, Any]):
            yield sample
            url = sample["__url__"]
            pending[url] -= 1
            if pending[url] == 0 and url in done:
                yield ShardEnd(url)

        for url in mine:
            errors = read_errors.setdefault(url, Counter())
            for sample in self._shard_samples(url, errors):
                pending[url] += 1
                if self.shuffle_buffer <= 1:
                    yield from emit(sample)
                elif len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                else:
                    index = rng.randrange(len(buffer))
                    buffer[index], sample = sample, buffer[index]
                    yield from emit(sample)
            done.add(url)
            if pending[url] == 0:
                yield ShardEnd(url)
        rng.shuffle(buffer)
        for sample in buffer:
            yield from emit(sample)

    def _shard_samples(self, url: str, errors: Counter[str]) -> Iterator[dict[str, Any]]:
        """One shard's raw samples, from memory when an earlier epoch kept them."""
        if url in self._memory:
            samples, counts = self._memory[url]
            errors.update(counts)  # its read errors count again, as a re-read would count them
            yield from samples
            return
        keep: list[dict[str, Any]] | None = [] if self._memory_used < self.memory_bytes else None
        before = Counter(errors)
        size = 0
        for sample in iter_raw_samples(url, errors):
            sample["__url__"] = url
            if keep is not None:
                keep.append(sample)
                size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
            yield sample
        if keep is not None and self._memory_used + size <= self.memory_bytes:
            counts = Counter(errors)
            counts.subtract(before)
            self._memory[url] = (keep, +counts)
            self._memory_used += size

    def _batches(self, stream: int, start: StreamState) -> Iterator[HostBatch]:
        state = StreamState(epoch=start.epoch, offset=start.offset, skips=start.skips)
        items: list[Any] = []
        finished: list[tuple[str, dict[str, int]]] = []
        while True:
            read_errors: dict[str, Counter[str]] = {}
            resumed_at = state.offset
            position = valid = 0
            for raw in self._shuffled(stream, state.epoch, read_errors):
                if isinstance(raw, ShardEnd):
                    url = raw.url
                    if read_errors.get(url):
                        self._count(state, url, read_errors.pop(url))
                    if any(state.skips.get(url, {}).values()):
                        finished.append((url, dict(state.skips[url])))
                    continue
                # A full batch leaves only now, so that it reports the shards finished with it.
                if len(items) == self.batch_size:
                    yield self._collate(items, stream, state, finished)
                    items, finished = [], []
                position += 1
                if position <= resumed_at:
                    continue  # resuming: consumed by the run this one continues
                state.offset = position
                try:
                    items.append(self._decode_kept(raw))
                    valid += 1
                except SkipSample as skip:
                    self._count(state, raw["__url__"], Counter({skip.reason: 1}))
            if len(items) == self.batch_size:
                yield self._collate(items, stream, state, finished)
                items, finished = [], []
            if position == 0:
                raise RuntimeError(
                    f"data stream {stream} read no sample in epoch {state.epoch}: its shards are "
                    "empty or unreadable (see the log)"
                )
            if valid == 0 and position > resumed_at:
                raise RuntimeError(
                    f"data stream {stream} found no usable sample among {position} in epoch "
                    f"{state.epoch}; skipped: {state.skips}"
                )
            state = StreamState(epoch=state.epoch + 1, offset=0, skips=state.skips)

    @staticmethod
    def _count(state: StreamState, url: str, counts: Counter[str]) -> None:
        per_shard = state.skips.setdefault(url, {})
        for reason, n in counts.items():
            per_shard[reason] = per_shard.get(reason, 0) + n

    def _decode_kept(self, raw: dict[str, Any]) -> Any:
        """``_decode``, remembered (``self._decoded``) when the sample's shard is kept in memory."""
        sample = (raw["__url__"], raw["__key__"])
        if sample in self._decoded:
            result = self._decoded[sample]
        else:
            try:
                result = self._decode(raw)
            except SkipSample as skip:
                result = skip
            if raw["__url__"] in self._memory:
                self._decoded[sample] = result
                for name in [k for k in raw if not k.startswith("__")]:
                    del raw[name]  # the bytes are not needed again
        if isinstance(result, SkipSample):
            raise result
        return result

    def _decode(self, raw: dict[str, Any]) -> Any:
        if self.kind == "images":
            return decode_image_sample(raw, self.image_size)
        # Trimmed text states stay trimmed until collation (smaller in memory).
        if self.fixed is not None:
            return decode_encoded_sample(raw, self.fixed, exact=True, pad=False)
        tensors = decode_encoded_sample(raw, self.expected, pad=False)
        # The first sample fixes every entry and (padded) shape: fixed-shape batches.
        self.fixed = {name: tuple(t.shape) for name, t in pad_text_states(tensors).items()}
        return tensors

    def _collate(self, items, stream, state, finished) -> HostBatch:
        snapshot = StreamState(
            epoch=state.epoch,
            offset=state.offset,
            skips={url: dict(c) for url, c in state.skips.items()},
        )
        if self.kind == "images":
            images = torch.stack([image for image, _ in items])  # [B, 3, S, S]
            return HostBatch({"images": images}, [c for _, c in items], stream, snapshot, finished)
        items = [pad_text_states(item) for item in items]
        tensors = {name: torch.stack([item[name] for item in items]) for name in items[0]}
        return HostBatch(tensors, None, stream, snapshot, finished)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A SIGTERM/SIGINT sent to the whole process group (Ctrl-C, ``scancel``) must not kill the
    decoding workers under the trainer, which stops after a checkpoint and shuts them down
    (they also exit on their own when the main process dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _identity(batch: HostBatch) -> HostBatch:
    return batch


class TrainLoader:
    """Endless, resumable batches for one host: ``for batch in loader`` + ``commit(batch)``.

    ``commit`` marks a batch as trained on; ``state_dict`` describes the committed position
    only, so batches prefetched but not yet trained on are read again after a resume.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        image_size: int,
        kind: Literal["auto", "images", "encoded"] = "auto",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        host: int = 0,
        num_hosts: int = 1,
        expected: dict[str, tuple[int, ...]] | None = None,
        memory_mb: float = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0; got {memory_mb}")
        if not 0 <= host < num_hosts:
            raise ValueError(f"host must be in [0, {num_hosts}); got {host}")
        self.urls = expand_shards(shards)
        self.kind: DataKind = detect_kind(self.urls) if kind == "auto" else kind
        if self.kind not in ("images", "encoded"):
            raise ValueError(f"data kind must be 'auto', 'images' or 'encoded'; got {kind!r}")
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.expected = expected
        if memory_mb and self.kind != "encoded":
            raise ValueError(
                f"memory_mb={memory_mb}: only encoded shards (`fluid preprocess`) are kept in "
                f"memory; these shards hold {self.kind}"
            )
        self.memory_mb = memory_mb
        per_host = max(num_workers, 1)
        self.num_streams = num_hosts * per_host
        if len(self.urls) < self.num_streams:
            raise ValueError(
                f"data has {len(self.urls)} shard(s); {num_hosts} host(s) x {per_host} stream(s) "
                f"need at least {self.num_streams} (one per stream) — write more, smaller shards "
                "or use fewer workers"
            )
        self.streams = [host * per_host + i for i in range(per_host)]
        self.states: dict[int, StreamState] = {s: StreamState() for s in self.streams}
        self.batches = 0  # committed batches
        self._logged: dict[str, dict[str, int]] = {}

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[HostBatch]:
        dataset = ShardDataset(
            self.urls,
            kind=self.kind,
            batch_size=self.batch_size,
            image_size=self.image_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            streams=self.streams,
            num_streams=self.num_streams,
            states={s: StreamState.from_dict(st.to_dict()) for s, st in self.states.items()},
            rotation=self.batches % max(self.num_workers, 1),
            expected=self.expected,
            memory_bytes=int(self.memory_mb * 2**20) // len(self.streams),
        )
        if self.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=False,
            prefetch_factor=2,
            worker_init_fn=_leave_stop_signals_to_the_trainer,
            # Its own generator: creating the iterator draws the workers' base seed, which from
            # the global RNG would shift the training noise of a resumed run by one draw.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def commit(self, batch: HostBatch) -> None:
        """Record ``batch`` as trained on; log the skip counts of shards it reports finished."""
        self.states[batch.stream] = batch.state
        self.batches += 1
        for url, counts in batch.finished:
            if self._logged.get(url) != counts:
                logger.warning(describe_skips(url, counts))
                self._logged[url] = counts

    # -------------------------------------------------------------- counts and state

    def skip_totals(self) -> dict[str, int]:
        """Samples skipped so far by reason, summed over shards and streams (all reasons)."""
        totals = dict.fromkeys(SKIP_REASONS, 0)
        for state in self.states.values():
            for counts in state.skips.values():
                for reason, n in counts.items():
                    totals[reason] = totals.get(reason, 0) + n
        return totals

    def skips_by_shard(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for state in self.states.values():
            for url, counts in state.skips.items():
                merged = out.setdefault(url, {})
                for reason, n in counts.items():
                    merged[reason] = merged.get(reason, 0) + n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "num_streams": self.num_streams,
            "streams": {str(s): st.to_dict() for s, st in self.states.items()},
            "shards": len(self.urls),
        }

    def start_epoch(self, epoch: int) -> None:
        """Every stream of this host at the start of ``epoch`` (resuming under another layout
        of streams, where no saved position applies)."""
        self.states = {s: StreamState(epoch=epoch) for s in self.streams}
        self.batches = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_streams"] != self.num_streams or state["shards"] != len(self.urls):
            raise ValueError(
                f"data position was saved for {state['shards']} shards in "
                f"{state['num_streams']} streams; this run has {len(self.urls)} shards in "
                f"{self.num_streams} streams (keep --data, hosts and data.num_workers to resume)"
            )
        self.batches = int(state["batches"])
        for s in self.streams:
            self.states[s] = StreamState.from_dict(state["streams"][str(s)])
