"""Training-step benchmark: per-step time, tokens/s, MFU, peak memory and compile time.

    python bench.py                                        # GPT-2 124M on this machine's device, random tokens
    python bench.py config/gpt2_owt.py --steps 30 --compile --dtype bf16 --json out/bench.json
    python bench.py --batch-size 2 --seq-len 256 --dtype fp32  # CPU-sized 124M step
    python bench.py --data data/shakespeare                # real TokenLoader batches instead of random tokens
    python bench.py --plain                                # the plain nanoGPT-style loop, every fast path off
    python bench.py config/shakespeare_cpu.py --vs-plain   # + fast and plain steps alternated: time ratio

One measured step = next batch (host) -> pinned non-blocking copy to the device -> forward under autocast ->
backward -> grad clip -> AdamW -> zero_grad, on one micro-batch. The first --warmup steps (which include
torch.compile's compilation) are not measured; the compile time is reported separately. No value is read
back from the device inside the measured steps; losses are read once at the end.

The model, batch size, sequence length and dtype come from a train.py config (plain assignments, checked by
train_config.load_config) and bench's flags override them. MFU = model FLOPs/token (model.estimate_flops_per_token,
the padded vocab rows not counted) x tokens/s over the GPU's bf16 peak (common.PEAK_BF16_FLOPS table, or
--peak-tflops); --measure-ceiling also times a large matmul and reports MFU against that measured ceiling
(--ceiling-tflops X takes a ceiling measured elsewhere instead).
On CPU there is no peak: achieved GFLOP/s and the process's peak RSS are reported instead.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import common
import optim
from errors import ArgumentParser, UserError, run_main
from model import GPT
from train import train_step
from train_config import TrainConfig, load_config

# JSON fields every run writes (tests/test_bench.py checks them).
JSON_FIELDS = (
    "command", "torch", "device", "device_name", "model", "params", "flops_per_token", "batch_size", "seq_len",
    "dtype", "compile", "compile_mode", "attention", "fused_adamw", "pad_vocab", "tf32", "plain", "data",
    "warmup", "steps", "step_ms", "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s",
    "achieved_tflops", "peak_tflops", "mfu", "ceiling_tflops", "mfu_vs_ceiling", "peak_memory_bytes",
    "memory_kind", "first_step_s", "compile_s", "loss_first", "loss_last", "vs_plain",
)


def parse_args(argv: list[str]) -> object:
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a train.py config file (model, micro_batch, seq_len, dtype, compile)")
    p.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compile happens here)")
    p.add_argument("--batch-size", type=int, help="micro-batch (default: config's micro_batch, else 16)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: config's seq_len, else 1024)")
    p.add_argument("--model", help="model preset (gpt2, gpt2-medium, ...; default: config's, else gpt2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a GPTConfig field, e.g. --set n_layer=4 (repeatable)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="autocast dtype (default: config's; "
                   "without a config bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--attention", help="attention kernel: sdpa (default), flash_attn, flex, manual")
    p.add_argument("--fused-adamw", choices=["auto", "on", "off"], default="auto",
                   help="fused AdamW kernel (auto: on wherever torch has it: CUDA, and CPU since torch 2.4)")
    p.add_argument("--pad-vocab", choices=["on", "off"], default="on", help="pad the vocab to a multiple of 64")
    p.add_argument("--no-tf32", action="store_true", help="full-precision fp32 matmuls (TF32 is on by default on CUDA)")
    p.add_argument("--plain", action="store_true",
                   help="plain nanoGPT-style loop: eager, vocab 50257, foreach AdamW, no TF32, pageable copies, "
                        "loss.item() every step (the reference the fast paths are measured against)")
    p.add_argument("--vs-plain", action="store_true",
                   help="then alternate fast and --plain steps in this process and report the time ratio")
    p.add_argument("--data", metavar="DIR", help="real-loader mode: batches from data.TokenLoader over DIR's "
                   "train split (default: random tokens, no disk I/O)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: common.PEAK_BF16_FLOPS table)")
    p.add_argument("--measure-ceiling", action="store_true",
                   help="time a large matmul in the run's dtype and report MFU against it too")
    p.add_argument("--ceiling-tflops", type=float, metavar="X",
                   help="report MFU against this matmul ceiling (TFLOP/s, e.g. measured once by an earlier run) "
                        "instead of timing one")
    p.add_argument("--profile", action="store_true", help="after timing, profile 3 steps and print the top ops")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    if args.ceiling_tflops is not None and not args.ceiling_tflops > 0:
        p.error(f"--ceiling-tflops must be positive (got {args.ceiling_tflops})")
    return args


def resolve_config(args: object, device: torch.device) -> TrainConfig:
    """TrainConfig from the config file plus bench's flags, validated by train_config.load_config."""
    argv = [args.config] if args.config else []
    argv += ["--max_steps=1", "--max_tokens=0"]  # train.py requires one of them; bench ignores both
    for flag, key in (("batch_size", "micro_batch"), ("seq_len", "seq_len"), ("model", "model"), ("dtype", "dtype")):
        if getattr(args, flag) is not None:
            argv.append(f"--{key}={getattr(args, flag)}")
    if args.dtype is None and args.config is None:
        argv.append(f"--dtype={'bf16' if device.type == 'cuda' else 'fp32'}")
    if args.compile:
        argv.append("--compile=true")
    if args.attention is not None:
        argv.append(f"--model_overrides.attention={args.attention}")
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item}: write KEY=VALUE, e.g. --set n_layer=4")
        argv.append(f"--model_overrides.{item}")
    if args.peak_tflops is not None:
        argv.append(f"--peak_flops={args.peak_tflops * 1e12}")
    return load_config(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def batches(args: object, cfg: TrainConfig, vocab_size: int, device: torch.device,
            pinned: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) on the device. Synthetic: 4 random batches made once on the host and cycled, so the step still
    pays for a host->device copy but not for data loading. Real: data.TokenLoader, loading inside the step."""
    copy = common.to_device if pinned else (lambda t, dev: t.to(dev))
    B, T = cfg.micro_batch, cfg.seq_len
    if args.data:
        from data import TokenLoader

        loader = TokenLoader(args.data, "train", B, T, seed=args.seed)
        while True:
            x, y = loader.next_batch()
            yield copy(x, device), copy(y, device)
    g = torch.Generator().manual_seed(args.seed)
    pool = []
    for _ in range(4):
        buf = torch.randint(0, vocab_size, (B, T + 1), generator=g)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if pinned and device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        pool.append((x, y))
    i = 0
    while True:
        x, y = pool[i % len(pool)]
        i += 1
        yield copy(x, device), copy(y, device)


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
              plain: bool, cudagraphs: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]:
    """train.train_step on one micro-batch. The plain path reads the loss back every step, as nanoGPT does."""
    autocast = common.autocast_context(device.type, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
        if cudagraphs:  # outputs of a replayed graph are overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
        loss = train_step(model, opt, scaler, lambda: (x, y), 1, autocast, cfg.grad_clip).loss
        return loss.item() if plain else loss  # fast: read later, not now (no host-device sync in the step)

    return step


def build(args: object, cfg: TrainConfig, device: torch.device, plain: bool) -> tuple:
    """Model, (compiled) callable, step function and model FLOPs/token for the fast or the plain path."""
    torch.manual_seed(args.seed)
    mc = cfg.model_config()
    pad = 1 if plain or args.pad_vocab == "off" else max(64, mc.pad_vocab_multiple)
    mc = dataclasses.replace(mc, pad_vocab_multiple=pad)
    raw_model = GPT(mc).to(device)
    # Model FLOPs: the padding rows of the output head are computed but are not part of the model.
    pad_rows = mc.padded_vocab_size - mc.vocab_size
    flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len) - 6 * pad_rows * mc.n_embd
    fused = False if plain else {"auto": None, "on": True, "off": False}[args.fused_adamw]
    opt = optim.make_adamw(optim.param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          eps=cfg.eps, fused=fused)
    model = raw_model
    if cfg.compile and not plain:
        model = torch.compile(raw_model, mode=None if args.compile_mode == "default" else args.compile_mode)
    step = make_step(model, opt, cfg, device, plain,
                     cudagraphs=model is not raw_model and args.compile_mode == "reduce-overhead")
    return raw_model, model, step, bool(opt.defaults.get("fused")), mc, flops_per_token


def vs_plain(args: object, cfg: TrainConfig, device: torch.device, fast_step: Callable, fast_data: Iterator) -> dict:
    """Fast step and plain step alternated in this process (A B B A A B ...), so that load from other processes
    hits both alike; ratio = plain step time / fast step time per pair (> 1: the fast path is faster).
    Each step is synchronised here, so on CUDA this hides the fast path's sync-free advantage."""
    common.configure_backends(tf32=False)
    _, _, plain_step, _, _, _ = build(args, cfg, device, plain=True)
    plain_data = batches(args, cfg, cfg_vocab(cfg), device, pinned=False)
    for _ in range(max(1, args.warmup)):
        plain_step(*next(plain_data))
    tf32 = device.type == "cuda" and not args.no_tf32
    times: dict[str, list[float]] = {"fast": [], "plain": []}
    pair = (("fast", fast_step, fast_data), ("plain", plain_step, plain_data))
    for i in range(args.steps):
        for name, step, data in pair if i % 2 == 0 else pair[::-1]:  # A B, B A, ...: no order bias
            common.configure_backends(tf32=tf32 and name == "fast")
            t0 = time.perf_counter()
            out = step(*next(data))
            if isinstance(out, torch.Tensor):
                common.sync(device)
            times[name].append(time.perf_counter() - t0)
    common.configure_backends(tf32=tf32)
    ratios = sorted(p / f for f, p in zip(times["fast"], times["plain"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"pairs": args.steps, "fast_ms_median": statistics.median(times["fast"]) * 1e3,
            "plain_ms_median": statistics.median(times["plain"]) * 1e3, "ratio_median": statistics.median(ratios),
            "ratio_q1": q[0], "ratio_q3": q[2], "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def cfg_vocab(cfg: TrainConfig) -> int:
    return cfg.model_config().vocab_size


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"  # Linux: KiB


def run(args: object) -> dict:
    device = pick_device(args.device)
    cfg = resolve_config(args, device)
    if args.data:
        from data import load_meta

        load_meta(args.data)  # a missing or incomplete dataset fails before the model is built
    tf32 = device.type == "cuda" and not (args.no_tf32 or args.plain)
    common.configure_backends(tf32=tf32)
    raw_model, model, step, fused, mc, flops_per_token = build(args, cfg, device, args.plain)
    data = batches(args, cfg, mc.vocab_size, device, pinned=not args.plain)
    pad = mc.pad_vocab_multiple
    B, T = cfg.micro_batch, cfg.seq_len
    print(f"bench: {cfg.model} ({raw_model.num_params() / 1e6:.1f}M params, vocab {mc.padded_vocab_size}) on "
          f"{device} | B={B} x T={T} | {cfg.dtype} | {'compiled' if model is not raw_model else 'eager'} | "
          f"attention {mc.attention} | AdamW {'fused' if fused else 'foreach'} | "
          f"{'data ' + args.data if args.data else 'random tokens'}{' | PLAIN loop' if args.plain else ''}",
          flush=True)

    losses: list[torch.Tensor | float] = []
    warm_s = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(step(*next(data)))
        common.sync(device)
        warm_s.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s: list[float] = []
    if device.type == "cuda":  # per-step times from CUDA events: no synchronisation between steps
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        t_start = time.perf_counter()
        events[0].record()
        for i in range(args.steps):
            losses.append(step(*next(data)))
            events[i + 1].record()
        torch.cuda.synchronize(device)
        total_s = time.perf_counter() - t_start
        step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(args.steps)]
    else:
        t_start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step(*next(data)))
            step_s.append(time.perf_counter() - t0)
        total_s = time.perf_counter() - t_start
    mem_bytes, mem_kind = peak_memory(device)
    loss_values = [float(v) for v in losses]  # the only reads of device values
    if args.profile:
        profile(step, data, device)
    ab = vs_plain(args, cfg, device, step, data) if args.vs_plain and not args.plain else None

    tokens_per_s = B * T * args.steps / total_s
    achieved = flops_per_token * tokens_per_s
    peak = common.peak_flops(device, cfg.peak_flops) or None
    ceiling = args.ceiling_tflops * 1e12 if args.ceiling_tflops else None
    if args.measure_ceiling and ceiling is None:
        ceiling = common.measure_matmul_tflops(device, common.DTYPES[cfg.dtype]) * 1e12
    median_s = statistics.median(step_s)
    first_s = warm_s[0] if warm_s else None
    res = {
        "command": " ".join(["python", "bench.py", *sys.argv[1:]]) if sys.argv[0].endswith("bench.py") else None,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": mc.to_dict(),
        "params": raw_model.num_params(),
        "flops_per_token": flops_per_token,
        "batch_size": B, "seq_len": T, "dtype": cfg.dtype,
        "compile": model is not raw_model, "compile_mode": args.compile_mode if model is not raw_model else None,
        "attention": mc.attention, "fused_adamw": fused, "pad_vocab": pad, "tf32": tf32,
        "plain": args.plain, "data": args.data or "synthetic",
        "warmup": args.warmup, "steps": args.steps,
        "step_ms": [s * 1e3 for s in step_s], "step_ms_median": median_s * 1e3,
        "step_ms_min": min(step_s) * 1e3, "step_ms_max": max(step_s) * 1e3,
        "tokens_per_s": tokens_per_s, "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": common.mfu(flops_per_token, tokens_per_s, peak),
        "ceiling_tflops": ceiling / 1e12 if ceiling else None,
        "mfu_vs_ceiling": common.mfu(flops_per_token, tokens_per_s, ceiling),
        "peak_memory_bytes": mem_bytes, "memory_kind": mem_kind,
        "first_step_s": first_s,
        # compile time = the first (compiling) step minus an ordinary step
        "compile_s": max(0.0, first_s - median_s) if first_s is not None and model is not raw_model else None,
        "loss_first": loss_values[0], "loss_last": loss_values[-1],
        "vs_plain": ab,
    }
    report(res)
    return res


def profile(step: Callable, data: Iterator, device: torch.device) -> None:
    """torch.profiler over 3 steps: the ops that take the time (attention, matmuls, optimizer, copies)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            step(*next(data))
        common.sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))


def report(r: dict) -> None:
    print(f"step time: median {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f})"
          f" over {r['steps']} steps after {r['warmup']} warm-up")
    print(f"tokens/s: {r['tokens_per_s']:,.0f} | model FLOPs/token {r['flops_per_token'] / 1e9:.3f} GFLOP | "
          f"achieved {r['achieved_tflops'] * 1e3:,.1f} GFLOP/s")
    if r["mfu"] is not None:
        print(f"MFU: {r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s peak ({r['device_name']})")
    else:
        print(f"MFU: n/a (no peak FLOP/s known for {r['device_name']}; pass --peak-tflops)")
    if r["ceiling_tflops"] is not None:
        print(f"measured matmul ceiling: {r['ceiling_tflops']:.2f} TFLOP/s ({r['dtype']}) -> MFU vs ceiling "
              f"{r['mfu_vs_ceiling']:.1%}")
    print(f"peak memory: {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['memory_kind']})")
    if r["compile_s"] is not None:
        print(f"compile: {r['compile_s']:.1f} s (first step {r['first_step_s']:.1f} s minus a median step)")
    print(f"loss: first {r['loss_first']:.4f}, last {r['loss_last']:.4f}")
    if r["vs_plain"]:
        v = r["vs_plain"]
        print(f"vs plain loop, {v['pairs']} alternated step pairs: fast {v['fast_ms_median']:.1f} ms, plain "
              f"{v['plain_ms_median']:.1f} ms (medians); plain/fast per pair: median {v['ratio_median']:.3f}, "
              f"quartiles {v['ratio_q1']:.3f}-{v['ratio_q3']:.3f}, range {v['ratio_min']:.3f}-{v['ratio_max']:.3f}")


def main() -> None:
    args = parse_args(sys.argv[1:])
    res = run(args)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
