from __future__ import annotations

import math

import pytest
import torch

from fluid_heads.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)

# --------------------------------------------------------------------------- schedule


def test_cosine_betas_match_the_closed_form(alphas_cumprod_1000):
    d = create_diffusion(1000)
    assert d.betas.dtype == torch.float64 and d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(4.128e-05, rel=1e-3)
    assert d.betas[-1].item() == 0.999  # clipped at max_beta
    assert torch.all(d.betas > 0) and torch.all(d.betas <= 0.999)
    assert torch.equal(d.timesteps, torch.arange(1000))
    # ᾱ from the package agrees with an independent float64 product of the cosine betas.
    torch.testing.assert_close(d.alphas_cumprod, alphas_cumprod_1000, rtol=1e-12, atol=0)
    assert d.alphas_cumprod[-1].item() == pytest.approx(2.4e-9, rel=0.02)


def test_space_timesteps_follows_the_iddpm_rule():
    kept = space_timesteps(1000, "100")
    assert len(kept) == 100
    assert kept[:8] == [0, 10, 20, 30, 40, 50, 61, 71]  # fractional stride 999/99
    assert kept[-2:] == [989, 999]
    assert space_timesteps(1000, 100) == kept == space_timesteps(1000, [100])
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    # IDDPM's docstring example: 300 steps in three sections of 10, 15 and 20.
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45
    assert sum(s < 100 for s in sections) == 10 and sum(s >= 200 for s in sections) == 20
    assert space_timesteps(1000, "1000") == list(range(1000))


@pytest.mark.parametrize("bad", ["abc", "0", "2000", "ddim999"])
def test_space_timesteps_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(1000, bad)


def test_respaced_betas_are_recomputed_from_the_retained_alpha_bar(alphas_cumprod_1000):
    d = create_diffusion(1000, 100)
    kept = space_timesteps(1000, "100")
    assert d.timesteps.tolist() == kept and d.num_timesteps == 100
    assert d.betas.dtype == torch.float64 and d.betas.shape == (100,)
    retained = alphas_cumprod_1000[kept]
    expected = 1 - retained / torch.cat([torch.ones(1, dtype=torch.float64), retained[:-1]])
    torch.testing.assert_close(d.betas, expected, rtol=1e-10, atol=0)
    assert d.betas[0].item() == pytest.approx(4.128e-05, rel=1e-3)  # step 0 is kept as is
    assert d.betas[-1].item() == pytest.approx(1 - 2.4287e-9 / retained[-2].item(), rel=1e-9)


def test_constants_follow_the_device_but_stay_float32():
    d = create_diffusion(1000, 100).to(torch.bfloat16)
    assert d.sqrt_recipm1_alphas_cumprod.dtype == torch.float32
    assert d.timestep_map.dtype == torch.int64
    assert d.betas.dtype == torch.float64
    torch.testing.assert_close(
        d.sqrt_recipm1_alphas_cumprod.double(),
        (1 / create_diffusion(1000, 100).alphas_cumprod - 1).sqrt(),
        rtol=1e-6,
        atol=0,
    )
    assert d.state_dict() == {}  # derived from the config, never saved


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="timesteps"):
        GaussianDiffusion(torch.tensor([0.1, 0.2]), timesteps=[5, 3])


# --------------------------------------------------------------------------- densities


def test_normal_kl_known_values():
    zero = torch.zeros(3)
    assert torch.equal(normal_kl(zero, zero, zero, zero), zero)
    # KL(N(1, 1) || N(0, e^2)) = ½(−1 + 2 − 0 + e^{−2} + e^{−2})
    value = normal_kl(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0))
    assert value.item() == pytest.approx(0.5 * (1 + 2 * math.exp(-2)), rel=1e-6)


def test_discretized_likelihood_is_a_distribution_over_the_255_bins():
    centers = torch.linspace(-1, 1, 256)  # uint8 values rescaled to [-1, 1]
    for mean, log_scale in [(0.0, -3.0), (0.7, -1.0), (-0.95, -4.0)]:
        log_p = discretized_gaussian_log_likelihood(
            centers,
            means=torch.full_like(centers, mean),
            log_scales=torch.full_like(centers, log_scale),
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


# --------------------------------------------------------------------------- training loss


def _point_mass_model(d: GaussianDiffusion, x0: torch.Tensor, v: float, alphas_cumprod):
    """The exact ε for data that is always x0, with variance interpolation v."""

    def model(x_t, t_original):
        a = alphas_cumprod[t_original].float()[:, None]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_hybrid_loss_vanishes_for_the_exact_model(alphas_cumprod_1000):
    d = create_diffusion(1000)
    x0 = torch.tensor([[0.3, -0.2, 0.5]]).repeat(64, 1)
    t = torch.randint(1, 1000, (64,), generator=torch.Generator().manual_seed(0))
    exact = d.training_losses(_point_mass_model(d, x0, -1.0, alphas_cumprod_1000), x0, t)
    assert exact.loss.shape == (64,)
    assert exact.mse.max().item() < 1e-4  # ε̂ = ε
    assert exact.vb.abs().max().item() < 1e-3  # v = −1: exactly the true posterior
    wrong_var = d.training_losses(_point_mass_model(d, x0, 1.0, alphas_cumprod_1000), x0, t)
    assert wrong_var.vb.mean().item() > 100 * exact.vb.abs().mean().item()
    # ε̂ = 0: the MSE is the mean squared noise, the loss is MSE + vb in bits
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    zero = d.training_losses(lambda x, t: torch.zeros(x.shape[0], 6), x0, t, noise=noise)
    torch.testing.assert_close(zero.mse, noise.pow(2).mean(1))
    torch.testing.assert_close(zero.loss, zero.mse + zero.vb)


def test_decoder_nll_is_used_at_t0(alphas_cumprod_1000):
    d = create_diffusion(1000)
    x0 = torch.full((4, 2), 0.5)
    t = torch.zeros(4, dtype=torch.int64)
    out = d.training_losses(_point_mass_model(d, x0, -1.0, alphas_cumprod_1000), x0, t)
    # At t = 0 the vb term is the decoder NLL of the 2/255 bin around x0 under N(x0, β̃_1)
    # (the clipped posterior variance): −log2 P(|N(0, 1)| < (1/255) / sqrt(β̃_1)).
    a0, a1 = alphas_cumprod_1000[0].item(), alphas_cumprod_1000[1].item()
    posterior_var_1 = (1 - a1 / a0) * (1 - a0) / (1 - a1)
    bits = -math.log2(math.erf((1 / 255) / math.sqrt(posterior_var_1) / math.sqrt(2)))
    torch.testing.assert_close(out.vb, torch.full((4,), bits), rtol=5e-3, atol=0)
    torch.testing.assert_close(out.loss, out.mse + out.vb)
    off = d.training_losses(_point_mass_model(d, x0 + 0.1, -1.0, alphas_cumprod_1000), x0, t)
    assert off.vb.min().item() > 10  # a mean 0.1 away is many bits off


def test_variational_bound_trains_only_the_variance():
    d = create_diffusion(1000)
    output = torch.randn(16, 4, requires_grad=True)  # [B, 2C] as a leaf
    x0 = torch.randn(16, 2)
    t = torch.randint(0, 1000, (16,))
    losses = d.training_losses(lambda x, t: output, x0, t)
    (grad_vb,) = torch.autograd.grad(losses.vb.sum(), output, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :2]) == 0 and torch.count_nonzero(grad_vb[:, 2:]) > 0
    (grad_mse,) = torch.autograd.grad(losses.mse.sum(), output)
    assert torch.count_nonzero(grad_mse[:, 2:]) == 0 and torch.count_nonzero(grad_mse[:, :2]) > 0


# --------------------------------------------------------------------------- sampling


def test_respaced_model_sees_the_original_timesteps():
    d = create_diffusion(1000, 100)
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1])

    d.p_sample_loop(model, torch.randn(3, 2))
    assert seen == list(reversed(space_timesteps(1000, "100")))


def _gaussian_oracle(alphas_cumprod, mu: float, std: float, v: float):
    def model(x_t, t):
        a = alphas_cumprod[t].float()[:, None]
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * std**2 + 1 - a)  # E[ε | x_t]
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_ancestral_sampling_recovers_a_gaussian(alphas_cumprod_1000):
    """With the exact ε of N(0.5, 0.3²), 100 respaced steps reproduce it; the learned-range
    variance runs from β̃ (v = −1, narrowest) to β (v = +1), and temperature shrinks it."""
    d = create_diffusion(1000, 100)
    stds = {}
    for v in (-1.0, 0.0, 1.0):
        g = torch.Generator().manual_seed(0)
        x = d.p_sample_loop(
            _gaussian_oracle(alphas_cumprod_1000, 0.5, 0.3, v),
            torch.randn(10000, 2, generator=g),
            generator=g,
        )
        assert x.mean().item() == pytest.approx(0.5, abs=0.01)
        stds[v] = x.std().item()
        assert stds[v] == pytest.approx(0.3, abs=0.025)
    assert stds[-1.0] < stds[0.0] < stds[1.0]
    g = torch.Generator().manual_seed(0)
    cold = d.p_sample_loop(
        _gaussian_oracle(alphas_cumprod_1000, 0.5, 0.3, 0.0),
        torch.randn(10000, 2, generator=g),
        temperature=0.5,
        generator=g,
    )
    assert cold.std().item() < 0.8 * stds[0.0]
    assert cold.mean().item() == pytest.approx(0.5, abs=0.01)


def test_sampling_two_points_lands_on_them_and_the_x0_bound_is_a_no_op(alphas_cumprod_1000):
    points = torch.tensor([[0.8, -0.3], [-0.6, 0.5]])  # [2, C]
    weights = torch.tensor([0.7, 0.3])

    def model(x_t, t):
        a = alphas_cumprod_1000[t].float()[:, None, None]  # [B, 1, 1]
        sq = (x_t[:, None] - a.sqrt() * points).pow(2).sum(-1)  # [B, 2]
        post = (weights.log() - sq / (2 * (1 - a[:, :, 0]))).softmax(-1)  # p(point | x_t)
        x0 = post @ points  # E[x0 | x_t], inside the points' range
        eps = (x_t - a[:, :, 0].sqrt() * x0) / (1 - a[:, :, 0]).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    d = create_diffusion(1000, 100)
    outs = []
    for bound in (None, points.abs().max()):
        g = torch.Generator().manual_seed(0)
        outs.append(
            d.p_sample_loop(model, torch.randn(4000, 2, generator=g), x0_bound=bound, generator=g)
        )
    x = outs[0]
    distance = (x[:, None] - points).norm(dim=-1)  # [N, 2]
    assert distance.min(dim=1).values.max().item() < 0.02
    assert (distance.argmin(dim=1) == 0).float().mean().item() == pytest.approx(0.7, abs=0.03)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)  # no-op for an exact model


def test_x0_bound_clamps_the_prediction():
    d = create_diffusion(1000, 100)
    x_t = torch.full((2, 3), 5.0)
    t = torch.full((2,), 99)
    out = torch.zeros(2, 6)  # ε̂ = 0 -> x̂0 = x_t / sqrt(ᾱ) ≈ 1e5
    free = d.p_mean_variance(out, x_t, t)
    bounded = d.p_mean_variance(out, x_t, t, x0_bound=torch.tensor(1.5))
    assert free.pred_xstart.min().item() > 1e4
    assert torch.equal(bounded.pred_xstart, torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="model_output"):
        d.p_mean_variance(torch.zeros(2, 5), x_t, t)
