"""train_vae / train_vq: they learn, they are deterministic, they report and validate."""

from __future__ import annotations

import pytest
import torch

from fluid_tokenizers import SDVAETokenizer, TrainHistory, VQTokenizer, train_vae, train_vq


def _reconstruction_mse(tokenizer, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((tokenizer.decode(tokenizer.encode(images)) - images).square().mean())


@pytest.fixture(scope="module")
def data(make_shapes) -> tuple[torch.Tensor, torch.Tensor]:
    return make_shapes(128, 32, seed=0), make_shapes(16, 32, seed=1)


def test_train_vae_halves_reconstruction_error(tiny_vae_config, data) -> None:
    train, heldout = data
    tokenizer = SDVAETokenizer.from_config(tiny_vae_config, image_size=32, seed=0)
    before = _reconstruction_mse(tokenizer, heldout)
    reported: list[int] = []
    history = train_vae(
        tokenizer, train, steps=80, lr=3e-3, batch_size=16, progress=lambda s, m: reported.append(s)
    )
    after = _reconstruction_mse(tokenizer, heldout)
    assert after < 0.5 * before, (before, after)
    assert reported == list(range(1, 81))
    assert isinstance(history, TrainHistory) and history.steps == 80
    assert set(history.metrics) == {"loss", "reconstruction", "kl", "lr"}
    assert history.reconstruction[-1] < history.reconstruction[0]
    # frozen again afterwards
    assert not tokenizer.vae.training and not any(p.requires_grad for p in tokenizer.parameters())


def test_train_vq_halves_reconstruction_error(tiny_vq_config, data) -> None:
    train, heldout = data
    tokenizer = VQTokenizer.from_config(tiny_vq_config, image_size=32, seed=0)
    before = _reconstruction_mse(tokenizer, heldout)
    history = train_vq(tokenizer, train, steps=80, lr=3e-3, batch_size=16)
    after = _reconstruction_mse(tokenizer, heldout)
    assert after < 0.5 * before, (before, after)
    assert set(history.metrics) == {
        "loss",
        "reconstruction",
        "codebook",
        "commitment",
        "perplexity",
        "lr",
    }
    # dead-code restarts keep more than a handful of the 64 codes in use
    assert tokenizer.encode(heldout).unique().numel() >= 8
    assert not tokenizer.vq.training and not any(p.requires_grad for p in tokenizer.parameters())


def test_training_is_deterministic_and_takes_an_iterable(tiny_vae_config, data) -> None:
    train, _ = data
    histories, weights = [], []
    for _ in range(2):
        tokenizer = SDVAETokenizer.from_config(tiny_vae_config, image_size=32, seed=3)
        histories.append(train_vae(tokenizer, train, steps=5, batch_size=8, seed=11).loss)
        weights.append(tokenizer.vae.decoder.conv_out.weight.clone())
    assert histories[0] == histories[1]
    assert torch.equal(weights[0], weights[1])

    # an iterable of batches (here (images,) tuples, as a DataLoader over a TensorDataset gives)
    batches = [(train[i : i + 8],) for i in range(0, 32, 8)]
    tokenizer = SDVAETokenizer.from_config(tiny_vae_config, image_size=32, seed=3)
    history = train_vae(tokenizer, batches, steps=6, batch_size=8)  # cycles over the 4 batches
    assert history.steps == 6
    # a one-shot generator that runs dry stops training early, with a warning
    with pytest.warns(UserWarning, match="ran out after 2 of 6 steps"):
        history = train_vae(tokenizer, (b[0] for b in batches[:2]), steps=6)
    assert history.steps == 2


def test_training_rejects_bad_arguments(tiny_vae_config, tiny_vq_config, data) -> None:
    train, _ = data
    vae = SDVAETokenizer.from_config(tiny_vae_config, image_size=32, seed=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_vae(vae, train, steps=0)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        train_vae(vae, train, steps=1, kl_weight=-1.0)
    with pytest.raises(ValueError, match="loss must be 'l1' or 'l2'"):
        train_vae(vae, train, steps=1, loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images must be .*\[B, 3, 32, 32\]"):
        train_vae(vae, torch.zeros(4, 3, 64, 64), steps=1)
    with pytest.raises(ValueError, match="images yielded no batches"):
        train_vae(vae, [], steps=1)
    vq = VQTokenizer.from_config(tiny_vq_config, image_size=32, seed=0)
    with pytest.raises(ValueError, match="dead_code_restart_every must be >= 1 or None"):
        train_vq(vq, train, steps=1, dead_code_restart_every=0)
    # a failed call leaves the tokenizer frozen
    assert not any(p.requires_grad for p in vae.parameters())
