"""Crash tests' tools: processes that SIGKILL themselves at a named kill point (`CRPT_KILL_AT`), never on a timer.

`killed(argv, point)` runs `python -m continual_rpt ARGV` until it dies at `point`. A `Zygote` imports
the library once and forks a fresh process per "life", each with its own kill point, so that a test
can kill dozens of writers or runs for milliseconds each instead of an interpreter start each.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from continual_rpt.faults import ENV as KILL_AT

REPO = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != KILL_AT}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SIGKILLED = -signal.SIGKILL


def snapshot(folder: Path, skip=("log.txt",)) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def hidden(folder: Path) -> list[str]:
    """Hidden files and folders anywhere under `folder` (a killed writer's temporary copies), the bank's lock aside."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".lock")


def temp_of(name: str, leftover: str, kind: str = "tmp") -> bool:
    """Whether `leftover` is a writer's temporary name for `name` (continual_rpt.atomic.temp_path)."""
    return re.fullmatch(rf"\.crpt-{kind}-\d+-[0-9a-f]{{8}}-{re.escape(name)}", leftover) is not None


def stopped(pid: int, timeout: float = 120) -> None:
    """Wait until process `pid` has stopped itself (SIGSTOP at a `CRPT_STOP_AT` point)."""
    deadline = time.time() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.time() < deadline, f"process {pid} did not stop within {timeout} s"
        time.sleep(0.01)


def killed(argv: list[str], point: str) -> subprocess.CompletedProcess:
    """Run `python -m continual_rpt ARGV` with CRPT_KILL_AT=point and check that it died there, of SIGKILL."""
    proc = subprocess.run([sys.executable, "-m", "continual_rpt", *map(str, argv)], env={**ENV, KILL_AT: point}, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == SIGKILLED, f"not killed at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return proc


ZYGOTE = textwrap.dedent(
    """
    import json, os, sys, traceback
    from continual_rpt import faults

    CHANNEL = os.dup(1)  # the protocol's own pipe; what the lives print goes to stderr
    os.dup2(2, 1)

    def say(*words):  # one write(2) per line: atomic on a pipe, so the zygote and its children never interleave
        os.write(CHANNEL, (json.dumps([str(w) for w in words]) + "\\n").encode())

    exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"))  # the functions the lives call, and their imports

    def live(kill_at, name, args):
        try:
            if kill_at:
                os.environ[faults.ENV] = kill_at
            else:
                os.environ.pop(faults.ENV, None)
            faults._counts.clear()  # this life counts its own occurrences
            code = globals()[name](*args) or 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    for line in sys.stdin:
        kill_at, calls = json.loads(line)
        pids = []
        for name, args in calls:
            pid = os.fork()
            if pid == 0:
                live(kill_at, name, args)
            pids.append(pid)
        say("child", *pids)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            say("reaped", pid, os.waitstatus_to_exitcode(status))
        say("idle")
    """
)

RUN_LIVES = """
from continual_rpt.cli import main
import continual_rpt.run, continual_rpt.strategies.bank, transformers
from transformers import AutoTokenizer, BertModel  # imported once here, not in every life

def run(*argv):
    return main(list(argv))
"""


class Zygote:
    """A process that runs `lives` (Python source) once, then forks one child per life; a thread queues its lines."""

    def __init__(self, folder: Path, lives: str) -> None:
        script = folder / "lives.py"
        script.write_text(textwrap.dedent(lives))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV, cwd=REPO)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(json.loads(line)) for line in self.proc.stdout], daemon=True).start()

    def send(self, kill_at: str | None, *calls: tuple[str, list]) -> None:
        """Fork one child per call `(function, args)`, all with CRPT_KILL_AT=kill_at (None: unset)."""
        self.proc.stdin.write(json.dumps([kill_at, [[name, [str(a) for a in args]] for name, args in calls]]) + "\n")
        self.proc.stdin.flush()

    def until(self, first: str, seen: list) -> list[str]:
        """Collect lines into `seen` until one starts with `first`; return that one."""
        deadline = time.time() + 120
        while True:
            try:
                words = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the zygote ended; last lines {seen[-5:]}"
                assert time.time() < deadline, f"the zygote said nothing for 120 s; last lines {seen[-5:]}"
                continue
            seen.append(words)
            if words and words[0] == first:
                return words

    def life(self, kill_at: str | None, name: str, *args) -> tuple[int, list]:
        """One child calling `name(*args)`: its exit code (-9: SIGKILLed) and every line said meanwhile."""
        seen: list = []
        self.send(kill_at, (name, list(args)))
        code = int(self.until("reaped", seen)[2])
        self.until("idle", seen)
        return code, seen

    def run(self, kill_at: str | None, *argv) -> int:
        """`crpt ARGV` in a fresh child (with RUN_LIVES): its exit code."""
        return self.life(kill_at, "run", *argv)[0]

    def killed_run(self, kill_at: str, *argv) -> None:
        """`crpt ARGV` in a fresh child that must die of SIGKILL at `kill_at`."""
        code = self.run(kill_at, *argv)
        assert code == SIGKILLED, f"not killed at {kill_at} (exit {code})"

    def close(self) -> None:
        """End the zygote (idle between lives, so nothing is lost; an orderly exit of torch and Avalanche takes seconds)."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()


def zygote_fixture(lives: str = RUN_LIVES):
    """A module-scoped fixture: one zygote with `lives` for every test of the module."""

    @pytest.fixture(scope="module")
    def zygote(tmp_path_factory):
        z = Zygote(tmp_path_factory.mktemp("zygote"), lives)
        yield z
        z.close()

    return zygote
