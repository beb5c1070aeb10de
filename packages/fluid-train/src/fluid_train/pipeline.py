"""Prompts -> images: tokenizer + frozen T5 text encoder + FluidModel, saved as one directory.

Layout (each separately trained part in its own subfolder, as diffusers pipelines)::

    fluid_pipeline.json     names the parts, their classes and package versions
    tokenizer/              SDVAETokenizer or VQTokenizer (config.json + safetensors)
    text_encoder/           T5TextEncoder (public T5 layout + spiece.model)
    model/                  FluidModel: text aligner + trunk + head (config.json + model.safetensors)

A training run exports its EMA weights into ``RUN/pipeline/``; :func:`find_pipeline` and
``from_pretrained`` accept either the pipeline directory or the run directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from fluid_text import T5TextEncoder, TextStates

if TYPE_CHECKING:
    from fluid_tokenizers import SDVAETokenizer, VQTokenizer

from .__about__ import __version__
from .config import GenerationConfig
from .generation import resolve_options
from .model import FluidModel

PIPELINE_FILE = "fluid_pipeline.json"
PIPELINE_FORMAT = 1
_TOKENIZER_CLASSES = ("SDVAETokenizer", "VQTokenizer")
_PACKAGES = {
    "SDVAETokenizer": "fluid-tokenizers",
    "VQTokenizer": "fluid-tokenizers",
    "T5TextEncoder": "fluid-text",
    "FluidModel": "fluid-train",
}


def find_pipeline(path: str | os.PathLike) -> Path:
    """The pipeline directory of ``path``: itself if it holds fluid_pipeline.json, else ``path/pipeline``."""
    root = Path(path)
    for candidate in (root, root / "pipeline"):
        if (candidate / PIPELINE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{root} is not a Fluid pipeline: neither {root / PIPELINE_FILE} nor "
        f"{root / 'pipeline' / PIPELINE_FILE} exists (export one with FluidPipeline.save_pretrained "
        "or train a run)"
    )


def _package_version(class_name: str) -> str:
    module = {"fluid-tokenizers": "fluid_tokenizers", "fluid-text": "fluid_text"}.get(
        _PACKAGES[class_name]
    )
    if module is None:
        return __version__
    return __import__(module).__version__


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1]; got {list(images.shape)}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    return [Image.fromarray(a) for a in array]


def contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str], *, columns: int | None = None
) -> Image.Image:
    """A grid of ``images`` with each caption written (wrapped) under its image."""
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"need one caption per image and at least one image; got {len(images)} images "
            f"and {len(captions)} captions"
        )
    cols = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    font = ImageFont.load_default()
    line_height = 12
    chars_per_line = max(8, width // 6)
    wrapped = [_wrap(c, chars_per_line) for c in captions]
    text_height = line_height * max(len(lines) for lines in wrapped) + 4
    pad = 4
    sheet = Image.new(
        "RGB", (cols * (width + pad) + pad, rows * (height + text_height + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x = pad + (i % cols) * (width + pad)
        y = pad + (i // cols) * (height + text_height + pad)
        sheet.paste(image.convert("RGB").resize((width, height)), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + height + 2 + j * line_height), line, fill="black", font=font)
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines or [""]


class FluidPipeline:
    """Tokenizer + frozen T5 + FluidModel: ``pipe(prompts) -> list[PIL.Image]``.

    Also a ``fluid_eval`` Generator: ``generate(prompts)`` returns images with the defaults.
    """

    def __init__(
        self,
        *,
        tokenizer: SDVAETokenizer | VQTokenizer,
        text_encoder: T5TextEncoder,
        model: FluidModel,
    ) -> None:
        model.config.check_frozen_parts(tokenizer=tokenizer.spec, text_width=text_encoder.dim)
        self.tokenizer = tokenizer.eval()
        self.text_encoder = text_encoder
        self.model = model.eval()

    # ---- placement ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.trunk.pos_embed.device

    def to(self, device: torch.device | str) -> FluidPipeline:
        if torch.device(device).type == "xla":
            import torch_xla  # noqa: F401  (registers the "xla" device with torch)
        for part in (self.tokenizer, self.text_encoder, self.model):
            part.to(device)
        return self

    # ---- save / load ----------------------------------------------------------------------

    def save_pretrained(
        self, path: str | os.PathLike, *, weights: dict[str, Tensor] | None = None
    ) -> None:
        """Write every part to its subfolder; ``weights`` (the EMA) replace the model's own."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.model.save_pretrained(out / "model", weights=weights)
        parts = {
            "tokenizer": type(self.tokenizer).__name__,
            "text_encoder": type(self.text_encoder).__name__,
            "model": type(self.model).__name__,
        }
        manifest: dict[str, Any] = {
            "_class_name": "FluidPipeline",
            "format": PIPELINE_FORMAT,
            "fluid_train_version": __version__,
            "variant": self.model.config.variant,
            **{
                name: {
                    "class": cls,
                    "package": _PACKAGES[cls],
                    "version": _package_version(cls),
                    "subfolder": name,
                }
                for name, cls in parts.items()
            },
        }
        manifest["text_encoder"]["max_length"] = self.text_encoder.max_length
        (out / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        text_dtype: torch.dtype | None = None,
    ) -> FluidPipeline:
        """Load a pipeline directory (or a run directory holding ``pipeline/``)."""
        root = find_pipeline(path)
        manifest = json.loads((root / PIPELINE_FILE).read_text())
        if manifest.get("format") != PIPELINE_FORMAT:
            raise ValueError(
                f"{root / PIPELINE_FILE} has format {manifest.get('format')!r}; this fluid-train "
                f"reads format {PIPELINE_FORMAT}"
            )
        tokenizer_cls_name = manifest["tokenizer"]["class"]
        if tokenizer_cls_name not in _TOKENIZER_CLASSES:
            raise ValueError(
                f"{root / PIPELINE_FILE}: unknown tokenizer class {tokenizer_cls_name!r}; "
                f"expected one of {list(_TOKENIZER_CLASSES)}"
            )
        sub = {
            name: manifest[name].get("subfolder", name)
            for name in ("tokenizer", "text_encoder", "model")
        }
        import fluid_tokenizers

        tokenizer_cls = getattr(fluid_tokenizers, tokenizer_cls_name)
        tokenizer = tokenizer_cls.from_pretrained(root, subfolder=sub["tokenizer"])
        encoder_kwargs: dict[str, Any] = {"dtype": text_dtype}
        if "max_length" in manifest["text_encoder"]:
            encoder_kwargs["max_length"] = int(manifest["text_encoder"]["max_length"])
        text_encoder = T5TextEncoder.from_pretrained(root / sub["text_encoder"], **encoder_kwargs)
        model = FluidModel.from_pretrained(root, subfolder=sub["model"])
        return cls(tokenizer=tokenizer, text_encoder=text_encoder, model=model).to(device)

    # ---- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], *, names: Sequence[str] | None = None
    ) -> TextStates:
        """Frozen T5 states of the prompts: hidden [B, L, D_t], mask [B, L]; ``names`` label
        them in truncation warnings (default: their index in this call)."""
        return self.text_encoder.encode(list(prompts), names=names)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        # torch_xla has no device generators: on XLA a CPU generator seeds the device RNG.
        device = "cpu" if self.device.type == "xla" else self.device
        return torch.Generator(device=device).manual_seed(int(seed))

    @torch.no_grad()
    def generate_tokens(
        self,
        prompts: Sequence[str],
        options: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        cache: str = "on",
        **overrides: Any,
    ) -> Tensor:
        """Image tokens [P, N] or [P, N, C] for P prompts, ``batch_size`` prompts at a time.

        ``options`` and ``overrides`` as :func:`fluid_train.generation.generate` (a
        ``GenerationConfig``, its fields by keyword). ``seed`` seeds one generator used for
        all batches in order.
        """
        options = resolve_options(self.model, options, **overrides)
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str; got a single str")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; expected at least one prompt")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")
        if generator is None:
            generator = self._generator(seed)
        step = batch_size or len(prompts)
        out = []
        for start in range(0, len(prompts), step):
            batch = prompts[start : start + step]
            # Numbered in the whole list, not per batch (one SentencePiece pass).
            text = self.encode_prompts(batch, names=[f"prompt {start + i}" for i in range(len(batch))])  # fmt: skip
            tokens = self.model.generate(
                text.hidden.to(self.device),
                text.mask.to(self.device),
                options,
                generator=generator,
                progress=progress,
                cache=cache,
            )
            out.append(tokens)
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def decode(self, tokens: Tensor, *, batch_size: int | None = None) -> Tensor:
        """Tokens -> images [B, 3, H, W] in [-1, 1] through the tokenizer's decoder."""
        step = batch_size or tokens.shape[0]
        return torch.cat(
            [self.tokenizer.decode(tokens[i : i + step]) for i in range(0, len(tokens), step)]
        )

    def generate_tensors(
        self, prompts: Sequence[str], options: GenerationConfig | None = None, **kwargs: Any
    ) -> Tensor:
        """Images [P, 3, H, W] in [-1, 1]; arguments as :meth:`generate_tokens`."""
        tokens = self.generate_tokens(prompts, options, **kwargs)
        return self.decode(tokens, batch_size=kwargs.get("batch_size"))

    def __call__(
        self, prompts: Sequence[str], options: GenerationConfig | None = None, **kwargs: Any
    ) -> list[Image.Image]:
        """One PIL image per prompt; ``options`` (a ``GenerationConfig``, default the model's)
        and keywords as :meth:`generate_tokens` (``seed=0, num_steps=32, cfg=4.0``)."""
        return to_pil(self.generate_tensors(prompts, options, **kwargs))

    def generate(self, prompts: Sequence[str]) -> list[Image.Image]:
        """fluid_eval's Generator protocol: images for ``prompts`` with the default options."""
        return self(prompts)

    def sampler(
        self,
        options: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        progress: bool = False,
        **overrides: Any,
    ) -> PipelineSampler:
        """A fluid_eval Generator with fixed options; ``seed`` seeds one generator for all calls."""
        return PipelineSampler(
            pipeline=self,
            generator=self._generator(seed),
            options=resolve_options(self.model, options, **overrides),
            progress=progress,
        )


@dataclass(slots=True)
class PipelineSampler:
    """``generate(prompts)`` with fixed sampling options and one generator across calls, so a
    sequence of batches (e.g. fluid_eval.write_generations) is reproducible from one seed."""

    pipeline: FluidPipeline
    generator: torch.Generator | None
    options: GenerationConfig
    progress: bool = False

    def generate(self, prompts: Sequence[str]) -> list[Image.Image]:
        return self.pipeline(
            prompts, self.options, generator=self.generator, progress=self.progress
        )
