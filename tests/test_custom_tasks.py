"""Custom tasks: csv/tsv/jsonl files become Tasks and TaskData like SuperGLUE's, with errors that point at the cell."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from continual_rpt.tasks import (
    CustomTaskConfig,
    DataError,
    custom_config_from_dict,
    custom_task,
    load_custom_data,
)

REPO = Path(__file__).resolve().parents[1]
NLI = {"name": "NLI", "label_names": ("yes", "no"), "text": "premise", "text_pair": "hypothesis"}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    """Write rows as jsonl; a str row is written verbatim (to produce malformed lines)."""
    return _write(path, "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def _topics(path: Path, n: int) -> Path:
    """n rows of a 3-class topic file with int labels 0, 1, 2, 0, ..."""
    return _jsonl(path, [{"text": f"t{i}", "label": i % 3} for i in range(n)])


TOPIC = {"name": "Topic", "label_names": ("a", "b", "c"), "text": "text"}


def test_csv_text_pair_with_string_labels_and_relative_paths(tmp_path):
    # Line 3 holds a quoted comma and a newline, so the next row starts on line 5.
    train = _write(
        tmp_path / "data/train.csv",
        'premise,hypothesis,label\nA cat sat.,A cat exists.,yes\n"Rain, then\nsun.",It snowed.,no\nX.,Y.,1\n',
    )
    dev = _write(tmp_path / "data/dev.csv", "premise,hypothesis,label\nP.,H.,no\n")
    test = _write(tmp_path / "data/test.csv", "label,hypothesis,premise\nyes,H2.,P2.\n")
    cfg = CustomTaskConfig(**NLI, train="data/train.csv", dev="data/dev.csv", test="data/test.csv")
    data = load_custom_data(cfg, tmp_path)
    first, multiline, by_index = data.train
    assert first.uid == "NLI/train/2"
    assert first.pairs == (("A cat sat.", "A cat exists."),)
    assert first.source == "nli premise: A cat sat. hypothesis: A cat exists."
    assert first.candidates == ("yes", "no") and first.label == 0
    assert (multiline.uid, multiline.pairs[0][0], multiline.label) == ("NLI/train/3", "Rain, then\nsun.", 1)
    assert (by_index.uid, by_index.label) == ("NLI/train/5", 1)
    assert [e.label for e in data.dev] == [1] and data.test[0].pairs == (("P2.", "H2."),)
    assert data.files == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, dev, test)}
    assert data.task.kind == "classification" and data.task.label_names == ("yes", "no")


def test_jsonl_int_and_bool_labels_with_verbalizers(tmp_path):
    rows = [{"q": "Is it?", "gold": 1}, {"q": "Is it not?", "gold": False}, {"q": "Well?", "gold": "True"}]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "val.jsonl", rows[:2])
    cfg = CustomTaskConfig(
        name="Yes", label_names=("False", "True"), verbalizers=("no", "yes"), text="q", label="gold",
        train="train.jsonl", validation="val.jsonl",
    )
    data = load_custom_data(cfg, tmp_path)
    assert [e.label for e in data.train] == [1, 0, 1]
    assert data.train[0].pairs == (("Is it?", None),) and data.train[0].candidates == ("no", "yes")
    assert data.train[0].source == "yes q: Is it?"


def test_tsv_keeps_quotes_and_label_names_win_over_indices(tmp_path):
    # GLUE-style TSV: a lone quote is text, not the start of a quoted field.
    _write(tmp_path / "train.tsv", 'sentence\tstars\nSo "good\t1\nBad.\t5\nOK.\t0\n')
    _write(tmp_path / "val.tsv", "sentence\tstars\nA.\t2\nB.\t3\n")
    cfg = CustomTaskConfig(name="Stars", label_names=("1", "2", "3", "4", "5"), text="sentence", label="stars",
                           train="train.tsv", validation="val.tsv")
    train = load_custom_data(cfg, tmp_path).train
    assert train[0].pairs[0][0] == 'So "good'
    # "1" and "5" are names (indices 0 and 4); "0" names no class, so it is an index.
    assert [e.label for e in train] == [0, 4, 0]


def test_validation_is_halved_disjoint_covering_and_stable(tmp_path):
    _topics(tmp_path / "train.jsonl", 6)
    _topics(tmp_path / "val.jsonl", 11)
    cfg = CustomTaskConfig(**TOPIC, train="train.jsonl", validation="val.jsonl")

    def halves(**kwargs) -> tuple[list[str], list[str]]:
        data = load_custom_data(cfg, tmp_path, **kwargs)
        return [e.uid for e in data.dev], [e.uid for e in data.test]

    dev, test = halves()
    assert len(dev) == 5 and len(test) == 6 and not set(dev) & set(test)
    assert sorted(dev + test, key=lambda uid: int(uid.rsplit("/", 1)[1])) == [f"Topic/val/{i}" for i in range(1, 12)]
    assert halves(split_seed=42) == (dev, test) and halves(seed=7) == (dev, test)
    assert halves(split_seed=3) != (dev, test)


def test_k_per_class_and_max_train_sample_seeded_in_file_order(tmp_path):
    _topics(tmp_path / "train.jsonl", 30)
    _topics(tmp_path / "val.jsonl", 4)
    cfg = CustomTaskConfig(**TOPIC, train="train.jsonl", validation="val.jsonl")
    train = load_custom_data(cfg, tmp_path, k_per_class=2, seed=1).train
    assert sorted(e.label for e in train) == [0, 0, 1, 1, 2, 2]
    assert train == sorted(train, key=lambda e: int(e.uid.rsplit("/", 1)[1]))
    assert load_custom_data(cfg, tmp_path, k_per_class=2, seed=1).train == train
    assert load_custom_data(cfg, tmp_path, k_per_class=2, seed=2).train != train
    assert len(load_custom_data(cfg, tmp_path, max_train=4).train) == 4
    with pytest.raises(DataError, match="k_per_class=11 but class 'a' has only 10"):
        load_custom_data(cfg, tmp_path, k_per_class=11)


def test_several_columns_are_joined(tmp_path):
    _write(tmp_path / "train.csv", "title,body,label\nMars,Rover lands.,sci\n")
    _write(tmp_path / "val.csv", "title,body,label\nA,B,world\nC,D,sci\n")
    cfg = CustomTaskConfig(name="AG News", label_names=("world", "sci"), text=("title", "body"),
                           train="train.csv", validation="val.csv")
    (example,) = load_custom_data(cfg, tmp_path).train
    assert example.pairs == (("Mars Rover lands.", None),)
    assert example.source == "ag news title: Mars body: Rover lands."


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.jsonl", ['{"text": "a", "label": 0}', '{"text": "unterminated'], r"train.jsonl:2: malformed JSON"),
        ("train.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 0}], r"train.jsonl:2: missing column 'text'"),
        ("train.csv", "text,label\na,maybe\n", r"train.csv:2: unknown value 'maybe' in column 'label' "
                                                r"\(expected one of \['a', 'b', 'c'\] or an index 0..2\)"),
        ("train.csv", "text,label\na,0\n\nb,3\n", r"train.csv:4: label index 3 in column 'label' is out of range 0..2"),
        ("train.jsonl", [{"text": "a", "label": -1}], r"train.jsonl:1: label index -1 in column 'label'.*unlabeled"),
        ("train.jsonl", [{"text": "a", "label": None}], r"train.jsonl:1: unknown value None in column 'label'"),
        ("train.jsonl", [{"text": 3, "label": 0}], r"train.jsonl:1: column 'text' must hold text"),
        ("train.tsv", "text\tlabel\na\t0\tb\n", r"train.tsv:2: 3 cells but the header has 2 columns"),
        ("train.jsonl", [], r"train.jsonl is empty"),
        ("train.csv", "", r"train.csv is empty"),
        ("train.csv", "text,label\n", r"train.csv has a header but no rows"),
    ],
)
def test_data_errors_name_file_line_and_column(tmp_path, name, content, message):
    _jsonl(tmp_path / name, content) if isinstance(content, list) else _write(tmp_path / name, content)
    _topics(tmp_path / "val.jsonl", 2)
    cfg = CustomTaskConfig(**TOPIC, train=name, validation="val.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        load_custom_data(cfg, tmp_path)


def test_missing_file_and_too_small_validation_are_errors(tmp_path):
    _topics(tmp_path / "train.jsonl", 3)
    cfg = CustomTaskConfig(**TOPIC, train="train.jsonl", validation="val.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'val.jsonl'))} not found"):
        load_custom_data(cfg, tmp_path)
    _topics(tmp_path / "val.jsonl", 1)
    with pytest.raises(DataError, match="val.jsonl has 1 row.*at least 2"):
        load_custom_data(cfg, tmp_path)


FILES = {"train": "t.csv", "validation": "v.csv"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"label_names": ()}, "label_names"),
        ({"label_names": ("a", "a")}, "label_names"),
        ({"verbalizers": ("x",)}, "verbalizers"),
        ({"text": ()}, "text"),
        ({"text_pair": ("h", "")}, "text_pair"),
        ({"metric": "f1"}, "metric"),
        ({"train": None}, "train"),
        ({"hub": "fancyzhx/ag_news"}, "hub"),
        ({"dev": "d.csv"}, "validation"),
        ({"validation": None, "test": "t2.csv"}, "dev"),
        ({"validation": None, "dev": "d.csv"}, "test"),
        ({"validation": "v.txt"}, "validation"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        CustomTaskConfig(**{**TOPIC, "label_names": ("a", "b"), **FILES, **changes})


def test_hub_config_needs_no_files():
    cfg = CustomTaskConfig(**TOPIC, hub="fancyzhx/ag_news", hub_eval_split="test")
    assert custom_task(cfg).hub_config == ""


def test_config_from_yaml_mapping():
    mapping = yaml.safe_load(
        "name: AGNews\nlabel_names: [World, Sports]\ntext: [title, description]\nhub: fancyzhx/ag_news\n"
        "metric: accuracy+macro_f1\n"
    )
    cfg = custom_config_from_dict(mapping, "stream.yaml: tasks[0]")
    assert cfg.label_names == ("World", "Sports") and cfg.text == ("title", "description")
    assert custom_task(cfg).metric_names == ("accuracy", "macro_f1")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("labels: [a]", r"unknown key 'labels' \(known keys: name, label_names,"),
        ("label_names: [yes, no]", r"label_names must be a list of strings, got \[True, False\]"),
        ("text_pair: 3", r"text_pair must be a string or a list of strings or null, got 3"),
        ("verbalizers: x", r"verbalizers must be a list of strings"),
        ("metric: f1", r"metric must be one of"),
    ],
)
def test_config_from_mapping_errors_name_the_key(yaml_text, message):
    mapping = {"name": "T", "label_names": ["a", "b"], "text": "t", "hub": "h", **yaml.safe_load(yaml_text)}
    with pytest.raises(ValueError, match=rf"^stream.yaml: tasks\[1\]: {message}"):
        custom_config_from_dict(mapping, "stream.yaml: tasks[1]")


def test_config_from_mapping_needs_the_required_keys():
    with pytest.raises(ValueError, match=r"^here: missing key 'text'"):
        custom_config_from_dict({"name": "T", "label_names": ["a"], "hub": "h"}, "here")
    with pytest.raises(ValueError, match=r"^here: a custom task must be a mapping"):
        custom_config_from_dict(["name"], "here")


def test_parse_hub_reads_class_label_rows():
    task = custom_task(CustomTaskConfig(**NLI, hub="nyu-mll/glue", hub_config="rte"))
    row = {"premise": "P", "hypothesis": "H", "label": 1, "idx": 0}
    (example,) = task.parse_hub(row, "hub:nyu-mll/glue/rte/train:4")
    assert (example.uid, example.pairs, example.label) == ("NLI/train/4", (("P", "H"),), 1)


# Golds 0 1 1 0, predictions 0 1 2 0: class 0 has F1 1, class 1 F1 2/3, class 2 (never gold) F1 0.
MACRO_F1 = 100 * (1 + 2 / 3 + 0) / 3


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("accuracy", {"accuracy": 75.0, "score": 75.0}),
        ("macro_f1", {"macro_f1": pytest.approx(MACRO_F1), "score": pytest.approx(MACRO_F1)}),
        (
            "accuracy+macro_f1",
            {"accuracy": 75.0, "macro_f1": pytest.approx(MACRO_F1), "score": pytest.approx((75 + MACRO_F1) / 2)},
        ),
    ],
)
def test_score_follows_the_metric(tmp_path, metric, expected):
    _jsonl(tmp_path / "t.jsonl", [{"text": str(i), "label": label} for i, label in enumerate([0, 1, 1, 0])])
    cfg = CustomTaskConfig(**TOPIC, metric=metric, train="t.jsonl", validation="t.jsonl")
    examples = load_custom_data(cfg, tmp_path).train
    assert custom_task(cfg).score(examples, [0, 1, 2, 0]) == expected


def test_unreachable_hub_is_a_data_error(tmp_path):
    # A fresh interpreter: `datasets` reads the offline switches when imported, and an empty HF_HOME hides any cache.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from continual_rpt.tasks import CustomTaskConfig, DataError, load_custom_data\n"
        "cfg = CustomTaskConfig(name='AG', label_names=('World',), text='text', hub='fancyzhx/ag_news')\n"
        "try:\n    load_custom_data(cfg)\nexcept DataError as error:\n    print('DataError:', error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert "DataError: could not load fancyzhx/ag_news" in result.stdout, result.stderr
    assert "could not be reached" in result.stdout


# --- the CL benchmark's JSON-array layout (../shared/data/cl_benchmark) ------------------------------

MNLI_LABELS = ("neutral", "entailment", "contradiction")


def test_json_array_files_of_the_cl_benchmark_skip_and_count_rows_without_a_gold_label(shared_data):
    folder = shared_data / "cl_benchmark" / "NLI" / "MNLI"
    assert tuple(json.loads((folder / "labels.json").read_text())) == MNLI_LABELS
    cfg = CustomTaskConfig("mnli", MNLI_LABELS, "sentence", train=str(folder / "train.json"),
                           validation=str(folder / "test.json"), unknown_labels="skip")
    data = load_custom_data(cfg)
    test_rows = json.loads((folder / "test.json").read_text())
    unlabelled = sum(row["label"] not in MNLI_LABELS for row in test_rows)
    assert unlabelled == 131  # as the data README counts them
    assert data.skipped == {str(folder / "test.json"): 131}
    assert len(data.train) == 3000 and len(data.dev) + len(data.test) == len(test_rows) - 131
    assert all(0 <= ex.label < 3 for ex in data.dev + data.test)
    assert data.train[0].pairs[0][0] == json.loads((folder / "train.json").read_text())[0]["sentence"]
    assert data.train[5].uid == "mnli/train/[5]"
    assert data.files[str(folder / "train.json")] == hashlib.sha256((folder / "train.json").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"test\.json:\[\d+\]: unknown value '-' in column 'label'"):
        load_custom_data(CustomTaskConfig("mnli", MNLI_LABELS, "sentence", train=str(folder / "train.json"),
                                          validation=str(folder / "test.json")))  # unknown_labels: error (the default)


@pytest.mark.parametrize("content, message", [
    ('{"label": "a", "sentence": "x"}', r"expected one JSON array of rows, got dict"),
    ("[]", r"is an empty array"),
    ('[{"label": "a", "sentence": "x"}, 7]', r"bad\.json:\[1\]: expected a JSON object"),
    ('[{"label": "a", "sentence": "x"}, {"label": "a"}]', r"bad\.json:\[1\]: missing column 'sentence'"),
    ('[{"label": "a", "sentence": "x"', r"bad\.json: malformed JSON"),
])
def test_json_array_errors_name_the_file_and_the_row_index(tmp_path, content, message):
    bad = _write(tmp_path / "bad.json", content)
    cfg = CustomTaskConfig("t", ("a", "b"), "sentence", train=str(bad), validation=str(bad))
    with pytest.raises(DataError, match=message):
        load_custom_data(cfg)


def test_split_from_train_carves_a_seeded_third_into_dev_and_test(shared_data):
    folder = shared_data / "cl_benchmark" / "SC" / "yelp"  # published without a test file
    labels = tuple(json.loads((folder / "labels.json").read_text()))
    cfg = custom_config_from_dict({"name": "yelp", "label_names": list(labels), "text": "sentence",
                                   "train": str(folder / "train.json"), "split_from": "train"}, "stream")
    data = load_custom_data(cfg)
    assert (len(data.train), len(data.dev), len(data.test)) == (3334, 833, 833)
    uids = [ex.uid for ex in data.train + data.dev + data.test]
    assert len(set(uids)) == 5000  # disjoint and covering
    assert [ex.uid for ex in load_custom_data(cfg).test] == [ex.uid for ex in data.test]  # the same carve every time
    with pytest.raises(ValueError, match="split_from: train and validation are both set"):
        CustomTaskConfig("yelp", labels, "sentence", train="a.json", validation="b.json", split_from="train")
    with pytest.raises(ValueError, match="split_from must be 'train'"):
        CustomTaskConfig("yelp", labels, "sentence", train="a.json", split_from="test")


def test_a_missing_evaluation_file_names_the_ways_to_provide_it(shared_data):
    folder = shared_data / "cl_benchmark" / "SC" / "yelp"
    labels = tuple(json.loads((folder / "labels.json").read_text()))
    cfg = CustomTaskConfig("yelp", labels, "sentence", train=str(folder / "train.json"), validation=str(folder / "test.json"))
    with pytest.raises(DataError, match=r"yelp/test\.json not found; .*split_from: train.*hub: <dataset id>"):
        load_custom_data(cfg)


# --- CL benchmark tasks by name, from a folder in its layout -------------------------------------------


def _cl_stream(tmp_path: Path, tasks: list) -> Path:
    return _write(tmp_path / "cl.yaml", yaml.safe_dump({"name": "cl", "data": {"k_per_class": 4}, "tasks": tasks}))


def test_cl_benchmark_tasks_by_name_read_the_layout_under_the_data_dir(tmp_path, shared_data, monkeypatch):
    from continual_rpt.streams import load_data, load_stream

    root = shared_data / "cl_benchmark"
    path = _cl_stream(tmp_path, ["ag", "mnli", {"task": "yelp", "data": {"split_from": "train"}},
                                 {"task": "dbpedia", "data": {"split_from": "test"}}])
    monkeypatch.setenv("CRPT_DATA_DIR", str(root))  # the environment variable, as --data-dir would
    stream = load_stream(path)
    data = {spec.name: load_data(spec, stream.base_dir) for spec in stream.tasks}
    assert data["ag"].task.label_names == tuple(json.loads((root / "TC/agnews/labels.json").read_text()))
    assert "Science or Technology" in data["ag"].task.label_names  # the layout's names, not the hub's
    assert (len(data["ag"].train), len(data["ag"].dev), len(data["ag"].test)) == (16, 3800, 3800)  # test.json halved
    mnli_test = str((root / "NLI/MNLI/test.json").resolve())
    assert data["mnli"].skipped == {mnli_test: 131}  # rows labelled '-': no gold label
    assert len(data["mnli"].dev) + len(data["mnli"].test) == 7600 - 131
    assert len(data["yelp"].dev) == len(data["yelp"].test) == 833  # a seeded third of train.json, halved
    dbpedia = str((root / "TC/dbpedia/test.json").resolve())
    assert list(data["dbpedia"].files) == [dbpedia]  # train, dev and test all carved out of the one file there is
    assert len(data["dbpedia"].dev) + len(data["dbpedia"].test) == 7600 // 3
    assert set(data["dbpedia"].train[0].uid.split("/")[:2]) == {"dbpedia", "test"}
    given = load_stream(path, str(root))  # --data-dir reads the same files as the variable
    assert [spec.custom for spec in given.tasks] == [spec.custom for spec in stream.tasks]


def test_cl_benchmark_missing_files_and_folders_name_the_ways_to_provide_them(tmp_path, shared_data, monkeypatch):
    from continual_rpt.streams import load_data, load_stream

    monkeypatch.delenv("CRPT_DATA_DIR", raising=False)
    root = str(shared_data / "cl_benchmark")
    stream = load_stream(_cl_stream(tmp_path, ["yelp"]), root)  # Yelp's stored copy has no test.json
    with pytest.raises(DataError, match=r"SC/yelp/test\.json not found; .*data: \{split_from: train\}.*data: \{source: hub\}"):
        load_data(stream.tasks[0], stream.base_dir)
    with pytest.raises(ValueError, match=r"tasks\[0\]\.task: .*other/TC/agnews/labels\.json not found.*source: hub"):
        load_stream(_cl_stream(tmp_path, ["ag"]), str(tmp_path / "other"))
    _write(tmp_path / "bad" / "TC" / "agnews" / "labels.json", '{"World": 0}')
    with pytest.raises(ValueError, match=r"bad/TC/agnews/labels\.json: expected a JSON array of distinct label names"):
        load_stream(_cl_stream(tmp_path, ["ag"]), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="amazon: has no copy on the Hugging Face hub"):
        load_stream(_cl_stream(tmp_path, ["amazon"]))
    with pytest.raises(ValueError, match=r"tasks\[0\]\.data\.split_from: 'dev' is not one of train, test"):
        load_stream(_cl_stream(tmp_path, [{"task": "ag", "data": {"split_from": "dev"}}]), root)
    with pytest.raises(ValueError, match=r"tasks\[0\]\.data\.split_from: applies to CL benchmark tasks"):
        load_stream(_cl_stream(tmp_path, [{"task": "CB", "data": {"split_from": "train"}}]), root)
    hub = load_stream(_cl_stream(tmp_path, [{"task": "ag", "data": {"source": "hub"}}]), root)
    assert hub.tasks[0].custom.hub == "fancyzhx/ag_news"  # source: hub wins over the folder
