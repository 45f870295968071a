"""A stored task: rebuild the Task a bank entry was trained on from its metadata, and read its examples."""

from __future__ import annotations

from pathlib import Path

from .base import DataError, Example, Task
from .custom import custom_config_from_dict, custom_task, read_custom_examples
from .data import read_jsonl
from .superglue import get_task


def task_from_meta(meta: dict, where: Path | str) -> Task:
    """An entry's task: a SuperGLUE task by name, or a custom task from its stored definition."""
    try:
        if meta.get("custom"):
            return custom_task(custom_config_from_dict(meta["custom"], "custom"))
        if not isinstance(meta.get("task"), str):
            raise ValueError("field 'task' must name the task")
        return get_task(meta["task"])
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def read_examples(meta: dict, path: str | Path) -> list[Example]:
    """An entry's task examples from a file in the task's own format; labels are optional."""
    if meta.get("custom"):
        return read_custom_examples(custom_config_from_dict(meta["custom"], "entry custom"), path)
    return read_jsonl(task_from_meta(meta, path), path)
