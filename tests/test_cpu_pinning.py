"""The guard that keeps CPU tests on the CPU on a GPU machine (tests/conftest.py, cpu_only): its table covers
every script that can pick CUDA, it refuses unpinned commands and accepts pinned ones, it is active in a test
not marked cuda, and inside it device="auto" resolves to the CPU even where CUDA is available."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import common
from conftest import CPU_PINS, REPO, cpu_only, hide_gpu, unpinned

PY = sys.executable


def runnable_scripts() -> list[Path]:
    """The repository's command-line entry points: top-level and scripts/ programs, and the fault launcher."""
    tops = [p for p in REPO.glob("*.py") if '__name__ == "__main__"' in p.read_text()]
    return sorted([*tops, *(REPO / "scripts").glob("*.py"), *(REPO / "scripts").glob("*.sh"),
                   REPO / "tests" / "fault_launcher.py"])


def test_every_script_that_can_pick_cuda_has_a_pin_rule() -> None:
    """A script that mentions CUDA, imports train or runs one of the pinned scripts is in CPU_PINS (so a new
    device-choosing script is guarded from the day it is added); every CPU_PINS name is a real script."""
    names = {p.name for p in runnable_scripts()}
    assert set(CPU_PINS) <= names, set(CPU_PINS) - names
    others = set(CPU_PINS) - {"fault_launcher.py", "gpu_check.py"}  # the scripts the tests drive directly
    reads_only = {"report.py"}  # prints the CUDA version a run recorded; loads checkpoints on the CPU only
    for p in runnable_scripts():
        if p.name in reads_only:
            assert not re.search(r"is_available|device\(['\"]cuda|--device", p.read_text()), p
            continue
        text = p.read_text()
        picks_device = ("cuda" in text.lower() or re.search(r"^(import train|from train import)\b", text, re.M)
                        or (p.suffix == ".sh" and any(f"{n} " in text for n in others)))
        assert not picks_device or p.name in CPU_PINS, f"{p.relative_to(REPO)} can pick CUDA: add it to CPU_PINS"


@pytest.mark.parametrize("argv, env, pinned", [
    ([PY, "train.py", "--max_steps=1"], None, False),
    ([PY, str(REPO / "train.py"), "--max_steps=1", "--device=cpu"], None, True),
    ([PY, "train.py", "--max_steps=1"], hide_gpu(), True),
    ([PY, "train.py", "--max_steps=1"], hide_gpu({"CUDA_VISIBLE_DEVICES": "0"}), True),
    ([PY, "train.py", "--device=cuda"], None, False),
    ([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", "--max_steps=1"], None, False),
    ([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", "--device=cpu"], None, True),
    ([PY, "tests/fault_launcher.py", "{}", "--max_steps=1"], None, False),
    ([PY, "bench.py", "--device", "cpu"], None, True),
    ([PY, "bench.py", "--device", "cuda:0"], None, False),
    ([PY, "sample.py", "ckpt.pt", "--device=cpu"], None, True),
    ([PY, "eval_lm.py", "ckpt.pt"], {"CUDA_VISIBLE_DEVICES": "0"}, False),
    ([PY, "ablate.py", "c.py", "--set=device=cpu"], None, False),  # its HellaSwag column would still use CUDA
    ([PY, "ablate.py", "c.py"], hide_gpu(), True),
    (["bash", "scripts/reproduce_cpu.sh", "--smoke"], None, False),
    ([PY, "scripts/gpu_check.py", "--rehearse"], None, True),
    (f"{PY} train.py --max_steps=1", None, False),  # a shell command line
    ([PY, "prepare_data.py", "--dataset", "shakespeare"], None, True),  # picks no device
    (["git", "status"], None, True),
])
def test_unpinned_commands_are_refused(argv: list[str] | str, env: dict | None, pinned: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # env=None: this process's environment
    problem = unpinned(argv, env)
    assert (problem is None) == pinned, problem
    if problem:
        assert "without pinning the CPU" in problem and "hide_gpu" in problem


@pytest.mark.e2e
def test_the_guard_is_active_in_a_cpu_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpinned train.py fails this test before any process starts; the pinned one runs."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    marker = tmp_path / "ran"
    with pytest.raises(pytest.fail.Exception, match="runs train.py without pinning the CPU"):
        subprocess.run([PY, "-c", f"open({str(marker)!r}, 'w')", "train.py"], cwd=REPO, timeout=60)
    assert not marker.exists()
    r = subprocess.run([PY, str(REPO / "train.py"), "--lrr=1", "--device=cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown key" in r.stderr, r.stderr


def test_auto_device_is_the_cpu_inside_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA is available (pretended here), device="auto" picks it; inside cpu_only it picks the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.setup_distributed("auto").device.type == "cuda"
    assert bench.pick_device("auto").type == "cuda"
    with cpu_only():
        assert common.setup_distributed("auto").device.type == "cpu"
        assert bench.pick_device("auto").type == "cpu"
        assert not torch.cuda.is_available()
    assert torch.cuda.is_available()  # restored on the way out
