"""Generation on a torch_xla device: a small fixed set of graphs, whatever the step count.

A lazy-tensor device records every op until a step marker and compiles what it recorded as one
graph. The eager loops of :mod:`fluid_train.generation` would record a whole generation (K steps
× 100 diffusion steps) as one unrolled graph whose shapes change with the reveal count of each
step. Here the loops stay on the host and every graph has fixed shapes:

- ``torch_xla.sync()`` after the text work, after each trunk pass (an AR-step boundary) and
  after every ``DIFFUSION_STEPS_PER_GRAPH`` diffusion steps of the DiffLoss head
  (``DiffLossHead.sample(step_marker=...)``), so no graph spans more than one AR step;
- the step's counts (masked before/after, the guidance scale, MaskGIT's annealed temperature)
  are device tensors uploaded per step, not Python numbers baked into a graph, and the diffusion
  step index is counted down on the device;
- random order reveals a fixed number of rows per step, the schedule's largest reveal count
  ``k_max``: the rows revealed at a step are found by comparing each position's rank in the
  order with the step's counts (sort/compare, no boolean indexing); padding rows go through the
  head too and are scattered into a discarded extra slot. MaskGIT's confidence order samples all
  N positions (one softmax pass) and keeps the least confident by rank;
- raster writes token i with ``index_copy`` at a device position into preallocated buffers (the
  trunk's KV cache already works that way).

So the graphs are: the text (aligner + K/V), the trunk pass, the head's first and steady
chunks of diffusion steps, and the remainder with the reveal — 2 to 6 for any K and any batch
content (tests/test_xla_generation.py counts them). The device RNG differs from PyTorch's: the random order is drawn on the host with the
caller's generator (the same order as eager with that CPU generator), and the device RNG is
seeded from it, so a seed gives the same tokens on every run and the same distribution as eager.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fluid_heads import TokenSample

from .masking import cfg_scale, gumbel_noise, random_order, reveal_schedule

if TYPE_CHECKING:
    from .generation import _Start
    from .model import FluidModel, GenerationConfig

_Step = tuple[Tensor, Tensor]  # a random-order step's (tokens [B, N(, C)], mask after [B, N])


# Diffusion steps traced into one graph: 10x fewer graph launches, still a fixed set of graphs
# (first chunk, steady chunk, remainder). On the CPU PJRT device the debug preset's time did
# not change (it is bound by tracing the ops, not by launches); on a TPU launches cost more.
DIFFUSION_STEPS_PER_GRAPH = 10


def is_xla(device: torch.device) -> bool:
    return device.type == "xla"


def _sync() -> None:
    import torch_xla

    torch_xla.sync()


def _every(n: int) -> Callable[[], None]:
    """A step marker that syncs at every n-th call."""
    calls = 0

    def marker() -> None:
        nonlocal calls
        calls += 1
        if calls % n == 0:
            _sync()

    return marker


def _seed_device(generator: torch.Generator | None, device: torch.device) -> None:
    """Seed the XLA RNG from the caller's (CPU) generator: one draw, so batches differ."""
    if generator is None:
        return
    import torch_xla.core.xla_model as xm

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    xm.set_rng_state(seed, device=device)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            "on an XLA device, generator must be a CPU torch.Generator (torch_xla has no device "
            f"generators; the device RNG is seeded from it); got one on {generator.device}"
        )


def _scalars(values: list[float], device: torch.device) -> Tensor:
    """Per-step numbers as device data [len(values)]: never graph constants.

    One 1-D upload, indexed in the graph: torch_xla keeps 0-d uploads in a cache keyed by
    value, so a 0-d scale that happened to equal another scalar of the graph (2.0, say) would
    share its buffer and change the graph's parameter list — a new compile for that step.
    """
    return torch.tensor(values, dtype=torch.float32, device=device)


def progress_steps(total: int, progress: bool) -> Any:
    """``range(total)`` with a generation progress bar (shown when ``progress``)."""
    return tqdm(
        range(total), total=total, desc="generate", unit="step", leave=False, disable=not progress
    )


def _head_sample(
    model: FluidModel, start: _Start, z: Tensor, scale: Tensor, *, with_logprob: bool = False
) -> Any:
    """Head sampling of M rows (z [2M, D] = [cond; uncond] when guided) -> M tokens.

    ``scale`` is a 0-d device tensor: the heads take a tensor scale as the guided path without
    reading it on the host, and the graph gets it as data (a Python 2.0 or 1.0 would become a
    constant of its own graph).
    """
    guided, options = start.guided, start.options
    m = z.shape[0] // 2 if guided else z.shape[0]
    kwargs: dict[str, Any] = {"temperature": options.temperature, "cfg": scale if guided else 1.0}
    if model.config.tokens == "discrete":
        kwargs["top_k"] = options.top_k
    else:
        # A graph per DIFFUSION_STEPS_PER_GRAPH diffusion steps, never the whole loop; the
        # remainder joins the graph that follows the head.
        kwargs["step_marker"] = _every(DIFFUSION_STEPS_PER_GRAPH)
    if with_logprob:
        sample = model.head.sample_with_logprob(z, **kwargs)
        return TokenSample(ids=sample.ids[:m], logprob=sample.logprob[:m])
    return model.head.sample(z, **kwargs)[:m]  # [M] or [M, C]


def xla_start(
    model: FluidModel,
    text_hidden: Tensor,
    text_mask: Tensor,
    options: GenerationConfig,
    generator: torch.Generator | None,
    *,
    progress: bool,
) -> _Start:
    """The loops' shared start (``generation._start``), once the generator is checked; what
    ``generate`` hands ``generate_random_order`` / ``generate_raster``."""
    from . import generation

    _check_generator(generator)
    _sync()  # ops pending from before (e.g. moving the model) get their own graph, not ours
    return generation._start(model, text_hidden, text_mask, options, generator, progress=progress)


def generate_random_order(model: FluidModel, start: _Start) -> Tensor:
    from .generation import _stack

    options, generator, progress = start.options, start.generator, start.progress
    bsz, n, device, guided, tokens = (
        start.batch, start.num_tokens, start.device, start.guided, start.tokens
    )  # fmt: skip
    schedule = reveal_schedule(n, options.num_steps)  # masked count after each step
    before = [n, *schedule[:-1]]
    order = random_order(bsz, n, device="cpu", generator=generator).to(device)  # [B, N]
    _seed_device(generator, device)
    rank = order.argsort(dim=1)  # [B, N]: the rank of each position in its image's order
    mask = torch.ones(bsz, n, dtype=torch.bool, device=device)  # [B, N] True = still masked
    k_max = max(b - a for b, a in zip(before, schedule, strict=True))  # rows per head pass
    slots = torch.arange(k_max, device=device)  # [k_max]
    steps = _RandomOrderSteps(model, start, order, rank, slots)
    _sync()
    for step in progress_steps(len(schedule), progress):
        masked, masked_after = before[step], schedule[step]
        counts = torch.tensor([masked, masked_after], dtype=torch.long, device=device)  # [2]
        anneal = options.choice_temperature * (1.0 - (step + 1) / options.num_steps)
        values = _scalars(
            [
                cfg_scale(
                    options.cfg, options.cfg_schedule, num_tokens=n, masked_after=masked_after
                ),
                anneal,
            ],
            device,
        )  # [2]: the guidance scale, MaskGIT's annealed temperature
        x = _stack(model.head.embed(tokens), guided)  # [B', N, D]
        h = model.trunk(x, _stack(mask, guided), text_kv=start.text_kv)  # [B', N, D]
        _sync()
        if options.order_policy == "confidence":
            tokens, mask = steps.by_confidence(h, tokens, mask, counts, values)
        else:
            tokens, mask = steps.by_order(h, tokens, counts, values[0])
        _sync()
    return tokens


@dataclasses.dataclass(frozen=True, slots=True)
class _RandomOrderSteps:
    """What every step of the random-order loop shares; a step returns (tokens, mask after)."""

    model: FluidModel
    start: _Start
    order: Tensor  # [B, N] the positions in reveal order
    rank: Tensor  # [B, N] each position's rank in its image's order
    slots: Tensor  # [k_max] the rows revealed per head pass

    def by_order(self, h: Tensor, tokens: Tensor, counts: Tensor, scale: Tensor) -> _Step:
        """Reveal the ranks [masked_after, masked) of each image's order through k_max head
        rows; ``counts`` = [masked, masked_after]."""
        from .generation import _stack

        bsz, n = self.rank.shape
        k_max = self.slots.shape[0]
        masked, masked_after = counts[0], counts[1]
        slot_rank = masked_after + self.slots  # [k_max] the ranks this step reveals, then padding
        valid = slot_rank < masked  # [k_max]
        positions = self.order.gather(1, slot_rank.clamp(max=n - 1).expand(bsz, k_max))
        guided = self.start.guided
        rows = h.gather(1, _stack(positions, guided)[..., None].expand(-1, -1, h.shape[-1]))
        sampled = _head_sample(self.model, self.start, rows.flatten(0, 1), scale)
        sampled = sampled.reshape(bsz, k_max, *tokens.shape[2:]).to(tokens.dtype)
        # Padding slots write into slot N, dropped after the scatter: no duplicate real index.
        target = torch.where(valid, positions, torch.full_like(positions, n))  # [B, k_max]
        padded = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1)  # [B, N+1(, C)]
        index = target if tokens.ndim == 2 else target[..., None].expand(-1, -1, tokens.shape[-1])
        tokens = padded.scatter(1, index, sampled)[:, :n]
        return tokens, self.rank < masked_after  # [B, N]

    def by_confidence(
        self, h: Tensor, tokens: Tensor, mask: Tensor, counts: Tensor, values: Tensor
    ) -> _Step:
        """MaskGIT over all N positions: the masked_after least confident masked ones stay
        masked; ``values`` = [guidance scale, annealed choice temperature]."""
        bsz, n = mask.shape
        sample = _head_sample(
            self.model, self.start, h.flatten(0, 1), values[0], with_logprob=True
        )  # ids, logprob [B*N]
        noise = gumbel_noise((bsz, n), device=tokens.device, generator=None)  # [B, N]
        confidence = sample.logprob.view(bsz, n) + values[1] * noise  # [B, N]
        # Revealed positions rank after every masked one, so they are never chosen to stay masked.
        confidence = torch.where(mask, confidence, torch.full_like(confidence, float("inf")))
        keep_rank = confidence.argsort(dim=1).argsort(dim=1)  # [B, N] least confident first
        still = keep_rank < counts[1]  # [B, N]
        revealed = mask & ~still
        tokens = torch.where(revealed, sample.ids.view(bsz, n), tokens)
        return tokens, still


def generate_raster(model: FluidModel, start: _Start) -> Tensor:
    from .generation import _stack

    options, generator, progress = start.options, start.generator, start.progress
    n, device, guided, tokens = start.num_tokens, start.device, start.guided, start.tokens
    _seed_device(generator, device)
    position = torch.zeros(1, dtype=torch.long, device=device)  # [1] the token being written
    _sync()
    x_prev = None
    for i in progress_steps(n, progress):
        h = model.trunk.step(x_prev, start.kv_cache)[:, 0]  # [B', D]
        _sync()
        scale = _scalars(
            [cfg_scale(options.cfg, options.cfg_schedule, num_tokens=n, masked_after=n - i - 1)],
            device,
        )[0]
        token = _head_sample(model, start, h, scale)
        token = token.to(tokens.dtype)  # [B] or [B, C]
        tokens = tokens.index_copy(1, position, token[:, None])
        position = position + 1
        x_prev = _stack(model.head.embed(token[:, None]), guided)  # [B', 1, D]
        _sync()
    return tokens
