"""scripts/modern_cpu_study.py's summary: lm-eval JSON files of both recipes and two seeds -> each recipe's mean ±
std over seeds and modern - gpt2 ± Welch's standard error, checked against numpy on made-up values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from errors import run_main

sys.path.append(str(REPO / "scripts"))
import modern_cpu_study as study  # noqa: E402

# (recipe, seed) -> (lambada acc, lambada ppl, wikitext word ppl)
VALUES = {("gpt2", 1337): (0.02, 9000.0, 2500.0), ("gpt2", 1338): (0.03, 8000.0, 2300.0),
          ("modern", 1337): (0.06, 3000.0, 900.0), ("modern", 1338): (0.08, 2600.0, 850.0)}


def write_evals(out: Path) -> None:
    (out / "eval").mkdir(parents=True)
    for (recipe, seed), (acc, ppl, wppl) in VALUES.items():
        results = {"lambada_openai_local": {"acc,none": acc, "acc_stderr,none": 0.003, "perplexity,none": ppl,
                                            "perplexity_stderr,none": 400.0},
                   "wikitext_local": {"word_perplexity,none": wppl, "bits_per_byte,none": 2.0}}
        path = out / "eval" / f"{study.run_name(recipe, seed)}_L512.json"
        path.write_text(json.dumps({"results": results, "limit": None}))


def test_recipe_table_means_stds_and_welch_se(tmp_path):
    write_evals(tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in study.recipe_table(tmp_path, [1337, 1338]).splitlines()}
    for col, title in ((0, "lambada acc"), (1, "lambada ppl"), (2, "wikitext word_ppl")):
        a = np.array([VALUES[("gpt2", s)][col] for s in (1337, 1338)])
        b = np.array([VALUES[("modern", s)][col] for s in (1337, 1338)])
        se = np.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2)
        cells = [c.strip() for c in rows[title].strip("|").split("|")]
        assert cells[1] == f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"
        assert cells[2] == f"{b.mean():.4f} ± {b.std(ddof=1):.4f}"
        assert cells[3] == f"{b.mean() - a.mean():+.4f} ± {se:.4f}"


def test_summary_only_writes_lm_eval_md_and_names_a_missing_file(tmp_path, capsys):
    write_evals(tmp_path)
    study.main(["--out", str(tmp_path), "--summary-only"])
    text = (tmp_path / "lm_eval.md").read_text()
    assert "wikipedia_modern_cpu_seed1338" in text and "modern − gpt2" in text
    (tmp_path / "eval" / "wikipedia_cpu_seed1338_L512.json").unlink()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: study.main(["--out", str(tmp_path), "--summary-only"]))
    assert e.value.code == 2 and "wikipedia_cpu_seed1338_L512.json is missing" in capsys.readouterr().err
