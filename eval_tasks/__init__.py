"""Offline variants of lm-eval's hellaswag, lambada_openai and wikitext tasks.

The YAML templates here copy the official task definitions (lm-eval 0.4.x) and change only where the data
comes from: local files instead of the Hugging Face hub. lm-eval needs absolute data paths in a task YAML,
so `write_local_tasks` fills them in and writes the YAMLs (plus task_utils.py, which they reference) into a
folder that is then passed to lm-eval's TaskManager as include_path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from errors import UserError

HERE = Path(__file__).resolve().parent

# standard task name -> (local task name, file under --data-dir it reads)
LOCAL_TASKS = {
    "hellaswag": ("hellaswag_local", "hellaswag_val.jsonl"),
    "lambada_openai": ("lambada_openai_local", "lambada_openai_test.jsonl"),
    "wikitext": ("wikitext_local", "wikitext2_raw/wiki.test.raw"),
}


def wikitext_documents(raw_text: str) -> list[str]:
    """Split WikiText's wiki.*.raw into articles exactly as the EleutherAI/wikitext_document_level dataset
    script does (its _generate_examples): a new page starts at each top-level ` = Title = ` line."""
    pages, lines = [], []
    for line in raw_text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def write_local_tasks(data_dir: str | Path, out_dir: str | Path, tasks: list[str]) -> dict[str, str]:
    """Write the local task YAMLs for `tasks` (standard names) reading files under data_dir into out_dir.
    Returns {standard name: local task name}."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "task_utils.py", out_dir / "task_utils.py")
    names = {}
    for task in tasks:
        if task not in LOCAL_TASKS:
            raise UserError(f"unknown task {task!r}; with --data-dir choose from {sorted(LOCAL_TASKS)}")
        local_name, rel = LOCAL_TASKS[task]
        src = data_dir / rel
        if not src.is_file():
            raise UserError(f"task {task} needs {src}, which does not exist (check --data-dir)")
        if task == "wikitext":  # one {"page": article} record per line, like the hub dataset's test split
            pages = wikitext_documents(src.read_text(encoding="utf-8"))
            src = out_dir / "wikitext2_test_documents.jsonl"
            src.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages), encoding="utf-8")
        template = (HERE / f"{local_name}.yaml.in").read_text()
        placeholder = {"hellaswag": "@HELLASWAG_JSONL@", "lambada_openai": "@LAMBADA_JSONL@",
                       "wikitext": "@WIKITEXT_JSONL@"}[task]
        # a JSON string is a valid YAML double-quoted scalar: safe for any path
        (out_dir / f"{local_name}.yaml").write_text(template.replace(placeholder, json.dumps(str(src))))
        names[task] = local_name
    return names
