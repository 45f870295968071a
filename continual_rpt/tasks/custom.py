"""User-declared classification tasks: a text (or text pair) and a label read from csv/tsv/jsonl/json files or the hub.

A `.json` file is one JSON array of row objects, the layout in which O-LoRA, SAPT and later papers
ship the CL benchmark (`{"label": name, "sentence": text}`); its rows are located by array index
(`train.json:[17]`). `unknown_labels: skip` drops rows whose label is not a class (MNLI's `-`
rows, which have no gold label) and counts them in `TaskData.skipped`. `split_from: train` carves
a seeded third of the train file out as the validation set (halved into dev and test, like any
validation file), for datasets published without an evaluation file.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import random
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import metrics
from .base import DataError, Example, Parser, Task
from .data import SourceRow, TaskData, decode_json_line, halve, note_sources, read_lines, sample, utf8_text

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
UNKNOWN_LABELS = ("error", "skip")
FILE_FIELDS = ("train", "validation", "dev", "test")

Row = tuple[int | str, dict]  # (1-based line where the row starts, or "[i]" in a JSON array; the row as read)


@dataclass(frozen=True)
class CustomTaskConfig:
    """A classification task declared by the user: which columns hold the text(s) and the label, and where data is."""

    name: str
    label_names: tuple[str, ...]
    text: str | tuple[str, ...]
    text_pair: str | tuple[str, ...] | None = None
    label: str = "label"
    verbalizers: tuple[str, ...] = ()
    train: str | None = None
    validation: str | None = None
    dev: str | None = None
    test: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_train_split: str = "train"
    hub_eval_split: str = "test"
    metric: str = "accuracy"
    unknown_labels: str = "error"
    split_from: str | None = None

    def __post_init__(self) -> None:
        """Reject inconsistent declarations, naming the offending field."""
        if not self.name:
            raise ValueError("name must not be empty")
        if not self.label_names:
            raise ValueError("label_names must list at least one class")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names must be unique, got {list(self.label_names)}")
        if self.verbalizers and len(self.verbalizers) != len(self.label_names):
            raise ValueError(
                f"verbalizers has {len(self.verbalizers)} words but label_names has {len(self.label_names)} classes"
            )
        for field_name in ("text", "text_pair"):
            columns = _columns(getattr(self, field_name))
            if getattr(self, field_name) is not None and not (columns and all(columns)):
                raise ValueError(f"{field_name} must name at least one column, and no empty column")
        metrics.classification_metrics(self.metric, self.label_names)  # a term it cannot read raises, naming the metric
        if self.unknown_labels not in UNKNOWN_LABELS:
            raise ValueError(f"unknown_labels must be one of {list(UNKNOWN_LABELS)}, got {self.unknown_labels!r}")
        self._check_source()

    def _check_source(self) -> None:
        given = [field_name for field_name in FILE_FIELDS if getattr(self, field_name) is not None]
        if self.hub is not None:
            if given:
                raise ValueError(f"hub and {given[0]} are both set; read the data either from the hub or from files")
            return
        if self.train is None:
            raise ValueError("train is missing: give a training file (or a hub dataset id)")
        if self.split_from is not None:
            if self.split_from != "train":
                raise ValueError(f"split_from must be 'train' (carve dev and test out of the train file), got {self.split_from!r}")
            if len(given) > 1:
                raise ValueError(f"split_from: train and {given[1]} are both set; dev and test come from the train file")
        elif self.validation is not None and (self.dev is not None or self.test is not None):
            raise ValueError("validation is set together with dev/test; give either validation or both dev and test")
        elif self.validation is None and (self.dev is None or self.test is None):
            raise ValueError(f"{'dev' if self.dev is None else 'test'} is missing: give validation, or dev and test")
        for field_name in given:
            path = getattr(self, field_name)
            if Path(path).suffix.lower() not in SUFFIXES:
                raise ValueError(f"{field_name} must be a {', '.join(SUFFIXES)} file, got {path!r}")


def _columns(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


# --- rows to examples ------------------------------------------------------------------------------


def _cell(row: dict, column: str, where: str) -> object:
    if column not in row:
        raise DataError(f"{where}: missing column '{column}' (the row has {list(row)})")
    return row[column]


def _text(row: dict, column: str, where: str) -> str:
    value = _cell(row, column, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}' must hold text, got {type(value).__name__}")
    return value


class UnknownLabel(DataError):
    """A label cell that names no class (and is no class index)."""


def _label(row: dict, cfg: CustomTaskConfig, where: str) -> int:
    """The class index of a label cell: a label name, or an index (int, bool, or digit string from csv/tsv).

    A row without the label column is unlabeled (-1): fine for prediction, refused in train/dev/test.
    """
    if cfg.label not in row:
        return -1
    value = row[cfg.label]
    names = cfg.label_names
    if isinstance(value, str):
        # Names win over indices so that names like "1".."5" (review stars) keep their meaning.
        if value in names:
            return names.index(value)
        if value.isascii() and value.isdigit():
            value = int(value)
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int):
        raise UnknownLabel(
            f"{where}: unknown value {value!r} in column '{cfg.label}' "
            f"(expected one of {list(names)} or an index 0..{len(names) - 1})"
        )
    if not 0 <= value < len(names):
        # Hub test splits without public labels (GLUE, SST-2) mark every row -1.
        hint = "; -1 marks an unlabeled row, so evaluate on a labeled split" if value == -1 else ""
        span = f"0..{len(names) - 1}"
        raise DataError(f"{where}: label index {value} in column '{cfg.label}' is out of range {span}{hint}")
    return value


def _row_parser(cfg: CustomTaskConfig) -> Parser:
    text_columns, pair_columns = _columns(cfg.text), _columns(cfg.text_pair)
    candidates = cfg.verbalizers or cfg.label_names

    def parse(row: dict, where: str) -> list[Example]:
        texts = [_text(row, column, where) for column in text_columns]
        pairs = [_text(row, column, where) for column in pair_columns]
        fields = zip(text_columns + pair_columns, texts + pairs)
        source = " ".join([cfg.name.lower(), *(f"{column}: {value}" for column, value in fields)])
        # `where` is "<file or hub split>:<line>"; the file stem and line make the uid unique within a split.
        origin, line = where.rsplit(":", 1)
        uid = f"{cfg.name}/{Path(origin).stem}/{line}"
        pair = " ".join(pairs) if pair_columns else None
        return [Example(uid, ((" ".join(texts), pair),), source, candidates, _label(row, cfg, where))]

    return parse


def _score(chosen: dict, examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    golds = [example.label for example in examples]
    return {name: metric(predictions, golds) for name, metric in chosen.items()}


def custom_task(cfg: CustomTaskConfig) -> Task:
    """The Task of a custom declaration; hub rows have the file columns, so both parsers are the same."""
    parser = _row_parser(cfg)
    chosen, hub_config = metrics.classification_metrics(cfg.metric, cfg.label_names), cfg.hub_config or ""
    return Task(cfg.name, "classification", cfg.label_names, tuple(chosen), hub_config, parser, parser, functools.partial(_score, chosen),
                _columns(cfg.text) + _columns(cfg.text_pair))


# --- files -----------------------------------------------------------------------------------------


def _table_rows(path: Path, text: str) -> Iterator[Row]:
    """Rows of a csv/tsv text as {header column: cell}, keyed by their first physical line, in file order."""
    tsv = path.suffix.lower() == ".tsv"
    # TSV files (GLUE's among them) use quote characters literally; only csv honours quoting.
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if tsv else (",", csv.QUOTE_MINIMAL)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next((cells for cells in reader if cells), [])
        if not header:
            raise DataError(f"{path} is empty")
        start, any_rows = reader.line_num + 1, False
        for cells in reader:
            if cells:  # the reader gives [] for a blank line
                if len(cells) != len(header):
                    raise DataError(f"{path}:{start}: {len(cells)} cells but the header has {len(header)} columns")
                any_rows = True
                yield start, dict(zip(header, cells))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: malformed {path.suffix[1:]} ({error})") from None
    if not any_rows:
        raise DataError(f"{path} has a header but no rows")


def _array_rows(path: Path, data: bytes) -> Iterator[Row]:
    """Rows of a file holding one JSON array, located by their index in it."""
    rows = decode_json_line(utf8_text(path, data, strip_bom=True), str(path))
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected one JSON array of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path} is an empty array")
    return ((f"[{i}]", row) for i, row in enumerate(rows))


def _iter_rows(path: Path, files: dict[str, str]) -> Iterator[Row]:
    """The rows of a csv, tsv or jsonl file, checked one by one in file order; records its sha256 in `files`."""
    if not path.is_file():
        raise DataError(f"{path} not found; give the file, or carve the missing splits (seeded) out of the file there is "
                        "(a custom task: split_from: train; a CL benchmark task: data: {split_from: train} or {split_from: test}), "
                        "or read the dataset from the hub (a custom task: hub: <dataset id>; a CL benchmark task: data: {source: hub})")
    if path.suffix.lower() == ".jsonl":
        files[str(path)], lines = read_lines(path)
        return ((number, decode_json_line(line, f"{path}:{number}")) for number, line in lines)
    data = path.read_bytes()
    if path.suffix.lower() == ".json":
        files[str(path)] = hashlib.sha256(data).hexdigest()
        return _array_rows(path, data)
    text = utf8_text(path, data, strip_bom=True)
    files[str(path)] = hashlib.sha256(data).hexdigest()
    return _table_rows(path, text)


def _parse_rows(parse: Parser, origin: str, rows: Iterable[Row], label_column: str | None,
                skipped: dict[str, int] | None = None, sources: dict[Example, SourceRow] | None = None) -> list[Example]:
    """Examples of `rows`; with a `label_column`, every row must carry a label.

    With `skipped` given, a row whose label names no class is dropped and counted under `origin`;
    with `sources` given, each example's row is noted there.
    """
    examples = []
    for number, row in rows:
        try:
            parsed = parse(row, f"{origin}:{number}")
        except UnknownLabel:
            if skipped is None:
                raise
            skipped[origin] = skipped.get(origin, 0) + 1
            continue
        if label_column is not None and any(example.label < 0 for example in parsed):
            raise DataError(f"{origin}:{number}: missing column '{label_column}' (the row has {list(row)})")
        note_sources(sources, parsed, row, f"{origin}:{number}")
        examples.extend(parsed)
    return examples


def read_custom_examples(cfg: CustomTaskConfig, path: str | Path) -> list[Example]:
    """Examples of a custom task from a csv, tsv or jsonl file; the label column is optional (for prediction)."""
    path = Path(path)
    return _parse_rows(custom_task(cfg).parse, str(path), _iter_rows(path, {}), None)


def _halves(rows: list[Row], origin: str, split_seed: int) -> tuple[list[Row], list[Row]]:
    if len(rows) < 2:
        raise DataError(f"{origin} has {len(rows)} row(s); at least 2 are needed to split it into dev and test")
    return halve(rows, split_seed)


def _load_files(task: Task, cfg: CustomTaskConfig, base_dir: Path, split_seed: int) -> TaskData:
    files: dict[str, str] = {}
    skipped: dict[str, int] | None = {} if cfg.unknown_labels == "skip" else None

    def load(field_name: str) -> tuple[str, list[Row]]:
        path = base_dir / getattr(cfg, field_name)
        return str(path), list(_iter_rows(path, files))

    def parse(origin: str, rows: list[Row], sources: dict[Example, SourceRow] | None = None) -> list[Example]:
        return _parse_rows(task.parse, origin, rows, cfg.label, skipped, sources)

    train_path, train_rows = load("train")
    held: set[int] = set()
    if cfg.split_from == "train":  # a seeded third of the train file is the validation set
        order = list(range(len(train_rows)))
        random.Random(split_seed).shuffle(order)
        held = set(order[: len(order) // 3])
    train = parse(train_path, [row for i, row in enumerate(train_rows) if i not in held])
    test_rows: dict[Example, SourceRow] = {}
    if cfg.split_from == "train" or cfg.validation is not None:
        carved = (train_path, [row for i, row in enumerate(train_rows) if i in held])
        origin, rows = carved if cfg.split_from == "train" else load("validation")
        dev_half, test_half = _halves(rows, origin, split_seed)
        dev, test = parse(origin, dev_half), parse(origin, test_half, test_rows)
    else:
        dev, test = parse(*load("dev")), parse(*load("test"), test_rows)
    return TaskData(task, train, dev, test, files, skipped or {}, test_rows)


def _load_hub(task: Task, cfg: CustomTaskConfig, split_seed: int) -> TaskData:
    """Train from the train split; dev/test halve the evaluation split as a validation file is halved."""
    try:
        import datasets
    except ImportError:
        raise DataError("a hub task needs the `datasets` package; install it or give train/validation files") from None
    dataset_id = cfg.hub + (f"/{cfg.hub_config}" if cfg.hub_config else "")
    name = f"hub:{dataset_id}"
    # `datasets` signals an unreachable or uncached hub with many unrelated exception types.
    try:
        dataset = datasets.load_dataset(cfg.hub, cfg.hub_config)
    except Exception as error:
        raise DataError(
            f"could not load {dataset_id} from the Hugging Face hub ({type(error).__name__}: {error}); the hub could "
            "not be reached or the id/config is wrong; check them or give train/validation files instead"
        ) from error
    for split in (cfg.hub_train_split, cfg.hub_eval_split):
        if split not in dataset:
            raise DataError(f"{name} has no split {split!r}; set hub_train/eval_split to one of {list(dataset)}")
    train_name, eval_name = f"{name}/{cfg.hub_train_split}", f"{name}/{cfg.hub_eval_split}"
    train = _parse_rows(task.parse_hub, train_name, list(enumerate(dataset[cfg.hub_train_split], start=1)), cfg.label)
    eval_rows = list(enumerate(dataset[cfg.hub_eval_split], start=1))
    dev_half, test_half = _halves(eval_rows, eval_name, split_seed)
    test_rows: dict[Example, SourceRow] = {}
    dev = _parse_rows(task.parse_hub, eval_name, dev_half, cfg.label)
    test = _parse_rows(task.parse_hub, eval_name, test_half, cfg.label, sources=test_rows)
    files = {f"{name}/{split}": getattr(dataset[split], "_fingerprint", "") or "" for split in (cfg.hub_train_split, cfg.hub_eval_split)}
    return TaskData(task, train, dev, test, files, test_rows=test_rows)


def load_custom_data(cfg: CustomTaskConfig, base_dir: str | Path | None = None, *, k_per_class: int | None = None,
                     max_train: int | None = None, seed: int = 0, split_seed: int = 42) -> TaskData:
    """Load train/dev/test of a custom task; relative paths resolve against `base_dir` (the stream file's folder)."""
    task = custom_task(cfg)
    data = _load_hub(task, cfg, split_seed) if cfg.hub is not None else _load_files(task, cfg, Path(base_dir or "."), split_seed)
    return dataclasses.replace(data, train=sample(task, data.train, k_per_class, max_train, seed))


# --- YAML mappings -------------------------------------------------------------------------------------


def _options(hint: object) -> tuple[object, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _describe(option: object) -> str:
    if option is type(None):
        return "null"
    return "a string" if option is str else "a list of strings"


def _convert(key: str, value: object, hint: object, where: str) -> object:
    """`value` as field `key` wants it (YAML lists become tuples); ValueError if it fits no option of the hint."""
    for option in _options(hint):
        if (option is type(None) and value is None) or (option is str and isinstance(value, str)):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    expected = " or ".join(map(_describe, _options(hint)))
    # YAML turns unquoted yes/no/on/off into booleans and 1 into an integer.
    raise ValueError(f"{where}: {key} must be {expected}, got {value!r} (quote values YAML reads as other types)")


def custom_config_from_dict(d: dict, where: str) -> CustomTaskConfig:
    """Build a CustomTaskConfig from a YAML mapping; every error starts with `where` and names the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a custom task must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(CustomTaskConfig)
    fields = dataclasses.fields(CustomTaskConfig)
    for key in d:
        if key not in hints:
            raise ValueError(f"{where}: unknown key {key!r} (known keys: {', '.join(field.name for field in fields)})")
    for field in fields:
        if field.default is dataclasses.MISSING and field.name not in d:
            raise ValueError(f"{where}: missing key {field.name!r}")
    kwargs = {key: _convert(key, value, hints[key], where) for key, value in d.items()}
    try:
        return CustomTaskConfig(**kwargs)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
