"""The controls a method is read against: the best constant answer and the linear probe, and what the prompt adds."""

import pytest
import yaml
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.controls import C_GRID, best_constant, constant_answers, fit_linear_probe, pooled_features, reference_scores
from continual_rpt.evaluation import predict_features
from continual_rpt.run import run_stream, summary_table
from continual_rpt.strategies import with_method
from continual_rpt.streams import load_data, load_stream
from continual_rpt.tasks import CustomTaskConfig, get_task, load_custom_data, load_task_data


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_backbone(str(tiny_bert_dir))


def test_best_constant_by_hand(superglue_dir):
    data = load_task_data("CB", superglue_dir)
    shares = [sum(ex.label == c for ex in data.test) / len(data.test) for c in range(3)]
    best = max(range(3), key=lambda c: shares[c])
    # CB's score is the mean of accuracy and macro-F1; always one class gives F1 2p/(1+p) on it, 0 on the others.
    score, answer = best_constant(data.task, data.test)
    assert score == pytest.approx(100 * (shares[best] + 2 * shares[best] / (1 + shares[best]) / 3) / 2)
    assert answer == data.task.label_names[best]
    copa = load_task_data("COPA", superglue_dir).test  # a choice task: each choice position is one constant answer
    assert sorted(constant_answers(get_task("COPA"), copa)) == ["choice 1", "choice 2"]
    firsts = sum(ex.label == 0 for ex in copa) / len(copa)
    assert best_constant(get_task("COPA"), copa)[0] == pytest.approx(100 * max(firsts, 1 - firsts))


# (train label, test labels) of a balanced few-shot task: the first training row says "joy", the test half is mostly "anger".
_EMOTION_TRAIN = ["joy", "anger", "fear", "joy", "anger", "fear"]
_EMOTION_TEST = ["joy", "anger", "anger", "anger", "fear", "fear"]


def _emotion(folder, metric):
    for split, labels in (("train", _EMOTION_TRAIN), ("dev", _EMOTION_TEST), ("test", _EMOTION_TEST)):
        rows = [f"row {i} of {split},{label}" for i, label in enumerate(labels)]
        (folder / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = CustomTaskConfig(name="emotion", label_names=("joy", "anger", "fear"), text="text", metric=metric,
                           train="train.csv", dev="dev.csv", test="test.csv")
    return load_custom_data(cfg, folder, k_per_class=2, seed=0)


@pytest.mark.parametrize("metric, expected", [("accuracy", 50.0), ("macro_f1", 100 * (6 / 9) / 3)])
def test_best_constant_on_balanced_few_shot_data_is_not_the_first_training_row(tmp_path, tiny, metric, expected):
    """Every class has 2 training rows, so a majority is a tie; the control must be the best answer on the metric.

    Fails on main: the run's control there is `majority` = the first training row's "joy" (16.7 accuracy,
    9.5 macro-F1), and no best constant answer is scored (KeyError 'best_constant_score')."""
    data = _emotion(tmp_path, metric)
    assert data.train[0].label == 0  # "joy" leads the training file: what the old majority tie-break answered
    every = {name: data.task.score(data.test, [label] * len(data.test))["score"] for label, name in enumerate(data.task.label_names)}
    assert every["anger"] == pytest.approx(expected) and max(every.values()) == every["anger"]
    scores = reference_scores(tiny, data, 32, seed=0, bf16=False)
    assert scores["best_constant_score"] == pytest.approx(expected) and scores["best_constant_answer"] == "anger"


@pytest.mark.parametrize("task", ["CB", "COPA"])  # a classification head, and a one-logit choice head
def test_linear_probe_head_answers_in_the_bank_path_as_it_was_scored(tiny, superglue_dir, task):
    data = load_task_data(task, superglue_dir, k_per_class=16)
    weights, metrics = fit_linear_probe(tiny, data, 96, seed=0, bf16=False)
    head = tiny.new_head(data.task)
    head.load_state_dict(weights)  # the probe is an ordinary head: it stores and loads like any entry's
    predictions = predict_features(tiny, None, head, tiny.featurize(data.test, 96), bf16=False)
    assert data.task.score(data.test, predictions)["score"] == pytest.approx(metrics["test_score"])
    assert metrics["test_predictions"] == predictions
    assert metrics["C"] in C_GRID and metrics["C_grid"] == list(C_GRID)
    pooled = pooled_features(tiny, tiny.featurize(data.train[:3], 96), 64, False)
    pairs = 1 if task == "CB" else 2
    assert [tuple(p.shape) for p in pooled] == [(pairs, tiny.width)] * 3


def test_linear_probe_on_the_embedded_backbone_learns_sst2(shared_data, tmp_path):
    """Quality: mean-pooled MiniLM features separate SST-2 sentiment far beyond the majority class."""
    stream = load_stream(_sst2(shared_data, tmp_path))
    data = load_data(stream.tasks[0], stream.base_dir)
    backbone = load_backbone("embedded")
    assert backbone.pooling == "mean"  # pooling: auto reads the checkpoint's sentence-transformers config
    _, metrics = fit_linear_probe(backbone, data, 128, seed=0)
    assert metrics["test_score"] > best_constant(data.task, data.test)[0] + 15, metrics


def _sst2(shared_data, folder):
    doc = {"name": "sst2", "data": {"data_dir": str(shared_data / "cl_benchmark"), "k_per_class": 32, "max_eval": 200},
           "tasks": ["sst2"]}
    (folder / "s.yaml").write_text(yaml.safe_dump(doc))
    return folder / "s.yaml"


def test_runs_report_controls_and_what_the_prompt_adds(tmp_path, tiny_bert_dir, superglue_dir):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"])
    rpt = run_stream(load_stream(path), tmp_path / "rpt", progress=False)
    probe = run_stream(with_method(load_stream(path), "linear-probe"), tmp_path / "probe", progress=False)
    pt = run_stream(with_method(load_stream(path), "pt"), tmp_path / "pt", progress=False)
    for name in ("CB", "COPA"):
        t = rpt["per_task"][name]
        data = load_data(load_stream(path).tasks[0 if name == "CB" else 1], path.parent)
        assert (t["best_constant_score"], t["best_constant_answer"]) == best_constant(data.task, data.test)
        # The same probe twice: as the run's control column, and as the linear-probe method's bank entry.
        assert t["linear_probe_score"] == pytest.approx(probe["final_scores"][name])
        assert {"test_without_prompt", "test_without_phi"} <= set(t)  # rpt: the head alone, and P without Φ
        assert "test_without_phi" not in pt["per_task"][name] and "test_without_prompt" in pt["per_task"][name]
        assert not {"test_without_prompt", "test_without_phi"} & set(probe["per_task"][name])
    assert probe["method"] == "linear-probe"
    entry = PromptBank.open(tmp_path / "probe" / "bank").get("CB")
    assert entry.prompt is None and entry.meta["method"] == "linear-probe" and entry.metrics["C"] in C_GRID
    assert entry.meta["backbone"]["pooling"] == "cls"  # the tiny model has no sentence-transformers config
    table = summary_table(rpt).splitlines()
    assert table[0].split()[:4] == ["task", "constant", "probe", "score"]
    cb = table[1].split()
    assert cb[:3] == ["CB", f"{rpt['per_task']['CB']['best_constant_score']:.1f}", f"{rpt['per_task']['CB']['linear_probe_score']:.1f}"]


def test_controls_false_skips_them(tmp_path, tiny_bert_dir, superglue_dir):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], controls=False)
    metrics = run_stream(load_stream(path), tmp_path / "run", progress=False)
    assert not {"best_constant_score", "best_constant_answer", "linear_probe_score"} & set(metrics["per_task"]["CB"])
    assert summary_table(metrics).splitlines()[1].split()[1:3] == ["—", "—"]
