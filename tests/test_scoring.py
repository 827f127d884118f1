"""scoring.py, the one log-likelihood scorer of eval_hellaswag.py, eval_lm.py and train.py's HellaSwag, against
references nobody here wrote: lm-eval's own `hf` model (HFLM._loglikelihood_tokens, on the same weights exported as
a Hugging Face folder) and transformers' GPT2LMHeadModel for what truncation means. The task-level equalities
(hellaswag, lambada_openai, wikitext through lm-eval's tasks) are in tests/test_eval_hellaswag.py and
tests/test_eval_lm.py."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint import load_model
from conftest import save_tiny_gpt, shared_file
from scoring import encode_pair, fit_max_length, score_batch, unwrap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random-init tiny GPT saved both as our checkpoint and as an HF folder."""
    return save_tiny_gpt(tmp_path_factory.mktemp("tiny"), seed=4321)


def requests() -> list[tuple[str, str]]:
    """(context, continuation) pairs from real data: HellaSwag queries with their four endings, and LAMBADA
    passages with their last word (contexts with trailing spaces included: encode_pair moves them)."""
    pairs = []
    with open(shared_file("hellaswag_val.jsonl"), encoding="utf-8") as f:
        for line in list(f)[:6]:
            doc = json.loads(line)
            pairs += [(doc["ctx"] + " ", e) for e in doc["endings"]]
    with open(shared_file("lambada_openai_test.jsonl"), encoding="utf-8") as f:
        for line in list(f)[:8]:
            text = json.loads(line)["text"]
            pairs.append((text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]))
    return pairs


@pytest.mark.e2e
@pytest.mark.parametrize("max_length", [512, 32])
def test_score_batch_equals_lm_eval_hf(tiny: dict, max_length: int) -> None:
    """Every request's summed log-probability and greedy flag equal lm-eval's HFLM on the same weights, with
    room to spare (512) and with many inputs cut from the left (32)."""
    from lm_eval.models.huggingface import HFLM

    pairs = requests()
    encoded = [encode_pair(c, x) for c, x in pairs]
    hflm = HFLM(pretrained=str(tiny["hf"]), max_length=max_length, device="cpu", dtype="float32", batch_size=8)
    assert [hflm._encode_pair(c, x) for c, x in pairs] == encoded  # the same tokens, split the same way
    ref = hflm._loglikelihood_tokens([((c, x), ctx, cont) for (c, x), (ctx, cont) in zip(pairs, encoded)],
                                     disable_tqdm=True)
    ours = score_batch(load_model(tiny["ckpt"]).eval(), encoded, max_length, "cpu")
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in ref], rel=1e-5)
    assert [g for _, g in ours] == [g for _, g in ref]
    if max_length == 32:
        assert sum(len(ctx) + len(cont) > 33 for ctx, cont in encoded) >= len(encoded) // 3  # truncation happens


def test_truncated_request_is_scored_on_its_last_max_length_tokens(tiny: dict) -> None:
    """By definition, with transformers: the continuation scored given only the last max_length input tokens."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny["hf"]).eval()
    model, L = load_model(tiny["ckpt"]).eval(), 24
    long = [(ctx, cont) for ctx, cont in (encode_pair(c, x) for c, x in requests()) if len(ctx) + len(cont) > L + 1]
    for ctx, cont in long[::6]:
        window = (ctx + cont)[-(L + 1):]
        with torch.no_grad():
            logp = hf(torch.tensor([window[:-1]])).logits[0].float().log_softmax(-1)
        expected = sum(logp[L - len(cont) + i, t].item() for i, t in enumerate(cont))
        (got, _), = score_batch(model, [(ctx, cont)], L, "cpu")
        assert got == pytest.approx(expected, rel=1e-5)


def test_max_length_is_capped_at_the_block_size_of_the_unwrapped_model() -> None:
    """A compiled (wrapped) model is unwrapped to the GPT inside; max_length is capped at its block_size, with one
    line when asked for it."""
    from model import GPT, GPTConfig

    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))
    assert unwrap(torch.compile(m)) is m  # (compiling happens at the first call: none here)
    said: list[str] = []
    assert fit_max_length(torch.compile(m), 512, said.append) == 64 and len(said) == 1 and "block_size 64" in said[0]
    assert fit_max_length(m, 32, said.append) == 32 and len(said) == 1
