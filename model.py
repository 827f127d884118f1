"""GPT-2 in plain PyTorch, with the architecture ablations of the seed's meta-goal.

The default `GPTConfig()` is OpenAI's GPT-2 124M exactly: learned position embeddings, pre-LayerNorm
blocks with biases, causal self-attention, a 4x GELU(tanh) MLP, a final LayerNorm and an output head tied
to the token embedding. Module names follow Hugging Face's `GPT2LMHeadModel`, so weights move between the
two by transposing the four Conv1D matrices (see `load_hf_gpt2` / `export_hf_gpt2`).

Architecture ablations are parts picked by name from the small tables below, never if-chains inside the
forward pass:
    POSITIONS   pos             learned | rope | none      (rope_base sets RoPE's wavelengths)
    NORMS       norm            layernorm | rmsnorm
    PLACEMENTS  norm_placement  pre | post | sandwich
    MLPS        mlp             gelu | swiglu | moe        (moe adds a load-balancing loss, see MoEMLP)
    ATTENTION_KERNELS attention sdpa | manual | flex | flash_attn   (same maths, different kernels)
plus the switches bias, qk_norm, tie_embeddings and doc_mask.

Document masking (`doc_mask=True`): training rows are packed from many documents, each preceded by the EOT
token (DESIGN.md "Formats"). With doc_mask a token attends only to earlier tokens of its own document and
positions restart at 0 at every EOT, so a document's logits do not depend on what was packed before it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE; ids >= vocab_size are never predicted
    pad_vocab_multiple: int = 1  # 64 pads the embedding to 50304 rows: faster matmuls, same model
    block_size: int = 1024  # longest sequence (size of the learned position table)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear layer and LayerNorm (RMSNorm has none; the MoE router neither)
    norm: str = "layernorm"  # key of NORMS
    norm_placement: str = "pre"  # key of PLACEMENTS
    pos: str = "learned"  # key of POSITIONS
    rope_base: float = 10000.0  # RoPE: wavelengths run from 2*pi to 2*pi*rope_base
    mlp: str = "gelu"  # key of MLPS
    mlp_hidden: int | None = None  # MLP width; None: 4*n_embd (gelu, moe experts), 8/3*n_embd rounded up to 64 (swiglu)
    n_experts: int = 8  # moe only
    moe_top_k: int = 2  # moe: experts per token
    moe_aux_loss_coef: float = 0.01  # moe: weight of the load-balancing loss added to the training loss
    qk_norm: bool = False  # normalize q and k per head (with `norm`) before the attention scores
    tie_embeddings: bool = True  # output head shares the token embedding matrix, as in GPT-2
    attention: str = "sdpa"  # key of ATTENTION_KERNELS
    doc_mask: bool = False  # attend within documents only; positions restart at each EOT
    eot_id: int = 50256  # the token that starts every document (doc_mask)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        tables = (("norm", NORMS), ("norm_placement", PLACEMENTS), ("pos", POSITIONS), ("mlp", MLPS),
                  ("attention", ATTENTION_KERNELS))
        for name, table in tables:
            if getattr(self, name) not in table:
                raise UserError(f"model {name}={getattr(self, name)!r} is unknown; choose one of {sorted(table)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos='rope' needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if not 1 <= self.moe_top_k <= self.n_experts:
            raise UserError(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")
        if self.attention == "flex" and self.dropout > 0:
            raise UserError("attention='flex' has no attention dropout; set dropout=0 or use attention='sdpa'")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model_config has unknown keys {unknown} (written by a newer version?)")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# ----------------------------------------------------------------------------------------------------
# Positions: each kind turns (token embeddings, positions) into (block input, RoPE angles or None).


def document_positions(idx: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows idx (B, T) where every document starts with EOT: the document id of each token
    (0 for the tail of a document begun in an earlier row) and its position inside its document."""
    T = idx.size(1)
    doc_ids = (idx == eot_id).cumsum(dim=1)
    t = torch.arange(T, device=idx.device).expand_as(idx)
    starts = torch.where(idx == eot_id, t, torch.zeros_like(t))
    return doc_ids, t - starts.cummax(dim=1).values


class LearnedPositions(nn.Embedding):
    """GPT-2: a learned vector per position, added to the token embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.block_size, cfg.n_embd)

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + self(pos), None


class RotaryPositions(nn.Module):
    """RoPE (Su et al. 2021): nothing is added to the input; q and k of every layer are rotated, pair of
    channels (i, i + head_size/2) by angle pos * rope_base^(-2i/head_size), so q.k depends only on the
    distance between the two positions (the convention of GPT-NeoX and HF's Llama)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hd = cfg.n_embd // cfg.n_head
        inv_freq = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived from the config, not saved

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        angles = pos[..., None].float() * self.inv_freq  # (B or 1, T, head_size/2)
        return x, (angles.cos()[:, None], angles.sin()[:, None])  # broadcast over heads


class NoPositions(nn.Module):
    """NoPE: no position signal at all; the causal mask alone lets the model infer order."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None


POSITIONS = {"learned": LearnedPositions, "rope": RotaryPositions, "none": NoPositions}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_size) by the angles whose cos/sin are given (B or 1, 1, T, head_size/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


# ----------------------------------------------------------------------------------------------------
# Norms, and where they sit in a block


def layer_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps, bias=cfg.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019): LayerNorm without centering or bias.
    Computed in fp32 so that bf16 activations do not lose the small mean square."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rms_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps)


NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}


class Placement(NamedTuple):
    sublayer: Callable[..., torch.Tensor]  # (x, f, norm_in, norm_out) -> x after the residual sublayer f
    norms_after: bool  # does the block need norm_out (sandwich)?
    final_norm: bool  # is there a norm before the output head?


PLACEMENTS = {
    # GPT-2: normalize the sublayer's input; the residual stream itself is never normalized.
    "pre": Placement(lambda x, f, norm_in, norm_out: x + f(norm_in(x)), norms_after=False, final_norm=True),
    # Original Transformer: normalize after the residual add; the last block's output is already normalized.
    "post": Placement(lambda x, f, norm_in, norm_out: norm_in(x + f(x)), norms_after=False, final_norm=False),
    # Sandwich (CogView, Gemma 2): normalize the sublayer's input and its output before the add.
    "sandwich": Placement(lambda x, f, norm_in, norm_out: x + norm_out(f(norm_in(x))), norms_after=True,
                          final_norm=True),
}


# ----------------------------------------------------------------------------------------------------
# MLPs


class GeluMLP(nn.Module):
    """GPT-2's feed-forward block: Linear(d, 4d) -> GELU(tanh approximation) -> Linear(4d, d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def swiglu_hidden(n_embd: int) -> int:
    """8/3 * d rounded up to a multiple of 64: three d x h matrices then hold as many weights as GELU's two
    d x 4d ones (exactly so when 8d/3 is a multiple of 64, e.g. d = 768 -> 2048)."""
    return (8 * n_embd // 3 + 63) // 64 * 64


class SwiGLUMLP(nn.Module):
    """SwiGLU (Shazeer 2020, as in Llama): Linear(h, d)(silu(x W_gate) * (x W_up)). c_fc holds W_gate and
    W_up side by side."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class MoEMLP(nn.Module):
    """Mixture of experts (GELU MLPs) with token-choice top-k routing, as in Mixtral: a linear router scores
    the experts for each token, the token goes to its k best, and their outputs are summed with weights
    softmax(scores of those k).

    No capacity limit and no dropped tokens: every token is processed by all k of its experts however
    unbalanced the routing, so a token's output never depends on other tokens (causality holds), at the
    price of unbounded load per expert. Balance comes only from the Switch Transformer auxiliary loss
    (Fedus et al. 2021, eq. 4), E * sum_e f_e * P_e with f_e the fraction of routed slots that chose expert
    e and P_e the mean router probability of e: 1.0 when routing is uniform, up to E when collapsed. It is
    stored in `self.aux_loss` by each forward; GPT.forward averages it over layers and adds
    moe_aux_loss_coef times that to the training loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(GeluMLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, E = x.shape, len(self.experts)
        x = x.reshape(-1, shape[-1])  # (N tokens, d)
        scores = self.router(x).float()  # (N, E)
        top_scores, top_experts = scores.topk(self.top_k, dim=-1)  # (N, k)
        weights = top_scores.softmax(dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_experts == e)
            # Called even with no tokens so that every expert is in the graph (DDP expects all gradients).
            out = expert(x[token]) * weights[token, slot, None]
            y = y.index_add(0, token, out.to(y.dtype))
        routed_fraction = F.one_hot(top_experts, E).float().mean(dim=(0, 1))
        self.aux_loss = E * (routed_fraction * scores.softmax(dim=-1).mean(dim=0)).sum()
        return y.view(shape)

    def inactive_params(self) -> int:
        """Expert weights a token does not pass through (for FLOP counts): all but k of the E experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (len(self.experts) - self.top_k) * per_expert


MLPS = {"gelu": GeluMLP, "swiglu": SwiGLUMLP, "moe": MoEMLP}


# ----------------------------------------------------------------------------------------------------
# Attention kernels: the same causal (optionally document-masked) softmax attention, computed by different
# code. Each has `mask(doc_ids, T, device)`, run once per forward pass (doc_ids is None without doc_mask), and
# `attend(q, k, v, mask, dropout_p)` on q, k, v of shape (B, H, T, head_size), given what `mask` returned.


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean, True where query t may attend to key s: s <= t and both in the same document."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def dense_mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """The mask of the dense kernels: None (plain causal) without doc_mask, else the document-causal mask."""
    return None if doc_ids is None else document_causal_mask(doc_ids)


class SDPAKernel:
    """PyTorch's fused kernels (flash / memory-efficient / math). With doc_mask, a dense boolean mask: always
    works, but costs T x T memory per row and rules out the flash kernel."""

    mask = staticmethod(dense_mask)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


class ManualKernel:
    """The textbook formula, softmax(QK^T / sqrt(d) + mask) V: a readable reference."""

    mask = staticmethod(dense_mask)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        T = q.size(-2)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return F.dropout(att, p=dropout_p, training=dropout_p > 0) @ v


_compiled_flex_attention = None


class FlexKernel:
    """torch.nn.attention.flex_attention (torch >= 2.5) with a block-sparse mask: blocks that are entirely
    masked (other documents, the future) are skipped. Compiled on GPU, where it is fast. On CPU it runs
    uncompiled and forward only (PyTorch has no CPU backward for it): usable for evaluation, not training."""

    @staticmethod
    def mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> object:
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return q_idx >= kv_idx

        def same_document_causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                                 kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        if doc_ids is None:
            return create_block_mask(causal, None, None, T, T, device=device)
        return create_block_mask(same_document_causal, doc_ids.size(0), None, T, T, device=doc_ids.device)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, dropout_p: float) -> torch.Tensor:
        global _compiled_flex_attention
        from torch.nn.attention.flex_attention import flex_attention

        if q.device.type == "cpu":
            if torch.is_grad_enabled() and q.requires_grad:
                raise UserError("attention='flex' cannot train on CPU (PyTorch has no CPU backward for "
                                "flex_attention); use attention='sdpa'")
            return flex_attention(q, k, v, block_mask=mask)
        if _compiled_flex_attention is None:  # uncompiled flex_attention materializes the scores: compile it
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex_attention(q, k, v, block_mask=mask)


class FlashAttnKernel:
    """Tri Dao's flash-attn package (CUDA, computes in fp16/bf16). With doc_mask the packed rows are cut into
    their documents and passed as one variable-length batch to flash_attn_varlen_func: no mask is built and
    no work is spent across documents."""

    @staticmethod
    def mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> tuple[torch.Tensor, int] | None:
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise UserError("attention='flash_attn' needs the flash-attn package and a CUDA GPU "
                            "(pip install flash-attn); use attention='sdpa'") from e
        if doc_ids is None:
            return None
        starts = torch.ones_like(doc_ids, dtype=torch.bool)  # a new sequence at each row start and each document
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        ends = torch.tensor([doc_ids.numel()], device=doc_ids.device)
        cu_seqlens = torch.cat((starts.flatten().nonzero().flatten(), ends)).to(torch.int32)
        return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: tuple[torch.Tensor, int] | None,
               dropout_p: float) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        (B, H, T, hd), out_dtype = q.shape, q.dtype
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # flash-attn's layout: (B, T, H, hd)
        if mask is None:
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        else:
            cu_seqlens, max_len = mask
            q, k, v = (t.reshape(B * T, H, hd) for t in (q, k, v))
            y = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p,
                                       causal=True).view(B, T, H, hd)
        return y.transpose(1, 2).to(out_dtype)


ATTENTION_KERNELS = {"sdpa": SDPAKernel, "manual": ManualKernel, "flex": FlexKernel, "flash_attn": FlashAttnKernel}


# ----------------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        hd = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = NORMS[cfg.norm](cfg, hd) if cfg.qk_norm else nn.Identity()
        self.k_norm = NORMS[cfg.norm](cfg, hd) if cfg.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        self.kernel = ATTENTION_KERNELS[cfg.attention]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: object) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.kernel.attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """A transformer block: an attention sublayer then an MLP sublayer, each wrapped in a residual
    connection with norms placed as PLACEMENTS says (GPT-2: x + attn(ln_1(x)), then x + mlp(ln_2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        placement = PLACEMENTS[cfg.norm_placement]
        norm_after = (lambda: NORMS[cfg.norm](cfg, cfg.n_embd)) if placement.norms_after else nn.Identity
        self.residual = placement.sublayer
        self.ln_1 = NORMS[cfg.norm](cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_1_out = norm_after()
        self.ln_2 = NORMS[cfg.norm](cfg, cfg.n_embd)
        self.mlp = MLPS[cfg.mlp](cfg)
        self.ln_2_out = norm_after()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: object) -> torch.Tensor:
        x = self.residual(x, lambda h: self.attn(h, rope, mask), self.ln_1, self.ln_1_out)
        return self.residual(x, self.mlp, self.ln_2, self.ln_2_out)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=POSITIONS[cfg.pos](cfg),  # has weights only for pos="learned"
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=NORMS[cfg.norm](cfg, cfg.n_embd) if PLACEMENTS[cfg.norm_placement].final_norm else nn.Identity(),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.attention_kernel = ATTENTION_KERNELS[cfg.attention]
        self.aux_loss: torch.Tensor | None = None  # MoE load-balancing loss of the last forward (see MoEMLP)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each block adds two of them.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_aux: bool = False
    ) -> tuple:
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) and, given targets (B, T) with -1 for
        positions to ignore, the mean cross-entropy computed in fp32. For mlp="moe" in training mode the loss
        also includes moe_aux_loss_coef * the load-balancing loss; `self.aux_loss` holds the latter (for
        logging) after every forward, and is None for dense MLPs."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        if cfg.doc_mask:
            doc_ids, pos = document_positions(idx, cfg.eot_id)
        else:
            doc_ids, pos = None, torch.arange(T, device=idx.device)[None]
        x, rope = self.transformer.wpe.embed(self.transformer.wte(idx), pos)
        mask = self.attention_kernel.mask(doc_ids, T, idx.device)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : cfg.vocab_size]  # padding rows are never predicted
        moe_losses = [block.mlp.aux_loss for block in self.transformer.h if isinstance(block.mlp, MoEMLP)]
        self.aux_loss = torch.stack(moe_losses).mean() if moe_losses else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if self.training and self.aux_loss is not None:
                loss = loss + cfg.moe_aux_loss_coef * self.aux_loss
        if return_aux:
            return logits, loss, self.aux_loss
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters, a tied embedding counted once (GPT-2 124M: 124,439,808)."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward, as in the PaLM paper (appendix B) and nanoGPT/llm.c:
        6N for the matmuls with N weights each token passes through (every parameter except the embedding
        tables and the MoE experts a token is not routed to; the output head counts), plus
        12 * n_layer * T * n_embd for the attention scores and their weighted sum (QK^T and AV, full T x T:
        neither the causal half nor document masking is discounted)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - sum(p.numel() for p in self.transformer.wpe.parameters())
        if self.lm_head.weight is not self.transformer.wte.weight:
            n -= self.transformer.wte.weight.numel()
        n -= sum(m.inactive_params() for m in self.modules() if isinstance(m, MoEMLP))
        return 6 * n + 12 * cfg.n_layer * T * cfg.n_embd

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). temperature <= 0 means greedy (argmax);
        top_k keeps only the k most likely tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# ----------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 format (import / export)

# HF's GPT-2 stores these four as Conv1D, i.e. (in_features, out_features): transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # causal-mask buffers in old checkpoints


def _read_hf_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json, not a Hugging Face model folder")
    hf_config = json.loads(config_file.read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    return hf_config, state


def load_hf_gpt2(name_or_path: str | Path) -> GPT:
    """Build a GPT from a Hugging Face GPT-2 checkpoint: a local folder, or a hub name such as "gpt2"
    (downloaded with huggingface_hub; needs network)."""
    path = Path(name_or_path)
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as e:  # offline, unknown repo, ...
            raise UserError(f"{name_or_path}: not a local folder and could not be fetched from the hub ({e})") from e
    hf_config, hf_state = _read_hf_folder(path)
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type is {hf_config.get('model_type')!r}, expected 'gpt2'")
    cfg = GPTConfig(
        vocab_size=hf_config.get("vocab_size", 50257),
        block_size=hf_config.get("n_positions", 1024),
        n_layer=hf_config.get("n_layer", 12),
        n_head=hf_config.get("n_head", 12),
        n_embd=hf_config.get("n_embd", 768),
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
    )
    model = GPT(cfg)
    ours = model.state_dict()
    hf_state = {k.removeprefix("model."): v for k, v in hf_state.items() if not _HF_BUFFERS.search(k)}
    hf_state.setdefault("lm_head.weight", hf_state.get("transformer.wte.weight"))
    missing = sorted(set(ours) - set(hf_state))
    if missing:
        raise UserError(f"{path}: tensor {missing[0]!r} is missing (not a GPT-2 checkpoint?)")
    unexpected = sorted(set(hf_state) - set(ours))
    if unexpected:
        raise UserError(f"{path}: unexpected tensor {unexpected[0]!r} (not a GPT-2 checkpoint?)")
    converted = {}
    for key, t in hf_state.items():
        t = t.t() if key.endswith(_CONV1D) else t
        if t.shape != ours[key].shape:
            raise UserError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ours[key].shape)} "
                f"for the architecture in config.json"
            )
        converted[key] = t.to(torch.float32)
    model.load_state_dict(converted)
    return model


def export_hf_gpt2(model: GPT, out_dir: str | Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder (config.json, model.safetensors and the GPT-2 tokenizer
    files) that `GPT2LMHeadModel.from_pretrained` and `lm_eval --model hf` load."""
    cfg = model.config
    gpt2 = GPTConfig(**{f: getattr(cfg, f) for f in _HF_EXPORTABLE_FIELDS})
    differs = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)
               if f.name not in _EXPORT_IGNORES and getattr(cfg, f.name) != getattr(gpt2, f.name)]
    if differs:
        raise UserError(f"only the GPT-2 architecture can be exported to Hugging Face format, this model has "
                        f"{', '.join(differs)}; evaluate ablation variants with eval_lm.py directly")
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenizer import save_hf_tokenizer

    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_eps, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256,
    )
    hf = GPT2LMHeadModel(hf_config)
    hf_state = hf.state_dict()
    state = {}
    for key, t in model.state_dict().items():
        t = t[: cfg.vocab_size] if key in ("transformer.wte.weight", "lm_head.weight") else t
        state[key] = t.t().contiguous() if key.endswith(_CONV1D) else t
    for key in hf_state:
        if key not in state:  # HF's causal-mask buffers, if this transformers version has them
            state[key] = hf_state[key]
    hf.load_state_dict(state)
    out = Path(out_dir)
    hf.save_pretrained(out)
    save_hf_tokenizer(out)
    return out


# The fields a GPT-2 checkpoint can express; anything else must be at its default to export.
_HF_EXPORTABLE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "layer_norm_eps")
# Settings that do not change the function a GPT-2 checkpoint computes on one document (or are unused unless
# another field, checked itself, differs from GPT-2's): these do not block an export.
_EXPORT_IGNORES = ("pad_vocab_multiple", "dropout", "attention", "doc_mask", "eot_id", "rope_base", "n_experts",
                   "moe_top_k", "moe_aux_loss_coef")
