"""The architecture ablations' parts, each picked by name from a table (a GPTConfig field names the key):
    NORMS       norm            layernorm | rmsnorm
    POSITIONS   pos             learned | rope | none      (rope_base sets RoPE's wavelengths)
    PLACEMENTS  norm_placement  pre | post | sandwich      (the blocks other than GPT-2's model.Block)
    the MLP variants swiglu and moe (model.MLPS holds them with GPT-2's gelu MLP and model.py's ReLU2MLP).

This file does not import model.py: the parts take a GPTConfig (a type hint only) or plain arguments, and the
blocks are handed their attention and MLP sublayers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Callable

    from model import GPTConfig

Rope = tuple[torch.Tensor, torch.Tensor] | None  # cos, sin of RoPE's angles, or None without RoPE

# ----------------------------------------------------------------------------------------------------
# Norms


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


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default n_embd)."""
    return NORMS[cfg.norm](cfg, dim or cfg.n_embd)


# ----------------------------------------------------------------------------------------------------
# Positions: each kind turns (token embeddings, positions) into (block input, RoPE angles or None).


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
# MLP variants


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
    """Mixture of experts with token-choice top-k routing, as in Mixtral: a linear router scores the experts
    (`expert(cfg)` modules, GPT-2's MLP in model.MLPS) for each token, the token goes to its k best, and their
    outputs are summed with weights softmax(scores of those k).

    No capacity limit and no dropped tokens: every token is processed by all k of its experts however
    unbalanced the routing, so a token's output never depends on other tokens (causality holds), at the
    price of unbounded load per expert. Balance comes only from the Switch Transformer auxiliary loss
    (Fedus et al. 2021, eq. 4), E * sum_e f_e * P_e with f_e the fraction of routed slots that chose expert
    e and P_e the mean router probability of e: 1.0 when routing is uniform, up to E when collapsed. forward
    returns it beside the output; GPT.forward averages it over layers and adds moe_aux_loss_coef times that to
    the training loss.

    Dispatch reads each expert's token list back to the host (torch.where, one sync per expert and layer, and a
    graph break under torch.compile): fixed shapes without dropping tokens would mean running every expert on
    every token."""

    def __init__(self, cfg: GPTConfig, expert: Callable[[GPTConfig], nn.Module]):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(expert(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d) -> (output of x's shape, load-balancing loss: a 0-dim fp32 tensor)."""
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
        aux_loss = E * (routed_fraction * scores.softmax(dim=-1).mean(dim=0)).sum()
        return y.view(shape), aux_loss

    def inactive_params(self) -> int:
        """Expert weights a token does not pass through (for FLOP counts): all but k of the E experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (len(self.experts) - self.top_k) * per_expert


# ----------------------------------------------------------------------------------------------------
# Norm placements: blocks with the norms elsewhere than GPT-2's model.Block, or with a MoE MLP (whose
# load-balancing loss model.Block, the plain GPT-2 formula, has no place for). Their sublayers are built by
# model.GPT; their parameters are registered in the same order as model.Block's (the sandwich's extra norms
# right after their sublayers), which is the order of the optimizer state in checkpoints.


def mlp_output(mlp: nn.Module, h: torch.Tensor, aux_losses: list[torch.Tensor]) -> torch.Tensor:
    """mlp(h); a MoE MLP also returns its load-balancing loss, which is appended to aux_losses."""
    if not isinstance(mlp, MoEMLP):
        return mlp(h)
    y, aux_loss = mlp(h)
    aux_losses.append(aux_loss)
    return y


class PreNormBlock(nn.Module):
    """GPT-2's placement, x + f(norm(x)) for each sublayer f, for any MLP including a MoE."""

    final_norm = True  # does the model normalize the last block's output before the head?

    def __init__(self, cfg: GPTConfig, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = make_norm(cfg), attn, make_norm(cfg), mlp

    def forward(self, x: torch.Tensor, rope: Rope, mask: object, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask)
        return x + mlp_output(self.mlp, self.ln_2(x), aux_losses)


class PostNormBlock(PreNormBlock):
    """The original Transformer's placement (Vaswani et al. 2017), norm(x + f(x)): the residual stream itself
    is normalized after every add, so the last block's output is already normalized."""

    final_norm = False

    def forward(self, x: torch.Tensor, rope: Rope, mask: object, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, rope, mask))
        return self.ln_2(x + mlp_output(self.mlp, x, aux_losses))


class SandwichBlock(nn.Module):
    """Sandwich norm (CogView, Gemma 2), x + norm_out(f(norm(x))): a second, separate norm on each sublayer's
    output before the add."""

    final_norm = True

    def __init__(self, cfg: GPTConfig, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_1_out = make_norm(cfg), attn, make_norm(cfg)
        self.ln_2, self.mlp, self.ln_2_out = make_norm(cfg), mlp, make_norm(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, mask: object, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.ln_1_out(self.attn(self.ln_1(x), rope, mask))
        return x + self.ln_2_out(mlp_output(self.mlp, self.ln_2(x), aux_losses))


PLACEMENTS = {"pre": PreNormBlock, "post": PostNormBlock, "sandwich": SandwichBlock}
