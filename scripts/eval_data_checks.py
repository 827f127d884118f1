"""Four facts about the evaluation data that docs/reproduction_cpu.md and docs/seed_pipeline.md rely on, printed
as one JSON object.


1. request lengths: the longest hellaswag (context + ending) and lambada_openai request in GPT-2 tokens, as
   lm-eval builds them (hellaswag through lm-eval's own process_docs). If both fit in 512 tokens, scoring at
   max_length 512 and 1024 gives identical numbers for them and only wikitext can change.
2. wikitext contamination: which WikiText-2 test articles share a title with a training article, and what
   fraction of the test set's 13-token n-grams (GPT-3's contamination unit) occur anywhere in the train split.
3. lambada copying: the fraction of lambada_openai target words (the passage's last word) that already occur
   as a word in the passage before it, i.e. how much of the task a model can solve by copying from context.
4. document lengths against the seed's length filter: how many lambada passages and wikitext pages have at
   least 256 GPT-2 tokens (the seed dropped shorter training rows) and more than 512 (its row length).

    python scripts/eval_data_checks.py --data-dir <mirror> --train data/wiki
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data import open_split  # noqa: E402
from errors import ArgumentParser, UserError, run_main  # noqa: E402
from eval_hellaswag import load_examples  # noqa: E402
from eval_tasks import wikitext_documents  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

NGRAM = 13


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} does not exist (check --data-dir)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def longest_requests(data_dir: Path) -> dict[str, int]:
    """Longest request (context + continuation) in tokens for hellaswag and lambada_openai."""
    import datasets

    from eval_tasks.task_utils import hellaswag_process_docs

    enc = get_tokenizer()
    docs = hellaswag_process_docs(datasets.Dataset.from_list(load_examples(data_dir / "hellaswag_val.jsonl")))
    hellaswag = max(len(enc.encode_ordinary(d["query"] + " " + c)) for d in docs for c in d["choices"])
    lambada = max(len(enc.encode_ordinary(d["text"])) for d in read_jsonl(data_dir / "lambada_openai_test.jsonl"))
    return {"hellaswag": hellaswag, "lambada_openai": lambada}


def lambada_target_in_context(path: Path) -> float:
    """Fraction of passages whose last word also occurs as a whole word (case-sensitive) earlier in it."""
    docs = read_jsonl(path)
    hits = 0
    for d in docs:
        context, target = d["text"].rsplit(" ", 1)
        hits += target in set(re.findall(r"[\w']+", context))
    return round(hits / len(docs), 4)


def seed_filter_lengths(data_dir: Path, min_tokens: int = 256, row: int = 512) -> dict[str, dict]:
    """Token counts of the lambada_openai passages and wikitext test pages: how many the seed's filter would
    keep as training documents (>= min_tokens) and how many are longer than one of its rows."""
    enc = get_tokenizer()
    wiki = data_dir / "wikitext2_raw" / "wiki.test.raw"
    if not wiki.is_file():
        raise UserError(f"{wiki} does not exist (check --data-dir)")
    docs = {"lambada_openai": [d["text"] for d in read_jsonl(data_dir / "lambada_openai_test.jsonl")],
            "wikitext": wikitext_documents(wiki.read_text(encoding="utf-8"))}
    out = {}
    for name, texts in docs.items():
        n = np.array([len(enc.encode_ordinary(t)) for t in texts])
        out[name] = {"documents": len(n), "median_tokens": int(np.median(n)), "max_tokens": int(n.max()),
                     f"at_least_{min_tokens}": round(float(np.mean(n >= min_tokens)), 4),
                     f"over_{row}": round(float(np.mean(n > row)), 4)}
    return out


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """A 64-bit polynomial hash of every n-token window (wrapping uint64 arithmetic; collisions ~2^-64)."""
    t = tokens.astype(np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    base = np.uint64(1_000_003)
    for i in range(n):
        h = h * base + t[i:len(t) - n + 1 + i]
    return h


def wikitext_overlap(data_dir: Path, train_dir: Path, corpus_dir: Path | None) -> dict:
    from eval_tasks.task_utils import wikitext_detokenizer

    raw = data_dir / "wikitext2_raw" / "wiki.test.raw"
    if not raw.is_file():
        raise UserError(f"{raw} does not exist (check --data-dir)")
    pages = [p for p in wikitext_documents(raw.read_text(encoding="utf-8")) if p.strip()]
    titles = [p.strip().split("\n")[0].strip(" =") for p in pages]
    out: dict = {"wikitext_test_articles": len(pages)}
    if corpus_dir is not None:
        corpus_titles = set()
        for f in sorted(corpus_dir.rglob("wiki_*")):
            corpus_titles.update(re.findall(r'<doc [^>]*title="([^"]*)"', f.read_text(encoding="utf-8")))
        shared = sorted(set(titles) & corpus_titles)
        out |= {"corpus_articles": len(corpus_titles), "shared_titles": shared}
    enc = get_tokenizer()
    # lm-eval scores the detokenized page; the n-grams are taken from that text
    test = np.concatenate([np.array(enc.encode_ordinary(wikitext_detokenizer({"page": p})), dtype=np.uint16)
                           for p in pages])
    train = np.concatenate([np.asarray(s) for s in open_split(str(train_dir), "train")])
    test_h, train_h = ngram_hashes(test), np.unique(ngram_hashes(train))
    hit = np.isin(test_h, train_h)
    out |= {"test_tokens": int(len(test)), "train_tokens": int(len(train)),
            f"test_{NGRAM}grams_in_train": round(float(hit.mean()), 6)}
    return out


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    mirror = os.environ.get("SHARED_DATA_DIR") or None
    p.add_argument("--data-dir", default=mirror, required=mirror is None,
                   help="folder with the evaluation files, as laid out in tests/data (default: $SHARED_DATA_DIR)")
    p.add_argument("--train", default="data/wiki", help="prepare_data.py output whose train split to check")
    p.add_argument("--corpus", default=None, help="WikiExtractor folder of the training articles, for titles "
                   "(default: <data-dir>/corpus_wikipedia_en)")
    a = p.parse_args()
    data_dir = Path(a.data_dir)
    corpus = Path(a.corpus) if a.corpus else data_dir / "corpus_wikipedia_en"
    print(json.dumps({"longest_request_tokens": longest_requests(data_dir),
                      "lambada_target_in_context": lambada_target_in_context(
                          data_dir / "lambada_openai_test.jsonl"),
                      "seed_filter_lengths": seed_filter_lengths(data_dir),
                      "wikitext_vs_train": wikitext_overlap(data_dir, Path(a.train),
                                                            corpus if corpus.is_dir() else None)}, indent=1))


if __name__ == "__main__":
    run_main(main)
