"""Encoded-shard loader throughput against what a training step consumes: how many workers.

    python benchmarks/bench_data.py [--samples 512] [--batch 32] [--text-tokens 13.5]
    python benchmarks/bench_data.py --step-seconds 0.61 --step-batch 256   # a measured step

Writes synthetic encoded shards at the paper's shapes — 256 × 16 SD-VAE tokens (posterior mean
and std, float32) and T5-XXL states of width 4096 stored trimmed (float16, ``[n, 4096]``, n
drawn around ``--text-tokens``; 13.5 is the GenEval prompts' mean under their own SentencePiece
model, see bench_text_storage.py) — plus the same samples stored padded to 128, then times
``TrainLoader`` in this process (``num_workers=0``: one worker's rate) reading them: tar parsing,
``.npy`` decoding, float16 -> float32, padding to 128 and batching.

Consumption: images/s = 1 / sec-per-image. By default Table 2's sec/img on TPU v5 for each
paper preset (the paper's own figure; it is a generation time, used here as a stand-in) and,
with ``--step-seconds S --step-batch B`` (e.g. from bench_train.py on your accelerator), B / S.
Workers needed per host = consumed images/s per host / one worker's samples/s.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from fluid_train.data import TrainLoader, write_shard
from fluid_train.preprocess import encoded_sample, sample_bytes
from fluid_train.presets import PAPER_SIZES

TOKENS, CHANNELS, WIDTH, LENGTH = 256, 16, 4096, 128  # the paper's shapes


def write_shards(
    root: Path, samples: int, per_shard: int, text_tokens: float, storage: str
) -> float:
    """Synthetic encoded shards; returns the mean stored bytes per sample."""
    rng = np.random.default_rng(0)
    low, high = max(1, round(text_tokens / 2)), min(LENGTH, round(text_tokens * 1.5))
    total = 0
    for s in range(math.ceil(samples / per_shard)):
        batch = []
        for i in range(min(per_shard, samples - s * per_shard)):
            real = int(rng.integers(low, high + 1))
            hidden = np.zeros((LENGTH, WIDTH), np.float32)
            hidden[:real] = rng.standard_normal((real, WIDTH))
            tokens = rng.standard_normal((TOKENS, CHANNELS)).astype(np.float32)
            sample = encoded_sample(
                f"{s:05d}{i:05d}", tokens=tokens, token_std=np.abs(tokens) * 0.1,
                text_hidden=hidden, text_mask=np.arange(LENGTH) < real,
                caption="a photo of a synthetic caption", text_storage=storage,
            )  # fmt: skip
            total += sample_bytes(sample)
            batch.append(sample)
        write_shard(root / f"{s:05d}.tar", batch)
    return total / samples


def loader_rate(root: Path, batch: int, samples: int) -> float:
    """Samples/s of one in-process loader over one epoch (after a first batch of warm-up)."""
    loader = TrainLoader(str(root), batch_size=batch, image_size=256, shuffle_buffer=64)
    iterator = iter(loader)
    next(iterator)
    batches = max(1, samples // batch - 2)
    start = time.perf_counter()
    for _ in range(batches):
        out = next(iterator)
        assert out.tensors["text_hidden"].shape == (batch, LENGTH, WIDTH)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="synthetic samples (trimmed)")
    parser.add_argument("--batch", type=int, default=32, help="loader batch size")
    parser.add_argument("--text-tokens", type=float, default=13.5, help="mean caption tokens")
    parser.add_argument("--step-seconds", type=float, help="a measured training step time (s)")
    parser.add_argument("--step-batch", type=int, help="images per host in that step")
    args = parser.parse_args()
    if (args.step_seconds is None) != (args.step_batch is None):
        parser.error("--step-seconds and --step-batch go together")

    with tempfile.TemporaryDirectory() as tmp:
        rates, sizes = {}, {}
        # Padded samples are 1 MiB each: a quarter as many suffice for a rate.
        for storage, count in (
            ("trimmed", args.samples),
            ("padded", max(args.samples // 4, 4 * args.batch)),
        ):
            root = Path(tmp) / storage
            sizes[storage] = write_shards(root, count, 64, args.text_tokens, storage)
            rates[storage] = loader_rate(root, args.batch, count)

    print(f"loader, one worker, batch {args.batch}: samples of {TOKENS}x{CHANNELS} tokens + "
          f"T5 states {LENGTH}x{WIDTH} (mean {args.text_tokens} real tokens)")  # fmt: skip
    for storage in ("trimmed", "padded"):
        print(f"  {storage:<8} {sizes[storage] / 1024:8.1f} KiB/sample  "
              f"{rates[storage]:8.1f} samples/s per worker")  # fmt: skip
    print(f"  trimmed / padded: {sizes['padded'] / sizes['trimmed']:.1f}x fewer bytes, "
          f"{rates['trimmed'] / rates['padded']:.2f}x the samples/s")  # fmt: skip
    per_worker = rates["trimmed"]
    rows = [(name, 1.0 / size.tpu_v5_sec_per_image, "Table 2 sec/img")
            for name, size in PAPER_SIZES.items()]  # fmt: skip
    if args.step_seconds is not None:
        rows.append(("measured step", args.step_batch / args.step_seconds,
                     f"{args.step_batch} img / {args.step_seconds} s"))  # fmt: skip
    print(f"\n{'consumer':<14} {'images/s':>9}  {'source':<22} {'workers (trimmed)':>18}")
    for name, consumed, source in rows:
        workers = consumed / per_worker
        print(f"{name:<14} {consumed:9.1f}  {source:<22} {workers:11.2f} -> {math.ceil(workers)}")


if __name__ == "__main__":
    main()
