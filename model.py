"""GPT-2 in plain PyTorch: the model, its config and the named sizes of OpenAI's GPT-2.

The default `GPTConfig()` is OpenAI's GPT-2 124M exactly: learned position embeddings, pre-LayerNorm blocks
with biases, causal self-attention, a 4x GELU(tanh) MLP, a final LayerNorm and an output head tied to the token
embedding. Module names follow Hugging Face's `GPT2LMHeadModel`, so weights move between the two by transposing
the four Conv1D matrices (hf.py).

The architecture ablations are parts picked by name from tables, never if-chains inside the forward pass:
norms, positions, norm placements and MLP variants in layers.py (plus the MLPS table here), attention kernels
in attention.py; plus the switches bias, qk_norm, tie_embeddings and doc_mask (document masking of packed
rows, docs/design.md "Formats").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import ATTENTION_KERNELS, document_positions
from errors import UserError
from layers import NORMS, PLACEMENTS, POSITIONS, MoEMLP, Rope, SwiGLUMLP, apply_rope, make_norm

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
    mlp_hidden: int | None = None  # MLP width; None: 4*n_embd (gelu/relu2/moe), 8/3*n_embd rounded up to 64 (swiglu)
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
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        hd = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, hd) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, hd) if cfg.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        self.kernel = ATTENTION_KERNELS[cfg.attention]

    def forward(self, x: torch.Tensor, rope: Rope, mask: object) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.kernel.attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's feed-forward block: Linear(d, 4d) -> GELU(tanh approximation) -> Linear(4d, d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class ReLU2MLP(MLP):
    """Ablation: ReLU^2 (So et al. 2021, "Primer"; modded-nanogpt's and nanochat's MLP), GELU replaced by relu(x)^2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


MLPS = {"gelu": MLP, "swiglu": SwiGLUMLP, "relu2": ReLU2MLP,
        "moe": partial(MoEMLP, expert=MLP)}  # moe: experts are GPT-2 MLPs


class Block(nn.Module):
    """A GPT-2 transformer block: attention then MLP, each a residual branch whose input is normalized. The
    blocks of the other norm placements, and the one for a MoE MLP, are layers.PLACEMENTS."""

    def __init__(self, cfg: GPTConfig, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = attn
        self.ln_2 = make_norm(cfg)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rope: Rope, mask: object, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        # aux_losses collects MoE load-balancing losses (the blocks of layers.PLACEMENTS); a dense MLP has none
        x = x + self.attn(self.ln_1(x), rope, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        placement = PLACEMENTS[cfg.norm_placement]
        # GPT-2's Block, unless the norms sit elsewhere or the MLP is a MoE (whose loss Block has no place for)
        block = Block if cfg.norm_placement == "pre" and cfg.mlp != "moe" else placement
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=POSITIONS[cfg.pos](cfg),  # has weights only for pos="learned"
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(block(cfg, CausalSelfAttention(cfg), MLPS[cfg.mlp](cfg)) for _ in range(cfg.n_layer)),
                ln_f=make_norm(cfg) if placement.final_norm else nn.Identity(),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.attention_kernel = ATTENTION_KERNELS[cfg.attention]
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
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) and, given targets (B, T) with -1 for
        positions to ignore, the mean cross-entropy computed in fp32 (else None). For mlp="moe" in training mode
        the loss also includes moe_aux_loss_coef * the load-balancing loss (mean over layers). return_aux=True
        returns that load-balancing loss as a third value (a 0-dim tensor; None for dense MLPs)."""
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
        aux_losses: list[torch.Tensor] = []
        for block in self.transformer.h:
            x = block(x, rope, mask, aux_losses)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : cfg.vocab_size]  # padding rows are never predicted
        aux = torch.stack(aux_losses).mean() if aux_losses else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if self.training and aux is not None:
                loss = loss + cfg.moe_aux_loss_coef * aux
        return (logits, loss, aux) if return_aux else (logits, loss)

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
