"""Intervals that count the seeds: the two-level bootstrap (seeds, then test examples) of intervals.py, and the
report, grid summaries and claims lines that use it. Each "fails on main" note was checked by running the test on
the commit before this change (there every interval averaged the seeds inside each test resample)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_report import write_run

from continual_rpt.intervals import RESAMPLES, by_seed, interval, intervals, seed_and_test_resamples
from continual_rpt.report import compare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import claims  # noqa: E402
import grid  # noqa: E402


def flat(value, jitter=0.0):
    """One seed's scores on RESAMPLES test resamples: `value`, plus a repeating jitter of 0, jitter, 2·jitter."""
    return [value + jitter * (r % 3) for r in range(RESAMPLES)]


def test_percentiles_are_numpys_quantiles():
    # Linear interpolation over 0..999: the 2.5 % point is 0.025·999 = 24.975, the 97.5 % point 974.025.
    # Fails on main: it took order statistics 25 and 975.
    ci = interval(1.0, list(range(1000)))
    assert (ci.low, ci.high) == pytest.approx((24.975, 974.025))


def test_seeds_far_apart_widen_the_interval_that_the_test_sample_alone_keeps_tight():
    per_seed = np.array([flat(50, 1), flat(70, 1), flat(90, 1)])
    both, test_only = intervals(70.0, per_seed)
    # Every seed once per resample: 70 + jitter, within [70, 72]. Drawing seeds: all three draws fall on seed 50
    # (or on seed 90) with probability 1/27 each (3.7 % > 2.5 %), so the bounds reach the extreme seeds.
    assert 70 <= test_only.low <= test_only.high <= 72
    assert 50 <= both.low <= 52 and 90 <= both.high <= 92
    # Seeds are drawn with replacement: with two seeds, a quarter of the draws take seed 0 twice.
    two = seed_and_test_resamples(np.array([flat(60), flat(70)]))
    assert set(two) == {60.0, 65.0, 70.0} and np.mean(two == 60.0) == pytest.approx(0.25, abs=0.05)


def test_with_one_seed_both_intervals_are_the_test_sample_one():
    both, test_only = intervals(55.0, np.array([list(np.linspace(40, 70, RESAMPLES))]))
    assert both == test_only and (both.low, both.high) == pytest.approx((40 + 0.025 * 30, 70 - 0.025 * 30))


def test_a_paired_difference_draws_the_same_seeds_and_resamples_for_both_sides():
    # The seeds differ by 60 points, but at every seed and resample the first method is exactly 10 above: paired,
    # the difference is 10 in every draw; drawn apart, it would span the seeds.
    first, second = np.array([flat(30, 2), flat(90, 2)]), np.array([flat(20, 2), flat(80, 2)])
    both, test_only = intervals(10.0, first - second)
    assert (both.low, both.high, test_only.low, test_only.high) == (10.0, 10.0, 10.0, 10.0)
    assert np.allclose(seed_and_test_resamples(first) - seed_and_test_resamples(second), seed_and_test_resamples(first - second))


def test_a_task_average_is_taken_per_seed_and_resample():
    runs = [{"A": [10.0, 20.0], "B": [30.0, 40.0]}, {"A": [20.0, 20.0], "B": [50.0, 60.0]}]
    assert by_seed(runs, ["A", "B"]).tolist() == [[20.0, 30.0], [35.0, 40.0]]


def resampled_record(task, method, variant, seed, test, resamples):
    """A finished grid run record that carries its score on each bootstrap resample."""
    return {"task": task, "method": method, "variant": variant, "seed": seed, "test_score": test, "dev_score": 50.0,
            "majority_test_score": 30.0, "best_step": 10, "history": [], "test_resampled": resamples, "test_set": "t"}


def test_grid_pairs_and_claims_lines_are_not_resolved_when_the_seeds_disagree():
    spec = {"seeds": [0, 1], "methods": ["rpt"], "controls": ["linear-probe"], "tasks": {"CB": {}},
            "pairs": [["rpt", "linear-probe"]]}
    # Seed 0: rpt 30 above the probe, seed 1: 10 below, each the same on every test resample. The test-sample
    # interval is +10 exactly (it excludes 0); drawing the seeds spans [−10, +30].
    runs = [resampled_record("CB", "rpt", "", 0, 80, flat(80)), resampled_record("CB", "rpt", "", 1, 40, flat(40)),
            resampled_record("CB", "linear-probe", "", 0, 50, flat(50)), resampled_record("CB", "linear-probe", "", 1, 50, flat(50))]
    text = "\n".join(grid.interval_lines(runs, spec, ["CB"]))
    # Fails on main: "average +10.0 [+10.0, +10.0] resolved".
    assert ("- rpt − linear-probe: average +10.0 [-10.0, +30.0], test-sample 95% interval [+10.0, +10.0] "
            "(2 paired seeds); CB +10.0 [-10.0, +30.0]") in text
    assert "| rpt | 2 | 60.0 [40.0, 80.0] | 60.0 [40.0, 80.0] | 60.0 [60.0, 60.0] |" in text
    lines = claims.difference_lines(runs, [("rpt − probe", ("rpt", ""), ("linear-probe", ""))], ["CB"])
    assert lines == ["- rpt − probe: +10.0 ± 28.3 points (2 paired seeds); 95% interval over seeds and test examples "
                     "+10.0 [-10.0, +30.0], test-sample 95% interval [+10.0, +10.0]"]


def test_compare_draws_the_seeds(tmp_path):
    tasks = ["CB", "COPA", "RTE"]
    values = {("rpt", 0): 80.0, ("rpt", 1): 40.0, ("pt", 0): 50.0, ("pt", 1): 50.0}
    runs = []
    for (method, seed), v in values.items():
        folder = write_run(tmp_path / f"{method}-{seed}", method, seed, [[v, None, None], [v, v, None], [v, v, v]])
        scores = {t: flat(v) for t in tasks}
        (folder / "bootstrap.json").write_text(json.dumps({"resamples": RESAMPLES, "seed": 0, "test_sets": {t: "x" for t in tasks},
                                                           "scores": scores}))
        runs.append(folder)
    compare(runs, tmp_path / "report")
    md = (tmp_path / "report" / "differences.md").read_text()
    # Fails on main: "-10.0 [-10.0, -10.0] vs rpt (2) | yes |" (the seeds averaged inside each resample).
    assert "| -10.0 [-30.0, 10.0] vs rpt (2) | [-10.0, -10.0] | no |" in md
    assert "| pt | 2 | 50.0 [50.0, 50.0] | [50.0, 50.0] |" in md
    assert "| rpt | 2 | 60.0 [40.0, 80.0] | [60.0, 60.0] |" in md
    assert "one seed" in md
