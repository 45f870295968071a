"""A test-only hook that makes the process SIGKILL itself at a named point, so crash tests are exact.

`CRPT_KILL_AT=NAME` kills at the first time `kill_point(NAME)` runs; `CRPT_KILL_AT=NAME@K` at the
K-th time (1-based). Unset (always, outside tests) every call is a dictionary lookup and nothing else.
Points the library marks:
    bank.entry:<file>     after one file of a new bank entry is written into its temporary folder
    bank.entry-renamed    after the entry folder is renamed into place, before the index lists it
    replace:<file>        after the temporary copy of <file> is fsynced, before it is renamed over <file>
                          (bank.json, state.json, metrics.json, checkpoints)
    train.step            after each applied optimizer step (a dropped, non-finite step is not counted)
    run.task-done         after a task's row of the accuracy matrix is saved
"""

from __future__ import annotations

import os
import signal

ENV = "CRPT_KILL_AT"
_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if $CRPT_KILL_AT names this point (and this is the asked-for occurrence)."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.partition("@")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
