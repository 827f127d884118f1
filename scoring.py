"""Log-likelihood scoring exactly as lm-eval's `hf` model computes it (HFLM._loglikelihood_tokens), for the
evaluation scripts (eval_hellaswag.py, eval_lm.py) and train.py's in-loop HellaSwag: one implementation, tested
against lm-eval's own `hf` model in tests/test_scoring.py.

    encode_pair(context, continuation) -> (context tokens, continuation tokens), split as lm-eval splits them
    score_batch(model, requests, max_length, device) -> [(sum of continuation log-probs, is greedy), ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from errors import UserError
from tokenizer import get_tokenizer


def tok_encode(text: str) -> list[int]:
    """GPT-2 tokens of `text`. '<|endoftext|>' in the text becomes the special token, as with the HF tokenizer."""
    return get_tokenizer().encode(text, allowed_special="all")


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model: trailing spaces of the context move to the
    continuation, the two are tokenized together, and the continuation is what follows the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok_encode(context + continuation)
    context_enc = tok_encode(context)
    return context_enc, whole[len(context_enc) :]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT under DDP / torch.compile wrappers (evaluation does not need them)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def fit_max_length(model: torch.nn.Module, max_length: int, say: Callable[[str], object] | None = None) -> int:
    """max_length, or the model's block_size (the longest input it takes) where that is smaller; `say` gets one
    line saying so (the CLIs print it; the library functions cap silently)."""
    block_size = getattr(getattr(unwrap(model), "config", None), "block_size", max_length)
    if max_length <= block_size:
        return max_length
    if say is not None:
        say(f"max_length {max_length} exceeds the model's block_size {block_size}: scoring with max_length "
            f"{block_size}")
    return block_size


@torch.no_grad()
def score_batch(
    model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
    device: torch.device | str, greedy: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation tokens, whether each one is the argmax) for each
    (context_tokens, continuation_tokens) request, all in one forward pass.

    As in lm-eval: the input is context + continuation minus its last token, cut from the left to
    max_length; rows are right-padded (harmless under causal attention); log-softmax in fp32."""
    inps, cont_lens = [], []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError(f"empty context or continuation ({len(ctx)} / {len(cont)} tokens)")
        if len(cont) > max_length:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit max_length {max_length}")
        inps.append((ctx + cont)[-(max_length + 1) :][:-1])
        cont_lens.append(len(cont))
    width = max(len(x) for x in inps)
    batch = torch.zeros((len(inps), width), dtype=torch.long)
    # Positions whose next-token distribution is scored: the last len(cont) of each row's input.
    positions = torch.zeros((len(inps), max(cont_lens)), dtype=torch.long)
    for i, (x, contlen) in enumerate(zip(inps, cont_lens)):
        batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        positions[i, :contlen] = torch.arange(len(x) - contlen, len(x))
    positions = positions.to(device)

    def project_scored_positions_only(module: torch.nn.Module, args: tuple) -> tuple:
        # The (rows x T x 50257) logits tensor dominates evaluation time and memory; the head is applied
        # per position, so projecting only the scored positions gives the same numbers.
        (x,) = args
        return (x.gather(1, positions[..., None].expand(-1, -1, x.size(-1))),)

    head = getattr(model, "lm_head", None)
    hook = head.register_forward_pre_hook(project_scored_positions_only) if head is not None else None
    try:
        logits, _ = model(batch.to(device))
    finally:
        if hook is not None:
            hook.remove()
    out = []
    for i, contlen in enumerate(cont_lens):
        scored = logits[i, :contlen] if hook is not None else logits[i, len(inps[i]) - contlen : len(inps[i])]
        logprobs = F.log_softmax(scored, dim=-1, dtype=torch.float32)
        target = torch.tensor(requests[i][1], dtype=torch.long, device=logprobs.device)
        is_greedy = greedy and bool((logprobs.argmax(dim=-1) == target).all())
        out.append((float(logprobs.gather(-1, target[:, None]).sum()), is_greedy))
    return out


def load_model_for_eval(path: str) -> torch.nn.Module:
    """Our checkpoint file, or an HF GPT-2 folder (or hub name): one line + exit 2 when it is neither."""
    from checkpoint import load_model

    looks_like_path = path.endswith((".pt", ".pth", ".bin")) or os.sep in path or path.startswith(".")
    if looks_like_path and not Path(path).exists():
        raise UserError(f"checkpoint {path} does not exist")
    return load_model(path)
