from __future__ import annotations

import math

import pytest
import torch

from fluid_eval.loss import validation_loss


def test_mean_is_weighted_by_batch_size() -> None:
    batches = [torch.full((2,), 1.0), torch.full((6,), 3.0)]
    unweighted = validation_loss(lambda b: b.mean(), batches)
    weighted = validation_loss(lambda b: (b.mean(), len(b)), batches)
    assert unweighted.mean == pytest.approx(2.0) and weighted.mean == pytest.approx(2.5)
    assert weighted.total_weight == 8 and weighted.num_batches == 2
    assert validation_loss(lambda b: b.mean(), batches, max_batches=1).mean == pytest.approx(1.0)


def test_std_error_is_that_of_the_mean_over_batches() -> None:
    values = [1.0, 2.0, 4.0, 7.0]
    result = validation_loss(lambda v: v, values)
    sample_std = torch.tensor(values).std().item()
    assert result.std_error == pytest.approx(sample_std / math.sqrt(len(values)))
    assert math.isnan(validation_loss(lambda v: v, [1.0]).std_error)


def test_stochastic_objective_is_reproducible_and_leaves_the_callers_rng_alone() -> None:
    def noisy_loss(batch: torch.Tensor) -> torch.Tensor:
        return (batch + torch.randn_like(batch)).square().mean()  # like a random mask / timestep

    batches = [torch.zeros(16) for _ in range(4)]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = validation_loss(noisy_loss, batches, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = validation_loss(noisy_loss, batches, seed=0)
    c = validation_loss(noisy_loss, batches, seed=1)
    assert a.mean == b.mean and a.mean != c.mean


def test_runs_without_gradients() -> None:
    weight = torch.ones(3, requires_grad=True)
    seen = []
    validation_loss(
        lambda b: seen.append(torch.is_grad_enabled()) or (weight * b).sum(), [torch.ones(3)]
    )
    assert seen == [False]


def test_bad_losses_and_empty_sets_are_named() -> None:
    with pytest.raises(ValueError, match="validation batch 1 gave a non-finite loss"):
        validation_loss(lambda v: v, [1.0, float("nan")])
    with pytest.raises(ValueError, match="held-out set is empty"):
        validation_loss(lambda v: v, [])
    with pytest.raises(ValueError, match="loss of batch 0 must be a scalar"):
        validation_loss(lambda v: v, [torch.ones(2)])
    with pytest.raises(ValueError, match="weight 0.0"):
        validation_loss(lambda v: (v, 0.0), [1.0])
