"""The shapes world's data and frozen parts (stages 1-4 of the demo), built once and cached.

1. ``data``      shapes-world shards (``fluid_eval.shapes.write_shards``) + a held-out set
2. ``tokenizer`` the small SD-VAE-style tokenizer (``fluid_tokenizers.train_vae``), its scaling
                 factor calibrated so tokens have unit variance (or the small VQ tokenizer)
3. ``text``      a SentencePiece model of the captions and the small frozen random T5
4. ``encode``    shards encoded once into tokens + T5 states (``fluid_train.preprocess``)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import StageCache, Stages
from .settings import WorldSettings

__all__ = ["World", "build_world"]


@dataclass(slots=True)
class World:
    """Paths of the shapes world's data and frozen parts (all inside the cache)."""

    train_shards: list[str]
    val_shards: list[str]
    text_encoder: Path
    tokenizers: dict[str, Path] = field(default_factory=dict)  # "continuous"/"discrete" -> dir
    encoded: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # (train, val)
    keys: dict[str, str] = field(default_factory=dict)  # stage -> cache entry name


def _shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def _load_images(shards: Sequence[str], limit: int, image_size: int) -> torch.Tensor:
    """Up to ``limit`` training images [M, 3, S, S] in [-1, 1] from image shards."""
    from ..data import decode_image_sample, iter_raw_samples

    images: list[torch.Tensor] = []
    for url in shards:
        for raw in iter_raw_samples(url):
            images.append(decode_image_sample(raw, image_size)[0])
            if len(images) == limit:
                return torch.stack(images)
    return torch.stack(images)


def _captions(shards: Sequence[str]) -> Iterator[str]:
    from ..data import iter_raw_samples

    for url in shards:
        for raw in iter_raw_samples(url):
            yield raw["txt"].decode() if isinstance(raw["txt"], bytes) else str(raw["txt"])


def build_world(
    cache: str | os.PathLike,
    world: WorldSettings,
    *,
    seed: int = 0,
    tokens: Sequence[str] = ("continuous",),
    stages: Stages | None = None,
) -> World:
    """Stages 1-4 for each token kind in ``tokens``: data, tokenizers, text, encoded shards."""
    from fluid_eval.shapes import write_shards

    unknown = sorted(set(tokens) - {"continuous", "discrete"})
    if unknown:
        raise ValueError(f"tokens must be 'continuous' and/or 'discrete'; got {list(tokens)}")
    stages = stages or Stages(print)
    store = StageCache(cache, stages)
    keys: dict[str, str] = {}
    data_settings = {**world.data_key(), "seed": seed}
    with stages.stage("data", f"{world.num_images} training + {world.num_val} held-out scenes"):
        with store.entry("data", data_settings, stage="data") as entry:
            if entry.build:
                layout = world.layout_config()
                write_shards(
                    entry.build / "train", world.num_images, seed, world.image_size, world.shard_size,
                    layout=layout,
                )  # fmt: skip
                # A different seed stream: held-out scenes share no (seed, index) with training.
                write_shards(
                    entry.build / "val", world.num_val, seed + 1_000_003, world.image_size,
                    world.shard_size, layout=layout,
                )  # fmt: skip
    data = entry.path
    keys["data"] = data.name
    train_images, val_images = _shards(data / "train"), _shards(data / "val")

    tokenizers: dict[str, Path] = {}
    for kind in tokens:
        tokenizers[kind] = _tokenizer(store, world, kind, train_images, keys, seed)

    with stages.stage("text", "SentencePiece model of the captions + small frozen T5"):
        settings = {
            "data": keys["data"],
            "vocab": world.spm_vocab_size,
            "words": True,
            "seed": seed,
        }
        with store.entry("text", settings, stage="text") as entry:
            if entry.build:
                from fluid_text import build_random_t5, train_sentencepiece

                # The grammar has ~25 words; on captions alone, unigram SentencePiece keeps only
                # ~40 pieces and spells most words letter by letter. Each distinct word as one
                # more sentence makes every word a piece (a caption = its words, <= 12 ids).
                captions = list(_captions(train_images))
                words = sorted({word for caption in captions for word in caption.split()})
                spm = train_sentencepiece(
                    captions + words, entry.build / "spm", vocab_size=world.spm_vocab_size, seed=seed,
                    vocab_limit="soft",
                )  # fmt: skip
                build_random_t5(entry.build / "t5", spiece_model=spm, seed=seed)
    text = entry.path / "t5"
    keys["text"] = text.parent.name

    encoded: dict[str, tuple[list[str], list[str]]] = {}
    for kind in tokens:
        with stages.stage("encode", f"{kind} tokens + T5 states of every scene, once"):
            settings = {"tokenizer": keys[kind], "text": keys["text"], "pad_to": world.text_length}
            with store.entry(f"encoded-{kind}", settings, stage="encode") as entry:
                if entry.build:
                    from ..preprocess import preprocess

                    scenes = world.num_images + world.num_val
                    with stages.bar(scenes, f"encode {kind}", "scene") as bar:
                        for split, shards in (("train", train_images), ("val", val_images)):
                            preprocess(
                                shards, tokenizer=tokenizers[kind], text_encoder=text,
                                out=entry.build / split, pad_to=world.text_length, batch_size=64,
                                device="cpu", progress=bar.update,
                            )  # fmt: skip
        encoded[kind] = (_shards(entry.path / "train"), _shards(entry.path / "val"))
        keys[f"encoded-{kind}"] = entry.path.name
    return World(train_images, val_images, text, tokenizers, encoded, keys)


def _tokenizer(
    store: StageCache,
    world: WorldSettings,
    kind: str,
    shards: list[str],
    keys: dict[str, str],
    seed: int,
) -> Path:
    import fluid_tokenizers as ft

    name = "vae" if kind == "continuous" else "vq"
    steps = world.vae_steps if kind == "continuous" else world.vq_steps
    settings = {
        "data": keys["data"], "steps": steps, "images": world.vae_images, "seed": seed,
        "batch_size": world.vae_batch_size, "lr": world.vae_lr,
    }  # fmt: skip
    if kind == "continuous":
        settings["kl_weight"] = world.vae_kl_weight
    what = (
        "SD-VAE-style tokenizer (f=4, 16-ch tokens)"
        if name == "vae"
        else "VQ tokenizer (512 codes)"
    )
    stages = store.stages
    with stages.stage("tokenizer", f"train the {what}, {steps} steps"), ExitStack() as stack:
        with store.entry(name, settings, stage="tokenizer") as entry:
            if entry.build:
                images = _load_images(shards, world.vae_images, world.image_size)
                bar = stack.enter_context(stages.bar(steps, f"{name} tokenizer", "step"))

                def progress(step: int, metrics: dict[str, float]) -> None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                    if step == steps:
                        stages.log(f"  {name} step {step}: loss {metrics['loss']:.4f}")

                common = {
                    "steps": steps, "batch_size": world.vae_batch_size, "lr": world.vae_lr,
                    "seed": seed, "progress": progress,
                }  # fmt: skip
                if name == "vae":
                    tok = ft.SDVAETokenizer.from_config(ft.shapes_vae_config(), image_size=world.image_size, seed=seed)  # fmt: skip
                    ft.train_vae(tok, images, kl_weight=world.vae_kl_weight, **common)
                    factor = ft.calibrate_scaling_factor(tok, images[:512], seed=seed)
                    stages.log(f"  scaling factor {factor:.4f} (tokens at unit variance)")
                else:
                    tok = ft.VQTokenizer.from_config(ft.shapes_vq_config(), image_size=world.image_size, seed=seed)  # fmt: skip
                    ft.train_vq(tok, images, **common)
                tok.save_pretrained(entry.build)
    keys[kind] = entry.path.name
    return entry.path
