"""scripts/eval_data_checks.py: the n-gram overlap against a plain Python set, the LAMBADA copy count on
hand-made passages, and the whole check on a tiny prepared corpus built from WikiText's own test articles (so
the overlap must be 1.0) and from unrelated text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "scripts"))  # after the top-level modules: a script never shadows one

from eval_data_checks import NGRAM, lambada_target_in_context, ngram_hashes, wikitext_overlap  # noqa: E402

from conftest import SAMPLE_DATA, shared_file  # noqa: E402

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out


def test_ngram_membership_equals_python_sets() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 5, 3000).astype(np.uint16)  # tiny alphabet: many true repeats
    test = np.concatenate([train[100:140], rng.integers(0, 5, 500).astype(np.uint16)])
    grams = lambda t: [tuple(t[i:i + NGRAM]) for i in range(len(t) - NGRAM + 1)]  # noqa: E731
    want = np.array([g in set(grams(train)) for g in grams(test)])
    got = np.isin(ngram_hashes(test), np.unique(ngram_hashes(train)))
    assert want.sum() >= 40 - NGRAM + 1 and (got == want).all()


def test_lambada_target_in_context_counts_whole_words(tmp_path: Path) -> None:
    docs = ["Anna met Bob, and later she thanked Bob",  # copied, despite the comma in the context
            "He took the ball from the basket",  # "basket" never appears before
            "The cat sat. Then the cats left with the cat",  # "cat" as a whole word, not only inside "cats"
            "A catalogue lay by the cat"]  # only "catalogue": a substring, not the word
    f = tmp_path / "lambada.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert lambada_target_in_context(f) == 0.5


def test_cli_on_wikitext_itself_and_unrelated_text(tmp_path: Path, shared_data: Path) -> None:
    raw = shared_data / "wikitext2_raw" / "wiki.test.raw"
    from eval_tasks import wikitext_documents
    from eval_tasks.task_utils import wikitext_detokenizer

    # train = the detokenized WikiText test articles themselves (title kept): every test 13-gram is in train
    pages = [p for p in wikitext_documents(raw.read_text(encoding="utf-8")) if p.strip()]
    src = tmp_path / "self.jsonl"
    src.write_text("".join(json.dumps({"text": wikitext_detokenizer({"page": p})}) + "\n" for p in pages))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name, files in (("self", src), ("other", shared_file("tinyshakespeare.txt"))):
        subprocess.run([sys.executable, "prepare_data.py", "--files", str(files), "--out-dir",
                        str(tmp_path / name), "--num-proc", "1"], cwd=REPO, env=env, check=True,
                       capture_output=True)
    r = subprocess.run([sys.executable, "scripts/eval_data_checks.py", "--data-dir", str(shared_data), "--train",
                        str(tmp_path / "self"), "--corpus", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    # every hellaswag / lambada request fits in 512 tokens: 512 vs 1024 only changes wikitext
    sample = shared_data == SAMPLE_DATA
    assert (50 if sample else 100) < res["longest_request_tokens"]["hellaswag"] <= 512  # 96 in the 200 of the sample
    assert 100 < res["longest_request_tokens"]["lambada_openai"] <= 512
    assert 0.5 < res["lambada_target_in_context"] < 1  # LAMBADA is built around words recalled from context
    assert res["wikitext_vs_train"]["wikitext_test_articles"] == (4 if sample else 62)
    # prepare_data's seeded val split may hold an article back from train, so not quite all of them
    assert res["wikitext_vs_train"]["test_13grams_in_train"] > 0.9
    # the seed's filter: no LAMBADA passage is a 256-token document, nearly every WikiText page is longer than a row
    lengths = res["seed_filter_lengths"]
    assert lengths["lambada_openai"]["at_least_256"] == 0 and lengths["lambada_openai"]["max_tokens"] < 256
    assert lengths["wikitext"]["documents"] == (4 if sample else 62) and lengths["wikitext"]["over_512"] > 0.5
    other = wikitext_overlap(shared_data, tmp_path / "other", None)
    assert other["test_13grams_in_train"] < 0.01 and "shared_titles" not in other
