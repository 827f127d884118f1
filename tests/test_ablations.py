"""Architecture ablations (layers.py) and document masking (attention.py) in the model.

References nobody here wrote: torch.nn.functional.rms_norm / layer_norm, transformers' Llama RoPE, a
per-token loop for MoE routing, the dense GELU MLP for a one-expert MoE, the single-document run for
document masking, and uninterrupted training for checkpoint resume.
"""

from __future__ import annotations

import glob
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import document_positions
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import REPO, shared_file
from errors import UserError
from hf import export_hf_gpt2
from layers import NORMS, RotaryPositions, apply_rope, swiglu_hidden
from model import GPT, MLP, MLPS, GPTConfig
from tokenizer import EOT

# Byte-level tiny models (vocab 256 bytes + an EOT id) keep these tests fast on 2 CPU cores; the GPT-2 vocab
# is used only where an evaluator needs GPT-2 tokens.
BYTE_EOT = 256
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, eot_id=BYTE_EOT)
GPT2_VOCAB = dict(vocab_size=50257, eot_id=EOT)
VARIANTS = {
    "baseline": {},
    "rope": dict(pos="rope"),
    "nope": dict(pos="none"),
    "rmsnorm": dict(norm="rmsnorm"),
    "post_norm": dict(norm_placement="post"),
    "sandwich_norm": dict(norm_placement="sandwich"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "moe": dict(mlp="moe", n_experts=4, moe_top_k=2),
    "no_bias": dict(bias=False),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "doc_mask": dict(doc_mask=True),
    "doc_mask_rope_manual": dict(doc_mask=True, pos="rope", attention="manual"),
    "llama_like": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "modern": dict(pos="rope", qk_norm=True, norm="rmsnorm", mlp="relu2", tie_embeddings=False, bias=False),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def shakespeare_tokens() -> torch.Tensor:
    """Tiny Shakespeare as bytes, each speech a document preceded by EOT (as in our shards), so that
    doc_mask has real boundaries to use."""
    text = shared_file("tinyshakespeare.txt").read_bytes()
    ids: list[int] = []
    for speech in text.split(b"\n\n")[:1000]:
        ids += [BYTE_EOT, *speech]
    return torch.tensor(ids)


def batch(tokens: torch.Tensor, start: int, B: int = 8, T: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([tokens[start + i * (T + 1): start + (i + 1) * (T + 1)] for i in range(B)])
    return rows[:, :-1], rows[:, 1:]


def packed_rows(T: int = 48) -> torch.Tensor:
    """Three rows of random tokens with different document layouts: two boundaries, one boundary at t=0
    and one late, and none (a row entirely inside one document)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, BYTE_EOT, (3, T), generator=g)
    x[0, [7, 30]] = BYTE_EOT
    x[1, [0, 41]] = BYTE_EOT
    return x


# ----------------------------------------------------------------------------------------------------
# Every variant


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_reaches_every_parameter(name):
    model = tiny(**VARIANTS[name])
    x = packed_rows()
    _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_do_not_change_earlier_logits(name):
    model = tiny(**VARIANTS[name]).eval()
    x = packed_rows()
    x2 = x.clone()
    x2[:, 25:] = (x2[:, 25:] + 1) % BYTE_EOT  # also removes the late EOTs: doc boundaries after t=25 change
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert (a[:, :25] - b[:, :25]).abs().max() < 1e-6
    assert (a[:, 25:] - b[:, 25:]).abs().max() > 1e-4  # the change is visible where it should be


@pytest.mark.e2e
@pytest.mark.parametrize("name", VARIANTS)
def test_loss_decreases_on_real_text(name, shakespeare_tokens):
    model = tiny(**VARIANTS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    val_x, val_y = batch(shakespeare_tokens, len(shakespeare_tokens) - 9 * 65)  # held out: the end of the text

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(val_x, val_y)[1].item()
        model.train()
        return loss

    before = val_loss()
    for step in range(15):
        x, y = batch(shakespeare_tokens, step * 8 * 65)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = val_loss()
    print(f"{name}: val loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0, f"{name}: val loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoint_round_trip_and_resume_equal_uninterrupted_training(name, tmp_path):
    x = packed_rows()

    def step(model: GPT, opt: torch.optim.Optimizer, i: int) -> None:
        model(x.roll(i, dims=1), x.roll(i + 1, dims=1))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    straight = tiny(**VARIANTS[name])
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-3)
    for i in range(4):
        step(straight, opt, i)

    first = tiny(**VARIANTS[name])
    opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
    for i in range(2):
        step(first, opt, i)
    save_checkpoint({"model": first.state_dict(), "model_config": first.config.to_dict(),
                     "optimizer": opt.state_dict(), "step": 2}, tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # weights_only=True
    resumed = model_from_checkpoint(ckpt)
    assert resumed.config == first.config
    with torch.no_grad():
        assert torch.equal(resumed.eval()(x)[0], first.eval()(x)[0])
    resumed.train()
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt.load_state_dict(ckpt["optimizer"])
    for i in range(2, 4):
        step(resumed, opt, i)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def loglikelihood_by_hand(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The second code path for the evaluators' scores: one plain forward of context + continuation (no batching,
    padding, truncation or head hook), log_softmax in float64, summed over the continuation's tokens; and whether
    each continuation token is the argmax (lm-eval's is_greedy)."""
    tokens = context + continuation
    assert len(tokens) <= model.config.block_size  # short enough that no evaluator truncates it
    with torch.no_grad():
        logits = model.eval()(torch.tensor(tokens[:-1])[None])[0][0, len(context) - 1:]  # predicting the continuation
    logprobs = F.log_softmax(logits.double(), dim=-1)
    target = torch.tensor(continuation)
    return logprobs[torch.arange(len(continuation)), target].sum().item(), bool((logprobs.argmax(-1) == target).all())


def first_max(values: list[float]) -> int:
    return values.index(max(values))


@pytest.mark.e2e
@pytest.mark.parametrize("name", VARIANTS)
def test_eval_hellaswag_accepts_the_variant(name):
    """evaluate_hellaswag on each variant: every ending's log-likelihood is the variant's plain forward scored here
    by hand, and acc / acc_norm are the argmax of those sums / of the sums per character of the ending."""
    import json

    from eval_hellaswag import evaluate_hellaswag, preprocess
    from scoring import encode_pair

    model = tiny(**{**VARIANTS[name], **GPT2_VOCAB, "block_size": 256})
    path = shared_file("hellaswag_val.jsonl")
    res = evaluate_hellaswag(model, path, limit=3, max_length=256, return_examples=True)
    docs = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()[:3]]
    assert res["n"] == 3 and [ex["idx"] for ex in res["examples"]] == [0, 1, 2]
    hits, hits_norm = 0, 0
    for doc, ex in zip(docs, res["examples"]):
        query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        endings = [preprocess(e) for e in doc["endings"]]
        lls = [loglikelihood_by_hand(model, *encode_pair(query, " " + e))[0] for e in endings]
        assert ex["lls"] == pytest.approx(lls, abs=1e-3), name
        pred, pred_norm = first_max(lls), first_max([ll / len(e) for ll, e in zip(lls, endings)])
        assert (ex["pred"], ex["pred_norm"], ex["label"]) == (pred, pred_norm, int(doc["label"])), name
        hits, hits_norm = hits + (pred == int(doc["label"])), hits_norm + (pred_norm == int(doc["label"]))
    assert (res["acc"], res["acc_norm"]) == (pytest.approx(hits / 3), pytest.approx(hits_norm / 3)), name
    assert len({tuple(ex["lls"]) for ex in res["examples"]}) == 3  # three different examples were scored


@pytest.mark.e2e
def test_eval_lm_accepts_variants(shared_data):
    """lm-eval's harness through eval_lm.GPTLM on the variants with the most unusual forward passes: each LAMBADA
    passage's log-likelihood of its last word (lm-eval's per-sample values) is the variant's plain forward scored
    here by hand, and the reported perplexity and accuracy are exp(-mean) of those and the mean of is_greedy."""
    import json
    import math

    eval_lm = pytest.importorskip("eval_lm")
    from scoring import encode_pair

    lines = (shared_data / "lambada_openai_test.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(ln)["text"] for ln in lines[:4]]
    for name in ("moe", "doc_mask_rope_manual", "llama_like"):
        model = tiny(**{**VARIANTS[name], **GPT2_VOCAB, "block_size": 256})
        out = eval_lm.run_tasks(model, ["lambada_openai"], data_dir=shared_data, max_length=256, limit=4,
                                bootstrap_iters=0, log_samples=True)
        (metrics,) = out["results"].values()
        (samples,) = out["samples"].values()
        assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3], name
        lls, greedy = [], []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            words = texts[s["doc_id"]].split(" ")
            context, target = " ".join(words[:-1]), " " + words[-1]  # LAMBADA: the passage's last word
            assert [tuple(a) for a in s["arguments"]] == [(context, target)], name
            ll, is_greedy = loglikelihood_by_hand(model, *encode_pair(context, target))
            assert s["perplexity"] == pytest.approx(ll, abs=1e-3) and s["acc"] == int(is_greedy), name
            lls.append(ll)
            greedy.append(is_greedy)
        assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / 4), rel=1e-4), name
        assert metrics["acc,none"] == pytest.approx(sum(greedy) / 4), name
        assert len(set(lls)) == 4  # four different passages were scored


# ----------------------------------------------------------------------------------------------------
# Positions


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryPositions(GPTConfig(**TINY, pos="rope"))
    q, k = torch.randn(2, 1, 2, 10, 16).unbind(0)
    pos = torch.arange(10)[None]

    def scores(p: torch.Tensor) -> torch.Tensor:
        _, (cos, sin) = rope.embed(torch.zeros(1), p)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1)

    assert (scores(pos) - scores(pos + 37)).abs().max() < 1e-4  # shift every position: same scores
    assert (scores(pos) - q @ k.transpose(-2, -1)).abs().max() > 1e-1  # but the rotation does something
    assert (scores(pos) - scores(pos * 2)).abs().max() > 1e-1  # and distances matter


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = GPTConfig(**TINY, pos="rope", rope_base=500.0)
    hf_cfg = LlamaConfig(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    q, k = torch.randn(2, 3, cfg.n_head, 20, cfg.n_embd // cfg.n_head).unbind(0)
    pos = torch.randint(0, 60, (3, 20))
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(q, pos)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    _, (cos, sin) = RotaryPositions(cfg).embed(torch.zeros(1), pos)
    assert (apply_rope(q, cos, sin) - hf_q).abs().max() < 1e-5
    assert (apply_rope(k, cos, sin) - hf_k).abs().max() < 1e-5


def test_document_positions_restart_at_each_eot():
    x = torch.tensor([[5, 6, EOT, 7, 8, 9, EOT, 1], [EOT, 2, 3, 4, 5, 6, 7, 8]])  # GPT-2's EOT this time
    doc_ids, pos = document_positions(x, EOT)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]


# ----------------------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("bias", [True, False])
def test_norms_match_torch_functional(bias):
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY, bias=bias, layer_norm_eps=1e-5)
    x = torch.randn(3, 7, 32) * 3 + 1
    rms, ln = NORMS["rmsnorm"](cfg, 32), NORMS["layernorm"](cfg, 32)
    with torch.no_grad():
        for p in [*rms.parameters(), *ln.parameters()]:
            p.normal_()
    for scale in (1.0, 1e-3):  # at 1e-3 the mean square is near eps, so eps must be where F puts it
        y = x * scale
        assert (rms(y) - F.rms_norm(y, (32,), rms.weight, eps=1e-5)).abs().max() < 1e-5
        assert (ln(y) - F.layer_norm(y, (32,), ln.weight, ln.bias, eps=1e-5)).abs().max() < 1e-5
    assert (ln.bias is not None) == bias
    assert [n for n, _ in rms.named_parameters()] == ["weight"]  # RMSNorm has no bias in either case


def test_bias_false_removes_every_bias():
    assert not [n for n, _ in tiny(bias=False).named_parameters() if n.endswith(".bias")]
    assert [n for n, _ in tiny(bias=True).named_parameters() if n.endswith(".bias")]


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_norm_placements_compute_their_formulas(placement):
    """One block, attention and MLP replaced by known functions, against the formula written out."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    block = GPT(GPTConfig(**TINY, norm_placement=placement)).transformer.h[0]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    f, g = (lambda h: torch.tanh(h) * 2), (lambda h: h.sin() + 1)
    block.attn.forward = lambda h, rope, mask: f(h)
    block.mlp = _Fn(g)
    ln1, ln2 = block.ln_1, block.ln_2
    with torch.no_grad():
        if placement == "pre":  # GPT-2
            h = x + f(ln1(x))
            expected = h + g(ln2(h))
        elif placement == "post":  # Vaswani et al. 2017
            h = ln1(x + f(x))
            expected = ln2(h + g(h))
        else:  # sandwich: a second, separate norm on each sublayer's output
            assert block.ln_1_out is not ln1 and isinstance(block.ln_1_out, nn.LayerNorm)
            h = x + block.ln_1_out(f(ln1(x)))
            expected = h + block.ln_2_out(g(ln2(h)))
        assert (block(x, None, None, []) - expected).abs().max() < 1e-6
    final = GPT(GPTConfig(**TINY, norm_placement=placement)).transformer.ln_f
    assert isinstance(final, nn.Identity) == (placement == "post")  # post-norm's output is already normalized


class _Fn(nn.Module):
    def __init__(self, fn):  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_normalizes_each_head(norm):
    """qk_norm: the q and k the attention kernel gets are each head's 16-dim vectors normalized by the config's
    norm (eps, gain, bias as written out here), and the attention output is softmax(q_n k_n^T / sqrt(16)) v under
    the causal mask, by hand on the same weights; without the norms the output changes."""
    import math
    from types import SimpleNamespace

    model = tiny(qk_norm=True, norm=norm).eval()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        for p in [*attn.q_norm.parameters(), *attn.k_norm.parameters()]:
            p.normal_()  # gains (and LayerNorm's biases) away from 1 and 0: the formula must apply them
    kernel, seen = attn.kernel, {}

    def recording_attend(q, k, v, mask, dropout_p):  # noqa: ANN001, ANN202
        seen.update(q=q, k=k)
        return kernel.attend(q, k, v, mask, dropout_p)

    attn.kernel = SimpleNamespace(mask=kernel.mask, attend=recording_attend)  # what the kernel is given
    B, T, C, H, hd, eps = 2, 9, 32, 2, 16, model.config.layer_norm_eps
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))

    def by_hand(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if norm == "layernorm":
            centered = t - t.mean(-1, keepdim=True)
            return centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * w + b
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    with torch.no_grad():
        y = attn(x, None, None)
        q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=-1)
        q, k, v = (t.reshape(B, T, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, 16): one row per head
        qn = by_hand(q, attn.q_norm.weight, getattr(attn.q_norm, "bias", None))
        kn = by_hand(k, attn.k_norm.weight, getattr(attn.k_norm, "bias", None))
        q_err, k_err = (seen["q"] - qn).abs().max().item(), (seen["k"] - kn).abs().max().item()
        assert q_err < 1e-5 and k_err < 1e-5, f"q, k given to the kernel are off by {q_err:.3g}, {k_err:.3g}"
        assert (qn.pow(2).mean(-1) - q.pow(2).mean(-1)).abs().max() > 0.1  # the norm did change them
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = (qn @ kn.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        expected = (att @ v).transpose(1, 2).reshape(B, T, C) @ attn.c_proj.weight.T + attn.c_proj.bias
        assert (y - expected).abs().max() < 1e-5 * (1 + expected.abs().max())
        attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()  # the same weights, scores from raw q and k
        assert (attn(x, None, None) - y).abs().max() > 0.05 * y.abs().max()


# ----------------------------------------------------------------------------------------------------
# Document masking


@pytest.mark.parametrize("overrides", [dict(), dict(pos="rope"), dict(pos="none"), dict(attention="manual"),
                                       dict(norm="rmsnorm", mlp="swiglu", qk_norm=True), VARIANTS["modern"]])
def test_doc_mask_second_document_equals_it_run_alone(overrides):
    model = tiny(**overrides, doc_mask=True).eval()
    g = torch.Generator().manual_seed(1)
    doc1, doc2 = torch.randint(0, BYTE_EOT, (19,), generator=g), torch.randint(0, BYTE_EOT, (24,), generator=g)
    eot = torch.tensor([BYTE_EOT])
    packed, alone = torch.cat([eot, doc1, eot, doc2])[None], torch.cat([eot, doc2])[None]
    with torch.no_grad():
        packed_logits = model(packed)[0][0, 20:]
        assert (packed_logits - model(alone)[0][0]).abs().max() < 1e-5
        model.config.doc_mask = False  # the same weights without the mask: the first document leaks in
        assert (model(packed)[0][0, 20:] - packed_logits).abs().max() > 1e-4


def _same_weights(reference: GPT, **overrides: object) -> GPT:
    model = GPT(GPTConfig(**{**reference.config.to_dict(), **overrides})).eval()
    model.load_state_dict(reference.state_dict())
    return model


@pytest.mark.e2e
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_doc_mask_kernels_agree(pos):
    dense = tiny(doc_mask=True, pos=pos).eval()
    x = packed_rows()
    with torch.no_grad():
        ref = dense(x)[0]
        assert (_same_weights(dense, attention="manual")(x)[0] - ref).abs().max() < 1e-5
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            pytest.skip("torch.nn.attention.flex_attention needs torch >= 2.5")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
            assert (_same_weights(dense, attention="flex")(x)[0] - ref).abs().max() < 1e-5
            assert (_same_weights(dense, attention="flex", doc_mask=False)(x)[0]
                    - _same_weights(dense, doc_mask=False)(x)[0]).abs().max() < 1e-5


@pytest.mark.cuda  # flash-attn needs a CUDA GPU
def test_flash_attn_varlen_agrees_with_dense_mask():
    pytest.importorskip("flash_attn")
    dense = tiny(doc_mask=True, pos="rope").cuda().eval()
    x = packed_rows().cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = dense(x)[0].float()
        flash = _same_weights(dense, attention="flash_attn").cuda()(x)[0].float()
    assert (flash - ref).abs().max() < 2e-2  # bf16


def test_flex_refuses_to_train_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny(attention="flex")
    x = packed_rows()
    with warnings.catch_warnings(), pytest.raises(UserError, match="sdpa"):
        warnings.simplefilter("ignore")
        model(x, x)


def test_flash_attn_without_the_package_is_a_user_error():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="flash-attn"):
        tiny(attention="flash_attn")(packed_rows())


# ----------------------------------------------------------------------------------------------------
# MLPs


def test_moe_with_one_expert_top1_equals_the_dense_mlp():
    dense = tiny()
    moe = tiny(seed=1, mlp="moe", n_experts=1, moe_top_k=1)
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    state |= {k: v for k, v in moe.state_dict().items() if "router" in k}  # the router's own random weights
    moe.load_state_dict(state)
    x = packed_rows()
    with torch.no_grad():
        dense_logits, dense_loss = dense.eval()(x, x)
        moe_logits, moe_loss = moe.eval()(x, x)
        assert (moe_logits - dense_logits).abs().max() < 1e-5
        assert (moe_loss - dense_loss).abs() < 1e-5  # eval: no aux loss
        _, train_loss, aux = moe.train()(x, x, return_aux=True)
        assert aux.item() == pytest.approx(1.0)  # one expert gets everything: E * 1 * 1 = 1
        assert (train_loss - (dense_loss + moe.config.moe_aux_loss_coef * 1.0)).abs() < 1e-5


def test_moe_equals_a_per_token_loop():
    torch.manual_seed(0)
    moe = MLPS["moe"](GPTConfig(**TINY, mlp="moe", n_experts=4, moe_top_k=2))
    x = torch.randn(2, 9, 32)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(9):
            scores = moe.router(x[b, t])
            top, chosen = scores.topk(2)
            for w, e in zip(top.softmax(-1), chosen.tolist()):
                expected[b, t] += w * moe.experts[e](x[b, t])
    assert (moe(x)[0] - expected).abs().max() < 1e-5


def test_moe_aux_loss_is_the_switch_balance_loss():
    torch.manual_seed(0)
    moe = MLPS["moe"](GPTConfig(**TINY, mlp="moe", n_experts=4, moe_top_k=1))
    x = torch.rand(64, 32)  # positive, so a positive router row wins for every token
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: E * sum_e f_e * (1/E) = 1 whatever f is
        assert moe(x)[1].item() == pytest.approx(1.0)
        moe.router.weight.zero_()
        moe.router.weight[0] = 1000.0  # every token to expert 0 with probability ~1: E * 1 * 1
        assert moe(x)[1].item() == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_moe_aux_loss_is_returned_added_to_the_loss_and_trains_every_router(placement):
    model = tiny(mlp="moe", n_experts=4, moe_top_k=2, norm_placement=placement)
    per_layer = []
    for block in model.transformer.h:
        block.mlp.register_forward_hook(lambda m, inputs, out: per_layer.append(out[1]))
    x = packed_rows()
    logits, loss, aux = model(x, x, return_aux=True)
    assert aux.dim() == 0 and torch.isfinite(aux) and aux.item() >= 0.99
    assert len(per_layer) == TINY["n_layer"] and torch.equal(aux, torch.stack(per_layer).mean())  # mean over layers
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x.reshape(-1))
    assert (loss - (ce + model.config.moe_aux_loss_coef * aux)).abs() < 1e-5
    aux.backward()  # the aux loss alone reaches every layer's router
    assert all(block.mlp.router.weight.grad.abs().sum() > 0 for block in model.transformer.h)
    assert tiny(norm_placement=placement)(x, x, return_aux=True)[2] is None  # dense models report none
    assert len(model(x, x)) == 2  # without return_aux: (logits, loss), as before


def test_moe_flops_count_only_the_experts_a_token_uses():
    dense, moe = tiny(), tiny(mlp="moe", n_experts=4, moe_top_k=2)
    expert = sum(p.numel() for p in moe.transformer.h[0].mlp.experts[0].parameters())
    router = moe.transformer.h[0].mlp.router.weight.numel()
    extra = TINY["n_layer"] * (expert + router)  # per layer: one more expert than dense, plus the router
    assert moe.estimate_flops_per_token(64) == dense.estimate_flops_per_token(64) + 6 * extra


def test_swiglu_hidden_size_matches_gelu_parameters():
    assert swiglu_hidden(768) == 2048 and swiglu_hidden(128) == 384 and swiglu_hidden(1024) == 2752
    for d in (768, 1024):
        cfg = GPTConfig(n_embd=d, n_head=8, bias=False)
        gelu, swiglu = (sum(p.numel() for p in MLPS[m](cfg).parameters()) for m in ("gelu", "swiglu"))
        assert abs(swiglu - gelu) / gelu < 0.01, (d, gelu, swiglu)  # exact for 768
    assert MLP(GPTConfig(n_embd=32, n_head=2, mlp_hidden=50)).c_fc.out_features == 50


def test_relu2_mlp_matches_transformers_relu_squared():
    """MLPS["relu2"] against transformers' ReLUSquaredActivation between two F.linear calls; GPT-2's width."""
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    mlp = MLPS["relu2"](GPTConfig(**TINY)).eval()
    x = torch.randn(2, 7, 32)
    ref = F.linear(ACT2FN["relu2"](F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)), mlp.c_proj.weight, mlp.c_proj.bias)
    assert (mlp(x) - ref).abs().max() < 1e-6
    assert mlp.c_fc.out_features == 4 * 32 and (mlp(-x) - mlp(x)).abs().max() > 1e-3  # not even: ReLU, not x^2


def test_untied_head_is_a_separate_parameter():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + untied.lm_head.weight.numel()


# ----------------------------------------------------------------------------------------------------
# Config


def test_default_config_is_gpt2_and_export_refuses_variants(tmp_path):
    cfg = GPTConfig()
    assert (cfg.pos, cfg.norm, cfg.norm_placement, cfg.mlp, cfg.bias, cfg.qk_norm, cfg.tie_embeddings,
            cfg.doc_mask) == ("learned", "layernorm", "pre", "gelu", True, False, True, False)
    with pytest.raises(UserError, match="pos='rope'"):
        export_hf_gpt2(tiny(pos="rope"), tmp_path)
    with pytest.raises(UserError, match="mlp='moe'"):
        export_hf_gpt2(tiny(mlp="moe"), tmp_path)


@pytest.mark.parametrize("bad, match", [(dict(pos="alibi"), "pos"), (dict(norm_placement="middle"), "norm_placement"),
                                        (dict(mlp="moe", n_experts=2, moe_top_k=3), "moe_top_k"),
                                        (dict(pos="rope", n_embd=30, n_head=2), "even"),
                                        (dict(attention="flex", dropout=0.1), "flex")])
def test_bad_config_is_one_line_user_error(bad, match):
    with pytest.raises(UserError, match=match) as e:
        GPTConfig(**bad)
    assert "\n" not in str(e.value)


def test_ablation_config_files_are_one_small_diff_from_the_baseline():
    import train_config

    root = REPO
    files = sorted(glob.glob(str(root / "config/ablations/*.py")))
    assert len(files) >= 12
    base = train_config.load_config([str(root / "config/ablations/baseline.py")]).model_config()
    for f in files:
        cfg = train_config.load_config([f])
        mc = cfg.model_config()
        diff = {k for k, v in mc.to_dict().items() if v != getattr(base, k)}
        if Path(f).stem == "modern":  # the one recipe of several changes (and Muon, checked below)
            assert diff == set(VARIANTS["modern"]) and cfg.optimizer == "muon", diff
        else:
            assert Path(f).stem == "baseline" or 1 <= len(diff) <= 4, (f, diff)
        assert Path(f).stem == "baseline" or cfg.out_dir.endswith(Path(f).stem), f
        GPT(mc)  # every ablation config builds its model


@pytest.mark.e2e
def test_modern_preset_trains(tmp_path):
    """config/ablations/modern.py as train.py runs it (Muon + AdamW), 4 steps on a small learnable stream."""
    import train
    import train_config
    from _shards import markov_dataset

    data = markov_dataset(tmp_path / "data", train_tokens=20_000, val_tokens=4_000)
    cfg = train_config.load_config([str(REPO / "config/ablations/modern.py"), f"--data_dir={data}",
                                    f"--out_dir={tmp_path / 'out'}", "--max_steps=4", "--warmup_steps=1",
                                    "--eval_interval=4", "--eval_tokens=1024", "--log_interval=1"])
    out = train.train(cfg)
    assert out["step"] == 4 and out["losses"][-1] < out["losses"][0] - 1.0, out["losses"]
    saved = load_checkpoint(tmp_path / "out/ckpt.pt")
    assert set(saved["optimizer"]) == {"adamw", "muon"} and saved["train_config"]["optimizer"] == "muon"
