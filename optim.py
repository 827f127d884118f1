"""The optimizers: AdamW with GPT-2's decay groups (fused wherever torch has the kernel), or torch's Muon for
the blocks' matrices with AdamW for the rest; ZeRO-1 sharding of either; and loading a saved state.

Every fast path here is a switch with a plain alternative; tests/test_fast_paths.py and tests/test_optim.py
check them against torch's own optimizers run directly.
"""

from __future__ import annotations

import inspect

import torch

from common import Dist
from errors import UserError
from model import GPT
from train_config import ConfigError, TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter with >= 2 dims (Linear weights and the token/position embeddings,
    as in GPT-2/nanoGPT); none on biases and norm gains (1-D). The tied wte/lm_head counts once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def fused_adamw_available(device_type: str) -> bool:
    """Fused AdamW (one kernel for all parameters) exists for CUDA tensors in torch >= 2.0; CPU since 2.4."""
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")


def adamw_kwargs(lr: float, betas: tuple[float, float], eps: float, device_type: str,
                 fused: bool | None = None) -> dict:
    """AdamW's keyword arguments. fused=None picks the fused kernel wherever torch has it: one launch for all
    parameters instead of a few per tensor group, and it can skip a non-finite step on the device (train.py)."""
    if fused is None:
        fused = fused_adamw_available(device_type)
    if fused and not fused_adamw_available(device_type):
        raise UserError(f"fused AdamW is not available for {device_type} in torch {torch.__version__}")
    return dict(lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
               fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over param groups (param_groups: decay on >= 2-D weights only)."""
    device_type = groups[0]["params"][0].device.type
    return torch.optim.AdamW(groups, **adamw_kwargs(lr, betas, eps, device_type, fused))


def muon_param_groups(model: torch.nn.Module, weight_decay: float, lrs: dict[str, float],
                      muon_weight_decay: float = 0.0) -> tuple[list[dict], list[dict]]:
    """The Muon / AdamW split of modded-nanogpt and nanochat: (Muon groups, AdamW groups).

    Muon: every 2-D weight inside the transformer blocks (attention and MLP matrices, MoE routers and experts).
    AdamW: the embeddings (wte, wpe), the untied output head, and every 1-D tensor (norm gains, biases). lrs
    gives each part's base lr ({"muon", "embed", "head", "scalar"}); a tied wte/lm_head is one matrix in the
    embed group at the head's lr, as it is also the output layer. Weight decay as in param_groups: on the
    AdamW side's matrices only, never on 1-D tensors; Muon's own is muon_weight_decay. Empty groups are left out."""
    blocks = {id(p) for p in model.transformer.h.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tied = model.lm_head.weight is model.transformer.wte.weight
    parts: dict[str, list[torch.nn.Parameter]] = {"muon": [], "embed": [], "head": [], "scalar": []}
    for p in model.parameters():  # each parameter once (the tied head is wte)
        if not p.requires_grad:
            continue
        part = ("scalar" if p.dim() < 2 else "muon" if id(p) in blocks else "embed" if id(p) in embeddings
                else "head")
        parts[part].append(p)
    muon = [{"params": parts["muon"], "lr": lrs["muon"], "weight_decay": muon_weight_decay}]
    adamw = [{"params": parts["embed"], "lr": lrs["head"] if tied else lrs["embed"], "weight_decay": weight_decay},
             {"params": parts["head"], "lr": lrs["head"], "weight_decay": weight_decay},
             {"params": parts["scalar"], "lr": lrs["scalar"], "weight_decay": 0.0}]
    return [g for g in muon if g["params"]], [g for g in adamw if g["params"]]


def muon_class() -> type[torch.optim.Optimizer]:
    """torch.optim.Muon (torch >= 2.9), or a UserError naming the torch version."""
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is torch "
                        f"{torch.__version__}: upgrade torch or use optimizer='adamw'")
    return torch.optim.Muon


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, driven as one optimizer: param_groups lists both
    optimizers' groups (the lr schedule sets each), step() steps both, state_dict() holds both. Either part
    may be a ZeroRedundancyOptimizer. Its defaults say "not fused", so train.train_step skips a non-finite
    step with one host read (torch's Muon has no found_inf flag to skip on the device) and GradScaler treats
    it like any unfused optimizer."""

    defaults: dict = {}

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def parts(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.adamw, "muon": self.muon}

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, closure: None = None) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """ZeRO-1: gather each sharded part's state on rank `to` (a collective: every rank calls it)."""
        for opt in self.parts.values():
            if hasattr(opt, "consolidate_state_dict"):
                opt.consolidate_state_dict(to=to)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def build_optimizer(cfg: TrainConfig, d: Dist, model: GPT) -> torch.optim.Optimizer | MuonWithAdamW:
    """Fused AdamW (decay on matrices only), or with optimizer=muon torch's Muon for the blocks' matrices plus
    AdamW for the rest (optim.muon_param_groups). ZeRO-1 shards each optimizer's state across ranks, in flat
    per-rank buckets so the step after it is one broadcast per rank, not one per parameter.

    Groups whose base lr is not cfg.lr carry lr_scale = base lr / cfg.lr: the loop sets each group's lr to
    lr_at(step) * lr_scale (AdamW's groups have none, so its lr is lr_at(step) exactly, as before)."""
    kw = adamw_kwargs(cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, d.device.type)
    zero1 = d.enabled and cfg.zero1

    def make(groups: list[dict], cls: type[torch.optim.Optimizer], **kw: object) -> torch.optim.Optimizer:
        if zero1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(groups, optimizer_class=cls, parameters_as_bucket_view=True, **kw)
        return cls(groups, **kw)

    if cfg.optimizer == "adamw":
        return make(param_groups(model, cfg.weight_decay), torch.optim.AdamW, **kw)
    lrs = {"muon": cfg.muon_lr, "embed": cfg.embed_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr}
    muon_groups, adamw_groups = muon_param_groups(model, cfg.weight_decay, lrs, cfg.muon_weight_decay)
    for g in muon_groups + adamw_groups:
        g["lr_scale"] = g["lr"] / cfg.lr
    muon = make(muon_groups, muon_class(), lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                weight_decay=cfg.muon_weight_decay, adjust_lr_fn=cfg.muon_adjust_lr)
    return MuonWithAdamW(muon, make(adamw_groups, torch.optim.AdamW, **kw))


def load_optimizer_state(optimizer: torch.optim.Optimizer | MuonWithAdamW, state: dict) -> None:
    """Load a (consolidated) optimizer state. ZeroRedundancyOptimizer.load_state_dict puts every 0-dim state
    tensor (AdamW's step) on the CPU, but the fused CUDA kernel needs it on the parameter's device: move it back."""
    combined = isinstance(optimizer, MuonWithAdamW)
    saved = "muon" if "muon" in state else "adamw"  # MuonWithAdamW.state_dict() is {"adamw": ..., "muon": ...}
    wanted = "muon" if combined else "adamw"
    if saved != wanted:
        raise ConfigError(f"init_from=resume: the checkpoint's optimizer state is {saved}'s, the config asks for "
                          f"optimizer={wanted}; resume with --optimizer={saved}")
    optimizer.load_state_dict(state)
    for part in optimizer.parts.values() if combined else [optimizer]:
        inner = getattr(part, "optim", part)
        for p, s in inner.state.items():
            if isinstance(s.get("step"), torch.Tensor) and s["step"].device != p.device:
                s["step"] = s["step"].to(p.device)
