"""prepare_data.py on real text (Tiny Shakespeare, WikiText-2, LAMBADA, Wikipedia: the complete files where the
full-data mirror folder has them, else the samples in tests/data). References: tiktoken's encode_ordinary on the
raw input, the records as read with the json module / the WikiExtractor document regex, and single-process or
uninterrupted runs of the same command."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from conftest import REPO, full_file, is_sample, shared_file
from tokenizer import EOT, get_tokenizer


def run(*args: str) -> dict | None:
    return prepare_data.main([*map(str, args), "--no-progress"])


def split_tokens(out: Path, split: str) -> np.ndarray:
    """All tokens of a split, read with numpy straight from the files meta.json lists, checked against it."""
    meta = json.loads((out / "meta.json").read_text())
    parts = []
    for e in meta["splits"][split]:
        arr = np.fromfile(out / e["file"], dtype="<u2")
        assert len(arr) == e["tokens"], e
        assert np.count_nonzero(arr == EOT) == e["docs"], e
        parts.append(arr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<u2")


def decode_docs(tokens: np.ndarray) -> list[str]:
    """Split at EOT (every document must start with one) and decode each document."""
    if len(tokens) == 0:
        return []
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    enc = get_tokenizer()
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def check_partition(out: Path, expected: list[str]) -> tuple[list[str], list[str]]:
    """train and val decode to disjoint, order-preserving parts of the input documents that together are all
    of them; token counts are those of encode_ordinary plus one EOT per document."""
    train, val = decode_docs(split_tokens(out, "train")), decode_docs(split_tokens(out, "val"))
    assert Counter(train) + Counter(val) == Counter(expected)
    assert is_subsequence(train, expected) and is_subsequence(val, expected)
    enc = get_tokenizer()
    total = len(split_tokens(out, "train")) + len(split_tokens(out, "val"))
    assert total == sum(len(t) + 1 for t in enc.encode_ordinary_batch(expected))
    return train, val


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}


def test_whole_txt_file_is_one_document_with_known_token_count(tmp_path):
    src = shared_file("tinyshakespeare.txt")
    run("--files", src, "--out-dir", tmp_path, "--val-fraction", "0", "--num-proc", "1")
    tokens = split_tokens(tmp_path, "train")
    # 338025 = the count data/README.md gives for encode_ordinary of the whole file (nanoGPT's train+val)
    assert len(tokens) == 338025 + 1
    assert tokens[0] == EOT and tokens[1:].tolist() == get_tokenizer().encode_ordinary(src.read_text())
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {k: meta[k] for k in ("format", "tokenizer", "vocab_size", "eot", "dtype")} == {
        "format": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "dtype": "uint16"}
    sha = hashlib.sha256((tmp_path / "train_000000.bin").read_bytes()).hexdigest()
    assert meta["splits"] == {"train": [{"file": "train_000000.bin", "tokens": 338026, "docs": 1, "sha256": sha}],
                              "val": []}
    assert meta["text_bytes"] == {"train": src.stat().st_size, "val": 0}  # the file is the one document
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train_000000.bin"]


def test_shakespeare_preset_roundtrip_and_num_proc_independent(tmp_path):
    src = shared_file("tinyshakespeare.txt")
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"np{n}"
        run("--dataset", "shakespeare", "--shakespeare-path", src, "--out-dir", outs[n], "--num-proc", n,
            "--shard-tokens", 50_000, "--batch-chars", 30_000)
    assert shard_bytes(outs[1]) == shard_bytes(outs[2])
    assert (outs[1] / "meta.json").read_text() == (outs[2] / "meta.json").read_text()
    expected = [d for d in src.read_text().split("\n\n") if d.strip()]
    train, val = check_partition(outs[1], expected)
    assert 0.08 < len(val) / len(expected) < 0.12  # the preset's 10% val, by document
    meta = json.loads((outs[1] / "meta.json").read_text())
    sizes = [e["tokens"] for e in meta["splits"]["train"]]
    assert len(sizes) >= 6 and all(s == 50_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 50_000
    assert [e["file"] for e in meta["splits"]["train"]] == [f"train_{i:06d}.bin" for i in range(len(sizes))]


def test_wikitext_paragraphs_ordered_across_many_pool_tasks(tmp_path):
    src = shared_file("wikitext2_raw/wiki.test.raw")
    a, b = tmp_path / "a", tmp_path / "b"
    # small tasks: ~130 of them (~90 on the sample) through a 2-process pool, so out-of-order completion would show
    frac, batch_chars, shard_tokens = (0.2, 600, 2_500) if is_sample(src) else (0.05, 10_000, 40_000)
    common = ["--files", src, "--doc-sep", r"\n \n", "--val-fraction", frac, "--batch-chars", batch_chars,
              "--shard-tokens", shard_tokens]
    run(*common, "--out-dir", a, "--num-proc", 1)
    run(*common, "--out-dir", b, "--num-proc", 2)
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) > 5
    expected = [d for d in src.read_text().split("\n \n") if d.strip()]
    train, val = check_partition(a, expected)
    assert 0.6 * frac < len(val) / len(expected) < 1.4 * frac


@pytest.mark.e2e
def test_txt_split_in_chunks_equals_str_split():
    """Reading in chunks must not change where documents split: WikiText's blank lines make overlapping "\\n \\n"
    matches (" \\n \\n \\n" before each title), where a search from the right would cut elsewhere."""
    src = shared_file("wikitext2_raw/wiki.test.raw")
    text = src.read_text(encoding="utf-8")
    for sep in ("\n \n", "\n\n", " = "):
        for chunk_chars in (97, 1000, 1 << 22):
            assert list(prepare_data.txt_documents(src, sep, chunk_chars)) == text.split(sep), (sep, chunk_chars)


@pytest.mark.e2e
def test_lambada_jsonl_and_parquet(tmp_path):
    src = shared_file("lambada_openai_test.jsonl")
    records = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    run("--files", src, "--out-dir", tmp_path / "j", "--val-docs", 100, "--num-proc", 2)
    train, val = check_partition(tmp_path / "j", records)
    assert val == records[:100] and train == records[100:]  # --val-docs: the first N documents
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(records))), "text": records}), tmp_path / "lambada.parquet",
                   row_group_size=min(500, len(records) // 3))  # several row groups to read across
    run("--files", tmp_path / "lambada.parquet", "--out-dir", tmp_path / "p", "--val-docs", 100, "--num-proc", 2)
    assert shard_bytes(tmp_path / "p") == shard_bytes(tmp_path / "j")


def test_mixed_files_keep_command_line_order(tmp_path):
    txt, jsonl = shared_file("tinyshakespeare.txt"), shared_file("lambada_openai_test.jsonl")
    run("--files", jsonl, txt, "--out-dir", tmp_path, "--val-fraction", "0")
    records = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    assert decode_docs(split_tokens(tmp_path, "train")) == [*records, txt.read_text()]


def wiki_reference(files: list[Path], keep_title: bool) -> list[str]:
    """Articles by the regex that matches every document of the WikiExtractor corpus; empty bodies dropped."""
    pat = re.compile(r'<doc id="(\d+)" url="[^"]*" title="([^"]*)">\n(.*?)</doc>\n', re.DOTALL)
    docs = []
    for f in files:
        for m in pat.finditer(f.read_text()):
            title, _, body = m.group(3).partition("\n")
            if body.strip():
                docs.append(m.group(3).strip() if keep_title else body.strip())
    return docs


@pytest.mark.parametrize("title", ["keep", "drop"])
def test_wikiextractor_files_autodetected(tmp_path, title):
    files = [shared_file("corpus_wikipedia_en/AA/wiki_00"), shared_file("corpus_wikipedia_en/AA/wiki_01")]
    run("--files", *files, "--out-dir", tmp_path, "--wiki-title", title, "--val-docs", 3, "--num-proc", 2)
    expected = wiki_reference(files, keep_title=title == "keep")
    assert len(expected) > (20 if is_sample(files[0]) else 50)
    train, val = check_partition(tmp_path, expected)
    assert val + train == expected
    first, body = ("Anarchism", "Anarchism is a political philosophy")
    if is_sample(files[0]):
        first, body = "Academy Award for Best Production Design", "The Academy Awards are the oldest"
    assert val[0].startswith(f"{first}\n\n{body}" if title == "keep" else body)
    assert all("<doc" not in d and "</doc>" not in d for d in expected)


def test_val_split_depends_on_seed_only(tmp_path):
    src = shared_file("lambada_openai_test.jsonl")
    n_docs = len(src.read_text().splitlines())
    frac, batch_chars = (0.1, 10_000) if is_sample(src) else (0.02, 50_000)  # dozens of val documents either way
    for name, seed, n in (("a", 1, 1), ("b", 1, 2), ("c", 2, 1)):
        run("--files", src, "--out-dir", tmp_path / name, "--seed", seed, "--num-proc", n, "--val-fraction", frac,
            "--batch-chars", batch_chars)
    val = {k: decode_docs(split_tokens(tmp_path / k, "val")) for k in "abc"}
    assert val["a"] == val["b"] and val["a"] != val["c"]
    assert all(0.5 * frac < len(val[k]) / n_docs < 1.5 * frac for k in "ac")


def test_interrupted_run_leaves_no_meta_and_next_run_is_correct(tmp_path, monkeypatch):
    src = shared_file("wikitext2_raw/wiki.test.raw")
    shard_tokens, batch_chars = (3_000, 2_000) if is_sample(src) else (30_000, 20_000)  # several shards either way
    args = ["--files", src, "--doc-sep", r"\n \n", "--shard-tokens", shard_tokens, "--batch-chars", batch_chars,
            "--num-proc", 2]
    run(*args, "--out-dir", tmp_path / "ref")
    real_finish = prepare_data.ShardWriter._finish_shard

    def finish_then_die(self):
        real_finish(self)
        raise RuntimeError("injected crash after the first shard")

    monkeypatch.setattr(prepare_data.ShardWriter, "_finish_shard", finish_then_die)
    with pytest.raises(RuntimeError, match="injected"):
        run(*args, "--out-dir", tmp_path / "out")
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert "meta.json" not in left and "train_000000.bin" in left  # a shard was done, the dataset is not
    monkeypatch.setattr(prepare_data.ShardWriter, "_finish_shard", real_finish)
    run(*args, "--out-dir", tmp_path / "out")
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    assert (tmp_path / "out" / "meta.json").read_text() == (tmp_path / "ref" / "meta.json").read_text()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_rerun_on_complete_dataset_is_a_noop_unless_overwrite(tmp_path, capsys):
    src = shared_file("lambada_openai_test.jsonl")
    assert run("--files", src, "--out-dir", tmp_path) is not None
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert run("--files", src, "--out-dir", tmp_path) is None
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    (tmp_path / "train_000099.bin").write_bytes(b"\0\0")  # a stray shard from some older run
    summary = run("--files", src, "--out-dir", tmp_path, "--overwrite")
    assert summary["docs"]["train"] + summary["docs"]["val"] == len(src.read_text().splitlines())  # 5153 in full
    assert not (tmp_path / "train_000099.bin").exists()


@pytest.mark.parametrize("argv, hf_args", [
    ([], ("Skylion007/openwebtext", None, False)),
    (["--dataset", "fineweb-edu", "--streaming"], ("HuggingFaceFW/fineweb-edu", "sample-10BT", True)),
    (["--dataset", "fineweb", "--streaming"], ("HuggingFaceFW/fineweb", "sample-10BT", True)),
])
def test_hf_sources_call_load_dataset_and_match_local_path(tmp_path, monkeypatch, argv, hf_args):
    """The hub is out of reach here: substitute load_dataset's result with the local json builder's (what the hub
    would return is a dataset of {"text": ...} records) and check the call and the output."""
    import datasets

    src = shared_file("lambada_openai_test.jsonl")
    real_load, calls = datasets.load_dataset, []

    def fake_load(path, name=None, data_files=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming, kwargs))
        return real_load("json", data_files=[str(src)], split="train", streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    run(*argv, "--out-dir", tmp_path / "hf", "--val-fraction", "0.01", "--num-proc", 2)
    download_kwargs = {} if hf_args[2] else {"num_proc": 2}  # parallel download unless streaming
    assert calls == [(hf_args[0], hf_args[1], "train", hf_args[2], download_kwargs)]
    monkeypatch.setattr(datasets, "load_dataset", real_load)
    run("--files", src, "--out-dir", tmp_path / "local", "--val-fraction", "0.01")
    assert shard_bytes(tmp_path / "hf") == shard_bytes(tmp_path / "local")


def test_fineweb_val_is_the_first_documents_of_the_stream(tmp_path, monkeypatch):
    """llm.c's FineWeb val shard (what modded-nanogpt's 3.28 is measured on) is the stream's first tokens, each
    document preceded by EOT: --dataset fineweb's default val split must be the first documents, in order."""
    import datasets

    src = shared_file("lambada_openai_test.jsonl")
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw:
                        real_load("json", data_files=[str(src)], split="train", streaming=kw.get("streaming", False)))
    monkeypatch.setattr(prepare_data, "FINEWEB_VAL_DOCS", 40)
    summary = run("--dataset", "fineweb", "--streaming", "--out-dir", tmp_path, "--num-proc", 2)
    assert summary["docs"]["val"] == 40
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    enc = get_tokenizer()
    first = [t for text in texts[:40] for t in [EOT, *enc.encode_ordinary(text)]]
    rest = [t for text in texts[40:] for t in [EOT, *enc.encode_ordinary(text)]]
    assert split_tokens(tmp_path, "val").tolist() == first
    assert split_tokens(tmp_path, "train").tolist() == rest


def test_tasks_in_flight_are_bounded():
    """Pool.imap would pull every task at once; `encoded` must stay within 2 per worker."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pulled = 0

    def tasks():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield [f"document {i}"] * 10, np.zeros(10, dtype=bool), (i, i)

    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        it = prepare_data.encoded(tasks(), pool, 2)
        first = next(it)
        assert pulled <= 2 * 2 + 1
        rest = list(it)
    assert len(rest) == 99 and pulled == 100
    assert first[0]["train"][0].tolist() == [EOT, *get_tokenizer().encode_ordinary("document 0")] * 10
    assert [r[2] for r in rest] == [(i, i) for i in range(1, 100)]  # each result with its own task's position


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.e2e
def test_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "nofield.jsonl").write_text('{"body": "some text"}\n{"body": "more"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    assert_one_line_error(cli("--files", tmp_path / "missing.txt", "--out-dir", out), "missing.txt", "does not exist")
    assert_one_line_error(cli("--dataset", "pile", "--out-dir", out), "pile")
    assert_one_line_error(cli("--files", tmp_path / "nofield.jsonl", "--out-dir", out), "'text'", "body",
                          "--text-field")
    assert_one_line_error(cli("--files", tmp_path / "empty.txt", "--out-dir", out), "no documents")
    assert_one_line_error(cli("--files", tmp_path / "blank.txt", "--doc-sep", r"\n\n", "--out-dir", out),
                          "no documents")
    assert_one_line_error(cli("--files", tmp_path / "empty.txt", "--out-dir", tmp_path / "afile"), "is a file")
    assert not out.exists()  # nothing was created by any of the failed runs
    r = cli("--files", tmp_path / "nofield.jsonl", "--text-field", "body", "--out-dir", out, "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert decode_docs(split_tokens(out, "train")) == ["some text", "more"]


@pytest.mark.e2e
@pytest.mark.slow
def test_whole_wikipedia_corpus_matches_source_token_count(tmp_path):
    """All 96 files (98 MB): the corpus's SOURCE.md counts 6,323 articles, 4 with an empty body, and 21,264,781
    GPT-2 tokens in the article bodies (header, title line and </doc> dropped): that plus one EOT per article."""
    d = full_file("corpus_wikipedia_en/AA")
    summary = run("--files", d, "--out-dir", tmp_path, "--wiki-title", "drop", "--val-fraction", "0", "--num-proc", 2)
    assert summary["docs"] == {"train": 6323 - 4, "val": 0}
    assert summary["tokens"]["train"] == 21_264_781 + 6319
    assert (tmp_path / "train_000000.bin").stat().st_size == 2 * summary["tokens"]["train"]
