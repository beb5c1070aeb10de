"""The DiffLoss head: a small adaLN MLP that models p(x | z) per token by diffusion (MAR).

The trunk produces one condition vector z per token; the head learns the distribution of the
continuous token x given z with a per-token diffusion loss, and samples it with 100 respaced
ancestral steps. It also owns the continuous token input embedding, so a trunk never needs to
know whether its tokens are discrete or continuous.

Sizes (W = width, C = token_dim, D = cond_dim):
    token embedding   C·D + D
    input projection  C·W + W
    time embedding    256·W + W + W² + W
    cond projection   D·W + W
    each block        3W² + 3W (adaLN) + 2(W² + W) (MLP) + 2W (LayerNorm)
    final layer       2W² + 2W (adaLN) + 2C·W + 2C
    z readout         D·C + C  (only with ``regression_weight > 0``)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .config import DiffLossConfig
from .diffusion import GaussianDiffusion, create_diffusion

__all__ = ["DiffLossHead", "DiffLossMLP"]

FREQUENCY_DIM = 256  # sinusoidal timestep features, as DiT/MAR

SamplePath = Literal["fast", "reference"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[B, dim]`` (cos then sin) of (possibly fractional) steps ``t [B]``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """t -> 256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t).to(self.mlp[0].weight.dtype)  # [B, 256]
        return self.mlp(features)  # [B, W]


class ResBlock(nn.Module):
    """LayerNorm -> modulate -> Linear -> SiLU -> Linear, added back through an adaLN gate."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # [B, W] each
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> modulate -> Linear to 2C (ε and the variance interpolation)."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # [B, W] each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffLossMLP(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: (x_t [B, C], t [B], z [B, D]) -> [B, 2C].

    ``depth`` residual blocks of two linear layers each: depth 3 = the paper's "6 layers".
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero adaLN and output: every block starts as the identity and the head predicts
        # ε = 0 with the mid-range variance, so training starts from a calm, stable point.
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """The per-row reference: every row embeds its own t and projects its own z."""
        dtype = self.input_proj.weight.dtype
        y = self.time_embed(t) + self.cond_embed(z.to(dtype))  # [B, W]
        return self.forward_conditioned(x, y)

    def forward_conditioned(self, x: Tensor, y: Tensor) -> Tensor:
        """(x_t [B, C], y [B, W] = time embedding + condition projection) -> [B, 2C].

        Sampling builds y from a time embedding computed once per diffusion step and a
        condition projection computed once per call (``DiffLossHead.sample``)."""
        h = self.input_proj(x.to(self.input_proj.weight.dtype))  # [B, W]
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # [B, 2C]


def _guide(out: Tensor, cfg: float | Tensor, channels: int) -> Tensor:
    """[cond; uncond] outputs [2R, 2C] -> [R, 2C]: ε_u + cfg·(ε_c − ε_u), the cond variance."""
    out = out.float()
    rows = out.shape[0] // 2
    cond, uncond = out[:rows], out[rows:]
    eps = uncond[:, :channels] + cfg * (cond[:, :channels] - uncond[:, :channels])  # [R, C]
    return torch.cat([eps, cond[:, channels:]], dim=1)


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of ``values [M]``, weighted by ``weights [M]`` when given (fixed shapes, no sync)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


class DiffLossHead(nn.Module):
    """Per-token diffusion head for continuous tokens: ``embed``, ``loss``, ``sample``.

    Args:
        token_dim: channels C of a token (16 for SD-VAE latents grouped 2×2).
        cond_dim: width D of the trunk's per-token condition z.
        width: MLP width W (None: ``cond_dim``, as the paper).
        depth: residual blocks (3 blocks = 6 linear layers, the paper's setting).
        train_steps / sample_steps: diffusion steps for training / ancestral sampling.
        batch_mul: independent t per token in training (MAR's ``diffusion_batch_mul``).
        x0_bound: clamp of the predicted x_0 when sampling. None uses the running max |target|
            seen by ``loss`` in training mode (buffer ``target_abs_max``); ``float('inf')``
            disables the clamp.
        regression_weight: weight of an auxiliary loss added by ``loss``: a linear readout of z
            regressed onto the token (mean squared error over the same rows). 0 (the default)
            is the paper's objective and builds no readout.

    Why the auxiliary loss: z reaches the diffusion MLP only through zero-initialised adaLN
    layers, and the diffusion loss depends on z only in a band of noise levels, so the
    trunk learns slowly what its context says about a token. Measured on the shapes world
    (shapes-m, 1000 steps): a linear probe of the trunk's states predicts masked tokens no
    better with half the image visible than with none (MSE 0.237 vs 0.251), while with
    ``regression_weight=1`` the trunk uses its context and the diffusion loss itself ends
    lower (validation 0.0624 vs 0.0704).

    Stability: on the respaced schedule the first step (t 999 -> 989, ᾱ ≈ 2.4e-9) turns an
    error δ in ε̂ into about 316·δ in x. Early in training that sends 100-step samples into
    the hundreds or thousands; clamping x̂_0 to the range of the training targets keeps every step inside
    the data's range. For a well-trained head x̂_0 already lies in that range: a no-op.
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int | None = None,
        depth: int = 3,
        train_steps: int = 1000,
        sample_steps: int = 100,
        batch_mul: int = 4,
        *,
        x0_bound: float | None = None,
        regression_weight: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in [("token_dim", token_dim), ("cond_dim", cond_dim)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        # The one place MAR's argument name ``batch_mul`` (DESIGN.md §12) meets the config's.
        self.config = DiffLossConfig(
            depth=depth, width=width, train_steps=train_steps, sample_steps=sample_steps,
            diffusion_batch_mul=batch_mul, x0_bound=x0_bound, regression_weight=regression_weight,
        )  # fmt: skip
        self.token_dim = token_dim  # C, from the tokenizer
        self.cond_dim = cond_dim  # D, from the trunk
        mlp_width = width or cond_dim

        # The continuous token input embedding (MAR's z_proj): [B, N, C] -> [B, N, D].
        self.token_embed = nn.Linear(token_dim, cond_dim)
        self.net = DiffLossMLP(token_dim, cond_dim, mlp_width, depth)
        # Auxiliary readout z -> token (regression_weight > 0 only: no parameters otherwise).
        self.readout = nn.Linear(cond_dim, token_dim) if regression_weight > 0 else None
        self.train_diffusion: GaussianDiffusion = create_diffusion(train_steps)
        self.sample_diffusion: GaussianDiffusion = create_diffusion(train_steps, str(sample_steps))
        # Running max |target| over the rows that counted in training (0 = nothing seen yet).
        self.register_buffer("target_abs_max", torch.zeros(()))
        self._captured_step: Callable[..., Tensor] | None = None  # capture_sampling()
        self.reset_parameters()

    @classmethod
    def from_config(cls, token_dim: int, cond_dim: int, config: DiffLossConfig) -> DiffLossHead:
        """A head for C = ``token_dim`` channels conditioned on D = ``cond_dim`` with ``config``."""
        if not isinstance(config, DiffLossConfig):
            raise TypeError(f"config must be a DiffLossConfig; got {type(config).__name__}")
        return cls(
            token_dim, cond_dim, width=config.width, depth=config.depth,
            train_steps=config.train_steps, sample_steps=config.sample_steps,
            batch_mul=config.diffusion_batch_mul, x0_bound=config.x0_bound,
            regression_weight=config.regression_weight,
        )  # fmt: skip

    @property
    def width(self) -> int:
        """W, the MLP width (``config.width``, else the condition width)."""
        return self.config.width or self.cond_dim

    @property
    def x0_bound(self) -> float | None:
        """The sampling clamp of x0 (``config.x0_bound``); settable on a trained head."""
        return self.config.x0_bound

    @x0_bound.setter
    def x0_bound(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"x0_bound must be > 0, float('inf') or None; got {value!r}")
        self.config.x0_bound = value

    def reset_parameters(self) -> None:
        """MAR's initialisation, and a fresh (empty) target range: call after ``to_empty``."""
        nn.init.xavier_uniform_(self.token_embed.weight)
        nn.init.zeros_(self.token_embed.bias)
        if self.readout is not None:
            nn.init.xavier_uniform_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)
        self.net.reset_parameters()
        with torch.no_grad():
            self.target_abs_max.zero_()

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this head) to exclude from weight decay.

        The whole diffusion MLP (``net.*``), as MAR (its optimizer skips every ``diffloss``
        parameter). The token embedding is an ordinary input layer: its weight is decayed,
        its bias falls under the trainer's rule for 1-D parameters.
        """
        return {f"net.{name}" for name, _ in self.net.named_parameters()}

    # ------------------------------------------------------------------ verbs

    def embed(self, tokens: Tensor) -> Tensor:
        """Continuous tokens ``[B, N, C]`` -> trunk inputs ``[B, N, D]``."""
        if tokens.ndim < 2 or tokens.shape[-1] != self.token_dim:
            raise ValueError(
                f"tokens must be [..., {self.token_dim}] continuous tokens; got {list(tokens.shape)}"
            )
        return self.token_embed(tokens.to(self.token_embed.weight.dtype))

    def loss(
        self, target: Tensor, z: Tensor, mask: Tensor | None = None, *, readout: bool = True
    ) -> Tensor:
        """Mask-weighted mean hybrid diffusion loss (+ ``regression_weight`` × the readout's
        mask-weighted mean squared error, when set and ``readout``).

        Args:
            target: tokens ``[M, C]`` (any leading shape ``[..., C]`` is flattened).
            z: conditions ``[M, D]`` with the same leading shape.
            mask: ``[M]`` bool/float weights (True/1 = the token counts), or None for all.
            readout: False leaves the auxiliary term out: the paper's objective alone, what
                runs trained with and without it are compared on.
        """
        target, z, weights = self._check_loss_inputs(target, z, mask)
        if self.training:
            self._track_target_range(target, weights)
        regression = None
        if self.readout is not None and readout:
            error = (self.readout(z).float() - target.float()).pow(2).mean(dim=1)  # [M]
            regression = self.config.regression_weight * _weighted_mean(error, weights)
        k = self.config.diffusion_batch_mul
        # Tile, as MAR: k copies of every (target, z) row, each with its own t and noise.
        target = target.repeat(k, 1)  # [k·M, C]
        z = z.repeat(k, 1)  # [k·M, D]
        t = torch.randint(
            0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device
        )  # [k·M]
        per_row = self.train_diffusion.training_losses(
            lambda x_t, t_model: self.net(x_t, t_model, z), target, t
        ).loss  # [k·M]
        loss = _weighted_mean(per_row, None if weights is None else weights.repeat(k))
        return loss if regression is None else loss + regression

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        cfg: float | Tensor = 1.0,
        *,
        generator: torch.Generator | None = None,
        path: SamplePath = "fast",
        step_marker: Callable[[], None] | None = None,
    ) -> Tensor:
        """Draw one token per condition with ancestral sampling on the respaced schedule.

        ``z [M, D]`` -> ``[M, C]`` float32. For ``cfg != 1`` the caller stacks
        ``z = [z_cond; z_uncond]`` and gets ``[x; x]``: both halves start from and share the
        same noise, ε̂ = ε_u + cfg·(ε_c − ε_u), and the variance comes from the cond half
        (what MAR's kept half uses). ``generator`` must live on z's device.

        ``path="fast"`` (the default) does the work that does not depend on the row once: the
        condition projection of z once per call (it is the same for all diffusion steps) and
        the time embedding once per diffusion step (it is the same for every row); the same
        math as ``path="reference"``, MAR's per-row evaluation, to float rounding.
        A tensor ``cfg`` (0-d, on z's device) is always the guided path and never read on the
        host. ``step_marker`` is called after every diffusion step (e.g. ``torch_xla.sync``, so a
        lazy-tensor device compiles one step graph instead of unrolling the loop).
        """
        if z.ndim != 2 or z.shape[1] != self.cond_dim:
            raise ValueError(f"z must be [M, {self.cond_dim}]; got {list(z.shape)}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0; got {temperature}")
        if path not in ("fast", "reference"):
            raise ValueError(f"path must be 'fast' or 'reference'; got {path!r}")
        bound = self.effective_x0_bound()
        c = self.token_dim
        guided = isinstance(cfg, Tensor) or cfg != 1.0
        if guided and z.shape[0] % 2:
            raise ValueError(
                f"with cfg != 1, z must stack [z_cond; z_uncond] (an even number of rows); "
                f"got {z.shape[0]}"
            )
        rows = z.shape[0] // 2 if guided else z.shape[0]
        net = self.net
        noise = torch.randn((rows, c), generator=generator, device=z.device)  # x_T, not scaled
        if path == "fast" and isinstance(net, DiffLossMLP):
            x = self._sample_fast(z, noise, temperature, cfg, guided, bound, generator, step_marker)
            return torch.cat([x, x]) if guided else x

        def model(x: Tensor, t_model: Tensor) -> Tensor:  # MAR's per-row evaluation
            if not guided:
                return net(x, t_model, z)  # [M, 2C]
            out = net(torch.cat([x, x]), torch.cat([t_model, t_model]), z)
            return _guide(out, cfg, c)

        x = self.sample_diffusion.p_sample_loop(
            model,
            noise,
            temperature=temperature,
            x0_bound=bound,
            generator=generator,
            step_marker=step_marker,
        )  # [R, C]
        return torch.cat([x, x]) if guided else x

    def capture_sampling(self, enabled: bool = True, *, mode: str = "reduce-overhead") -> None:
        """On CUDA, run each diffusion step of ``sample`` as a compiled, captured graph.

        ``torch.compile(mode="reduce-overhead")`` records the step as a CUDA graph: one launch
        per step instead of ~40 small kernels, which is what bounds small batches. Only used
        for z on a CUDA device (CPU and XLA keep the plain loop). Not run in this project's
        CI, which has no GPU.
        """
        self._captured_step = (
            torch.compile(self._denoise_step, mode=mode, dynamic=False) if enabled else None
        )

    def _sample_fast(
        self,
        z: Tensor,
        noise: Tensor,
        temperature: float,
        cfg: float | Tensor,
        guided: bool,
        bound: Tensor | None,
        generator: torch.Generator | None,
        step_marker: Callable[[], None] | None,
    ) -> Tensor:
        """The ancestral loop with the row-independent work hoisted; same draws as the reference."""
        net = self.net
        cond_proj = net.cond_embed(z.to(net.input_proj.weight.dtype))  # [M, W], once per call
        step = self._denoise_step
        captured = self._captured_step
        if captured is not None and z.device.type == "cuda":
            step = captured
            if not isinstance(cfg, Tensor):  # data, not a constant: one graph for every scale
                cfg = torch.tensor(float(cfg), device=z.device)
        x = noise.float()  # [R, C]
        k = self.sample_diffusion.num_timesteps
        t = torch.full((x.shape[0],), k - 1, dtype=torch.int64, device=x.device)  # counted down
        for _ in range(k):
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if step is captured:
                torch.compiler.cudagraph_mark_step_begin()
                x = step(x, t, cond_proj, eps, cfg, temperature, bound, guided).clone()
            else:
                x = step(x, t, cond_proj, eps, cfg, temperature, bound, guided)
            t = t - 1
            if step_marker is not None:
                step_marker()
        return x

    def _denoise_step(
        self,
        x: Tensor,
        t: Tensor,
        cond_proj: Tensor,
        noise: Tensor,
        cfg: float | Tensor,
        temperature: float,
        bound: Tensor | None,
        guided: bool,
    ) -> Tensor:
        """x_t [R, C] -> x_{t-1}: ``GaussianDiffusion.p_sample`` with the MLP's y built from the
        call's condition projection [M, W] and one time embedding for all rows."""
        diffusion, net = self.sample_diffusion, self.net
        t_model = diffusion.model_timesteps(t)  # [R] original steps, all equal
        y = cond_proj + net.time_embed(t_model[:1])  # [M, W]: one row embedded, broadcast
        out = net.forward_conditioned(torch.cat([x, x]) if guided else x, y)  # [M, 2C]
        if guided:
            out = _guide(out, cfg, self.token_dim)
        pred = diffusion.p_mean_variance(out, x, t, x0_bound=bound)
        nonzero = (t != 0).to(x.dtype).view(-1, 1)  # no noise at t = 0
        return pred.mean + nonzero * torch.exp(0.5 * pred.log_variance) * noise * temperature

    # ------------------------------------------------------------------ helpers

    def effective_x0_bound(self) -> Tensor | None:
        """The clamp applied to x̂_0 in sampling (a 0-d tensor), or None for no clamp."""
        if self.x0_bound is not None:
            if math.isinf(self.x0_bound):
                return None
            if not self.x0_bound > 0:
                raise ValueError(f"x0_bound must be > 0, inf or None; got {self.x0_bound}")
            return torch.tensor(float(self.x0_bound), device=self.target_abs_max.device)
        tracked = self.target_abs_max.float()
        return torch.where(tracked > 0, tracked, torch.full_like(tracked, math.inf))

    @torch.no_grad()
    def _track_target_range(self, target: Tensor, weights: Tensor | None) -> None:
        # torch.maximum on a fixed-shape buffer: no .item(), compiles into the training step.
        row_max = target.detach().abs().amax(dim=1)  # [M]
        if weights is not None:
            row_max = torch.where(weights > 0, row_max, torch.zeros_like(row_max))
        # amax(dim=0), not amax(): torch_xla 2.9 returns the input unchanged for a dim-less amax.
        batch_max = row_max.amax(dim=0).to(self.target_abs_max.dtype)
        self.target_abs_max.copy_(torch.maximum(self.target_abs_max, batch_max))

    def _check_loss_inputs(
        self, target: Tensor, z: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if target.ndim < 2 or target.shape[-1] != self.token_dim:
            raise ValueError(
                f"target must be [M, {self.token_dim}] continuous tokens; got {list(target.shape)}"
            )
        lead = target.shape[:-1]
        if z.shape[:-1] != lead or z.shape[-1] != self.cond_dim:
            raise ValueError(
                f"z must be [{', '.join(map(str, lead))}, {self.cond_dim}] to match target "
                f"{list(target.shape)}; got {list(z.shape)}"
            )
        if mask is not None and mask.shape != lead:
            raise ValueError(f"mask must be {list(lead)} to match target; got {list(mask.shape)}")
        target = target.reshape(-1, self.token_dim).float()  # [M, C]
        z = z.reshape(-1, self.cond_dim)  # [M, D]
        weights = None if mask is None else mask.reshape(-1).float()  # [M]
        return target, z, weights
