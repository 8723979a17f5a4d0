"""How a run stops early on purpose, and the exit status each way tells the launcher script (light: no torch)."""

from __future__ import annotations

import signal
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT; run the same command again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
BEFORE_LOOP = "before the first training step: nothing to save; run the same command again to start (or resume)"
AFTER_LOOP = (
    "after the last training step, before the run was saved: run the same command again; it resumes from "
    "the newest checkpoint (or starts over if there is none)"
)


class RunStopped(RuntimeError):
    """The run stopped before its last step, on purpose; ``exit_code`` tells the launcher script why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def stop_outside_the_loop(when: str) -> None:
    """Before the first step (start-up, data, model loading) and after the last one, SIGTERM/SIGINT
    stop the process at once with status 75 (slurm/prune_70b.sh requeues on it) and a message: there
    is no step for the ranks to agree on. ``when`` says what that means for the rerun."""

    def handle(signum: int, frame: Any) -> None:
        raise RunStopped(f"{signal.Signals(signum).name} {when}", EXIT_PREEMPTED)

    for s in STOP_SIGNALS:
        signal.signal(s, handle)
