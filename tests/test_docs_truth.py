"""The docs stay true to the code: README.md and docs/*.md name only what exists, show only flags the scripts
accept, the scripts' --help opens with a whole sentence, and the README quickstart shows the lines train.py prints.

- Names: every backticked `module.name` of a repository module (a .py file at the root or in scripts/) names
  something that module defines at top level, and every `from module import a, b` of a python block imports
  names it defines; every pytest id (`test_x.py::test_y`) names a test that exists.
- Paths: every backticked repository path (under config/, data/, docs/, eval_tasks/, scripts/, tests/, or a
  bare file name like `train.py`) and every relative Markdown link exists, except what commands create
  (OUTPUTS); every command's script (`python X.py`, `torchrun ... X.py`, `bash scripts/X.sh`) exists.
- Flags: every `--flag` a command passes to a repository script (code blocks and code spans, `\\` continuation
  lines joined) is one that script accepts: its argparse options (read from its --help; exactly, no
  abbreviations), train.py's TrainConfig fields (`--key=value`, `--model_overrides.X` with X a GPTConfig field),
  a shell script's `case` patterns; the keys of ablate.py's and bench.py's `--set KEY=VALUE` and of
  TRAIN_OVERRIDES="..." likewise. A code span of flags alone (`--micro_batch=auto`) names flags some repository
  script (or torchrun) accepts.
- --help: every script's description opens with a whole sentence (its first paragraph ends with a period).
- Quickstart: the README block of train.py's output has the line formats train.py prints today (a 3-step run of
  config/shakespeare_cpu.py, numbers and paths masked)."""

from __future__ import annotations

import ast
import functools
import glob
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _markdown import code_spans, fenced_blocks
from conftest import REPO, hide_gpu

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# What runs create, so that the docs name paths that a fresh clone lacks: run folders (out/), the datasets
# prepare_data.py writes into data/ (the repository ships only data/tinyshakespeare.txt and data/gpt2_bpe/),
# and the files runs write, named bare in prose (report.py's report, ablate.py's results, a study's summary).
OUTPUTS = ("out/", "data/openwebtext", "data/fineweb", "data/shakespeare", "data/wiki", "data/mycorpus")
OUTPUT_NAMES = {"report.md", "results.md", "summary.md"}
# Flags the docs show on purpose as wrong: the one-line error an unknown flag gets.
SHOWN_WRONG = {"--lrr": "train.py's unknown-key error", "--bogus": "the argparse CLIs' unknown-flag error"}
PLACEHOLDER_FLAGS = {"--key"}  # `--key=value`: any TrainConfig field

EXTENSIONS = {"py", "md", "sh", "txt", "json", "jsonl", "toml", "png", "pt", "bin", "raw", "log", "csv", "yaml",
              "parquet", "pdf", "cfg", "ini", "html"}
TOP_DIRS = {"config", "docs", "scripts", "tests", "data", "eval_tasks", ".ci"}
PYTHON = re.compile(r"^(?:.*/)?python[\d.]*$|^\$\{?PYTHON\}?$")
WRAPPERS = {"nice", "timeout", "time", "/usr/bin/time", "env", "taskset", "nohup", "exec", "numactl", "sudo"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def modules() -> dict[str, Path]:
    """The repository's importable modules by name: the .py files at the root and in scripts/."""
    return {p.stem: p for p in [*sorted(REPO.glob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]}


@functools.cache
def repo_files() -> set[str]:
    """Every file of the working tree (git's tracked and untracked-but-not-ignored files), as repo-relative paths."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    files = set(out.stdout.split()) if out.returncode == 0 else set()
    return files or {rel(p) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts}


# ----------------------------------------------------------------------------------------------------
# The docs' code: code spans and fenced blocks, as tokens that know their line.

@dataclass(frozen=True)
class Tok:
    text: str
    line: int


@dataclass
class Snippet:
    doc: str
    line: int  # the first line
    text: str
    fenced: bool
    lang: str = ""


@dataclass
class Command:
    """One simple command that runs a repository script."""

    where: str  # doc:line of the script token
    script: str  # as written: train.py, scripts/x.py, scripts/x.sh
    args: list[Tok]
    env: dict[str, Tok] = field(default_factory=dict)


@functools.cache
def snippets() -> tuple[Snippet, ...]:
    out = []
    for doc in DOCS:
        text, name = doc.read_text(), rel(doc)
        out += [Snippet(name, line, span, False) for line, span in code_spans(text)]
        out += [Snippet(name, line, "\n".join(lines), True, lang) for line, lang, lines in fenced_blocks(text)]
    return tuple(out)


def physical_tokens(line: str, lineno: int) -> tuple[list[Tok], bool]:
    """A line's shell words (quotes kept, a comment dropped), and whether it ends in a `\\` continuation."""
    toks = []
    for m in re.finditer(r"(?:\"[^\"]*\"|'[^']*'|[^\s\"'])+", line):
        if m.group().startswith("#"):
            break
        toks.append(Tok(m.group(), lineno))
    cont = bool(toks) and toks[-1].text == "\\"
    return [t for t in toks if t.text != "\\"], cont


def logical_lines(s: Snippet) -> Iterator[list[Tok]]:
    """A fenced block's commands, continuation lines joined; a code span is one line (its line breaks are
    wrapping)."""
    lines = s.text.split("\n")
    if not s.fenced:
        yield [t for i, line in enumerate(lines) for t in physical_tokens(line, s.line + i)[0]]
        return
    joined: list[Tok] = []
    for i, line in enumerate(lines):
        toks, cont = physical_tokens(line, s.line + i)
        joined += toks
        if not cont:
            yield joined
            joined = []
    if joined:
        yield joined


def simple_commands(toks: list[Tok]) -> Iterator[list[Tok]]:
    """Split at && || ; | and drop redirections."""
    cmd: list[Tok] = []
    skip = False
    for t in toks:
        if skip:
            skip = False
            continue
        text = t.text
        if text in OPERATORS:
            yield cmd
            cmd = []
            continue
        if re.fullmatch(r"\d?>>?|<|\d?>&\d", text):
            skip = not text.endswith(tuple("0123456789"))
            continue
        if re.match(r"\d?>>?[^>]", text):  # >file, 2>>file (a <placeholder> is no redirection)
            continue
        ends = text.endswith(";") and len(text) > 1
        cmd.append(Tok(text.rstrip(";"), t.line) if ends else t)
        if ends:
            yield cmd
            cmd = []
    yield cmd


def parse_command(toks: list[Tok], doc: str) -> Command | None:
    """The repository script a simple command runs (python X.py, python -m X, torchrun ... X.py, bash X.sh),
    with its arguments and the environment it sets; None for any other command."""
    env: dict[str, Tok] = {}
    i, wrapped = 0, False
    if toks and toks[0].text == "$":
        i = 1
    while i < len(toks):  # environment assignments and wrappers (nice -n 19, /usr/bin/time -v, ...)
        t = toks[i].text
        if re.match(r"^[A-Za-z_]\w*=", t):
            name, _, value = t.partition("=")
            env[name] = Tok(value.strip("\"'"), toks[i].line)
        elif t in WRAPPERS:
            wrapped = True
        elif not (wrapped and re.fullmatch(r"-\w+|[\d.,-]+[smh]?", t)):
            break
        i += 1
    if i >= len(toks):
        return None
    word, rest = toks[i].text.strip("\"'"), toks[i + 1:]
    if PYTHON.match(word):
        while rest and rest[0].text in ("-u", "-B", "-O", "-X", "-W"):
            rest = rest[2:] if rest[0].text in ("-X", "-W") else rest[1:]
        if not rest or rest[0].text == "-c":
            return None
        if rest[0].text == "-m":
            if len(rest) < 2:
                return None
            mod = rest[1].text
            if mod in ("torch.distributed.run", "torch.distributed.launch"):
                return torchrun_command(rest[2:], env, doc)
            path = mod.replace(".", "/") + ".py"  # train, scripts.gpu_check
            if not (REPO / path).is_file():
                return None  # pytest, pip, ...
            return Command(f"{doc}:{rest[1].line}", path, rest[2:], env)
        script = rest[0]
        if not script.text.endswith(".py"):
            return None
        return Command(f"{doc}:{script.line}", script.text, rest[1:], env)
    if word == "torchrun":
        return torchrun_command(rest, env, doc)
    if normalized(word) in main_scripts():  # `train.py config/gpt2_owt.py --compile=true` in a table
        return Command(f"{doc}:{toks[i].line}", word, rest, env)
    if word in ("bash", "sh") and rest and not rest[0].text.startswith("-"):
        return Command(f"{doc}:{rest[0].line}", rest[0].text, rest[1:], env)
    return None


def torchrun_command(rest: list[Tok], env: dict[str, Tok], doc: str) -> Command | None:
    j = next((j for j, t in enumerate(rest) if t.text.endswith(".py")), None)
    return None if j is None else Command(f"{doc}:{rest[j].line}", rest[j].text, rest[j + 1:], env)


@functools.cache
def main_scripts() -> frozenset[str]:
    """The programs: .py files at the root and in scripts/ with a __main__ block."""
    return frozenset(rel(p) for p in [*REPO.glob("*.py"), *(REPO / "scripts").glob("*.py")]
                     if re.search(r"""^if __name__ == ["']__main__["']""", p.read_text(), re.M))


def snippet_commands(s: Snippet) -> Iterator[Command]:
    if s.lang and s.lang not in ("bash", "sh", "shell", "console", "text"):
        return  # python and json blocks hold no commands
    for line in logical_lines(s):
        for cmd in simple_commands(line):
            c = parse_command(cmd, s.doc)
            if c is not None:
                yield c


@functools.cache
def commands() -> tuple[Command, ...]:
    return tuple(c for s in snippets() for c in snippet_commands(s))


def normalized(script: str) -> str:
    return script[2:] if script.startswith("./") else script


def has_placeholder(text: str) -> bool:
    return bool(re.search(r"[<>$*{}…]|\.\.\.", text))


# ----------------------------------------------------------------------------------------------------
# 1. module.name

# The docs' `model.generate(...)` may be a GPT held in a variable named model, as in the code: model.py's GPT's
# attributes count as model.py's names.
INSTANCE_NAMES = {"model": "GPT"}


@functools.cache
def top_level_names(path: Path) -> tuple[set[str], dict[str, str]]:
    """The names a module defines at top level (def, class, assignment, also inside top-level if/try blocks), and
    the names it only imports, with the module they come from."""
    defined: set[str] = set()
    imported: dict[str, str] = {}

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    defined.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    source = node.module if isinstance(node, ast.ImportFrom) else a.name
                    imported[(a.asname or a.name).split(".")[0]] = source or "."
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(ast.parse(path.read_text()).body)
    return defined, {k: v for k, v in imported.items() if k not in defined}


def class_attributes(path: Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for n in ast.walk(node):  # self.x = ... in its methods, class-level assignments
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
            out.add(n.attr)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
    return out


def name_refs() -> Iterator[tuple[str, str, str]]:
    """(doc:line, module, name) for each `module.name` of a code span, and in a python block each name of a
    `from module import ...` and each `module.name` of a module it imports (elsewhere in a python block,
    `tokenizer.eos_token` is a variable's attribute)."""
    mods = modules()
    ref = re.compile(r"(?<![\w./\-$<])([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
    for s in snippets():
        if s.fenced and s.lang != "python":
            continue  # commands and program output: file names, not module attributes
        lines = s.text.split("\n")
        imported = set(re.findall(r"^\s*import\s+(\w+)", s.text, re.M)) if s.fenced else set(mods)
        for i, line in enumerate(lines):
            for m in ref.finditer(line):
                mod, name = m.groups()
                if mod in mods and mod in imported and name not in EXTENSIONS:
                    yield f"{s.doc}:{s.line + i}", mod, name
            m = re.match(r"\s*from\s+(\w+)\s+import\s+\(?([\w\s,]+)", line) if s.fenced else None
            if m and m.group(1) in mods:
                for name in re.split(r"[\s,]+", m.group(2).strip()):
                    if name:
                        yield f"{s.doc}:{s.line + i}", m.group(1), name


def test_module_names_exist() -> None:
    mods = modules()
    names = {m: top_level_names(p) for m, p in mods.items()}
    bad = []
    for where, mod, name in name_refs():
        defined, imported = names[mod]
        if name in defined or (mod in INSTANCE_NAMES and name in class_attributes(mods[mod], INSTANCE_NAMES[mod])):
            continue
        how = f"only imports it (from {imported[name]})" if name in imported else "has no such top-level name"
        bad.append(f"{where}: `{mod}.{name}`: {rel(mods[mod])} {how}")
    assert not bad, "the docs name module attributes that do not exist:\n" + "\n".join(sorted(set(bad), key=order))


def order(line: str) -> tuple[str, int, str]:
    m = re.match(r"([^:]+):(\d+):?(.*)", line)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else (line, 0, "")


def test_named_tests_exist() -> None:
    """Every pytest id the docs give (`test_x.py::test_y[param]`, `tests/test_x.py::test_y`) names a test."""
    bad = []
    for s in snippets():
        for i, line in enumerate(s.text.split("\n")):
            for m in re.finditer(r"(?<![\w/])((?:tests/)?(test_\w+\.py))::(\w+)", line):
                where, path = f"{s.doc}:{s.line + i}", REPO / "tests" / m.group(2)
                if not path.is_file():
                    bad.append(f"{where}: {m.group(0)}: tests/{m.group(2)} does not exist")
                elif m.group(3) not in top_level_names(path)[0]:
                    bad.append(f"{where}: {m.group(0)}: tests/{m.group(2)} has no {m.group(3)}")
    assert not bad, "the docs name tests that do not exist:\n" + "\n".join(sorted(set(bad), key=order))


# ----------------------------------------------------------------------------------------------------
# 2. repository paths

# Bare file names the docs give that are not the repository's, on purpose.
NOT_OURS = {"config.py": "docs/design.md: the config loader is deliberately not called that",
            "openwebtext.py": "the hub dataset's loading script, quoted in an error message",
            "SOURCE.md": "a file of the full-data mirror's Wikipedia folder (docs/data.md), not shipped"}


def path_candidates(token: str) -> Iterator[str]:
    """The repository path a shell word may name: the word itself, or the value of NAME=value / --flag=value,
    without ablate.py's @SEED."""
    token = token.strip("\"'`()[],;:")
    if "=" in token:
        token = token.split("=", 1)[1].strip("\"'")
    token = re.sub(r"@\d+$", "", token).rstrip(".")
    if token:
        yield token


def missing_path(p: str, bare: bool) -> str | None:
    """Why the repository path p does not exist (None: it exists, or it is not checked). A bare file name (no
    folder) is checked only where `bare` (a code span that is the name alone): .py, .sh and .md names must be
    a file somewhere in the repository."""
    if p.startswith(("/", "~", "http")) or has_placeholder(p.replace("*", "")) or "::" in p:
        return None
    p = normalized(p)
    if p.startswith(OUTPUTS):
        return None
    parts = p.rstrip("/").split("/")
    files = repo_files()
    if len(parts) > 1:
        if parts[0] not in TOP_DIRS:
            return None
        target = p.rstrip("/")
        if "*" in target:
            return None if glob.glob(str(REPO / target)) else "matches no file"
        exists = target in files or any(f.startswith(target + "/") for f in files) or (REPO / target).exists()
        return None if exists else "does not exist"
    name = parts[0]
    if not bare or not re.fullmatch(r"[\w.*-]+\.(py|sh|md)", name) or name in OUTPUT_NAMES or name in NOT_OURS:
        return None
    if "*" in name:  # eval_*.py
        return None if glob.glob(str(REPO / name)) else "matches no file"
    if name in files or any(f.endswith("/" + name) for f in files):
        return None
    return "is no file of the repository"


def test_repository_paths_exist() -> None:
    bad = []
    for s in snippets():
        if s.lang in ("json", "python"):
            continue
        words = [Tok(m.group(), s.line + i) for i, line in enumerate(s.text.split("\n"))
                 for m in re.finditer(r"\S+", line)]
        for t in words:
            for p in path_candidates(t.text):
                why = missing_path(p, bare=not s.fenced and len(words) == 1)
                if why:
                    bad.append(f"{s.doc}:{t.line}: `{p}` {why}")
    for doc in DOCS:  # relative Markdown links
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in re.finditer(r"\]\(([^)\s]+)\)", line):
                target = m.group(1).split("#")[0]
                if target and not re.match(r"\w+:", target) and not (doc.parent / target).exists():
                    bad.append(f"{rel(doc)}:{n}: link `{m.group(1)}` does not exist")
    for c in commands():
        script = normalized(c.script)
        if not has_placeholder(script) and not script.startswith("/") and not (REPO / script).is_file():
            bad.append(f"{c.where}: a command runs `{c.script}`, which does not exist")
    assert not bad, ("the docs name repository paths that do not exist (outputs of runs excepted: "
                     f"{', '.join(OUTPUTS)}):\n" + "\n".join(sorted(set(bad), key=order)))


# ----------------------------------------------------------------------------------------------------
# --help of every script (3 and 4 read it)

def help_scripts() -> list[str]:
    """The scripts with a --help: those at the root with a __main__ block that use argparse or answer --help
    themselves (train.py), and every scripts/*.py with a __main__ block."""
    out = []
    for p in [*sorted(REPO.glob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]:
        text = p.read_text()
        if "__name__ == \"__main__\"" not in text and "__name__ == '__main__'" not in text:
            continue
        if p.parent.name == "scripts" or "ArgumentParser(" in text or '"--help"' in text:
            out.append(rel(p))
    return out


# Runs each script's --help, and each argparse subcommand's, in one interpreter (the imports they share, torch's
# above all, load once: ~2 s of CPU in all rather than ~1.5 s per script), as `python SCRIPT --help` would: the
# script as __main__, sys.argv[0] its path, its folder first on sys.path, and the repository modules it imported
# forgotten before the next script (a virtual environment's packages inside the repository stay). Prints
# {"script[ sub]": [exit code, stdout, stderr]} as JSON.
HELP_RUNNER = r"""
import contextlib, io, json, os, re, runpy, sys, traceback
repo, scripts, out = os.getcwd(), sys.argv[1:], {}
def run(args):
    before, path, stdout, stderr = set(sys.modules), list(sys.path), io.StringIO(), io.StringIO()
    sys.argv, sys.path[0], code = [*args, "--help"], os.path.dirname(os.path.abspath(args[0])), 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
        stderr.write(traceback.format_exc())
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(repo) and "site-packages" not in file:
                del sys.modules[name]
    out[" ".join(args)] = [code, stdout.getvalue(), stderr.getvalue()]
    return stdout.getvalue()
for script in scripts:
    m = re.search(r"^usage: \S+ (?:\[[^\]]*\] )*\{([\w,-]+)\}", run([script]), re.M)
    for sub in m.group(1).split(",") if m else []:
        run([script, sub])
print("\n@@help-json@@\n" + json.dumps(out))
"""


@functools.cache
def helps() -> dict[tuple[str, ...], str]:
    """`python SCRIPT [SUBCOMMAND] --help` of every help_scripts() script and argparse subcommand: {(script,) or
    (script, subcommand): its output, or "<exit N>" and the error where it failed}."""
    env = hide_gpu() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                        "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "-c", HELP_RUNNER, *help_scripts()], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the --help runner failed:\n{r.stderr[-3000:]}"
    return {tuple(k.split(" ")): text if code == 0 else f"<exit {code}>\n{text}\n{err[-2000:]}"
            for k, (code, text, err) in json.loads(r.stdout.rpartition("@@help-json@@")[2]).items()}


def option_strings(help_text: str) -> set[str]:
    """The option strings of an argparse help: the options listed in its sections and in its usage."""
    opts: set[str] = set()
    usage, _, sections = help_text.partition("\n\n")
    if usage.startswith("usage:"):
        opts |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", usage))
    in_section = False
    for line in sections.splitlines():
        if re.match(r"^\S.*:$", line):
            in_section = True
        elif in_section and re.match(r"^ {2}-", line):
            spec = re.split(r"\s{2,}", line.strip())[0]
            opts |= set(re.findall(r"(?:^|, )(--?[A-Za-z][\w.-]*)", spec))
    return opts


def description(help_text: str) -> str:
    """The text a --help opens with: argparse's description (after the usage block, before the first section),
    or the first paragraph of a help printed by hand (train.py's docstring)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", help_text.strip())]
    if paras and paras[0].startswith("usage:"):
        paras = paras[1:]
    if not paras or re.fullmatch(r"[\w ]+:", paras[0].split("\n")[0]):
        return ""  # straight to a section: positional arguments:, options:
    return " ".join(paras[0].split())


# ----------------------------------------------------------------------------------------------------
# 3. flags

@functools.cache
def field_names() -> tuple[frozenset[str], frozenset[str]]:
    from train_config import FIELD_TYPES, MODEL_FIELD_TYPES
    return frozenset(FIELD_TYPES), frozenset(MODEL_FIELD_TYPES)


def train_key_problem(key: str) -> str | None:
    """Why `key` (of --key=value) is no train.py override: not a TrainConfig field, nor model_overrides.<GPTConfig
    field>."""
    train_keys, model_keys = field_names()
    if key.startswith("model_overrides."):
        sub = key.split(".", 1)[1]
        return None if sub in model_keys else f"`{sub}` is no GPTConfig field (model_overrides.X)"
    return None if key in train_keys or f"--{key}" in PLACEHOLDER_FLAGS else "no TrainConfig field"


def shell_flags(script: Path, seen: set[Path] | None = None) -> set[str]:
    """The flags a shell script's `case` patterns accept, its `source`d scripts' included."""
    seen = seen or set()
    if script in seen or not script.is_file():
        return set()
    seen.add(script)
    text = script.read_text()
    flags = set(re.findall(r"^\s*((?:--?[\w-]+\|?)+)\)", text, re.M))
    out = {f for group in flags for f in group.split("|") if f}
    for src in re.findall(r"^\s*(?:source|\.)\s+(\S+\.sh)", text, re.M):
        out |= shell_flags(REPO / src, seen)
    return out


def flag_of(tok: str) -> tuple[str, str | None] | None:
    """(--name, value after '=' or None) of a shell word that is a flag, brackets and quotes around it ignored."""
    m = re.fullmatch(r"[\[(\"']*(--?[A-Za-z][\w.-]*)(?:=(.*?))?[\])\"',]*", tok)
    return (m.group(1), m.group(2)) if m else None


# Subcommands that pass the arguments they do not know on to train.py as its config file and --key=value overrides.
FORWARDS_TO_TRAIN = {("scripts/seed_rows_study.py", "steps")}
# Flags of other tools that the docs name in code spans of their own: lm-eval's CLI, docker stop.
OTHER_TOOLS = {"--model_args": "lm-eval's CLI (docs/evaluation.md: the published numbers' protocol)",
               "--time": "docker stop's grace period (docs/reliability.md)"}


def flag_problems(c: Command) -> Iterator[str]:
    script = normalized(c.script)
    path = REPO / script
    doc = c.where.split(":")[0]
    if not path.is_file():
        return  # test_repository_paths_exist reports it
    args = list(c.args)
    if not script.endswith(".py"):  # a shell script
        ok = shell_flags(path)
        for t in args:
            f = flag_of(t.text)
            if f and f[0] not in ok and f[0] not in SHOWN_WRONG:
                yield f"{doc}:{t.line}: `{f[0]}`: {script} takes only {', '.join(sorted(ok)) or 'no flags'}"
        overrides = c.env.get("TRAIN_OVERRIDES")
        if overrides and "TRAIN_OVERRIDES" in path.read_text():
            for word in overrides.text.split():
                f = flag_of(word)
                why = f and train_key_problem(f[0][2:])
                if why:
                    yield f"{doc}:{overrides.line}: TRAIN_OVERRIDES `{f[0]}`: train.py: {why}"
        return
    if script == "train.py":
        yield from train_flag_problems(args, doc)
        return
    mains = {k: t for k, t in helps().items() if k[0] == script}
    ok = set().union(*(option_strings(t) for k, t in mains.items() if len(k) == 1))
    sub = next((t.text for t in args if not flag_of(t.text)), None)
    if (script, sub) in mains:
        ok |= option_strings(mains[script, sub])
    elif any(len(k) == 2 for k in mains):  # no subcommand named: any of theirs
        ok |= set().union(*(option_strings(t) for k, t in mains.items() if len(k) == 2))
    forwards = (script, sub) in FORWARDS_TO_TRAIN
    for k, t in enumerate(args):
        f = flag_of(t.text)
        if not f or f[0] in SHOWN_WRONG or f[0] in PLACEHOLDER_FLAGS:
            continue
        if f[0] not in ok:
            if forwards:
                yield from train_flag_problems([t], doc)
            else:
                yield f"{doc}:{t.line}: `{f[0]}`: {script} has no such option"
        elif f[0] == "--set" and script in ("ablate.py", "bench.py"):
            value = f[1] if f[1] is not None else (args[k + 1].text if k + 1 < len(args) else "")
            key = value.strip("\"'").split("=", 1)[0]
            if len(key) <= 1 or has_placeholder(key) or key.isupper():
                continue  # --set k=v, --set KEY=VALUE: a placeholder
            if script == "ablate.py":
                why = train_key_problem(key)
            else:
                why = None if key in field_names()[1] else "no GPTConfig field"
            if why:
                yield f"{doc}:{t.line}: `--set {key}=`: {script}: {why}"


def train_flag_problems(args: list[Tok], doc: str) -> Iterator[str]:
    for t in args:
        f = flag_of(t.text)
        if not f or f[0] in SHOWN_WRONG or f[0] in ("-h", "--help"):
            continue
        if f[1] is None and f[0].startswith("--"):
            yield f"{doc}:{t.line}: `{f[0]}`: train.py's overrides are written --key=value"
        why = train_key_problem(f[0].lstrip("-"))
        if why:
            yield f"{doc}:{t.line}: `{f[0]}`: train.py: {why}"


@functools.cache
def torchrun_flags() -> frozenset[str]:
    """torchrun's own flags (the docs name `--max_restarts`, `--shutdown-timeout`)."""
    from torch.distributed.run import get_args_parser

    return frozenset(s for a in get_args_parser()._actions for s in a.option_strings)


def all_flags() -> set[str]:
    """Every flag some repository script accepts: argparse options, shell-script flags, train.py's --key."""
    train_keys, model_keys = field_names()
    out = {f"--{k}" for k in train_keys} | {f"--model_overrides.{k}" for k in model_keys}
    for text in helps().values():
        out |= option_strings(text)
    for sh in (REPO / "scripts").glob("*.sh"):
        out |= shell_flags(sh)
    return out


def test_doc_flags_are_accepted() -> None:
    bad = [problem for c in commands() for problem in flag_problems(c)]
    known = all_flags() | torchrun_flags() | set(SHOWN_WRONG) | PLACEHOLDER_FLAGS | set(OTHER_TOOLS)
    for s in snippets():  # code spans of flags alone: `--micro_batch=auto`, `--max-length 512`
        if s.fenced:
            continue
        toks = next(logical_lines(s))
        if not toks or not flag_of(toks[0].text) or not toks[0].text.lstrip("[(").startswith("--"):
            continue
        for t in toks:
            f = flag_of(t.text)
            if f and f[0].startswith("--") and f[0] not in known:
                bad.append(f"{s.doc}:{t.line}: `{f[0]}`: no repository script (nor torchrun) accepts it")
    assert not bad, "the docs show flags their scripts do not accept:\n" + "\n".join(sorted(set(bad), key=order))


# ----------------------------------------------------------------------------------------------------
# 4. --help opens with a whole sentence

def test_help_opens_with_a_whole_sentence() -> None:
    bad = []
    for key, text in helps().items():
        if len(key) > 1:
            continue
        if text.startswith("<exit"):
            bad.append(f"{key[0]}: --help failed: {text[:500]}")
            continue
        desc = description(text)
        if not desc:
            bad.append(f"{key[0]}: --help has no description")
        elif not re.search(r"[.!?][)\"']?$", desc):
            bad.append(f"{key[0]}: --help's description is not a whole sentence: {desc[-120:]!r}")
    assert not bad, "scripts whose --help does not open with a whole sentence:\n" + "\n".join(sorted(bad))


def test_the_checks_can_fail() -> None:
    """What the checks above read, on made-up docs: a --help's description and options, a command over
    continuation lines, unknown flags of each kind, a missing path."""
    cut = "usage: x.py [-h] [--a-b A_B]\n\nRun x on y, then a\n\noptions:\n  -h, --help  show\n  --a-b A_B   an a\n"
    assert description(cut) == "Run x on y, then a"
    assert option_strings(cut) == {"-h", "--help", "--a-b"}
    assert description("usage: x.py [-h]\n\noptions:\n  -h, --help  show\n") == ""
    assert description("Train a GPT: one process.\n\n    python train.py\n") == "Train a GPT: one process."
    block = Snippet("d.md", 10, "$ OMP_NUM_THREADS=1 nice -n 19 python train.py c.py --lr=1 \\\n"
                                "    --lrx=1 --model_overrides.n_layr=2 --compile  # a comment --bad\n"
                                "python eval_lm.py x --max-len 5 --out y && bash scripts/reproduce_cpu.sh --smok\n"
                                "TRAIN_OVERRIDES=\"--max_step=2\" bash scripts/reproduce_cpu.sh --smoke\n"
                                "python ablate.py --set max_stepz=3 && python bench.py --set n_layerz=2\n"
                                "python scripts/seed_rows_study.py steps --loss-tokens 5 c.py --seq_lenn=5\n",
                    fenced=True)
    cmds = list(snippet_commands(block))
    assert [c.script for c in cmds] == ["train.py", "eval_lm.py", "scripts/reproduce_cpu.sh",
                                        "scripts/reproduce_cpu.sh", "ablate.py", "bench.py",
                                        "scripts/seed_rows_study.py"]
    assert [p for c in cmds for p in flag_problems(c)] == [
        "d.md:11: `--lrx`: train.py: no TrainConfig field",
        "d.md:11: `--model_overrides.n_layr`: train.py: `n_layr` is no GPTConfig field (model_overrides.X)",
        "d.md:11: `--compile`: train.py's overrides are written --key=value",
        "d.md:12: `--max-len`: eval_lm.py has no such option",
        "d.md:12: `--smok`: scripts/reproduce_cpu.sh takes only --smoke",
        "d.md:13: TRAIN_OVERRIDES `--max_step`: train.py: no TrainConfig field",
        "d.md:14: `--set max_stepz=`: ablate.py: no TrainConfig field",
        "d.md:14: `--set n_layerz=`: bench.py: no GPTConfig field",
        "d.md:15: `--seq_lenn`: train.py: no TrainConfig field"]
    assert missing_path("scripts/save_nothing.py", bare=False) == "does not exist"
    assert missing_path("nothing_here.py", bare=True) == "is no file of the repository"
    assert missing_path("out/run/ckpt.pt", bare=False) is None and missing_path("data/wiki", bare=False) is None


# ----------------------------------------------------------------------------------------------------
# 5. the README quickstart's train.py output

KINDS = (("model", r"^model \S+ params"), ("val", r"^step \d+: val loss"),
         ("first step", r"^step \d+/\d+ \|.*\| first step"), ("step", r"^step \d+/\d+ \|"),
         ("checkpoint", r"^saved checkpoint "))


def kind(line: str) -> str:
    return next((k for k, pattern in KINDS if re.match(pattern, line)), "other")


def masked(line: str) -> str:
    """A log line with its paths and numbers replaced: what stays is the format."""
    line = re.sub(r"(?<!\S)\S*/\S*\.[A-Za-z]+(?!\S)", "PATH", line)
    line = re.sub(r"\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?", "N", line)
    return " ".join(line.split())


def readme_train_output(readme: str) -> tuple[int, list[str]]:
    """The README's fenced block of train.py output: (its first line number, its lines)."""
    blocks = [(first, lines) for first, lang, lines in fenced_blocks(readme)
              if lang != "python" and any(kind(line) in ("model", "val", "first step", "step") for line in lines)]
    assert len(blocks) == 1, (f"README.md: expected one fenced block of train.py's output (lines like `step N: val "
                              f"loss ...`, `step N/M | loss ...`), found {len(blocks)}")
    return blocks[0]


def test_masking_tells_formats_apart() -> None:
    a = "step 0: val loss 10.8363 | 4.7120 bits/byte | 4.0 s"
    assert masked(a) == masked("step 250: val loss 3.1 | 1.2 bits/byte | 1,234.5 s") == \
        "step N: val loss N | N bits/byte | N s"
    assert masked(a) != masked("step 0: val loss 10.8363 | 4.0 s")
    assert masked("saved checkpoint out/a/ckpt.pt at step 2 in 0.1 s") == masked(
        "saved checkpoint /tmp/pytest-1/run/ckpt.pt at step 3 in 12.0 s")
    assert kind("step 0/200 | loss 1 | first step 1.0 s (warm-up)") == "first step"
    assert kind("step 1/2 | loss 1") == "step" and kind('model = load_hf_gpt2("gpt2")') == "other"


@pytest.mark.e2e
def test_readme_quickstart_shows_the_lines_train_prints(tmp_path: Path) -> None:
    first, lines = readme_train_output((REPO / "README.md").read_text())
    data, out = tmp_path / "shakespeare", tmp_path / "run"
    env = hide_gpu() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                        "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "prepare_data.py", "--dataset", "shakespeare", "--out-dir", str(data),
                        "--no-progress", "--num-proc", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # The config's run made small (1 layer, 256-token steps, 1-row evaluations) and 3 steps long, so that it
    # prints every kind of line: the model line, val loss at steps 0, 2 and 3, step 0's line (first step), the
    # logged steps 1 and 2, checkpoints at steps 2 and 3.
    r = subprocess.run([sys.executable, "train.py", "config/shakespeare_cpu.py", f"--data_dir={data}",
                        f"--out_dir={out}", "--device=cpu", "--max_steps=3", "--warmup_steps=1", "--eval_interval=2",
                        "--log_interval=1", "--ckpt_interval=2", "--model_overrides.n_layer=1", "--micro_batch=2",
                        "--total_batch_tokens=256", "--eval_tokens=128"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        printed.setdefault(kind(line), set()).add(masked(line))
    bad = []
    for i, line in enumerate(lines):
        k = kind(line)
        if k == "other":
            bad.append(f"README.md:{first + i}: not a kind of line train.py prints: {line!r}")
        elif k not in printed:
            bad.append(f"README.md:{first + i}: the run printed no {k} line to compare with")
        elif masked(line) not in printed[k]:
            bad.append(f"README.md:{first + i}: {line!r}\n    shape  {masked(line)!r}\n    "
                       f"printed {' / '.join(sorted(printed[k]))!r}")
    assert not bad, ("the README quickstart's train.py output differs from what train.py prints (numbers and "
                     "paths masked):\n" + "\n".join(bad) + "\n\ntrain.py printed:\n" + r.stdout)
