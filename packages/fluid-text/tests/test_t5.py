from __future__ import annotations

import json
import resource
import warnings
from pathlib import Path

import pytest
import sentencepiece
import torch
from torch import nn
from transformers import T5ForConditionalGeneration

import fluid_text
from fluid_text import PromptTruncatedWarning, T5TextEncoder

# Short enough (<= 16 tokens with the 64-piece test vocabulary) for every pad_to used below.
PROMPTS = ["a red circle", "two blue stars", "a photo of three hexagons"]
LONG_PROMPT = "a large blue square to the left of a tiny green star"


def reference_ids(sp: sentencepiece.SentencePieceProcessor, prompt: str) -> list[int]:
    """What T5 feeds its encoder: SentencePiece ids, then EOS (1)."""
    return [*sp.encode(prompt), 1]


def test_public_layout_loads_and_tokenizes_like_sentencepiece(
    t5_dir: Path, t5: T5TextEncoder, sp: sentencepiece.SentencePieceProcessor
):
    assert {"spiece.model", "config.json", "model.safetensors"} <= {
        p.name for p in t5_dir.iterdir()
    }
    assert t5.dim == 64 and t5.max_length == 128
    extra = [LONG_PROMPT, "  two   spaces  here ", "Unseen Words, punctuation!", "naïve café 42"]
    ids, mask = t5.tokenize(PROMPTS + extra)
    expected = [reference_ids(sp, p) for p in PROMPTS + extra]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (7, max(len(e) for e in expected))
    for row, want in enumerate(expected):
        assert ids[row, : len(want)].tolist() == want
        assert mask[row].tolist() == [True] * len(want) + [False] * (ids.shape[1] - len(want))
        assert (ids[row, len(want) :] == 0).all()


def test_encode_shapes_mask_and_zero_padding(t5: T5TextEncoder):
    states = t5.encode(PROMPTS)
    ids, mask = t5.tokenize(PROMPTS)
    assert isinstance(states, fluid_text.TextStates)
    assert states.hidden.shape == (3, ids.shape[1], 64) and states.hidden.dtype == torch.float32
    assert torch.equal(states.mask, mask)
    assert torch.isfinite(states.hidden).all()
    assert (states.hidden[~mask] == 0).all() and (states.hidden[mask].abs().sum(-1) > 0).all()
    # forward is encode; pad_to gives fixed shapes.
    fixed = t5(PROMPTS, pad_to=32)
    assert fixed.hidden.shape == (3, 32, 64) and fixed.mask.shape == (3, 32)


def test_real_token_states_do_not_depend_on_padding(t5: T5TextEncoder):
    short = t5.encode(PROMPTS, pad_to=16)
    long = t5.encode(PROMPTS, pad_to=40)
    longest = t5.encode(PROMPTS)
    mask = short.mask
    assert torch.equal(long.mask[:, :16], mask) and not long.mask[:, 16:].any()
    torch.testing.assert_close(long.hidden[:, :16], short.hidden, atol=1e-6, rtol=0)
    length = longest.hidden.shape[1]
    # Other padding lengths change matmul shapes, hence float32 rounding (~1e-6) only.
    torch.testing.assert_close(longest.hidden, short.hidden[:, :length], atol=1e-5, rtol=0)
    # Each prompt alone (no padding at all) gives the same states as in the batch.
    alone = t5.encode(PROMPTS[:1])
    alone_length = alone.hidden.shape[1]
    torch.testing.assert_close(alone.hidden[0], short.hidden[0, :alone_length], atol=1e-5, rtol=0)


def test_frozen_no_trainable_params_and_always_eval(t5: T5TextEncoder):
    assert not any(p.requires_grad for p in t5.parameters())
    t5.train()
    assert not t5.training and not any(m.training for m in t5.modules())
    parent = nn.ModuleDict({"text": t5, "head": nn.Linear(64, 8)}).train()
    assert parent["head"].training and not any(m.training for m in t5.modules())
    # States are plain (not inference-mode) tensors: a trainable aligner can backprop on them.
    states = t5.encode(PROMPTS, pad_to=24)
    assert not states.hidden.requires_grad
    aligner = fluid_text.TextAligner(
        fluid_text.AlignerConfig(text_dim=t5.dim, width=32, num_heads=4)
    )
    aligner(states.hidden, states.mask).hidden.square().mean().backward()
    assert aligner.proj.weight.grad is not None and aligner.proj.weight.grad.abs().sum() > 0


def test_long_prompt_is_truncated_with_a_warning_naming_it(
    t5: T5TextEncoder, t5_dir: Path, sp: sentencepiece.SentencePieceProcessor
):
    long_prompt = " ".join(["circle"] * 299)
    full = reference_ids(sp, long_prompt)
    assert len(full) == 300
    with pytest.warns(PromptTruncatedWarning) as record:
        ids, mask = t5.tokenize([PROMPTS[0], long_prompt])
    assert [str(w.message) for w in record] == [
        f"prompt 1 has {len(full)} tokens; max is 128 (truncated)"
    ]
    assert ids.shape == (2, 128) and mask[1].all()
    assert ids[1].tolist() == full[:127] + [1]
    with pytest.warns(PromptTruncatedWarning, match="prompt 0 has 300 tokens") as record:
        states = t5.encode([long_prompt, PROMPTS[0]], pad_to=128)
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert states.hidden.shape == (2, 128, 64) and torch.isfinite(states.hidden).all()
    # A fixed pad_to shorter than a prompt cuts it to pad_to, again with a warning.
    with pytest.warns(
        PromptTruncatedWarning, match=r"prompt 0 has \d+ tokens; max is 4 \(truncated\)"
    ):
        ids, mask = t5.tokenize([LONG_PROMPT], pad_to=4)
    assert ids.shape == (1, 4) and ids[0, -1] == 1 and mask.all()
    # max_length is configurable and nothing warns for prompts that fit.
    short = T5TextEncoder.from_pretrained(t5_dir, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert short.tokenize(PROMPTS)[0].shape == (3, 13)
    with pytest.warns(PromptTruncatedWarning, match="prompt 1 has 28 tokens; max is 16"):
        assert short.tokenize([PROMPTS[0], LONG_PROMPT])[0].shape == (2, 16)


def test_empty_prompt_is_just_eos(t5: T5TextEncoder):
    ids, mask = t5.tokenize([""])
    assert ids.tolist() == [[1]] and mask.tolist() == [[True]]
    states = t5.encode(["", PROMPTS[0]], pad_to=12)
    assert states.mask[0].tolist() == [True] + [False] * 11
    assert torch.isfinite(states.hidden).all() and states.hidden[0, 0].abs().sum() > 0


def test_save_pretrained_round_trip(t5: T5TextEncoder, tmp_path: Path):
    t5.save_pretrained(tmp_path / "copy")
    assert {"spiece.model", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "copy").iterdir()
    }
    again = T5TextEncoder.from_pretrained(tmp_path, subfolder="copy")
    assert torch.equal(again.encode(PROMPTS).hidden, t5.encode(PROMPTS).hidden)


def test_full_encoder_decoder_checkpoint_loads_its_encoder(
    spiece_path: Path, tmp_path: Path, t5: T5TextEncoder
):
    """google/t5-v1_1-xxl ships T5ForConditionalGeneration weights next to spiece.model."""
    torch.manual_seed(0)
    full = T5ForConditionalGeneration(fluid_text.shapes_t5_config(vocab_size=256)).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes(spiece_path.read_bytes())
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "T5ForConditionalGeneration"
    ]
    encoder = T5TextEncoder.from_pretrained(tmp_path)
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        want = full.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    got = encoder.encode(PROMPTS)
    torch.testing.assert_close(got.hidden[mask], want[mask], atol=1e-6, rtol=0)
    assert not torch.allclose(got.hidden[mask], t5.encode(PROMPTS).hidden[mask])


def test_bf16_loading(t5_dir: Path, t5: T5TextEncoder, tmp_path: Path):
    half = T5TextEncoder.from_pretrained(t5_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and t5.dtype == torch.float32
    # Saved in bf16, loaded back with dtype=None: float32 again.
    half.save_pretrained(tmp_path)
    assert T5TextEncoder.from_pretrained(tmp_path).dtype == torch.float32
    states = half.encode(PROMPTS)
    reference = t5.encode(PROMPTS).hidden
    assert torch.isfinite(states.hidden.float()).all()
    error = (states.hidden.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_build_random_t5_is_a_function_of_the_seed(spiece_path: Path, tmp_path: Path):
    def weights(directory: Path) -> dict[str, torch.Tensor]:
        return T5TextEncoder.from_pretrained(directory).model.state_dict()

    state = torch.get_rng_state()
    a = fluid_text.build_random_t5(tmp_path / "a", spiece_model=spiece_path, seed=1)
    b = fluid_text.build_random_t5(tmp_path / "b", spiece_model=spiece_path, seed=1)
    c = fluid_text.build_random_t5(tmp_path / "c", spiece_model=spiece_path, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["shared.weight"], wc["shared.weight"])
    # config=None sizes the embedding to the tokenizer: 64 pieces + 100 sentinels -> 256 rows.
    assert wa["shared.weight"].shape == (256, 64)


def test_xxl_preset_counted_on_meta_without_memory():
    config = fluid_text.t5_v1_1_xxl_config()
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff) == (
        4096,
        24,
        64,
        64,
        10240,
    )
    assert config.vocab_size == 32128 and config.is_gated_act
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    count = fluid_text.count_t5_encoder_params(config)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 4.7e9 < count < 4.8e9
    assert grown_mib < 500  # 4.76B fp32 parameters would be ~18 GiB
    assert config.is_encoder_decoder  # the caller's config is not edited
    # Counting is exact: the tiny preset built for real has the same number.
    tiny = fluid_text.shapes_t5_config()
    from transformers import T5EncoderModel

    assert fluid_text.count_t5_encoder_params(tiny) == sum(
        p.numel() for p in T5EncoderModel(tiny).parameters()
    )
    # The recorded counts `fluid info` reads without transformers are these counts.
    assert fluid_text.T5_ENCODER_PARAMS == {
        "t5-v1_1-xxl": count,
        "shapes-t5": fluid_text.count_t5_encoder_params(tiny),
    }


def test_bad_input_is_named(t5: T5TextEncoder, t5_dir: Path, spiece_path: Path, tmp_path: Path):
    with pytest.raises(TypeError, match="prompts must be a list of str; got str"):
        t5.tokenize("a red circle")
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str; got NoneType"):
        t5.encode(["a red circle", None])
    with pytest.raises(ValueError, match="prompts is empty"):
        t5.encode([])
    with pytest.raises(ValueError, match="pad_to must be a positive int; got 0"):
        t5.tokenize(PROMPTS, pad_to=0)
    with pytest.raises(ValueError, match=r"ids must be an int64 \[B, L\]"):
        t5.encode_ids(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no spiece.model"):
        T5TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.vocab_size 128 is smaller than the tokenizer"):
        fluid_text.build_random_t5(
            tmp_path / "small",
            spiece_model=spiece_path,
            config=fluid_text.shapes_t5_config(vocab_size=128),
        )
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        T5TextEncoder.from_pretrained(t5_dir, max_length=0)
