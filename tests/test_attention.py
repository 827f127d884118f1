"""The attention kernels of attention.py against references nobody here wrote: PyTorch's SDPA (its math and flash
backends) and the textbook formula, and, for the GPU-only kernels, their documented contracts run on CPU.

Document masking's kernels are also compared in test_ablations.py (every kernel against the dense mask)."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import attention
from attention import ATTENTION_KERNELS
from model import GPT, GPTConfig

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.cuda  # skipped without a GPU (conftest.py)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
EOT = 256
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, eot_id=EOT)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair(reference: dict, **overrides: object) -> tuple[GPT, GPT]:
    """Two models with the same weights, the second with `overrides` (another kernel)."""
    torch.manual_seed(0)
    a = GPT(GPTConfig(**TINY, **reference)).eval()
    b = GPT(GPTConfig(**TINY, **{**reference, **overrides})).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def packed_rows(B: int = 3, T: int = 48) -> torch.Tensor:
    """Random tokens with documents starting mid-row, at t=0, and none at all (row 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, EOT, (B, T), generator=g)
    x[0, [7, 30]] = EOT
    x[1, [0, 41]] = EOT
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_matches_manual_attention(device: str) -> None:
    manual, sdpa = pair(dict(attention="manual"), attention="sdpa")
    manual, sdpa = manual.to(device), sdpa.to(device)
    x = packed_rows().to(device)
    y = x.roll(-1, dims=1)
    with torch.no_grad():
        (lm, loss_m), (ls, loss_s) = manual(x, y), sdpa(x, y)
    torch.testing.assert_close(ls, lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_flash_backend_matches_manual_fp32(device: str) -> None:
    """SDPA restricted to its flash backend (bf16) against the textbook formula in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    B, H, T, D = 2, 4, 256, 64
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    ref = ATTENTION_KERNELS["manual"].attend(q, k, v, None, 0.0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = ATTENTION_KERNELS["sdpa"].attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------
# flash-attn


def _flash_attn_stand_in() -> types.ModuleType:
    """flash_attn's two functions as documented (layout (B, T, H, hd), or (total, H, hd) with cumulative sequence
    starts cu_seqlens, causal within each sequence), computed by SDPA one sequence at a time; records calls."""
    calls: list[dict] = []

    def sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                             is_causal=True)
        return out.transpose(-3, -2)

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):  # noqa: ANN001, ANN202
        assert causal and q.dtype in (torch.float16, torch.bfloat16)
        return sdpa_bthd(q, k, v)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,  # noqa: ANN001, ANN202
                               causal=False):
        assert causal and q.dtype in (torch.float16, torch.bfloat16) and cu_seqlens_q.dtype == torch.int32
        calls.append(dict(cu_seqlens=cu_seqlens_q.tolist(), max_seqlen=(max_seqlen_q, max_seqlen_k)))
        out = torch.empty_like(q)
        bounds = cu_seqlens_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.size(0)
        for s, e in zip(bounds[:-1], bounds[1:]):
            assert e - s <= max_seqlen_q
            out[s:e] = sdpa_bthd(q[s:e][None], k[s:e][None], v[s:e][None])[0]
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func, module.calls = flash_attn_func, flash_attn_varlen_func, calls
    return module


@pytest.mark.parametrize("doc_mask", [False, True])
def test_flash_attn_kernel_against_sdpa_with_a_stand_in_package(doc_mask: bool, monkeypatch) -> None:
    """The flash_attn kernel's own logic (layouts, dtypes, cutting packed rows into documents, max_seqlen) on CPU:
    the package replaced by its documented contract, the model compared with SDPA's dense document mask."""
    stand_in = _flash_attn_stand_in()
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    sdpa, flash = pair(dict(doc_mask=doc_mask, pos="rope"), attention="flash_attn")
    x = packed_rows()
    x[2, 20] = EOT  # no document fills a row: max_seqlen=T is then more than the longest, and still exact
    with torch.no_grad():
        ref, out = sdpa(x)[0], flash(x)[0]
    assert out.dtype == ref.dtype == torch.float32  # computed in bf16, handed back in the input's dtype
    assert (out - ref).abs().max() < 3e-2  # bf16
    if doc_mask:
        B, T = x.shape
        starts = sorted({r * T for r in range(B)} | {r * T + t for r, t in (x == EOT).nonzero().tolist()})
        assert stand_in.calls[0] == dict(cu_seqlens=[*starts, B * T], max_seqlen=(T, T))
    assert len(stand_in.calls) == (TINY["n_layer"] if doc_mask else 0)


@needs_cuda
def test_flash_attn_package_matches_manual() -> None:
    pytest.importorskip("flash_attn")
    manual, flash = pair(dict(attention="manual", n_embd=128, doc_mask=True), attention="flash_attn")
    manual, flash = manual.cuda(), flash.cuda()
    x = packed_rows().cuda()
    y = x.roll(-1, dims=1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss_flash = flash(x, y)[1]
    torch.testing.assert_close(loss_flash, manual(x, y)[1], rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# flex_attention

needs_flex = pytest.mark.skipif(attention.flex_attention is None, reason="flex_attention needs torch >= 2.5")


@needs_flex
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_flex_under_autocast_with_qk_norm_matches_sdpa(norm: str, monkeypatch) -> None:
    """Under bf16 autocast, qk_norm's RMSNorm (and LayerNorm on CUDA) hands back fp32 q and k beside a bf16 v:
    the flex kernel must give flex_attention one dtype, v's, as SDPA's autocast rule computes in."""
    seen = []
    real = attention.flex_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention, "flex_attention", spy)
    sdpa, flex = pair(dict(qk_norm=True, norm=norm, pos="rope", doc_mask=True), attention="flex")
    x = packed_rows()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile": expected on CPU
        ref, out = sdpa(x)[0].float(), flex(x)[0].float()
    assert seen == [(torch.bfloat16,) * 3] * TINY["n_layer"]
    assert (out - ref).abs().max() < 3e-2  # bf16


@needs_flex
def test_flex_compiled_functions_are_built_once_and_only_outside_tracing(monkeypatch) -> None:
    """On GPU, flex_attention and create_block_mask run compiled, from wrappers built once (so torch.compile's
    cache is reused, and a compiled model does not guard on a global that the first call sets); inside a model
    being compiled, the plain functions, compiled with it. Building a wrapper compiles nothing."""
    compiled = attention.compiled_flex()
    assert attention.compiled_flex() is compiled
    assert [f._torchdynamo_orig_callable for f in compiled] == [attention.flex_attention, attention.create_block_mask]
    assert attention.flex_functions(torch.device("cuda")) is compiled
    assert attention.flex_functions(torch.device("cpu")) == (attention.flex_attention, attention.create_block_mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention.flex_functions(torch.device("cuda")) == (attention.flex_attention, attention.create_block_mask)
