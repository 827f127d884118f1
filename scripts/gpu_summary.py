"""Print bench.py JSON results as a Markdown table (the rows docs/performance.md takes).

    python scripts/gpu_summary.py out/gpu_check/bench_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(paths: list[str]) -> None:
    print("| command | device | tokens/s | step ms (median) | MFU vs peak | MFU vs measured matmul | "
          "peak memory GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"| {p}: unreadable ({e}) |")
            continue
        ceiling = f" of {r['ceiling_tflops']:.3g} TFLOP/s" if r.get("ceiling_tflops") else ""
        print(f"| `{r['command']}` | {r['device_name']} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | "
              f"{fmt(r['mfu'], '.1%')} | {fmt(r['mfu_vs_ceiling'], '.1%')}{ceiling} | "
              f"{r['peak_memory_bytes'] / 2**30:.1f} | {fmt(r['compile_s'], '.0f')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
