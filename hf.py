"""Hugging Face GPT-2 checkpoints: load_hf_gpt2 builds a GPT from one, export_hf_gpt2 writes one.

Module names follow GPT2LMHeadModel, so the state dicts differ only by the four Conv1D matrices, which HF
stores transposed.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch

from errors import UserError
from model import GPT, GPTConfig
from tokenizer import save_hf_tokenizer

# HF's GPT-2 stores these four as Conv1D, i.e. (in_features, out_features): transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # causal-mask buffers in old checkpoints
# The fields a GPT-2 checkpoint can express; anything else must be at its default to export.
_HF_EXPORTABLE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "layer_norm_eps")
# Settings that do not change the function a GPT-2 checkpoint computes on one document (or are unused unless
# another field, checked itself, differs from GPT-2's): these do not block an export.
_EXPORT_IGNORES = ("pad_vocab_multiple", "dropout", "attention", "doc_mask", "eot_id", "rope_base", "n_experts",
                   "moe_top_k", "moe_aux_loss_coef")


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

