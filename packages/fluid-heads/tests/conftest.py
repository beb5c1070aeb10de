"""Shared fixtures: an independent reference schedule, a known 2-D conditional distribution,
and one DiffLossHead trained on it (once per session, ~10-20 s on one CPU thread)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from fluid_heads import DiffLossHead


def reference_alphas_cumprod(num_steps: int = 1000) -> list[float]:
    """ᾱ_t of the clipped cosine schedule in plain Python floats (independent of the package)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(num_steps):
        beta = min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
        prod *= 1 - beta
        out.append(prod)
    return out


@pytest.fixture(scope="session")
def alphas_cumprod_1000() -> torch.Tensor:
    return torch.tensor(reference_alphas_cumprod(1000), dtype=torch.float64)


@dataclass(frozen=True)
class Mixture:
    """x | s ~ 0.6·N(m1(s), σ²I) + 0.4·N(m2(s), σ²I), s ∈ {−1, 0, 1}, z = (s, s², 1).

    The two modes stay ≥ 7σ apart for every s, so mode membership is unambiguous.
    """

    conditions: tuple[float, ...] = (-1.0, 0.0, 1.0)
    weight1: float = 0.6
    sigma: float = 0.15

    @staticmethod
    def modes(s: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(s)
        m1 = torch.stack([0.5 + 0.5 * s, 0.5 * one], dim=-1)  # [..., 2]
        m2 = torch.stack([-0.5 * one, -0.5 + 0.5 * s], dim=-1)  # [..., 2]
        return m1, m2

    @staticmethod
    def condition(s: Tensor) -> Tensor:
        return torch.stack([s, s * s, torch.ones_like(s)], dim=-1)  # [..., 3]

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        s = torch.tensor(self.conditions)[
            torch.randint(0, len(self.conditions), (n,), generator=generator)
        ]
        m1, m2 = self.modes(s)
        first = (torch.rand(n, generator=generator) < self.weight1).float()[:, None]
        x = first * m1 + (1 - first) * m2 + self.sigma * torch.randn(n, 2, generator=generator)
        return x, self.condition(s)

    def moments(self, s: float) -> tuple[Tensor, Tensor]:
        """True mean [2] and covariance [2, 2] of x | s."""
        m1, m2 = self.modes(torch.tensor([s], dtype=torch.float64))
        w = self.weight1
        mean = w * m1 + (1 - w) * m2  # [1, 2]
        cov = (
            self.sigma**2 * torch.eye(2, dtype=torch.float64)
            + w * (m1 - mean).T @ (m1 - mean)
            + (1 - w) * (m2 - mean).T @ (m2 - mean)
        )
        return mean[0], cov


@dataclass(frozen=True)
class TrainedHead:
    head: DiffLossHead
    mixture: Mixture
    data_abs_max: float  # max |x| over every training target


@pytest.fixture(scope="session")
def mixture() -> Mixture:
    return Mixture()


@pytest.fixture(scope="session")
def trained_head(mixture: Mixture) -> TrainedHead:
    """A DiffLossHead (W = 64, 3 blocks) trained 1200 steps on the mixture: about 12 s on one
    idle CPU thread. AdamW 3e-3 with linear decay gets means and covariances within ~0.02."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    steps = 1200
    head = DiffLossHead(2, 3, width=64)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    data_abs_max = 0.0
    head.train()
    for _ in range(steps):
        x, z = mixture.draw(128, generator)
        data_abs_max = max(data_abs_max, x.abs().max().item())
        loss = head.loss(x, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    return TrainedHead(head=head, mixture=mixture, data_abs_max=data_abs_max)


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


@pytest.fixture
def randomize():
    """``randomize(module)`` overwrites every parameter with noise, so that zero-initialised
    layers (adaLN, output) pass gradients and outputs depend on every input."""
    return _randomize
