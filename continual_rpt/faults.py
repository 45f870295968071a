"""A test-only hook that makes the process SIGKILL (or SIGSTOP) itself at a named point, so crash tests are exact.

`CRPT_KILL_AT=NAME` kills at the first time `kill_point(NAME)` runs; `CRPT_KILL_AT=NAME@K` at the
K-th time (1-based). `CRPT_STOP_AT` does the same with SIGSTOP: the process waits there, holding
whatever it holds, until the test sends SIGCONT (to make two writers overlap for certain). Unset
(always, outside tests) every call is two dictionary lookups and nothing else.
Points the library marks:
    bank.entry:<file>     after one file of a new bank entry is written into its temporary folder
    bank.entry-moved-aside  replacing an existing entry folder: the old one moved aside, the new not yet in place
    bank.entry-renamed    after the entry folder is renamed into place, before the index lists it
    replace:<file>        after the temporary copy of <file> is fsynced, before it is renamed over <file>
                          (bank.json, state.json, metrics.json, checkpoints)
    train.step            after each applied optimizer step (a dropped, non-finite step is not counted)
    run.task-done         after a task's row of the accuracy matrix is saved
"""

from __future__ import annotations

import os
import signal

ENV, STOP_ENV = "CRPT_KILL_AT", "CRPT_STOP_AT"
_counts: dict[tuple[str, str], int] = {}


def kill_point(name: str) -> None:
    """SIGKILL (SIGSTOP) this process here if $CRPT_KILL_AT ($CRPT_STOP_AT) names this point and occurrence."""
    for env, sig in ((ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        target = os.environ.get(env)
        if not target:
            continue
        point, _, nth = target.partition("@")
        if point != name:
            continue
        _counts[env, name] = _counts.get((env, name), 0) + 1
        if _counts[env, name] == int(nth or 1):
            os.kill(os.getpid(), sig)
