"""Training routines for small tokenizers, so the shapes world has tokenizers of its own.

`train_vae`: reconstruction (L1 or L2) + a KL term toward N(0, I), decoding posterior samples.
`train_vq`: reconstruction + codebook + commitment terms with the straight-through estimator,
and dead-code restarts so a codebook trained from scratch stays in use.

Both take a tensor of images [M, 3, S, S] (shuffled without replacement, epoch by epoch) or
any iterable of batches (a DataLoader; a `(images, ...)` tuple takes its first element), run
AdamW with a linear warmup and a cosine decay, report `progress(step, metrics)` and return a
`TrainHistory`. They are deterministic given the model's initial weights and `seed`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .sd_vae import SDVAETokenizer
from .spec import check_images
from .vq import VQTokenizer

ReconstructionLoss = Literal["l1", "l2"]
Progress = Callable[[int, dict[str, float]], None]


@dataclass(kw_only=True, slots=True)
class TrainHistory:
    """Per-step training metrics: `metrics[name][i]` is the value at step i + 1."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.metrics.get("loss", ()))

    @property
    def loss(self) -> list[float]:
        return self.metrics.get("loss", [])

    @property
    def reconstruction(self) -> list[float]:
        return self.metrics.get("reconstruction", [])

    def record(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(value)


def _reconstruction(images: Tensor, target: Tensor, kind: ReconstructionLoss) -> Tensor:
    if kind == "l1":
        return F.l1_loss(images, target)
    if kind == "l2":
        return F.mse_loss(images, target)
    raise ValueError(f"loss must be 'l1' or 'l2'; got {kind!r}")


def _batches(
    images: Tensor | Iterable[Tensor | tuple[Tensor, ...]],
    *,
    image_size: int,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """Endless batches [B, 3, S, S]: shuffled epochs of a tensor, or passes over an iterable."""
    if isinstance(images, Tensor):
        check_images(images, image_size)
        count = images.shape[0]
        last_start = max(count - batch_size, 0)  # drop the ragged tail: every batch is full
        while True:
            order = torch.randperm(count, generator=generator)
            for start in range(0, last_start + 1, batch_size):
                yield images[order[start : start + batch_size]]
    one_shot = iter(images) is images  # a generator cannot be replayed
    while True:
        seen = 0
        for batch in images:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            check_images(batch, image_size, name=f"images batch {seen}")
            seen += 1
            yield batch
        if seen == 0:
            raise ValueError("images yielded no batches")
        if one_shot:
            return


def _lr_at(step: int, *, lr: float, steps: int, warmup_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to lr / 10 at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _check_common(steps: int, lr: float, batch_size: int, warmup_steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")


def _run(
    model: torch.nn.Module,
    step_fn: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]],
    batches: Iterator[Tensor],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float | None,
    progress: Progress | None,
    after_step: Callable[[int], None] | None = None,
) -> TrainHistory:
    """The shared AdamW loop; leaves the model in eval mode with its requires_grad flags restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    history = TrainHistory()
    start = time.perf_counter()
    model.train()
    model.requires_grad_(True)
    try:
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                warnings.warn(
                    f"images ran out after {step} of {steps} steps; training stopped early",
                    stacklevel=3,
                )
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, lr=lr, steps=steps, warmup_steps=warmup_steps)
            loss, terms = step_fn(batch.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {float(loss)} at step {step + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            metrics = {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}}
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            history.record(metrics)
            if progress is not None:
                progress(step + 1, metrics)
    finally:
        model.eval()
        for param, flag in zip(params, flags, strict=True):
            param.requires_grad_(flag)
        history.elapsed_s = time.perf_counter() - start
    return history


def train_vae(
    tokenizer: SDVAETokenizer,
    images: Tensor | Iterable[Tensor | tuple[Tensor, ...]],
    *,
    steps: int = 1000,
    lr: float = 2e-3,
    batch_size: int = 4,
    kl_weight: float = 1e-4,
    loss: ReconstructionLoss = "l2",
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainHistory:
    """Train the tokenizer's AutoencoderKL: reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

    The decoder sees posterior samples. The KL is summed over latent elements and divided by
    the number of pixel values (3*S*S), so `kl_weight` means what it does in the LDM code
    (a sum-reduced reconstruction with weight 1). Metrics: loss, reconstruction, kl, lr.
    Afterwards call `calibrate_scaling_factor` so the tokens have unit variance.
    """
    _check_common(steps, lr, batch_size, warmup_steps)
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0; got {kl_weight}")
    vae = tokenizer.vae
    device = next(vae.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    pixels = 3 * tokenizer.image_size**2

    def step_fn(batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch.to(vae.dtype)  # [B, 3, S, S]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=noise)  # [B, c, h, w]
        reconstructed = vae.decode(latents).sample  # [B, 3, S, S]
        rec = _reconstruction(reconstructed.float(), batch.float(), loss)
        kl = posterior.kl().float().mean() / pixels  # per pixel value, averaged over the batch
        return rec + kl_weight * kl, {"reconstruction": rec.detach(), "kl": kl.detach()}

    batches = _batches(
        images, image_size=tokenizer.image_size, batch_size=batch_size, generator=generator
    )
    return _run(
        vae,
        step_fn,
        batches,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        progress=progress,
    )


def train_vq(
    tokenizer: VQTokenizer,
    images: Tensor | Iterable[Tensor | tuple[Tensor, ...]],
    *,
    steps: int = 1000,
    lr: float = 2e-3,
    batch_size: int = 4,
    commitment_weight: float = 0.25,
    loss: ReconstructionLoss = "l2",
    dead_code_restart_every: int | None = 25,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainHistory:
    """Train the tokenizer's VQModel (VQ-VAE objective, straight-through gradients).

    loss = reconstruction + ||sg[z] - e||^2 (codebook) + commitment_weight * ||z - sg[e]||^2
    (commitment), as in van den Oord et al. The terms are computed here rather than taken from
    diffusers' VectorQuantizer, whose default ("legacy") loss puts the 0.25 on the codebook term.
    Every `dead_code_restart_every` steps, codes no batch chose since the last restart are
    re-seeded with encoder outputs of the current batch (None: never). Metrics: loss,
    reconstruction, codebook, commitment, perplexity (of the batch's code usage), lr.
    """
    _check_common(steps, lr, batch_size, warmup_steps)
    if commitment_weight < 0:
        raise ValueError(f"commitment_weight must be >= 0; got {commitment_weight}")
    if dead_code_restart_every is not None and dead_code_restart_every < 1:
        raise ValueError(
            f"dead_code_restart_every must be >= 1 or None; got {dead_code_restart_every}"
        )
    vq = tokenizer.vq
    codebook = vq.quantize.embedding.weight  # [K, D]
    device = codebook.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    usage = torch.zeros(tokenizer.vocab_size, device=device)
    recent: list[Tensor] = []  # pre-quantization vectors of the last batch, for restarts

    def step_fn(batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch.to(vq.dtype)  # [B, 3, S, S]
        latents = vq.encode(batch).latents  # [B, D, h, w]
        with torch.no_grad():
            ids = tokenizer.quantize(latents)  # [B, N]
        b, d, h, w = latents.shape
        quantized = (
            codebook[ids.reshape(-1)].reshape(b, h, w, d).permute(0, 3, 1, 2)
        )  # [B, D, h, w]
        codebook_term = F.mse_loss(quantized, latents.detach())
        commitment = F.mse_loss(latents, quantized.detach())
        straight = latents + (quantized - latents).detach()  # value of e, gradient to z
        spatial = straight if vq.config.norm_type == "spatial" else None
        reconstructed = vq.decoder(vq.post_quant_conv(straight), spatial)  # [B, 3, S, S]
        rec = _reconstruction(reconstructed.float(), batch.float(), loss)
        counts = torch.bincount(ids.reshape(-1), minlength=tokenizer.vocab_size).float()
        usage.add_(counts)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
        recent[:] = [latents.detach().permute(0, 2, 3, 1).reshape(-1, d)]  # [B*h*w, D]
        total = rec + codebook_term + commitment_weight * commitment
        terms = {
            "reconstruction": rec.detach(),
            "codebook": codebook_term.detach(),
            "commitment": commitment.detach(),
            "perplexity": perplexity,
        }
        return total, terms

    @torch.no_grad()
    def restart_dead_codes(step: int) -> None:
        if dead_code_restart_every is None or (step + 1) % dead_code_restart_every:
            return
        dead = (usage == 0).nonzero().squeeze(1)  # [n_dead]
        if dead.numel() and recent:
            vectors = recent[0]  # [M, D]
            pick = torch.randint(vectors.shape[0], (dead.numel(),), generator=generator)
            codebook[dead] = vectors[pick.to(vectors.device)].to(codebook.dtype)
        usage.zero_()

    batches = _batches(
        images, image_size=tokenizer.image_size, batch_size=batch_size, generator=generator
    )
    return _run(
        vq,
        step_fn,
        batches,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        progress=progress,
        after_step=restart_dead_codes,
    )
