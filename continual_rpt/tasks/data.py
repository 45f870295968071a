"""Loading task splits from official jsonl folders or the Hugging Face hub, with seeded sub-sampling."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .base import DataError, Example, Task
from .superglue import get_task

HUB_DATASET = "aps/super_glue"
DATA_DIR_ENV = "CRPT_DATA_DIR"

Line = tuple[int, str]  # (1-based line number, raw text); the unit of the dev/test split
T = TypeVar("T")


@dataclass(frozen=True)
class SourceRow:
    """The row an example was parsed from, as read (official jsonl, custom file or hub format), where it was read
    ("path:line", which the uid is made from), and which of the row's examples it is (MultiRC and ReCoRD give several)."""

    row: dict
    where: str
    k: int


def note_sources(sources: dict[Example, SourceRow] | None, examples: list[Example], row: dict, where: str) -> None:
    """Record in `sources` (where given) that `examples` were parsed from `row`, read at `where`."""
    if sources is not None:
        sources.update({example: SourceRow(row, where, k) for k, example in enumerate(examples)})


@dataclass(frozen=True)
class TaskData:
    """The train/dev/test examples of one task, the sha256 of every file they came from, rows skipped per file, and
    the row each test example was parsed from.

    `test_rows` lets another task read a test row as it would read it in a file (`task_free.task_free_answers`: a
    run's task-free scores answer a routed row as `crpt bank predict` without a task does). It maps each test
    example to its row rather than keeping the raw text or re-reading the file by uid: the rows are the ones
    parsed already (the test half of the validation set only), an example finds its row however the test list
    is later sub-sampled (`max_eval`) or reordered, and one mechanism serves jsonl, csv/tsv/json and hub rows.
    """

    task: Task
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    files: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)  # rows whose label names no class (unknown_labels: skip)
    test_rows: dict[Example, SourceRow] = field(default_factory=dict, repr=False)


def utf8_text(path: Path, data: bytes, *, strip_bom: bool = False) -> str:
    """`data` (the bytes of `path`) as UTF-8 text; invalid UTF-8 is a DataError naming the line and column of the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, line_start = data.count(b"\n", 0, error.start) + 1, data.rfind(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at column {error.start - line_start + 1}: "
                        f"{error.reason}); save the file as UTF-8") from None
    # Spreadsheet programs often start a csv with a byte-order mark, which would rename the first column.
    return text.removeprefix("\ufeff") if strip_bom else text


def read_lines(path: Path) -> tuple[str, list[Line]]:
    """The sha256 of a jsonl file and its non-blank lines."""
    data = path.read_bytes()
    text = utf8_text(path, data)
    # Split on "\n" only: JSON strings may legally hold U+2028 and other separators splitlines() honours.
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty")
    return hashlib.sha256(data).hexdigest(), lines


def decode_json_line(line: str, where: str) -> object:
    """One JSON value from a jsonl line; anything json cannot read is a DataError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # integers past Python's digit limit; absurd nesting
        raise DataError(f"{where}: malformed JSON ({type(error).__name__}: {str(error)[:100]})") from None


def _parse_lines(task: Task, path: Path, lines: list[Line], *, labeled: bool,
                 sources: dict[Example, SourceRow] | None = None) -> list[Example]:
    examples = []
    for number, line in lines:
        where = f"{path}:{number}"
        row = decode_json_line(line, where)
        parsed = task.parse(row, where)
        if labeled and any(example.label < 0 for example in parsed):
            raise DataError(
                f"{where}: unlabeled row (missing field 'label', or 'answers' for ReCoRD); "
                "train and val rows need labels"
            )
        note_sources(sources, parsed, row, where)
        examples.extend(parsed)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def read_jsonl(task: Task, path: str | Path, *, labeled: bool = False) -> list[Example]:
    """Parse a whole official jsonl file; with labeled=True a row without a label is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    return _parse_lines(task, path, read_lines(path)[1], labeled=labeled)


def _missing_file_message(task: Task, path: Path, root: Path, split: str) -> str:
    message = (
        f"{path} not found. Download the official SuperGLUE {task.name}.zip and unpack it into {root / task.name}/, "
        f"use `--source hub` (Hugging Face {HUB_DATASET})"
    )
    if split == "train":
        message += ", or take the 32-shot train split with --train-dir pointing to FewGLUE"
    return message + "."


def _task_file(task: Task, root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; pass --data-dir or set {DATA_DIR_ENV}")
    path = root / task.name / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(_missing_file_message(task, path, root, split))
    return path


def halve(units: list[T], split_seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `split_seed` and halve (dev gets the smaller half); each half keeps the original order."""
    order = list(range(len(units)))
    random.Random(split_seed).shuffle(order)
    half = len(units) // 2
    return [units[i] for i in sorted(order[:half])], [units[i] for i in sorted(order[half:])]


def _dev_test_from_file(
    task: Task, path: Path, split_seed: int, files: dict[str, str], test_rows: dict[Example, SourceRow]
) -> tuple[list[Example], list[Example]]:
    files[str(path)], lines = read_lines(path)
    if len(lines) < 2:
        raise DataError(f"{path} has {len(lines)} row(s); at least 2 are needed to split it into dev and test")
    dev_lines, test_lines = halve(lines, split_seed)
    return _parse_lines(task, path, dev_lines, labeled=True), _parse_lines(task, path, test_lines, labeled=True, sources=test_rows)


def _train_from_file(task: Task, root: Path, files: dict[str, str]) -> list[Example]:
    path = _task_file(task, root, "train")
    files[str(path)], lines = read_lines(path)
    return _parse_lines(task, path, lines, labeled=True)


def _hub_units(rows: list[dict]) -> list[list[tuple[int, dict]]]:
    """Group hub rows like the official jsonl lines: one unit per MultiRC paragraph / ReCoRD passage."""

    def unit_key(item: tuple[int, dict]) -> object:
        number, row = item
        idx = row.get("idx")
        return (idx.get("paragraph"), idx.get("passage")) if isinstance(idx, dict) else number

    return [list(group) for _, group in itertools.groupby(enumerate(rows, start=1), key=unit_key)]


def _parse_hub_units(task: Task, units: list[list[tuple[int, dict]]], name: str,
                     sources: dict[Example, SourceRow] | None = None) -> list[Example]:
    examples = []
    for number, row in (item for unit in units for item in unit):
        parsed = task.parse_hub(row, f"{name}:{number}")
        note_sources(sources, parsed, row, f"{name}:{number}")
        examples.extend(parsed)
    return examples


def _load_hub(task: Task, split_seed: int, test_rows: dict[Example, SourceRow]
              ) -> tuple[list[Example], list[Example], list[Example], dict[str, str]]:
    """Train, dev and test from the hub; dev/test halve the validation split exactly as the files are halved."""
    try:
        import datasets
    except ImportError:
        raise DataError("source='hub' needs the `datasets` package; install it or use --data-dir") from None
    name = f"hub:{HUB_DATASET}/{task.hub_config}"
    # `datasets` signals an unreachable or uncached hub with many unrelated exception types.
    try:
        dataset = datasets.load_dataset(HUB_DATASET, task.hub_config)
    except Exception as error:
        raise DataError(
            f"could not load {HUB_DATASET}/{task.hub_config} from the Hugging Face hub ({type(error).__name__}: "
            f"{error}); the hub could not be reached, so use --data-dir with the official SuperGLUE files"
        ) from error
    # The "/val" suffix makes uids read ".../val/...", as for val.jsonl.
    train = _parse_hub_units(task, _hub_units(list(dataset["train"])), f"{name}/train")
    dev_units, test_units = halve(_hub_units(list(dataset["validation"])), split_seed)
    dev, test = _parse_hub_units(task, dev_units, f"{name}/val"), _parse_hub_units(task, test_units, f"{name}/val", test_rows)
    return train, dev, test, {name: getattr(dataset["validation"], "_fingerprint", "") or ""}


def _classes(task: Task, train: list[Example]) -> dict[str, list[int]]:
    """Indices of the training examples of each class that k_per_class samples from."""
    if task.name == "ReCoRD":
        # Every query has its own candidates, so there are no classes to balance.
        return {"all queries": list(range(len(train)))}
    if task.kind == "choice":
        labels = {f"choice{label + 1}": label for label in sorted({example.label for example in train})}
    else:
        labels = {name: label for label, name in enumerate(task.label_names)}
    return {name: [i for i, example in enumerate(train) if example.label == label] for name, label in labels.items()}


def sample(
    task: Task, train: list[Example], k_per_class: int | None, max_train: int | None, seed: int
) -> list[Example]:
    """k examples per class (ReCoRD: k in total), then at most max_train, all seeded and in file order."""
    rng = random.Random(seed)
    keep = list(range(len(train)))
    if k_per_class is not None:
        if k_per_class < 1:
            raise ValueError(f"k_per_class must be positive, got {k_per_class}")
        keep = []
        for name, indices in _classes(task, train).items():
            if k_per_class > len(indices):
                raise DataError(
                    f"{task.name}: k_per_class={k_per_class} but class {name!r} "
                    f"has only {len(indices)} training examples"
                )
            keep.extend(rng.sample(indices, k_per_class))
    if max_train is not None:
        if max_train < 1:
            raise ValueError(f"max_train must be positive, got {max_train}")
        keep = rng.sample(keep, min(max_train, len(keep)))
    return [train[i] for i in sorted(keep)]


def example_sha256(example: Example) -> str:
    """sha256 of an example as parsed: the compact JSON of all its fields (uid, pairs, source, candidates, label, group, answers)."""
    text = json.dumps(dataclasses.astuple(example), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sampled_rows(examples: list[Example]) -> dict:
    """Which training rows a sample took, in file order: each example's uid and sha256.

    A uid names the row by its own id field where the data has one (SuperGLUE's idx: "CB/train/12";
    MultiRC and ReCoRD add the question and answer), else by its line in its file (custom data:
    "<task>/<file stem>/<line>"), so a user can pick the rows out of the recorded data files.
    """
    return {"count": len(examples), "ids": [ex.uid for ex in examples], "sha256": [example_sha256(ex) for ex in examples]}


def load_task_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_dir: str | Path | None = None,
    source: str = "files",
    k_per_class: int | None = None,
    max_train: int | None = None,
    seed: int = 0,
    split_seed: int = 42,
) -> TaskData:
    """Load train/dev/test of a task: dev and test are the two halves of the shuffled validation set."""
    task = get_task(name)
    test_rows: dict[Example, SourceRow] = {}
    if source == "hub":
        train, dev, test, files = _load_hub(task, split_seed, test_rows)
        if train_dir is not None:
            train = _train_from_file(task, Path(train_dir), files)
    elif source == "files":
        if data_dir is None:
            data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is None:
            raise DataError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
        files = {}
        dev, test = _dev_test_from_file(task, _task_file(task, Path(data_dir), "val"), split_seed, files, test_rows)
        train = _train_from_file(task, Path(train_dir if train_dir is not None else data_dir), files)
    else:
        raise ValueError(f"source must be 'files' or 'hub', got {source!r}")
    return TaskData(task, sample(task, train, k_per_class, max_train, seed), dev, test, files, test_rows=test_rows)
