"""Streams into a bank: stream files, the accuracy matrix, no forgetting, resume, bank queries."""

import dataclasses
import json

import pytest
import torch
import yaml
from crash import killed

from continual_rpt.bank import PromptBank
from continual_rpt.cli import main
from continual_rpt.evaluation import average_score, backward_transfer, forgetting, load_answerer, predict_from_bank
from continual_rpt.learner import train_task
from continual_rpt.run import run_stream
from continual_rpt.strategies import bank as bank_strategy
from continual_rpt.strategies.base import entry_for
from continual_rpt.streams import load_data, load_stream


def write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks, name="tiny.yaml", **extra):
    doc = {
        "name": "tiny",
        "backbone": {"backbone": str(tiny_bert_dir)},
        "data": {"data_dir": str(superglue_dir), "max_train": 16},
        "prompt": {"n_tokens": 3, "bottleneck": 8},
        "train": {"epochs": 1, "batch_size": 8, "max_length": 96, "bf16": False},
        "tasks": tasks,
        **extra,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_continual_metrics_by_hand():
    R = [[60.0, None, None], [50.0, 70.0, None], [40.0, 65.0, 80.0]]
    assert average_score(R) == pytest.approx((40 + 65 + 80) / 3)
    assert forgetting(R) == pytest.approx(((60 - 40) + (70 - 65)) / 2)
    assert backward_transfer(R) == pytest.approx(((40 - 60) + (65 - 70)) / 2)
    assert forgetting([[50.0]]) is None and backward_transfer([[50.0]]) is None


def test_three_task_stream_has_exactly_no_forgetting(tmp_path, tiny_bert, tiny_bert_dir, superglue_dir, monkeypatch):
    stream = load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA", {"task": "RTE", "prompt": {"method": "pt"}}]))
    rescored = []  # the strategy scoring a stored entry again (checked to fail with BankStrategy.predict always reading the bank)
    monkeypatch.setattr(bank_strategy, "predict_from_bank", lambda bank, name, *rest: rescored.append(name) or predict_from_bank(bank, name, *rest))
    metrics = run_stream(stream, tmp_path / "run", progress=False)
    assert rescored == []
    R = metrics["accuracy_matrix"]
    assert R[0][0] == R[1][0] == R[2][0] and R[1][1] == R[2][1]
    assert metrics["forgetting"] == 0.0 and metrics["backward_transfer"] == 0.0
    assert "forward_transfer" not in metrics  # never measurable: no strategy answers a task before learning it
    rows = (tmp_path / "run" / "accuracy_matrix.csv").read_text().splitlines()
    assert rows[0] == "after_task,CB,COPA,RTE" and rows[1].endswith(",,")
    assert set(metrics["per_task"]["RTE"]) >= {"prompt_tokens_in_context", "trainable_parameters", "stored_parameters", "task_seconds"}
    bank = PromptBank.open(tmp_path / "run" / "bank")
    assert bank.tasks() == ["CB", "COPA", "RTE"]
    # Each task's test split is scored once, on the state just before it was stored (the entry records that score),
    # and the stored entry answers exactly so: the same predictions, read back from the bank.
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    for i, (t, spec) in enumerate(zip(["CB", "COPA", "RTE"], stream.tasks)):
        assert R[i][i] == bank.get(t).metrics["test_score"] == state["scored"][t]["score"]["score"]
        test = load_data(spec, stream.base_dir).test
        assert predict_from_bank(bank, t, test, tiny_bert) == state["scored"][t]["predictions"]
    assert "learn RTE" in (tmp_path / "run" / "log.txt").read_text()


def test_learning_more_tasks_leaves_earlier_predictions_bit_identical(tmp_path, tiny_bert, tiny_bert_dir, superglue_dir):
    stream = load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA", "WiC"]))
    bank = PromptBank.open(tmp_path / "bank", create=True)
    cb = load_data(stream.tasks[0], stream.base_dir)

    def cb_scores():
        task, prompt, head, _ = load_answerer(bank, "CB", tiny_bert)
        batch = tiny_bert.collate(tiny_bert.featurize(cb.test, 93))
        with torch.no_grad():
            return tiny_bert.scores(prompt, head, batch)

    for i, spec in enumerate(stream.tasks):
        data = load_data(spec, stream.base_dir)
        trained = train_task(tiny_bert, data, spec.prompt, spec.train)
        bank.add(spec.name, entry_for(spec, data, tiny_bert, stream.backbone, trained))
        if i == 0:
            after_first = cb_scores()
            files_before = {p.name: p.read_bytes() for p in (tmp_path / "bank" / "CB").iterdir()}
    assert torch.equal(cb_scores(), after_first)
    assert {p.name: p.read_bytes() for p in (tmp_path / "bank" / "CB").iterdir()} == files_before


def test_resume_after_kill_continues_with_the_unfinished_task(tmp_path, tiny_bert_dir, superglue_dir):
    tasks = ["CB", {"task": "RTE", "data": {"max_train": 32}, "train": {"epochs": 2, "patience": 0}}, "COPA"]
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks)
    out = tmp_path / "run"
    killed(["run", path, "--out", out, "--no-progress"], "train.step@5")  # CB trains 2 steps: this is RTE's third of 8
    assert len(json.loads((out / "state.json").read_text())["rows"]) == 1
    assert "learn RTE" in (out / "log.txt").read_text() and "after RTE" not in (out / "log.txt").read_text()
    bank = PromptBank.open(out / "bank")
    assert bank.tasks() == ["CB"]
    cb_files = {p.name: p.read_bytes() for p in (out / "bank" / "CB").iterdir()}

    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2  # refuses to clobber without --resume
    assert main(["run", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    bank.refresh()
    assert bank.tasks() == ["CB", "RTE", "COPA"]
    assert {p.name: p.read_bytes() for p in (out / "bank" / "CB").iterdir()} == cb_files
    resumed = json.loads((out / "metrics.json").read_text())

    fresh = run_stream(load_stream(path), tmp_path / "fresh", progress=False)
    assert resumed["accuracy_matrix"] == fresh["accuracy_matrix"]  # as if never interrupted
    assert "resume stream tiny (3 tasks), 1 finished" in (out / "log.txt").read_text()


def test_resume_refuses_another_stream(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"])
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--resume", "--method", "pt", "--no-progress"]) == 2
    assert "another stream configuration" in capsys.readouterr().err


def test_bank_cli_ls_show_predict(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"])
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    bank_dir = str(tmp_path / "run" / "bank")
    capsys.readouterr()
    assert main(["bank", "ls", bank_dir]) == 0
    listing = capsys.readouterr().out
    assert "CB" in listing and "COPA" in listing
    assert main(["bank", "show", bank_dir, "COPA"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["entry"]["task"] == "COPA" and shown["entry"]["backbone"]["width"] == 32
    out = tmp_path / "pred.jsonl"
    assert main(["bank", "predict", bank_dir, "COPA", "--input", str(superglue_dir / "COPA" / "test.jsonl"), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 500 and all(r["index"] in (0, 1) for r in rows)
    first = json.loads((superglue_dir / "COPA" / "test.jsonl").read_text().splitlines()[0])
    assert rows[0]["prediction"] == first[f"choice{rows[0]['index'] + 1}"]
    assert main(["bank", "predict", bank_dir, "RTE", "--input", str(out)]) == 2
    assert "no entry for task 'RTE'" in capsys.readouterr().err


def _other_bert(folder, tiny_bert_dir, hidden):
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    for path in tiny_bert_dir.iterdir():
        if "token" in path.name or path.name == "vocab.txt":
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("hidden, message", [(32, "other weights"), (48, "width 32")])
def test_bank_refuses_another_backbone(tmp_path, tiny_bert_dir, superglue_dir, capsys, hidden, message):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"])
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    other = _other_bert(tmp_path / "other", tiny_bert_dir, hidden)
    inp = str(superglue_dir / "CB" / "test.jsonl")
    capsys.readouterr()
    assert main(["bank", "predict", str(tmp_path / "run" / "bank"), "CB", "--input", inp, "--backbone", str(other)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"name": "x", "tasks": ["CB"], "extra": 1}, "extra: unknown key"),
        ({"name": "x", "tasks": [{"task": "CB", "train": {"epochs": "ten"}}]}, "tasks[0].train.epochs: expected int"),
        ({"name": "x", "tasks": [{"task": "CB", "train": {"epoch": 3}}]}, "tasks[0].train.epoch: unknown key"),
        ({"name": "x", "tasks": ["NoSuchTask"]}, "tasks[0].task"),
        ({"name": "x", "tasks": [{"task": "CB", "name": "../evil"}]}, "tasks[0].name"),
        ({"name": "x", "tasks": ["CB", "CB"]}, "appears twice"),
        ({"name": "x", "tasks": []}, "tasks: expected a non-empty list"),
        ({"name": "x", "prompt": {"method": "lora"}, "tasks": ["CB"]}, "prompt.method"),
        (["CB"], "must be a mapping"),
    ],
)
def test_bad_stream_files_name_the_key(tmp_path, doc, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as err:
        load_stream(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_shipped_streams_parse(shared_data, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("CRPT_DATA_DIR", raising=False)
    folder = Path(__file__).resolve().parents[1] / "streams"
    names = {p.stem for p in folder.glob("*.yaml")}
    assert {"superglue", "superglue-fewshot", "superglue-cpu", "cl-cpu"} <= names
    root = shared_data / "cl_benchmark"
    for path in folder.glob("*.yaml"):
        stream = load_stream(path, str(root))  # every CL benchmark task resolves against the layout's labels.json
        for spec in stream.tasks:
            if spec.custom is not None:
                assert spec.custom.train.startswith(str(root.resolve())), (path.name, spec.name)
        if any(spec.name == "amazon" for spec in stream.tasks):  # without a folder: the hub, which has no Amazon
            with pytest.raises(ValueError, match="amazon: has no copy on the Hugging Face hub"):
                load_stream(path)
        else:
            assert load_stream(path).tasks


def test_custom_csv_task_in_a_stream_and_predict_without_labels(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    rows = ["premise,hypothesis,verdict"]
    rte = [json.loads(line) for line in (superglue_dir / "RTE" / "train.jsonl").read_text().splitlines()[:60]]
    rows += [f'"{r["premise"].replace(chr(34), "")}","{r["hypothesis"].replace(chr(34), "")}",{r["label"]}' for r in rte]
    (tmp_path / "train.csv").write_text("\n".join(rows[:41]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join([rows[0], *rows[41:]]) + "\n")
    (tmp_path / "new.csv").write_text("premise,hypothesis\nA cat sat on the mat.,A cat sat.\nIt rained.,It was dry.\n")
    custom = {"name": "my-nli", "label_names": ["entailment", "not_entailment"], "text": "premise", "text_pair": "hypothesis",
              "label": "verdict", "train": "train.csv", "validation": "val.csv"}
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", {"custom": custom}])
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == ["CB", "my-nli"] and metrics["forgetting"] == 0.0
    out = tmp_path / "pred.jsonl"
    bank_dir = str(tmp_path / "run" / "bank")
    assert main(["bank", "predict", bank_dir, "my-nli", "--input", str(tmp_path / "new.csv"), "--output", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["uid"] for p in predictions] == ["my-nli/new/2", "my-nli/new/3"]
    assert all(p["prediction"] in ("entailment", "not_entailment") for p in predictions)
    # A finished run with a custom task resumes as a no-op (its resolved config round-trips through JSON).
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0


def test_max_eval_keeps_whole_multirc_questions(tmp_path, tiny_bert_dir, superglue_dir):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, [{"task": "MultiRC", "data": {"max_eval": 10}}])
    stream = load_stream(path)
    data = load_data(stream.tasks[0], stream.base_dir)
    for split in (data.dev, data.test):
        assert len({ex.group for ex in split}) == 10
    full = load_data(dataclasses.replace(stream.tasks[0], data=dataclasses.replace(stream.tasks[0].data, max_eval=0)), stream.base_dir)
    groups = {ex.group for ex in data.dev}
    assert [ex for ex in full.dev if ex.group in groups] == data.dev


def test_the_backbone_recipe_sits_between_the_defaults_and_the_stream(tmp_path, superglue_dir):
    from continual_rpt.learner import TrainConfig
    from continual_rpt.recipes import RECIPES

    recipe = RECIPES["embedded"]["train"]
    assert recipe and all(getattr(TrainConfig(), k) != v for k, v in recipe.items())  # it changes something
    doc = {"name": "r", "data": {"data_dir": str(superglue_dir)}, "train": {"epochs": 2},
           "tasks": ["CB", {"task": "COPA", "train": {"head_lr": 0.5}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    cb, copa = load_stream(path).tasks
    assert all(getattr(cb.train, k) == v for k, v in recipe.items()) and cb.train.epochs == 2
    assert copa.train.head_lr == 0.5 and copa.train.phi_lr == recipe["phi_lr"]  # a task's own setting wins
    other = load_stream(path, backbone="t5-small").tasks[0]  # no row: the dataclass (paper's) defaults
    assert other.train == TrainConfig(epochs=2)
    doc["backbone"] = {"backbone": "some/model"}
    path.write_text(yaml.safe_dump(doc))
    assert load_stream(path).tasks[0].train == TrainConfig(epochs=2)
    assert load_stream(path, backbone="embedded").tasks[0].train.head_lr == recipe["head_lr"]  # crpt run --backbone


def test_crpt_train_applies_the_recipe_under_given_options(tiny_bert_dir, superglue_dir, tmp_path):
    from continual_rpt.bank import Entry
    from continual_rpt.cli import main
    from continual_rpt.recipes import RECIPES

    RECIPES[str(tiny_bert_dir)] = {"train": {"head_lr": 0.02, "phi_lr": 0.004}}
    try:
        assert main(["train", "--task", "CB", "--out", str(tmp_path / "e"), "--backbone", str(tiny_bert_dir), "--data-dir",
                     str(superglue_dir), "--max-train", "8", "--epochs", "1", "--phi-lr", "0.003", "--n-tokens", "2",
                     "--bottleneck", "4", "--max-length", "64", "--no-progress"]) == 0
    finally:
        del RECIPES[str(tiny_bert_dir)]
    train = Entry.from_pretrained(tmp_path / "e").config["train"]
    assert (train["head_lr"], train["phi_lr"], train["epochs"]) == (0.02, 0.003, 1)
