"""HellaSwag (validation) on one of our checkpoints or a Hugging Face GPT-2 folder.

    python eval_hellaswag.py out/run/ckpt.pt --data <mirror>/hellaswag_val.jsonl
    torchrun --nproc_per_node=8 eval_hellaswag.py out/run/ckpt.pt      # examples split across ranks

Two protocols, reported side by side under different names:

* `acc`, `acc_norm` (+ `_stderr`): exactly lm-eval's `hellaswag` task (0-shot). Context =
  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); each of the 4 continuations is
  " " + preprocess(ending); context and continuation are tokenized together and split where the context's own
  tokens end; the input is cut to its last `max_length` tokens; acc picks the ending with the largest sum of
  log-probabilities, acc_norm the largest sum divided by the ending's length in characters.
* `llmc_acc_norm` (and `llmc_acc`): the "completion style" of llm.c's dev/data/hellaswag.py and
  build-nanogpt: raw `ctx`, endings tokenized separately as " " + ending, pick the lowest mean (norm) or
  summed loss over the ending's tokens. llm.c calls its mean-loss number "acc_norm"; it is not lm-eval's.

`evaluate_hellaswag(model, ...)` is what train.py calls every `hellaswag_interval` steps.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from common import autocast_context, setup_distributed
from errors import ArgumentParser, UserError, run_main
from scoring import encode_pair, fit_max_length, load_model_for_eval, score_batch, tok_encode, unwrap

REQUIRED_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
HF_DATASET = "Rowan/hellaswag"  # validation split; the original file: rowanz/hellaswag data/hellaswag_val.jsonl
ROWANZ_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


# ----------------------------------------------------------------------------------------------------
# Data


def preprocess(text: str) -> str:
    """lm-eval's hellaswag utils.preprocess (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_examples(data_path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """HellaSwag validation examples from a rowanz-format jsonl file, or from the HF hub dataset when
    data_path is None. Each must have the fields in REQUIRED_FIELDS."""
    if data_path is None:
        try:
            from datasets import load_dataset

            docs = list(load_dataset(HF_DATASET, split="validation"))
        except Exception as e:
            raise UserError(f"could not load {HF_DATASET} from the Hugging Face hub ({type(e).__name__}); "
                            f"pass --data hellaswag_val.jsonl (the original file: {ROWANZ_URL})") from e
        source = HF_DATASET
    else:
        path = Path(data_path)
        if not path.is_file():
            raise UserError(f"HellaSwag data file {path} does not exist (get it from {ROWANZ_URL})")
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not JSON ({e.msg}); expected rowanz-format jsonl") from e
                if limit is not None and len(docs) >= limit:
                    break
        source = str(path)
    docs = docs[:limit] if limit is not None else docs
    if not docs:
        raise UserError(f"{source}: no HellaSwag examples")
    for i, doc in enumerate(docs):
        missing = [k for k in REQUIRED_FIELDS if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise UserError(f"{source}: example {i} lacks field(s) {missing}; expected rowanz-format HellaSwag "
                            f"with fields {list(REQUIRED_FIELDS)}")
        if not (isinstance(doc["endings"], list) and len(doc["endings"]) == 4
                and all(isinstance(e, str) for e in doc["endings"])):
            raise UserError(f"{source}: example {i}: 'endings' must be a list of 4 strings")
        try:
            label = int(doc["label"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label <= 3:
            raise UserError(f"{source}: example {i}: 'label' must be 0..3, got {doc['label']!r}")
    return docs


def render(doc: dict) -> dict:
    """One example as token requests: 4 for lm-eval's protocol, 4 for llm.c's, plus what the metrics need."""
    query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = [preprocess(e) for e in doc["endings"]]
    raw_ctx = doc.get("ctx") or (doc["ctx_a"] + " " + doc["ctx_b"] if doc["ctx_b"] else doc["ctx_a"])
    ctx_tokens = tok_encode(raw_ctx)
    return {
        "label": int(doc["label"]),
        "lmeval": [encode_pair(query, " " + c) for c in choices],
        "char_lens": [float(len(c)) for c in choices],
        "llmc": [(ctx_tokens, tok_encode(" " + e)) for e in doc["endings"]],
    }


def load_hellaswag(data_path: str | Path | None = None, limit: int | None = None) -> tuple[dict, ...]:
    """The examples as token requests, loaded, checked and tokenized once (cached): train.py calls this at
    start, so a missing file or an unreachable hub fails before the first step, not at the first evaluation."""
    return _rendered(None if data_path is None else str(data_path), limit)


@lru_cache(maxsize=4)
def _rendered(data_path: str | None, limit: int | None) -> tuple[dict, ...]:
    # Cached: train.py calls evaluate_hellaswag many times on the same subset.
    return tuple(render(d) for d in load_examples(data_path, limit))


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum, like np.argmax (lm-eval's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _stderr(correct: float, n: float) -> float:
    """lm-eval's mean_stderr (sample std with n-1, over sqrt(n)), which for 0/1 values is sqrt(p(1-p)/(n-1))."""
    if n < 2:
        return float("nan")
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


@torch.no_grad()
def evaluate_hellaswag(
    model: torch.nn.Module, data_path: str | Path | None = None, limit: int | None = None,
    batch_size: int = 8, max_length: int = 512, device: str | torch.device | None = None,
    rank: int = 0, world_size: int = 1, progress: bool = False, return_examples: bool = False,
) -> dict:
    """HellaSwag accuracy of `model` (a GPT, possibly DDP/compile-wrapped, already on its device).

    batch_size counts examples (each one forward of 8 rows: 4 endings x 2 protocols). With world_size > 1
    (torch.distributed initialized), rank r scores examples r, r + world_size, ... and the counts are summed
    over ranks, so every rank returns the same dict. The model's train/eval mode is restored afterwards.
    max_length is capped at the model's block_size (the result's max_length is the one used).
    Returns acc, acc_norm, their stderr, llmc_acc, llmc_acc_norm, n (and per-example results on this rank
    if return_examples)."""
    net = unwrap(model)
    if device is None:
        device = next(net.parameters()).device
    max_length = fit_max_length(net, max_length)
    examples = load_hellaswag(data_path, limit)
    mine = list(range(rank, len(examples), world_size))
    was_training = net.training
    net.eval()
    counts = torch.zeros(5, dtype=torch.float64)  # n, acc, acc_norm, llmc_acc, llmc_acc_norm
    per_example = []
    from tqdm import tqdm

    bar = tqdm(total=len(examples), desc="hellaswag", disable=not progress or rank != 0, unit="ex")
    try:
        for start in range(0, len(mine), batch_size):
            chunk = [examples[i] for i in mine[start : start + batch_size]]
            rows = [r for ex in chunk for r in ex["lmeval"] + ex["llmc"]]
            scores = score_batch(net, rows, max_length, device, greedy=False)
            for j, ex in enumerate(chunk):
                lls = [s for s, _ in scores[8 * j : 8 * j + 4]]
                llmc = [s for s, _ in scores[8 * j + 4 : 8 * j + 8]]
                pred = _argmax(lls)
                pred_norm = _argmax([ll / n for ll, n in zip(lls, ex["char_lens"])])
                llmc_pred = _argmax(llmc)
                llmc_pred_norm = _argmax([ll / len(c) for ll, (_, c) in zip(llmc, ex["llmc"])])
                label = ex["label"]
                counts += torch.tensor([1, pred == label, pred_norm == label, llmc_pred == label,
                                        llmc_pred_norm == label], dtype=torch.float64)
                if return_examples:
                    per_example.append({"idx": mine[start + j], "label": label, "lls": lls, "pred": pred,
                                        "pred_norm": pred_norm, "llmc_pred_norm": llmc_pred_norm})
            bar.update(len(chunk) * world_size)
    finally:
        bar.close()
        net.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        reduce_device = device if dist.get_backend() == "nccl" else "cpu"
        summed = counts.to(reduce_device)
        dist.all_reduce(summed)
        counts = summed.cpu()
    n, acc, acc_norm, llmc_acc, llmc_acc_norm = counts.tolist()
    result = {
        "acc": acc / n, "acc_stderr": _stderr(acc, n),
        "acc_norm": acc_norm / n, "acc_norm_stderr": _stderr(acc_norm, n),
        "llmc_acc": llmc_acc / n, "llmc_acc_norm": llmc_acc_norm / n,
        "n": int(n), "max_length": max_length,
    }
    if return_examples:
        result["examples"] = per_example
    return result


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="HellaSwag acc and acc_norm exactly as lm-eval defines them, plus llm.c's "
                       "metric, on one of our checkpoints or a Hugging Face GPT-2 folder.")
    p.add_argument("model", help="our checkpoint file (ckpt.pt) or a Hugging Face GPT-2 folder")
    p.add_argument("--data", help=f"rowanz-format hellaswag_val.jsonl (default: the {HF_DATASET} hub dataset)")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (x8 rows)")
    p.add_argument("--max-length", type=int, default=512,
                   help="inputs are cut to their last N tokens (default 512; capped at the model's block_size)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype for the forward pass (log-softmax is always fp32)")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.batch_size < 1 or args.max_length < 2:
        raise UserError("--batch-size must be >= 1 and --max-length >= 2")
    model = load_model_for_eval(args.model)
    load_hellaswag(args.data, args.limit)  # bad data fails here, before any distributed setup
    d = setup_distributed(args.device or "auto")
    rank, world, device = d.rank, d.world_size, d.device
    max_length = fit_max_length(model, args.max_length, say=print if rank == 0 else None)
    model.to(device)
    with autocast_context(device.type, args.dtype):
        result = evaluate_hellaswag(model, args.data, args.limit, args.batch_size, max_length, device,
                                    rank, world, progress=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return
    result.update(model=args.model, data=args.data or HF_DATASET)
    print(f"hellaswag n={result['n']} max_length={max_length}")
    print(f"  lm-eval  acc      {result['acc']:.4f} ± {result['acc_stderr']:.4f}")
    print(f"  lm-eval  acc_norm {result['acc_norm']:.4f} ± {result['acc_norm_stderr']:.4f}")
    print(f"  llm.c    acc_norm {result['llmc_acc_norm']:.4f}  (raw ctx, mean token loss; llmc_acc "
          f"{result['llmc_acc']:.4f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
