"""The frozen encoders — the image tokenizer and T5 — and where they run.

``FrozenEncoders`` splits encoding into a host half (SentencePiece) and a device half (the
tokenizer and T5 under ``no_grad``) so the device half can be placed and compiled on its own;
``EncodeRuntime`` runs it on the CPU, one CUDA device (``cuda:LOCAL_RANK`` under torchrun) or
every device of a torch_xla host (SPMD), replicating the weights when they take at most half
of one device's memory and sharding them over the xla mesh otherwise (``encoders_fit``).
``fluid preprocess`` (``fluid_train.preprocess``) and training on image shards both use them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from . import process_group

__all__ = [
    "EncodeRuntime",
    "FrozenEncoders",
    "compile_xla_encode",
    "encoders_fit",
    "load_text_encoder",
    "load_tokenizer",
    "text_encoder_width",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- loading the parts


def _part(path: str | os.PathLike, name: str) -> tuple[Path, dict[str, Any]]:
    """``path`` itself, or, when ``path`` is a pipeline directory, the folder its manifest names
    for part ``name`` (default ``name``/) with that part's manifest entry ({} for a part's own
    folder): what ``FluidPipeline.from_pretrained`` reads."""
    from .pipeline import PIPELINE_FILE

    root = Path(path)
    manifest = root / PIPELINE_FILE
    if not manifest.is_file():
        return root, {}
    entry = json.loads(manifest.read_text()).get(name) or {}
    return root / entry.get("subfolder", name), entry


def _part_config(root: Path, *, what: str, saved: str) -> dict[str, Any]:
    """The ``config.json`` of a saved part; ``what``/``saved`` name the part in the error."""
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{what} {root} has no config.json ({saved})")
    return json.loads(config_file.read_text())


def load_tokenizer(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """An ``SDVAETokenizer`` or ``VQTokenizer`` from a saved directory (diffusers layout; the
    class is read from ``config.json``'s ``_class_name``), or from a pipeline's ``tokenizer/``."""
    import fluid_tokenizers

    root, _ = _part(path, "tokenizer")
    config = _part_config(root, what="tokenizer", saved="a saved tokenizer dir")
    class_name = config.get("_class_name")
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
    """The frozen ``T5TextEncoder`` of a saved directory, or of a pipeline's ``text_encoder/``
    at the max length the pipeline was saved with (``max_length`` overrides it)."""
    from fluid_text import T5TextEncoder

    root, entry = _part(path, "text_encoder")
    if max_length is None and "max_length" in entry:
        max_length = int(entry["max_length"])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return T5TextEncoder.from_pretrained(root, **kwargs).to(device)


def text_encoder_width(path: str | os.PathLike) -> int:
    """``d_model`` of a saved T5 encoder, read from its ``config.json`` (no weights loaded)."""
    root, _ = _part(path, "text_encoder")
    config = _part_config(root, what="text encoder", saved="a saved T5 encoder dir")
    if "d_model" not in config:
        raise ValueError(
            f"text encoder {root / 'config.json'} has no d_model; expected a T5 config"
        )
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
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        # The encoder names each cut caption itself: one SentencePiece pass per batch.
        ids, mask = self.text_encoder.tokenize(list(captions), pad_to=self.text_length, names=names)
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
            process_group.join()  # the closing barrier only: ranks never talk else

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
            process_group.join(xla=True)  # the hosts' lockstep flag and the closing barrier
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
        process_group.barrier()

    def _lockstep(self, more: bool) -> bool:
        """Whether any host has more to encode (xla hosts run one SPMD program in lockstep)."""
        return process_group.any_true(more)

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
