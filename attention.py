"""Attention kernels: the same causal (optionally document-masked) softmax attention, computed by different code.

Each kernel has `mask(doc_ids, T, device)`, run once per forward pass (doc_ids is None without doc_mask), and
`attend(q, k, v, mask, dropout_p)` on q, k, v of shape (B, H, T, head_size), given what `mask` returned.
model.CausalSelfAttention picks one by name from ATTENTION_KERNELS (GPTConfig.attention).

Document masking: training rows are packed from many documents, each preceded by the EOT token (docs/design.md
"Formats"). With doc_mask a token attends only to earlier tokens of its own document and positions restart at 0
at every EOT, so a document's logits do not depend on what was packed before it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from errors import UserError

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5: attention="flex" is refused when used
    create_block_mask = flex_attention = None


def document_positions(idx: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows idx (B, T) where every document starts with EOT: the document id of each token
    (0 for the tail of a document begun in an earlier row) and its position inside its document."""
    T = idx.size(1)
    doc_ids = (idx == eot_id).cumsum(dim=1)
    t = torch.arange(T, device=idx.device).expand_as(idx)
    starts = torch.where(idx == eot_id, t, torch.zeros_like(t))
    return doc_ids, t - starts.cummax(dim=1).values


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean, True where query t may attend to key s: s <= t and both in the same document."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def dense_mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """The mask of the dense kernels: None (plain causal) without doc_mask, else the document-causal mask."""
    return None if doc_ids is None else document_causal_mask(doc_ids)


class SDPAKernel:
    """PyTorch's fused kernels (flash / memory-efficient / math). With doc_mask, a dense boolean mask: always
    works, but costs T x T memory per row and rules out the flash kernel."""

    mask = staticmethod(dense_mask)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


class ManualKernel:
    """The textbook formula, softmax(QK^T / sqrt(d) + mask) V: a readable reference."""

    mask = staticmethod(dense_mask)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        T = q.size(-2)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return F.dropout(att, p=dropout_p, training=dropout_p > 0) @ v


@functools.cache
def compiled_flex() -> tuple[Callable, Callable]:
    """flex_attention and create_block_mask wrapped by torch.compile, built once (the wrappers compile on their
    first call). Shapes are left to torch.compile's automatic dynamic mode: a second (B, T) recompiles once with
    symbolic sizes instead of once per shape."""
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def flex_functions(device: torch.device) -> tuple[Callable, Callable]:
    """(flex_attention, create_block_mask) to call for tensors on `device`. On GPU the compiled ones: uncompiled
    flex_attention materializes the full score matrix. Inside a model that is itself being compiled, the plain
    ones, which are compiled with it (so no compiled function is created or looked up while tracing). On CPU the
    plain ones: compiling them there is slow and buys nothing for evaluation."""
    if flex_attention is None:
        raise UserError(f"attention='flex' needs torch >= 2.5 (this is {torch.__version__}); use attention='sdpa'")
    if device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention, create_block_mask
    return compiled_flex()


class FlexKernel:
    """torch.nn.attention.flex_attention (torch >= 2.5) with a block-sparse mask: blocks that are entirely
    masked (other documents, the future) are skipped. Compiled on GPU, where it is fast. On CPU it runs
    uncompiled and forward only (PyTorch has no CPU backward for it): usable for evaluation, not training."""

    @staticmethod
    def mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> object:
        def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return q_idx >= kv_idx

        def same_document_causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                                 kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        _, block_mask = flex_functions(torch.device(device))
        if doc_ids is None:
            return block_mask(causal, None, None, T, T, device=device)
        return block_mask(same_document_causal, doc_ids.size(0), None, T, T, device=doc_ids.device)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, dropout_p: float) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise UserError("attention='flex' cannot train on CPU (PyTorch has no CPU backward for "
                            "flex_attention); use attention='sdpa'")
        # Under autocast, v comes from a bf16/fp16 matmul while qk_norm's RMSNorm (and CUDA's fp32 LayerNorm) hand
        # back fp32 q and k; flex_attention needs one dtype. v's is the one SDPA's autocast rule would compute in.
        attend, _ = flex_functions(q.device)
        return attend(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask)


class FlashAttnKernel:
    """Tri Dao's flash-attn package (CUDA, computes in fp16/bf16). With doc_mask the packed rows are cut into
    their documents and passed as one variable-length batch to flash_attn_varlen_func: no mask is built and
    no work is spent across documents."""

    @staticmethod
    def mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> tuple[torch.Tensor, int] | None:
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise UserError("attention='flash_attn' needs the flash-attn package and a CUDA GPU "
                            "(pip install flash-attn); use attention='sdpa'") from e
        if doc_ids is None:
            return None
        starts = torch.ones_like(doc_ids, dtype=torch.bool)  # a new sequence at each row start and each document
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        ends = torch.tensor([doc_ids.numel()], device=doc_ids.device)
        cu_seqlens = torch.cat((starts.flatten().nonzero().flatten(), ends)).to(torch.int32)
        # max_seqlen only sizes flash-attn's grid: the row length T bounds every document, exactly and without
        # reading the longest document's length back to the host.
        return cu_seqlens, T

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: tuple[torch.Tensor, int] | None,
               dropout_p: float) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        (B, H, T, hd), out_dtype = q.shape, q.dtype
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # flash-attn's layout: (B, T, H, hd)
        if mask is None:
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        else:
            cu_seqlens, max_len = mask
            q, k, v = (t.reshape(B * T, H, hd) for t in (q, k, v))
            y = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p,
                                       causal=True).view(B, T, H, hd)
        return y.transpose(1, 2).to(out_dtype)


ATTENTION_KERNELS = {"sdpa": SDPAKernel, "manual": ManualKernel, "flex": FlexKernel, "flash_attn": FlashAttnKernel}
