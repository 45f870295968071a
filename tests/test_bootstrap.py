"""Bootstrap confidence intervals: a hand-computed case, grouped units, runs' bootstrap.json and the paired report."""

import json

import pytest
from test_report import write_run
from test_stream import write_stream

from continual_rpt.intervals import Interval, interval, resampled_scores
from continual_rpt.report import compare
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import Example, get_task

RTE = get_task("RTE")


def examples(labels, group=""):
    return [Example(f"e{i}", (("p", "h"),), "s", ("entailment", "not_entailment"), label, group=group and f"{group}{i // 2}")
            for i, label in enumerate(labels)]


def test_interval_of_three_right_out_of_four_by_hand():
    # Accuracy k/4 with k ~ Binomial(4, 0.75) under resampling: P(k = 0) = 0.0039 and P(k <= 1) = 0.0508, so the
    # 2.5th percentile is k = 1 (25 %); P(k = 4) = 0.316 > 0.025, so the 97.5th is 100 %.
    scores = resampled_scores(RTE, examples([0, 0, 0, 0]), [0, 0, 0, 1], resamples=20000)
    assert set(scores) <= {0.0, 25.0, 50.0, 75.0, 100.0}
    assert scores.count(0.0) / len(scores) == pytest.approx(0.25 ** 4, abs=0.002)
    assert interval(75.0, scores) == Interval(75.0, 25.0, 100.0)


def test_groups_are_resampled_whole_and_every_run_sees_the_same_draws():
    grouped = examples([0] * 6, group="q")  # three units of two examples each
    scores = resampled_scores(RTE, grouped, [0, 1, 0, 1, 0, 1], resamples=500)
    assert set(scores) == {50.0}  # every unit holds one right and one wrong answer
    # Two runs right on complementary halves: on every shared draw each picked example is right in exactly one
    # of them, so their scores sum to 100 resample by resample; another seed draws other examples. Checked to
    # fail with resampled_scores drawing from the global `random` instead of its seeded generator.
    ex = examples([0] * 10)
    first, second = (resampled_scores(RTE, ex, p, 200, seed=3) for p in ([0] * 5 + [1] * 5, [1] * 5 + [0] * 5))
    assert [a + b for a, b in zip(first, second)] == pytest.approx([100.0] * 200)
    assert len(set(first)) > 3 and first != resampled_scores(RTE, ex, [0] * 5 + [1] * 5, 200, seed=4)
    assert not Interval(1.0, -0.5, 2.0).excludes_zero and Interval(1.0, 0.5, 2.0).excludes_zero


def test_a_run_keeps_its_final_resamples_and_intervals(tmp_path, tiny_bert_dir, superglue_dir):
    metrics = run_stream(load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"])), tmp_path / "run", progress=False)
    boot = json.loads((tmp_path / "run" / "bootstrap.json").read_text())
    assert boot["resamples"] == 1000 and set(boot["scores"]) == {"CB", "COPA"} and len(boot["scores"]["COPA"]) == 1000
    for name, task in metrics["per_task"].items():
        low, high = task["final_test_ci"]
        assert low <= task["final_score"] <= high and high - low > 0


def test_report_pairs_methods_by_seed_and_resample(tmp_path):
    tasks = ["CB", "COPA", "RTE"]
    runs = [write_run(tmp_path / f"{m}-{s}", m, s, [[v, None, None], [v, v, None], [v, v, v]]) for m, v in (("rpt", 60), ("pt", 50)) for s in (0, 1)]
    for folder, shift in zip(runs, (0.0, 2.0, -10.0, -8.0)):  # rpt's resamples sit 10 above pt's, seed by seed
        scores = {t: [55.0 + shift + r for r in range(100)] for t in tasks}
        (folder / "bootstrap.json").write_text(json.dumps({"resamples": 100, "seed": 0, "test_sets": {t: "x" for t in tasks}, "scores": scores}))
    compare(runs, tmp_path / "report")
    table = (tmp_path / "report" / "differences.csv").read_text()
    md = (tmp_path / "report" / "differences.md").read_text()
    assert "| pt | 2 | 50.0 [" in md and "-10.0 [-10.0, -10.0] vs rpt (2) | [-10.0, -10.0] | yes |" in md
    assert "difference_low" in table.splitlines()[0]
    (runs[0] / "bootstrap.json").write_text(json.dumps({"resamples": 100, "seed": 0, "test_sets": {t: "y" for t in tasks}, "scores": {}}))
    with pytest.raises(ValueError, match="different test examples"):
        compare(runs, tmp_path / "report2")
