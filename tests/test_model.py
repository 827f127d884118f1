"""model.py and hf.py (its Hugging Face import/export) against the reference nobody here wrote: transformers'
GPT2LMHeadModel. The attention kernels are compared with each other in test_attention.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from errors import UserError
from hf import export_hf_gpt2, load_hf_gpt2
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)


def hf_random(shape: dict, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50257, **shape)).eval()


def two_sequences(T: int, seed: int = 1) -> torch.Tensor:
    """A batch of 2 sequences with different content."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (2, T), generator=g)


def shifted_targets(x: torch.Tensor) -> torch.Tensor:
    """Next-token targets for x, -1 (ignored) at the last position: HF's `labels=x` convention."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -1)], dim=1)


def assert_same_outputs(hf: GPT2LMHeadModel, ours: GPT, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = hf(x, labels=x)
        logits, loss = ours(x, shifted_targets(x))
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


@pytest.mark.e2e
@pytest.mark.parametrize("shape", [TINY, GPT2_124M], ids=["tiny", "124M"])
def test_logits_equal_hf_after_import(shape, tmp_path):
    hf = hf_random(shape)
    hf.save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path).eval()
    assert_same_outputs(hf, ours, two_sequences(64))


@pytest.mark.e2e
@pytest.mark.parametrize("shape", [TINY, GPT2_124M], ids=["tiny", "124M"])
def test_logits_equal_hf_after_export(shape, tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                         block_size=shape["n_positions"])).eval()
    export_hf_gpt2(ours, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_outputs(hf, ours, two_sequences(64))


def test_export_writes_a_loadable_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    export_hf_gpt2(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256


def test_padded_vocab_gives_the_same_model(tmp_path):
    hf = hf_random(TINY)
    hf.save_pretrained(tmp_path)
    plain = load_hf_gpt2(tmp_path).eval()
    padded = GPT(GPTConfig(**{**plain.config.to_dict(), "pad_vocab_multiple": 64})).eval()
    assert padded.transformer.wte.weight.shape[0] == 50304
    with torch.no_grad():
        padded.transformer.wte.weight[:50257] = plain.transformer.wte.weight
        state = {k: v for k, v in plain.state_dict().items() if k not in ("transformer.wte.weight", "lm_head.weight")}
        padded.load_state_dict(state, strict=False)
    assert_same_outputs(hf, padded, two_sequences(32))


@pytest.mark.e2e
def test_parameter_count_of_gpt2_preset():
    ours = GPT(GPTConfig.from_preset("gpt2"))
    hf = GPT2LMHeadModel(GPT2Config())
    assert ours.num_params() == 124_439_808 == hf.num_parameters()


def test_presets_match_openai_sizes():
    for name, (layers, heads, width) in {"gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                                         "gpt2-xl": (48, 25, 1600)}.items():
        cfg = GPTConfig.from_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, width)
    with pytest.raises(UserError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.e2e
def test_flops_per_token_formula():
    """6N + 12*L*T*d with N = every weight a token's matmuls touch: blocks (12d^2 + 13d each), final norm, and
    the tied output head (V*d); the position table is a lookup, not a matmul."""
    L, d, V, T = 12, 768, 50257, 1024
    n_matmul = L * (12 * d * d + 13 * d) + 2 * d + V * d
    assert GPT(GPTConfig()).estimate_flops_per_token(T) == 6 * n_matmul + 12 * L * T * d


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_causal_mask_future_tokens_do_not_change_the_past(attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, attention=attention)).eval()
    x = two_sequences(32)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 50257
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert torch.equal(a[:, :20], b[:, :20]) or (a[:, :20] - b[:, :20]).abs().max() < 1e-6
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3  # the change is visible where it should be


def test_generate_at_zero_temperature_is_greedy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=16)).eval()
    prompt = two_sequences(5)
    out = model.generate(prompt, max_new_tokens=20, temperature=0.0)  # runs past block_size: context is cropped
    idx = prompt
    with torch.no_grad():
        for _ in range(20):  # greedy decoding by hand
            logits = model(idx[:, -16:])[0]
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    near_zero = model.generate(prompt, max_new_tokens=20, temperature=1e-6)
    assert torch.equal(near_zero, idx)


def test_generate_top_k_1_is_deterministic_and_sampling_is_not():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)).eval()
    prompt = two_sequences(4)
    a = model.generate(prompt, 15, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 15, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = model.generate(prompt, 15, temperature=1.0, generator=torch.Generator().manual_seed(1))
    d = model.generate(prompt, 15, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)  # a random model's full distribution is near uniform: samples differ


def test_import_rejects_a_folder_that_is_not_gpt2_shaped(tmp_path):
    hf_random(TINY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 96  # weights are 64 wide: the first mismatch must be named
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        load_hf_gpt2(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "transformer." in msg and "shape" in msg


def test_import_rejects_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_random(TINY).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_hf_gpt2(tmp_path)


def test_import_rejects_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_hf_gpt2(tmp_path)


def test_unknown_part_name_is_a_user_error():
    with pytest.raises(UserError, match="norm"):
        GPTConfig(norm="batchnorm")
