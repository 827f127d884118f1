"""Turn a text corpus into uint16 GPT-2 token shards: data/<name>/{train,val}_NNNNNN.bin + meta.json.

    python prepare_data.py                                  # OpenWebText (HF Skylion007/openwebtext)
    python prepare_data.py --dataset fineweb-edu --streaming  # FineWeb-edu sample-10BT, no full download
    python prepare_data.py --dataset shakespeare            # Tiny Shakespeare, CPU quickstart
    python prepare_data.py --files a.jsonl b.parquet c.txt --text-field text --name mycorpus
    python prepare_data.py --files wiki/AA --name wiki      # WikiExtractor output (auto-detected)

Documents flow through in input order: the main process reads them, cuts them into batches, and a
multiprocessing pool tokenizes the batches (tiktoken encode_ordinary); results are taken back in submission
order, so the output bytes do not depend on --num-proc. At most 2 x num_proc batches are in flight and shards
are written to disk as they fill, so memory stays flat as the input grows. Every document is preceded by EOT
(50256). A document goes to val by a seeded hash of its index in the stream (or the first --val-docs
documents do), never by where it lands in the pool. Shards are written as .tmp and renamed; meta.json comes
last, so a folder with meta.json is complete. Format: docs/design.md "Formats".
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import ArgumentParser, UserError, run_main
from tokenizer import EOT, VOCAB_SIZE, get_tokenizer

REPO = Path(__file__).resolve().parent
FORMAT_VERSION = 1
# Hugging Face sources: (dataset path, config name, output folder under data/).
HF_SOURCES = {
    "openwebtext": ("Skylion007/openwebtext", None, "openwebtext"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "fineweb_edu"),
}
DATASETS = (*HF_SOURCES, "shakespeare")
FORMATS = ("auto", "txt", "jsonl", "parquet", "wikiextractor")
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"  # shipped: karpathy/char-rnn's input.txt, public domain
WIKI_HEADER = re.compile(r'<doc id="[^"]*" url="[^"]*" title="[^"]*">$')


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
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 100_000_000
    batch_chars: int = 1 << 20  # text per pool task: large enough to amortize IPC, small enough to stay lean
    streaming: bool = False  # HF sources: iterate over the hub instead of downloading everything first
    overwrite: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------------- sources
def hf_documents(path: str, name: str | None, text_field: str, streaming: bool, label: str,
                 data_files: list[str] | None = None, num_proc: int | None = None) -> Iterator[str]:
    """Documents from a `datasets` source: a hub dataset, or the local "json"/"parquet" builders (the same
    code path, which is how the hub path is tested offline)."""
    import datasets  # lazy: GPU machines need not have it

    kwargs = {} if streaming or num_proc is None else {"num_proc": num_proc}  # parallel download/convert
    try:
        ds = datasets.load_dataset(path, name=name, data_files=data_files, split="train", streaming=streaming,
                                   **kwargs)
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
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not read {label}: {type(e).__name__}: {msg}") from e


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


def resolve(cfg: PrepareConfig) -> tuple[Iterator[str], Path, str]:
    """The document stream, the output folder and a description of the source, from the config."""
    if cfg.files:
        if cfg.dataset is not None:
            raise UserError("give either --dataset or --files, not both")
        paths = expand_files(cfg.files)
        name = cfg.name or paths[0].stem
        source = "files: " + " ".join(str(p) for p in paths)
        docs = file_documents(paths, cfg)
    elif (cfg.dataset or "openwebtext") in HF_SOURCES:
        hf_path, hf_name, name = HF_SOURCES[cfg.dataset or "openwebtext"]
        name = cfg.name or name
        source = f"hf:{hf_path}" + (f" ({hf_name})" if hf_name else "")
        docs = hf_documents(hf_path, hf_name, cfg.text_field, cfg.streaming, source, num_proc=cfg.num_proc)
    elif cfg.dataset == "shakespeare":
        p = Path(cfg.shakespeare_path or SHAKESPEARE)
        if not p.is_file():
            raise UserError(f"Tiny Shakespeare not found at {p}; pass --shakespeare-path (karpathy/char-rnn "
                            "data/tinyshakespeare/input.txt)")
        name = cfg.name or "shakespeare"
        source = f"shakespeare: {p} (speeches, split at blank lines)"
        docs = txt_documents(p, "\n\n")
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)} or pass --files")
    out = Path(cfg.out_dir) if cfg.out_dir else REPO / "data" / name
    return docs, out, source


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


def encode_batch(batch: tuple[list[str], np.ndarray]) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Tokenize a batch of documents: (train tokens, train docs, val tokens, val docs), each document
    preceded by EOT. Runs in the pool workers (and in the main process with --num-proc 1)."""
    texts, is_val = batch
    enc = get_tokenizer()
    train: list[int] = []
    val: list[int] = []
    for text, v in zip(texts, is_val):
        out = val if v else train
        out.append(EOT)
        out += enc.encode_ordinary(text)
    n_val = int(is_val.sum())
    return np.array(train, dtype="<u2"), len(texts) - n_val, np.array(val, dtype="<u2"), n_val


def batches(docs: Iterator[str], cfg: PrepareConfig) -> Iterator[tuple[list[str], np.ndarray]]:
    """Group documents into pool tasks of about batch_chars characters, with their val flags. Whitespace-only
    documents are dropped (and do not count as an index)."""
    frac = 0.0005 if cfg.val_fraction is None else cfg.val_fraction
    start, texts, chars = 0, [], 0
    for text in docs:
        if not text.strip():
            continue
        texts.append(text)
        chars += len(text)
        if chars >= cfg.batch_chars:
            yield texts, val_mask(start, len(texts), cfg.seed, frac, cfg.val_docs)
            start, texts, chars = start + len(texts), [], 0
    if texts:
        yield texts, val_mask(start, len(texts), cfg.seed, frac, cfg.val_docs)


def encoded(
    tasks: Iterator[tuple[list[str], np.ndarray]], pool: ProcessPoolExecutor | None, num_proc: int
) -> Iterator[tuple]:
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


class ShardWriter:
    """Appends tokens of one split to {split}_NNNNNN.bin.tmp, renaming each shard once it holds shard_tokens
    tokens (the last one when closed). A shard's `docs` is the number of documents that start in it."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.entries: list[dict] = []
        self.f = None
        self.tokens = self.docs = 0

    def write(self, arr: np.ndarray) -> None:
        while len(arr):
            if self.f is None:
                self.f = open(self._path(".tmp"), "wb")
                self.tokens = self.docs = 0
            piece, arr = arr[: self.shard_tokens - self.tokens], arr[self.shard_tokens - self.tokens:]
            self.f.write(piece.tobytes())
            self.tokens += len(piece)
            self.docs += int(np.count_nonzero(piece == EOT))
            if self.tokens == self.shard_tokens:
                self._finish_shard()

    def close(self) -> None:
        if self.f is not None:
            self._finish_shard()

    def _path(self, suffix: str = "") -> Path:
        return self.out_dir / f"{self.split}_{len(self.entries):06d}.bin{suffix}"

    def _finish_shard(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        final = self._path()
        _fsync_replace(self._path(".tmp"), final)
        self.entries.append({"file": final.name, "tokens": self.tokens, "docs": self.docs})


def _clean(out: Path) -> None:
    """Remove what an earlier run of this script left (only its own file names)."""
    if (out / "meta.json").exists():
        (out / "meta.json").unlink()  # first: from here on the folder no longer claims to be complete
    for pattern in ("meta.json.tmp", "train_*.bin", "val_*.bin", "train_*.bin.tmp", "val_*.bin.tmp"):
        for p in out.glob(pattern):
            p.unlink()


def write_meta(out: Path, source: str, writers: dict[str, ShardWriter]) -> dict:
    meta = {"format": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "eot": EOT,
            "dtype": "uint16", "source": source, "splits": {s: w.entries for s, w in writers.items()}}
    tmp = out / "meta.json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_replace(tmp, out / "meta.json")
    return meta


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
    """Prepare the dataset described by cfg. Returns a summary, or None if it was already complete."""
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
    docs, out, source = resolve(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file; pass another --out-dir")
    if (out / "meta.json").is_file() and not cfg.overwrite:
        print(f"{out} is already prepared (meta.json exists); pass --overwrite to redo it")
        return None

    get_tokenizer()  # load before forking so that the workers inherit it
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # A ProcessPoolExecutor, not multiprocessing.Pool: Pool.terminate() on an error path can deadlock when it
    # kills a worker that holds the result pipe's lock while sending a large batch of tokens.
    pool = ProcessPoolExecutor(cfg.num_proc, mp_context=ctx) if cfg.num_proc > 1 else None
    if pool is not None:
        pool.submit(int).result()  # fork the workers now, before the source starts any threads
    progress = None
    try:
        tasks = batches(docs, cfg)
        first = next(tasks, None)  # read before touching the output folder: empty input changes nothing
        if first is None:
            raise UserError(f"no documents in {source} (empty or whitespace-only input)")
        out.mkdir(parents=True, exist_ok=True)
        _clean(out)
        writers = {s: ShardWriter(out, s, cfg.shard_tokens) for s in ("train", "val")}
        progress = _Progress(cfg.progress)
        t0 = time.perf_counter()
        n_docs = {"train": 0, "val": 0}

        def all_tasks():
            yield first
            yield from tasks

        for train, n_train, val, n_val in encoded(all_tasks(), pool, cfg.num_proc):
            writers["train"].write(train)
            writers["val"].write(val)
            n_docs["train"] += n_train
            n_docs["val"] += n_val
            progress.update(n_train + n_val, len(train) + len(val))
        for w in writers.values():
            w.close()
        meta = write_meta(out, source, writers)
    finally:
        if progress is not None:
            progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # queued batches dropped, running ones finish
    elapsed = time.perf_counter() - t0
    tokens = {s: sum(e["tokens"] for e in meta["splits"][s]) for s in n_docs}
    total = sum(tokens.values())
    summary = {"out_dir": str(out), "docs": n_docs, "tokens": tokens, "elapsed_s": elapsed,
               "tokens_per_s": total / max(elapsed, 1e-9), "num_proc": cfg.num_proc}
    print(f"prepared {out}: train {n_docs['train']:,} docs {tokens['train']:,} tokens "
          f"({len(meta['splits']['train'])} shards), val {n_docs['val']:,} docs {tokens['val']:,} tokens "
          f"({len(meta['splits']['val'])} shards); {total:,} tokens in {elapsed:.1f} s = "
          f"{summary['tokens_per_s'] / 1e6:.2f}M tokens/s with {cfg.num_proc} processes")
    for split in ("train", "val"):
        if n_docs[split] == 0:
            print(f"warning: the {split} split is empty (adjust --val-fraction / --val-docs, or split the "
                  "input into more documents with --doc-sep)", file=sys.stderr)
    return summary


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
    p.add_argument("--val-docs", type=int, help="instead: the first N documents go to val")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--batch-chars", type=int, default=1 << 20, help="characters of text per pool task")
    p.add_argument("--streaming", action="store_true", help="HF sources: stream instead of downloading first")
    p.add_argument("--overwrite", action="store_true", help="redo a dataset that is already complete")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    if a.val_fraction is not None and a.val_docs is not None:
        p.error("give --val-fraction or --val-docs, not both")
    return PrepareConfig(**vars(a))


def main(argv: list[str] | None = None) -> dict | None:
    return prepare(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
