"""Shared test fixtures and where the tests' real data comes from.

Every test runs on a fresh clone: the repository ships Tiny Shakespeare and the GPT-2 BPE files (data/) and small
samples of the evaluation and corpus files (tests/data/, see its README). A full-data mirror folder, named by
$SHARED_DATA_DIR (unset: none), holds the complete files in the same layout; where it has a file, the tests use it
instead of the sample, and the few checks that need a complete set skip without it. Nothing outside the repository
is read unless $SHARED_DATA_DIR names it."""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Parallel workers (python -m pytest runs `-n auto`, pytest-xdist, one worker per core): each worker's torch, and
# the processes it starts, take their share of the cores, and each has its own datasets cache (lm-eval and the
# json loaders write there).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // WORKERS)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    _cache = tempfile.mkdtemp(prefix=f"hf_datasets_{os.environ.get('PYTEST_XDIST_WORKER', 'gw')}_")
    os.environ.setdefault("HF_DATASETS_CACHE", _cache)
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "tests" / "data"  # the first records of the full files (tests/data/README.md)
MIRROR_SET = bool(os.environ.get("SHARED_DATA_DIR"))
SHARED_DATA = Path(os.environ["SHARED_DATA_DIR"]) if MIRROR_SET else SAMPLE_DATA  # the full-data mirror, if named
SHIPPED_DATA = REPO / "data"  # complete files the repository ships: tinyshakespeare.txt, gpt2_bpe/
EVAL_FILES = ("hellaswag_val.jsonl", "lambada_openai_test.jsonl", "wikitext2_raw/wiki.test.raw")


# The longest files (2-core VM, 2026-12-05), started first so that parallel workers finish together.
LONGEST_FIRST = ("test_fresh_clone.py", "test_seed_rows_study.py", "test_gpu_check.py", "test_lifecycle.py",
                 "test_reproduction_smoke.py", "test_faults.py", "test_eval_hellaswag.py", "test_train.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (a scheduling hint for pytest-xdist; within a file the order stays). Tests marked
    cuda (pytest.mark.cuda) skip on a machine without a CUDA GPU; `pytest -m cuda` selects them."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.py runs these)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------------
# CPU tests stay on the CPU on a GPU machine too. In a test not marked cuda, in-process code sees no CUDA, and
# a subprocess that runs one of the scripts below must pin the CPU on its command line or hide the GPU
# (hide_gpu), else the test fails before the process starts (cpu_only). Otherwise a CPU test would run on CUDA where
# one is visible: rank 1 of a 2-process run asks for cuda:1 on a 1-GPU box, and exact comparisons meet TF32
# and other kernels. tests/test_cpu_pinning.py keeps the table complete (every script that mentions CUDA).

CPU_PINS: dict[str, tuple[tuple[str, ...], ...]] = {  # script name -> the argument runs that pin the CPU
    "train.py": (("--device=cpu",),),
    "fault_launcher.py": (("--device=cpu",),),  # tests/fault_launcher.py runs train.main
    "bench.py": (("--device", "cpu"), ("--device=cpu",)),
    "sample.py": (("--device", "cpu"), ("--device=cpu",)),
    "eval_hellaswag.py": (("--device", "cpu"), ("--device=cpu",)),
    "eval_lm.py": (("--device", "cpu"), ("--device=cpu",)),
    "gpu_check.py": (("--rehearse",),),  # the rehearsal hides the GPU from its children itself
    "ablate.py": (),  # --set=device=cpu pins its training runs, not its HellaSwag evaluation: hide_gpu
    "reproduce_cpu.sh": (),  # its train.py commands take no device: hide_gpu
    "seed_rows_study.sh": (),  # likewise
}


def hide_gpu(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A subprocess environment (default: this one's) in which CUDA sees no device."""
    return {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ""}


def unpinned(args: str | Sequence[object], env: Mapping[str, str] | None) -> str | None:
    """Why this command would reach a GPU (a CPU_PINS script without its pin, GPU not hidden), or None."""
    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    i = next((i for i, a in enumerate(argv) if Path(a).name in CPU_PINS), None)
    if i is None or (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    script, rest = Path(argv[i]).name, argv[i + 1:]
    pins = CPU_PINS[script]
    if any(rest[j:j + len(pin)] == list(pin) for pin in pins for j in range(len(rest))):
        return None
    how = " or ".join(" ".join(pin) for pin in pins)
    return (f"a CPU test runs {script} without pinning the CPU: add {how + ' or ' if how else ''}"
            f"env=hide_gpu(...) (tests/conftest.py), or mark the test cuda: {shlex.join(argv)[:300]}")


class _PinnedPopen(subprocess.Popen):
    """subprocess.Popen that refuses an unpinned command (see unpinned)."""

    def __init__(self, args: object, *a: object, **kw: object) -> None:
        env = kw.get("env", a[9] if len(a) > 9 else None)  # env is Popen's 11th parameter, after args
        problem = unpinned(args, env)  # type: ignore[arg-type]
        if problem:
            pytest.fail(problem, pytrace=False)
        super().__init__(args, *a, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """Inside: torch.cuda.is_available() is False (every device="auto" picks the CPU) and subprocess.Popen
    refuses an unpinned command."""
    saved = torch.cuda.is_available, subprocess.Popen
    torch.cuda.is_available, subprocess.Popen = (lambda: False), _PinnedPopen
    try:
        yield
    finally:
        torch.cuda.is_available, subprocess.Popen = saved


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Every test not marked cuda runs cpu_only: setup (module fixtures included), call and teardown."""
    with contextlib.nullcontext() if item.get_closest_marker("cuda") else cpu_only():
        return (yield)


def shared_file(rel: str) -> Path:
    """A real-data file: from the full-data mirror folder if it has it, else the sample in tests/data or the
    complete copy in data/ (skip the test if none has it)."""
    for base in (SHARED_DATA, SAMPLE_DATA, SHIPPED_DATA):
        if (base / rel).exists():
            return base / rel
    pytest.skip(f"real data {rel} not found in {SHARED_DATA} (the full-data mirror folder), tests/data or data/")


def full_file(rel: str) -> Path:
    """A file of the full-data mirror folder, for checks that need the complete set; skip if it is absent."""
    p = SHARED_DATA / rel
    if not MIRROR_SET or not p.exists():
        pytest.skip(f"needs the complete {rel}: not in the full-data mirror folder {SHARED_DATA} (set SHARED_DATA_DIR)")
    return p


def is_sample(p: Path) -> bool:
    """Whether shared_file gave the tests/data sample rather than a complete file."""
    return SAMPLE_DATA in p.parents


@pytest.fixture
def shared_data() -> Path:
    """A folder with the three evaluation files (eval_lm.py --data-dir layout): the full-data mirror folder if it
    has all of them, else tests/data."""
    return SHARED_DATA if all((SHARED_DATA / rel).is_file() for rel in EVAL_FILES) else SAMPLE_DATA


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and torch's 2 OpenMP threads stall badly on a busy 2-core machine.
    Use per module: pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_gpt(d: Path, seed: int) -> dict:
    """A seeded random-init 2-layer GPT saved as our checkpoint (d/ckpt.pt) and as a HF folder (d/hf)."""
    from checkpoint import save_checkpoint
    from hf import export_hf_gpt2
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=512))
    save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, d / "ckpt.pt")
    export_hf_gpt2(m, d / "hf")
    return {"ckpt": d / "ckpt.pt", "hf": d / "hf", "dir": d}
