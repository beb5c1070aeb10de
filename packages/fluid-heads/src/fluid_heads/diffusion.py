"""Gaussian diffusion for the per-token DiffLoss head: the numerics of the MAR code.

MAR (and DiT before it) inherits IDDPM's process: a cosine noise schedule over T = 1000 steps,
an epsilon-predicting model that also predicts an interpolation between the two natural
variances ("learned range"), the hybrid loss (epsilon MSE + the variational bound on a
detached mean), and ancestral sampling on a respaced schedule (100 steps) with the noise
scaled by a temperature. This module is written against torch (not numpy) so the training
loss is one fixed-shape graph: schedule constants are computed once in float64, stored as
float32 buffers and gathered by ``t`` -- no ``.item()``, no data-dependent shapes.

Timesteps: a (respaced) diffusion indexes its own steps ``0 .. num_timesteps - 1``; the model
is always called with the *original* step (``timesteps[t]``), so a head trained on the
1000-step process is sampled on 100 retained steps without retraining.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "DiffusionLoss",
    "GaussianDiffusion",
    "PosteriorPrediction",
    "cosine_alpha_bar",
    "cosine_betas",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "space_timesteps",
]

# model(x_t [B, C], t_original [B] int64) -> [B, 2C] (epsilon, variance interpolation v)
DiffusionModel = Callable[[Tensor, Tensor], Tensor]

_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- schedule


def cosine_alpha_bar(s: float) -> float:
    """ᾱ(s) = cos²(((s + 0.008) / 1.008) · π/2) for s = t/T in [0, 1] (Nichol & Dhariwal)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), i = 0 .. T−1, as float64 ``[T]``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps}")
    betas = [
        min(1.0 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The original steps retained by IDDPM's respacing rule, ascending.

    ``section_counts`` splits ``[0, num_timesteps)`` into equal sections and takes that many
    evenly (fractionally) strided steps from each, rounding with Python's ``round`` as IDDPM
    does: ``space_timesteps(1000, "100")`` keeps 0, 10, 20, 30, 40, 50, 61, …, 989, 999.
    ``"ddimN"`` asks for DDIM's integer stride instead.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"section_counts {section_counts!r}: no integer stride gives exactly "
                f"{desired} of {num_timesteps} steps"
            )
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"section_counts must be 'N', 'N1,N2,...' or 'ddimN'; got {section_counts!r}"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section_counts must be positive step counts; got {section_counts!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"section_counts {section_counts!r}: cannot take {count} steps from a section "
                f"of {size} (num_timesteps={num_timesteps})"
            )
        # The stride is fractional (999 / 99 for "100" of 1000) and accumulated by repeated
        # addition, exactly as IDDPM, so the retained set matches its checkpoints bit for bit.
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


# --------------------------------------------------------------------------- densities


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian discretised into 2/255-wide bins on [-1, 1], in nats (IDDPM).

    MAR applies this decoder term to latent tokens unchanged; we keep it for identical losses.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class PosteriorPrediction:
    """The model's reverse step p(x_{t-1} | x_t), all ``[B, C]`` float32."""

    mean: Tensor
    log_variance: Tensor
    pred_xstart: Tensor


@dataclass(frozen=True, slots=True)
class DiffusionLoss:
    """Per-row hybrid loss terms, each ``[B]``: ``loss = mse + vb`` (vb in bits)."""

    loss: Tensor
    mse: Tensor
    vb: Tensor


# --------------------------------------------------------------------------- process


class GaussianDiffusion(nn.Module):
    """A (possibly respaced) Gaussian diffusion with learned-range variance and ε-prediction.

    Args:
        betas: float64 ``[K]`` betas of the retained steps.
        timesteps: the original step index of each retained step ``[K]`` (identity when None);
            the model is called with these.

    Attributes ``betas`` (float64, CPU) and ``timesteps`` (int64, CPU) are the public record;
    the float32 constants used in the math are non-persistent buffers that follow ``.to()``
    (but always stay float32, see ``_apply``).
    """

    _CONSTANTS = (
        "timestep_map",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
        "log_betas",
    )

    def __init__(self, betas: Tensor, timesteps: Sequence[int] | Tensor | None = None) -> None:
        super().__init__()
        # The float64 masters live on the CPU whatever the default device (a model built
        # under `torch.device("meta")` for counting still needs real schedule values).
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D tensor of >= 2 steps; got shape {list(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        k = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(k, device="cpu")
        timesteps = torch.as_tensor(timesteps, dtype=torch.int64, device="cpu")
        if timesteps.shape != (k,) or not bool((timesteps[1:] > timesteps[:-1]).all()):
            raise ValueError(
                f"timesteps must be {k} ascending step indices; got {timesteps.tolist()}"
            )
        self.betas = betas
        self.timesteps = timesteps
        self.num_timesteps = k

        # All constants in float64 first (ᾱ reaches ~2e-9 at the last step), cast once.
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.alphas_cumprod = alphas_cumprod
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        self._float64 = {
            "timestep_map": timesteps,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * (1.0 - betas).sqrt()
            / (1.0 - alphas_cumprod),
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "log_betas": betas.log(),
        }
        for name in self._CONSTANTS:
            master = self._float64[name]
            value = master if master.dtype == torch.int64 else master.to(torch.float32)
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Follow the device of .to()/.cuda()/.to_empty(), but rebuild the values from the
        # float64 masters: never a dtype cast (a bf16 copy of ᾱ ≈ 2e-9 or of sqrt(1/ᾱ) ≈ 2e4
        # would ruin the first sampling steps) and never to_empty's uninitialised memory.
        super()._apply(fn, recurse)
        for name in self._CONSTANTS:
            master = self._float64[name]
            wanted = torch.int64 if master.dtype == torch.int64 else torch.float32
            self._buffers[name] = master.to(device=self._buffers[name].device, dtype=wanted)
        return self

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, original_steps={int(self.timesteps[-1]) + 1}"

    @staticmethod
    def _gather(constant: Tensor, t: Tensor, like: Tensor) -> Tensor:
        # [K] indexed by t [B] -> [B, 1, ...] broadcastable against like [B, C, ...]
        return constant.gather(0, t).view(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return (
            self._gather(self.posterior_mean_coef1, t, x_t) * x_start
            + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε̂."""
        return (
            self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        *,
        x0_bound: float | Tensor | None = None,
    ) -> PosteriorPrediction:
        """p(x_{t-1} | x_t) from the model output ``[B, 2C]`` = (ε̂, v).

        The log variance interpolates between the clipped posterior log variance (v = −1) and
        log β_t (v = +1). ``x0_bound`` clamps x̂_0 to ``[-bound, bound]`` before the posterior
        mean is formed (None: no clamp) -- see ``DiffLossHead`` for why sampling needs it.
        """
        channels = x_t.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"model_output must be [B, 2C] = [B, {2 * channels}] (epsilon, variance); "
                f"got {list(model_output.shape)}"
            )
        eps, var_values = model_output.float().split(channels, dim=1)  # [B, C] each
        min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._gather(self.log_betas, t, x_t)
        frac = (var_values + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if x0_bound is not None:
            bound = torch.as_tensor(x0_bound, dtype=pred_xstart.dtype, device=pred_xstart.device)
            pred_xstart = torch.clamp(pred_xstart, min=-bound, max=bound)
        mean = self.q_posterior_mean(pred_xstart, x_t, t)
        return PosteriorPrediction(mean=mean, log_variance=log_variance, pred_xstart=pred_xstart)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original step the model sees for this diffusion's step ``t``."""
        return self.timestep_map.gather(0, t)

    # ------------------------------------------------------------------ training

    def training_losses(
        self, model: DiffusionModel, x_start: Tensor, t: Tensor, *, noise: Tensor | None = None
    ) -> DiffusionLoss:
        """IDDPM's hybrid loss per row (loss type MSE with learned-range variance).

        ``mse`` = mean over channels of (ε − ε̂)²; ``vb`` = KL(q(x_{t-1}|x_t,x_0) ‖ p) in bits
        (the decoder NLL at t = 0) with the mean from a *detached* ε̂, so the bound trains only
        the variance. Not rescaled. Fixed shapes throughout: safe to compile once.
        """
        x_start = x_start.float()  # [B, C]
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)  # [B, C]
        model_output = model(x_t, self.model_timesteps(t)).float()  # [B, 2C]
        channels = x_start.shape[1]
        if model_output.shape != (x_start.shape[0], 2 * channels):
            raise ValueError(
                f"model output must be [B, 2C] = {[x_start.shape[0], 2 * channels]}; "
                f"got {list(model_output.shape)}"
            )
        eps, var_values = model_output.split(channels, dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)  # the bound must not move the mean
        pred = self.p_mean_variance(frozen, x_t, t)

        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t)
        kl = normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance)
        kl = kl.mean(dim=1) / _LOG2  # [B] bits
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=pred.mean, log_scales=0.5 * pred.log_variance
        )
        decoder_nll = decoder_nll.mean(dim=1) / _LOG2  # [B] bits
        vb = torch.where(t == 0, decoder_nll, kl)
        mse = (noise - eps).pow(2).mean(dim=1)  # [B]
        return DiffusionLoss(loss=mse + vb, mse=mse, vb=vb)

    # ------------------------------------------------------------------ sampling

    def p_sample(
        self,
        model: DiffusionModel,
        x: Tensor,
        t: Tensor,
        *,
        temperature: float = 1.0,
        x0_bound: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1}: mean + exp(½ logvar) · noise · temperature."""
        pred = self.p_mean_variance(model(x, self.model_timesteps(t)), x, t, x0_bound=x0_bound)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise at t = 0
        return pred.mean + nonzero * torch.exp(0.5 * pred.log_variance) * noise * temperature

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: DiffusionModel,
        noise: Tensor,
        *,
        temperature: float = 1.0,
        x0_bound: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        step_marker: Callable[[], None] | None = None,
    ) -> Tensor:
        """Ancestral sampling from x_T = ``noise`` (not scaled by the temperature) to x_0.

        The step index is a tensor counted down on the device (never a Python int baked
        into the step), so on a lazy-tensor device every step has the same graph;
        ``step_marker`` (e.g. ``torch_xla.sync``) runs after each step.
        """
        x = noise.float()
        t = torch.full((x.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x.device)
        for _ in range(self.num_timesteps):
            x = self.p_sample(
                model, x, t, temperature=temperature, x0_bound=x0_bound, generator=generator
            )
            t = t - 1
            if step_marker is not None:
                step_marker()
        return x


def create_diffusion(
    train_steps: int = 1000, sample_steps: int | str | None = None
) -> GaussianDiffusion:
    """The cosine-schedule diffusion of ``train_steps`` steps, respaced to ``sample_steps``.

    ``sample_steps=None`` keeps every step (the training process). Otherwise the IDDPM rule
    picks the retained steps (``space_timesteps``) and the betas are recomputed from the
    retained ᾱ: β_k = 1 − ᾱ_{s_k} / ᾱ_{s_{k−1}} (ᾱ_{s_{−1}} = 1).
    """
    if train_steps < 2:
        raise ValueError(f"train_steps must be >= 2; got {train_steps}")
    betas = cosine_betas(train_steps)
    if sample_steps is None:
        return GaussianDiffusion(betas)
    kept = torch.tensor(space_timesteps(train_steps, sample_steps), device="cpu")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[kept]  # float64 [K]
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return GaussianDiffusion(1.0 - alphas_cumprod / prev, timesteps=kept)
