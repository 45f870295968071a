"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never half of one.

Every file the project replaces in place (run state, metrics, checkpoints, bank index, grid records)
goes through `replace_file`: write a hidden sibling, fsync it, rename it over the target, fsync the
folder. A killed writer leaves at most a hidden `.<name>.tmp` sibling behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from continual_rpt.faults import kill_point


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
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    kill_point(f"replace:{path.name}")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_json(path: Path, data: dict) -> None:
    """Atomically replace `path` with `data` as JSON."""
    replace_file(path, lambda tmp: Path(tmp).write_text(json_text(data)))


def replace_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically replace `path` with a safetensors file of `tensors` (moved to the CPU, made contiguous)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    replace_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
