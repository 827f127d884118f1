"""scripts/gpu_check.py: the CPU rehearsal runs every step and writes the results files with every field;
the budget skips what does not fit; a failing or hanging step is recorded and the check goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "scripts"))  # after the top-level modules: a script never shadows one

import gpu_check  # noqa: E402

from conftest import shared_file  # noqa: E402

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out


def run_check(tmp_path: Path, *args: str, python: str = sys.executable,
              timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, PYTHON=python)
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    return proc, [json.loads(ln) for ln in lines]


def check_fields(rec: dict, fields: dict[str, type]) -> None:
    """Every declared figure is there, of its type, or null with a reason; every null has a reason."""
    res, nulls = rec["result"], rec["nulls"]
    for name, typ in fields.items():
        assert name in res, f"{rec['step']}: no {name}"
        v = res[name]
        if v is None:
            assert nulls.get(name), f"{rec['step']}.{name} is null without a reason"
        elif typ is float:
            assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{rec['step']}.{name}={v!r}"
        else:
            assert isinstance(v, typ), f"{rec['step']}.{name}={v!r} is not {typ.__name__}"
    assert all(nulls.get(k) for k, v in res.items() if v is None), f"{rec['step']}: null without a reason"


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_every_field(tmp_path: Path) -> None:
    text = shared_file("tinyshakespeare.txt")
    t0 = time.monotonic()
    proc, recs = run_check(tmp_path, "--rehearse", "--shakespeare-path", str(text))
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["step"] for r in recs] == [s.name for s in gpu_check.STEPS]
    for rec, step in zip(recs, gpu_check.STEPS):
        assert rec["status"] == "ok", (rec["reason"], rec["log_tail"])
        assert rec["rehearse"] is True and rec["seconds"] >= 0 and isinstance(rec["summary"], str)
        check_fields(rec, step.fields)
    r = {rec["step"]: rec["result"] for rec in recs}

    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == sorted(gpu_check.RESULT_FILES) and len(out) <= 7
    assert all((tmp_path / "out" / n).stat().st_size < 100_000 for n in out)  # logs stay in the work dir
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "REHEARSAL" in summary and all(s.name in summary for s in gpu_check.STEPS)
    assert (tmp_path / "work" / "train_bf16" / "metrics.jsonl").is_file()  # training out_dir: work dir

    assert r["env"]["device_name"] == "cpu" and r["env"]["ceiling_tflops"] > 0 and r["env"]["driver"] is None
    eager, batch2x = r["bench_eager"], r["bench_batch2x"]
    assert (eager["batch_size"], eager["seq_len"], eager["compile"]) == (2, 64, False)
    assert batch2x["batch_size"] == 2 * eager["batch_size"]
    assert eager["ceiling_tflops"] == pytest.approx(r["env"]["ceiling_tflops"])  # passed in, not re-measured
    assert eager["mfu"] is None and eager["mfu_vs_ceiling"] > 0
    assert r["bench_compiled"]["compile"] is False and "rehearsal" in recs[2]["nulls"]["compile_s"]
    assert r["bench_compiled"]["speedup_vs_eager"] > 0
    cuda_tests = r["cuda_tests"]
    assert cuda_tests["selected"] > 0 and cuda_tests["skipped"] == cuda_tests["selected"]  # no GPU here
    assert "tests/test_fast_paths.py" in cuda_tests["files"]
    train, fp = r["train"], r["fp16"]
    assert len(train["losses"]) == train["steps"] == 10 and train["loss_fell"] and train["finite"]
    assert train["loss_last5_mean"] < 0.95 * train["loss_first"]
    assert train["tok_per_s_vs_bench"] > 0
    assert fp["dtype"] == "fp32" and fp["close_to_bf16"] and fp["rel_diff_vs_bf16"] < 0.01  # same seed and data
    prof = r["profile"]
    assert prof["top"] and sum(prof["by_kind"].values()) == pytest.approx(1.0)
    assert prof["busy_share_of_step"] is None  # a GPU figure
    assert "aten::" in (tmp_path / "out" / "profile.txt").read_text()
    assert r["bench_vs_plain"]["vs_plain_ratio_median"] > 0
    res = r["resume"]  # the uninterrupted run vs the crashed-and-restarted one: bit-equal on CPU
    assert res["restarted"] and res["zero1"] and res["fused_adamw"] and (res["steps"], res["resumed_at"]) == (8, 4)
    assert res["losses_resumed"] == res["losses_ref"] and len(res["losses_ref"]) == 8
    assert res["bit_equal"] and res["max_abs_diff"] == 0 and res["first_diff_step"] is None
    assert "--zero1=true" in res["command_cut"] and "--init_from=auto" in res["command_cut"]
    flex = r["flex_recompiles"]
    assert flex["steps"] == 6 and flex["finite"] and flex["attention"] == "sdpa" and flex["recompiles"] is None
    assert "doc_mask" in recs[[s.name for s in gpu_check.STEPS].index("flex_recompiles")]["summary"]
    tests = r["pytest"]
    assert tests["finished"] and tests["ran"] == tests["selected"] == tests["passed"] > 0 and not tests["failures"]
    assert tests["gpu_visible"] is False and tests["not_run"] == 0
    print(f"rehearsal: {seconds:.0f} s")


def test_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    proc, recs = run_check(tmp_path, "--rehearse", "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in recs] == [s.name for s in gpu_check.STEPS]
    assert all(r["status"] == "skipped" and "does not fit" in r["reason"] for r in recs)
    assert not (tmp_path / "work" / "env.log").exists()  # nothing ran


def test_failing_steps_are_recorded_and_the_check_goes_on(tmp_path: Path) -> None:
    fake = tmp_path / "fakepython"
    fake.write_text("#!/bin/sh\necho \"broken interpreter: $1\"\nexit 3\n")
    fake.chmod(0o755)
    proc, recs = run_check(tmp_path, "--rehearse", "--only", "env,bench_eager,cuda_tests,profile", python=str(fake))
    assert proc.returncode == 1
    assert [r["step"] for r in recs] == ["env", "bench_eager", "cuda_tests", "profile"]
    for rec in recs:
        assert rec["status"] == "error" and "exit code 3" in rec["reason"]
        assert any("broken interpreter" in ln for ln in rec["log_tail"])
    assert "error" in (tmp_path / "out" / "summary.txt").read_text()


def test_a_hanging_step_is_stopped_with_its_whole_process_group(tmp_path: Path) -> None:
    """The budget's end stops the step's process group: the child and a grandchild it started."""
    pids = tmp_path / "pids"
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pids}\nsleep 300\n")
    fake.chmod(0o755)
    proc, recs = run_check(tmp_path, "--rehearse", "--budget-s", "6", python=str(fake), timeout=120)
    assert recs[0]["step"] == "env" and recs[0]["status"] == "error" and "timed out" in recs[0]["reason"]
    assert all(r["status"] == "skipped" for r in recs[1:])
    assert not alive(int(pids.read_text()))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as stopped)."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_pytest_step_cut_at_the_budget_reports_what_ran(tmp_path: Path) -> None:
    """When the budget ends mid-suite, pytest is interrupted (SIGINT), still writes its report, and the step
    records the tests that ran and how many did not: a cut-short suite is not an error."""
    sel = "tests/test_cpu_pinning.py tests/test_bad_input.py"  # fast tests first, then slow ones
    # budget 30 s: pytest gets 10 s (20 s are kept for it to finish after the SIGINT)
    proc, recs = run_check(tmp_path, "--rehearse", "--only", "pytest", "--budget-s", "30", "--pytest-args", sel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = recs
    assert rec["status"] == "ok", (rec["reason"], rec["log_tail"])
    res = rec["result"]
    assert not res["finished"] and res["ran"] >= 1 and res["failed"] == res["errors"] == 0
    assert res["not_run"] > 0 and res["selected"] == res["ran"] + res["not_run"]
    assert "cut at the budget" in rec["summary"]


def test_dynamo_events_counts_real_recompiles_and_graph_breaks(tmp_path: Path) -> None:
    """dynamo_events on torch's own TORCH_LOGS output: a function with a graph break, compiled for fixed shapes
    and called at sizes 3, 3, 4, 5, 5 (one step each), recompiles both of its frames at sizes 4 and 5."""
    script = tmp_path / "recompiles.py"
    script.write_text(
        "import torch\n"
        "@torch.compile(backend='eager', dynamic=False)\n"
        "def f(x):\n"
        "    if x.sum() > 0:  # data-dependent: a graph break\n"
        "        return x * 2\n"
        "    return x + 1\n"
        "for i, n in enumerate([3, 3, 4, 5, 5]):\n"
        "    f(torch.ones(n))\n"
        "    print(f'step {i}/5 | loss 1.0', flush=True)\n")
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    r = gpu_check.dynamo_events(proc.stdout, warmup=2)
    assert (r["recompiles"], r["recompiles_after_warmup"]) == (4, 4)
    assert (r["graph_breaks"], r["graph_breaks_after_warmup"]) == (3, 2)
    assert len(r["recompile_reasons"]) == 4 and all("size mismatch" in x for x in r["recompile_reasons"])
    assert not r["recompile_limit_hit"]
    late = gpu_check.dynamo_events(proc.stdout, warmup=4)  # after step 3: nothing new
    assert (late["recompiles"], late["recompiles_after_warmup"], late["graph_breaks_after_warmup"]) == (4, 0, 0)


def test_shape_is_the_configs() -> None:
    """Outside the rehearsal the benchmarked micro-batch, sequence length, dtype and model are the config's,
    as train.py's own config loader reads them."""
    from train_config import load_config

    cfg = load_config([str(REPO / "config" / "gpt2_owt.py")])
    args = gpu_check.parse_args(["--config", str(REPO / "config" / "gpt2_owt.py")])
    flags, B, T, dtype = gpu_check.shape(gpu_check.Check(args, REPO, REPO))
    assert (B, T, dtype) == (cfg.micro_batch, cfg.seq_len, cfg.dtype)
    assert flags[:2] == ["--model", cfg.model]
    assert gpu_check.shape(gpu_check.Check(args, REPO, REPO), batch_mult=2)[1] == 2 * cfg.micro_batch
