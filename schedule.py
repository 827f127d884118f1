"""What the training loop does after each optimizer step: one pure function of the step count and the config's
intervals, so that a shipped config's whole schedule can be checked in milliseconds (tests/test_schedule.py).

After `step` optimizer steps are done (step 0: before the first), `actions_after` lists what is due, in order:

    sync        read the device: record every step since the last sync, stop if training diverged, agree
                across ranks whether a stop was requested (then: save and exit, skipping the rest)
    log         print the log line (after steps 1, 1 + log_interval, ... and the last: "step 0/N" is the first
                step's loss)
    checkpoint  every ckpt_interval steps and at the end
    evaluate    val loss every eval_interval steps (step 0 included) and at the end
    hellaswag   every hellaswag_interval steps and at the end (never at step 0: an untrained model)

Each interval counts optimizer steps on its own; 0 turns it off (the end still checkpoints). The checkpoint comes
before the evaluations, so a failure or a kill during them never costs the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNC, LOG, CHECKPOINT, EVALUATE, HELLASWAG = "sync", "log", "checkpoint", "evaluate", "hellaswag"
EVALUATIONS = (EVALUATE, HELLASWAG)


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    log_interval: int
    eval_interval: int = 0
    hellaswag_interval: int = 0
    ckpt_interval: int = 0

    @classmethod
    def of(cls, cfg: object) -> Schedule:
        """The schedule of a TrainConfig (any object with its interval fields and total_steps)."""
        return cls(cfg.total_steps, cfg.log_interval, cfg.eval_interval, cfg.hellaswag_interval,  # type: ignore[attr-defined]
                   cfg.ckpt_interval)  # type: ignore[attr-defined]

    def actions_after(self, step: int) -> tuple[str, ...]:
        """What is due once `step` optimizer steps are done, in the order the loop runs it."""
        end = step == self.max_steps
        if step == 0:  # before the first step: the initial model's val loss (and, for max_steps=0, its weights)
            return ((CHECKPOINT,) if end else ()) + ((EVALUATE,) if self.eval_interval else ())
        actions = []
        if (step - 1) % self.log_interval == 0 or end:
            actions.append(LOG)
        if end or _every(step, self.ckpt_interval):
            actions.append(CHECKPOINT)
        if self.eval_interval and (end or _every(step, self.eval_interval)):
            actions.append(EVALUATE)
        if self.hellaswag_interval and (end or _every(step, self.hellaswag_interval)):
            actions.append(HELLASWAG)
        return (SYNC, *actions) if actions else ()

    def evaluations_after(self, step: int) -> tuple[str, ...]:
        """The evaluations due at `step`: what a run resumed from step's checkpoint still owes, if its record
        lacks them (the checkpoint is written before them, so a kill or a stop may have come between)."""
        return tuple(a for a in self.actions_after(step) if a in EVALUATIONS)


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0
