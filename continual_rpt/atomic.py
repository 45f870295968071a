"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never half of one.

Every file the project replaces in place (run state, metrics, checkpoints, bank index, grid records)
goes through `replace_file`: write a hidden sibling, fsync it, rename it over the target, fsync the
folder. Temporary names are the writer's own, `.crpt-tmp-<pid>-<random>-<name>` (`.crpt-old-…` for a
folder moved aside to be replaced), so two writers of one file never share one. A killed writer
leaves such a name behind; `remove_dead_temps` removes those whose writer is gone, and nothing else
(the next writer of the same file does so itself).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from continual_rpt.faults import kill_point
from continual_rpt.locks import FolderBusy, locked, pid_alive

_TEMP = re.compile(r"\.crpt-(tmp|old)-(\d+)-[0-9a-f]{8}-(.+)")
_LOCK = re.compile(r"\.crpt-lock-(.+)")


def lock_name(target: Path) -> str:
    """The name of the lock file that guards creating `target` (beside it; removed by its holder on release)."""
    return f".crpt-lock-{target.name}"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A sibling of `target` named for this writer: `.crpt-<kind>-<pid>-<random>-<target name>`."""
    return target.with_name(f".crpt-{kind}-{os.getpid()}-{secrets.token_hex(4)}-{target.name}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is a writer's temporary name (see `temp_path`)."""
    return _TEMP.fullmatch(name) is not None


def remove_dead_temps(folder: Path, name: str | None = None) -> None:
    """Remove the temporary names in `folder` (only those for `name`, if given) whose writer's pid is gone.

    A folder moved aside (`.crpt-old-…`) by a writer killed before its replacement was renamed into
    place goes back to its name instead; a killed writer's lock file (`lock_name`, which nobody holds)
    is removed too; everything else in `folder` is left alone.
    """
    for path in Path(folder).iterdir():
        lock = _LOCK.fullmatch(path.name)
        if lock and (name is None or lock[1] == name):
            try:
                with locked(folder, name=path.name, remove=True):
                    pass
            except (FolderBusy, FileNotFoundError):  # held by a live writer, or just removed by one
                pass
            continue
        match = _TEMP.fullmatch(path.name)
        if not match or (name is not None and match[3] != name) or pid_alive(int(match[2])):
            continue
        try:
            if match[1] == "old" and not os.path.lexists(path.with_name(match[3])):
                os.rename(path, path.with_name(match[3]))
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another writer removed it first
            pass


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_text(data: dict) -> str:
    """Sorted, indented JSON with a final newline: the one JSON layout the project writes."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON to a new file and fsync it (for files inside a folder that is renamed into place)."""
    with open(path, "w") as f:
        f.write(json_text(data))
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, write) -> None:
    """Atomically replace `path` with what `write(tmp_path)` writes."""
    path = Path(path)
    remove_dead_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        kill_point(f"replace:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_json(path: Path, data: dict) -> None:
    """Atomically replace `path` with `data` as JSON."""
    replace_file(path, lambda tmp: Path(tmp).write_text(json_text(data)))


def replace_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically replace `path` with a safetensors file of `tensors` (moved to the CPU, made contiguous)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    replace_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
