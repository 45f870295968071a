"""A stored task: rebuild the Task a bank entry was trained on from its metadata, and read its examples."""

from __future__ import annotations

from pathlib import Path

from .base import DataError, Example, Task
from .custom import _iter_rows, custom_config_from_dict, custom_task, read_custom_examples
from .data import decode_json_line, read_jsonl, read_lines
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


def read_rows(meta: dict, path: str | Path) -> list[tuple[str, dict]]:
    """An entry's task rows from a file in the task's own format, unparsed, each with where it starts ("path:line")."""
    path = Path(path)
    if meta.get("custom"):
        return [(f"{path}:{number}", row) for number, row in _iter_rows(path, {})]
    if not path.is_file():
        raise DataError(f"{path} not found")
    return [(f"{path}:{number}", decode_json_line(line, f"{path}:{number}")) for number, line in read_lines(path)[1]]
