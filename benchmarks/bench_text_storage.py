"""Bytes per encoded sample, T5 states padded to 128 vs trimmed to the caption's real tokens.

    python benchmarks/bench_text_storage.py [--geneval PATH] [--shapes N] [--width 4096]

Two caption sets: the shapes world's training captions (``N`` drawn as the demo draws them) and
the 553 official GenEval prompts (``evaluation_metadata.jsonl``). Each set is tokenized with a
SentencePiece model trained on it by the project's own helper (``fluid_text.train_sentencepiece``,
T5's id layout; the shapes model as the demo trains it, on the captions plus each word), through
``transformers``' T5 tokenizer as ``T5TextEncoder`` does: EOS appended, cut at 128.

Bytes are those ``fluid preprocess`` writes, computed from the real entries (``encoded_sample``)
at T5-XXL width: ``text.npy`` float16 ``[128, 4096]`` padded vs ``[n, 4096]`` trimmed; and the
whole sample in the tar (512-byte header per entry, entries padded to 512 bytes) with the
paper's tokens, 256 × 16 SD-VAE posterior mean + std in float32, and the caption. No T5 runs:
the states' values do not change their size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fluid_text import load_t5_tokenizer, train_sentencepiece
from fluid_train.preprocess import encoded_sample

# ../shared/data/geneval beside the checkout (or beside the directory of worktrees).
_ROOT = Path(__file__).resolve().parents[1]
GENEVAL = (
    next(
        (p for p in (_ROOT.parent / "shared", _ROOT.parents[1] / "shared") if p.is_dir()),
        _ROOT.parent / "shared",
    )
    / "data"
    / "geneval"
    / "evaluation_metadata.jsonl"
)
MAX_LENGTH = 128  # the paper's T5 length (DEFAULT_MAX_LENGTH)
TOKENS, CHANNELS = 256, 16  # the paper's SD-VAE tokens


def shapes_captions(num: int, seed: int = 0) -> list[str]:
    from fluid_eval.shapes import sample_training_pair

    rng = np.random.default_rng(seed)
    return [sample_training_pair(rng).caption for _ in range(num)]


def geneval_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata {path} does not exist (pass --geneval)")
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def token_counts(captions: list[str], *, vocab_size: int, with_words: bool) -> list[int]:
    """Real tokens per caption (EOS included, at most 128) under a SentencePiece model trained
    on the captions themselves."""
    with tempfile.TemporaryDirectory() as tmp:
        texts = list(captions)
        if with_words:  # as the demo trains it: each word once more, so words become pieces
            texts += sorted({word for caption in captions for word in caption.split()})
        train_sentencepiece(texts, tmp, vocab_size=vocab_size, vocab_limit="soft")
        tokenizer = load_t5_tokenizer(tmp)
        pieces = tokenizer(captions, add_special_tokens=False, verbose=False)["input_ids"]
    return [min(len(ids) + 1, MAX_LENGTH) for ids in pieces]


def tar_bytes(sample: dict) -> int:
    entries = [v.encode() if isinstance(v, str) else v for k, v in sample.items() if k != "__key__"]
    return sum(512 + -(-len(data) // 512) * 512 for data in entries)


def sample_sizes(real: int, caption: str, width: int) -> dict[str, int]:
    """Stored bytes of one sample with ``real`` text tokens, padded and trimmed."""
    rng = np.random.default_rng(0)
    mask = np.arange(MAX_LENGTH) < real
    hidden = np.zeros((MAX_LENGTH, width), np.float32)
    tokens = rng.standard_normal((TOKENS, CHANNELS)).astype(np.float32)
    sizes = {}
    for storage in ("padded", "trimmed"):
        sample = encoded_sample(
            "000000000", tokens=tokens, token_std=tokens, text_hidden=hidden, text_mask=mask,
            caption=caption, text_storage=storage,
        )  # fmt: skip
        sizes[f"text_{storage}"] = len(sample["text.npy"])
        sizes[f"tar_{storage}"] = tar_bytes(sample)
    return sizes


def measure(name: str, captions: list[str], counts: list[int], width: int) -> dict:
    cache: dict[int, dict[str, int]] = {}
    totals = dict.fromkeys(("text_padded", "text_trimmed", "tar_padded", "tar_trimmed"), 0)
    # The caption's own bytes differ per caption; a 40-byte stand-in is one tar block as each
    # of these captions is (under 512 bytes), so sizes depend on the token count only.
    for real in counts:
        if real not in cache:
            cache[real] = sample_sizes(real, "x" * 40, width)
        for key, value in cache[real].items():
            totals[key] += value
    n = len(captions)
    row = {"set": name, "captions": n, "mean_tokens": float(np.mean(counts)),
           "max_tokens": int(max(counts))}  # fmt: skip
    row.update({key: value / n for key, value in totals.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geneval", type=Path, default=GENEVAL, help="evaluation_metadata.jsonl")
    parser.add_argument("--shapes", type=int, default=2000, help="shapes-world captions")
    parser.add_argument("--width", type=int, default=4096, help="T5 width (T5-XXL: 4096)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    shapes = shapes_captions(args.shapes)
    geneval = geneval_prompts(args.geneval)
    rows = [
        measure("shapes world", shapes, token_counts(shapes, vocab_size=256, with_words=True),
                args.width),
        measure("GenEval prompts", geneval, token_counts(geneval, vocab_size=1000, with_words=False),
                args.width),
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"T5 states float16, width {args.width}, padded to {MAX_LENGTH} vs trimmed; "
          f"sample = + {TOKENS}x{CHANNELS} float32 mean + std, mask, caption, in the tar")  # fmt: skip
    head = f"{'caption set':<16} {'n':>5} {'tokens':>7} {'text padded':>12} {'text trimmed':>13} " \
           f"{'ratio':>6} {'sample padded':>14} {'sample trimmed':>15} {'ratio':>6}"  # fmt: skip
    print(head)
    for r in rows:
        print(
            f"{r['set']:<16} {r['captions']:>5} {r['mean_tokens']:>7.2f} "
            f"{r['text_padded'] / 1024:>9.1f} KiB {r['text_trimmed'] / 1024:>10.1f} KiB "
            f"{r['text_padded'] / r['text_trimmed']:>5.1f}x "
            f"{r['tar_padded'] / 1024:>10.1f} KiB {r['tar_trimmed'] / 1024:>11.1f} KiB "
            f"{r['tar_padded'] / r['tar_trimmed']:>5.1f}x"
        )


if __name__ == "__main__":
    main()
