"""The paper's evaluations of a trained pipeline, spread over every process.

- :func:`coco_fid`: zero-shot FID on MS-COCO 2014 (the paper's FID-30K): ``num`` seeded
  caption-image pairs (``fluid_eval.sample_coco_pairs``), one image per caption generated with
  the distributed, resumable runner of :mod:`fluid_train.sampling`, FID (torchmetrics) between
  the generated images and the real ones center-cropped and resized to the model resolution.
- :func:`shard_validation_loss`: the training objective on held-out shards (Figure 5's
  validation loss). Shard ``s`` is evaluated under its own seed derived from ``(seed, s)``, each
  rank takes every ``world``-th shard, and the batch losses of all shards are combined by
  ``fluid_eval.validation_loss`` weighted by images — so 1 and N processes give one number.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from .encoders import FrozenEncoders
    from .model import FluidModel, TrainBatch
    from .sampling import Processes, Runner

__all__ = ["ShardLoss", "coco_fid", "held_out_batches", "shard_validation_loss"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- COCO FID


def coco_fid(
    runner: Runner,
    *,
    captions: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    num: int = 30_000,
    pairs_seed: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    feature: str = "inception",
    inception_weights: str | os.PathLike | None = None,
    fid_batch_size: int = 64,
    fid_device: str | None = None,
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
    model: str | None = None,
) -> dict[str, Any] | None:
    """FID-``num`` of ``runner``'s pipeline on a local COCO 2014 captions file + image folder.

    Writes ``OUT/pairs.jsonl`` (the drawn pairs), ``OUT/samples/`` (one PNG per caption, in
    ``fluid generate``'s layout, resumable) and ``OUT/report.json``; returns the report on the
    writing process (None elsewhere). FID runs on the writing process only.
    """
    from fluid_eval.fid import compute_fid, make_fid, sample_coco_pairs

    from .sampling import PromptFiles, generate_layout

    options = dict(options or {})
    start = time.perf_counter()
    out, images = Path(out), Path(images)
    processes = runner.processes
    if feature == "inception":
        # Fail before hours of generation, not after.
        make_fid("inception", weights_path=inception_weights)
    pairs = sample_coco_pairs(captions, num=num, seed=pairs_seed)
    real = [images / pair.file_name for pair in pairs]
    missing = [str(p) for p in real if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(real)} sampled COCO images are missing under {images} "
            f"(first: {missing[0]}); --images must hold the captions file's images"
        )
    out.mkdir(parents=True, exist_ok=True)
    if processes.is_writer:
        write_text_atomic(out / "pairs.jsonl", "".join(json.dumps(asdict(p)) + "\n" for p in pairs))
    layout = PromptFiles(out / "samples", [pair.caption for pair in pairs], images_per_prompt=1)
    stats = generate_layout(
        layout, runner.pipeline, batch_size=batch_size, seed=seed, progress=progress,
        runner=runner, model=model, names=[f"caption of {p.file_name}" for p in pairs], **options,
    )  # fmt: skip
    if not processes.is_writer:
        return None
    image_size = runner.pipeline.model.config.image_size
    fid_start = time.perf_counter()
    result = compute_fid(
        real, layout.files(), feature=feature, weights_path=inception_weights,
        batch_size=fid_batch_size, image_size=image_size, device=fid_device,
    )  # fmt: skip
    now = time.perf_counter()
    report = {
        "fid": result.fid,
        "num_images": result.num_fake,
        "num_real": result.num_real,
        "feature": feature,
        "inception_weights": None if inception_weights is None else str(inception_weights),
        "image_size": image_size,
        "captions": str(captions),
        "images": str(images),
        "model": model,
        "settings": {
            "num_pairs": num,
            "pairs_seed": pairs_seed,
            "seed": seed,
            "batch_size": batch_size,
            "options": options,
        },  # fmt: skip
        "backend": runner.backend,
        "processes": processes.count,
        "images_generated": stats.images_generated,
        "prompts_resumed": stats.prompts_skipped,
        "generation_s": round(stats.seconds, 3),
        "images_per_s": stats.images_per_second,
        "fid_s": round(now - fid_start, 3),
        "wall_s": round(now - start, 3),
        "skipped": list(result.skipped),
    }
    write_json_atomic(out / "report.json", report)
    return report


# ---------------------------------------------------------------------- validation loss


def held_out_batches(
    url: str,
    *,
    batch_size: int,
    image_size: int,
    encoders: FrozenEncoders | None = None,
    skips: dict[str, int] | None = None,
) -> Iterator[TrainBatch]:
    """One shard's samples in file order as TrainBatches of ``batch_size`` (the last partial).

    Encoded shards (``fluid preprocess``) are read as they are; image shards go through
    ``encoders`` (the pipeline's tokenizer and T5, as training on image shards does). Bad
    samples are skipped and counted in ``skips`` by reason.
    """
    import torch

    from .data import SkipSample, decode_encoded_sample, decode_image_sample, iter_raw_samples
    from .model import TrainBatch

    def collate(items: list[Any]) -> TrainBatch:
        if encoders is None:
            stack = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        else:
            images = torch.stack([image for image, _ in items])  # [B, 3, S, S]
            stack = encoders(images, [caption for _, caption in items])
        return TrainBatch(tokens=stack["tokens"], text_hidden=stack["text_hidden"],
                          text_mask=stack["text_mask"], token_std=stack.get("token_std"))  # fmt: skip

    items: list[Any] = []
    for raw in iter_raw_samples(url):
        try:
            if encoders is None:
                items.append(decode_encoded_sample(raw))
            else:
                items.append(decode_image_sample(raw, image_size))
        except SkipSample as skip:
            if skips is not None:
                skips[skip.reason] = skips.get(skip.reason, 0) + 1
            continue
        if len(items) == batch_size:
            yield collate(items)
            items = []
    if items:
        yield collate(items)


@dataclass(frozen=True, slots=True)
class ShardLoss:
    """The validation loss over a shard set, with how it was made."""

    mean: float  # image-weighted mean of the batch losses
    std_error: float
    num_images: int
    num_batches: int
    num_shards: int
    processes: int
    seed: int
    skipped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_losses(
    model: FluidModel,
    shards: Sequence[str],
    indices: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    encoders: FrozenEncoders | None = None,
) -> tuple[dict[int, list[tuple[float, float]]], dict[str, int]]:
    """(loss, images) per batch of each shard in ``indices``, shard ``s`` under seed (seed, s)."""
    from fluid_eval.loss import validation_loss

    from .sampling import chunk_seed

    skips: dict[str, int] = {}
    out: dict[int, list[tuple[float, float]]] = {}
    model.eval()
    for s in indices:
        records: list[tuple[float, float]] = []

        def loss(batch: TrainBatch, records=records) -> tuple[Any, float]:
            value = model.training_loss(batch.to(device)).loss.float()
            images = float(batch.tokens.shape[0])
            records.append((float(value), images))
            return value, images

        batches = held_out_batches(shards[s], batch_size=batch_size,
                                   image_size=model.config.image_size, encoders=encoders,
                                   skips=skips)  # fmt: skip
        try:
            validation_loss(loss, batches, seed=chunk_seed(seed, s))
        except ValueError as error:
            if "held-out set is empty" not in str(error):
                raise ValueError(f"shard {shards[s]}: {error}") from error
            logger.warning("shard %s holds no readable sample", shards[s])
        out[s] = records
    return out, skips


def shard_validation_loss(
    model: FluidModel,
    shards: Sequence[str],
    *,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    encoders: FrozenEncoders | None = None,
    processes: Processes | None = None,
) -> ShardLoss:
    """The training objective averaged over ``shards`` (see the module docstring); every
    process calls this with the same arguments and gets the same result."""

    from .sampling import Processes

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    if not shards:
        raise ValueError("no held-out shards given")
    processes = processes or Processes()
    mine = range(processes.index, len(shards), processes.count)
    local = shard_losses(model, shards, list(mine), batch_size=batch_size, seed=seed,
                         device=device, encoders=encoders)  # fmt: skip
    return combine_shard_losses(processes.gather(local), num_shards=len(shards),
                                processes=processes.count, seed=seed)  # fmt: skip


def combine_shard_losses(
    parts: Sequence[tuple[dict[int, list[tuple[float, float]]], dict[str, int]]],
    *,
    num_shards: int,
    processes: int,
    seed: int,
) -> ShardLoss:
    """Merge every process's per-shard batch losses in shard order (fluid_eval's weighting)."""
    from fluid_eval.loss import validation_loss

    per_shard: dict[int, list[tuple[float, float]]] = {}
    skipped: dict[str, int] = {}
    for losses, skips in parts:
        per_shard.update(losses)
        for reason, n in skips.items():
            skipped[reason] = skipped.get(reason, 0) + n
    records = [r for s in sorted(per_shard) for r in per_shard[s]]
    result = validation_loss(lambda record: record, records, seed=None)
    return ShardLoss(mean=result.mean, std_error=result.std_error,
                     num_images=int(result.total_weight), num_batches=result.num_batches,
                     num_shards=num_shards, processes=processes, seed=seed, skipped=skipped)  # fmt: skip
