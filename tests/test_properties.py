"""Property tests: loaders, the stream parser and the bank's metadata fail only with their own errors, naming where.

Each property runs on generated input; the explicit cases at the end of each section pin inputs that
once escaped as a foreign exception (or without a location), so each defect shows up as its own test.
"""

import copy
import csv
import dataclasses
import hashlib
import io
import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from continual_rpt.backbones import BackboneConfig, load_backbone
from continual_rpt.bank import BankError, Entry, PromptBank, check_name
from continual_rpt.evaluation import load_answerer
from continual_rpt.learner import TrainConfig
from continual_rpt.prompts import ACTIVATIONS, INITS, METHODS, PromptConfig
from continual_rpt.streams import STRATEGIES, DataConfig, Stream, parse_stream
from continual_rpt.tasks import (
    CustomTaskConfig,
    DataError,
    get_task,
    read_custom_examples,
    read_jsonl,
)
from continual_rpt.tasks.catalog import HUB_TASKS

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Text cells: any Unicode scalar (no surrogates), weighted towards the characters that break naive parsers.
TRICKY = ["\u2028", "\u2029", "\x85", '"', "'", "\\", ",", "\t", "\r", "\n", "\r\n", "\x00", "é", "🙂", "", " ", "a,b", '"quoted"']
TEXT = st.one_of(st.text(st.characters(codec="utf-8"), max_size=12), st.sampled_from(TRICKY),
                 st.lists(st.sampled_from(TRICKY + ["x", "y"]), max_size=5).map("".join))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


# --- data loaders: SuperGLUE jsonl ----------------------------------------------------------------

LABELS = {  # official label values
    "CB": ["entailment", "contradiction", "neutral"], "RTE": ["entailment", "not_entailment"],
    "COPA": [0, 1], "BoolQ": [False, True], "WiC": [False, True], "WSC": [False, True], "MultiRC": [0, 1],
}
REQUIRED = {
    "CB": ["premise", "hypothesis", "idx"], "RTE": ["premise", "hypothesis", "idx"],
    "COPA": ["premise", "choice1", "choice2", "question", "idx"], "BoolQ": ["question", "passage", "idx"],
    "WiC": ["word", "sentence1", "sentence2", "idx"], "WSC": ["text", "target", "idx"], "MultiRC": ["idx", "passage"],
}
BAD_LABELS = ["maybe", 2.5, None, [], {}, 7, "1"]


@st.composite
def superglue_row(draw, task: str) -> tuple[dict, int, bool]:
    """A valid official row of `task`, how many examples it makes, and whether it is labeled."""
    label = lambda: st.sampled_from(LABELS[task])
    idx = draw(st.integers(0, 10**6))
    if task in ("CB", "RTE"):
        row = {"premise": draw(TEXT), "hypothesis": draw(TEXT), "idx": idx}
    elif task == "COPA":
        row = {"premise": draw(TEXT), "choice1": draw(TEXT), "choice2": draw(TEXT),
               "question": draw(st.sampled_from(["cause", "effect"])), "idx": idx}
    elif task == "BoolQ":
        row = {"question": draw(TEXT), "passage": draw(TEXT), "idx": idx}
    elif task == "WiC":
        row = {"word": draw(TEXT), "sentence1": draw(TEXT), "sentence2": draw(TEXT), "idx": idx}
    elif task == "WSC":
        row = {"text": draw(TEXT), "target": {"span1_text": draw(TEXT), "span2_text": draw(TEXT)}, "idx": idx}
    else:  # MultiRC: one row, many examples
        questions = [{"idx": q, "question": draw(TEXT),
                      "answers": [{"idx": a, "text": draw(TEXT), "label": draw(label())} for a in range(draw(st.integers(1, 3)))]}
                     for q in range(draw(st.integers(1, 2)))]
        return {"idx": idx, "passage": {"text": draw(TEXT), "questions": questions}}, sum(len(q["answers"]) for q in questions), True
    if draw(st.integers(0, 4)):  # mostly labeled; an unlabeled row is valid only for read_jsonl(labeled=False)
        row["label"] = draw(label())
    return row, 1, "label" in row


@st.composite
def jsonl_file(draw, task: str) -> tuple[list[str], list]:
    """Lines of a jsonl file and, per line, None (blank), 'bad', or (examples it makes, labeled)."""
    lines, status = [], []
    for _ in range(draw(st.integers(1, 6))):
        row, count, has_label = draw(superglue_row(task))
        kind = draw(st.sampled_from(["ok"] * 6 + ["truncate", "not-object", "drop", "bad-label", "bad-type", "garbage", "blank"]))
        text = json.dumps(row, ensure_ascii=draw(st.booleans()))
        if kind == "ok":
            lines.append(text), status.append((count, has_label))
            continue
        if kind == "truncate":
            text = text[: draw(st.integers(1, len(text) - 1))]
        elif kind == "not-object":
            text = json.dumps(draw(st.lists(JSON, max_size=2) | st.integers() | TEXT | st.none() | st.booleans()))
        elif kind == "drop":
            key = draw(st.sampled_from(REQUIRED[task]))
            text = json.dumps({k: v for k, v in row.items() if k != key})
        elif kind == "bad-label":
            target = row["passage"]["questions"][0]["answers"][0] if task == "MultiRC" else row
            target["label"] = draw(st.sampled_from(BAD_LABELS))
            text = json.dumps(row)
        elif kind == "bad-type":
            key = draw(st.sampled_from([k for k in REQUIRED[task] if k != "idx"]))
            row[key] = draw(st.sampled_from([5, None, ["x"], 1.5, True]))
            text = json.dumps(row)
        elif kind == "garbage":
            text = draw(TEXT.filter(lambda t: "\n" not in t))
        elif kind == "blank":
            text = draw(st.sampled_from(["", " ", "\t", "  \r"]))
        blank = not text.strip()
        lines.append(text), status.append(None if blank else "bad")
    return lines, status


@SETTINGS
@given(data=st.data(), task=st.sampled_from(sorted(LABELS)), labeled=st.booleans(), newline_at_end=st.booleans())
def test_read_jsonl_returns_every_row_or_names_the_first_bad_line(workdir, data, task, labeled, newline_at_end):
    lines, status = data.draw(jsonl_file(task))
    path = workdir / task / "val.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")
    rows = [s for s in status if s not in (None, "bad")]
    # With labeled=True (train and val files) an unlabeled row is as bad as a malformed one.
    bad = [n for n, s in enumerate(status, start=1) if s == "bad" or (labeled and s is not None and not s[1])]
    try:
        examples = read_jsonl(get_task(task), path, labeled=labeled)
    except DataError as err:
        message = str(err)
        if bad:
            assert f"{path}:{bad[0]}:" in message, message
        else:  # the only error without a bad line: a file with no rows at all
            assert str(path) in message and not [s for s in status if s is not None], message
        return
    assert not bad, f"line {bad[0]} is bad but was accepted"
    assert len(examples) == sum(count for count, _ in rows)
    assert all(ex.label >= 0 for ex in examples) or not labeled


@pytest.mark.parametrize("line", ["[" * 100000, '{"idx": ' + "7" * 5000 + "}"], ids=["deeply-nested", "integer-too-long"])
def test_read_jsonl_pathological_line_is_a_data_error_naming_it(workdir, line):
    path = workdir / "patho.jsonl"
    good = json.dumps({"premise": "a", "hypothesis": "b", "idx": 0, "label": "neutral"})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(DataError) as err:
        read_jsonl(get_task("CB"), path)
    assert f"{path}:2:" in str(err.value)


# --- data loaders: custom csv / jsonl ----------------------------------------------------------

NAMES = ("neg", "pos", "5 stars")
CUSTOM = CustomTaskConfig("my-task", NAMES, "text", "text2", label="label", train="t.csv", validation="v.csv")


def _valid_label(value) -> bool:
    if isinstance(value, str):
        return value in NAMES or (value.isascii() and value.isdigit() and int(value) < len(NAMES))
    return isinstance(value, int) and 0 <= int(value) < len(NAMES)


LABEL_CELL = st.sampled_from([*NAMES, "0", "1", "2", "01"]) | TEXT
JSON_LABEL = st.sampled_from([*NAMES, 0, 1, 2, True, False, "2", 3, -1, 1.0, None, [], "x", "٣"])


@st.composite
def csv_file(draw) -> tuple[str, list, list[int]]:
    """csv text, the status of each data row ('ok' / 'bad'), and the physical line each row starts on."""
    out = io.StringIO()
    writer = csv.writer(out)  # "\r\n" rows: fields holding "\r" or "\n" get quoted
    writer.writerow(["text", "text2", "label"])
    status, starts = [], []
    for _ in range(draw(st.integers(1, 6))):
        start = len(io.StringIO(out.getvalue(), newline="").readlines()) + 1
        text, text2, label = draw(TEXT), draw(TEXT), draw(LABEL_CELL)
        kind = draw(st.sampled_from(["ok"] * 5 + ["cells", "blank"]))
        if kind == "blank":
            out.write("\r\n")
            continue
        if kind == "cells":
            writer.writerow(draw(st.sampled_from([[text, label], [text, text2, label, "extra"]])))
            status.append("bad")
        else:
            writer.writerow([text, text2, label])
            status.append("ok" if _valid_label(label) else "bad")
        starts.append(start)
    return out.getvalue(), status, starts


@SETTINGS
@given(content=csv_file(), bom=st.booleans())
def test_read_custom_csv_returns_every_row_or_names_the_first_bad_row(workdir, content, bom):
    text, status, starts = content
    path = workdir / "rows.csv"
    path.write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
    bad = [line for line, s in zip(starts, status) if s == "bad"]
    try:
        examples = read_custom_examples(CUSTOM, path)
    except DataError as err:
        assert bad or not status, f"no bad row, but: {err}"  # a header without rows is an error too
        assert (f"{path}:{bad[0]}:" if bad else str(path)) in str(err), str(err)
        return
    assert not bad, f"row on line {bad[0]} is bad but was accepted"
    assert len(examples) == len(status)
    assert [int(ex.uid.rsplit("/", 1)[1]) for ex in examples] == starts  # uids name the row's first line


@st.composite
def custom_jsonl_file(draw) -> tuple[list[str], list]:
    lines, status = [], []
    for _ in range(draw(st.integers(1, 6))):
        row = {"text": draw(TEXT), "text2": draw(TEXT)}
        if draw(st.integers(0, 4)):
            row["label"] = draw(JSON_LABEL)
        kind = draw(st.sampled_from(["ok"] * 5 + ["drop", "type", "truncate", "not-object", "blank"]))
        ok = "label" not in row or _valid_label(row["label"])
        if kind == "drop":
            del row[draw(st.sampled_from(["text", "text2"]))]
            ok = False
        elif kind == "type":
            row["text"], ok = draw(st.sampled_from([1, None, ["a"], {"a": 1}, 2.5])), False
        text = json.dumps(row, ensure_ascii=draw(st.booleans()))
        if kind == "truncate":
            text, ok = text[: draw(st.integers(1, len(text) - 1))], False
        elif kind == "not-object":
            text, ok = json.dumps(draw(st.lists(JSON, max_size=2) | TEXT | st.integers())), False
        elif kind == "blank":
            lines.append(" "), status.append(None)
            continue
        lines.append(text), status.append("ok" if ok else "bad")
    return lines, status


@SETTINGS
@given(content=custom_jsonl_file())
def test_read_custom_jsonl_returns_every_row_or_names_the_first_bad_line(workdir, content):
    lines, status = content
    path = workdir / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bad = [n for n, s in enumerate(status, start=1) if s == "bad"]
    rows = [s for s in status if s is not None]
    try:
        examples = read_custom_examples(CUSTOM, path)
    except DataError as err:
        assert bad or not rows, f"no bad line, but: {err}"
        assert (f"{path}:{bad[0]}:" if bad else str(path)) in str(err), str(err)
        return
    assert not bad, f"line {bad[0]} is bad but was accepted"
    assert len(examples) == len(rows)


# --- stream-file parser -----------------------------------------------------------------------------

CHOICES = {"source": ["files", "hub"], "method": list(METHODS), "init": [i for i in INITS if i != "text"],
           "activation": list(ACTIVATIONS), "pooling": ["cls", "mean"]}
HUGE = st.integers(10**308, 10**400)  # a YAML integer too large for a float


def _good_value(f: dataclasses.Field):
    kind = type(f.default)
    if f.name in CHOICES:
        return st.sampled_from(CHOICES[f.name])
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(1, 5)
    if kind is float:
        return st.floats(0.0, 0.5, exclude_max=True) | st.integers(0, 0)
    return st.text(string.ascii_letters + "/._-", max_size=8)


def section(cls, junk: bool):
    fields = dataclasses.fields(cls)
    good = st.one_of(*[st.tuples(st.just(f.name), _good_value(f)) for f in fields])
    items = good | st.tuples(st.sampled_from([f.name for f in fields]) | TEXT, JSON | HUGE) if junk else good
    return st.lists(items, max_size=3).map(dict)


SAFE_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,10}", fullmatch=True).filter(lambda n: ".." not in n)


@st.composite
def custom_decl(draw, junk: bool) -> dict:
    d = {"name": draw(SAFE_NAME), "label_names": draw(st.lists(SAFE_NAME, min_size=1, max_size=3, unique=True)),
         "text": draw(st.sampled_from(["sentence", ["title", "body"]]))}
    if draw(st.booleans()):
        d["hub"] = draw(SAFE_NAME)
    else:
        d.update(train="train.csv", validation=draw(st.sampled_from(["val.csv", "val.jsonl"])))
    if junk:
        for _ in range(draw(st.integers(1, 2))):
            d[draw(st.sampled_from(["name", "label_names", "text", "text_pair", "label", "metric", "train", "nope"]))] = draw(JSON)
    return d


@st.composite
def task_item(draw, junk: bool):
    kind = draw(st.sampled_from(["name", "mapping", "custom"] + (["junk"] if junk else [])))
    if kind == "junk":
        return draw(JSON)
    known = st.sampled_from(["CB", "copa", "RTE", "WiC", "BoolQ", "MultiRC", "ReCoRD", "WSC", *HUB_TASKS])
    if kind == "name":
        return draw(known | TEXT) if junk else draw(known)
    item = {"custom": draw(custom_decl(junk and draw(st.booleans())))} if kind == "custom" else {"task": draw(known)}
    if draw(st.booleans()):
        item["name"] = draw(SAFE_NAME | TEXT) if junk else draw(SAFE_NAME)
    for name, cls in (("data", DataConfig), ("prompt", PromptConfig), ("train", TrainConfig)):
        if draw(st.booleans()):
            item[name] = draw(section(cls, junk))
    return item


@st.composite
def stream_doc(draw):
    junk = draw(st.booleans())
    doc = {"name": draw(SAFE_NAME | TEXT | JSON) if junk else draw(SAFE_NAME)}
    for name, cls in (("backbone", BackboneConfig), ("data", DataConfig), ("prompt", PromptConfig), ("train", TrainConfig)):
        if draw(st.booleans()):
            doc[name] = draw(section(cls, junk))
    if draw(st.booleans()):
        doc["strategy"] = draw(st.sampled_from(["bank", "progressive", "shared"]) | (JSON if junk else st.nothing()))
    if draw(st.booleans()):
        doc["description"] = draw(TEXT | (JSON if junk else st.nothing()))
    doc["tasks"] = draw(st.lists(task_item(junk), min_size=0 if junk else 1, max_size=3))
    if junk and draw(st.integers(0, 5)) == 0:
        doc[draw(TEXT)] = draw(JSON)
    if junk and draw(st.integers(0, 8)) == 0:
        return draw(JSON)
    return doc


def _as_yaml(value):
    """A resolved configuration as a YAML loader would give it back (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _as_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_yaml(v) for v in value]
    return value


def _doc_of(stream: Stream) -> dict:
    """The resolved stream written back as a stream file: every task with every setting explicit."""
    resolved = _as_yaml(stream.resolved())
    tasks = []
    for t in resolved["tasks"]:
        item = {"name": t["name"], **({"custom": t["custom"]} if t["custom"] else {"task": t["task"]})}
        tasks.append({**item, "data": t["data"], "prompt": t["prompt"], "train": t["train"]})
    return {"name": resolved["name"], "description": resolved["description"], "backbone": resolved["backbone"],
            "strategy": resolved["strategy"], "tasks": tasks}


@SETTINGS
@given(doc=stream_doc())
def test_parse_stream_returns_a_stream_or_a_value_error_naming_the_file(doc):
    where = "streams/gen.yaml"
    try:
        stream = parse_stream(copy.deepcopy(doc), where, Path("/nonexistent/base"))
    except ValueError as err:
        event("refused")
        assert str(err).startswith(where), str(err)
        return
    event("parsed")
    assert isinstance(stream, Stream) and stream.tasks and stream.strategy in STRATEGIES
    again = parse_stream(_doc_of(stream), where, Path("/nonexistent/base"))
    assert again.resolved() == stream.resolved()
    for before, after in zip(stream.tasks, again.tasks):  # every task keeps its name, data and settings
        assert dataclasses.asdict(before) == dataclasses.asdict(after)


@pytest.mark.parametrize("section_name, key", [("train", "lr"), ("prompt", "dropout"), ("train", "weight_decay")])
def test_parse_stream_huge_integer_for_a_float_is_a_value_error(section_name, key):
    doc = {"name": "x", "tasks": ["CB"], section_name: {key: 10**400}}
    with pytest.raises(ValueError) as err:
        parse_stream(doc, "gen.yaml", Path("."))
    assert str(err.value).startswith("gen.yaml") and key in str(err.value)


# --- bank metadata ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tiny_bert_dir):
    return load_backbone(str(tiny_bert_dir))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, backbone) -> Path:
    """A bank with CB and COPA (COPA's prompt follows CB's: a context entry), built without training."""
    path = tmp_path_factory.mktemp("pristine") / "bank"
    bank = PromptBank.open(path, create=True)
    torch.manual_seed(0)
    for name, context in (("CB", []), ("COPA", ["CB"])):
        task = get_task(name)
        meta = {"name": name, "task": name, "custom": None, "kind": task.kind, "label_names": list(task.label_names),
                "backbone": {"name": backbone.name, "family": backbone.family, "width": backbone.width, "fingerprint": backbone.fingerprint},
                "method": "rpt", "prompt_tokens": 3, "context": context}
        bank.add(name, Entry(torch.randn(3, backbone.width), backbone.new_head(task).state_dict(), meta,
                             {"train": {"max_length": 64, "bf16": False}}, {"dev_score": 1.0}))
    return path


def _copy(pristine: Path, workdir: Path) -> Path:
    target = workdir / "bank"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine, target)
    return target


def _rehash(bank: Path, name: str, filename: str) -> None:
    index = json.loads((bank / "bank.json").read_text())
    for item in index["entries"]:
        if item["name"] == name:
            item["files"][filename] = hashlib.sha256((bank / name / filename).read_bytes()).hexdigest()
    (bank / "bank.json").write_text(json.dumps(index))


def _use(bank_dir: Path, backbone, names=None) -> None:
    """Open the bank and load every entry (or `names`) for prediction: success or BankError naming the bank."""
    try:
        bank = PromptBank.open(bank_dir)
        for name in names or bank.tasks():
            bank.get(name)
            load_answerer(bank, name, backbone)
    except BankError as err:
        assert str(bank_dir) in str(err), f"BankError without the bank's path: {err}"


@st.composite
def entry_edit(draw, meta: dict):
    kind = draw(st.sampled_from(["replace", "delete", "set", "set-backbone", "delete-backbone"]))
    meta = copy.deepcopy(meta)
    if kind == "replace":
        return draw(JSON)
    if kind == "delete":
        meta.pop(draw(st.sampled_from(sorted(meta))), None)
    elif kind == "set":
        meta[draw(st.sampled_from([*sorted(meta), "custom", "context", "extra"]))] = draw(JSON | st.sampled_from(["CB", "COPA", ["CB"]]))
    elif kind == "set-backbone":
        meta["backbone"][draw(st.sampled_from(["name", "width", "fingerprint", "family"]))] = draw(JSON | st.just(32))
    else:
        meta["backbone"].pop(draw(st.sampled_from(["width", "fingerprint"])))
    return meta


@SLOW
@given(data=st.data(), name=st.sampled_from(["CB", "COPA"]), rehash=st.booleans())
def test_edited_entry_json_is_a_bank_error_naming_the_bank(pristine, workdir, backbone, data, name, rehash):
    bank = _copy(pristine, workdir)
    meta = json.loads((bank / name / "entry.json").read_text())
    edited = data.draw(entry_edit(meta))
    (bank / name / "entry.json").write_text(json.dumps(edited))
    if rehash:  # a consistent hand edit: the index agrees, so the content itself must be checked
        _rehash(bank, name, "entry.json")
    _use(bank, backbone, [name])


@st.composite
def index_edit(draw, index: dict):
    index = copy.deepcopy(index)
    kind = draw(st.sampled_from(["replace", "format", "entries", "item", "name", "files", "file-key", "file-value"]))
    item = index["entries"][draw(st.integers(0, 1))]
    if kind == "replace":
        return draw(JSON)
    if kind == "format":
        index["format"] = draw(JSON)
    elif kind == "entries":
        index["entries"] = draw(JSON)
    elif kind == "item":
        index["entries"][0] = draw(JSON)
    elif kind == "name":
        item["name"] = draw(JSON | TEXT | st.sampled_from(["../CB", "CB/..", "", ".CB", "COPA", "a/b"]))
    elif kind == "files":
        item["files"] = draw(JSON)
    elif kind == "file-key":
        item["files"][draw(TEXT | st.sampled_from(["../bank.json", "/etc/hostname", "", "."]))] = "0" * 64
    else:
        item["files"][draw(st.sampled_from(sorted(item["files"])))] = draw(JSON)
    return index


@SLOW
@given(data=st.data())
def test_edited_bank_json_is_a_bank_error_naming_the_bank(pristine, workdir, backbone, data):
    bank = _copy(pristine, workdir)
    index = json.loads((bank / "bank.json").read_text())
    (bank / "bank.json").write_text(json.dumps(data.draw(index_edit(index))))
    _use(bank, backbone)


# Single edits that each once escaped as a foreign exception or without a path (entry.json, index rehashed).
ENTRY_CASES = {
    "entry-is-a-list": lambda m: [m],
    "entry-is-null": lambda m: None,
    "fingerprint-not-a-string": lambda m: {**m, "backbone": {**m["backbone"], "fingerprint": 5}},
    "backbone-not-a-mapping": lambda m: {**m, "backbone": "tiny"},
    "unknown-task": lambda m: {**m, "task": "NoSuchTask"},
    "task-not-a-string": lambda m: {**m, "task": 3},
    "custom-not-a-mapping": lambda m: {**m, "custom": "yes"},
    "custom-missing-keys": lambda m: {**m, "custom": {"name": "x"}},
    "context-not-a-list": lambda m: {**m, "context": "CB"},
    "context-unknown-entry": lambda m: {**m, "context": ["Nope"]},
    "context-not-names": lambda m: {**m, "context": [1, {}]},
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_entry_json_edit_is_refused_as_a_bank_error_naming_the_file(pristine, workdir, backbone, case):
    bank_dir = _copy(pristine, workdir)
    meta = json.loads((bank_dir / "COPA" / "entry.json").read_text())
    (bank_dir / "COPA" / "entry.json").write_text(json.dumps(ENTRY_CASES[case](meta)))
    _rehash(bank_dir, "COPA", "entry.json")
    with pytest.raises(BankError) as err:
        load_answerer(PromptBank.open(bank_dir), "COPA", backbone)
    assert str(bank_dir / "COPA") in str(err.value)


INDEX_CASES = {
    "name-with-parent": lambda i: i["entries"][0].update(name="../CB"),
    "name-missing": lambda i: i["entries"][0].pop("name"),
    "name-not-a-string": lambda i: i["entries"][0].update(name=7),
    "files-key-outside-the-entry": lambda i: i["entries"][0]["files"].update({"../../bank.json": "0" * 64}),
    "files-key-absolute": lambda i: i["entries"][0]["files"].update({"/etc/hostname": "0" * 64}),
    "files-key-unknown": lambda i: i["entries"][0]["files"].update({"notes.txt": "0" * 64}),
    "files-digest-not-a-string": lambda i: i["entries"][0]["files"].update({"entry.json": 5}),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bank_json_edit_is_refused_as_a_bank_error_naming_the_index(pristine, workdir, backbone, case):
    bank_dir = _copy(pristine, workdir)
    index = json.loads((bank_dir / "bank.json").read_text())
    INDEX_CASES[case](index)
    (bank_dir / "bank.json").write_text(json.dumps(index))
    with pytest.raises(BankError) as err:
        bank = PromptBank.open(bank_dir)
        for name in bank.tasks():
            load_answerer(bank, name, backbone)
    assert str(bank_dir) in str(err.value), str(err.value)


def test_an_index_listing_no_files_does_not_switch_verification_off(pristine, workdir):
    bank_dir = _copy(pristine, workdir)
    index = json.loads((bank_dir / "bank.json").read_text())
    index["entries"][0]["files"] = {}
    (bank_dir / "bank.json").write_text(json.dumps(index))
    prompt = bank_dir / "CB" / "prompt.safetensors"
    data = bytearray(prompt.read_bytes())
    data[-1] ^= 0x40  # change a stored prompt value
    prompt.write_bytes(bytes(data))
    with pytest.raises(BankError):
        PromptBank.open(bank_dir).get("CB")


# --- entry names ---------------------------------------------------------------------------------------

NAME_CHARS = set(string.ascii_letters + string.digits + "_.+-")


def _safe(name) -> bool:
    return (isinstance(name, str) and 1 <= len(name) <= 128 and set(name) <= NAME_CHARS and name[0].isascii()
            and name[0].isalnum() and ".." not in name)


NAME = st.one_of(
    st.text(max_size=12),
    st.text(st.sampled_from(sorted(NAME_CHARS) + ["/", "\\", "\n", " ", ".", ":", "\x00"]), max_size=12),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,10}\n?", fullmatch=True),
    st.sampled_from(["..", ".", "", "a/b", "a\\b", "../x", ".hidden", "x" * 129, "x" * 128, "CB\n", "é", "CON", "a..b"]),
)


@SETTINGS
@given(name=NAME | st.none() | st.integers() | st.binary(max_size=4))
def test_check_name_accepts_exactly_the_safe_names(name):
    if _safe(name):
        assert check_name(name) == name
    else:
        with pytest.raises(BankError):
            check_name(name)
