"""lm-eval's harness (hellaswag, lambada_openai, wikitext) on our checkpoints, any architecture variant.

    python eval_lm.py out/run/ckpt.pt --tasks hellaswag,lambada_openai,wikitext --max-length 512
    python eval_lm.py out/run/ckpt.pt --data-dir <mirror>       # offline: local copies of the data

`GPTLM` is a small lm_eval TemplateLM around our GPT. It scores exactly like lm-eval's own `hf` model:
context/continuation split by TemplateLM, inputs cut to the last max_length tokens, rolling windows for
perplexity tasks (loglikelihood_rolling) over the model's context window, fp32 log-softmax.
With --data-dir, the tasks are the local variants in eval_tasks/ (official prompts, metrics and
preprocessing; only the data source differs); without it, lm-eval's standard tasks (needs the hub).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM

from common import autocast_context
from errors import ArgumentParser, UserError, run_main
from scoring import fit_max_length, load_model_for_eval, score_batch, tok_encode, unwrap
from tokenizer import EOT, get_tokenizer

DEFAULT_TASKS = "hellaswag,lambada_openai,wikitext"


class GPTLM(TemplateLM):
    """lm_eval model wrapping a GPT already on `device`. batch_size counts rows per forward pass; max_length is
    capped at the model's block_size."""

    def __init__(self, model: torch.nn.Module, max_length: int = 512, batch_size: int = 16,
                 device: str | torch.device | None = None, dtype: str = "float32") -> None:
        super().__init__()
        self.model = unwrap(model)
        self._device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self._max_length = fit_max_length(self.model, max_length)
        self.batch_size = batch_size
        self.dtype = dtype
        self.model.eval()

    @property
    def eot_token_id(self) -> int:
        return EOT

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return tok_encode(string)  # GPT-2 adds no BOS/EOS, so add_special_tokens changes nothing

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return get_tokenizer().decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context_tokens, continuation_tokens).
        Longest first, like lm-eval (less padding; results return in request order)."""
        from tqdm import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                with autocast_context(self._device.type, self.dtype):
                    scores = score_batch(self.model, [(requests[i][1], requests[i][2]) for i in idx],
                                         self._max_length, self._device)
                for i, s in zip(idx, scores):
                    results[i] = s
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], s)
                bar.update(len(idx))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string, scored in disjoint windows of max_length tokens that
        each predict new tokens only (the first conditioned on EOT), as lm-eval's HFLM does."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=EOT, max_seq_len=self._max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise UserError("generation tasks are not supported by eval_lm.py (loglikelihood tasks only)")


def run_tasks(model: torch.nn.Module, tasks: list[str], data_dir: str | Path | None = None, max_length: int = 512,
              batch_size: int = 16, limit: int | float | None = None, device: str | torch.device | None = None,
              dtype: str = "float32", bootstrap_iters: int = 100000, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `model` through GPTLM; `tasks` are standard names. With data_dir, the local
    variants (named <task>_local in the results) read files under data_dir."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = GPTLM(model, max_length=max_length, batch_size=batch_size, device=device, dtype=dtype)
    with contextlib.ExitStack() as stack:
        if data_dir is not None:
            from eval_tasks import write_local_tasks

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="eval_tasks_"))
            names = write_local_tasks(data_dir, tmp, tasks)
            # the local tasks are self-contained; indexing all built-in tasks would cost ~10 s
            task_manager = TaskManager(include_path=tmp, include_defaults=False)
            task_names = [names[t] for t in tasks]
        else:
            task_manager = TaskManager()
            unknown = [t for t in tasks if t not in task_manager.all_tasks]
            if unknown:
                raise UserError(f"unknown lm-eval task(s) {unknown}; e.g. {DEFAULT_TASKS}")
            task_names = tasks
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=task_manager, limit=limit,
                                           bootstrap_iters=bootstrap_iters, log_samples=log_samples)
        except ConnectionError as e:  # hub datasets offline
            raise UserError(f"could not fetch task data ({e}); offline, pass --data-dir with local copies "
                            "(tests/data has samples)") from e


def sample_metrics(results: dict) -> dict[str, list[dict]]:
    """Each task's per-document metric values from simple_evaluate(log_samples=True), without the documents'
    text: {task: [{"doc_id": i, metric: value, ...}]}."""
    return {task: [{"doc_id": s["doc_id"], **{m: s[m] for m in s["metrics"]}} for s in samples]
            for task, samples in results.get("samples", {}).items()}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="lm-eval's harness (hellaswag, lambada_openai, wikitext) on our checkpoints, any "
                       "architecture variant.")
    p.add_argument("model", help="our checkpoint file (ckpt.pt) or a Hugging Face GPT-2 folder")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated lm-eval tasks (default {DEFAULT_TASKS})")
    p.add_argument("--max-length", type=int, default=512, help="context window used for scoring (default 512; "
                   "capped at the model's block_size)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--limit", type=float, help="only the first N documents of each task (or a fraction < 1)")
    p.add_argument("--data-dir", help="offline: local task variants reading hellaswag_val.jsonl, "
                                      "lambada_openai_test.jsonl, wikitext2_raw/wiki.test.raw from here")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's stderr bootstrap (0: none)")
    p.add_argument("--out", help="also write lm-eval's results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="with --out: also write each document's metric "
                   "values (e.g. wikitext's per-page loglikelihood and word count, for a stderr over pages)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty")
    if args.data_dir is not None:
        from eval_tasks import LOCAL_TASKS

        unknown = [t for t in tasks if t not in LOCAL_TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {unknown}; with --data-dir choose from {sorted(LOCAL_TASKS)}")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if limit is not None and limit <= 0:
        raise UserError("--limit must be > 0")
    model = load_model_for_eval(args.model)
    max_length = fit_max_length(model, args.max_length, say=print)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    results = run_tasks(model, tasks, args.data_dir, max_length, args.batch_size, limit, device, args.dtype,
                        args.bootstrap_iters, log_samples=args.log_samples)
    from lm_eval.utils import handle_non_serializable, make_table

    print(f"{args.model}  max_length={max_length}  limit={limit}")
    print(make_table(results))
    if args.out:
        out = {"model": args.model, "max_length": max_length, "limit": limit, "tasks": tasks,
               "results": results["results"], "n-samples": results.get("n-samples"),
               "versions": results.get("versions")}
        if args.log_samples:
            out["samples"] = sample_metrics(results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=handle_non_serializable) + "\n")


if __name__ == "__main__":
    run_main(main)
