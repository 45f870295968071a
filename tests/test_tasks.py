"""SuperGLUE/FewGLUE loading: real file counts, dev/test halves, few-shot sampling, errors, hub rows."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from continual_rpt.tasks import SUPERGLUE, DataError, Example, get_task, load_task_data, read_jsonl

REPO = Path(__file__).resolve().parents[1]

# (file under shared/data, task, examples as counted in shared/data/README.md; MultiRC counts answer options)
FILES = [
    ("superglue/BoolQ/val.jsonl", "BoolQ", 3270),
    ("superglue/BoolQ/test.jsonl", "BoolQ", 3245),
    ("superglue/CB/train.jsonl", "CB", 250),
    ("superglue/CB/val.jsonl", "CB", 56),
    ("superglue/CB/test.jsonl", "CB", 250),
    ("superglue/COPA/train.jsonl", "COPA", 400),
    ("superglue/COPA/val.jsonl", "COPA", 100),
    ("superglue/COPA/test.jsonl", "COPA", 500),
    ("superglue/MultiRC/train.jsonl", "MultiRC", 27243),
    ("superglue/MultiRC/val.jsonl", "MultiRC", 4848),
    ("superglue/MultiRC/test.jsonl", "MultiRC", 9693),
    ("superglue/RTE/train.jsonl", "RTE", 2490),
    ("superglue/RTE/val.jsonl", "RTE", 277),
    ("superglue/RTE/test.jsonl", "RTE", 3000),
    ("superglue/WSC/train.jsonl", "WSC", 554),
    ("superglue/WSC/val.jsonl", "WSC", 104),
    ("superglue/WSC/test.jsonl", "WSC", 146),
    ("superglue/WiC/train.jsonl", "WiC", 5428),
    ("superglue/WiC/val.jsonl", "WiC", 638),
    ("superglue/WiC/test.jsonl", "WiC", 1400),
    ("fewglue/BoolQ/train.jsonl", "BoolQ", 32),
    ("fewglue/CB/train.jsonl", "CB", 32),
    ("fewglue/COPA/train.jsonl", "COPA", 32),
    ("fewglue/COPA/unlabeled.jsonl", "COPA", 400),
    ("fewglue/MultiRC/train.jsonl", "MultiRC", 154),
    ("fewglue/RTE/train.jsonl", "RTE", 32),
    ("fewglue/ReCoRD/train.jsonl", "ReCoRD", 32),
    ("fewglue/WSC/train.jsonl", "WSC", 32),
    ("fewglue/WSC/unlabeled.jsonl", "WSC", 554),
    ("fewglue/WiC/train.jsonl", "WiC", 32),
    ("fewglue/WiC/unlabeled.jsonl", "WiC", 5428),
]

# Label counts stated in the README, as label indices.
LABEL_COUNTS = [
    ("superglue/BoolQ/val.jsonl", "BoolQ", {1: 2033, 0: 1237}),
    ("fewglue/BoolQ/train.jsonl", "BoolQ", {1: 18, 0: 14}),
    ("fewglue/CB/train.jsonl", "CB", {0: 19, 1: 10, 2: 3}),
    ("fewglue/COPA/train.jsonl", "COPA", {0: 14, 1: 18}),
    ("fewglue/MultiRC/train.jsonl", "MultiRC", {1: 68, 0: 86}),
    ("fewglue/RTE/train.jsonl", "RTE", {0: 13, 1: 19}),
    ("fewglue/WiC/train.jsonl", "WiC", {1: 17, 0: 15}),
    ("fewglue/WSC/train.jsonl", "WSC", {1: 32}),
]


def _uids(examples: list[Example]) -> list[str]:
    return [example.uid for example in examples]


def _write(path: Path, rows: list) -> Path:
    """Write rows as jsonl; a str row is written verbatim (to produce malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_the_file_list_covers_every_task_file(shared_data):
    task_files = [p for p in shared_data.glob("*/*/*.jsonl") if not p.parent.name.startswith("AX")]  # diagnostics
    on_disk = {str(p.relative_to(shared_data)) for p in task_files}
    assert on_disk == {path for path, _, _ in FILES}


@pytest.mark.parametrize(("path", "name", "count"), FILES, ids=[path for path, _, _ in FILES])
def test_every_file_loads_with_the_readme_count(shared_data, path, name, count):
    examples = read_jsonl(get_task(name), shared_data / path)
    assert len(examples) == count
    duplicates = [uid for uid, n in Counter(_uids(examples)).items() if n > 1]
    # As published, FewGLUE's WiC unlabeled set repeats training row 1754 (and lacks row 1974).
    assert duplicates == (["WiC/unlabeled/1754"] if path == "fewglue/WiC/unlabeled.jsonl" else [])
    unlabeled = path.endswith(("test.jsonl", "unlabeled.jsonl"))
    assert all((example.label == -1) == unlabeled for example in examples)


@pytest.mark.parametrize(("path", "name", "counts"), LABEL_COUNTS, ids=[path for path, _, _ in LABEL_COUNTS])
def test_label_counts_match_the_readme(shared_data, path, name, counts):
    assert Counter(example.label for example in read_jsonl(get_task(name), shared_data / path)) == counts


def test_multirc_val_has_953_questions_that_never_straddle_dev_and_test(shared_data):
    val = read_jsonl(get_task("MultiRC"), shared_data / "superglue/MultiRC/val.jsonl")
    assert len({example.group for example in val}) == 953
    data = load_task_data("multirc", shared_data / "superglue")
    assert len(data.dev) + len(data.test) == 4848
    assert not {example.group for example in data.dev} & {example.group for example in data.test}
    assert "<b>" not in data.dev[0].pairs[0][0] and "<br>" not in data.dev[0].pairs[0][0]


def test_record_fewglue_queries_point_at_a_gold_entity(shared_data):
    examples = read_jsonl(get_task("ReCoRD"), shared_data / "fewglue/ReCoRD/train.jsonl")
    assert len(examples) == 32
    for example in examples:
        assert example.candidates[example.label] in example.answers
        assert len(set(example.candidates)) == len(example.candidates) == len(example.pairs)
        assert "@highlight" not in example.pairs[0][0] and "@placeholder" not in example.pairs[0][1]
        assert example.source.startswith("record query: ")


def test_dev_and_test_halve_val_independently_of_seed(shared_data):
    val = _uids(read_jsonl(get_task("RTE"), shared_data / "superglue/RTE/val.jsonl"))
    data = load_task_data("RTE", shared_data / "superglue", seed=0)
    dev, test = _uids(data.dev), _uids(data.test)
    assert (len(dev), len(test)) == (277 // 2, 277 - 277 // 2)
    assert not set(dev) & set(test) and sorted(dev + test) == sorted(val)
    reseeded = load_task_data("RTE", shared_data / "superglue", seed=7)
    assert (_uids(reseeded.dev), _uids(reseeded.test)) == (dev, test)
    again = load_task_data("RTE", shared_data / "superglue", split_seed=42)
    assert _uids(again.dev) == dev
    assert _uids(load_task_data("RTE", shared_data / "superglue", split_seed=1).dev) != dev


def test_files_maps_every_read_file_to_its_sha256(shared_data):
    data = load_task_data("CB", shared_data / "superglue")
    published = dict(line.split()[::-1] for line in (shared_data / "SHA256SUMS").read_text().splitlines())
    assert set(data.files) == {str(shared_data / f"superglue/CB/{split}.jsonl") for split in ("train", "val")}
    for path, digest in data.files.items():
        assert digest == published[str(Path(path).relative_to(shared_data))]
        assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_k_per_class_takes_k_of_each_class_seeded_and_in_file_order(shared_data):
    def train(name: str, **kwargs) -> list[Example]:
        return load_task_data(name, shared_data / "superglue", **kwargs).train

    rte = train("RTE", k_per_class=4, seed=0)
    assert Counter(example.label for example in rte) == {0: 4, 1: 4}
    assert _uids(rte) == _uids(train("RTE", k_per_class=4, seed=0))
    assert _uids(rte) != _uids(train("RTE", k_per_class=4, seed=1))
    indices = [int(uid.split("/")[-1]) for uid in _uids(rte)]
    assert indices == sorted(indices)
    assert Counter(example.label for example in train("COPA", k_per_class=3)) == {0: 3, 1: 3}
    capped = train("RTE", k_per_class=4, max_train=5, seed=0)
    assert len(capped) == 5 and set(_uids(capped)) <= set(_uids(rte))
    assert len(train("WiC", max_train=10)) == 10


def test_record_loads_end_to_end_with_k_in_total(shared_data, tmp_path):
    fewglue_record = shared_data / "fewglue/ReCoRD/train.jsonl"
    for split in ("train", "val"):
        (tmp_path / "ReCoRD").mkdir(exist_ok=True)
        shutil.copy(fewglue_record, tmp_path / "ReCoRD" / f"{split}.jsonl")
    data = load_task_data("ReCoRD", tmp_path, k_per_class=5)
    assert (len(data.train), len(data.dev), len(data.test)) == (5, 16, 16)


def test_too_large_k_names_task_class_and_count(shared_data):
    with pytest.raises(DataError, match=r"CB: k_per_class=4 but class 'neutral' has only 3"):
        load_task_data("CB", shared_data / "superglue", train_dir=shared_data / "fewglue", k_per_class=4)


def test_missing_boolq_train_says_how_to_get_it(shared_data):
    with pytest.raises(DataError) as error:
        load_task_data("BoolQ", shared_data / "superglue")
    message = str(error.value)
    assert str(shared_data / "superglue/BoolQ/train.jsonl") in message
    assert "BoolQ.zip" in message and "--source hub" in message and "--train-dir" in message and "FewGLUE" in message
    data = load_task_data("BoolQ", shared_data / "superglue", train_dir=shared_data / "fewglue")
    assert (len(data.train), len(data.dev), len(data.test)) == (32, 1635, 1635)


def test_missing_record_val_names_the_file(shared_data):
    with pytest.raises(DataError, match=r"ReCoRD/val\.jsonl not found.*ReCoRD\.zip"):
        load_task_data("ReCoRD", shared_data / "superglue")


def test_data_dir_comes_from_the_environment(shared_data, monkeypatch):
    monkeypatch.delenv("CRPT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="CRPT_DATA_DIR"):
        load_task_data("CB")
    monkeypatch.setenv("CRPT_DATA_DIR", str(shared_data / "superglue"))
    assert len(load_task_data("CB").train) == 250


RTE_ROW = {"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": "entailment", "idx": 0}


def test_malformed_json_names_path_and_line(tmp_path):
    path = _write(tmp_path / "rte.jsonl", [RTE_ROW, '{"premise": "unterminated'])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        read_jsonl(get_task("RTE"), path)


def test_missing_field_names_path_line_and_field(tmp_path):
    row = {key: value for key, value in RTE_ROW.items() if key != "hypothesis"}
    path = _write(tmp_path / "rte.jsonl", [RTE_ROW, row])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'hypothesis'"):
        read_jsonl(get_task("RTE"), path)
    question = {"question": "Q?", "idx": 0, "answers": [{"idx": 0, "label": 1}]}
    multirc = {"idx": 0, "passage": {"text": "T.", "questions": [question]}}
    path = _write(tmp_path / "multirc.jsonl", [multirc])
    with pytest.raises(DataError, match=r"missing field 'passage\.questions\[0\]\.answers\[0\]\.text'"):
        read_jsonl(get_task("MultiRC"), path)


def test_unknown_label_names_the_value(tmp_path):
    path = _write(tmp_path / "rte.jsonl", [{**RTE_ROW, "label": "maybe"}])
    with pytest.raises(DataError, match=rf"{path}:1: unknown value 'maybe' in field 'label'"):
        read_jsonl(get_task("RTE"), path)
    # BoolQ labels are JSON booleans; the string form some copies use is rejected.
    boolq = _write(tmp_path / "boolq.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": "true"}])
    with pytest.raises(DataError, match="'label'"):
        read_jsonl(get_task("BoolQ"), boolq)


def test_unlabeled_training_row_is_an_error(tmp_path):
    _write(tmp_path / "RTE/val.jsonl", [RTE_ROW, {**RTE_ROW, "idx": 1}])
    train = _write(tmp_path / "RTE/train.jsonl", [RTE_ROW, {key: v for key, v in RTE_ROW.items() if key != "label"}])
    with pytest.raises(DataError, match=rf"{train}:2: unlabeled row \(missing field 'label'"):
        load_task_data("RTE", tmp_path)


def test_empty_or_too_small_val_is_an_error(tmp_path):
    val = _write(tmp_path / "RTE/val.jsonl", [])
    with pytest.raises(DataError, match=rf"{val} is empty"):
        load_task_data("RTE", tmp_path)
    _write(val, [RTE_ROW])
    with pytest.raises(DataError, match="at least 2"):
        load_task_data("RTE", tmp_path)


def test_task_lookup_is_case_insensitive_and_lists_known_names():
    assert get_task("rte") is SUPERGLUE["RTE"] and get_task("MULTIRC").name == "MultiRC"
    with pytest.raises(ValueError, match="BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC"):
        get_task("mnli")


def test_tasks_declare_kinds_labels_and_metrics():
    assert [name for name, task in SUPERGLUE.items() if task.kind == "choice"] == ["COPA", "ReCoRD"]
    assert get_task("CB").metric_names == ("accuracy", "macro_f1")
    assert get_task("MultiRC").metric_names == ("f1a", "em") and get_task("ReCoRD").metric_names == ("f1", "em")
    assert get_task("RTE").label_names == ("entailment", "not_entailment") and get_task("COPA").label_names == ()


def _hub_rows(name: str, row: dict) -> list[dict]:
    """The rows aps/super_glue holds for one official row (labels become ClassLabel indices)."""
    label_names = SUPERGLUE[name].label_names
    if name == "MultiRC":
        passage = row["passage"]
        return [
            {
                "paragraph": passage["text"], "question": q["question"], "answer": a["text"], "label": a["label"],
                "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]},
            }
            for q in passage["questions"]
            for a in q["answers"]
        ]
    if name == "ReCoRD":
        text = row["passage"]["text"]
        spans = sorted((e["start"], e["end"] + 1) for e in row["passage"]["entities"])
        starts, ends = [s for s, _ in spans], [e for _, e in spans]
        entity_spans = {"text": [text[s:e] for s, e in spans], "start": starts, "end": ends}
        return [
            {
                "passage": text, "query": qa["query"], "entities": sorted(set(entity_spans["text"])),
                "entity_spans": entity_spans, "answers": sorted({a["text"] for a in qa["answers"]}),
                "idx": {"passage": row["idx"], "query": qa["idx"]},
            }
            for qa in row["qas"]
        ]
    hub = {**row, **row.get("target", {})}
    hub.pop("target", None)
    hub["label"] = label_names.index(row["label"]) if name in ("CB", "RTE") else int(row["label"])
    return [hub]


@pytest.mark.parametrize("name", list(SUPERGLUE))
def test_parse_hub_gives_the_same_examples_as_the_official_row(shared_data, name):
    path = shared_data / ("fewglue/ReCoRD/train.jsonl" if name == "ReCoRD" else f"superglue/{name}/val.jsonl")
    task = get_task(name)
    row = json.loads(path.read_text().split("\n", 1)[0])
    official = task.parse(row, f"{path}:1")
    hub_where = f"hub:aps/super_glue/{task.hub_config}/{path.stem}:1"
    assert [example for hub_row in _hub_rows(name, row) for example in task.parse_hub(hub_row, hub_where)] == official
    assert official and all(example.label >= 0 for example in official)


def test_parse_hub_reads_label_minus_one_as_unlabeled():
    row = {"premise": "p", "hypothesis": "h", "idx": 3, "label": -1}
    assert get_task("RTE").parse_hub(row, "hub:aps/super_glue/rte/test:4")[0].label == -1


def test_unreachable_hub_is_a_data_error(tmp_path):
    # A fresh interpreter: `datasets` reads the offline switches when imported, and an empty HF_HOME hides any cache.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from continual_rpt.tasks import DataError, load_task_data\n"
        "try:\n    load_task_data('rte', source='hub')\nexcept DataError as error:\n    print('DataError:', error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert "DataError:" in result.stdout, result.stderr
    assert "could not be reached" in result.stdout and "--data-dir" in result.stdout


def test_a_tasks_declared_input_fields_say_exactly_which_rows_its_parser_reads(superglue_dir, shared_data):
    # The run's task-free scores route by declared fields, `crpt bank predict` by parsing each row: the two
    # must agree, on real rows of every task (ReCoRD is not in shared/data: one row in its official format).
    from continual_rpt.tasks.catalog import catalog_task
    from continual_rpt.tasks.custom import custom_task

    rows = {name: json.loads((superglue_dir / name / "val.jsonl").open().readline()) for name in SUPERGLUE if name != "ReCoRD"}
    rows["ReCoRD"] = {"idx": 0, "passage": {"text": "Ann met Bob.", "entities": [{"start": 0, "end": 2}]},
                      "qas": [{"idx": 0, "query": "@placeholder met Bob.", "answers": [{"start": 0, "end": 2, "text": "Ann"}]}]}
    tasks = dict(SUPERGLUE)
    for name in ("ag", "mnli"):  # the CL benchmark layout: one JSON array of {"label", "sentence"} per file
        declared = catalog_task(name, shared_data / "cl_benchmark")
        tasks[name], rows[name] = custom_task(declared), json.loads(Path(declared.validation).read_text())[0]
    for reader, task in tasks.items():
        for writer, row in rows.items():
            try:  # the row with its label: parse_inputs leaves the label out, as routing must
                task.parse_inputs(row, f"{writer}/val.jsonl:1")
                parsed = True
            except DataError:
                parsed = False
            assert parsed == task.reads_row(row) == task.reads(tasks[writer]), (reader, writer)
    assert get_task("CB").reads(get_task("RTE")) and not get_task("WiC").reads(get_task("RTE"))
