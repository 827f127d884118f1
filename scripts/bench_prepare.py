"""Benchmark prepare_data.py: tokens/s against the raw limit of tiktoken's encode_ordinary_batch on the same
documents with the same number of cores, and peak memory at 1x and 10x input size.

    python scripts/bench_prepare.py --num-proc 2

Input: Tiny Shakespeare speeches (data/tinyshakespeare.txt) + WikiText-2 test paragraphs (the complete
wikitext2_raw/wiki.test.raw in --data-dir, default $SHARED_DATA_DIR), as a txt file of documents joined by a
separator, repeated --repeat times for "1x" and 10x that for "10x".
prepare_data.py runs as a subprocess; its own tokens/s (printed in its summary, timed from the first document
to meta.json) is compared with the raw limit, and its memory is sampled every 20 ms with psutil: the peak RSS
of the main process and the peak of the summed RSS of main + pool workers (forked workers share pages, so the
sum overstates real use).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenizer import get_tokenizer  # noqa: E402

SEP = "<|doc-sep|>"


def corpus_docs(data_dir: Path) -> list[str]:
    shakespeare = (REPO / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    wikitext = (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text().split("\n \n")
    return [d for d in shakespeare + wikitext if d.strip()]


def raw_limit(docs: list[str], num_proc: int, tries: int = 3) -> float:
    """Best tokens/s of encode_ordinary_batch on the documents (tiktoken's thread pool, num_proc threads)."""
    enc = get_tokenizer()
    best = 0.0
    for _ in range(tries):
        t0 = time.perf_counter()
        n = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=num_proc))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def run_prepare(src: Path, out: Path, num_proc: int) -> dict:
    import psutil

    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--files", str(src), "--doc-sep", SEP, "--out-dir",
           str(out), "--num-proc", str(num_proc), "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main_rss = ps.memory_info().rss
            tree = main_rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:  # a process ended between listing and reading
            continue
        peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree)
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare_data.py failed: {stderr.strip()}")
    m = re.search(r"([\d,]+) tokens in ([\d.]+) s = ([\d.]+)M tokens/s", stdout)
    tokens = int(m.group(1).replace(",", ""))
    return {"tokens": tokens, "tok_s": float(m.group(3)) * 1e6, "wall_tok_s": tokens / wall,
            "peak_main_mib": peak_main / 2**20, "peak_tree_mib": peak_tree / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=4, help="copies of the base corpus in the 1x input")
    mirror = os.environ.get("SHARED_DATA_DIR") or None
    p.add_argument("--data-dir", default=mirror, required=mirror is None,
                   help="folder holding the complete wikitext2_raw/wiki.test.raw (default: $SHARED_DATA_DIR)")
    args = p.parse_args()
    docs = corpus_docs(Path(args.data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        load = os.getloadavg()[0]
        for scale in (1, 10):
            src = tmp / f"input_{scale}x.txt"
            src.write_text(SEP.join(docs * (args.repeat * scale)))
            # the raw limit is measured right before and after each run (a busy machine drifts); rows use the mean
            before = raw_limit(docs * args.repeat, args.num_proc)
            r = run_prepare(src, tmp / "out", args.num_proc)
            after = raw_limit(docs * args.repeat, args.num_proc)
            rows.append((scale, src.stat().st_size, r, (before + after) / 2))
    print(f"num_proc={args.num_proc}, cpu_count={os.cpu_count()}, load average at start {load:.1f}, "
          f"{len(docs) * args.repeat:,} docs in 1x")
    print("scale | input MB | tokens | prepare tok/s | raw limit tok/s | ratio | end-to-end tok/s | "
          "peak RSS main | peak RSS all")
    for scale, size, r, limit in rows:
        print(f"{scale:>4}x | {size / 1e6:8.1f} | {r['tokens']:,} | {r['tok_s'] / 1e6:.2f}M | {limit / 1e6:.2f}M | "
              f"{r['tok_s'] / limit:.2f} | {r['wall_tok_s'] / 1e6:.2f}M | {r['peak_main_mib']:.0f} MiB | "
              f"{r['peak_tree_mib']:.0f} MiB")
    grow = rows[1][2]["peak_tree_mib"] / rows[0][2]["peak_tree_mib"]
    one = raw_limit(docs * args.repeat, 1)
    print(f"single-thread encode_ordinary_batch: {one / 1e6:.2f}M tokens/s; x{args.num_proc} (ideal linear scaling) = "
          f"{one * args.num_proc / 1e6:.2f}M; prepare 10x / ideal = {rows[1][2]['tok_s'] / (one * args.num_proc):.2f}")
    print(f"peak RSS (all processes) 10x / 1x = {grow:.2f}")


if __name__ == "__main__":
    main()
