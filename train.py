"""Train a GPT: one process, or DDP under torchrun, with optional ZeRO-1 and bf16/fp16 autocast.

    python train.py config/shakespeare_cpu.py                          # single process
    python train.py config/shakespeare_cpu.py --max_steps=50 --lr=1e-3   # overrides, --key=value
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_owt.py
    python train.py config/gpt2_owt.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    torchrun --max_restarts=3 ... train.py config/gpt2_owt.py --init_from=auto   # resume if ckpt.pt exists

A config file is plain Python assignments (`lr = 6e-4`), checked against TrainConfig below: an unknown
name or a value of the wrong type is an error. Outputs go to out_dir: ckpt.pt (DESIGN.md "Checkpoint"),
metrics.jsonl (one JSON object per logged step) and, when wandb_log=True, a wandb run.

SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the process exits 0 (a second
Ctrl-C stops at once). `init_from="resume"` then continues bit-identically on CPU.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import functools
import json
import math
import os
import random
import secrets
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint
from data import TokenLoader, load_meta
from errors import UserError, run_main
from hf import load_hf_gpt2
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    # data / output
    data_dir: str = "data/openwebtext"  # prepared by prepare_data.py (meta.json + uint16 shards)
    out_dir: str = "out/gpt2"
    # "scratch" | "resume" (out_dir/ckpt.pt) | "auto" (resume if out_dir/ckpt.pt exists, else scratch: for
    # schedulers and torchrun --max_restarts) | a Hugging Face GPT-2 folder/hub name
    init_from: str = "scratch"
    overwrite: bool = False  # let init_from=scratch / <HF folder> replace an existing out_dir/ckpt.pt
    # model: a preset of model.PRESETS plus any GPTConfig fields, e.g. {"n_layer": 4, "pos": "rope"}
    model: str = "gpt2"
    model_overrides: dict = field(default_factory=dict)
    # batch: total_batch_tokens = micro_batch * seq_len * grad_accum * world_size (grad_accum is derived)
    micro_batch: int = 16
    seq_len: int = 1024
    total_batch_tokens: int = 524_288  # 2**19, GPT-3 small's 0.5M tokens
    max_steps: int = 0  # exactly one of max_steps / max_tokens must be > 0
    max_tokens: int = 0  # max_steps = ceil(max_tokens / total_batch_tokens)
    # optimizer: AdamW; lr warms up linearly for warmup_steps, then cosine-decays to min_lr at max_steps
    lr: float = 6e-4
    min_lr: float = 0.0
    warmup_steps: int = 700
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D params only (matmul weights and embeddings); never biases/norm gains
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    # numerics / speed
    dtype: str = "bf16"  # autocast dtype: bf16 | fp16 (with a GradScaler) | fp32 (no autocast)
    device: str = "auto"  # auto = cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    compile: bool = False  # torch.compile the model (minutes of compile on first steps; faster after)
    zero1: bool = True  # shard AdamW state across ranks (ZeroRedundancyOptimizer); ignored with one process
    backend: str = "auto"  # torch.distributed backend: auto = nccl on CUDA, gloo on CPU
    dist_timeout_s: float = 600.0  # a collective waiting longer (a rank crashed or hangs) fails the job, no hang
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look the GPU up (unknown/CPU: no MFU)
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (fp32/bf16; fp16's scaler skips)
    # evaluation / logging / checkpoints (all intervals in optimizer steps; 0 = never)
    eval_interval: int = 250  # val loss over eval_iters x micro_batch val rows, shared among ranks
    eval_iters: int = 20
    hellaswag_interval: int = 0  # eval_hellaswag.evaluate_hellaswag every N steps (0 = off)
    hellaswag_path: str = ""  # local hellaswag jsonl ("" = eval_hellaswag's default)
    hellaswag_limit: int = 0  # examples per evaluation (0 = all)
    log_interval: int = 10
    ckpt_interval: int = 1000  # a checkpoint is also written at the end and on SIGTERM/SIGINT
    seed: int = 1337
    # wandb (opt-in; WANDB_MODE=offline works without network; a resumed run continues the same wandb run)
    wandb_log: bool = False
    wandb_project: str = "gpt2"
    wandb_run_name: str = ""


class ConfigError(UserError):
    pass


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}  # annotations are strings: "int", "float", ...


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"


def _check_type(key: str, value: object, type_name: str, where: str) -> object:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
    }[type_name]
    if not ok:
        raise ConfigError(f"{where}: {key} must be {type_name}, got {type(value).__name__} {value!r}")
    return float(value) if type_name == "float" else value


def _coerce(key: str, text: str, type_name: str) -> object:
    """A command-line string as the field's type."""
    if type_name == "str":
        return text
    if type_name == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text}: expected true/false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--{key}={text}: not a valid {type_name}") from e
    return _check_type(key, value, type_name, "command line")


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from optional config files (plain assignments, applied in order) and --key=value
    overrides; `--model_overrides.n_layer=4` sets one entry of the model_overrides dict."""
    values: dict[str, Any] = {}
    names = list(FIELD_TYPES)
    for arg in argv:
        if not arg.startswith("--"):
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            scope: dict[str, Any] = {}
            try:
                exec(compile(path.read_text(), str(path), "exec"), scope)
            except SyntaxError as e:
                raise ConfigError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from e
            except Exception as e:
                raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from e
            for key, value in scope.items():
                if key.startswith("_") or isinstance(value, type(sys)):  # __builtins__, imported modules
                    continue
                if key not in FIELD_TYPES:
                    raise ConfigError(f"config file {path}: unknown key {key!r}{_close(key, names)}")
                values[key] = _check_type(key, value, FIELD_TYPES[key], f"config file {path}")
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: overrides are written --key=value")
        key, text = arg[2:].split("=", 1)
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            try:
                sub_value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                sub_value = text  # a bare word such as rope
            values["model_overrides"] = {**values.get("model_overrides", {}), sub: sub_value}
            continue
        if key not in FIELD_TYPES:
            raise ConfigError(f"--{key}: unknown key{_close(key, names)}")
        values[key] = _coerce(key, text, FIELD_TYPES[key])
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"dtype={cfg.dtype!r}: choose bf16, fp16 or fp32")
    if (cfg.max_steps > 0) == (cfg.max_tokens > 0):
        raise ConfigError("set exactly one of max_steps / max_tokens to a positive number")
    for k in ("micro_batch", "seq_len", "total_batch_tokens", "eval_iters", "log_interval"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be positive")
    for k in ("warmup_steps", "eval_interval", "hellaswag_interval", "ckpt_interval", "max_bad_steps"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be >= 0")
    if cfg.dist_timeout_s <= 0:
        raise ConfigError(f"dist_timeout_s={cfg.dist_timeout_s} must be positive")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr={cfg.min_lr} is above lr={cfg.lr}")
    model_config(cfg)  # checks the preset and overrides


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The GPTConfig a config asks for: preset + overrides, each override checked against GPTConfig's
    fields (whatever fields model.py has), with the default's type."""
    known = {f.name: f for f in fields(GPTConfig)}
    preset = GPTConfig.from_preset(cfg.model)
    for key, value in cfg.model_overrides.items():
        if key not in known:
            raise ConfigError(f"model_overrides: unknown GPTConfig field {key!r}{_close(key, list(known))}")
        default = getattr(preset, key)
        if default is not None and not (
            isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        ) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise ConfigError(f"model_overrides: {key} must be {type(default).__name__}, got {value!r}")
    mc = GPTConfig.from_preset(cfg.model, **cfg.model_overrides)
    if cfg.seq_len > mc.block_size:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's block_size={mc.block_size}; "
                          "lower seq_len or set model_overrides block_size")
    return mc


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter with >= 2 dims (Linear weights and the token/position embeddings,
    as in GPT-2/nanoGPT); none on biases and norm gains (1-D). The tied wte/lm_head counts once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------------------------------
# Helpers: distributed setup, RNG, MFU, signals


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Single process unless torchrun set RANK / WORLD_SIZE; then one device per process."""
    if "RANK" not in os.environ:
        if cfg.device == "auto":
            return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(device=torch.device(cfg.device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        kw: dict[str, Any] = {}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # after a torchrun --max_restarts restart, the agent's store still holds the failed attempt's
            # addresses under the same keys (gloo then connects to dead ports): give each attempt its own keys
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            kw = {"store": dist.PrefixStore(f"restart_{restart}", store), "rank": rank, "world_size": world}
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None, timeout=timeout, **kw)
    return Dist(rank, local_rank, world, device)


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# Dense bf16 tensor-core peak FLOP/s by GPU name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
                   "L40S": 362e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


class StopFlag:
    """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and exit 0; a second SIGINT is a hard
    stop (Python's default handler). Handlers are restored on close()."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded): no graceful stop
                pass

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True  # no printing here: a handler that prints can interrupt a print (reentrancy)
        self.name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingDiverged(Exception):
    pass


def _test_faults() -> dict:
    """Fault injection for tests/test_faults.py only: JSON in $TRAIN_TEST_FAULTS (never set in real runs).
    "nan_steps": [k, ...] steps whose loss is made NaN; "nan_from": k, every step from k on; "crash" / "hang":
    {"step": k, "rank": r, "once": marker_path} exits with code 17 / sleeps at the start of step k on rank r
    (with "once": only if the marker file does not exist yet, which it then creates)."""
    text = os.environ.get("TRAIN_TEST_FAULTS")
    return json.loads(text) if text else {}


def _inject_faults(faults: dict, step: int, rank: int) -> None:
    for kind in ("crash", "hang"):
        f = faults.get(kind)
        if not f or f["step"] != step or f.get("rank", 0) != rank:
            continue
        if f.get("once"):
            if Path(f["once"]).exists():
                continue
            Path(f["once"]).touch()
        print(f"injected fault: {kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
        if kind == "crash":
            os._exit(17)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung for good, but torchrun may still stop it
        time.sleep(3600)


# ----------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, cfg: TrainConfig, d: Dist, autocast: Any) -> float:
    """Mean loss over the first eval_iters x micro_batch rows of the val split (file order, the same rows at
    every evaluation). Batch i goes to rank i % world_size, so the number does not depend on the world size."""
    loader = TokenLoader(cfg.data_dir, "val", cfg.micro_batch, cfg.seq_len, seed=cfg.seed, shuffle=False)
    model.eval()
    total = torch.zeros(2, device=d.device)  # (sum of batch losses, number of batches) on this rank
    for i in range(cfg.eval_iters):
        x, y = loader.next_batch()
        if i % d.world_size != d.rank:
            continue
        with autocast:
            _, loss = model(x.to(d.device), y.to(d.device))
        total += torch.stack([loss.float(), torch.ones((), device=d.device)])
    model.train()
    if d.enabled:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def train(cfg: TrainConfig) -> dict:
    """Run the training loop; returns {"losses": [per-step loss], "step", "val_loss", "stopped"}."""
    validate(cfg)
    load_meta(cfg.data_dir)  # a missing / incomplete dataset fails here, before any process group work
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir")
    if cfg.init_from not in ("resume", "auto") and (out / "ckpt.pt").is_file() and not cfg.overwrite:
        # re-running a finished command must not silently replace hours of training at the first save
        raise ConfigError(f"{out / 'ckpt.pt'} already exists: continue it with --init_from=resume (or auto), "
                          "start over with --overwrite=true, or choose another out_dir")
    d = setup_distributed(cfg)
    try:
        return _train(cfg, d)
    finally:
        if dist.is_initialized() and "RANK" in os.environ:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist) -> dict:
    tokens_per_micro = cfg.micro_batch * cfg.seq_len * d.world_size
    if cfg.total_batch_tokens % tokens_per_micro:
        raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by micro_batch * seq_len "
                          f"* world_size = {cfg.micro_batch}*{cfg.seq_len}*{d.world_size} = {tokens_per_micro}")
    grad_accum = cfg.total_batch_tokens // tokens_per_micro
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / cfg.total_batch_tokens)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    log = functools.partial(print, flush=True) if d.master else (lambda *a, **k: None)

    torch.manual_seed(cfg.seed + d.rank)
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts (Ampere and newer)

    # --- model (+ checkpoint) --------------------------------------------------------------------------
    ckpt = None
    faults = _test_faults()
    if d.enabled and cfg.init_from in ("auto", "resume"):  # every rank must see the same checkpoint
        seen = torch.tensor([float(ckpt_path.is_file())], device=d.device)
        dist.all_reduce(seen)
        if 0 < seen.item() < d.world_size:
            raise ConfigError(f"{ckpt_path} exists on {int(seen.item())} of {d.world_size} ranks; with several "
                              "nodes out_dir must be on a filesystem they all share")
    if cfg.init_from == "auto":
        cfg = dataclasses.replace(cfg, init_from="resume" if ckpt_path.is_file() else "scratch")
    if cfg.init_from == "resume":
        if not ckpt_path.is_file():
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist; train from scratch first "
                              "or point out_dir at the run to continue")
        ckpt = load_checkpoint(ckpt_path)
        mc = GPTConfig.from_dict(ckpt["model_config"])
        saved, wanted = mc.to_dict(), model_config(cfg).to_dict()
        diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if diff:
            raise ConfigError(f"init_from=resume: the config's model differs from {ckpt_path}'s "
                              f"(field: (checkpoint, config)) {diff}; use the checkpoint's model settings")
        model = GPT(mc)
        model.load_state_dict(ckpt["model"])
    elif cfg.init_from == "scratch":
        model = GPT(model_config(cfg))
    else:  # fine-tune from a Hugging Face GPT-2 (dropout etc. from model_overrides still apply)
        hf = load_hf_gpt2(cfg.init_from)
        extra = {k: v for k, v in cfg.model_overrides.items() if k in ("dropout",)}
        model = GPT(GPTConfig(**{**hf.config.to_dict(), **extra}))
        model.load_state_dict(hf.state_dict())
    raw_model = model.to(d.device)
    data_vocab = int(load_meta(cfg.data_dir).get("vocab_size", 50257))
    if raw_model.config.vocab_size < data_vocab:
        raise ConfigError(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the dataset's "
                          f"({data_vocab}, {cfg.data_dir}/meta.json); set model_overrides vocab_size >= {data_vocab}")
    if cfg.seq_len > raw_model.config.block_size:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's block_size={raw_model.config.block_size}")
    flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation skips DDP: ranks run different numbers of eval batches
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    # --- optimizer ---------------------------------------------------------------------------------------
    adam_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if d.device.type == "cuda":
        adam_kw["fused"] = True
    groups = param_groups(raw_model, cfg.weight_decay)
    if d.enabled and cfg.zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam_kw)
    else:
        optimizer = torch.optim.AdamW(groups, **adam_kw)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.dtype]
    autocast = (torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else nullcontext())

    loader = TokenLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, d.rank, d.world_size, seed=cfg.seed)
    step, tokens_seen, best_val, wandb_id = 0, 0, float("inf"), None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])  # the full (consolidated) state, on every rank
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        best_val, wandb_id = ckpt.get("best_val_loss", best_val), ckpt.get("wandb_run_id")
        rngs = ckpt["rng"]
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank], d.device)
        else:
            warnings.warn(f"checkpoint has RNG states for {len(rngs)} ranks, this run has {d.world_size}: "
                          "reseeding (dropout masks will differ from an uninterrupted run)", stacklevel=1)
            torch.manual_seed(cfg.seed + d.rank + 1_000_003 * step)
        log(f"resumed from {ckpt_path} at step {step} ({tokens_seen:,} tokens)")
        del ckpt

    # --- logging -----------------------------------------------------------------------------------------
    metrics_path = out_dir / "metrics.jsonl"
    if d.master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir {out_dir}: {e.strerror}; choose another out_dir") from e
        if step < max_steps:  # (resuming a finished run has nothing to redo: its final val record stays)
            _truncate_metrics(metrics_path, step)  # drop records a killed run wrote after its last checkpoint
    wandb_run = None
    if cfg.wandb_log and d.master:
        import wandb

        wandb_id = wandb_id or secrets.token_hex(4)  # kept in the checkpoint: a resume continues this run
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=wandb_id,
                               resume="allow", config=asdict(cfg), dir=str(out_dir))

    def record(rec: dict) -> None:
        if not d.master:
            return
        try:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # disk full, out_dir removed or read-only
            raise ConfigError(f"cannot write {metrics_path}: {e.strerror}; free disk space or choose another "
                              f"out_dir, then continue with --init_from=resume") from e
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=rec["step"])

    def save(step: int) -> None:
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        rngs = [rng_state(d.device)]
        if d.enabled:
            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state(d.device))
        if d.master:
            save_checkpoint({
                "model": raw_model.state_dict(),
                "model_config": raw_model.config.to_dict(),
                "train_config": asdict(cfg),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step,
                "tokens_seen": tokens_seen,
                "loader": loader.state_dict(),
                "rng": rngs,
                "wandb_run_id": wandb_id,
                "best_val_loss": best_val,
            }, ckpt_path)
            log(f"saved checkpoint {ckpt_path} at step {step}")
        if d.enabled:
            dist.barrier()

    def evaluate(step: int) -> float:
        nonlocal best_val
        val = estimate_val_loss(eval_model, cfg, d, autocast)
        best_val = min(best_val, val)
        rec = {"step": step, "tokens": tokens_seen, "val_loss": val}
        if cfg.hellaswag_interval and step % cfg.hellaswag_interval == 0:
            from eval_hellaswag import evaluate_hellaswag  # lazy: only runs that ask for it need it

            hs = evaluate_hellaswag(raw_model, data_path=cfg.hellaswag_path or None,
                                    limit=cfg.hellaswag_limit or None, device=d.device,
                                    rank=d.rank, world_size=d.world_size)
            rec["hellaswag_acc_norm"] = hs["acc_norm"]
            rec["hellaswag_acc"] = hs.get("acc")
        log(f"step {step}: val loss {val:.4f}"
            + (f" | hellaswag acc_norm {rec['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in rec else ""))
        record(rec)
        return val

    log(f"model {raw_model.num_params():,} params | {d.world_size} process(es) on {d.device} | micro_batch "
        f"{cfg.micro_batch} x seq {cfg.seq_len} x grad_accum {grad_accum} x world {d.world_size} = "
        f"{cfg.total_batch_tokens:,} tokens/step | {max_steps} steps | dtype {cfg.dtype}"
        f"{' | ZeRO-1' if d.enabled and cfg.zero1 else ''}")

    # --- loop --------------------------------------------------------------------------------------------
    stop = StopFlag()
    peak = peak_flops(cfg, d.device)
    losses: list[float] = []
    val_loss = None
    bad_steps = 0
    stopped = False
    try:
        model.train()
        while step < max_steps:
            if faults:
                _inject_faults(faults, step, d.rank)
            if cfg.eval_interval and step % cfg.eval_interval == 0:
                val_loss = evaluate(step)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            aux_sum = torch.zeros((), device=d.device)  # MoE load-balancing loss (already inside loss)
            for micro in range(grad_accum):
                x, y = (t.to(d.device, non_blocking=True) for t in loader.next_batch())
                sync = micro == grad_accum - 1 or not d.enabled
                with (nullcontext() if sync else model.no_sync()), autocast:
                    _, loss, aux = model(x, y, return_aux=True)
                    loss = loss / grad_accum
                if faults and (step in faults.get("nan_steps", ()) or 0 <= faults.get("nan_from", -1) <= step):
                    loss = loss * float("nan")
                loss_sum += loss.detach()
                if aux is not None:
                    aux_sum += aux.detach() / grad_accum
                scaler.scale(loss).backward()
            # one all-reduce carries the mean loss and whether any rank was asked to stop
            packed = torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=d.device)])
            if d.enabled:
                dist.all_reduce(packed)
                packed[0] /= d.world_size
            step_loss, stop_now = packed[0].item(), packed[1].item() > 0
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = grad_norm.item()
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if scaler.is_enabled():
                scaler.step(optimizer)  # skips the update itself when grads overflowed
                scaler.update()
            elif finite:
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
                log(f"warning: step {step}: non-finite loss {step_loss} / grad norm {grad_norm}: update skipped "
                    f"({bad_steps} in a row)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.total_batch_tokens
            losses.append(step_loss)

            if (step - 1) % cfg.log_interval == 0 or step == max_steps:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                dt = time.perf_counter() - t0  # this step alone (evaluation time excluded)
                tok_s = cfg.total_batch_tokens / dt
                mfu = flops_per_token * tok_s / d.world_size / peak if peak else None
                mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
                rec = {"step": step - 1, "tokens": tokens_seen, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                       "tok_per_s": tok_s, "mfu": mfu, "step_ms": dt * 1000, "peak_mem_gib": mem}
                if aux is not None:
                    rec["moe_aux_loss"] = aux_sum.item()  # this rank's; `loss` includes coef * this
                record(rec)
                log(f"step {step - 1}/{max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                    f"{tok_s:,.0f} tok/s | {dt * 1000:.0f} ms" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                    + (f" | mem {mem:.1f} GiB" if mem is not None else ""))

            if bad_steps and bad_steps >= cfg.max_bad_steps:
                save(step)  # skipped updates left weights and optimizer at the last good step's values
                raise TrainingDiverged(f"stopping: {bad_steps} consecutive steps with a non-finite loss or gradient "
                                       f"at step {step - 1}; the weights from before step {step - bad_steps} "
                                       f"(the last good update) are saved in {ckpt_path}; lower lr, raise "
                                       "warmup_steps or use bf16/fp32 and continue with --init_from=resume")
            if stop_now:
                save(step)
                log(f"stopped at step {step} by {stop.name or 'a signal on another rank'}; continue with "
                    "--init_from=resume")
                stopped = True
                break
            if step == max_steps and cfg.eval_interval:
                val_loss = evaluate(step)
            if step == max_steps or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0):
                save(step)
    finally:
        stop.close()
        if wandb_run is not None:
            wandb_run.finish()
    return {"losses": losses, "step": step, "val_loss": val_loss, "stopped": stopped,
            "grad_accum": grad_accum, "max_steps": max_steps}


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print("TrainConfig fields (--key=value):")
        for f in fields(TrainConfig):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  --{f.name}={default!r}  ({f.type})")
        return
    cfg = load_config(sys.argv[1:])
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
