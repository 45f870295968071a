"""Core task types: examples, tasks, and the data error raised by every loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import mean


class DataError(ValueError):
    """Raised when task data is missing or malformed; the message says where and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One model input with both an encoder (pairs) and a seq2seq (source/candidates) view."""

    uid: str
    pairs: tuple[tuple[str, str | None], ...]
    source: str
    candidates: tuple[str, ...]
    label: int
    group: str = ""
    answers: tuple[str, ...] = ()


Parser = Callable[[dict, str], list[Example]]
Scorer = Callable[[Sequence[Example], Sequence[int]], dict[str, float]]


@dataclass(frozen=True)
class Task:
    """A SuperGLUE task: how to parse its rows and how to score predictions."""

    name: str
    kind: str
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    hub_config: str
    # The per-task functions are plain fields so that each task is one declarative entry.
    official_parser: Parser = field(repr=False, compare=False)
    hub_parser: Parser = field(repr=False, compare=False)
    scorer: Scorer = field(repr=False, compare=False)
    # The row fields its parser needs (dotted where nested, in the official format): rows of two tasks
    # are told apart by their fields before any model sees them, so a router compares inputs only among
    # the entries that can read a row.
    input_fields: tuple[str, ...]

    def reads(self, other: Task) -> bool:
        """Whether this task's parser reads rows in `other`'s format: every field it needs is one of theirs."""
        return set(self.input_fields) <= set(other.input_fields)

    def parse_inputs(self, row: dict, where: str) -> list[Example]:
        """Examples of the row's input fields alone (and its idx), unlabelled: what a router may look at."""
        keep = {path.split(".")[0] for path in self.input_fields} | {"idx"}
        return self.parse({key: value for key, value in row.items() if key in keep}, where)

    def reads_row(self, row: dict) -> bool:
        """Whether `row` holds every field this task's parser needs; its label is not looked at."""
        return all(_has(row, path.split(".")) for path in self.input_fields)

    def parse(self, row: dict, where: str) -> list[Example]:
        """Convert one official-jsonl row (read at `where` = "path:line") into examples."""
        _require_object(row, where)
        return self.official_parser(row, where)

    def parse_hub(self, row: dict, where: str) -> list[Example]:
        """Convert one row of the Hugging Face `aps/super_glue` dataset into examples."""
        _require_object(row, where)
        return self.hub_parser(row, where)

    def score(self, examples: Sequence[Example], predictions: Sequence[int | None]) -> dict[str, float]:
        """Every metric of the task in percent, plus "score", their mean (the official task score).

        A prediction of None is no answer (a task-free row routed to an entry that cannot answer in this
        task's terms): wrong under every metric, and no class's prediction (for F1, a false negative of
        its gold class and a false positive of none).
        """
        if len(examples) != len(predictions):
            raise ValueError(f"{self.name}: {len(examples)} examples but {len(predictions)} predictions")
        if not examples:
            raise ValueError(f"{self.name}: nothing to score")
        for example, prediction in zip(examples, predictions):
            if example.label < 0:
                raise ValueError(f"{self.name}: cannot score unlabeled example {example.uid}")
            n_options = len(self.label_names) if self.kind == "classification" else len(example.candidates)
            if prediction is not None and not 0 <= prediction < n_options:
                raise ValueError(f"{self.name}: prediction {prediction} out of range for {example.uid}")
        fractions = self.scorer(examples, predictions)
        scores = {name: 100.0 * fractions[name] for name in self.metric_names}
        scores["score"] = mean(scores.values())
        return scores


def _has(row: object, keys: list[str]) -> bool:
    return not keys or (isinstance(row, dict) and keys[0] in row and _has(row[keys[0]], keys[1:]))


def _require_object(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
