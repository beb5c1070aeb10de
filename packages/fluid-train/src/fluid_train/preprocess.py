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
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import write_json_atomic
from .data import (
    SKIP_REASONS,
    SkipSample,
    decode_image_sample,
    describe_skips,
    expand_shards,
    iter_raw_samples,
    write_shard,
)

__all__ = [
    "EncodeRuntime",
    "FrozenEncoders",
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
TextDtype = Literal["float16", "bfloat16", "float32"]
TextStorage = Literal["trimmed", "padded"]


# ---------------------------------------------------------------------- loading the parts


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """An ``SDVAETokenizer`` or ``VQTokenizer`` from a saved directory (diffusers layout; the
    class is read from ``config.json``'s ``_class_name``), or from a pipeline's ``tokenizer/``."""
    import fluid_tokenizers

    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "tokenizer"
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"tokenizer {root} has no config.json (a saved tokenizer dir)")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    classes = {"AutoencoderKL": "SDVAETokenizer", "VQModel": "VQTokenizer"}
    if class_name not in classes:
        raise ValueError(
            f"tokenizer {root}: config.json names {class_name!r}; expected AutoencoderKL "
            "(SD-VAE) or VQModel (VQ)"
        )
    tokenizer = getattr(fluid_tokenizers, classes[class_name]).from_pretrained(root)
    return tokenizer.to(device).eval().requires_grad_(False)


def load_text_encoder(
    path: str | os.PathLike,
    *,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The frozen ``T5TextEncoder`` of a saved directory (or a pipeline's ``text_encoder/``)."""
    from fluid_text import T5TextEncoder

    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "text_encoder"
    kwargs: dict[str, Any] = {"dtype": dtype}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return T5TextEncoder.from_pretrained(root, **kwargs).to(device)


def text_encoder_width(path: str | os.PathLike) -> int:
    """``d_model`` of a saved T5 encoder, read from its ``config.json`` (no weights loaded)."""
    root = Path(path)
    if (root / "fluid_pipeline.json").is_file():
        root = root / "text_encoder"
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"text encoder {root} has no config.json (a saved T5 encoder dir)")
    config = json.loads(config_file.read_text())
    if "d_model" not in config:
        raise ValueError(f"text encoder {config_file} has no d_model; expected a T5 config")
    return int(config["d_model"])


# ---------------------------------------------------------------------- encoding


class FrozenEncoders:
    """Images + captions -> the tensors of a training batch, with the frozen tokenizer and T5.

    Two halves, so the encoders can run on an accelerator: ``host_inputs`` (SentencePiece, on
    the host CPU) gives ``images`` [B, 3, S, S], ``text_ids`` and ``text_mask`` [B, L];
    ``encode_inputs`` runs the tokenizer and T5 where the encoders are, returning ``tokens``
    ([B, N] ids or [B, N, C] posterior means), ``token_std`` (continuous tokenizers: the
    posterior std, so the training step samples a fresh token each time, as training on VAE
    samples does), ``text_hidden`` [B, L, D_t] float32 and ``text_mask`` [B, L] with
    L = ``text_length`` for every batch (fixed shapes). Calling the object does both.
    """

    def __init__(self, tokenizer: nn.Module, text_encoder: nn.Module, *, text_length: int) -> None:
        if text_length > text_encoder.max_length:
            raise ValueError(
                f"text_length {text_length} exceeds the text encoder's max_length "
                f"{text_encoder.max_length}"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_length = text_length
        self.spec = tokenizer.spec
        self.cast: torch.dtype | None = (
            None  # set by ``to(..., dtype)``: weights no longer as saved
        )

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenEncoders:
        """Move both encoders, their weights cast to ``dtype`` when given (e.g. bf16)."""
        for module in (self.tokenizer, self.text_encoder):
            if dtype is None:
                module.to(device)
            else:
                module.to(device=device, dtype=dtype)
        if dtype is not None:
            self.cast = dtype
        return self

    def prepare_for_xla(self) -> FrozenEncoders:
        """No host reads in the encoders' graph: transformers' SDPA path reads the padding mask
        (``mask.all()``) to skip it, which on SPMD runs and compiles a gather every call; its
        eager attention builds the additive mask on the device (XLA lowers both the same)."""
        self.text_encoder.model.set_attn_implementation("eager")
        return self

    def weight_bytes(self) -> int:
        return sum(
            p.numel() * p.element_size()
            for module in (self.tokenizer, self.text_encoder)
            for p in module.parameters()
        )

    def host_inputs(
        self, images: Tensor, captions: Sequence[str], names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """The CPU half: ``images`` as given; captions -> ``text_ids``, ``text_mask`` [B, L].
        ``names`` (e.g. ``shard 00012.tar sample 000120003``) name the captions in warnings."""
        from .prompts import prompts_named

        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        with prompts_named(self.text_encoder, list(captions), names, limit=self.text_length):
            ids, mask = self.text_encoder.tokenize(list(captions), pad_to=self.text_length)
        return {"images": images, "text_ids": ids, "text_mask": mask}

    @torch.no_grad()
    def encode_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The device half: ``host_inputs``' tensors -> training tensors (fixed shapes)."""
        out = self.encode_images(inputs["images"])
        states = self.text_encoder.encode_ids(inputs["text_ids"], inputs["text_mask"])
        return {**out, "text_hidden": states.hidden.float(), "text_mask": states.mask.bool()}

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        images = images.to(self.device)
        if self.spec.kind == "discrete":
            return {"tokens": self.tokenizer.encode(images).long()}  # [B, N]
        moments = self.tokenizer.encode_moments(images)  # mean/std [B, N, C] float32
        return {"tokens": moments.mean.float(), "token_std": moments.std.float()}

    def __call__(
        self, images: Tensor, captions: Sequence[str], names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        return self.encode_inputs(self.host_inputs(images, captions, names))


def encoders_fit(weight_bytes: int, device_bytes: int | None) -> bool:
    """Whether frozen weights of ``weight_bytes`` are replicated on a device of ``device_bytes``
    (None: unknown, taken to fit): at most half of it, the rest left for activations and the
    batch. T5-XXL in bf16 (9.5 GB) fits devices of 24 GB and more, not 16 GB ones."""
    return device_bytes is None or weight_bytes <= device_bytes // 2


def compile_xla_encode(encoders: FrozenEncoders, mesh: Any) -> Callable[..., dict[str, Tensor]]:
    """``encoders.encode_inputs`` as one compiled XLA graph (fixed shapes: compiled once) whose
    outputs are split by rows over the mesh like batch inputs — what the training step sees
    from encoded shards, so it compiles the same graph either way."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    from .parallelize import batch_partition_spec

    def encode(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = encoders.encode_inputs(batch)
        for tensor in out.values():
            xs.mark_sharding(tensor, mesh, batch_partition_spec(tensor.ndim))
        return out

    return torch_xla.compile(encode, name="fluid_encode")


# ---------------------------------------------------------------------- where encoding runs


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tpu_host() -> bool:
    return os.environ.get("PJRT_DEVICE", "").upper() == "TPU" or os.path.exists("/dev/accel0")


def _xla_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_xla") is not None


class EncodeRuntime:
    """Runs ``FrozenEncoders.encode_inputs`` on the CPU, one CUDA device, or every xla device of
    a host (SPMD); ``rows`` is the batch one call takes, ``part`` this process's share.

    ``device``: None = xla on a TPU host with torch_xla installed, else ``cuda`` when available
    (``cuda:LOCAL_RANK`` under torchrun), else the CPU; ``"xla"`` asks for torch_xla on any
    PJRT device (e.g. the CPU ones in tests). ``precision``: ``auto`` = bf16 on accelerators,
    fp32 on CPUs. ``shard_weights``: None decides from the device memory (``encoders_fit``).
    ``part=(k, n)``: this job's share of the shards, split again over the processes of the run
    (torchrun ranks, xla hosts).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        batch_size: int = 32,
        part: tuple[int, int] = (0, 1),
        shard_weights: bool | None = None,
    ) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {precision!r}")
        k, n = part
        if not (n >= 1 and 0 <= k < n):
            raise ValueError(f"part must be (k, n) with 0 <= k < n; got {part}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.precision = precision
        self.shard_weights = shard_weights
        self.sharded = False
        self.is_xla = str(device) == "xla" or (device is None and _tpu_host() and _xla_installed())
        if self.is_xla:
            self._init_xla(batch_size)
        else:
            self._init_torch(device, batch_size)
        self.part = (k * self.process_count + self.process_index, n * self.process_count)

    def _init_torch(self, device: torch.device | str | None, batch_size: int) -> None:
        self.process_index = _env_int("RANK", 0)
        self.process_count = _env_int("WORLD_SIZE", 1)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"RANK {self.process_index} is not in [0, WORLD_SIZE={self.process_count})"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device} requested but CUDA is not available")
            if device.index is None:  # one GPU per rank under torchrun
                device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
            torch.cuda.set_device(device)
        self.device = device
        self.accelerated = device.type != "cpu"
        self.rows = batch_size
        self.device_bytes = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
        if self.process_count > 1:
            import torch.distributed as dist

            if not dist.is_initialized():  # the closing barrier only: ranks never talk else
                dist.init_process_group("gloo")

    def _init_xla(self, batch_size: int) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        from .parallelize import build_mesh

        xr.use_spmd()
        self.device = torch_xla.device()
        self.process_index = xr.process_index()
        self.process_count = xr.process_count()
        self.accelerated = xr.device_type() != "CPU"
        self.mesh = build_mesh()
        local = xr.addressable_runtime_device_count()
        self.rows = -(-batch_size // local) * local  # per host: a multiple of its devices
        try:
            self.device_bytes: int | None = int(xm.get_memory_info(self.device)["bytes_limit"])
        except Exception:  # the CPU PJRT device reports no memory limit
            self.device_bytes = None
        if self.process_count > 1:
            import torch.distributed as dist
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers "xla://")

            if not dist.is_initialized():  # the hosts' lockstep flag and the closing barrier
                dist.init_process_group("gloo", init_method="xla://")
        self._compiled: Callable[..., Any] | None = None
        self._filler: dict[str, Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The encoders' weight dtype; None keeps them as loaded (float32)."""
        if self.precision == "bf16" or (self.precision == "auto" and self.accelerated):
            return torch.bfloat16
        return None

    def place(self, encoders: FrozenEncoders) -> FrozenEncoders:
        """Cast and move the encoders: replicated, or sharded when they do not fit a device."""
        if self.dtype is not None:
            encoders.to("cpu", self.dtype)
        weight_bytes = encoders.weight_bytes()
        fits = encoders_fit(weight_bytes, self.device_bytes)
        self.sharded = (not fits) if self.shard_weights is None else self.shard_weights
        if self.sharded and not self.is_xla:
            raise RuntimeError(
                f"the frozen encoders take {weight_bytes / 2**30:.1f} GiB, more than half of "
                f"{self.device} ({(self.device_bytes or 0) / 2**30:.1f} GiB); use GPUs of at "
                f"least {2 * weight_bytes / 2**30:.0f} GiB, or the xla path (which shards them)"
            )
        encoders.to(self.device)
        if self.is_xla:
            encoders.prepare_for_xla()
        if self.sharded:
            from .parallelize import shard_frozen_xla

            for module in (encoders.tokenizer, encoders.text_encoder):
                shard_frozen_xla(module, self.mesh)
        logger.info(
            "encoders on %s (%s, %s, %.2f GiB of weights), part %d of %d, %d rows per call",
            self.device, self.dtype or torch.float32, "sharded" if self.sharded else "replicated",
            weight_bytes / 2**30, self.part[0], self.part[1], self.rows,
        )  # fmt: skip
        return encoders

    def encode(self, encoders: FrozenEncoders, inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """Host inputs of 1 to ``rows`` samples -> their encoded rows as numpy arrays."""
        if not self.is_xla:
            out = encoders.encode_inputs({k: v.to(self.device) for k, v in inputs.items()})
            return {name: t.cpu().numpy() for name, t in out.items()}
        self._lockstep(True)
        return self._encode_xla(encoders, inputs)

    def finish(self, encoders: FrozenEncoders) -> None:
        """Keep this xla host in step with the others until every host is done."""
        if self.is_xla and self.process_count > 1:
            while self._lockstep(False):
                filler = self._filler
                if filler is None:  # this host encoded nothing: the program needs real shapes
                    raise RuntimeError("an xla host with no input shard cannot join the others")
                self._encode_xla(encoders, filler)

    def barrier(self) -> None:
        """Wait for every process of the run (torchrun ranks, xla hosts)."""
        if self.process_count > 1:
            import torch.distributed as dist

            dist.barrier()

    def _lockstep(self, more: bool) -> bool:
        """Whether any host has more to encode (xla hosts run one SPMD program in lockstep)."""
        if self.process_count == 1:
            return more
        import torch.distributed as dist

        flag = torch.tensor([int(more)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _encode_xla(
        self, encoders: FrozenEncoders, inputs: dict[str, Tensor]
    ) -> dict[str, np.ndarray]:
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs

        from .parallelize import batch_sharding

        count = next(iter(inputs.values())).shape[0]
        # Fixed shapes: a short batch is completed with copies of its last row (dropped below).
        full = {
            k: torch.cat([v, v[-1:].expand(self.rows - count, *v.shape[1:])])
            for k, v in inputs.items()
        }
        if self._compiled is None:
            self._filler = {k: v.clone() for k, v in full.items()}
            self._compiled = compile_xla_encode(encoders, self.mesh)
        sharding = batch_sharding(self.mesh, full, minibatch=self.process_count > 1)
        on_device = {
            name: xm.send_cpu_data_to_device(tensor, self.device, sharding[name])[0]
            for name, tensor in full.items()
        }
        out = self._compiled(on_device)
        xm.wait_device_ops()  # the graph runs asynchronously; its shards are read below
        arrays = {}
        for name, tensor in out.items():
            # This host's rows: the addressable shards of the batch-sharded output, in order
            # (a replicated dimension repeats a row block: keep one of each).
            blocks: dict[int, Tensor] = {}
            for shard in xs.XLAShardedTensor(tensor).local_shards:
                index = shard.indices
                start = index[0].start if isinstance(index, list | tuple) else None
                blocks.setdefault(start or 0, shard.data)
            rows = torch.cat([blocks[start] for start in sorted(blocks)])
            arrays[name] = rows.cpu().numpy()[:count]
        return arrays


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
    image_size: int | None = None,
    pad_to: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    shard_weights: bool | None = None,
    text_dtype: TextDtype = "float16",
    text_storage: TextStorage = "trimmed",
    part: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PreprocessResult:
    """Encode image shards ``data`` into ``out``; see the module docstring for the layout.

    ``image_size`` defaults to the tokenizer's; ``pad_to`` (the training text length L) to the
    text encoder's max length. ``batch_size``: images per encoder call (on xla per host,
    rounded up to a multiple of its devices). ``device``/``precision``/``shard_weights``: see
    ``EncodeRuntime``. ``part=(k, n)`` encodes every n-th input shard starting at k (one job's
    share), split again over torchrun ranks or xla hosts, whose part is read from the runtime.
    """
    if text_storage not in ("trimmed", "padded"):
        raise ValueError(f"text_storage must be 'trimmed' or 'padded'; got {text_storage!r}")
    _text_array(np.zeros((1, 1), np.float32), text_dtype)  # checks text_dtype
    runtime = EncodeRuntime(
        device, precision=precision, batch_size=batch_size, part=part, shard_weights=shard_weights
    )
    k, n = runtime.part
    # Loaded on the CPU, then cast and placed by the runtime (replicated or sharded).
    if not isinstance(tokenizer, nn.Module):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(text_encoder, nn.Module):
        text_encoder = load_text_encoder(text_encoder)
    spec = tokenizer.spec
    size = image_size or spec.image_size
    length = pad_to or text_encoder.max_length
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
        if target.is_file() and not overwrite:
            result.reused.append(target)
            continue
        skips: Counter[str] = Counter()
        written = write_shard(
            target,
            _encode_shard(
                url, encoders, runtime, image_size=size, skips=skips, stats=stats,
                text_dtype=text_dtype, text_storage=text_storage, progress=progress,
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
    padded_text = len(_npy(_text_array(np.zeros((length, width), np.float32), text_dtype)))
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
            "dtype": text_dtype,
            "storage": text_storage,
            "bf16_as": "uint16 bit pattern" if text_dtype == "bfloat16" else None,
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
            "text_per_sample_padded": padded_text if text_storage == "trimmed" else None,
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
