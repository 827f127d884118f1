"""eval_hellaswag.py against references nobody here wrote: lm-eval's own `hf` model running its hellaswag task
(same local data), transformers' GPT2LMHeadModel for llm.c's completion-style metric and for truncation, and a
single-process run for torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from conftest import (
    REPO,
    hide_gpu,
    save_tiny_gpt,  # noqa: E402
    shared_file,
)
from errors import UserError
from eval_hellaswag import evaluate_hellaswag, load_examples
from eval_tasks import write_local_tasks
from scoring import encode_pair, tok_encode

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random-init tiny GPT saved both as our checkpoint and as an HF folder."""
    return save_tiny_gpt(tmp_path_factory.mktemp("tiny"), seed=1234)


def lm_eval_hf(hf_dir: Path, tmp: Path, max_length: int, limit: int) -> dict:
    """lm-eval's hellaswag (local-data variant) with lm-eval's own HF model; per-document samples sorted."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_local_tasks(shared_file("hellaswag_val.jsonl").parent, tmp, ["hellaswag"])
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},max_length={max_length},dtype=float32", device="cpu",
        batch_size=32, tasks=["hellaswag_local"], limit=limit,
        task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
        bootstrap_iters=1,  # >0 so the closed-form stderr of the mean is reported
        log_samples=True)
    samples = sorted(res["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    return {"results": res["results"]["hellaswag_local"], "samples": samples}


def first_argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@pytest.mark.slow  # ~15 s on 2 shared cores; still run in CI
def test_equals_lm_eval_hf_on_100_examples(tiny: dict, tmp_path: Path) -> None:
    data = shared_file("hellaswag_val.jsonl")
    ours = evaluate_hellaswag(load_model(tiny["ckpt"]), data, limit=100, batch_size=4, return_examples=True)
    ref = lm_eval_hf(tiny["hf"], tmp_path, max_length=512, limit=100)
    assert ours["n"] == len(ref["samples"]) == 100
    docs = load_examples(data, 100)
    for ex, s, doc in zip(ours["examples"], ref["samples"], docs):
        ref_lls = [r[0] for r in s["filtered_resps"]]
        assert ex["lls"] == pytest.approx(ref_lls, rel=1e-5)
        choices = s["doc"]["choices"]
        assert ex["pred"] == first_argmax(ref_lls)
        assert ex["pred_norm"] == first_argmax([ll / len(c) for ll, c in zip(ref_lls, choices)])
        assert float(ex["pred"] == doc["label"]) == s["acc"] and float(ex["pred_norm"] == doc["label"]) == s["acc_norm"]
    r = ref["results"]
    assert ours["acc"] == r["acc,none"] and ours["acc_norm"] == r["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(r["acc_stderr,none"], rel=1e-9)
    assert ours["acc_norm_stderr"] == pytest.approx(r["acc_norm_stderr,none"], rel=1e-9)
    assert len({ex["pred_norm"] for ex in ours["examples"]}) > 1  # not a degenerate constant answer


def test_truncation_matches_lm_eval(tiny: dict, tmp_path: Path) -> None:
    data, L = shared_file("hellaswag_val.jsonl"), 40
    model = load_model(tiny["ckpt"])
    ours = evaluate_hellaswag(model, data, limit=30, max_length=L, return_examples=True)
    ref = lm_eval_hf(tiny["hf"], tmp_path, max_length=L, limit=30)
    truncated = []  # requests longer than L + 1 (tests/test_scoring.py checks what scoring them means)
    for ex, s in zip(ours["examples"], ref["samples"]):
        assert ex["lls"] == pytest.approx([r[0] for r in s["filtered_resps"]], rel=1e-5)
        for choice, ll in zip(s["doc"]["choices"], ex["lls"]):
            ctx, cont = encode_pair(s["doc"]["query"], " " + choice)
            if len(ctx) + len(cont) > L + 1:
                truncated.append((ctx, cont, ll))
    assert len(truncated) >= 20  # the test really exercises truncation
    assert ours["acc"] == ref["results"]["acc,none"] and ours["acc_norm"] == ref["results"]["acc_norm,none"]


def test_llmc_metric_equals_llm_c_reference(tiny: dict) -> None:
    """llm.c's dev/data/hellaswag.py algorithm (raw ctx, masked mean loss) run on transformers' model."""
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    data = shared_file("hellaswag_val.jsonl")
    hf = GPT2LMHeadModel.from_pretrained(tiny["hf"]).eval()
    n_norm = n_sum = 0
    docs = load_examples(data, 40)
    for doc in docs:
        ctx = tok_encode(doc["ctx"])
        rows = [ctx + tok_encode(" " + e) for e in doc["endings"]]
        tokens = torch.zeros((4, max(map(len, rows))), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, len(ctx) : len(r)] = 1
        with torch.no_grad():
            logits = hf(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        m = mask[:, 1:]
        sum_loss = (losses * m).sum(1)
        n_sum += int(sum_loss.argmin()) == doc["label"]
        n_norm += int((sum_loss / m.sum(1)).argmin()) == doc["label"]
    ours = evaluate_hellaswag(load_model(tiny["ckpt"]), data, limit=40, batch_size=8)
    assert ours["llmc_acc_norm"] == n_norm / 40 and ours["llmc_acc"] == n_sum / 40


def test_training_hook_keeps_mode_and_ignores_batch_size(tiny: dict) -> None:
    data = shared_file("hellaswag_val.jsonl")
    model = load_model(tiny["ckpt"])
    model.train()
    a = evaluate_hellaswag(model, data, limit=24, batch_size=1)
    assert model.training  # restored for the training loop
    b = evaluate_hellaswag(model, data, limit=24, batch_size=24)
    assert a == b and a["n"] == 24


def test_torchrun_two_ranks_equal_single_process(tiny: dict, tmp_path: Path) -> None:
    data = shared_file("hellaswag_val.jsonl")
    single = evaluate_hellaswag(load_model(tiny["ckpt"]), data, limit=37)
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "eval_hellaswag.py"), str(tiny["ckpt"]), "--data", str(data), "--limit", "37",
           "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    for k in ("n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "llmc_acc", "llmc_acc_norm"):
        assert got[k] == single[k], k
    assert "lm-eval  acc_norm" in proc.stdout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = hide_gpu({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, str(REPO / "eval_hellaswag.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_bad_input_is_one_line_exit_2(tiny: dict, tmp_path: Path) -> None:
    data = shared_file("hellaswag_val.jsonl")
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    cases = {
        "does not exist": [str(tmp_path / "missing.pt"), "--data", str(data)],
        "not a readable checkpoint": [str(not_ckpt), "--data", str(data)],
        "lacks field(s)": [str(tiny["ckpt"]), "--data", str(bad_data)],
        "HellaSwag data file": [str(tiny["ckpt"]), "--data", str(tmp_path / "nope.jsonl")],
    }
    for expected, args in cases.items():
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr


def test_hub_dataset_offline_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--data"):
        load_examples(None)


def test_cli_prints_and_writes_json(tiny: dict, tmp_path: Path) -> None:
    data = shared_file("hellaswag_val.jsonl")
    out = tmp_path / "hs.json"
    proc = run_cli(str(tiny["hf"]), "--data", str(data), "--limit", "12", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    ref = evaluate_hellaswag(load_model(tiny["ckpt"]), data, limit=12)
    assert {k: got[k] for k in ref} == ref
    assert not math.isnan(got["acc_stderr"])


def test_model_shorter_than_max_length_is_scored_at_its_block_size(tmp_path: Path) -> None:
    """A block_size-64 model at the default --max-length 512: one line says so and the CLI scores at 64, equal to
    lm-eval's own `hf` model at max_length 64 (the requests are longer than 64 tokens, so the cut matters)."""
    from checkpoint import save_checkpoint
    from hf import export_hf_gpt2
    from model import GPT, GPTConfig

    torch.manual_seed(64)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, tmp_path / "ckpt.pt")
    export_hf_gpt2(m, tmp_path / "hf")
    data, out = shared_file("hellaswag_val.jsonl"), tmp_path / "hs.json"
    proc = run_cli(str(tmp_path / "ckpt.pt"), "--data", str(data), "--limit", "40", "--device", "cpu",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    note = "max_length 512 exceeds the model's block_size 64: scoring with max_length 64"
    assert proc.stdout.count(note) == 1 and "hellaswag n=40 max_length=64" in proc.stdout, proc.stdout
    got = json.loads(out.read_text())
    ref = lm_eval_hf(tmp_path / "hf", tmp_path / "tasks", max_length=64, limit=40)
    assert got["max_length"] == 64 and got["n"] == len(ref["samples"]) == 40
    assert got["acc"] == ref["results"]["acc,none"] and got["acc_norm"] == ref["results"]["acc_norm,none"]
    pairs = [encode_pair(s["doc"]["query"], " " + c) for s in ref["samples"] for c in s["doc"]["choices"]]
    assert max(len(ctx) + len(cont) for ctx, cont in pairs) > 65
    # the library caps silently: the training hook's default max_length works on this model too
    assert evaluate_hellaswag(m, data, limit=40) == {k: got[k] for k in got if k not in ("model", "data")}
