"""schedule.py over the whole length of every shipped config: checkpoints, evaluations and log lines where the
config's intervals say, the final checkpoint before the final evaluations, and a sync (the loop's only device read,
where a stop request is seen) at least every log_interval steps. The expected steps are computed here with
range() from the intervals, not by the function under test. tests/test_lifecycle.py checks that train.py follows
the schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from schedule import CHECKPOINT, EVALUATE, HELLASWAG, LOG, SYNC, Schedule
from train_config import load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "config").rglob("*.py") if p.name != "__init__.py")


def steps_with(sched: Schedule, action: str) -> list[int]:
    return [s for s in range(sched.max_steps + 1) if action in sched.actions_after(s)]


def multiples(interval: int, end: int, start: int) -> list[int]:
    return list(range(start, end + 1, interval)) if interval else []


@pytest.mark.parametrize("path", SHIPPED)
def test_a_shipped_config_checkpoints_evaluates_and_logs_on_its_intervals(path):
    cfg = load_config([str(REPO / path)])
    variants = [cfg, dataclasses.replace(cfg, hellaswag_interval=1000 if cfg.total_steps > 1000 else 7)]
    for cfg in variants:
        sched, n = Schedule.of(cfg), cfg.total_steps
        assert n > 0
        assert steps_with(sched, CHECKPOINT) == sorted(set(multiples(cfg.ckpt_interval, n, cfg.ckpt_interval)) | {n})
        if cfg.eval_interval:
            assert steps_with(sched, EVALUATE) == sorted(set(multiples(cfg.eval_interval, n, 0)) | {n})
        else:
            assert steps_with(sched, EVALUATE) == []
        hellaswag = sorted(set(multiples(cfg.hellaswag_interval, n, cfg.hellaswag_interval)) | {n})
        assert steps_with(sched, HELLASWAG) == (hellaswag if cfg.hellaswag_interval else [])
        assert steps_with(sched, LOG) == sorted(set(multiples(cfg.log_interval, n, 1)) | {n})
        syncs = steps_with(sched, SYNC)
        assert syncs[-1] == n and max(b - a for a, b in zip([0] + syncs, syncs)) <= cfg.log_interval
        assert sched.actions_after(n) == (SYNC, LOG, CHECKPOINT, *((EVALUATE,) if cfg.eval_interval else ()),
                                          *((HELLASWAG,) if cfg.hellaswag_interval else ()))
        for s in range(1, n + 1):
            acts = sched.actions_after(s)
            if acts:  # the device is read first; a checkpoint due comes before the evaluations due
                assert acts[0] == SYNC and len(set(acts)) == len(acts)
                if CHECKPOINT in acts:
                    assert all(acts.index(CHECKPOINT) < acts.index(e) for e in (EVALUATE, HELLASWAG) if e in acts)


def test_the_gpt2_recipe_schedule_in_numbers():
    """config/gpt2_owt.py (and FineWeb-edu's, the same recipe): 19,074 steps, 19 periodic checkpoints and the
    final one, 77 periodic evaluations (step 0 included) and the final one."""
    for path in ("config/gpt2_owt.py", "config/gpt2_fineweb_edu.py"):
        sched = Schedule.of(load_config([str(REPO / path)]))
        assert sched.max_steps == 19_074
        assert steps_with(sched, CHECKPOINT) == [*range(1000, 19_001, 1000), 19_074]
        assert len(steps_with(sched, EVALUATE)) == 77 + 1 and steps_with(sched, EVALUATE)[-2:] == [19_000, 19_074]
        assert sched.actions_after(1000) == (SYNC, CHECKPOINT, EVALUATE)  # no log line at 1000: lines at 991, 1001
        assert sched.actions_after(1001) == (SYNC, LOG)


def test_step_zero_and_the_step_zero_only_run():
    """Before the first step: the initial val loss (never HellaSwag); max_steps=0: its checkpoint, then that."""
    assert Schedule(10, 5, eval_interval=5, hellaswag_interval=5, ckpt_interval=5).actions_after(0) == (EVALUATE,)
    assert Schedule(10, 5).actions_after(0) == ()
    assert Schedule(0, 5, eval_interval=5, hellaswag_interval=5).actions_after(0) == (CHECKPOINT, EVALUATE)
    assert Schedule(0, 5).actions_after(0) == (CHECKPOINT,)
    assert Schedule(10, 5, eval_interval=5, hellaswag_interval=3).evaluations_after(6) == (HELLASWAG,)
    assert Schedule(10, 5, eval_interval=5, hellaswag_interval=3).evaluations_after(10) == (EVALUATE, HELLASWAG)
