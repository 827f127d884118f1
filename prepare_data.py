"""Turn a text corpus into uint16 GPT-2 token shards: data/<name>/{train,val}_NNNNNN.bin + meta.json.

    python prepare_data.py                                  # OpenWebText (HF Skylion007/openwebtext)
    python prepare_data.py --dataset fineweb-edu --streaming  # FineWeb-edu sample-10BT, no full download
    python prepare_data.py --dataset fineweb --streaming      # FineWeb sample-10BT; val = its first 50,000 docs
    python prepare_data.py --dataset shakespeare            # Tiny Shakespeare, CPU quickstart
    python prepare_data.py --files a.jsonl b.parquet c.txt --text-field text --name mycorpus
    python prepare_data.py --files wiki/AA --name wiki      # WikiExtractor output (auto-detected)
    python prepare_data.py --verify data/openwebtext        # re-hash every shard against meta.json

Documents flow through in input order: the main process reads them, cuts them into batches, and a
multiprocessing pool tokenizes the batches (tiktoken encode_ordinary); results are taken back in submission
order, so the output bytes do not depend on --num-proc. At most 2 x num_proc batches are in flight and shards
are written to disk as they fill, so memory stays flat as the input grows. Every document is preceded by EOT
(50256). A document goes to val by a seeded hash of its index in the stream (or the first --val-docs
documents do), never by where it lands in the pool. Shards are written as .tmp and renamed; meta.json comes
last, so a folder with meta.json is complete. After every batch that finished a shard, progress.json records
the stream position and each split's shards, so a run that died continues from there when started again
(--restart starts over) and writes the same bytes as a run that never stopped. Format: docs/design.md "Formats".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import ArgumentParser, UserError, run_main
from tokenizer import EOT, VOCAB_SIZE, get_tokenizer

REPO = Path(__file__).resolve().parent
FORMAT_VERSION = 1  # meta.json; fields added since (sha256, text_bytes) are optional for readers
PROGRESS = "progress.json"  # beside the shards while a run is unfinished
PROGRESS_VERSION = 1
SPLITS = ("train", "val")
# Hugging Face sources: (dataset path, config name, output folder under data/, published document count).
HF_SOURCES = {
    "openwebtext": ("Skylion007/openwebtext", None, "openwebtext", 8_013_769),  # the corpus's release notes
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "fineweb_edu", None),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb", None),
}
# FineWeb's val split is the first documents of the stream, as llm.c's fineweb.py makes it (its val shard is the
# first 100M tokens, each document preceded by EOT as here), so val_loss over its first 10,485,760 tokens
# (eval_tokens) scores the tokens modded-nanogpt's 3.28 target is measured on, provided the val split holds at
# least that many: 50,000 documents of several hundred tokens each do; the summary line prints the count.
FINEWEB_VAL_DOCS = 50_000
# datasets>=4 refuses hub repositories that ship a loading script (Skylion007/openwebtext did); the hub keeps
# its own parquet conversion of such a repository on this branch (which, for a large dataset, may hold only
# the first part of a split: hence the document count check).
PARQUET_REVISION = "refs/convert/parquet"
SCRIPT_REFUSED = "Dataset scripts are no longer supported"
DATASETS = (*HF_SOURCES, "shakespeare")
FORMATS = ("auto", "txt", "jsonl", "parquet", "wikiextractor")
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"  # shipped: karpathy/char-rnn's input.txt, public domain
WIKI_HEADER = re.compile(r'<doc id="[^"]*" url="[^"]*" title="[^"]*">$')


def default_num_proc() -> int:
    """The CPUs this process may run on: a container or taskset can allow fewer than os.cpu_count() says."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


@dataclass
class PrepareConfig:
    dataset: str | None = None  # a name in DATASETS; None with `files` set
    files: list[str] = field(default_factory=list)  # local corpus: .txt / .jsonl / .parquet / WikiExtractor
    name: str | None = None  # output folder name for `files` (default: first file's stem)
    out_dir: str | None = None  # overrides data/<name>
    text_field: str = "text"  # jsonl/parquet/HF field holding the document
    format: str = "auto"  # one of FORMATS; auto = by extension, sniffing `<doc id=` for WikiExtractor
    doc_sep: str | None = None  # txt: split a file into documents at this string (default: file = 1 doc)
    wiki_title: str = "keep"  # WikiExtractor: keep the title line at the top of each article, or drop it
    shakespeare_path: str | None = None
    val_fraction: float | None = None  # default 0.0005 (0.1 for shakespeare, whose speeches are short)
    val_docs: int | None = None  # fixed count instead: the first N documents of the stream
    seed: int = 1337
    num_proc: int = field(default_factory=default_num_proc)
    shard_tokens: int = 100_000_000
    batch_chars: int = 1 << 20  # text per pool task: large enough to amortize IPC, small enough to stay lean
    streaming: bool = False  # HF sources: iterate over the hub instead of downloading everything first
    overwrite: bool = False  # redo a complete dataset
    restart: bool = False  # discard a partial run in the output folder instead of continuing it
    verify: str | None = None  # instead of preparing: re-hash this prepared folder's shards against meta.json
    progress: bool = True


# ---------------------------------------------------------------------------------------------- sources
def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _load_hf(datasets, path: str, name: str | None, data_files: list[str] | None, streaming: bool, kwargs: dict,
             label: str, on_revision: Callable[[str], None] | None):
    """load_dataset; where datasets>=4 refuses the repository's loading script, the hub's parquet conversion."""
    try:
        return datasets.load_dataset(path, name=name, data_files=data_files, split="train", streaming=streaming,
                                     **kwargs)
    except RuntimeError as e:
        if SCRIPT_REFUSED not in str(e) or data_files is not None:
            raise
    try:  # the conversion keeps one folder per config and no README, so a config is a data_dir there
        ds = datasets.load_dataset(path, data_dir=name, split="train", streaming=streaming, revision=PARQUET_REVISION,
                                   **kwargs)
    except Exception as e:
        raise UserError(f"could not read {label}: it ships a dataset script, which datasets {datasets.__version__} "
                        f"no longer runs, and its parquet conversion did not load either ({type(e).__name__}: "
                        f"{_first_line(e)}); prepare it in a separate environment with pip install \"datasets<4\", "
                        "or use --dataset fineweb-edu") from e
    print(f"note: {label} ships a dataset script, which datasets {datasets.__version__} does not run; reading the "
          f"hub's parquet conversion of it (revision {PARQUET_REVISION}) instead", file=sys.stderr)
    if on_revision is not None:
        on_revision(PARQUET_REVISION)
    return ds


def hf_documents(path: str, name: str | None, text_field: str, streaming: bool, label: str,
                 data_files: list[str] | None = None, num_proc: int | None = None, skip: int = 0,
                 expected_docs: int | None = None, on_revision: Callable[[str], None] | None = None
                 ) -> Iterator[str]:
    """Documents from a `datasets` source, from record `skip` on: a hub dataset, or the local "json"/"parquet"
    builders (the same code path, which is how the hub path is tested offline). A full download is checked
    against the published document count (expected_docs) where there is one."""
    import datasets  # lazy: GPU machines need not have it

    kwargs = {} if streaming or num_proc is None else {"num_proc": num_proc}  # parallel download/convert
    try:
        ds = _load_hf(datasets, path, name, data_files, streaming, kwargs, label, on_revision)
        if expected_docs is not None and not streaming and len(ds) != expected_docs:
            print(f"warning: {label} has {len(ds):,} documents, not the published {expected_docs:,}: the copy read is "
                  "partial (as the hub's parquet conversion of a large dataset can be), so the prepared data will be "
                  "smaller than the corpus", file=sys.stderr)
        if skip:  # resuming: a downloaded Dataset slices; a streamed one still reads what it skips, untokenized
            ds = ds.skip(skip) if hasattr(ds, "skip") else ds.select(range(skip, len(ds)))
        for batch in ds.iter(batch_size=1000):  # columnar batches: much faster than one dict per record
            if text_field not in batch:
                raise UserError(f"{label}: records have no field {text_field!r} (fields: {', '.join(batch)}); "
                                "pass --text-field")
            for text in batch[text_field]:
                if not isinstance(text, str):
                    raise UserError(f"{label}: field {text_field!r} holds {type(text).__name__}, not text")
                yield text
    except UserError:
        raise
    except Exception as e:  # network, malformed json/parquet, ...: one line naming the source
        raise UserError(f"could not read {label}: {type(e).__name__}: {_first_line(e)}") from e


def _open_text(path: Path):
    return open(path, encoding="utf-8", newline="")  # newline="": keep the bytes exactly (no CRLF folding)


def txt_documents(path: Path, doc_sep: str | None, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """A text file as one document, or split at doc_sep while reading in chunks (bounded memory)."""
    with _open_text(path) as f:
        if doc_sep is None:
            yield f.read()
            return
        buf = ""
        while block := f.read(chunk_chars):
            # split from the left and keep the tail, as str.split on the whole text would (rfind could pick an
            # overlapping match, e.g. the second "\n \n" in " \n \n \n")
            *docs, buf = (buf + block).split(doc_sep)
            yield from docs
        yield buf


def wikiextractor_documents(path: Path, keep_title: bool) -> Iterator[str]:
    """WikiExtractor output: `<doc id=.. url=.. title=..>` line, title line, blank, body, blank, `</doc>`.
    One document per article: the text between the two tag lines, stripped (so title + blank line + body),
    or the body alone with keep_title=False. Articles with an empty body yield nothing."""
    lines: list[str] | None = None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if lines is None:
                if WIKI_HEADER.match(line.rstrip("\r\n")):
                    lines = []
                elif line.strip():
                    raise UserError(f"{path}:{lineno}: text outside <doc>...</doc>; not WikiExtractor output "
                                    "(pass --format txt)")
            elif line.rstrip("\r\n") == "</doc>":
                if "".join(lines[1:]).strip():
                    yield "".join(lines if keep_title else lines[1:]).strip()
                lines = None
            else:
                lines.append(line)
    if lines is not None:
        raise UserError(f"{path}: the last <doc> has no </doc>; the file is truncated")


def detect_format(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "wikiextractor" if head.startswith(b"<doc id=") else "txt"


def expand_files(files: Iterable[str]) -> list[Path]:
    """Check the paths; a directory stands for its files, recursively, in sorted order."""
    out: list[Path] = []
    for name in files:
        p = Path(name)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"input file {p} does not exist")
    if not out:
        raise UserError(f"no input files in {' '.join(files)}")
    return out


def file_documents(paths: list[Path], cfg: PrepareConfig) -> Iterator[str]:
    for p in paths:
        fmt = detect_format(p) if cfg.format == "auto" else cfg.format
        try:
            if fmt == "txt":
                yield from txt_documents(p, cfg.doc_sep)
            elif fmt == "wikiextractor":
                yield from wikiextractor_documents(p, cfg.wiki_title == "keep")
            else:  # jsonl / parquet through datasets' builders, streamed: no cache copy, bounded memory
                yield from hf_documents("json" if fmt == "jsonl" else "parquet", None, cfg.text_field, True,
                                        str(p), data_files=[str(p)])
        except UnicodeDecodeError as e:
            raise UserError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from e


@dataclass
class Source:
    """Where the documents come from: `documents(skip)` yields them in order from record `skip` on."""
    description: str  # meta.json's "source"
    out: Path
    identity: dict  # what the input was: a partial run in `out` made from another input is not continued
    documents: Callable[[int], Iterator[str]]


def _file_identity(paths: list[Path]) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]  # a changed file changes either


def resolve(cfg: PrepareConfig) -> Source:
    """The document stream, the output folder and a description of the source, from the config."""
    if cfg.files:
        if cfg.dataset is not None:
            raise UserError("give either --dataset or --files, not both")
        paths = expand_files(cfg.files)
        name = cfg.name or paths[0].stem
        src = Source("files: " + " ".join(str(p) for p in paths), Path(), {"files": _file_identity(paths)},
                     lambda skip: itertools.islice(file_documents(paths, cfg), skip, None))
    elif (cfg.dataset or "openwebtext") in HF_SOURCES:
        hf_path, hf_name, name, count = HF_SOURCES[cfg.dataset or "openwebtext"]
        name = cfg.name or name
        label = f"hf:{hf_path}" + (f" ({hf_name})" if hf_name else "")

        def on_revision(rev: str) -> None:
            src.description = f"{label} revision {rev}"  # meta.json says which copy was read

        src = Source(label, Path(), {"hf": [hf_path, hf_name], "streaming": cfg.streaming},
                     lambda skip: hf_documents(hf_path, hf_name, cfg.text_field, cfg.streaming, label,
                                               num_proc=cfg.num_proc, skip=skip, expected_docs=count,
                                               on_revision=on_revision))
    elif cfg.dataset == "shakespeare":
        p = Path(cfg.shakespeare_path or SHAKESPEARE)
        if not p.is_file():
            raise UserError(f"Tiny Shakespeare not found at {p}; pass --shakespeare-path (karpathy/char-rnn "
                            "data/tinyshakespeare/input.txt)")
        name = cfg.name or "shakespeare"
        src = Source(f"shakespeare: {p} (speeches, split at blank lines)", Path(), {"files": _file_identity([p])},
                     lambda skip: itertools.islice(txt_documents(p, "\n\n"), skip, None))
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)} or pass --files")
    src.out = Path(cfg.out_dir) if cfg.out_dir else REPO / "data" / name
    return src


# ------------------------------------------------------------------------------------------ tokenization
def val_mask(start: int, n: int, seed: int, val_fraction: float, val_docs: int | None) -> np.ndarray:
    """Which of documents start..start+n-1 go to val: the first val_docs, or each with probability
    val_fraction by a seeded hash of its index (splitmix64), so the choice depends on nothing else."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    if val_docs is not None:
        return idx < np.uint64(val_docs)
    z = idx + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_fraction


def encode_batch(batch: tuple[list[str], np.ndarray, tuple[int, int]]
                 ) -> tuple[dict[str, tuple[np.ndarray, int]], int, tuple[int, int]]:
    """Tokenize a batch of documents: per split, its tokens (each document preceded by EOT) and the UTF-8 size
    of its documents' text; then the batch's document count and its stream position, passed through. Runs in
    the pool workers (and in the main process with --num-proc 1)."""
    texts, is_val, end = batch
    enc = get_tokenizer()
    tokens: dict[str, list[int]] = {s: [] for s in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    for text, v in zip(texts, is_val):
        s = "val" if v else "train"
        tokens[s].append(EOT)
        tokens[s] += enc.encode_ordinary(text)
        text_bytes[s] += len(text) if text.isascii() else len(text.encode("utf-8"))
    return {s: (np.array(tokens[s], dtype="<u2"), text_bytes[s]) for s in SPLITS}, len(texts), end


def batches(docs: Iterator[str], cfg: PrepareConfig, records: int = 0, index: int = 0
            ) -> Iterator[tuple[list[str], np.ndarray, tuple[int, int]]]:
    """Group documents into pool tasks of about batch_chars characters, with their val flags and the stream
    position after them: (records read from the source, documents kept), where a resumed run starts. `records`
    and `index` say where `docs` starts. Whitespace-only documents are dropped (and do not count as an index)."""
    frac = 0.0005 if cfg.val_fraction is None else cfg.val_fraction
    texts, chars = [], 0
    for text in docs:
        records += 1
        if not text.strip():
            continue
        texts.append(text)
        chars += len(text)
        if chars >= cfg.batch_chars:
            yield texts, val_mask(index, len(texts), cfg.seed, frac, cfg.val_docs), (records, index + len(texts))
            index, texts, chars = index + len(texts), [], 0
    if texts:
        yield texts, val_mask(index, len(texts), cfg.seed, frac, cfg.val_docs), (records, index + len(texts))


def _exit_with_parent(parent: int) -> None:
    """Pool worker initializer. A worker whose main process was killed (SIGKILL: no cleanup) would wait on the
    task queue forever, holding its memory and the terminal's pipes; this one notices and exits."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def encoded(tasks: Iterator[tuple], pool: ProcessPoolExecutor | None, num_proc: int) -> Iterator[tuple]:
    """encode_batch over the tasks, results in task order. Unlike Pool.imap (whose feeder thread drains the
    whole input at once), this keeps at most 2 tasks per worker in flight: memory does not grow with input."""
    if pool is None:
        yield from map(encode_batch, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(encode_batch, task))
        if len(pending) >= 2 * num_proc:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------------ output
def _fsync_replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    """Atomically: a reader (or the next run) sees the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_replace(tmp, path)


def _sha256_file(path: Path, limit: int | None = None, chunk: int = 1 << 22) -> hashlib._Hash:
    """sha256 of a file's first `limit` bytes (all of it by default), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit
        while left is None or left > 0:
            block = f.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h


class ShardWriter:
    """Appends tokens of one split to {split}_NNNNNN.bin.tmp, renaming each shard once it holds shard_tokens
    tokens (the last one when closed). A shard's `docs` is the number of documents that start in it; its
    sha256 is computed from the bytes as they are written (no second read)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.entries: list[dict] = []
        self.f = None
        self.tokens = self.docs = 0  # of the open shard
        self.hash = hashlib.sha256()
        self.text_bytes = 0  # UTF-8 bytes of the split's documents so far, EOT separators not included

    def write(self, arr: np.ndarray, text_bytes: int) -> None:
        self.text_bytes += text_bytes
        while len(arr):
            if self.f is None:
                self.f = open(self._path(".tmp"), "wb")
                self.tokens = self.docs = 0
                self.hash = hashlib.sha256()
            piece, arr = arr[: self.shard_tokens - self.tokens], arr[self.shard_tokens - self.tokens:]
            data = piece.tobytes()
            self.f.write(data)
            self.hash.update(data)
            self.tokens += len(piece)
            self.docs += int(np.count_nonzero(piece == EOT))
            if self.tokens == self.shard_tokens:
                self._finish_shard()

    def close(self) -> None:
        if self.f is not None:
            self._finish_shard()

    @property
    def n_docs(self) -> int:
        return sum(e["docs"] for e in self.entries) + self.docs

    def state(self) -> dict:
        """What progress.json records of this split; the open shard is fsync'd first, so its recorded length is
        on disk whatever happens next."""
        partial = None
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            partial = {"file": self._path(".tmp").name, "tokens": self.tokens, "docs": self.docs,
                       "sha256": self.hash.hexdigest()}
        return {"shards": [dict(e) for e in self.entries], "partial": partial, "text_bytes": self.text_bytes}

    def restore(self, state: dict) -> None:
        """Continue from a progress.json record: its finished shards, and its open shard cut back to the
        recorded length (restore_run has checked both)."""
        self.entries = [dict(e) for e in state["shards"]]
        self.text_bytes = state["text_bytes"]
        partial = state["partial"]
        if partial is not None:
            self.f = open(self._path(".tmp"), "r+b")
            self.f.truncate(2 * partial["tokens"])  # drop what was written after the record
            self.f.seek(2 * partial["tokens"])
            self.tokens, self.docs = partial["tokens"], partial["docs"]
            self.hash = _sha256_file(self._path(".tmp"), 2 * partial["tokens"])

    def _path(self, suffix: str = "") -> Path:
        return self.out_dir / f"{self.split}_{len(self.entries):06d}.bin{suffix}"

    def _finish_shard(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        final = self._path()
        _fsync_replace(self._path(".tmp"), final)
        self.entries.append({"file": final.name, "tokens": self.tokens, "docs": self.docs,
                             "sha256": self.hash.hexdigest()})
        self.tokens = self.docs = 0


def _clean(out: Path, keep: Iterable[str] = ()) -> None:
    """Remove what an earlier run of this script left (only its own file names), except `keep`."""
    keep = set(keep)
    if (out / "meta.json").exists():
        (out / "meta.json").unlink()  # first: from here on the folder no longer claims to be complete
    for pattern in ("meta.json.tmp", f"{PROGRESS}.tmp", "train_*.bin", "val_*.bin", "train_*.bin.tmp",
                    "val_*.bin.tmp", *(() if keep else (PROGRESS,))):
        for p in out.glob(pattern):
            if p.name not in keep:
                p.unlink()


def write_meta(out: Path, source: str, writers: dict[str, ShardWriter]) -> dict:
    meta = {"format": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "eot": EOT,
            "dtype": "uint16", "source": source, "text_bytes": {s: w.text_bytes for s, w in writers.items()},
            "splits": {s: w.entries for s, w in writers.items()}}
    _write_json(out / "meta.json", meta)
    return meta


# ------------------------------------------------------------------------------------------------ resume
def run_identity(cfg: PrepareConfig, src: Source) -> dict:
    """Everything the output bytes depend on (not --num-proc or --batch-chars, which change nothing)."""
    ident = {"progress_format": PROGRESS_VERSION, "format": FORMAT_VERSION, "tokenizer": "gpt2",
             "vocab_size": VOCAB_SIZE, "source": src.description, **src.identity, "text_field": cfg.text_field,
             "input_format": cfg.format, "doc_sep": cfg.doc_sep, "wiki_title": cfg.wiki_title,
             "val_fraction": 0.0005 if cfg.val_fraction is None else cfg.val_fraction, "val_docs": cfg.val_docs,
             "seed": cfg.seed, "shard_tokens": cfg.shard_tokens}
    return json.loads(json.dumps(ident))  # as progress.json will read back (lists, not tuples)


def save_progress(out: Path, identity: dict, position: tuple[int, int], writers: dict[str, ShardWriter]) -> None:
    _write_json(out / PROGRESS, {"identity": identity, "position": {"records": position[0], "docs": position[1]},
                                 "splits": {s: w.state() for s, w in writers.items()}})


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def load_progress(out: Path, identity: dict) -> dict | None:
    """The partial run recorded in out/progress.json, if any; one made by another command is an error."""
    p = out / PROGRESS
    if not p.is_file():
        return None
    restart = "pass --restart to discard it and start over"
    try:
        prog = json.loads(p.read_text())
        old, _, _ = prog["identity"], prog["position"]["records"], prog["splits"]["train"]["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p} is unreadable ({type(e).__name__}: {_first_line(e)}); {restart}") from e
    if old != identity:
        key = next(k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k))
        raise UserError(f"{out} holds a partial run of another command ({key}: {_short(old.get(key))} there, "
                        f"{_short(identity.get(key))} now); rerun that command to finish it, {restart}, or choose "
                        "another --out-dir")
    return prog


def restore_run(out: Path, prog: dict, writers: dict[str, ShardWriter]) -> None:
    """Bring the folder back to the state progress.json recorded: its finished shards must be intact (sizes),
    each open shard at least as long as recorded and, cut back to that length, of the recorded sha256; what was
    written after the record is removed (it will be written again, identically)."""
    bad = "cannot resume {f}: {why}; pass --restart to start over"
    keep = set()
    for s in writers:
        state = prog["splits"][s]
        for e in state["shards"]:
            f = out / e["file"]
            if not f.is_file() or f.stat().st_size != 2 * e["tokens"]:
                raise UserError(bad.format(f=f, why="this finished shard is missing or changed size"))
            keep.add(e["file"])
        partial = state["partial"]
        if partial is not None:
            tmp, done = out / partial["file"], out / partial["file"].removesuffix(".tmp")
            if not tmp.exists() and done.exists():
                os.replace(done, tmp)  # it was finished after the record: the record's prefix of it is reused
            if not tmp.is_file() or tmp.stat().st_size < 2 * partial["tokens"]:
                raise UserError(bad.format(f=tmp, why=f"the open shard is shorter than the {partial['tokens']} "
                                                      f"tokens {PROGRESS} records"))
            keep.add(tmp.name)
    _clean(out, keep | {PROGRESS})
    for s, w in writers.items():
        w.restore(prog["splits"][s])
        partial = prog["splits"][s]["partial"]
        if partial is not None and w.hash.hexdigest() != partial["sha256"]:
            raise UserError(bad.format(f=out / partial["file"], why=f"its first {partial['tokens']} tokens changed "
                                                                    f"since {PROGRESS} recorded them"))


class _Progress:
    """docs/s and tokens/s on stderr (tqdm when installed)."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(unit=" docs", desc="tokenizing", smoothing=0.1, file=sys.stderr)
            except ImportError:
                pass
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(docs)
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------------------------------------- main
def prepare(cfg: PrepareConfig) -> dict | None:
    """Prepare the dataset described by cfg, continuing a partial run of the same command in the output folder
    unless cfg.restart. Returns a summary, or None if it was already complete."""
    if cfg.format not in FORMATS:
        raise UserError(f"unknown --format {cfg.format!r}; choose one of {', '.join(FORMATS)}")
    if cfg.wiki_title not in ("keep", "drop"):
        raise UserError(f"--wiki-title must be keep or drop, not {cfg.wiki_title!r}")
    if cfg.val_fraction is not None and not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), not {cfg.val_fraction}")
    if cfg.val_docs is not None and cfg.val_docs < 0:
        raise UserError(f"--val-docs must be >= 0, not {cfg.val_docs}")
    if cfg.shard_tokens < 1 or cfg.num_proc < 1 or cfg.batch_chars < 1:
        raise UserError("--shard-tokens, --num-proc and --batch-chars must be >= 1")
    if cfg.dataset == "shakespeare" and cfg.val_fraction is None and cfg.val_docs is None:
        cfg.val_fraction = 0.1
    if cfg.dataset == "fineweb" and cfg.val_fraction is None and cfg.val_docs is None:
        cfg.val_docs = FINEWEB_VAL_DOCS
    src = resolve(cfg)
    out = src.out
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file; pass another --out-dir")
    if (out / "meta.json").is_file() and not cfg.overwrite:
        (out / PROGRESS).unlink(missing_ok=True)  # left by a run that stopped right after writing meta.json
        print(f"{out} is already prepared (meta.json exists); pass --overwrite to redo it")
        return None
    identity = run_identity(cfg, src)
    prog = None if cfg.restart or cfg.overwrite else load_progress(out, identity)

    get_tokenizer()  # load before forking so that the workers inherit it
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # A ProcessPoolExecutor, not multiprocessing.Pool: Pool.terminate() on an error path can deadlock when it
    # kills a worker that holds the result pipe's lock while sending a large batch of tokens.
    pool = ProcessPoolExecutor(cfg.num_proc, mp_context=ctx, initializer=_exit_with_parent,
                               initargs=(os.getpid(),)) if cfg.num_proc > 1 else None
    if pool is not None:
        pool.submit(int).result()  # fork the workers now, before the source starts any threads
    progress = None
    writers = {s: ShardWriter(out, s, cfg.shard_tokens) for s in SPLITS}
    saved = 0  # finished shards that progress.json records
    try:
        records = index = 0
        if prog is not None:
            restore_run(out, prog, writers)
            records, index = prog["position"]["records"], prog["position"]["docs"]
            saved = sum(len(w.entries) for w in writers.values())
            done = sum(sum(e["tokens"] for e in w.entries) + w.tokens for w in writers.values())
            print(f"resuming {out} from document {index:,}: {saved} finished shards and {done:,} tokens kept, "
                  f"continuing with train shard {len(writers['train'].entries)} and val shard "
                  f"{len(writers['val'].entries)}; pass --restart to start over")
        tasks = batches(src.documents(records), cfg, records, index)
        first = next(tasks, None)  # read before touching the output folder: empty input changes nothing
        if first is None and prog is None:
            raise UserError(f"no documents in {src.description} (empty or whitespace-only input)")
        if prog is None:
            out.mkdir(parents=True, exist_ok=True)
            _clean(out)
        progress = _Progress(cfg.progress)
        t0 = time.perf_counter()
        for results, n_docs, end in encoded(itertools.chain([first] if first else [], tasks), pool, cfg.num_proc):
            finished = sum(len(w.entries) for w in writers.values())
            for s, (tokens, text_bytes) in results.items():
                writers[s].write(tokens, text_bytes)
            progress.update(n_docs, sum(len(t) for t, _ in results.values()))
            if sum(len(w.entries) for w in writers.values()) > finished:  # a shard was finished: record where
                save_progress(out, identity, end, writers)                # the stream stands after this batch
                saved = sum(len(w.entries) for w in writers.values())
        for w in writers.values():
            w.close()
        meta = write_meta(out, src.description, writers)
        (out / PROGRESS).unlink(missing_ok=True)
    except BrokenProcessPool as e:  # a worker was killed (out of memory, a signal): nothing to debug in here
        kept = f"its {saved} finished shards are kept" if saved else "no shard was finished yet"
        raise UserError(f"a tokenizer worker process died (killed by a signal or the out-of-memory killer?); {out}: "
                        f"{kept}, so running the same command again resumes there (a smaller --num-proc uses less "
                        "memory)") from e
    finally:
        if progress is not None:
            progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # queued batches dropped, running ones finish
    elapsed = time.perf_counter() - t0
    n_docs = {s: w.n_docs for s, w in writers.items()}
    tokens = {s: sum(e["tokens"] for e in meta["splits"][s]) for s in SPLITS}
    total = sum(tokens.values())
    summary = {"out_dir": str(out), "docs": n_docs, "tokens": tokens, "text_bytes": meta["text_bytes"],
               "elapsed_s": elapsed, "tokens_per_s": progress.tokens / max(elapsed, 1e-9),
               "num_proc": cfg.num_proc, "resumed": prog is not None}
    print(f"prepared {out}: train {n_docs['train']:,} docs {tokens['train']:,} tokens "
          f"({len(meta['splits']['train'])} shards), val {n_docs['val']:,} docs {tokens['val']:,} tokens "
          f"({len(meta['splits']['val'])} shards); {progress.tokens:,} tokens in {elapsed:.1f} s = "
          f"{summary['tokens_per_s'] / 1e6:.2f}M tokens/s with {cfg.num_proc} processes"
          + (f" (resumed; {total:,} in all)" if prog is not None else ""))
    for split in SPLITS:
        if n_docs[split] == 0:
            print(f"warning: the {split} split is empty (adjust --val-fraction / --val-docs, or split the "
                  "input into more documents with --doc-sep)", file=sys.stderr)
    return summary


def verify(data_dir: str | Path) -> dict:
    """Re-hash every shard of a prepared folder against the sha256 meta.json recorded when it was written.
    Prints one line per missing or changed shard, then fails with a summary; training itself checks sizes only."""
    from data import load_meta  # lazy: data.py imports torch, which preparing does not need

    d = Path(data_dir)
    meta = load_meta(d)
    bad, unhashed, n = [], 0, 0
    for split, entries in meta["splits"].items():
        for e in entries:
            n += 1
            if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("tokens"), int):
                bad.append(f"{d / 'meta.json'}: bad shard entry {_short(e)} in split {split!r}")
                continue
            f = d / e["file"]
            if not f.is_file():
                bad.append(f"{f}: missing")
            elif f.stat().st_size != 2 * e["tokens"]:
                bad.append(f"{f}: {f.stat().st_size:,} bytes, but meta.json says {e['tokens']:,} tokens "
                           f"({2 * e['tokens']:,} bytes)")
            elif "sha256" not in e:
                unhashed += 1
            elif (h := _sha256_file(f).hexdigest()) != e["sha256"]:
                bad.append(f"{f}: changed (sha256 {h[:16]}..., meta.json recorded {str(e['sha256'])[:16]}...)")
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        raise UserError(f"{len(bad)} of {n} shards in {d} are missing or changed; prepare it again with "
                        "prepare_data.py --overwrite (same options)")
    if unhashed:
        raise UserError(f"{d / 'meta.json'} records no sha256 for {unhashed} of {n} shards (written by an older "
                        "prepare_data.py; their sizes are right): prepare it again with --overwrite to record them")
    print(f"{d}: all {n} shards ok (sizes and sha256 as meta.json records)")
    return {"shards": n}


def _unescape(s: str) -> str:
    """--doc-sep '\\n\\n' from a shell means two newlines."""
    return re.sub(r"\\([nrt\\])", lambda m: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[m.group(1)], s)


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, help="a named source (default: openwebtext)")
    p.add_argument("--files", nargs="+", default=[], help="local .txt/.jsonl/.parquet/WikiExtractor files or dirs")
    p.add_argument("--name", help="output name for --files: data/<name> (default: first file's stem)")
    p.add_argument("--out-dir", help="output folder (default: data/<name>)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/HF field holding the text (default: text)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format of --files (default: auto)")
    p.add_argument("--doc-sep", type=_unescape, help="txt: split files into documents at this string, e.g. '\\n\\n'"
                   " (default: each file is one document)")
    p.add_argument("--wiki-title", choices=("keep", "drop"), default="keep",
                   help="WikiExtractor: keep each article's title line as its first line (default) or drop it")
    p.add_argument("--shakespeare-path", help="Tiny Shakespeare text file "
                   "(default: data/tinyshakespeare.txt, shipped with the repository)")
    p.add_argument("--val-fraction", type=float, help="fraction of documents for val, by seeded hash "
                   "(default 0.0005; shakespeare 0.1)")
    p.add_argument("--val-docs", type=int, help="instead: the first N documents go to val "
                   f"(default for fineweb: {FINEWEB_VAL_DOCS:,})")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-proc", type=int, default=default_num_proc(),
                   help="tokenizer processes (default: the CPUs this process may use)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--batch-chars", type=int, default=1 << 20, help="characters of text per pool task")
    p.add_argument("--streaming", action="store_true", help="HF sources: stream instead of downloading first")
    p.add_argument("--overwrite", action="store_true", help="redo a dataset that is already complete")
    p.add_argument("--restart", action="store_true",
                   help="discard a partial run in the output folder and start over (default: continue it)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder: re-hash every shard against meta.json")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    if a.val_fraction is not None and a.val_docs is not None:
        p.error("give --val-fraction or --val-docs, not both")
    return PrepareConfig(**vars(a))


def main(argv: list[str] | None = None) -> dict | None:
    cfg = parse_args(argv)
    return verify(cfg.verify) if cfg.verify is not None else prepare(cfg)


if __name__ == "__main__":
    run_main(main)
