"""What a run keeps between processes, for the trainer: whether a run directory may be
continued, the data position, and the export of the EMA weights at the end (resuming from the newest
checkpoint that verifies is ``CheckpointManager.resume_newest``).

The trainer (``fluid_train.trainer``) owns the state; these functions check and move it, so a
resume reads the same way on every backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_directory
from .checkpoint import WriteError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .data import TrainLoader
    from .model import FluidModel

__all__ = [
    "check_batch_size",
    "check_resumable",
    "export_weights",
    "restore_data_position",
]

# The trainer's logger: these lines are the trainer's own, wherever a run is filtered by logger.
logger = logging.getLogger("fluid_train.trainer")


def check_resumable(
    config_path: Path, candidates: list[Path], *, resume: bool, record: dict[str, Any]
) -> None:
    """Refuse to overwrite checkpoints without ``resume``, and to resume a run whose saved model
    config (``config_path``, the run's ``train_config.json``) differs from ``record['model']``."""
    if candidates and not resume:
        raise FileExistsError(
            f"{config_path.parent} already holds checkpoints (newest {candidates[0].name}); pass "
            "--resume to continue it or choose a new --out"
        )
    if candidates:
        saved = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if saved.get("model") not in (None, record["model"]):
            raise ValueError(
                f"cannot resume {config_path.parent}: its model config differs from this one "
                f"(see {config_path})"
            )


def check_batch_size(host: dict[str, Any], path: Path, *, batch_size: int, host_batch: int) -> None:
    """A resume keeps the global batch (the rank count may change); older checkpoints recorded
    only the per-host batch."""
    if "batch_size" in host:
        if host["batch_size"] != batch_size:
            raise ValueError(
                f"checkpoint {path} was written with --batch-size {host['batch_size']}; "
                f"this run uses {batch_size} (keep --batch-size to resume)"
            )
    elif host["host_batch"] != host_batch:
        raise ValueError(
            f"checkpoint {path} was written with {host['host_batch']} samples per host and "
            f"batch; this run uses {host_batch} (keep --batch-size to resume)"
        )


def restore_data_position(loader: TrainLoader, path: Path, host: dict[str, Any]) -> None:
    """The data position: exact when the checkpoint has this run's stream layout; under
    another rank count (other shards per rank) every stream starts the epoch after the
    furthest one any rank of the checkpoint had reached."""
    data = host["data"]
    if data["num_streams"] == loader.num_streams and data["shards"] == len(loader.urls):
        loader.load_state_dict(data)
        return
    if data["shards"] != len(loader.urls):
        loader.load_state_dict(data)  # raises, naming the difference
    saved = host.get("all_data", [data])
    epoch = 1 + max(int(st["epoch"]) for d in saved for st in d["streams"].values())
    logger.warning(
        "%s was written by %d data stream(s), this run reads %d: the data restart at "
        "epoch %d (the rest of the interrupted epoch is skipped)",
        path,
        data["num_streams"],
        loader.num_streams,
        epoch,
    )
    loader.start_epoch(epoch)


def export_weights(
    run_dir: Path,
    model: FluidModel,
    *,
    tokenizer: Any,
    text_encoder: Any,
    tokenizer_path: str | None,
    text_encoder_path: str | None,
    reload: bool,
    last_checkpoint: Path | None,
) -> Path:
    """``model`` (the EMA weights) as ``run_dir/pipeline`` with the frozen parts when the
    tokenizer and T5 are known, else as ``run_dir/model``; built in a temp dir and renamed.

    ``reload``: the frozen parts in memory were cast for the device (bf16), so the saved ones
    are loaded again; a T5 not loaded yet (encoded shards) is loaded now."""
    if tokenizer is not None and text_encoder_path:
        from .encoders import load_text_encoder, load_tokenizer
        from .pipeline import FluidPipeline

        if reload:
            tokenizer, text_encoder = load_tokenizer(tokenizer_path), None
        if text_encoder is None:
            text_encoder = load_text_encoder(text_encoder_path)
        target = run_dir / "pipeline"
        part: Any = FluidPipeline(
            tokenizer=tokenizer.to("cpu"), text_encoder=text_encoder.to("cpu"), model=model
        )
    else:
        target = run_dir / "model"
        part = model
        logger.info("no --tokenizer/--text-encoder: exporting the EMA model alone to %s", target)
    try:
        with atomic_directory(target) as tmp:
            part.save_pretrained(tmp)
    except OSError as error:  # ENOSPC, EIO, ...: the previous export (if any) stays
        tmp = target.with_name(f".tmp-{target.name}")
        kept = f"the checkpoint {last_checkpoint} is intact"
        if target.exists():
            kept += f" and so is the previous {target}"
        raise WriteError(
            "the export", tmp, error, f"{kept}; the partial {tmp.name} was removed"
        ) from error
    logger.info("exported the EMA weights to %s", target)
    return target
