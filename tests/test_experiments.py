"""The experiment runner (experiments/grid.py) and the claims report (experiments/claims.py)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import claims  # noqa: E402
import grid  # noqa: E402


def record(task, method, variant, seed, test, dev=50.0, history=None):
    """A run record with the fields the claims report reads."""
    return {"task": task, "method": method, "variant": variant, "seed": seed, "test_score": test, "dev_score": dev,
            "majority_test_score": 30.0, "best_step": 10, "history": history or [{"step": 10, "dev_score": dev}]}


def test_paired_difference_pairs_seeds_and_averages_tasks_first():
    runs = [record("CB", "rpt", "", 0, 60), record("COPA", "rpt", "", 0, 70),
            record("CB", "rpt", "", 1, 50), record("COPA", "rpt", "", 1, 50),
            record("CB", "pt", "", 0, 50), record("COPA", "pt", "", 0, 60),
            record("CB", "pt", "", 1, 60), record("COPA", "pt", "", 1, 40),
            record("CB", "pt", "", 2, 99)]  # seed 2 has no COPA and no rpt partner: left out
    tasks = ["CB", "COPA"]
    assert claims.per_seed_average(claims.select(runs, "pt"), tasks) == {0: 55.0, 1: 50.0}
    mean, std, pairs = claims.paired_difference(runs, ("rpt", ""), ("pt", ""), tasks)
    # seed 0: 65 - 55 = 10; seed 1: 50 - 50 = 0
    assert (mean, pairs) == (5.0, 2)
    assert std == pytest.approx(7.0710678)


def test_learning_rate_section_reports_spread_over_the_papers_range(tmp_path):
    runs = [record("CB", "head", "", 0, 55)]
    for lr, score in {"lr0.001": 20, "lr0.01": 50, "lr0.3": 53, "lr10": 51}.items():
        runs.append(record("CB", "rpt", lr, 0, score))
        runs.append(record("CB", "pt", lr, 0, score - 10 if lr == "lr10" else score))
    text = "\n".join(claims.learning_rate(tmp_path, runs))
    assert "- rpt: 3.0 points over lr 0.01–10" in text and "33.0 over all 4; best lr 0.3" in text
    assert "- pt: 12.0 points over lr 0.01–10" in text
    assert "lr ∈ {0.001, 0.01, 0.3, 10}" in text and "- pt: lr 0.3 − lr 10: +12.0 ± 0.0 points (1 paired seeds)" in text
    assert "| head-only control | 55.0 ± 0.0 |" in text
    assert (tmp_path / "learning_rate.png").stat().st_size > 0
    rows = (tmp_path / "learning_rate.csv").read_text().splitlines()
    assert rows[0].startswith("row,method,variant,seeds,diverged_runs,CB_mean,CB_std")
    assert '"rpt, lr 0.001",rpt,lr0.001,1,0,20.00,0.00,20.00,0.00' in rows


@pytest.mark.slow
def test_grid_runs_resumes_and_feeds_the_claims_report(tmp_path, tiny_bert_dir, superglue_dir):
    spec = {"name": "claims_methods", "backbone": str(tiny_bert_dir), "data_dir": str(superglue_dir),
            "seeds": [0, 1], "methods": ["rpt", "pt"], "controls": ["head", "linear-probe"],
            "variants": {"n2": {"prompt": {"n_tokens": 2}}, "n10": {"prompt": {"n_tokens": 10}}},
            "train": {"epochs": 2, "batch_size": 8, "max_length": 64, "patience": 0, "eval_every": 2},
            "tasks": {"CB": {"max_train": 16}}}
    out = grid.run_grid(spec, tmp_path / "grid.yaml", tmp_path)
    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert files == ["CB-head-0.json", "CB-head-1.json", "CB-linear-probe-0.json", "CB-linear-probe-1.json", "CB-n10-pt-0.json", "CB-n10-pt-1.json", "CB-n10-rpt-0.json",
                     "CB-n10-rpt-1.json", "CB-n2-pt-0.json", "CB-n2-pt-1.json", "CB-n2-rpt-0.json", "CB-n2-rpt-1.json"]
    first = json.loads((out / "runs" / "CB-n2-rpt-0.json").read_text())
    assert first["prompt_config"]["n_tokens"] == 2 and first["train_examples"] == 16
    probe = json.loads((out / "runs" / "CB-linear-probe-0.json").read_text())
    assert probe["train_examples"] == 16  # what lets the lr and design grids borrow it
    assert [h["step"] for h in first["history"]] == [2, 2 * 2]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    grid.run_grid(spec, tmp_path / "grid.yaml", tmp_path)  # a finished grid trains nothing again
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    summary = (out / "summary.md").read_text()
    assert "| rpt (n2) |" in summary and "| rpt (n2) | 2 |" in summary  # with its 95% intervals over both seeds

    runs = claims.load_grid(tmp_path, "methods")
    text = "\n".join(claims.methods_and_length(tmp_path, runs) + claims.convergence(tmp_path, runs))
    rpt = [r["test_score"] for r in runs if r["method"] == "rpt" and r["variant"] == "n2"]
    pt = [r["test_score"] for r in runs if r["method"] == "pt" and r["variant"] == "n2"]
    mean, std = claims.mean_std([a - b for a, b in zip(rpt, pt)])
    assert f"- rpt − pt at n=2: {claims.show(mean, std, signed=True)} points (2 paired seeds)" in text
    assert "| CB | 2 | rpt |" in text and "| CB | — | head |" in text
    for name in ("prompt_length.png", "convergence.png", "convergence_loss.png", "methods_length.csv", "convergence.csv"):
        assert (tmp_path / name).stat().st_size > 0

    # A run that diverged is a result: counted next to the scores, never averaged in.
    diverged = {**first, "seed": 2, "diverged": "CB: no dev evaluation produced a finite prompt", "test_score": None,
                "dev_score": None, "history": []}
    (out / "runs" / "CB-n2-rpt-2.json").write_text(json.dumps(diverged))
    env = (out / "environment.json").stat().st_mtime_ns
    grid.resummarize(spec, tmp_path)  # --summarize: rewrites the summary, keeps the training machine's environment.json
    assert (out / "environment.json").stat().st_mtime_ns == env
    assert f"| rpt (n2) | {grid.mean_std(rpt)} (1 diverged) |" in (out / "summary.md").read_text()
    text = "\n".join(claims.methods_and_length(tmp_path, claims.load_grid(tmp_path, "methods")))
    assert "| 2 (1 diverged) |" in text
    assert f"- rpt − pt at n=2: {claims.show(mean, std, signed=True)} points (2 paired seeds)" in text


def test_a_broken_run_record_is_named(tmp_path):
    folder = tmp_path / "claims_lr" / "runs"
    folder.mkdir(parents=True)
    (folder / "CB-lr10-rpt-0.json").write_text('{"task": "CB", ')  # a writer killed mid-file
    with pytest.raises(SystemExit, match=r"CB-lr10-rpt-0\.json: not a run record"):
        claims.load_grid(tmp_path, "lr")


def resampled_record(task, method, variant, seed, test, resamples, test_set="t"):
    """A finished run record that carries its score on each bootstrap resample."""
    return {**record(task, method, variant, seed, test), "test_resampled": resamples, "test_set": test_set}


def test_grid_pairs_are_paired_by_seed_and_resample():
    spec = {"seeds": [0, 1], "methods": ["rpt"], "controls": ["linear-probe"], "tasks": {"CB": {}},
            "variants": {"n5": {}, "deep5": {"methods": ["deep-rpt"]}}, "pairs": [["deep-rpt (deep5)", "linear-probe"]]}
    assert [(v, m) for _, v, m, s in grid.grid_runs(spec) if s == 0] == [("", "linear-probe"), ("n5", "rpt"), ("deep5", "deep-rpt")]
    runs = [resampled_record("CB", "deep-rpt", "deep5", 0, 70, [50, 60, 70, 80, 90]),
            resampled_record("CB", "deep-rpt", "deep5", 1, 60, [40, 50, 60, 70, 80]),
            resampled_record("CB", "linear-probe", "", 0, 50, [50] * 5),
            resampled_record("CB", "linear-probe", "", 1, 50, [50] * 5)]
    text = "\n".join(grid.interval_lines(runs, spec, ["CB"]))
    # Test-sample interval: per resample, seeds averaged, [45, 55, 65, 75, 85] − 50; numpy's 2.5 % and 97.5 %
    # quantiles of five values lie 0.1 of a step inside the extremes. (Seeds drawn too: tests/test_intervals.py.)
    assert "| deep-rpt (deep5) | 2 |" in text and text.count("| 65.0 [46.0, 84.0] |") == 1
    assert "- deep-rpt (deep5) − linear-probe: average +15.0 [" in text
    assert "test-sample 95% interval [-4.0, +34.0] (2 paired seeds); CB +15.0 [" in text
    lines = claims.difference_lines(runs, [("deep − probe", ("deep-rpt", "deep5"), ("linear-probe", ""))], ["CB"])
    assert lines[0].startswith("- deep − probe: +15.0 ± 7.1 points (2 paired seeds); 95% interval over seeds and test examples +15.0 [")
    assert lines[0].endswith(", test-sample 95% interval [-4.0, +34.0]")
    runs[3]["test_set"] = "other"
    with pytest.raises(SystemExit, match="CB, seed 1: deep-rpt \\(deep5\\) − linear-probe were scored on different test examples"):
        grid.interval_lines(runs, spec, ["CB"])
    with pytest.raises(SystemExit, match=r"pairs\[0\]: 'rpt \(deep5\)' is not a row of this grid"):
        grid.check_pairs({**spec, "pairs": [["rpt (deep5)", "linear-probe"]]})


def configured(method, variant, seed, test, lr=0.3, bottleneck=400, epochs=8, init="vocab"):
    """A run record with the configs and data ids that decide whether it can stand in for another grid's run."""
    return {**record("ag", method, variant, seed, test), "train_examples": 256, "test_set": "t",
            "prompt_config": {"method": method, "n_tokens": 10, "bottleneck": bottleneck, "init": init},
            "train_config": {"lr": lr, "epochs": epochs, "seed": seed}}


def test_lr_init_and_design_grids_borrow_the_methods_grids_reference_runs_only_when_they_match(tmp_path):
    methods = [configured("rpt", "n10", 0, 80), configured("pt", "n10", 0, 78), configured("rpt", "n2", 0, 79),
               configured("head", "", 0, 70), configured("linear-probe", "", 0, 71)]
    lr = [configured("rpt", "lr0.03", 0, 75, lr=0.03), configured("pt", "lr0.03", 0, 74, lr=0.03)]
    got = {(r["method"], r["variant"]): r["test_score"] for r in claims.with_references("lr", lr, methods)}
    assert got == {("rpt", "lr0.03"): 75, ("pt", "lr0.03"): 74, ("rpt", "lr0.3"): 80, ("pt", "lr0.3"): 78,
                   ("head", ""): 70, ("linear-probe", ""): 71}
    text = "\n".join(claims.learning_rate(tmp_path, claims.with_references("lr", lr, methods)))
    assert "- rpt: lr 0.03 − lr 0.3: -5.0 ± 0.0 points (1 paired seeds)" in text

    design = [configured("rpt", "m50", 0, 77, bottleneck=50)]
    got = {(r["method"], r["variant"]) for r in claims.with_references("design", design, methods)}
    assert got == {("rpt", "m50"), ("rpt", "m400"), ("head", ""), ("linear-probe", "")}  # pt is not in the design grid

    own = lr + [configured("rpt", "lr0.3", 0, 66)]  # a grid that ran its reference itself keeps its own run
    assert [r["test_score"] for r in claims.with_references("lr", own, methods) if r["variant"] == "lr0.3" and r["method"] == "rpt"] == [66]
    assert claims.with_references("fewshot", lr, methods) == lr  # other grids borrow nothing

    init = [configured("rpt", "uniform", 0, 76, init="uniform"), configured("pt", "uniform", 0, 72, init="uniform")]
    borrowed = claims.with_references("init", init, methods)
    assert {(r["method"], r["variant"]): r["test_score"] for r in borrowed} == {
        ("rpt", "uniform"): 76, ("pt", "uniform"): 72, ("rpt", "vocab"): 80, ("pt", "vocab"): 78, ("head", ""): 70, ("linear-probe", ""): 71}
    text = "\n".join(claims.initialisation(tmp_path, borrowed))
    assert "| linear probe control |" in text and "- rpt: uniform − vocab: -4.0 ± 0.0 points (1 paired seeds)" in text

    other_budget = [configured("rpt", "lr0.03", 0, 75, lr=0.03, epochs=6)]
    with pytest.raises(SystemExit, match=r"differs from ag rpt lr0.03 seed 0 in train_config.epochs"):
        claims.with_references("lr", other_budget, methods)
