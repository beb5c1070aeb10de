"""FluidModel: the four variants, the training objective and save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fluid_backbone import CausalTransformer, MaskedTransformer
from fluid_heads import DiffLossHead, SoftmaxHead
from fluid_text import TextAligner
from fluid_train import FluidConfig, FluidModel, TrainBatch, training_mask


def test_variant_builds_the_right_parts(variant, tiny_config):
    tokens, order = variant
    model = FluidModel(tiny_config(tokens, order))
    assert isinstance(model.text_aligner, TextAligner)
    assert isinstance(model.trunk, MaskedTransformer if order == "random" else CausalTransformer)
    assert isinstance(model.head, DiffLossHead if tokens == "continuous" else SoftmaxHead)
    assert model.config.variant == f"{order}-{tokens}"


def test_training_steps_give_finite_decreasing_loss(variant, tiny_config, tiny_train_batch):
    tokens, order = variant
    torch.manual_seed(0)
    config = tiny_config(tokens, order)
    model = FluidModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tiny_train_batch(config, 4, with_std=tokens == "continuous")
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # the same masks, timesteps and noise every step: only weights change
        out = model.training_loss(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert not out.mask_ratio.requires_grad and not out.text_drop_rate.requires_grad


def test_training_mask_follows_the_cosine_ratio():
    torch.manual_seed(0)
    n = 64
    mask = training_mask(4096, n)
    counts = mask.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= n
    # E[cos(pi/2 r)] = 2/pi for r ~ U[0, 1); rounding up adds at most one token per image.
    mean = counts.float().mean().item() / n
    assert 2 / math.pi - 0.02 < mean < 2 / math.pi + 1 / n + 0.02
    # Masks of different images differ (a random permutation per image).
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])


class _HeadLossSpy:
    def __init__(self, head):
        self.calls, self._loss = [], head.loss

    def __call__(self, target, h, mask=None, **options):
        self.calls.append(
            (target.detach().clone(), None if mask is None else mask.detach().clone())
        )
        self.options = options
        return self._loss(target, h, mask, **options)


@pytest.mark.parametrize("order", ["random", "raster"])
def test_loss_counts_masked_tokens_only_in_random_order(order, tiny_config, tiny_train_batch):
    torch.manual_seed(0)
    config = tiny_config("discrete", order)
    model = FluidModel(config)
    trunk_masks = []
    model.trunk.register_forward_pre_hook(
        lambda m, args: trunk_masks.append(args[1]) if order == "random" else None
    )
    spy = _HeadLossSpy(model.head)
    model.head.loss = spy
    model.training_loss(tiny_train_batch(config, 8))
    _, weight = spy.calls[0]
    if order == "raster":
        assert weight is None  # teacher forcing: every token counts
    else:
        mask = trunk_masks[0]  # [B, N], True = masked: what the trunk hid is what the head scores
        assert torch.equal(weight.view(8, -1), mask)
        assert (mask.sum(dim=1) >= 1).all()


def test_continuous_targets_are_posterior_samples(tiny_config, tiny_train_batch):
    config = tiny_config("continuous", "random")
    model = FluidModel(config)
    spy = _HeadLossSpy(model.head)
    model.head.loss = spy
    batch = tiny_train_batch(config, 32, with_std=True)
    torch.manual_seed(0)
    model.training_loss(batch)
    target, _ = spy.calls[0]
    eps = (target.view_as(batch.tokens) - batch.tokens) / batch.token_std
    assert 0.8 < eps.std().item() < 1.2 and abs(eps.mean().item()) < 0.1
    model.training_loss(
        TrainBatch(tokens=batch.tokens, text_hidden=batch.text_hidden, text_mask=batch.text_mask)
    )
    assert torch.equal(spy.calls[1][0].view_as(batch.tokens), batch.tokens)  # no std: the mean


def test_validation_objective_leaves_the_readout_term_out(tiny_config, tiny_train_batch):
    """``auxiliary=False``: the DiffLoss head's loss without its readout term, same draws."""
    config = tiny_config("continuous", "random", **{"diffloss.regression_weight": 1.0})
    model = FluidModel(config)
    batch = tiny_train_batch(config, 8)
    spy = _HeadLossSpy(model.head)
    model.head.loss = spy
    torch.manual_seed(0)
    full = model.training_loss(batch).loss
    assert spy.options == {"readout": True}
    torch.manual_seed(0)
    plain = model.training_loss(batch, auxiliary=False).loss
    assert spy.options == {"readout": False}
    assert plain < full  # the readout's squared error (> 0 at random init) is left out


def test_text_dropout_replaces_captions_by_the_null_text(tiny_config, tiny_train_batch):
    config = tiny_config("discrete", "random", text_drop_prob=1.0)  # DiffLoss starts blind to z
    model = FluidModel(config)
    batch = tiny_train_batch(config, 4)
    other = TrainBatch(
        tokens=batch.tokens,
        text_hidden=torch.randn_like(batch.text_hidden),
        text_mask=batch.text_mask,
    )
    torch.manual_seed(3)
    a = model.training_loss(batch)
    torch.manual_seed(3)
    b = model.training_loss(other)
    assert a.text_drop_rate.item() == 1.0
    assert torch.equal(a.loss, b.loss)  # every caption dropped: the text cannot matter
    model.config.text_drop_prob = 0.0
    torch.manual_seed(3)
    c = model.training_loss(batch)
    torch.manual_seed(3)
    d = model.training_loss(other)
    assert c.text_drop_rate.item() == 0.0 and not torch.equal(c.loss, d.loss)


class _DataDependentOps(TorchDispatchMode):
    """Records ops that need a host sync or give data-dependent shapes (XLA recompiles)."""

    FORBIDDEN = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.unique")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            t is not None and t.dtype == torch.bool for t in args[1]
        )
        if bool_index or name.startswith(self.FORBIDDEN):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_data_dependent_shapes_or_syncs(
    variant, tiny_config, tiny_train_batch
):
    tokens, order = variant
    config = tiny_config(tokens, order)
    model = FluidModel(config)
    batch = tiny_train_batch(config, 3, with_std=tokens == "continuous")
    with _DataDependentOps() as recorder:
        out = model.training_loss(batch)
        out.loss.backward()
    assert recorder.found == []


def test_bad_batches_are_rejected_with_the_expected_shape(tiny_config, tiny_train_batch):
    config = tiny_config("continuous", "random")
    model = FluidModel(config)
    batch = tiny_train_batch(config, 2)
    with pytest.raises(ValueError, match=r"continuous tokens must be float \[B, 16, 4\]"):
        model.training_loss(
            TrainBatch(
                tokens=batch.tokens[:, :8], text_hidden=batch.text_hidden, text_mask=batch.text_mask
            )
        )
    with pytest.raises(ValueError, match=r"\[B, L, 16\]"):
        model.training_loss(
            TrainBatch(
                tokens=batch.tokens,
                text_hidden=batch.text_hidden[..., :8],
                text_mask=batch.text_mask,
            )
        )
    discrete = FluidModel(tiny_config("discrete", "raster"))
    with pytest.raises(ValueError, match=r"discrete tokens must be \[B, 16\] int64"):
        discrete.training_loss(batch)


def test_config_validation_and_overrides(tiny_config):
    config = tiny_config()
    with pytest.raises(ValueError, match="unknown FluidConfig key"):
        config.replace(grid=(3, 4))  # the grid is the trunk's: backbone.grid
    with pytest.raises(ValueError, match="aligner.width"):
        config.replace(**{"aligner.width": 64})
    with pytest.raises(ValueError, match="tokens must be"):
        config.replace(tokens="pixels")
    with pytest.raises(ValueError, match="unknown TransformerConfig key.*backbone.widht"):
        config.replace(**{"backbone.widht": 64})
    with pytest.raises(ValueError, match="backbone.depth must be an integer; got 'deep'"):
        config.replace(**{"backbone.depth": "deep"})
    with pytest.raises(ValueError, match=r"diffloss.x0_bound must be a number"):
        config.replace(**{"diffloss.x0_bound": [1]})
    changed = config.replace(order="raster", **{"backbone.depth": 3, "generation.cfg": 4.0})
    assert (changed.order, changed.backbone.depth, changed.generation.cfg) == ("raster", 3, 4.0)
    assert config.backbone.depth == 2  # the original is untouched
    assert FluidConfig.from_dict(changed.to_dict()) == changed
    regrid = config.replace(**{"backbone.grid": [2, 8]})  # JSON gives lists
    assert (regrid.grid, regrid.num_tokens) == ((2, 8), 16)  # one fact: backbone.grid


def test_meta_count_matches_a_real_model_and_the_components(variant, tiny_config):
    tokens, order = variant
    config = tiny_config(tokens, order)
    counts = FluidModel.count_params(config)
    real = FluidModel(config)
    assert counts.total == sum(p.numel() for p in real.parameters())
    for name in ("text_aligner", "trunk", "head"):
        part = getattr(real, name)
        assert getattr(counts, name) == sum(p.numel() for p in part.parameters()), name


@pytest.mark.parametrize(("tokens", "order"), [("continuous", "random"), ("discrete", "raster")])
def test_save_and_load_round_trip(tmp_path, tokens, order, tiny_config, tiny_text):
    torch.manual_seed(0)
    config = tiny_config(tokens, order)
    model = FluidModel(config)
    model.save_pretrained(tmp_path / "model")
    loaded = FluidModel.from_pretrained(tmp_path, subfolder="model")
    assert loaded.config == config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    hidden, mask = tiny_text(2)
    a = model.generate(hidden, mask, generator=torch.Generator().manual_seed(0))
    b = loaded.generate(hidden, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_save_writes_the_given_ema_weights(tmp_path, tiny_config):
    model = FluidModel(tiny_config())
    ema = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    model.save_pretrained(tmp_path, weights=ema)
    loaded = FluidModel.from_pretrained(tmp_path)
    assert all(torch.all(p == 0.5) for p in loaded.parameters())
    with pytest.raises(ValueError, match="lacks"):
        model.save_pretrained(tmp_path, weights={k: v for k, v in list(ema.items())[1:]})
    with pytest.raises(FileNotFoundError, match="config.json"):
        FluidModel.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("order", ["random", "raster"])
def test_regression_weight_builds_trains_and_round_trips_the_readout(
    tmp_path, order, tiny_config, tiny_train_batch
):
    config = tiny_config("continuous", order, **{"diffloss.regression_weight": 1.0})
    torch.manual_seed(0)
    model = FluidModel(config)
    assert model.head.readout is not None
    assert FluidModel.count_params(config).total == sum(p.numel() for p in model.parameters())
    batch = tiny_train_batch(config)
    loss = model.training_loss(batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.head.readout.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "model")
    loaded = FluidModel.from_pretrained(tmp_path, subfolder="model")
    assert loaded.config.diffloss.regression_weight == 1.0
    assert torch.equal(loaded.head.readout.weight, model.head.readout.weight)
    # the paper's objective (the default) builds no readout
    assert FluidModel(tiny_config("continuous", order)).head.readout is None


def test_format_1_configs_still_load(tmp_path, tiny_config):
    """Configs saved before the grid moved into backbone.grid (format 1) load unchanged."""
    torch.manual_seed(0)
    config = tiny_config()
    FluidModel(config).save_pretrained(tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["_format"] == 2 and "grid" not in saved
    del saved["_format"]  # as fluid-train 0.1.0 wrote it
    saved["grid"] = saved["backbone"].pop("grid")
    saved["backbone"]["num_tokens"] = 16
    saved["backbone"]["grid"] = None
    path.write_text(json.dumps(saved))
    assert FluidModel.from_pretrained(tmp_path, subfolder="model").config == config
    saved["backbone"]["num_tokens"] = 12
    with pytest.raises(ValueError, match="does not hold backbone.num_tokens"):
        FluidConfig.from_dict(saved)
    with pytest.raises(ValueError, match="newer"):
        FluidConfig.from_dict({**config.to_dict(), "_format": 99})
