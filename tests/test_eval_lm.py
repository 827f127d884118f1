"""eval_lm.py's GPTLM (our model inside lm-eval) against lm-eval's own `hf` model on the exported HF folder,
running the same local task variants on real data (LAMBADA, WikiText-2, HellaSwag)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model, save_checkpoint
from conftest import (
    REPO,
    SAMPLE_DATA,
    hide_gpu,
    save_tiny_gpt,  # noqa: E402
    shared_file,
)
from eval_hellaswag import evaluate_hellaswag
from eval_lm import GPTLM, run_tasks
from eval_tasks import wikitext_documents, write_local_tasks
from model import GPT, GPTConfig
from scoring import tok_encode
from tokenizer import get_tokenizer

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return save_tiny_gpt(tmp_path_factory.mktemp("tiny_lm"), seed=4321)


def lm_eval_hf(hf_dir: Path, data_dir: Path, tasks: list[str], limit: int, max_length: int = 512) -> dict:
    """The reference: lm-eval's HF model on the same local task variants."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        names = write_local_tasks(data_dir, tmp, tasks)
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},max_length={max_length},dtype=float32", device="cpu",
            batch_size=16, tasks=[names[t] for t in tasks], limit=limit, bootstrap_iters=0,
            task_manager=TaskManager(include_path=tmp, include_defaults=False))
    return res["results"]


def assert_close(ours: dict, ref: dict, metrics: list[str]) -> None:
    for m in metrics:
        assert ours[f"{m},none"] == pytest.approx(ref[f"{m},none"], rel=1e-4), m


@pytest.mark.slow  # ~30 s on 2 shared cores; still run in CI
def test_lambada_and_wikitext_equal_lm_eval_hf(tiny: dict, shared_data: Path) -> None:
    model = load_model(tiny["ckpt"])
    ours = run_tasks(model, ["lambada_openai"], shared_data, limit=60, bootstrap_iters=0)["results"]
    ref = lm_eval_hf(tiny["hf"], shared_data, ["lambada_openai"], limit=60)
    assert ours["lambada_openai_local"]["sample_len"] == 60
    assert_close(ours["lambada_openai_local"], ref["lambada_openai_local"], ["acc", "perplexity"])

    ours = run_tasks(model, ["wikitext"], shared_data, limit=3, bootstrap_iters=0)["results"]
    ref = lm_eval_hf(tiny["hf"], shared_data, ["wikitext"], limit=3)
    assert_close(ours["wikitext_local"], ref["wikitext_local"], ["word_perplexity", "byte_perplexity", "bits_per_byte"])


def test_lambada_acc_nontrivial_equals_lm_eval_hf(tiny: dict, tmp_path: Path) -> None:
    """Random-init LAMBADA acc is 0 for both; here half the documents end in the word the model itself predicts
    greedily, so acc (all continuation tokens greedy) is exercised on real contexts."""
    model = load_model(tiny["ckpt"]).eval()
    enc = get_tokenizer()
    texts = [json.loads(line)["text"] for line in open(shared_file("lambada_openai_test.jsonl"), encoding="utf-8")]
    docs, n_greedy = [], 0
    for text in texts[:80]:
        context = " ".join(text.split(" ")[:-1])
        with torch.no_grad():
            logits, _ = model(torch.tensor([tok_encode(context)[-511:]]))
        tok = int(logits[0, -1].argmax())
        word = enc.decode([tok])
        if n_greedy < 20 and word.startswith(" ") and len(word.split()) == 1 and tok_encode(word) == [tok]:
            docs.append({"text": context + word})
            n_greedy += 1
        elif len(docs) - n_greedy < 20:
            docs.append({"text": text})
    assert n_greedy >= 10, "the tiny model's greedy tokens are not words; pick another seed"
    (tmp_path / "lambada_openai_test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    ours = run_tasks(model, ["lambada_openai"], tmp_path, bootstrap_iters=0)["results"]["lambada_openai_local"]
    ref = lm_eval_hf(tiny["hf"], tmp_path, ["lambada_openai"], limit=None)["lambada_openai_local"]
    assert 0 < ours["acc,none"] < 1
    assert_close(ours, ref, ["acc", "perplexity"])


def test_hellaswag_through_lm_eval_equals_eval_hellaswag(tiny: dict, shared_data: Path) -> None:
    model = load_model(tiny["ckpt"])
    ours = run_tasks(model, ["hellaswag"], shared_data, limit=40, bootstrap_iters=1)["results"]["hellaswag_local"]
    direct = evaluate_hellaswag(model, shared_data / "hellaswag_val.jsonl", limit=40)
    assert ours["acc,none"] == direct["acc"] and ours["acc_norm,none"] == direct["acc_norm"]
    assert ours["acc_norm_stderr,none"] == pytest.approx(direct["acc_norm_stderr"], rel=1e-9)


def test_wikitext_documents_split_like_the_hub_dataset(shared_data: Path) -> None:
    raw = (shared_data / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = wikitext_documents(raw)
    # 62 = rows in EleutherAI/wikitext_document_level wikitext-2-raw-v1 test; the sample holds the first 4 articles
    assert len(pages) == (4 if shared_data == SAMPLE_DATA else 62)
    assert len(pages) == len(re.findall(r"^ = [^=].* = $", raw, flags=re.M))  # one per top-level title line
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert all(p.lstrip(" \n").startswith("= ") for p in pages)
    joined = "\n".join(pages)  # nothing lost but the blank line before the first title
    assert raw.endswith(joined) and raw[: len(raw) - len(joined)] == " \n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = hide_gpu({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, str(REPO / "eval_lm.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_on_a_variant_hf_cannot_load(tmp_path: Path, shared_data: Path) -> None:
    """A padded-vocab, manual-attention model (not exportable to HF) runs, and the CLI's JSON equals run_tasks."""
    torch.manual_seed(7)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=256, pad_vocab_multiple=64, attention="manual"))
    ckpt = tmp_path / "variant.pt"
    save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, ckpt)
    out = tmp_path / "res.json"
    proc = run_cli(str(ckpt), "--tasks", "lambada_openai", "--data-dir", str(shared_data), "--limit", "8",
                   "--max-length", "256", "--device", "cpu", "--bootstrap-iters", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lambada_openai_local" in proc.stdout and "perplexity" in proc.stdout
    got = json.loads(out.read_text())["results"]["lambada_openai_local"]
    ref = run_tasks(m, ["lambada_openai"], shared_data, max_length=256, limit=8, bootstrap_iters=0)
    ref = ref["results"]["lambada_openai_local"]
    assert got["perplexity,none"] == ref["perplexity,none"] and got["acc,none"] == ref["acc,none"]


def test_bad_input_is_one_line_exit_2(tiny: dict, tmp_path: Path, shared_data: Path) -> None:
    """Each bad input is a UserError naming it (through main(): lm-eval is imported once); the CLI turns one into
    a single `error:` line and exit 2 (errors.run_main, the same for every case)."""
    import eval_lm
    from errors import UserError

    not_ckpt = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, not_ckpt)
    cases = {
        "unknown task": [str(tiny["ckpt"]), "--tasks", "hellaswag,nosuchtask", "--data-dir", str(shared_data)],
        "does not exist": [str(tmp_path / "missing.pt"), "--data-dir", str(shared_data)],
        "not a checkpoint of this project": [str(not_ckpt), "--data-dir", str(shared_data)],
        "unknown lm-eval task": [str(tiny["ckpt"]), "--tasks", "nosuchtask"],
    }
    for expected, args in cases.items():
        with pytest.raises(UserError, match=expected):
            eval_lm.main([*args, "--device", "cpu"])
    proc = run_cli(*cases["unknown lm-eval task"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown lm-eval task" in lines[0], proc.stderr


def test_model_shorter_than_max_length_is_scored_at_its_block_size(tmp_path: Path, shared_data: Path) -> None:
    """A block_size-64 model at the default --max-length 512: one line says so, and the CLI's LAMBADA and WikiText
    numbers equal lm-eval's own `hf` model at max_length 64 (WikiText's rolling windows are then 64 tokens)."""
    from hf import export_hf_gpt2

    torch.manual_seed(64)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, tmp_path / "ckpt.pt")
    export_hf_gpt2(m, tmp_path / "hf")
    out = tmp_path / "res.json"
    proc = run_cli(str(tmp_path / "ckpt.pt"), "--tasks", "lambada_openai,wikitext", "--data-dir", str(shared_data),
                   "--limit", "3", "--device", "cpu", "--bootstrap-iters", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = "max_length 512 exceeds the model's block_size 64: scoring with max_length 64"
    assert proc.stdout.count(note) == 1 and "max_length=64" in proc.stdout, proc.stdout
    got = json.loads(out.read_text())
    assert got["max_length"] == 64
    ref = lm_eval_hf(tmp_path / "hf", shared_data, ["lambada_openai", "wikitext"], limit=3, max_length=64)
    assert_close(got["results"]["lambada_openai_local"], ref["lambada_openai_local"], ["acc", "perplexity"])
    assert_close(got["results"]["wikitext_local"], ref["wikitext_local"], ["word_perplexity", "bits_per_byte"])
    assert GPTLM(m, max_length=512).max_length == 64  # the library caps silently
