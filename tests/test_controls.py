"""The controls a method is read against: majority class and linear probe, and what the prompt adds."""

from collections import Counter

import pytest
import yaml
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.controls import C_GRID, fit_linear_probe, majority_score, pooled_features
from continual_rpt.evaluation import predict_features
from continual_rpt.run import run_stream, summary_table
from continual_rpt.strategies import with_method
from continual_rpt.streams import load_data, load_stream
from continual_rpt.tasks import load_task_data


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_backbone(str(tiny_bert_dir))


def test_majority_score_by_hand(superglue_dir):
    data = load_task_data("CB", superglue_dir)
    answer = Counter(ex.label for ex in data.train).most_common(1)[0][0]
    share = sum(ex.label == answer for ex in data.test) / len(data.test)
    # CB's score is the mean of accuracy and macro-F1; always one class gives F1 2p/(1+p) on it, 0 on the others.
    assert majority_score(data) == pytest.approx(100 * (share + 2 * share / (1 + share) / 3) / 2)


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
    assert metrics["test_score"] > majority_score(data) + 15, metrics


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
        assert t["majority_score"] == pytest.approx(majority_score(data))
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
    assert table[0].split()[:4] == ["task", "majority", "probe", "score"]
    cb = table[1].split()
    assert cb[:3] == ["CB", f"{rpt['per_task']['CB']['majority_score']:.1f}", f"{rpt['per_task']['CB']['linear_probe_score']:.1f}"]


def test_controls_false_skips_them(tmp_path, tiny_bert_dir, superglue_dir):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], controls=False)
    metrics = run_stream(load_stream(path), tmp_path / "run", progress=False)
    assert not {"majority_score", "linear_probe_score"} & set(metrics["per_task"]["CB"])
    assert summary_table(metrics).splitlines()[1].split()[1:3] == ["—", "—"]
