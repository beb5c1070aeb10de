"""Generation of a prompt set spread over every rank and host, resumable.

The plan fixes what each image is before any process starts:

- prompts are grouped, in global order, into **chunks** of whole prompts: ``max(1, batch_size //
  images_per_prompt)`` prompts with all their samples. Chunk ``c`` is sampled in one go (in
  sub-batches of ``batch_size`` images on eager) with its own random stream, seeded from
  ``(seed, c)`` (:func:`chunk_seed`). An image therefore depends only on the seed, its prompt
  and sample index and the fixed settings (batch size, images per prompt, sampling options),
  never on how many processes or devices made it.
- **ranks** (``torchrun --nproc-per-node N``, eager on CPU or one GPU per rank): the unfinished
  chunks are dealt round-robin (:func:`deal`), each rank writes the chunks it made.
- **hosts** (torch_xla SPMD, one process per host): every host runs every chunk in lockstep as
  one global batch, its rows padded to a multiple of the device count and sharded over the
  mesh's batch axes (``parallelize.shard_batch``); the finished images are gathered as uint8 and
  each host writes its contiguous block of the chunk's prompts (:func:`host_prompts`).

Resume: a prompt is finished when its files are in place, and files only ever appear complete
(written to a hidden temp name and renamed; a GenEval folder is assembled under ``.partial/``
and renamed into place). A restarted run skips finished prompts (never rewriting them) and
re-makes the chunks that still miss one, with the same seeds, so the result is the same as an
uninterrupted run. ``generation.json`` records the settings; resuming with other settings is
refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import process_group
from .generation_layouts import (  # noqa: F401 - re-exported: the layouts run_generation fills
    MAX_SHEET_IMAGES,
    GenEvalFolders,
    Layout,
    PromptFiles,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .pipeline import FluidPipeline

__all__ = [
    "Chunk",
    "GenEvalFolders",
    "GenerationStats",
    "PromptFiles",
    "Processes",
    "chunk_seed",
    "deal",
    "generate_layout",
    "host_prompts",
    "plan_chunks",
    "run_generation",
]

logger = logging.getLogger(__name__)

MANIFEST = "generation.json"


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class Chunk:
    """One unit of work: whole prompts (global indices, ascending) with all their samples."""

    index: int
    prompts: tuple[int, ...]

    def rows(self, images_per_prompt: int) -> list[tuple[int, int]]:
        """(prompt index, sample index) per image row, prompt-major."""
        return [(p, k) for p in self.prompts for k in range(images_per_prompt)]


def plan_chunks(num_prompts: int, *, images_per_prompt: int, batch_size: int) -> list[Chunk]:
    """Consecutive prompts grouped ``max(1, batch_size // images_per_prompt)`` per chunk."""
    if num_prompts < 1:
        raise ValueError(f"need at least one prompt; got {num_prompts}")
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1; got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    per_chunk = max(1, batch_size // images_per_prompt)
    return [
        Chunk(c, tuple(range(start, min(start + per_chunk, num_prompts))))
        for c, start in enumerate(range(0, num_prompts, per_chunk))
    ]


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index``'s random stream: 63 bits of a SeedSequence over (seed, index),
    so neighbouring chunks get unrelated streams."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and chunk index must be >= 0; got {seed}, {index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def deal(chunks: Sequence[Chunk], rank: int, world: int) -> list[Chunk]:
    """Rank ``rank``'s chunks: every ``world``-th, starting at ``rank`` (round-robin)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return list(chunks[rank::world])


def host_prompts(chunk: Chunk, process_index: int, process_count: int) -> tuple[int, ...]:
    """SPMD: the contiguous block of the chunk's prompts host ``process_index`` writes."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"host {process_index} is outside {process_count} hosts")
    blocks = np.array_split(np.asarray(chunk.prompts, dtype=np.int64), process_count)
    return tuple(int(p) for p in blocks[process_index])


# ---------------------------------------------------------------------- processes


@dataclass(slots=True)
class Processes:
    """The processes sharing a run: torchrun ranks, SPMD hosts, or just this one.

    ``barrier`` and ``union`` go through a gloo process group (CPU objects only, so the same
    code runs beside NCCL or XLA devices); with one process they are no-ops.
    """

    index: int = 0
    count: int = 1

    @property
    def is_writer(self) -> bool:
        return self.index == 0

    @classmethod
    def from_environment(cls, *, xla: bool = False) -> Processes:
        """torch.distributed's group if one is set up (or torchrun's ``WORLD_SIZE`` > 1: a
        gloo group is created); on xla the hosts of the SPMD runtime."""
        import torch.distributed as dist

        if xla:
            import torch_xla.runtime as xr

            count = xr.process_count()
            if count > 1:
                process_group.join(xla=True)
            return cls(index=xr.process_index(), count=count)
        if dist.is_available() and dist.is_initialized():
            return cls(index=dist.get_rank(), count=dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            process_group.join()
            return cls(index=dist.get_rank(), count=dist.get_world_size())
        return cls()

    def barrier(self) -> None:
        process_group.barrier()

    def union(self, values: set[int]) -> set[int]:
        """The union of every process's ``values``."""
        if self.count == 1:
            return set(values)
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.count
        dist.all_gather_object(gathered, sorted(values))
        return {v for part in gathered for v in part}

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (on every process)."""
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.count
        dist.all_gather_object(gathered, value)
        return gathered


# ---------------------------------------------------------------------- samplers


class ChunkSampler(Protocol):
    """Images (uint8 ``[B, H, W, 3]``) for a chunk's prompts (one per row), from one seed."""

    spmd: bool  # True: every process runs every chunk (SPMD hosts); False: chunks are dealt

    def __call__(self, prompts: list[str], seed: int) -> np.ndarray: ...


class EagerSampler:
    """The pipeline on its own device (CPU or this rank's GPU), in sub-batches of ``batch_size``
    images sharing the chunk's generator."""

    spmd = False

    def __init__(self, pipeline: FluidPipeline, *, batch_size: int, options: Mapping[str, Any]):
        self.pipeline, self.batch_size, self.options = pipeline, batch_size, dict(options)

    def __call__(self, prompts: list[str], seed: int) -> np.ndarray:
        images = self.pipeline.generate_tensors(
            prompts, seed=seed, batch_size=self.batch_size, progress=False, **self.options
        )  # [B, 3, H, W] in [-1, 1]
        return to_uint8(images).cpu().numpy()


class SpmdSampler:
    """torch_xla SPMD: a chunk is one global batch, its rows padded (by repeating the last
    prompt) to ``batch_size`` rounded up to a multiple of the mesh's device count — every chunk,
    the last one included, has the same shape, so the graphs compiled for the first are reused —
    and sharded on the batch dimension; the images come back as uint8, gathered on every host.

    XLA has no device ``torch.Generator``: the chunk's CPU generator draws the random order on
    the host and seeds the device RNG (``fluid_train.generation_xla``), so a chunk's images
    depend on its seed only.
    """

    spmd = True

    def __init__(
        self, pipeline: FluidPipeline, mesh: Any, *, batch_size: int, options: Mapping[str, Any]
    ):
        self.pipeline, self.mesh, self.options = pipeline, mesh, dict(options)
        self.batch_size = batch_size
        self.num_devices = int(np.prod(list(dict(mesh.shape()).values())))

    def __call__(self, prompts: list[str], seed: int) -> np.ndarray:
        import torch

        from .parallelize import replicate, shard_batch

        rows = padded_rows(max(len(prompts), self.batch_size), self.num_devices)
        padded = prompts + [prompts[-1]] * (rows - len(prompts))
        device = self.pipeline.device
        text = self.pipeline.encode_prompts(padded)
        hidden, mask = text.hidden.to(device), text.mask.to(device)  # [R, L, D_t], [R, L]
        shard_batch(hidden, self.mesh)
        shard_batch(mask, self.mesh)
        generator = torch.Generator().manual_seed(seed)  # CPU: see the class docstring
        tokens = self.pipeline.model.generate(hidden, mask, generator=generator, **self.options)
        pixels = to_uint8(self.pipeline.decode(tokens))  # [R, H, W, 3] uint8, sharded on R
        replicate(pixels, self.mesh)
        return pixels.cpu().numpy()[: len(prompts)]


def padded_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (the SPMD batch's device count)."""
    if rows < 1 or multiple < 1:
        raise ValueError(f"rows and multiple must be >= 1; got {rows}, {multiple}")
    return -(-rows // multiple) * multiple


def to_uint8(images: Any) -> Any:
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]`` (as ``pipeline.to_pil``)."""
    import torch

    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class GenerationStats:
    num_prompts: int
    images_generated: int  # made by this run, all processes together (a resumed chunk counts whole)
    prompts_skipped: int  # finished by an earlier run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_generated / self.seconds if self.seconds > 0 else float("nan")


def settings_record(
    prompts: Sequence[str], *, model: str | None, seed: int, images_per_prompt: int,
    batch_size: int, options: Mapping[str, Any], backend: str,
) -> dict[str, Any]:  # fmt: skip
    """What fixes the images of a run (``generation.json``); a resume must match it."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "format": 1,
        "model": model,
        "backend": backend,
        "num_prompts": len(prompts),
        "prompts_sha256": digest,
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "batch_size": batch_size,
        "options": {k: options[k] for k in sorted(options)},
    }


def _check_manifest(out: Path, record: dict[str, Any], *, writer: bool) -> None:
    path = out / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
        if differ:
            changes = ", ".join(f"{k} {saved.get(k)!r} -> {record.get(k)!r}" for k in differ)
            raise ValueError(
                f"{out} holds a generation with other settings ({changes}); resuming would mix "
                "them: use another --out or delete it"
            )
        return
    if writer:
        from .atomic import write_json_atomic

        write_json_atomic(path, record)


def run_generation(
    layout: Layout,
    sampler: ChunkSampler,
    *,
    images_per_prompt: int,
    batch_size: int,
    seed: int,
    record: dict[str, Any],
    processes: Processes | None = None,
    progress: bool = True,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> GenerationStats:
    """Make every unfinished prompt of ``layout`` with ``sampler``; see the module docstring.

    Every process calls this with the same arguments. ``on_chunk`` runs after each chunk this
    process wrote (a hook for callers and tests).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    processes = processes or Processes()
    start = time.perf_counter()
    layout.out.mkdir(parents=True, exist_ok=True)
    _check_manifest(layout.out, record, writer=processes.is_writer)
    chunks = plan_chunks(
        len(layout.prompts), images_per_prompt=images_per_prompt, batch_size=batch_size
    )
    finished = {p for p in range(len(layout.prompts)) if layout.is_done(p)}
    # A host that cannot see another's files (no shared disk) still agrees on the plan.
    finished = processes.union(finished)
    pending = [c for c in chunks if not all(p in finished for p in c.prompts)]
    mine = pending if sampler.spmd else deal(pending, processes.index, processes.count)
    total = sum(len(c.prompts) for c in pending) * images_per_prompt
    # Rank 0 sees its own chunks only; the others advance alike, so its count is scaled.
    scale = 1 if sampler.spmd else processes.count
    with tqdm(total=total, desc="images", unit="img", dynamic_ncols=True,
              disable=not (progress and processes.is_writer)) as bar:  # fmt: skip
        for chunk in mine:
            prompts = [layout.prompts[p] for p, _ in chunk.rows(images_per_prompt)]
            pixels = sampler(prompts, chunk_seed(seed, chunk.index))  # [B, H, W, 3] uint8
            if len(pixels) != len(prompts):
                raise RuntimeError(f"sampler returned {len(pixels)} images for {len(prompts)} rows")
            writes = (
                host_prompts(chunk, processes.index, processes.count)
                if sampler.spmd
                else chunk.prompts
            )
            for j, p in enumerate(chunk.prompts):
                if p in writes and p not in finished:
                    rows = pixels[j * images_per_prompt : (j + 1) * images_per_prompt]
                    layout.write(p, [Image.fromarray(r) for r in rows])
            bar.update(min(len(prompts) * scale, total - bar.n))
            if on_chunk is not None:
                on_chunk(chunk)
    processes.barrier()
    if processes.is_writer:
        layout.finish(seed=seed)
    processes.barrier()
    return GenerationStats(
        num_prompts=len(layout.prompts),
        images_generated=total,
        prompts_skipped=sum(1 for c in chunks for p in c.prompts if p in finished),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------- setting up


@dataclass(slots=True)
class Runner:
    """A pipeline placed for this process and the matching sampler (see :func:`prepare`)."""

    pipeline: FluidPipeline
    sampler: ChunkSampler
    processes: Processes
    backend: str


def prepare(
    model: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str | None = None,
    batch_size: int,
    options: Mapping[str, Any],
) -> Runner:
    """Load the pipeline for this process: ``eager`` (CPU, or ``cuda:LOCAL_RANK`` under
    torchrun) or ``xla`` (SPMD over every device of every host)."""
    import torch

    from .backends import resolve_backend
    from .pipeline import FluidPipeline

    name = resolve_backend(backend)
    if name == "fsdp":  # under torchrun every rank generates its own chunks with a whole model
        name = "eager"
    if name == "xla":
        import torch_xla
        import torch_xla.runtime as xr

        from .parallelize import build_mesh

        xr.use_spmd()
        processes = Processes.from_environment(xla=True)
        pipeline = FluidPipeline.from_pretrained(model, device=torch_xla.device())
        return Runner(
            pipeline,
            SpmdSampler(pipeline, build_mesh(), batch_size=batch_size, options=options),
            processes,
            name,
        )
    processes = Processes.from_environment()
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    pipeline = FluidPipeline.from_pretrained(model, device=device)
    return Runner(
        pipeline, EagerSampler(pipeline, batch_size=batch_size, options=options), processes, name
    )


# ---------------------------------------------------------------------- a layout, whole


def generate_layout(
    layout: Any,
    pipeline: Any,
    *,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    runner: Any = None,
    model: str | None = None,
    names: Sequence[str] | None = None,
    **options: Any,
) -> Any:
    """Make every unfinished prompt of ``layout`` (``PromptFiles``, ``GenEvalFolders``: its
    ``images_per_prompt`` images each) with ``pipeline``. Resumable; spread over the processes
    of ``runner`` (see ``fluid_train.sampling``), else this process on the pipeline's device.
    ``options``: GenerationConfig fields; ``names`` label the prompts in truncation warnings.
    """
    from .prompts import prompts_named

    images_per_prompt = layout.images_per_prompt
    _check_counts(images_per_prompt, batch_size)
    if runner is None:  # a pipeline built in Python: this process, its device
        sampler = EagerSampler(pipeline, batch_size=batch_size, options=options)
        processes, backend = Processes.from_environment(), "eager"
    else:
        sampler, processes, backend = runner.sampler, runner.processes, runner.backend
    record = settings_record(
        layout.prompts, model=model, seed=seed, images_per_prompt=images_per_prompt,
        batch_size=batch_size, options=options, backend=backend,
    )  # fmt: skip
    # Truncation warnings name the user's prompts (or metadata lines) once, from the writer.
    warn_for = layout.prompts if processes.is_writer else []
    with prompts_named(pipeline.text_encoder, warn_for, names if warn_for else None):
        stats = run_generation(
            layout, sampler, images_per_prompt=images_per_prompt, batch_size=batch_size,
            seed=seed, record=record, processes=processes, progress=progress,
        )  # fmt: skip
    if processes.is_writer and progress:
        print(  # the command's summary line
            f"{stats.images_generated} images in {stats.seconds:.1f} s "
            f"({stats.images_per_second:.2f} img/s, {processes.count} processes); "
            f"{stats.prompts_skipped} prompts already done"
        )
    return stats


def _check_counts(images_per_prompt: int, batch_size: int) -> None:
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1; got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
