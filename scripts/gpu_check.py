"""The GPU check: every performance and health figure of the codebase in one run of under 8 minutes.

    python scripts/gpu_check.py --out out/gpu_check          # on one GPU, from the repository root
    python scripts/gpu_check.py --rehearse --out out/rehearsal # the same steps on CPU, tiny model: ~2 min
    python scripts/gpu_check.py --list                        # the steps and their time estimates

Steps, most valuable first; each runs only if its estimate fits in what is left of --budget-s, else it is
recorded as skipped. A failing step records status "error" with the last lines of its log and the check goes
on. Every subprocess runs in its own process group under a timeout (the whole group is stopped, Inductor's
compile workers included), with $PYTHON (default python3), offline.

    env               GPU, driver, torch/CUDA/cuDNN/Triton versions; bf16 matmul ceiling (common.py, CUDA events)
    bench_eager       bench.py: the --config's model, micro_batch, seq_len and dtype (GPT-2 124M, T=1024, bf16), eager
    bench_compiled    the same, torch.compile: tokens/s, MFU vs datasheet and vs the ceiling, memory, compile s
    cuda_tests        pytest -m cuda over the test files that use the marker
    train             train.py compiled on Tiny Shakespeare tokens, 40 steps: loss falls, no NaN, tok/s vs bench
    modern            the same with config/gpt2_modern_fineweb_edu.py: Muon's orthogonalization in bf16, compiled
    fp16              the same run eager with fp16 + GradScaler: finite, close to bf16's losses
    resume            torchrun + ZeRO-1 + fused AdamW, bf16, 20 steps vs the same run crashed at step 10 (the tests'
                      fault launcher) and restarted (--max_restarts=1, init_from=auto): losses, weights bit-equal
    profile           torch.profiler over a compiled bench.py run: top kernels, attention kernel, time by kind
    flex_recompiles   flex attention, doc_mask, qk_norm, RoPE, bf16, compiled, 20 steps: recompiles after warm-up
    autobatch         micro_batch=auto on config/gpt2_owt.py (eager): the largest micro-batch that fits, probes
    bench_batch2x     compiled at twice the micro-batch
    bench_cudagraphs  compiled with mode reduce-overhead (CUDA graphs)
    bench_vs_plain    eager fast step alternated with the plain nanoGPT-style step (bench.py --vs-plain)
    pytest            the test suite but the cuda tests, GPU visible, in the rest of the budget (then interrupted)

Results folder (--out): results.jsonl (one JSON line per step, appended the moment the step ends),
summary.txt (rewritten after every step), profile.txt (the top-kernel table). Logs, bench JSON, training
out_dirs, the Inductor cache and the prepared data stay in --work-dir (default: a new folder under /tmp).

Training data: --data-dir (a prepared dataset), else prepare_data.py
--dataset shakespeare into the work dir (from the repository's data/gpt2_bpe and data/tinyshakespeare.txt, or
--shakespeare-path).

To add a step: write `def step_x(c: Check) -> dict` (return the figures; `na("why")` for a missing one) and
append Step("x", step_x, gpu_s, rehearse_s, {field: type}) to STEPS.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_FILES = ("results.jsonl", "summary.txt", "profile.txt")
REHEARSAL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64}  # GPT-2's vocab and positions, 3.4M params
NO_COMPILE = "rehearsal runs this step eager (compiling even a 2-layer model on CPU takes ~40 s)"
TRAIN_WARMUP = 5  # train steps left out of the tok/s median (compilation, allocator warm-up)


class StepError(Exception):
    """A step that ran but failed: its log, and the figures it did get (recorded with the error)."""

    def __init__(self, message: str, log: Path | None = None, result: dict | None = None) -> None:
        super().__init__(message)
        self.log = log
        self.result = result


class Interrupted(BaseException):
    pass


@dataclass
class Null:
    """A figure this run cannot give, and why: written as null, the reason under the record's "nulls"."""
    reason: str


na = Null


@dataclass
class Step:
    name: str
    fn: Callable[[Check], dict]
    gpu_s: float  # estimated seconds on one H100/H200 (an estimate, used only to decide what fits)
    rehearse_s: float  # estimated seconds of the CPU rehearsal
    fields: dict[str, type] = field(default_factory=dict)  # figures every "ok" record has (value or null)


@dataclass
class Check:
    args: argparse.Namespace
    work: Path
    out: Path
    t0: float = field(default_factory=time.monotonic)
    records: dict[str, dict] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)
    dataset: Path | None = None

    @property
    def rehearse(self) -> bool:
        return self.args.rehearse

    @property
    def py(self) -> str:
        return os.environ.get("PYTHON", "python3")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def result(self, step: str) -> dict | None:
        """An earlier step's figures, if it ran and succeeded."""
        rec = self.records.get(step)
        return rec["result"] if rec and rec["status"] == "ok" else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        # one Inductor cache for all steps: the first compile is cold (its compile_s is honest), later
        # compiles of the same graphs reuse it
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.work / "inductor_cache"))
        if self.rehearse:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine
            env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model runs faster on one thread of a busy CPU
        return env

    def run(self, name: str, argv: list[str], cap_s: float, env: dict[str, str] | None = None) -> Path:
        """Run argv in its own process group, output to work/<name>.log; StepError on failure or timeout."""
        rc, log, timeout = self.spawn(name, argv, cap_s, env)
        if rc is None:
            raise StepError(f"timed out after {timeout:.0f} s", log)
        if rc != 0:
            raise StepError(f"exit code {rc}: {shlex.join(argv[:3])} ...", log)
        return log

    def spawn(self, name: str, argv: list[str], cap_s: float, env: dict[str, str] | None = None,
              interrupt_s: float = 0.0) -> tuple[int | None, Path, float]:
        """(exit code or None if it timed out, log, timeout). interrupt_s > 0: at the timeout, SIGINT first and
        up to interrupt_s seconds to finish (pytest then still writes its report), then the usual stop."""
        log = self.work / f"{name}.log"
        self.logs.append(log)
        timeout = max(1.0, min(cap_s, self.left() - interrupt_s))
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(argv)}\n")
            f.flush()
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**self.env(), **(env or {})}, start_new_session=True)
            rc: int | None = None
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if interrupt_s > 0:
                    try:
                        os.killpg(self.proc.pid, signal.SIGINT)
                        self.proc.wait(interrupt_s)
                    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                        pass
            finally:
                self.stop_child()
        return rc, log, timeout

    def stop_child(self) -> None:
        """SIGTERM to the child's whole process group (compile workers included), SIGKILL after 8 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader is gone; stragglers of its group get no second chance
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                break

    def child(self, name: str, fn: str, *args: str, cap_s: float) -> dict:
        """Run one of this file's child_* functions under $PYTHON; it writes its figures as JSON."""
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)
        self.run(name, [self.py, str(Path(__file__).resolve()), "_child", fn, str(out), *args], cap_s)
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------
# Model shape: the config's (GPU) or a tiny one (rehearsal)


def read_config(path: Path) -> dict:
    """The literal assignments of a train.py config file (no code is run)."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def shape(c: Check, batch_mult: int = 1) -> tuple[list[str], int, int, str]:
    """(bench.py model flags, micro_batch, seq_len, dtype)."""
    cfg = read_config(REPO / c.args.config)
    overrides = {**cfg.get("model_overrides", {}), **(REHEARSAL_MODEL if c.rehearse else {})}
    flags = ["--model", cfg.get("model", "gpt2")]
    for k, v in overrides.items():
        flags += ["--set", f"{k}={v!r}"]
    B, T = (2, 64) if c.rehearse else (cfg.get("micro_batch", 16), cfg.get("seq_len", 1024))
    return flags, B * batch_mult, T, cfg.get("dtype", "bf16")


# ---------------------------------------------------------------------------------------------------------
# Steps


def step_env(c: Check) -> dict:
    r = c.child("env", "child_env", cap_s=60)
    on = r["device_name"] != "cpu"
    r["summary"] = (f"{r['device_name']}" + (f", driver {r['driver']}" if r.get("driver") else "")
                    + f" | torch {r['torch']}" + (f", CUDA {r['cuda']}" if r.get("cuda") else "")
                    + f" | {r['ceiling_dtype']} matmul ceiling {r['ceiling_tflops']:.1f} TFLOP/s "
                    f"({r['ceiling_n']}^3, {r['ceiling_iters']} timed)")
    for k, why in (("cuda", "torch without CUDA"), ("cudnn", "no cuDNN"), ("triton", "triton not installed")):
        if r.get(k) is None:
            r[k] = na(why)
    for k in ("driver", "gpu_memory_gib", "capability"):
        if r.get(k) is None:
            r[k] = na("no GPU" if not on else "nvidia-smi unavailable")
    return r


BENCH_FIELDS = {
    "command": str, "device_name": str, "batch_size": int, "seq_len": int, "dtype": str, "compile": bool,
    "compile_mode": str, "tokens_per_s": float, "step_ms_median": float, "step_ms_min": float,
    "step_ms_max": float, "achieved_tflops": float, "peak_tflops": float, "mfu": float, "ceiling_tflops": float,
    "mfu_vs_ceiling": float, "peak_memory_gib": float, "memory_kind": str, "compile_s": float,
    "first_step_s": float, "loss_first": float, "loss_last": float,
}


def bench(c: Check, name: str, compiled: bool, *extra: str, batch_mult: int = 1, steps: int | None = None,
          warmup: int | None = None, cap_s: float = 300) -> dict:
    """One bench.py run with the check's model shape; its JSON's figures, nulls explained."""
    flags, B, T, dtype = shape(c, batch_mult)
    steps = steps or (2 if c.rehearse else 20)
    warmup = warmup if warmup is not None else (1 if c.rehearse else 3)
    out = c.work / f"{name}.json"
    argv = [c.py, "bench.py", *flags, "--batch-size", str(B), "--seq-len", str(T), "--dtype", dtype,
            "--steps", str(steps), "--warmup", str(warmup), "--json", str(out), *extra]
    if c.rehearse:
        argv += ["--device", "cpu"]
    env = c.result("env")
    if env:  # the ceiling measured once by the env step, not per run
        argv += ["--ceiling-tflops", str(env["ceiling_tflops"])]
    else:
        argv += ["--measure-ceiling"]
    if compiled and not c.rehearse:
        argv += ["--compile"]
    c.run(name, argv, cap_s)
    j = json.loads(out.read_text())
    r = {k: j.get(k) for k in BENCH_FIELDS if k in j}
    r["command"] = shlex.join(["python", *argv[1:]])
    r["peak_memory_gib"] = j["peak_memory_bytes"] / 2**30
    compile_why = NO_COMPILE if compiled and c.rehearse else "eager: nothing compiled"
    for k in ("compile_s", "compile_mode"):
        if r.get(k) is None:
            r[k] = na(compile_why)
    for k in ("peak_tflops", "mfu"):
        if r.get(k) is None:
            r[k] = na(f"no datasheet bf16 peak for {j['device_name']}")
    for k in ("ceiling_tflops", "mfu_vs_ceiling"):
        if r.get(k) is None:
            r[k] = na("no matmul ceiling")
    if j.get("vs_plain"):
        r["vs_plain"] = j["vs_plain"]
    r["summary"] = bench_line(r)
    return r


def fmt(v: object, spec: str, none: str = "n/a") -> str:
    return none if v is None or isinstance(v, Null) else format(v, spec)


def bench_line(r: dict) -> str:
    mode = "eager"
    if r["compile"]:
        mode = "compiled" + ("" if isinstance(r["compile_mode"], Null) or r["compile_mode"] == "default"
                             else f" {r['compile_mode']}")
    return (f"B={r['batch_size']} T={r['seq_len']} {r['dtype']} {mode}: {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['step_ms_median']:.1f} ms/step, MFU {fmt(r['mfu'], '.1%')} of datasheet "
            f"{fmt(r['peak_tflops'], '.0f')} TFLOP/s, {fmt(r['mfu_vs_ceiling'], '.1%')} of measured ceiling, "
            f"peak mem {r['peak_memory_gib']:.1f} GiB ({r['memory_kind']}), compile {fmt(r['compile_s'], '.0f')} s")


def step_bench_eager(c: Check) -> dict:
    return bench(c, "bench_eager", compiled=False, cap_s=120)


def step_bench_compiled(c: Check) -> dict:
    r = bench(c, "bench_compiled", compiled=True, cap_s=300)
    eager = c.result("bench_eager")
    r["speedup_vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"] if eager else na("bench_eager did not run")
    r["summary"] += f" | {fmt(r['speedup_vs_eager'], '.2f')}x eager"
    return r


def junit_counts(xml: Path) -> dict:
    """Test counts of a pytest --junitxml report: ran, passed, failed, errors, skipped, failing test ids with their
    first message line, distinct skip reasons. (A test cut off by an interrupt has a nameless entry: not counted.)"""
    r = {"ran": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.get("name") is None:
            continue
        r["ran"] += 1
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            r["failed" if "failure" in kinds else "errors"] += 1
            message = (kinds.get("failure", kinds.get("error")).get("message") or "").strip()
            r["failures"].append(f"{test_id}: {message.splitlines()[0][:200] if message else ''}")
        elif "skipped" in kinds:
            r["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()
            if reason not in r["skip_reasons"]:
                r["skip_reasons"].append(reason)
        else:
            r["passed"] += 1
    return r


# One process, in the order of the files: pyproject.toml's addopts (-n auto) need pytest-xdist, which a GPU machine
# may lack, and the CUDA tests share one GPU.
SERIAL = ["-o", "addopts=--strict-markers", "-p", "no:cacheprovider"]


def step_cuda_tests(c: Check) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    xml = c.work / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    argv = [c.py, "-m", "pytest", *SERIAL, "-m", "cuda", "-q", "-rs", f"--junitxml={xml}", *files]
    try:
        c.run("cuda_tests", argv, cap_s=300)
    except StepError:
        if not xml.is_file():  # pytest itself failed; test failures are read from the XML below
            raise
    r = {"files": files, **junit_counts(xml)}
    r["selected"] = r.pop("ran")
    r["summary"] = (f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped of "
                    f"{r['selected']} (pytest -m cuda: {' '.join(files)})"
                    + (f"; skipped: {'; '.join(r['skip_reasons'])}" if r["skip_reasons"] else ""))
    if r["failed"] or r["errors"]:
        raise StepError("failed: " + "; ".join(r["failures"][:5]), c.work / "cuda_tests.log", r)
    if r["selected"] == 0 or (not c.rehearse and r["passed"] == 0):
        raise StepError(f"no CUDA test ran: {r['summary']}", c.work / "cuda_tests.log", r)
    return r


def dataset(c: Check) -> Path:
    """The training data: --data-dir, else Tiny Shakespeare prepared in the work dir (once; later steps reuse it),
    so that the check never depends on what an earlier quickstart left in data/."""
    if c.dataset:
        return c.dataset
    if c.args.data_dir:
        c.dataset = Path(c.args.data_dir).resolve()
    else:
        out = c.work / "data_shakespeare"
        argv = [c.py, "prepare_data.py", "--dataset", "shakespeare", "--out-dir", str(out), "--no-progress"]
        if c.args.shakespeare_path:
            argv += ["--shakespeare-path", str(Path(c.args.shakespeare_path).resolve())]
        c.run("prepare_data", argv, cap_s=120)
        c.dataset = out
    return c.dataset


def train_args(c: Check, out_dir: Path, steps: int, B: int, T: int, dtype: str, compiled: bool,
               model: dict | None = None, config: str | None = None, **settings: object) -> list[str]:
    """train.py's arguments for a short check run of `config` (default --config) on real tokens, one micro-batch
    per step, no evaluation or checkpoint unless `settings` asks; `model`: model_overrides (default: the config's
    model, the tiny one in rehearsal). Later settings win."""
    base: dict[str, object] = {
        "data_dir": dataset(c), "out_dir": out_dir, "overwrite": True, "max_tokens": 0, "max_steps": steps,
        "micro_batch": B, "seq_len": T, "total_batch_tokens": B * T, "warmup_steps": 2 if c.rehearse else 10,
        "eval_interval": 0, "ckpt_interval": 0, "hellaswag_interval": 0, "log_interval": 1, "wandb_log": False,
        "dtype": dtype, "compile": compiled and not c.rehearse}
    if c.rehearse:
        base |= {"lr": 5e-3, "device": "cpu"}
    base |= settings
    model = model if model is not None else (REHEARSAL_MODEL if c.rehearse else {})
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()]
    return [config or c.args.config, *flags,
            *(f"--model_overrides.{k}={v}" for k, v in model.items())]


def loss_rows(out_dir: Path, log: Path) -> list[dict]:
    """The per-step records (those with a loss) of a run's metrics.jsonl."""
    path = out_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    rows = [r for r in rows if "loss" in r]
    if not rows:
        raise StepError(f"no step records in {path}", log)
    return rows


def train_run(c: Check, name: str, dtype: str, compiled: bool, config: str | None = None) -> tuple[list[dict], str]:
    """A short train.py run of the check's model (or `config`'s) on real tokens, one micro-batch per step; its
    metrics."""
    _, B, T, _ = shape(c)
    out_dir = c.work / name
    argv = [c.py, "train.py", *train_args(c, out_dir, c.args.train_steps, B, T, dtype, compiled, config=config)]
    log = c.run(name, argv, cap_s=300)
    (out_dir / "ckpt.pt").unlink(missing_ok=True)  # the final checkpoint: 1.5 GB for 124M, not needed here
    return loss_rows(out_dir, log), shlex.join(["python", *argv[1:]])


def train_figures(rows: list[dict]) -> dict:
    losses = [r["loss"] for r in rows]
    after = [r for r in rows if r["step"] >= TRAIN_WARMUP] or rows
    mfus = [r["mfu"] for r in after if r.get("mfu") is not None]
    mem = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None]
    finite = all(math.isfinite(v) for v in losses)
    last5 = statistics.mean(losses[-5:])
    return {
        "steps": len(rows), "losses": losses, "loss_first": losses[0], "loss_last": losses[-1],
        "loss_last5_mean": last5, "finite": finite, "loss_fell": finite and last5 < 0.95 * losses[0],
        "first_step_s": rows[0]["step_ms"] / 1e3,
        "tok_per_s_median": statistics.median(r["tok_per_s"] for r in after),
        "mfu_median": statistics.median(mfus) if mfus else na("no datasheet peak for this device"),
        "peak_mem_gib": max(mem) if mem else na("CPU: train.py records no memory"),
        "grad_norm_nonfinite_steps": sum(not math.isfinite(r["grad_norm"]) for r in rows),
    }


def require_loss_fell(c: Check, name: str, r: dict) -> dict:
    """A train step's figures, or StepError with them and run `name`'s log when the loss did not fall."""
    if not r["loss_fell"]:
        raise StepError(f"loss did not fall by 5% or is not finite: {r['summary']}", c.work / f"{name}.log", r)
    return r


def step_train(c: Check) -> dict:
    rows, command = train_run(c, "train_bf16", "bf16", compiled=True)
    r = {"command": command, "compile": not c.rehearse, **train_figures(rows)}
    bench_r = c.result("bench_compiled")
    r["tok_per_s_vs_bench"] = (r["tok_per_s_median"] / bench_r["tokens_per_s"] if bench_r
                               else na("bench_compiled did not run"))
    r["summary"] = (f"{r['steps']} steps{'' if r['compile'] else ' (eager)'}: loss {r['loss_first']:.3f} -> "
                    f"{r['loss_last']:.3f}, finite {r['finite']}, median {r['tok_per_s_median']:,.0f} tok/s after "
                    f"step {TRAIN_WARMUP} ({fmt(r['tok_per_s_vs_bench'], '.3f')} of bench_compiled's), "
                    f"MFU {fmt(r['mfu_median'], '.1%')}, first step {r['first_step_s']:.1f} s")
    return require_loss_fell(c, "train_bf16", r)


MODERN_CONFIG = "config/gpt2_modern_fineweb_edu.py"


def step_modern(c: Check) -> dict:
    """The modern 124M config (RoPE, QK-norm, RMSNorm, ReLU², untied, no bias; Muon + AdamW, warmdown) compiled in
    bf16: Muon's Newton-Schulz orthogonalization runs in bf16 on the GPU here and nowhere else in the check."""
    rows, command = train_run(c, "train_modern", "bf16", compiled=True, config=MODERN_CONFIG)
    r = {"command": command, "config": MODERN_CONFIG, "compile": not c.rehearse, **train_figures(rows)}
    gpt2 = c.result("train")
    r["loss_last5_vs_gpt2"] = (r["loss_last5_mean"] - gpt2["loss_last5_mean"] if gpt2
                               else na("the train step did not run"))
    r["summary"] = (f"{r['steps']} steps{'' if r['compile'] else ' (eager)'}: loss {r['loss_first']:.3f} -> "
                    f"{r['loss_last']:.3f}, finite {r['finite']}, last-5 mean {r['loss_last5_mean']:.3f} "
                    f"({fmt(r['loss_last5_vs_gpt2'], '+.3f')} vs the train step's GPT-2 recipe), median "
                    f"{r['tok_per_s_median']:,.0f} tok/s, MFU {fmt(r['mfu_median'], '.1%')}, first step "
                    f"{r['first_step_s']:.1f} s")
    return require_loss_fell(c, "train_modern", r)


def step_fp16(c: Check) -> dict:
    dtype = "fp32" if c.rehearse else "fp16"  # fp16 autocast is CUDA-only
    rows, command = train_run(c, f"train_{dtype}", dtype, compiled=False)
    r = {"command": command, "dtype": dtype, **train_figures(rows)}
    r["overflow_steps"] = r.pop("grad_norm_nonfinite_steps")  # fp16: steps the GradScaler skipped
    bf16 = c.result("train")
    if bf16:
        n = min(len(bf16["losses"]), len(r["losses"]))
        r["bf16_loss_last5_mean"] = bf16["loss_last5_mean"]
        r["rel_diff_vs_bf16"] = abs(r["loss_last5_mean"] - bf16["loss_last5_mean"]) / bf16["loss_last5_mean"]
        r["max_rel_diff_per_step"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], bf16["losses"][:n]))
        r["close_to_bf16"] = r["rel_diff_vs_bf16"] < 0.05
    else:
        for k in ("bf16_loss_last5_mean", "rel_diff_vs_bf16", "max_rel_diff_per_step", "close_to_bf16"):
            r[k] = na("the bf16 train step did not run")
    r["summary"] = (f"{dtype}{' (rehearsal: fp16 autocast is CUDA-only)' if c.rehearse else ' + GradScaler'}, "
                    f"eager, {r['steps']} steps: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, finite "
                    f"{r['finite']}, {r['overflow_steps']} skipped (overflow) steps, last-5 mean "
                    f"{r['loss_last5_mean']:.3f} vs bf16 {fmt(r['bf16_loss_last5_mean'], '.3f')} "
                    f"({fmt(r['rel_diff_vs_bf16'], '.2%')})")
    if not r["finite"] or r["close_to_bf16"] is False:
        raise StepError(f"{dtype} unhealthy: {r['summary']}", c.work / f"train_{dtype}.log", r)
    return r


SMALL_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256}  # resume and flex_recompiles on a GPU: 16M params


def torchrun(c: Check, *opts: str) -> list[str]:
    return [c.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *opts]


def step_resume(c: Check) -> dict:
    """torchrun, ZeRO-1, fused AdamW, bf16: N steps uninterrupted; the same run crashed at step N/2 (the tests'
    fault launcher) and restarted by torchrun --max_restarts=1 with init_from=auto. Same kernels, same state:
    every step's loss and the final weights and AdamW state should be bit-equal."""
    n = 8 if c.rehearse else 20
    half = n // 2
    B, T = (2, 64) if c.rehearse else (8, 512)
    model = REHEARSAL_MODEL if c.rehearse else SMALL_MODEL
    dirs = {k: c.work / f"resume_{k}" for k in ("ref", "cut")}
    marker = c.work / "resume_crashed_once"
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)  # a reused --work-dir: init_from=auto must not find an old run
    marker.unlink(missing_ok=True)
    same = {"zero1": True, "ckpt_interval": half, "warmup_steps": 2 if c.rehearse else 5}
    ref_argv = [*torchrun(c), "train.py", *train_args(c, dirs["ref"], n, B, T, "bf16", False, model, **same)]
    fault = json.dumps({"crash": {"step": half, "once": str(marker)}})
    cut_argv = [*torchrun(c, "--max_restarts=1"), "tests/fault_launcher.py", fault,
                *train_args(c, dirs["cut"], n, B, T, "bf16", False, model, init_from="auto", **same)]
    ref_log = c.run("resume_ref", ref_argv, cap_s=150)
    cut_log = c.run("resume_cut", cut_argv, cap_s=200)
    ref = {row["step"]: row["loss"] for row in loss_rows(dirs["ref"], ref_log)}
    cut = {row["step"]: row["loss"] for row in loss_rows(dirs["cut"], cut_log)}
    if sorted(ref) != list(range(n)) or sorted(cut) != list(range(n)):
        raise StepError(f"expected steps 0-{n - 1} in both runs, got {sorted(ref)} and {sorted(cut)}", cut_log)
    ref_text, cut_text = ref_log.read_text(errors="replace"), cut_log.read_text(errors="replace")
    w = c.child("resume_compare", "child_compare_checkpoints", str(dirs["ref"] / "ckpt.pt"),
                str(dirs["cut"] / "ckpt.pt"), cap_s=90)
    for d in dirs.values():
        (d / "ckpt.pt").unlink(missing_ok=True)
    diffs = [abs(ref[s] - cut[s]) for s in range(n)]
    first = next((s for s in range(n) if ref[s] != cut[s]), None)
    device = re.search(r"process\(es\) on (\S+)", ref_text)
    r = {"command_ref": shlex.join(["python", *ref_argv[1:]]), "command_cut": shlex.join(["python", *cut_argv[1:]]),
         "device": device.group(1) if device else na("no header line in the log"), "steps": n,
         "resumed_at": half, "zero1": "ZeRO-1" in ref_text, "fused_adamw": w["fused"],
         "restarted": f"injected fault: crash on rank 0 at step {half}" in cut_text
                      and f"resumed from {dirs['cut'] / 'ckpt.pt'} at step {half}" in cut_text,
         "losses_ref": [ref[s] for s in range(n)], "losses_resumed": [cut[s] for s in range(n)],
         "losses_bit_equal": first is None, "bit_equal_before_resume": all(d == 0 for d in diffs[:half]),
         "first_diff_step": first if first is not None else na("every step's loss is equal"),
         "max_abs_diff": max(diffs), "max_abs_diff_before_resume": max(diffs[:half]),
         "weights_bit_equal": w["model_equal"], "optimizer_bit_equal": w["optimizer_equal"],
         "max_abs_diff_weights": w["model_max_abs_diff"]}
    r["bit_equal"] = r["losses_bit_equal"] and r["weights_bit_equal"] and r["optimizer_bit_equal"]
    r["summary"] = (f"{r['device']}, torchrun 1 process, ZeRO-1 {r['zero1']}, fused AdamW {r['fused_adamw']}, bf16, "
                    f"{n} steps; crashed at step {half} and restarted: {r['restarted']}; losses bit-equal "
                    f"{r['losses_bit_equal']} (max |diff| {r['max_abs_diff']:.3g}, before the resume "
                    f"{r['max_abs_diff_before_resume']:.3g}), weights {r['weights_bit_equal']}, AdamW state "
                    f"{r['optimizer_bit_equal']}")
    if not r["restarted"]:
        raise StepError(f"the run was not crashed at step {half} and resumed there: {r['summary']}", cut_log, r)
    if not r["bit_equal"] and (c.rehearse or r["bit_equal_before_resume"] or r["max_abs_diff"] > 1e-2):
        # bit-equal before the resume (or on CPU, where it is promised): the resume changed the run. Steps that
        # differ before any resume mean nondeterministic kernels; then only a large difference fails.
        raise StepError(f"the resumed run differs from the uninterrupted one: {r['summary']}", cut_log, r)
    return r


STEP_LINE = re.compile(r"^step (\d+)/\d+ \|")  # train.py's per-step log line (log_interval=1)


def dynamo_events(text: str, warmup: int) -> dict:
    """Recompiles and graph breaks in a train.py log written with TORCH_LOGS=recompiles,graph_breaks: in all,
    and after warm-up (after the log line of step warmup-1), with the first guard failure of each late one."""
    r = {"recompiles": 0, "recompiles_after_warmup": 0, "graph_breaks": 0, "graph_breaks_after_warmup": 0,
         "recompile_reasons": [],
         "recompile_limit_hit": bool(re.search(r"hit config\.(recompile|cache_size)_limit", text))}
    after = want_reason = False
    for line in text.splitlines():
        m = STEP_LINE.match(line)
        if m:
            after = after or int(m.group(1)) >= warmup - 1
        elif "[__recompiles] Recompiling function" in line:
            r["recompiles"] += 1
            r["recompiles_after_warmup"] += after
            want_reason = after
        elif "[__graph_breaks] Graph break" in line:
            r["graph_breaks"] += 1
            r["graph_breaks_after_warmup"] += after
        elif want_reason and "[__recompiles]     - " in line:
            r["recompile_reasons"].append(line.split("[__recompiles]", 1)[1].strip()[:200])
            want_reason = False
    return r


FLEX_WARMUP = 2  # steps whose compiles (the train graph, the eval graph of the step-0 evaluation) are expected


def step_flex_recompiles(c: Check) -> dict:
    """Document-masked flex attention with qk_norm and RoPE, bf16, compiled: recompiles after warm-up (every
    batch has other document boundaries, and the evaluations switch to eval mode and back)."""
    n = 6 if c.rehearse else 20
    B, T = (2, 64) if c.rehearse else (4, 1024)
    attention = "sdpa" if c.rehearse else "flex"  # flex_attention has no CPU backward
    model = {**(REHEARSAL_MODEL if c.rehearse else SMALL_MODEL), "attention": attention, "doc_mask": True,
             "qk_norm": True, "pos": "rope"}
    out_dir = c.work / "flex_recompiles"
    argv = [c.py, "train.py", *train_args(c, out_dir, n, B, T, "bf16", True, model, eval_interval=n // 2,
                                          eval_tokens=2 * B * T)]
    log = c.run("flex_recompiles", argv, cap_s=300, env={"TORCH_LOGS": "recompiles,graph_breaks"})
    (out_dir / "ckpt.pt").unlink(missing_ok=True)
    rows = loss_rows(out_dir, log)
    losses = [row["loss"] for row in rows]
    after = [row for row in rows if row["step"] >= FLEX_WARMUP] or rows
    r = {"command": shlex.join(["python", *argv[1:]]), "attention": attention, "compile": not c.rehearse,
         "steps": len(rows), "warmup_steps": FLEX_WARMUP, "loss_first": losses[0], "loss_last": losses[-1],
         "finite": all(math.isfinite(v) for v in losses), "first_step_s": rows[0]["step_ms"] / 1e3,
         "tok_per_s_median": statistics.median(row["tok_per_s"] for row in after),
         **dynamo_events(log.read_text(errors="replace"), FLEX_WARMUP)}
    if c.rehearse:
        why = "rehearsal: eager with sdpa (flex_attention has no CPU backward; compiling takes ~40 s on a CPU)"
        for k in ("recompiles", "recompiles_after_warmup", "graph_breaks", "graph_breaks_after_warmup",
                  "recompile_limit_hit"):
            r[k] = na(why)
    r["summary"] = (f"{attention} doc_mask qk_norm rope bf16 {'compiled' if r['compile'] else 'eager'}, {len(rows)} "
                    f"steps: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}; recompiles "
                    f"{fmt(r['recompiles'], 'd')} in all, {fmt(r['recompiles_after_warmup'], 'd')} after step "
                    f"{FLEX_WARMUP - 1}; graph breaks {fmt(r['graph_breaks'], 'd')}; first step "
                    f"{r['first_step_s']:.1f} s, then {r['tok_per_s_median']:,.0f} tok/s")
    if not r["finite"] or (not c.rehearse and (r["recompiles_after_warmup"] or r["recompile_limit_hit"])):
        raise StepError(f"recompiles after warm-up or non-finite losses: {r['summary']}", log, r)
    return r


# a few seconds (the rehearsal runs the step, not the suite): the guard that keeps CPU tests off the GPU
REHEARSAL_TESTS = "tests/test_cpu_pinning.py::test_unpinned_commands_are_refused"


def child_autobatch(out: str, config: str, *overrides: str) -> None:
    """autobatch.search_micro_batch on a config as train.py would run it (eager: each compiled probe would
    recompile from scratch); what it chose and tried, and that it left no memory behind."""
    import torch

    import train
    from autobatch import search_micro_batch
    from common import Dist, configure_backends
    from model import GPT
    from train_config import load_config

    cuda = torch.cuda.is_available()
    configure_backends(tf32=cuda)
    cfg = load_config([config, "--micro_batch=auto", "--compile=false", *overrides])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    s = search_micro_batch(GPT(cfg.model_config()), cfg, Dist(device=torch.device("cuda" if cuda else "cpu")),
                           train.train_step, train.build_optimizer)
    Path(out).write_text(json.dumps({
        "config": config, "seq_len": cfg.seq_len, "micro_batch": s.micro_batch, "tried": s.tried,
        "seconds": time.perf_counter() - t0,
        "memory_allocated_after": torch.cuda.memory_allocated() if cuda else None,
        "memory_reserved_after": torch.cuda.memory_reserved() if cuda else None}))


def step_autobatch(c: Check) -> dict:
    if c.rehearse:  # no GPU memory to probe: a tiny model through the same search (CPU: no probe at all)
        model = ",".join(f"--model_overrides.{k}={v}" for k, v in REHEARSAL_MODEL.items()).split(",")
        r = c.child("autobatch", "child_autobatch", "config/gpt2_owt.py", *model, "--seq_len=64",
                    "--total_batch_tokens=1024", cap_s=120)
    else:
        r = c.child("autobatch", "child_autobatch", "config/gpt2_owt.py", cap_s=300)
    r["summary"] = f"micro_batch {r['micro_batch']} at seq {r['seq_len']} (tried {r['tried']}, {r['seconds']:.0f} s)"
    if r["memory_allocated_after"]:
        raise StepError(f"the search left {r['memory_allocated_after']} bytes allocated")
    for k in ("memory_allocated_after", "memory_reserved_after"):
        if r[k] is None:
            r[k] = na("no GPU")
    return r


def step_pytest(c: Check) -> dict:
    """The test suite (but the cuda tests, run by cuda_tests) with the GPU visible, in whatever budget is left:
    at the end of it pytest is interrupted (SIGINT: it still writes its report) and the counts are of the
    tests that ran."""
    selection = shlex.split(c.args.pytest_args or (REHEARSAL_TESTS if c.rehearse else "tests"))
    xml = c.work / "pytest.xml"
    xml.unlink(missing_ok=True)
    argv = [c.py, "-m", "pytest", *SERIAL, "-m", "not cuda", "-rfE", f"--junitxml={xml}", *selection]
    rc, log, _ = c.spawn("pytest", argv, cap_s=c.left(), interrupt_s=20)
    if not xml.is_file():
        raise StepError(f"pytest wrote no report (exit code {rc})", log)
    r = {"command": shlex.join(["python", *argv[1:]]), "gpu_visible": not c.rehearse, "finished": rc is not None,
         **junit_counts(xml)}
    m = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", log.read_text())
    r["selected"] = (int(m.group(3) or int(m.group(1)) - int(m.group(2) or 0)) if m
                     else na("no 'collected' line in the log"))
    r["not_run"] = r["selected"] - r["ran"] if m else na("no 'collected' line in the log")
    r["summary"] = (f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped of "
                    f"{r['ran']} run" + ("" if r["finished"] else f", cut at the budget with {fmt(r['not_run'], 'd')}"
                                         f" of {fmt(r['selected'], 'd')} not run")
                    + f" (pytest -m 'not cuda' {' '.join(selection)}, GPU {'hidden' if c.rehearse else 'visible'})")
    if r["failed"] or r["errors"]:
        raise StepError("failed: " + "; ".join(r["failures"][:5]), log, r)
    if r["ran"] == 0 or (r["finished"] and rc not in (0, 1)):
        raise StepError(f"no test ran or pytest failed (exit code {rc}): {r['summary']}", log, r)
    return r


# kernel / op name fragments (lower case) -> kind; the first match wins (fmha_cutlass is attention)
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "wgmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach")),
    ("copy", ("memcpy", "memset", "aten::copy_", "aten::_to_copy")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("norm", ("layer_norm",)),
    ("inductor_triton", ("triton_",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KINDS if any(f in low for f in frags)), "other")


def step_profile(c: Check) -> dict:
    flags, B, T, dtype = shape(c)
    warmup, steps = (1, 2) if c.rehearse else (2, 10)
    argv = [*flags, "--batch-size", str(B), "--seq-len", str(T), "--dtype", dtype, "--steps", str(steps),
            "--warmup", str(warmup)] + (["--device", "cpu"] if c.rehearse else ["--compile"])
    p = c.child("profile", "child_profile", *argv, cap_s=240)
    if not p["ops"]:
        raise StepError(f"the profiler recorded no {'kernels' if p['device'] == 'cuda' else 'ops'}",
                        c.work / "profile.log")
    n_steps = warmup + steps
    total = sum(us for _, _, us in p["ops"]) or 1.0
    top = [{"name": name, "kind": kind_of(name), "ms_per_step": us / 1e3 / n_steps, "share": us / total,
            "calls_per_step": calls / n_steps} for name, calls, us in p["ops"][: c.args.top]]
    kinds: dict[str, float] = {}
    for name, _, us in p["ops"]:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us / total
    attn = [name for name, _, _ in p["ops"] if kind_of(name) == "attention"]
    attention_kernel = ("flash" if any("flash" in n.lower() for n in attn)
                        else "cudnn" if any("cudnn" in n.lower() or "sdpa" in n.lower() for n in attn)
                        else "mem_efficient" if any("fmha" in n.lower() for n in attn) else "none found")
    busy_ms = total / 1e3 / n_steps
    bench_r = c.result("bench_compiled")
    r = {"device_kind": p["device"], "compile": not c.rehearse, "profiled_steps": n_steps,
         "measure": "GPU kernel time" if p["device"] == "cuda" else "CPU self time of aten ops",
         "time_ms_per_step": busy_ms, "by_kind": {k: kinds[k] for k in sorted(kinds, key=kinds.get, reverse=True)},
         "attention_kernel": attention_kernel, "flash_attention": attention_kernel == "flash",
         "attention_names": attn[:5], "top": top[:10]}
    r["busy_share_of_step"] = (busy_ms / bench_r["step_ms_median"] if bench_r and p["device"] == "cuda"
                               else na("CPU: op self times are not a GPU busy share" if p["device"] != "cuda"
                                       else "bench_compiled did not run"))
    lines = [f"# {r['measure']} per step, over {n_steps} profiled steps (warm-up included) of bench.py "
             + " ".join(argv),
             "# by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in r["by_kind"].items()),
             f"# attention kernel: {attention_kernel}",
             f"{'ms/step':>9} {'share':>6} {'calls':>6}  {'kind':<16} name"]
    lines += [f"{t['ms_per_step']:9.3f} {t['share']:6.1%} {t['calls_per_step']:6.1f}  {t['kind']:<16} "
              f"{t['name'][:110]}" for t in top]
    (c.out / "profile.txt").write_text("\n".join(lines) + "\n")
    r["summary"] = (f"{busy_ms:.1f} ms/step of {r['measure']} ({fmt(r['busy_share_of_step'], '.0%')} of the "
                    f"bench_compiled step); attention kernel {attention_kernel}; "
                    + ", ".join(f"{k} {v:.0%}" for k, v in list(r["by_kind"].items())[:5]) + "; table in profile.txt")
    return r


def step_bench_batch2x(c: Check) -> dict:
    return bench(c, "bench_batch2x", True, batch_mult=2, cap_s=300)


def step_bench_cudagraphs(c: Check) -> dict:
    return bench(c, "bench_cudagraphs", True, "--compile-mode", "reduce-overhead", cap_s=300)


def step_bench_vs_plain(c: Check) -> dict:
    r = bench(c, "bench_vs_plain", False, "--vs-plain", cap_s=180)
    v = r.pop("vs_plain")
    r.update({f"vs_plain_{k}": v[k] for k in ("pairs", "fast_ms_median", "plain_ms_median", "ratio_median",
                                              "ratio_q1", "ratio_q3")})
    r["summary"] = (f"{v['pairs']} alternated pairs: fast {v['fast_ms_median']:.1f} ms, plain "
                    f"{v['plain_ms_median']:.1f} ms; plain/fast median {v['ratio_median']:.3f} "
                    f"(quartiles {v['ratio_q1']:.3f}-{v['ratio_q3']:.3f})")
    return r


TRAIN_FIELDS = {"command": str, "steps": int, "losses": list, "loss_first": float, "loss_last": float,
                "loss_last5_mean": float, "finite": bool, "first_step_s": float, "tok_per_s_median": float,
                "mfu_median": float, "peak_mem_gib": float}
STEPS = [
    Step("env", step_env, 15, 4, {"python": str, "torch": str, "cuda": str, "cudnn": int, "triton": str,
                                  "device_name": str, "driver": str, "gpu_memory_gib": float, "capability": str,
                                  "cpu_count": int, "ceiling_tflops": float, "ceiling_dtype": str,
                                  "ceiling_n": int, "ceiling_iters": int}),
    Step("bench_eager", step_bench_eager, 25, 4, BENCH_FIELDS),
    Step("bench_compiled", step_bench_compiled, 90, 4, {**BENCH_FIELDS, "speedup_vs_eager": float}),
    Step("cuda_tests", step_cuda_tests, 75, 8, {"files": list, "selected": int, "passed": int, "failed": int,
                                                 "skipped": int, "skip_reasons": list}),
    Step("train", step_train, 60, 10, {**TRAIN_FIELDS, "compile": bool, "loss_fell": bool,
                                       "tok_per_s_vs_bench": float}),
    Step("modern", step_modern, 60, 12, {**TRAIN_FIELDS, "config": str, "compile": bool, "loss_fell": bool,
                                         "loss_last5_vs_gpt2": float}),
    Step("fp16", step_fp16, 30, 6, {**TRAIN_FIELDS, "dtype": str, "overflow_steps": int,
                                    "rel_diff_vs_bf16": float, "close_to_bf16": bool}),
    Step("resume", step_resume, 45, 15, {
        "command_ref": str, "command_cut": str, "device": str, "steps": int, "resumed_at": int, "zero1": bool,
        "fused_adamw": bool, "restarted": bool, "losses_ref": list, "losses_resumed": list, "losses_bit_equal": bool,
        "bit_equal_before_resume": bool, "first_diff_step": int, "max_abs_diff": float,
        "max_abs_diff_before_resume": float, "weights_bit_equal": bool, "optimizer_bit_equal": bool,
        "max_abs_diff_weights": float, "bit_equal": bool}),
    Step("profile", step_profile, 45, 5, {"device_kind": str, "time_ms_per_step": float, "by_kind": dict,
                                          "attention_kernel": str, "flash_attention": bool, "top": list,
                                          "busy_share_of_step": float}),
    Step("flex_recompiles", step_flex_recompiles, 120, 6, {
        "command": str, "attention": str, "compile": bool, "steps": int, "warmup_steps": int, "loss_first": float,
        "loss_last": float, "finite": bool, "first_step_s": float, "tok_per_s_median": float, "recompiles": int,
        "recompiles_after_warmup": int, "graph_breaks": int, "graph_breaks_after_warmup": int,
        "recompile_reasons": list, "recompile_limit_hit": bool}),
    Step("autobatch", step_autobatch, 60, 6, {"config": str, "seq_len": int, "micro_batch": int, "tried": list,
                                              "seconds": float, "memory_allocated_after": int,
                                              "memory_reserved_after": int}),
    Step("bench_batch2x", step_bench_batch2x, 100, 4, BENCH_FIELDS),
    Step("bench_cudagraphs", step_bench_cudagraphs, 80, 4, BENCH_FIELDS),
    Step("bench_vs_plain", step_bench_vs_plain, 40, 5, {**BENCH_FIELDS, "vs_plain_ratio_median": float}),
    # last: it takes whatever the budget has left (the estimate is the least worth starting with)
    Step("pytest", step_pytest, 60, 8, {"command": str, "gpu_visible": bool, "finished": bool, "selected": int,
                                        "ran": int, "passed": int, "failed": int, "errors": int, "skipped": int,
                                        "not_run": int, "failures": list, "skip_reasons": list}),
]


# ---------------------------------------------------------------------------------------------------------
# Child processes (run under $PYTHON by Check.child)


def child_env(out: str) -> None:
    import platform

    import torch

    import common

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    r: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if cuda else None, "cpu_count": os.cpu_count(),
               "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
               "driver": None, "gpu_memory_gib": None, "capability": None}
    try:
        import triton

        r["triton"] = triton.__version__
    except ImportError:
        r["triton"] = None
    if cuda:
        props = torch.cuda.get_device_properties(device)
        r["gpu_memory_gib"] = props.total_memory / 2**30
        r["capability"] = f"{props.major}.{props.minor}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            r["driver"] = smi.stdout.strip().splitlines()[0].split(",")[0].strip() or None
            r["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    n, iters = (8192, 100) if cuda else (1024, 5)
    r.update(ceiling_dtype="bf16", ceiling_n=n, ceiling_iters=iters,
             ceiling_tflops=common.measure_matmul_tflops(device, torch.bfloat16, n=n, iters=iters))
    Path(out).write_text(json.dumps(r))


def child_compare_checkpoints(out: str, a: str, b: str) -> None:
    """Whether two train.py checkpoints hold bit-equal weights and AdamW state; the largest weight difference."""
    import torch

    from checkpoint import load_checkpoint

    ca, cb = load_checkpoint(a), load_checkpoint(b)

    def leaves(x: object) -> list:
        if isinstance(x, dict):
            return [v for k in sorted(x, key=str) for v in leaves(x[k])]
        return [v for y in x for v in leaves(y)] if isinstance(x, (list, tuple)) else [x]

    def equal(x: object, y: object) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        return x == y

    ma, mb = ca["model"], cb["model"]
    same_keys = ma.keys() == mb.keys()
    oa, ob = leaves(ca["optimizer"]["state"]), leaves(cb["optimizer"]["state"])
    Path(out).write_text(json.dumps({
        "model_equal": same_keys and all(equal(ma[k], mb[k]) for k in ma),
        "model_max_abs_diff": max(((ma[k].float() - mb[k].float()).abs().max().item() for k in ma if k in mb),
                                  default=0.0),
        "optimizer_equal": len(oa) == len(ob) and all(equal(x, y) for x, y in zip(oa, ob)),
        "fused": bool(ca["optimizer"]["param_groups"][0].get("fused")), "steps": [ca["step"], cb["step"]]}))


def child_profile(out: str, *bench_argv: str) -> None:
    """bench.py's own CLI run under torch.profiler; writes [name, calls, microseconds] per kernel (CUDA) or per
    aten op (CPU, self time), largest first."""
    import runpy

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sys.argv = ["bench.py", *bench_argv]
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        try:
            runpy.run_path(str(REPO / "bench.py"), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    ops: dict[str, list] = {}
    for ev in prof.events():
        if cuda and (ev.device_type != DeviceType.CUDA or ev.name.endswith(" Sync")):
            continue
        us = ev.time_range.elapsed_us() if cuda else ev.self_cpu_time_total
        row = ops.setdefault(ev.name, [ev.name, 0, 0.0])
        row[1] += 1
        row[2] += us
    rows = sorted(ops.values(), key=lambda r: r[2], reverse=True)
    Path(out).write_text(json.dumps({"device": "cuda" if cuda else "cpu", "ops": rows}))


# ---------------------------------------------------------------------------------------------------------
# Runner


def plain(v: object) -> object:
    """JSON-ready value: Null -> None (its reason is recorded separately)."""
    if isinstance(v, Null):
        return None
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def tail(paths: list[Path], n: int = 25) -> list[str]:
    lines: list[str] = []
    for p in paths:
        if p.is_file():
            lines += [f"[{p.name}] {ln}" for ln in p.read_text(errors="replace").splitlines()[-n:]]
    return lines[-n:]


def record(c: Check, step: Step, status: str, seconds: float, result: dict | None = None,
           reason: str | None = None, logs: list[Path] | None = None) -> None:
    result = result or {}
    rec = {"step": step.name, "status": status, "rehearse": c.rehearse, "started_s": round(c.elapsed() - seconds, 1),
           "seconds": round(seconds, 1), "estimate_s": step.rehearse_s if c.rehearse else step.gpu_s,
           "reason": reason, "summary": result.pop("summary", None), "result": plain(result),
           "nulls": {k: v.reason for k, v in result.items() if isinstance(v, Null)},
           "logs": [str(p) for p in logs or []], "log_tail": tail(logs or []) if status == "error" else None}
    c.records[step.name] = rec
    with open(c.out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    write_summary(c)


def write_summary(c: Check) -> None:
    head = [f"GPU check{' REHEARSAL (CPU, tiny model: the figures are not GPU figures)' if c.rehearse else ''}: "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {c.elapsed():.0f} s of a {c.args.budget_s:.0f} s budget",
            f"command: {shlex.join(['python', *sys.argv])}", f"work dir (logs): {c.work}", ""]
    body = []
    for rec in c.records.values():
        text = rec["summary"] if rec["status"] == "ok" else rec["reason"]
        body.append(f"{rec['step']:<17} {rec['status']:<7} {rec['seconds']:>5.0f} s  {text}")
        if rec["status"] == "error":
            body += [f"{'':>33}| {ln}" for ln in rec["log_tail"][-6:]]
    (c.out / "summary.txt").write_text("\n".join(head + body) + "\n")


def run_step(c: Check, step: Step) -> None:
    t = time.monotonic()
    c.logs = []
    try:
        result = step.fn(c)
    except StepError as e:
        logs = c.logs if e.log is None or e.log in c.logs else [*c.logs, e.log]
        record(c, step, "error", time.monotonic() - t, result=e.result, reason=str(e), logs=logs)
    except Interrupted as e:
        record(c, step, "error", time.monotonic() - t, reason=f"interrupted ({e})", logs=c.logs)
        raise
    except Exception as e:  # a bug or an unexpected output: this step fails, the check goes on
        tb = c.work / f"{step.name}.traceback.txt"
        tb.write_text(traceback.format_exc())
        record(c, step, "error", time.monotonic() - t, reason=f"{type(e).__name__}: {e}", logs=[*c.logs, tb])
    else:
        record(c, step, "ok", time.monotonic() - t, result=result, logs=c.logs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gpu_check", help="results folder (default out/gpu_check)")
    p.add_argument("--work-dir", help="logs, bench JSON, training runs, caches (default: a new /tmp folder)")
    p.add_argument("--budget-s", type=float, default=470, help="total seconds; a step whose estimate does not fit "
                   "in what is left is skipped (default 470)")
    p.add_argument("--rehearse", action="store_true", help="every step on CPU with a tiny model (about 2 min)")
    p.add_argument("--config", default="config/gpt2_owt.py", help="train.py config giving model, micro_batch, "
                   "seq_len, dtype (default config/gpt2_owt.py)")
    p.add_argument("--only", help="comma-separated step names to run (default: all)")
    p.add_argument("--data-dir", help="prepared training data (default: Tiny Shakespeare, prepared in the work dir)")
    p.add_argument("--shakespeare-path", help="Tiny Shakespeare text for prepare_data.py")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps of the train runs "
                   "(default 40; 10 in rehearsal)")
    p.add_argument("--pytest-args", help="what the pytest step runs (default: tests; rehearsal: "
                   f"{REHEARSAL_TESTS})")
    p.add_argument("--top", type=int, default=15, help="rows of the profile table (default 15)")
    p.add_argument("--list", action="store_true", help="print the steps and their estimates, run nothing")
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            p.error(f"--only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    if not (REPO / args.config).is_file():
        p.error(f"--config {args.config}: no such file under {REPO}")
    args.train_steps = args.train_steps or (10 if args.rehearse else 40)
    if args.train_steps < TRAIN_WARMUP + 5:
        p.error(f"--train-steps must be >= {TRAIN_WARMUP + 5}")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:  # python gpu_check.py _child FUNCTION OUT [ARGS...]
        sys.path.insert(0, str(REPO))
        globals()[argv[1]](*argv[2:])
        return 0
    args = parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:<17} ~{s.gpu_s:>4.0f} s on a GPU, ~{s.rehearse_s:>3.0f} s rehearsed")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    if work == out or out in work.parents:
        print(f"gpu_check.py: error: --work-dir must be outside --out ({out})", file=sys.stderr)
        return 2
    c = Check(args, work, out)

    def on_signal(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    wanted = set(args.only.split(",")) if args.only else None
    print(f"gpu_check: results in {out}, logs in {work}", flush=True)
    todo = [s for s in STEPS if wanted is None or s.name in wanted]
    for i, step in enumerate(todo):
        est = step.rehearse_s if c.rehearse else step.gpu_s
        if c.elapsed() + est > args.budget_s:
            record(c, step, "skipped", 0.0, reason=f"does not fit: estimate {est:.0f} s, {c.left():.0f} s left")
        else:
            try:
                run_step(c, step)
            except Interrupted as e:
                for rest in todo[i + 1:]:
                    record(c, rest, "skipped", 0.0, reason=f"interrupted ({e})")
                break
        rec = c.records[step.name]
        print(f"[{c.elapsed():4.0f} s] {step.name}: {rec['status']} | {rec['summary'] or rec['reason']}", flush=True)
    bad = [r["step"] for r in c.records.values() if r["status"] == "error"]
    print(f"gpu_check: {len(c.records) - len(bad)} of {len(c.records)} steps ok or skipped"
          + (f"; errors: {', '.join(bad)}" if bad else "") + f" | {out / 'summary.txt'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
