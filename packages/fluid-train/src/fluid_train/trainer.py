"""The stateful trainer: one step function for every backend, metrics, checkpoints, export.

``train(TrainConfig(...)) -> TrainResult`` (or ``fluid train``) runs a whole job:

1. Build the model from a preset (seeded, on the CPU), the data loader, and — for image shards
   or for the final export — the frozen tokenizer and T5.
2. Hand the model to the backend (device placement; SPMD sharding on xla; on fsdp FSDP2,
   built on the meta device), build AdamW over the recipe's parameter groups with a tensor
   learning rate, and the EMA. ``grad_accum`` micro-batches make one optimizer step.
3. Resume from ``RUN/checkpoints/latest`` when asked: model, EMA, optimizer, step, RNG states
   and the data position (so the resumed run sees the same batches).
4. Loop: ``train_step`` (forward under autocast, backward, clip, schedule, AdamW, EMA) runs
   with no host synchronisation; every ``log_every`` steps and before every checkpoint the
   host reads the step losses (a step closure on xla), refuses to continue past a NaN/inf
   (``NonFiniteLossError`` — raised before any checkpoint is written), writes one line of
   ``metrics.jsonl`` and TensorBoard scalars, and updates the progress bar.
5. Write the last checkpoint and export the EMA weights as a ``FluidPipeline`` to
   ``RUN/pipeline/`` (or the EMA model alone to ``RUN/model/`` without tokenizer/T5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .backends import Backend, CheckpointState, build_backend
from .checkpoint import CheckpointManager
from .data import HostBatch, TrainLoader
from .ema import EMA
from .model import FluidConfig, FluidModel, TrainBatch
from .recipe import TrainConfig, build_optimizer, learning_rate, prime_optimizer
from .resume import (
    check_batch_size,
    check_resumable,
    export_weights,
    restore_data_position,
)
from .runlog import RunLog
from .stopping import StopControl

__all__ = ["NonFiniteLossError", "StepOutput", "TrainResult", "Trainer", "train"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; no checkpoint was written after it."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: Path | None):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        self.last_checkpoint = last_checkpoint
        where = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written"
        )
        super().__init__(
            f"non-finite loss at step {step}: loss={loss}, grad_norm={grad_norm}; training "
            f"stopped before writing any checkpoint ({where})"
        )


@dataclass(slots=True)
class StepOutput:
    """What one step returns, as device tensors (read on the host only at flush points)."""

    loss: Tensor  # scalar float32
    grad_norm: Tensor  # scalar, before clipping
    lr: Tensor  # scalar, the learning rate this step used


@dataclass(slots=True)
class TrainResult:
    run_dir: Path
    step: int  # steps completed
    loss: float | None  # mean loss of the last logged window
    metrics: Path
    checkpoint: Path | None
    pipeline: Path | None  # RUN/pipeline (or RUN/model without tokenizer/T5)
    skipped: dict[str, int] = field(default_factory=dict)
    # Set when SIGTERM/SIGINT stopped the run early (after a checkpoint at ``step``, no export):
    # the signal's name, or "another process" on hosts that did not receive it.
    preempted: str | None = None
    time_limited: bool = False  # stopped at config.time_limit_s, before config.steps


def train(config: TrainConfig, *, model_config: FluidConfig | None = None) -> TrainResult:
    """Run ``config`` to ``config.steps``; ``model_config`` replaces ``config.model`` if given."""
    return Trainer(config, model_config=model_config).fit()


class Trainer:
    """All training state in one object; ``fit()`` runs the loop."""

    def __init__(self, config: TrainConfig, *, model_config: FluidConfig | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.runlog = RunLog(self.run_dir)
        self._bar = None
        try:
            self._setup(model_config)
        except BaseException:
            self.close()
            raise

    def _setup(self, model_config: FluidConfig | None) -> None:
        config = self.config
        self.backend: Backend = build_backend(config)
        self.backend.seed(config.seed)
        self.model_config = model_config or config.model
        mc = self.model_config
        if config.batch_size % self.backend.process_count:
            raise ValueError(
                f"batch_size {config.batch_size} must divide over {self.backend.process_count} hosts"
            )
        self.host_batch = config.batch_size // self.backend.process_count

        self.loader = TrainLoader(
            config.data.shards,
            batch_size=self.host_batch,
            image_size=mc.image_size,
            kind=config.data.kind,
            seed=config.seed,
            shuffle_buffer=config.data.shuffle_buffer,
            num_workers=config.data.num_workers,
            host=self.backend.process_index,
            num_hosts=self.backend.process_count,
            expected=self._expected_shapes(mc),
            memory_mb=config.data.memory_mb,
        )
        self.encoders = self._build_encoders()

        def build() -> FluidModel:
            torch.manual_seed(config.seed)  # the initial weights depend on the seed only
            return FluidModel(mc)

        self.model = self.backend.build_model(build, config)
        self.lr = self.backend.scalar(0.0, torch.float32)
        self.step_t = self.backend.scalar(0, torch.int64)
        self.optimizer = build_optimizer(
            self.model, config.optim, lr=self.lr, capturable=self.backend.capturable
        )
        prime_optimizer(self.optimizer, zeros_like=self.backend.grad_zeros)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = EMA(self.model, config.ema_decay)
        self.backend.place_ema(self.ema)
        self.autocast_dtype = self.backend.autocast_dtype(config.precision)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep=config.keep_checkpoints,
            is_writer=self.backend.is_writer,
            barrier=self.backend.barrier,
            agree=self.backend.any_process,
        )
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._pending: list[StepOutput] = []
        self._flushed: list[tuple[float, float, float]] | None = None
        self._window_start = (0, time.perf_counter())
        self.last_loss: float | None = None
        self._checkpoint_step: int | None = None
        self.stops = StopControl(self.backend)  # SIGTERM/SIGINT and the time limit
        self.preempted: str | None = None
        self.time_limited = False
        self._prepare_run()

    # -------------------------------------------------------------- setup

    @staticmethod
    def _expected_shapes(mc: FluidConfig) -> dict[str, tuple[int, ...]]:
        tokens = (mc.num_tokens,) if mc.tokens == "discrete" else (mc.num_tokens, mc.token_dim)
        return {"tokens": tokens, "text_hidden": (-1, mc.text_dim), "text_mask": (-1,)}

    def _build_encoders(self):
        """The frozen parts: checked against the model now, loaded when needed.

        The tokenizer is loaded (it is small); T5 only when image shards need it — for encoded
        shards just its width is checked now and it is loaded for the export at the end.
        """
        from .encoders import (
            FrozenEncoders,
            load_text_encoder,
            load_tokenizer,
            text_encoder_width,
        )

        config, mc = self.config, self.model_config
        self.tokenizer = self.text_encoder = None
        if config.tokenizer:
            self.tokenizer = load_tokenizer(config.tokenizer)
            mc.check_frozen_parts(tokenizer=self.tokenizer.spec, where=config.tokenizer)
        if config.text_encoder:
            mc.check_frozen_parts(
                text_width=text_encoder_width(config.text_encoder), where=config.text_encoder
            )
        if self.loader.kind != "images":
            return None
        if self.tokenizer is None or not config.text_encoder:
            raise ValueError(
                "the data are image shards: training needs --tokenizer and --text-encoder "
                "(or preprocess them first with `fluid preprocess`)"
            )
        self.text_encoder = load_text_encoder(config.text_encoder)
        length = config.data.text_length or mc.text_length
        encoders = FrozenEncoders(self.tokenizer, self.text_encoder, text_length=length)
        # On the training device, placed by the backend (xla: bf16 on TPUs, never the host).
        return self.backend.place_encoders(encoders)

    def _prepare_run(self) -> None:
        # Through JSON, so tuples compare equal to the lists read back from the file.
        record = json.loads(
            json.dumps(
                {"train": self.config.to_dict(), "model": self.model_config.to_dict()}, default=str
            )
        )
        candidates = self.checkpoints.candidates()
        check_resumable(self.run_dir / CONFIG_FILE, candidates, resume=self.config.resume, record=record)  # fmt: skip
        if candidates:
            self.checkpoints.resume_newest(
                self._resume, candidates, retry_failed_load=self.backend.process_count == 1
            )
        elif self.config.resume:
            logger.info("--resume: no checkpoint in %s yet; starting from step 0", self.run_dir)
        if self.backend.is_writer:
            (self.run_dir / CONFIG_FILE).write_text(
                json.dumps(record, indent=2, default=str) + "\n"
            )
        self.runlog.start(self.step, writer=self.backend.is_writer)

    # -------------------------------------------------------------- checkpoints

    def _state(self) -> CheckpointState:
        host = {
            "step": self.step,
            "data": self.loader.state_dict(),
            "host_batch": self.host_batch,
            "batch_size": self.config.batch_size,
            "process_count": self.backend.process_count,
            "seed": self.config.seed,
        }
        return CheckpointState(self.model, self.ema, self.optimizer, host)

    def _resume(self, path: Path) -> None:
        host = self.backend.load_checkpoint(path, self._state())
        check_batch_size(host, path, batch_size=self.config.batch_size, host_batch=self.host_batch)
        restore_data_position(self.loader, path, host)
        self.step = int(host["step"])
        self.step_t = self.backend.scalar(self.step, torch.int64)
        self.last_checkpoint = path
        self._checkpoint_step = self.step
        self._window_start = (self.step, time.perf_counter())
        logger.info("resumed %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        path = self.checkpoints.save(
            self.step,
            lambda directory: self.backend.save_checkpoint(directory, self._state()),
            meta={"backend": self.backend.name, "preset": self.config.preset},
        )
        self.last_checkpoint = path
        self._checkpoint_step = self.step
        return path

    # -------------------------------------------------------------- the step

    def _to_train_batch(self, batch: dict[str, Tensor]) -> TrainBatch:
        return TrainBatch(
            tokens=batch["tokens"],
            text_hidden=batch["text_hidden"],
            text_mask=batch["text_mask"],
            token_std=batch.get("token_std"),
        )

    def train_step(self, batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> StepOutput:
        """One optimisation step, identical on every backend; no host synchronisation.

        ``batch``: one batch, or the ``grad_accum`` micro-batches of one step (a list): their
        gradients add up, each loss scaled by 1/K, as one K x larger batch would give.
        """
        self.optimizer.zero_grad(set_to_none=True)
        dtype = self.autocast_dtype
        micro = batch if isinstance(batch, list) else [batch]
        total = None
        for part in micro:
            autocast = (
                torch.autocast(self.backend.autocast_device_type, dtype=dtype)
                if dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                loss = self.model.training_loss(self._to_train_batch(part)).loss.float()
            loss = loss / len(micro) if len(micro) > 1 else loss
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        # The mean over ranks (each holds its part of the global batch) for the host to read.
        loss = self.backend.mean_over_processes(total)
        # The total norm before clipping; an infinite bound leaves the gradients as they are.
        clip = self.config.optim.grad_clip
        grad_norm = self.backend.clip_grad_norm(
            self.params, clip if clip is not None else float("inf")
        )
        lr = learning_rate(
            self.step_t,
            lr=self.config.optim.lr,
            schedule=self.config.schedule,
            total_steps=self.config.steps,
        )
        self.lr.copy_(lr)  # the optimizer's shared lr tensor
        self.optimizer.step()
        self.ema.update()
        self.step_t.add_(1)
        return StepOutput(loss=loss.detach(), grad_norm=grad_norm.detach(), lr=lr.detach())

    def _encode(self, host_batch: HostBatch) -> dict[str, Tensor]:
        """Host side of a batch: encoded shards as read; image shards with their captions
        tokenized (the encoders run on the device, in ``backend.encode_batch``)."""
        if self.encoders is None:
            return host_batch.tensors
        captions = host_batch.captions
        names = [f"caption {i} of a training batch" for i in range(len(captions))]
        return self.encoders.host_inputs(host_batch.tensors["images"], captions, names)

    # -------------------------------------------------------------- host reads

    def _closure(self, previous: list[StepOutput]) -> Callable[[StepOutput], None]:
        def read(out: StepOutput) -> None:
            # Runs after the step's graph executed (xla) or right after the step (eager).
            self._flushed = [
                (float(o.loss), float(o.grad_norm), float(o.lr)) for o in (*previous, out)
            ]

        return read

    def _after_flush(self) -> None:
        values, self._flushed = self._flushed, None
        if values is None:
            raise RuntimeError("internal error: a host read was requested but did not run")
        first = self.step - len(values) + 1
        for i, (loss, grad_norm, _) in enumerate(values):
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(first + i, loss, grad_norm, self.last_checkpoint)
        start_step, start_time = self._window_start
        now = time.perf_counter()
        seconds = max(now - start_time, 1e-9)
        step_batch = self.config.batch_size * self.config.grad_accum
        images_per_s = (self.step - start_step) * step_batch / seconds
        self._window_start = (self.step, now)
        self.last_loss = sum(v[0] for v in values) / len(values)
        record: dict[str, Any] = {
            "step": self.step,
            "loss": self.last_loss,
            "loss_last": values[-1][0],
            "grad_norm": values[-1][1],
            "lr": values[-1][2],
            "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * self.model_config.num_tokens,
            "samples": self.step * step_batch,
            "epoch": max(s.epoch for s in self.loader.states.values()),
            "skipped": self.loader.skip_totals(),
            "time": time.time(),
        }
        compiles = self.backend.compiles()
        if compiles is not None:
            record["compiles"] = compiles
        self.runlog.write(record)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{self.last_loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.1f}"
            )

    # -------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        config = self.config
        self._bar = tqdm(
            total=config.steps,
            initial=self.step,
            unit="step",
            disable=not (config.progress and self.backend.is_writer),
            dynamic_ncols=True,
        )
        try:
            with self.stops.signals():
                if self.step < config.steps:
                    self._loop()
                if self._checkpoint_step != self.step:
                    self.save_checkpoint()
                pipeline = self.export() if config.export and self.preempted is None else None
        finally:
            self.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            loss=self.last_loss,
            metrics=self.runlog.metrics,
            checkpoint=self.last_checkpoint,
            pipeline=pipeline,
            skipped=self.loader.skip_totals(),
            preempted=self.preempted,
            time_limited=self.time_limited,
        )

    def _flush_pending(self) -> None:
        """Read the losses of the steps not logged yet (they have run) and log them."""
        if self._pending:
            *previous, last = self._pending
            self._closure(previous)(last)
            self._pending = []
            self._after_flush()

    def _stop(self) -> None:
        """Preemption: flush the steps not read yet, checkpoint this step, leave the loop."""
        self._flush_pending()
        if self._checkpoint_step != self.step:
            self.save_checkpoint()
        self.preempted = self.stops.reason
        logger.warning(
            "stopped by %s after step %d; checkpoint %s (resume with --resume)",
            self.preempted,
            self.step,
            self.last_checkpoint,
        )

    def close(self) -> None:
        """Release the progress bar, TensorBoard writer and the run's log file handler."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.runlog.close()

    def _loop(self) -> None:
        config = self.config
        self.model.train()
        self._window_start = (self.step, time.perf_counter())
        self.stops.start_clock(config.time_limit_s)
        micro: list[tuple[HostBatch, dict[str, Tensor]]] = []
        for host_batch, batch in self.backend.device_batches(self.loader, self._encode):
            if self.encoders is not None:
                batch = self.backend.encode_batch(self.encoders, batch)
            micro.append((host_batch, batch))
            if len(micro) < config.grad_accum:
                continue
            host_batches = [h for h, _ in micro]
            step_input = micro[0][1] if len(micro) == 1 else [b for _, b in micro]
            micro = []
            step = self.step + 1
            checkpoint_due = step % config.ckpt_every == 0 or step == config.steps
            flush_due = checkpoint_due or step % config.log_every == 0
            closure = self._closure(self._pending) if flush_due else None
            out = self.backend.run_step(self.train_step, step_input, closure)
            self.step = step
            for host_batch in host_batches:
                self.loader.commit(host_batch)
            self._bar.update(1)
            if flush_due:
                self._pending = []
                self._after_flush()  # raises NonFiniteLossError before any checkpoint
            else:
                self._pending.append(out)
            if checkpoint_due:
                self.save_checkpoint()
            if self.step >= config.steps:
                break
            if self.stops.preempted(step):
                self._stop()
                break
            if self.stops.out_of_time(step):
                self.time_limited = True
                self._flush_pending()
                logger.info(
                    "time limit of %.0f s reached after step %d of %d", config.time_limit_s,
                    step, config.steps,
                )  # fmt: skip
                break

    # -------------------------------------------------------------- export

    def export(self) -> Path | None:
        """The EMA weights as ``RUN/pipeline`` (FluidPipeline) when tokenizer and T5 are known,
        else as ``RUN/model`` (FluidModel); written to a temp dir and renamed."""
        weights = self.ema.averaged_state_dict(self.model)  # every host joins the gather
        if not self.backend.is_writer:
            return None
        model = FluidModel(self.model_config)
        model.load_state_dict(weights)
        cast = self.encoders is not None and self.encoders.cast is not None
        return export_weights(
            self.run_dir, model, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
            text_encoder_path=self.config.text_encoder, tokenizer_path=self.config.tokenizer,
            reload=cast, last_checkpoint=self.last_checkpoint,
        )  # fmt: skip
