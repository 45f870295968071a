"""One writer at a time: an exclusive flock on a lock file inside a folder, holding the holder's pid.

    with locked(folder):            # a second writer fails at once: FolderBusy names the folder and the pid
        ...
    with locked(folder, wait=True): # or waits its turn (the bank's writers, which all finish quickly)
        ...

The lock file stays (empty whenever nobody holds it) unless `remove=True`. The kernel drops a flock
when its holder dies, even of SIGKILL, so a killed writer never blocks the next one. What the holder
records with `Lock.note` stays in the file if it is killed, and the next holder reads it as
`Lock.left`: what a killed writer was doing when it died (empty after a clean release).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(OSError):
    """Another live process holds the folder's lock; the message names the folder and that process's pid (`holder`)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a pid another user owns counts as alive)."""
    if pid <= 0:  # os.kill(0, …) would signal this process group, not ask about a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


class Lock:
    """A held lock: `left` is what a holder killed while holding it recorded ("" after a clean release)."""

    def __init__(self, fd: int, left: str) -> None:
        self._fd = fd
        self.left = left

    def note(self, text: str) -> None:
        """Record what this holder is doing (after its pid, fsynced), for the next holder should this one be killed."""
        data = f"{os.getpid()}\n{text}".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)


def _busy(folder: Path, path: Path, fd: int) -> FolderBusy:
    first = _read(fd).partition("\n")[0].strip()
    holder = f"pid {first}" if first.isdigit() and pid_alive(int(first)) else "pid not yet recorded"
    return FolderBusy(f"{folder}: in use by another writer ({holder}, holding {path}); "
                      "wait for it to finish, or choose another folder", holder)


@contextmanager
def locked(folder: str | Path, *, wait: bool = False, name: str = LOCK_FILE, remove: bool = False):
    """Hold `folder`/`name` exclusively while the block runs; busy: wait, or (default) raise FolderBusy at once."""
    folder = Path(folder)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            err = _busy(folder, path, fd)
            os.close(fd)
            raise err from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # a holder with remove=True unlinked the file we locked: lock the one there now
    try:
        lock = Lock(fd, _read(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        if remove:
            os.unlink(path)  # while still held, so nobody can hold the unlinked file and the new one at once
        else:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock
