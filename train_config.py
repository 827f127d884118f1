"""Training configuration: the TrainConfig dataclass, the config files of config/ and --key=value overrides.

A config file is plain Python assignments (`lr = 6e-4`) applied in order, then `--key=value` overrides;
`--model_overrides.n_layer=4` sets one entry of the model_overrides dict. Every value is checked against the
field's declared type by one checker (`check_value`): an unknown name or a value of the wrong type is an error
that names the key. A TrainConfig validates itself when it is built, so every way of making one is checked.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from errors import UserError
from model import GPTConfig


class ConfigError(UserError):
    pass


@dataclass
class TrainConfig:
    # data / output
    data_dir: str = "data/openwebtext"  # prepared by prepare_data.py (meta.json + uint16 shards)
    out_dir: str = "out/gpt2"
    # "scratch" | "resume" (out_dir/ckpt.pt) | "auto" (resume if out_dir/ckpt.pt exists, else scratch: for
    # schedulers and torchrun --max_restarts) | a Hugging Face GPT-2 folder/hub name
    init_from: str = "scratch"
    overwrite: bool = False  # init_from=scratch / <HF folder>: delete out_dir's checkpoints and metrics first
    # a checkpoint saved when training diverged is not resumed unless this names its divergence step (the step
    # the error line names): continue on purpose from its last good weights, past the bad steps' data
    resume_diverged_at: int = -1
    # model: a preset of model.PRESETS plus any GPTConfig fields, e.g. {"n_layer": 4, "pos": "rope"}
    model: str = "gpt2"
    model_overrides: dict = field(default_factory=dict)
    # batch: total_batch_tokens = micro_batch * seq_len * grad_accum * world_size (grad_accum is derived);
    # micro_batch="auto": the largest that fits a training step in GPU memory (autobatch.py; CPU: 16 or below)
    micro_batch: int | Literal["auto"] = 16
    seq_len: int = 1024
    total_batch_tokens: int = 524_288  # 2**19, GPT-3 small's 0.5M tokens
    # training rows (seed_rows.py, docs/seed_pipeline.md): packed = seq_len-token rows cut from the token stream;
    # seed512 = the seed project's rows: each document cut into 512-token windows, padded per micro-batch (needs
    # seq_len=512; tokens counts 512 per row); packed_filtered = packed rows of only the tokens seed512 keeps.
    # Validation always reads packed val rows, so val_loss compares across row formats.
    rows: str = "packed"
    seed_min_tokens: int = 256  # seed512 / packed_filtered: drop windows of fewer real tokens (0 = keep all)
    seed_loss_on_padding: bool = False  # seed512: the loss also trains on the EOS padding (else it is ignored)
    # exactly one of max_steps / max_tokens must be > 0 (max_steps = ceil(max_tokens / total_batch_tokens));
    # max_steps=0 with max_tokens=0 writes the step-0 checkpoint and stops
    max_steps: int = -1
    max_tokens: int = 0
    # optimizer: AdamW; lr warms up linearly for warmup_steps, then cosine-decays to min_lr at max_steps, or with
    # warmdown_frac > 0 stays at lr and falls linearly to min_lr over the last warmdown_frac of the steps
    # (warmup-stable-decay, as nanochat's warmdown_ratio and modded-nanogpt's cooldown_frac)
    lr: float = 6e-4
    min_lr: float = 0.0
    warmup_steps: int = 700
    warmdown_frac: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D params only (matmul weights and embeddings); never biases/norm gains
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    # optimizer="muon": torch.optim.Muon for the 2-D weights inside the blocks, AdamW (beta1, beta2, eps and
    # weight_decay above) for the embeddings, the head and the 1-D tensors (optim.muon_param_groups). Every
    # group's lr is its base lr * lr_at(step) / lr, so lr and min_lr set only the schedule's shape. Defaults:
    # nanochat's (karpathy/nanochat gpt.py setup_optimizers, tuned at n_embd=768: Muon lr 0.02, momentum 0.95,
    # Nesterov, no decay; AdamW embeddings 0.2, head 0.004) and modded-nanogpt's lr for 1-D tensors (0.04, its
    # 2025-01-16 record; nanochat's model has none).
    optimizer: str = "adamw"  # adamw | muon
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_weight_decay: float = 0.0
    muon_adjust_lr: str = "original"  # torch's adjust_lr_fn: original (lr * sqrt(max(1, rows/cols))) | match_rms_adamw
    embed_lr: float = 0.2  # optimizer=muon only: AdamW lr of wte/wpe (a tied wte/lm_head takes head_lr)
    head_lr: float = 0.004  # optimizer=muon only: AdamW lr of the untied lm_head
    scalar_lr: float = 0.04  # optimizer=muon only: AdamW lr of norm gains and biases
    # numerics / speed
    dtype: str = "bf16"  # autocast dtype: bf16 | fp16 (with a GradScaler) | fp32 (no autocast)
    device: str = "auto"  # auto = cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    compile: bool = False  # torch.compile the model (minutes of compile on first steps; faster after)
    zero1: bool = True  # shard optimizer state across ranks (ZeroRedundancyOptimizer) under torchrun, one process too
    backend: str = "auto"  # torch.distributed backend: auto = nccl on CUDA, gloo on CPU
    dist_timeout_s: float = 600.0  # a collective waiting longer (a rank crashed or hangs) fails the job, no hang
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look the GPU up (unknown/CPU: no MFU)
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (fp32/bf16; fp16's scaler skips)
    # evaluation / logging / checkpoints (all intervals in optimizer steps; 0 = never)
    eval_interval: int = 250  # val loss over the first eval_tokens of the val split, shared among ranks
    eval_tokens: int = 327_680  # rounded down to whole seq_len rows; the same tokens for any micro_batch/world
    hellaswag_interval: int = 0  # eval_hellaswag.evaluate_hellaswag every N steps and at the end (0 = off)
    hellaswag_path: str = ""  # local hellaswag jsonl ("" = eval_hellaswag's default)
    hellaswag_limit: int = 0  # examples per evaluation (0 = all)
    log_interval: int = 10  # also how often the host reads the device: loss, finite check, stop request
    ckpt_interval: int = 1000  # a checkpoint is also written at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 3  # ckpt_<step>.pt kept beside ckpt.pt (the newest is a link: no extra disk); 0 = none
    keep_best: bool = False  # also keep ckpt_best.pt: the checkpoint with the lowest val loss
    seed: int = 1337
    # wandb (opt-in; WANDB_MODE=offline works without network; a resumed run continues the same wandb run)
    wandb_log: bool = False
    wandb_project: str = "gpt2"
    wandb_run_name: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name), f.type, "config")
        self.lr, self.min_lr = float(self.lr), float(self.min_lr)
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype={self.dtype!r}: choose bf16, fp16 or fp32")
        by_steps = self.max_steps >= 0 and self.max_tokens == 0  # max_steps=0: the step-0 checkpoint only
        by_tokens = self.max_steps <= 0 and self.max_tokens > 0
        if not (by_steps or by_tokens):
            raise ConfigError("set exactly one of max_steps / max_tokens to a positive number")
        for k in ("micro_batch", "seq_len", "total_batch_tokens", "log_interval"):
            if getattr(self, k) != "auto" and getattr(self, k) <= 0:  # (only micro_batch may be "auto")
                raise ConfigError(f"{k}={getattr(self, k)} must be positive")
        if self.resume_diverged_at < -1:
            raise ConfigError(f"resume_diverged_at={self.resume_diverged_at} must be a step >= 0 (or -1: none)")
        for k in ("warmup_steps", "eval_interval", "hellaswag_interval", "ckpt_interval", "max_bad_steps",
                  "keep_checkpoints"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k}={getattr(self, k)} must be >= 0")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"warmdown_frac={self.warmdown_frac} must be in [0, 1] (0: cosine decay)")
        if self.eval_interval and self.eval_tokens < self.seq_len:
            raise ConfigError(f"eval_tokens={self.eval_tokens} is less than one row of seq_len={self.seq_len}")
        if self.keep_best and not self.keep_checkpoints:
            raise ConfigError("keep_best=True needs keep_checkpoints >= 1 (ckpt_best.pt links a step checkpoint)")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s={self.dist_timeout_s} must be positive")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is above lr={self.lr}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer={self.optimizer!r}: choose adamw or muon")
        if self.rows not in ("packed", "seed512", "packed_filtered"):
            raise ConfigError(f"rows={self.rows!r}: choose packed, seed512 or packed_filtered")
        if self.rows == "seed512" and self.seq_len != 512:
            raise ConfigError(f"rows=seed512 cuts the seed's 512-token windows: set seq_len=512, not {self.seq_len}")
        if not 0 <= self.seed_min_tokens <= 512:
            raise ConfigError(f"seed_min_tokens={self.seed_min_tokens} must be in [0, 512] (the seed's window)")
        if self.seed_loss_on_padding and self.rows != "seed512":
            raise ConfigError("seed_loss_on_padding=True needs rows=seed512 (only seed rows are padded)")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            raise ConfigError(f"muon_adjust_lr={self.muon_adjust_lr!r}: choose original or match_rms_adamw")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.optimizer == "muon" and self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: with optimizer=muon lr must be positive (it scales every group's lr)")
        self.model_config()  # checks the preset, the overrides and seq_len against block_size

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (0: only the step-0 checkpoint)."""
        if self.max_tokens:
            return -(-self.max_tokens // self.total_batch_tokens)
        return self.max_steps

    def model_config(self) -> GPTConfig:
        """The GPTConfig this config asks for: the preset plus model_overrides, each checked against
        GPTConfig's fields and their types."""
        for key, value in self.model_overrides.items():
            if key not in MODEL_FIELD_TYPES:
                raise ConfigError(f"model_overrides: unknown GPTConfig field {key!r}"
                                  f"{close_matches(key, list(MODEL_FIELD_TYPES))}")
            check_value(key, value, MODEL_FIELD_TYPES[key], "model_overrides")
        mc = GPTConfig.from_preset(self.model, **self.model_overrides)
        if self.seq_len > mc.block_size:
            raise ConfigError(f"seq_len={self.seq_len} exceeds the model's block_size={mc.block_size}; "
                              "lower seq_len or set model_overrides block_size")
        return mc


def close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"


_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "None": lambda v: v is None,
}


def _fits(value: object, option: str) -> bool:
    if option.startswith("Literal["):  # Literal["auto"]: one of the listed values
        return any(type(value) is type(v) and value == v for v in ast.literal_eval(f"({option[8:-1]},)"))
    return _TYPE_CHECKS[option](value)


def _describe(type_name: str) -> str:
    """An annotation as messages show it: int | Literal["auto"] -> int | "auto"."""
    return str(type_name).replace("Literal[", "").replace("]", "")


def check_value(key: str, value: object, type_name: str, where: str) -> None:
    """Raise ConfigError unless value fits the annotation type_name ("int", "float", "int | None",
    'int | Literal["auto"]', ...)."""
    options = [t.strip() for t in str(type_name).split("|")]
    if not any(_fits(value, t) for t in options):
        raise ConfigError(f"{where}: {key} must be {_describe(type_name)}, got {type(value).__name__} {value!r}")


def parse_value(key: str, text: str, type_name: str) -> object:
    """A command-line string as a value of the annotation type_name."""
    options = [t.strip() for t in str(type_name).split("|")]
    if "bool" in options:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text}: expected true/false")
    if any(t.startswith("Literal[") and _fits(text, t) for t in options):
        return text  # a bare word of a Literal, such as --micro_batch=auto
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "str" not in options:
            raise ConfigError(f"--{key}={text}: not a valid {_describe(type_name)}") from None
        value = text  # a bare word such as rope
    if "str" in options and not isinstance(value, str):
        value = text  # --out_dir=123 is the string "123"
    check_value(key, value, type_name, "command line")
    return value


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}  # annotations are strings: "int", "float", ...
MODEL_FIELD_TYPES = {f.name: f.type for f in fields(GPTConfig)}


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from optional config files (plain assignments, applied in order) and --key=value overrides."""
    values: dict[str, Any] = {}
    names = list(FIELD_TYPES)
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in _read_config_file(Path(arg)).items():
                if key not in FIELD_TYPES:
                    raise ConfigError(f"config file {arg}: unknown key {key!r}{close_matches(key, names)}")
                check_value(key, value, FIELD_TYPES[key], f"config file {arg}")
                values[key] = value
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: overrides are written --key=value")
        key, text = arg[2:].split("=", 1)
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            if sub not in MODEL_FIELD_TYPES:
                raise ConfigError(f"--{key}: unknown GPTConfig field {sub!r}"
                                  f"{close_matches(sub, list(MODEL_FIELD_TYPES))}")
            values["model_overrides"] = {**values.get("model_overrides", {}),
                                         sub: parse_value(key, text, MODEL_FIELD_TYPES[sub])}
            continue
        if key not in FIELD_TYPES:
            raise ConfigError(f"--{key}: unknown key{close_matches(key, names)}")
        values[key] = parse_value(key, text, FIELD_TYPES[key])
    return TrainConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    scope: dict[str, Any] = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), scope)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from e
    # __builtins__ and imported modules are not settings
    return {k: v for k, v in scope.items() if not k.startswith("_") and not isinstance(v, type(sys))}


def defaults() -> dict[str, Any]:
    """Every TrainConfig field's default (TrainConfig() itself is not valid: it sets no run length)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(TrainConfig)}


def describe_fields() -> str:
    """Every TrainConfig field with its default and type, for --help."""
    return "\n".join(f"  --{k}={v!r}  ({_describe(FIELD_TYPES[k])})" for k, v in defaults().items())
