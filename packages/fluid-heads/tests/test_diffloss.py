from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fluid_heads import DiffLossConfig, DiffLossHead
from fluid_heads.diffloss import timestep_embedding

# --------------------------------------------------------------------------- architecture


def test_structure_is_mar_simple_mlp_adaln():
    head = DiffLossHead(16, 32)  # width defaults to cond_dim
    net = head.net
    assert head.width == 32 and len(net.res_blocks) == 3
    residual_linears = [m for b in net.res_blocks for m in b.mlp if isinstance(m, nn.Linear)]
    assert len(residual_linears) == 6  # the paper's "6 layers"
    assert all(lin.weight.shape == (32, 32) for lin in residual_linears)
    for block in net.res_blocks:
        assert block.in_ln.eps == 1e-6 and block.in_ln.elementwise_affine
        assert block.adaLN_modulation[-1].weight.shape == (96, 32)
    assert (
        not net.final_layer.norm_final.elementwise_affine and net.final_layer.norm_final.eps == 1e-6
    )
    assert net.final_layer.linear.weight.shape == (32, 32)  # W -> 2C
    assert net.time_embed.mlp[0].weight.shape == (32, 256)
    # adaLN and output layers start at zero; the time MLP at std 0.02; others xavier
    zeroed = [b.adaLN_modulation[-1] for b in net.res_blocks]
    zeroed += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
    assert all(torch.count_nonzero(lin.weight) == 0 for lin in zeroed)
    assert net.time_embed.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    xavier_bound = math.sqrt(6 / (32 + 32))
    assert residual_linears[0].weight.abs().max().item() <= xavier_bound
    assert residual_linears[0].weight.std().item() == pytest.approx(
        xavier_bound / math.sqrt(3), rel=0.1
    )
    # so the untrained head predicts ε = 0 with the mid-range variance for any input
    out = net(torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 32))
    assert out.shape == (5, 32) and torch.count_nonzero(out) == 0


def test_builds_on_the_meta_device_and_materialises_exactly():
    with torch.device("meta"):
        head = DiffLossHead(16, 64, depth=3)
    assert head.token_embed.weight.is_meta
    head.to_empty(device="cpu")
    head.reset_parameters()
    reference = DiffLossHead(16, 64, depth=3)
    for name in ("sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "timestep_map"):
        assert torch.equal(
            getattr(head.sample_diffusion, name), getattr(reference.sample_diffusion, name)
        )
    assert head.target_abs_max.item() == 0.0
    assert torch.count_nonzero(head.net.final_layer.linear.weight) == 0


def test_timestep_embedding_is_the_dit_sinusoid():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t)
    assert emb.shape == (3, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    freq = math.exp(-math.log(10000) * 5 / 128)
    assert emb[1, 5].item() == pytest.approx(math.cos(7 * freq), abs=1e-6)
    assert emb[2, 128 + 5].item() == pytest.approx(math.sin(999 * freq), abs=1e-5)


def test_config_builds_the_same_head():
    config = DiffLossConfig(width=12, depth=2, diffusion_batch_mul=2)
    head = DiffLossHead.from_config(4, 8, config)
    assert head.config == config and head.width == 12
    by_args = DiffLossHead(4, 8, width=12, depth=2, batch_mul=2)  # DESIGN.md §12's signature
    assert by_args.config == config
    assert [p.shape for p in head.parameters()] == [p.shape for p in by_args.parameters()]
    assert DiffLossHead(4, 8).width == 8  # None: the condition width


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="token_dim"):
        DiffLossHead(0, 8)
    with pytest.raises(ValueError, match="sample_steps"):
        DiffLossHead(4, 8, sample_steps=2000)
    with pytest.raises(ValueError, match="x0_bound"):
        DiffLossHead(4, 8, x0_bound=-1.0)
    with pytest.raises(ValueError, match="diffusion_batch_mul"):
        DiffLossConfig(diffusion_batch_mul=0)
    with pytest.raises(TypeError, match="DiffLossConfig"):
        DiffLossHead.from_config(4, 8, {"depth": 3})


def test_no_weight_decay_covers_exactly_the_diffusion_mlp():
    head = DiffLossHead(4, 8)
    skip = head.no_weight_decay()
    names = {name for name, _ in head.named_parameters()}
    assert skip <= names
    assert skip == {n for n in names if n.startswith("net.")}
    assert names - skip == {"token_embed.weight", "token_embed.bias"}


# --------------------------------------------------------------------------- embed and loss


def test_embed_maps_tokens_to_the_trunk_width():
    head = DiffLossHead(4, 8)
    tokens = torch.randn(2, 5, 4)
    out = head.embed(tokens)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out, tokens @ head.token_embed.weight.T + head.token_embed.bias)
    with pytest.raises(ValueError, match=r"tokens must be \[\.\.\., 4\]"):
        head.embed(torch.randn(2, 5, 3))


def test_loss_rejects_mismatched_inputs():
    head = DiffLossHead(4, 8)
    with pytest.raises(ValueError, match="target"):
        head.loss(torch.randn(6, 3), torch.randn(6, 8))
    with pytest.raises(ValueError, match="z must be"):
        head.loss(torch.randn(6, 4), torch.randn(5, 8))
    with pytest.raises(ValueError, match="mask must be"):
        head.loss(torch.randn(6, 4), torch.randn(6, 8), torch.ones(5))


def test_masked_out_tokens_contribute_nothing(randomize):
    head = DiffLossHead(4, 8, width=16)
    randomize(head.net)
    target = torch.randn(10, 4)
    z = torch.randn(10, 8, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    torch.manual_seed(0)
    loss = head.loss(target, z, mask)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.count_nonzero(grad[~mask]) == 0
    assert torch.all(grad[mask].abs().sum(dim=1) > 0)
    # changing the masked-out rows changes nothing (same random draws)
    other_target = torch.where(mask[:, None], target, 100 * torch.randn(10, 4))
    other_z = torch.where(mask[:, None], z.detach(), torch.randn(10, 8))
    torch.manual_seed(0)
    assert torch.equal(head.loss(other_target, other_z, mask), loss.detach())
    # an all-ones mask is the plain mean; an empty mask gives 0, not NaN
    torch.manual_seed(1)
    plain = head.loss(target, z)
    torch.manual_seed(1)
    assert torch.equal(head.loss(target, z, torch.ones(10)), plain)
    assert head.loss(target, z, torch.zeros(10)).item() == 0.0


def test_loss_accepts_token_grids_and_repeats_batch_mul_times(randomize):
    head = DiffLossHead(4, 8, width=16, batch_mul=3)
    randomize(head.net)
    rows = []
    head.net.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    loss = head.loss(torch.randn(2, 5, 4), torch.randn(2, 5, 8), torch.ones(2, 5))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert rows == [30]  # 2·5 tokens × batch_mul 3, one forward


def test_loss_compiles_as_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    head = DiffLossHead(4, 8, width=16)
    counter = CompileCounter()  # runs the captured graph eagerly: checks capture, not codegen
    compiled = torch.compile(head.loss, backend=counter, fullgraph=True)
    for scale in (1.0, 3.0, 2.0):
        target = scale * torch.randn(12, 4)
        mask = torch.rand(12) < 0.5
        loss = compiled(target, torch.randn(12, 8), mask)
        assert torch.isfinite(loss)
    assert counter.frame_count == 1  # no graph break, no recompilation on new values
    assert head.target_abs_max.item() > 2.0  # the buffer update ran inside the graph
    torch._dynamo.reset()


def test_target_range_is_tracked_in_training_only():
    head = DiffLossHead(2, 3)
    assert head.effective_x0_bound().item() == math.inf  # nothing seen yet: no clamp
    target = torch.tensor([[0.5, -2.0], [9.0, 0.0], [1.0, 1.5]])
    head.loss(target, torch.randn(3, 3), torch.tensor([True, False, True]))
    assert head.target_abs_max.item() == 2.0  # the masked-out 9.0 does not count
    head.loss(torch.tensor([[0.1, 0.2]]), torch.randn(1, 3))
    assert head.target_abs_max.item() == 2.0  # a running max
    head.eval()
    head.loss(torch.full((1, 2), 5.0), torch.randn(1, 3))
    assert head.target_abs_max.item() == 2.0  # validation does not move it
    assert head.effective_x0_bound().item() == 2.0
    assert "target_abs_max" in head.state_dict()
    head.x0_bound = 0.75
    assert head.effective_x0_bound().item() == 0.75
    head.x0_bound = float("inf")
    assert head.effective_x0_bound() is None


# --------------------------------------------------------------------------- sampling


def test_sample_shapes_determinism_and_errors(randomize):
    head = DiffLossHead(3, 8, width=16, sample_steps=10).eval()
    randomize(head.net, std=0.05)
    z = torch.randn(6, 8)
    a = head.sample(z, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, head.sample(z, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="even number of rows"):
        head.sample(torch.randn(5, 8), cfg=2.0)
    with pytest.raises(ValueError, match="z must be"):
        head.sample(torch.randn(4, 7))
    with pytest.raises(ValueError, match="temperature"):
        head.sample(z, temperature=-1.0)


class _StubNet(nn.Module):
    """A known function of (x, t, z) standing in for the MLP: ε = 0.3x + z[:C], v = tanh(z[C:2C])."""

    def forward(self, x, t, z):
        c = x.shape[1]
        return torch.cat(
            [0.3 * x + z[:, :c] + 1e-4 * t[:, None], torch.tanh(z[:, c : 2 * c])], dim=1
        )


def test_cfg_guides_epsilon_shares_noise_and_returns_equal_halves():
    head = DiffLossHead(2, 4, sample_steps=20).eval()
    head.net = _StubNet()
    z_c, z_u = torch.randn(3, 4), torch.randn(3, 4)
    scale = 2.5
    out = head.sample(torch.cat([z_c, z_u]), cfg=scale, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 2) and torch.equal(out[:3], out[3:])

    def guided(x, t):  # ε_u + s(ε_c − ε_u) on ε; the variance from the cond half
        eps_c, v_c = _StubNet()(x, t, z_c).split(2, dim=1)
        eps_u = _StubNet()(x, t, z_u)[:, :2]
        return torch.cat([eps_u + scale * (eps_c - eps_u), v_c], dim=1)

    g = torch.Generator().manual_seed(0)
    expected = head.sample_diffusion.p_sample_loop(
        guided, torch.randn(3, 2, generator=g), generator=g
    )  # one noise for both halves: x_T and every step drawn once for 3 rows
    torch.testing.assert_close(out[:3], expected)


def test_cfg_of_one_is_unguided_sampling(randomize):
    head = DiffLossHead(3, 8, width=16, sample_steps=25).eval()
    randomize(head.net, std=0.05)
    z_c, z_u = torch.randn(4, 8), torch.randn(4, 8)
    plain = head.sample(z_c, cfg=1.0, generator=torch.Generator().manual_seed(7))
    default = head.sample(z_c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain, default)
    # the guided path at a scale of 1 + 1e-6 is the cond-only chain
    nearly = head.sample(
        torch.cat([z_c, z_u]), cfg=1.0 + 1e-6, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(nearly[:4], plain, atol=1e-3, rtol=1e-3)
    far = head.sample(torch.cat([z_c, z_u]), cfg=4.0, generator=torch.Generator().manual_seed(7))
    assert (far[:4] - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_fast_sampling_is_the_per_row_reference_math(randomize, cfg):
    """The fast path (time embedding once per step, condition projection once per call) draws
    the same tokens as MAR's per-row evaluation, to float rounding."""
    head = DiffLossHead(3, 8, width=16, depth=3, sample_steps=20).eval()
    randomize(head.net, std=0.05)
    z = torch.randn(12, 8)
    calls = {"time": [], "cond": []}
    head.net.time_embed.register_forward_hook(lambda m, a, o: calls["time"].append(o.shape[0]))
    head.net.cond_embed.register_forward_hook(lambda m, a, o: calls["cond"].append(o.shape[0]))
    fast = head.sample(z, cfg=cfg, generator=torch.Generator().manual_seed(5))
    assert calls == {"time": [1] * 20, "cond": [12]}  # one row per step; z projected once
    calls["time"].clear(), calls["cond"].clear()
    ref = head.sample(z, cfg=cfg, generator=torch.Generator().manual_seed(5), path="reference")
    assert calls == {"time": [12] * 20, "cond": [12] * 20}  # every row, every step
    assert not torch.equal(ref, head.sample(z, cfg=cfg, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="path must be"):
        head.sample(z, path="slow")


def test_bf16_head_keeps_the_schedule_in_float32(randomize):
    head = DiffLossHead(3, 8, width=16, sample_steps=10)
    randomize(head.net, std=0.05)
    head = head.to(torch.bfloat16)
    assert head.sample_diffusion.sqrt_recipm1_alphas_cumprod.dtype == torch.float32
    loss = head.loss(torch.randn(6, 3), torch.randn(6, 8, dtype=torch.bfloat16))
    assert torch.isfinite(loss)
    x = head.eval().sample(torch.randn(4, 8, dtype=torch.bfloat16))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


# --------------------------------------------------------------------------- learning


def _draw(head, mixture, s: float, n: int, seed: int, **kwargs):
    z = mixture.condition(torch.full((n,), s))
    return head.sample(z, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_trained_head_learns_the_conditional_mixture(trained_head):
    """Tolerances: 2000 samples estimate a mean to ±0.017 and a (co)variance ≤ 0.56 to ±0.018
    (1σ); we allow 0.06 (≈3.5σ) for means and covariances and 0.05 for the mode weight."""
    head, mixture = trained_head.head, trained_head.mixture
    for i, s in enumerate(mixture.conditions):
        x = _draw(head, mixture, s, 2000, seed=i).double()
        mean, cov = mixture.moments(s)
        torch.testing.assert_close(x.mean(0), mean, atol=0.06, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0)
        m1, m2 = mixture.modes(torch.tensor(s, dtype=torch.float64))
        first = ((x - m1).norm(dim=1) < (x - m2).norm(dim=1)).double().mean().item()
        assert first == pytest.approx(mixture.weight1, abs=0.05)
        # each mode is as wide as the data's (σ = 0.15 per axis)
        nearest = torch.minimum((x - m1).norm(dim=1), (x - m2).norm(dim=1))
        assert nearest.pow(2).mean().sqrt().item() == pytest.approx(
            math.sqrt(2) * mixture.sigma, rel=0.2
        )


def test_temperature_shrinks_the_spread(trained_head):
    head, mixture = trained_head.head, trained_head.mixture
    s = 1.0
    m1, m2 = mixture.modes(torch.tensor(s))

    def spread(x):  # RMS distance to the nearest mode centre
        return torch.minimum((x - m1).norm(dim=1), (x - m2).norm(dim=1)).pow(2).mean().sqrt()

    warm = _draw(head, mixture, s, 1500, seed=10)
    cold = _draw(head, mixture, s, 1500, seed=10, temperature=0.5)
    assert spread(cold) < 0.7 * spread(warm)
    assert torch.trace(torch.cov(cold.T)) < torch.trace(torch.cov(warm.T))


def test_bounded_sampling_stays_in_range_and_unbounded_does_not(trained_head):
    """DESIGN.md §4: the first respaced step amplifies the error of ε̂ ~316×; a briefly trained
    head needs the x̂0 bound to sample in range with 100 steps."""
    head, mixture = trained_head.head, trained_head.mixture
    assert head.target_abs_max.item() == pytest.approx(trained_head.data_abs_max, rel=1e-6)
    bounded = _draw(head, mixture, 0.0, 500, seed=20)
    assert bounded.abs().max().item() <= trained_head.data_abs_max + 1e-5
    head.x0_bound = float("inf")
    try:
        free = _draw(head, mixture, 0.0, 500, seed=20)
    finally:
        head.x0_bound = None
    assert free.abs().max().item() > 10 * trained_head.data_abs_max


# --------------------------------------------------------------------------- auxiliary regression


def test_regression_readout_exists_only_when_weighted_and_is_counted():
    assert DiffLossHead(16, 32).readout is None
    head = DiffLossHead(16, 32, regression_weight=0.5)
    assert head.readout.weight.shape == (16, 32)
    plain = sum(p.numel() for p in DiffLossHead(16, 32).parameters())
    assert sum(p.numel() for p in head.parameters()) == plain + 32 * 16 + 16  # the readout
    assert (
        DiffLossHead.from_config(16, 32, DiffLossConfig(regression_weight=0.5)).readout is not None
    )
    with pytest.raises(ValueError, match="regression_weight"):
        DiffLossHead(16, 32, regression_weight=-1.0)


def test_loss_adds_the_weighted_masked_readout_error(randomize):
    plain = DiffLossHead(4, 8, width=16)
    randomize(plain.net)
    aux = DiffLossHead(4, 8, width=16, regression_weight=2.5)
    aux.load_state_dict(plain.state_dict(), strict=False)  # same MLP; aux has a readout more
    target, z = torch.randn(10, 4), torch.randn(10, 8)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    torch.manual_seed(0)
    diffusion = plain.loss(target, z, mask)
    torch.manual_seed(0)
    total = aux.loss(target, z, mask)
    error = (aux.readout(z) - target).pow(2).mean(dim=1)[mask].mean()
    torch.testing.assert_close(total, diffusion + 2.5 * error)
    torch.manual_seed(0)  # readout=False: the diffusion loss alone, as the plain head's
    torch.testing.assert_close(aux.loss(target, z, mask, readout=False), diffusion)


def test_readout_gives_the_condition_a_gradient_where_the_diffusion_loss_gives_none():
    """At MAR's initialisation (zero adaLN) the diffusion loss does not depend on z at all:
    the trunk starts learning only once the head has. The readout reaches z from step one."""
    target = torch.randn(12, 4)
    for weight, expect_gradient in ((0.0, False), (1.0, True)):
        head = DiffLossHead(4, 8, width=16, regression_weight=weight)
        z = torch.randn(12, 8, requires_grad=True)
        (grad,) = torch.autograd.grad(head.loss(target, z), z)
        assert bool(grad.abs().sum() > 0) is expect_gradient
