"""GPT-2 in plain PyTorch.

The default `GPTConfig()` is OpenAI's GPT-2 124M exactly: learned position embeddings, pre-LayerNorm
blocks with biases, causal self-attention, a 4x GELU(tanh) MLP, a final LayerNorm and an output head tied
to the token embedding. Module names follow Hugging Face's `GPT2LMHeadModel`, so weights move between the
two by transposing the four Conv1D matrices (see `load_hf_gpt2` / `export_hf_gpt2`).

Architecture ablations are parts picked by name from the small tables below (NORMS, MLPS, ...),
never if-chains inside the forward pass.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
    bias: bool = True  # biases in Linear layers and norms
    norm: str = "layernorm"  # key of NORMS
    mlp: str = "gelu"  # key of MLPS
    attention: str = "sdpa"  # key of ATTENTION_KERNELS
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name, table in (("norm", NORMS), ("mlp", MLPS), ("attention", ATTENTION_KERNELS)):
            if getattr(self, name) not in table:
                raise UserError(f"model {name}={getattr(self, name)!r} is unknown; choose one of {sorted(table)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

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
# Parts, picked by name


def layer_norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)


NORMS = {"layernorm": layer_norm}


class GeluMLP(nn.Module):
    """GPT-2's feed-forward block: Linear(d, 4d) -> GELU(tanh approximation) -> Linear(4d, d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


MLPS = {"gelu": GeluMLP}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention through PyTorch's fused kernels (flash / memory-efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The textbook formula, softmax(QK^T / sqrt(d) + causal mask) V: a readable reference."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return F.dropout(att, p=dropout_p, training=dropout_p > 0) @ v


ATTENTION_KERNELS = {"sdpa": sdpa_attention, "manual": manual_attention}


# ----------------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        self.kernel = ATTENTION_KERNELS[cfg.attention]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = self.kernel(q, k, v, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = NORMS[cfg.norm](cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = NORMS[cfg.norm](cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=NORMS[cfg.norm](cfg),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
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
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) and, given targets (B, T) with -1 for
        positions to ignore, the mean cross-entropy computed in fp32."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # padding rows are never predicted
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once (GPT-2 124M: 124,439,808)."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward, as in the PaLM paper (appendix B) and nanoGPT/llm.c:
        6N for the matmuls with N weights each token passes through (every parameter except the embedding
        tables; the output head counts), plus 12 * n_layer * T * n_embd for the attention scores and
        their weighted sum (QK^T and AV, full T x T: the causal half is not discounted)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - self.transformer.wpe.weight.numel()
        if self.lm_head.weight is not self.transformer.wte.weight:
            n -= self.transformer.wte.weight.numel()
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
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenizer import save_hf_tokenizer

    cfg = model.config
    gpt2_shaped = GPTConfig(**{**cfg.to_dict(), "pad_vocab_multiple": 1, "dropout": 0.0, "attention": "sdpa"})
    if gpt2_shaped != GPTConfig(**{f: getattr(gpt2_shaped, f) for f in _HF_EXPORTABLE_FIELDS}):
        raise UserError("only the GPT-2 architecture can be exported to Hugging Face format; "
                        "evaluate ablation variants with eval_lm.py directly")
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
