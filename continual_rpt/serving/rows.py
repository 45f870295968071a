"""A request's rows read as `crpt bank predict` reads a file's: by the given task's parser (the whole row, its label
checked if present), or, without a task, by every routed entry whose task reads the row's fields (its input fields
alone, so a gold label plays no part in routing). A row none can read is a `RowError` naming its index and field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from continual_rpt.routing import answerable
from continual_rpt.tasks import DataError, Example, Task

_FIELD = re.compile(r"(?:field|column) '([^']+)'")  # how the task parsers name the field at fault


class RowError(ValueError):
    """A row that cannot be answered: `row` is its index in the request, `field` the field at fault (None: the row as a whole)."""

    def __init__(self, row: int, field: str | None, message: str) -> None:
        super().__init__(f"row {row}{f', field {field!r}' if field else ''}: {message}")
        self.row, self.field = row, field


@dataclass(frozen=True)
class Parsed:
    """A request's rows, checked and read: by the given task, or (task None) by every routed entry that reads each row."""

    task: str | None
    rows: tuple[dict, ...]
    readings: tuple[Mapping[str, tuple[Example, ...]], ...]  # per row: entry -> the examples it reads the row as
    generation: int  # of the snapshot the rows were read against
    origin: str  # names the rows' source in uids and messages

    def __len__(self) -> int:
        return len(self.rows)


class Item(NamedTuple):
    """One example of a batch: its request, its row there, which of the row's examples, and the row as each entry reads it."""

    request: int
    row: int
    k: int
    reading: Mapping[str, tuple[Example, ...]]

    def example(self, name: str | None = None) -> Example:
        """The example as entry `name` reads it (default: the first entry reading the row, as `crpt bank predict` routes it)."""
        return self.reading[name or next(iter(self.reading))][self.k]


def holds(row: dict, path: str) -> bool:
    """Whether `row` holds the (dotted) field `path`."""
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            return False
        row = row[key]
    return True


def row_error(row: int, where: str, err: DataError) -> RowError:
    """A parser's error as a RowError: the row's index, and the field its message names."""
    text = str(err).removeprefix(f"{where}: ")
    named = _FIELD.search(text)
    return RowError(row, named.group(1) if named else None, text)


def read_row(task: Task, row: dict, i: int, where: str, labelled: bool) -> tuple[Example, ...]:
    """Row `i`'s examples as `task` reads it: the whole row (a label, if any, is checked), or its input fields alone."""
    try:
        examples = tuple(task.parse(row, where) if labelled else task.parse_inputs(row, where))
    except DataError as err:
        raise row_error(i, where, err) from None
    if not examples:
        raise RowError(i, None, f"holds no example for {task.name}")
    return examples


def read_for_routing(tasks: Mapping[str, Task], row: dict, i: int, where: str) -> dict[str, tuple[Example, ...]]:
    """Row `i` as every one of the routed entries' `tasks` that can read it reads it; RowError where none can."""
    if not isinstance(row, dict):
        raise RowError(i, None, f"expected a JSON object, got {type(row).__name__}")
    readings, failed = {}, None
    for name in (name for name, task in tasks.items() if task.reads_row(row)):
        try:
            readings[name] = read_row(tasks[name], row, i, where, labelled=False)
        except RowError as err:
            failed = failed or err
    if failed and not readings:
        raise failed
    if not readings:  # named: the first missing field of the entry that misses fewest
        missing = {name: [f for f in task.input_fields if not holds(row, f)] for name, task in tasks.items()}
        nearest = min(tasks, key=lambda name: len(missing[name]))
        needs = "; ".join(f"{name} needs {', '.join(task.input_fields)}" for name, task in tasks.items())
        raise RowError(i, missing[nearest][0], f"no served entry can read this row ({needs})")
    first = next(iter(readings.values()))
    if not answerable([tasks[name].kind for name in readings], list(first)).any(1).all():
        raise RowError(i, None, f"no entry reading it can score it ({len(first[0].pairs)} text pairs; entries: {', '.join(readings)})")
    return readings
