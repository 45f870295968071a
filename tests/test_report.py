"""crpt compare: the table (mean ± std over seeds), its CSV and Markdown, the plots, and refused inputs."""

import math

import pandas as pd
import pytest
import torch
from PIL import Image

from continual_rpt.bank import Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.report import ReportError, compare
from continual_rpt.run import summarize, write_results
from continual_rpt.streams import parse_stream

TASKS = ["CB", "COPA", "RTE"]


def write_run(folder, method, seed, R, tokens=(10, 10, 10), wall=100.0, tasks=TASKS, stream="tiny", controls=None):
    """A finished run folder written as `crpt run` writes it: `summarize()` and `write_results()` of a real stream,
    a bank whose entries hold what a trained task records, and a run state whose accuracy matrix is R.

    `controls`: {task: {"majority": score, "linear_probe": score}}, the run state's control scores.
    Checked: with summarize's forgetting computed as backward_transfer(R), or its per-task keys renamed, the table tests fail.
    """
    folder.mkdir(parents=True)
    doc = {"name": stream, "backbone": {"backbone": "embedded"}, "prompt": {"method": method}, "train": {"seed": seed},
           "tasks": list(tasks)}
    spec = parse_stream(doc, str(folder / "stream.yaml"), folder)
    bank = PromptBank.open(folder / "bank", create=True)
    for i, name in enumerate(tasks):
        metrics = {"dev_score": 50.0, "prompt_tokens": tokens[i], "prompt_tokens_in_context": tokens[i], "trainable_parameters": 1000,
                   "stored_parameters": 100, "wall_seconds": wall / len(tasks) / 2, "train_examples_per_second": 10.0}
        bank.add(name, Entry(torch.zeros(tokens[i], 4), None, {"task": name}, {}, metrics))
    state = {"rows": [{name: {"score": R[i][j]} for j, name in enumerate(tasks) if R[i][j] is not None} for i in range(len(tasks))],
             "seconds": {name: wall / len(tasks) for name in tasks}, "controls": controls or {}}
    write_results(folder, state, summarize(spec, bank, state))
    return folder


@pytest.fixture()
def runs(tmp_path):
    """rpt and pt, seeds 0 and 1, on three tasks; pt's prompts grow 10, 20, 30 tokens."""
    return [
        write_run(tmp_path / "rpt-0", "rpt", 0, [[70, None, None], [70, 60, None], [70, 60, 17]], wall=100),
        write_run(tmp_path / "pt-0", "pt", 0, [[60, None, None], [50, 55, None], [40, 50, 30]], tokens=(10, 20, 30), wall=50),
        write_run(tmp_path / "rpt-1", "rpt", 1, [[72, None, None], [72, 62, None], [72, 62, 19]], wall=110),
        write_run(tmp_path / "pt-1", "pt", 1, [[64, None, None], [54, 57, None], [44, 52, 36]], tokens=(10, 20, 30), wall=50),
    ]


def test_table_means_stds_and_seed_counts(runs, tmp_path):
    table = compare(runs, tmp_path / "report").set_index("method")
    assert list(table.index) == ["rpt", "pt"]  # the order the runs were given
    assert list(table["seeds"]) == [2, 2]
    rpt, pt = table.loc["rpt"], table.loc["pt"]
    # rpt: average (70+60+17)/3 = 49 and (72+62+19)/3 = 51 -> mean 50, sample std sqrt(2)
    assert rpt["average_score_mean"] == pytest.approx(50.0)
    assert rpt["average_score_std"] == pytest.approx(math.sqrt(2))
    assert rpt["final_CB_mean"] == pytest.approx(71.0) and rpt["final_RTE_mean"] == pytest.approx(18.0)
    assert rpt["forgetting_mean"] == 0 and rpt["forgetting_std"] == 0
    # pt: forgetting ((60-40) + (55-50))/2 = 12.5 in both seeds; backward transfer -12.5; average 40 and 44
    assert pt["forgetting_mean"] == pytest.approx(12.5) and pt["forgetting_std"] == pytest.approx(0)
    assert pt["backward_transfer_mean"] == pytest.approx(-12.5)
    assert pt["average_score_mean"] == pytest.approx(42.0) and pt["average_score_std"] == pytest.approx(math.sqrt(8))
    assert "forward_transfer_mean" not in table.columns
    # costs: tokens in context the max over tasks, parameters summed over tasks, wall time per run
    assert rpt["prompt_tokens_in_context_mean"] == 10 and pt["prompt_tokens_in_context_mean"] == 30
    assert rpt["trainable_parameters_mean"] == 3000 and rpt["stored_parameters_mean"] == 300
    assert rpt["wall_seconds_mean"] == pytest.approx(105.0) and rpt["wall_seconds_std"] == pytest.approx(math.sqrt(50))


def test_csv_and_markdown_content(runs, tmp_path):
    out = tmp_path / "report"
    compare(runs, out)
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv["method"]) == ["rpt", "pt"]
    assert {"seeds", "average_score_mean", "average_score_std", "final_COPA_mean", "final_COPA_std",
            "prompt_tokens_in_context_mean", "trainable_parameters_mean", "stored_parameters_mean", "wall_seconds_mean"} <= set(csv.columns)
    assert csv.loc[0, "average_score_mean"] == pytest.approx(50.0)
    md = (out / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "average score" in header and "final RTE" in header and "wall time (s)" in header
    rpt = next(line for line in md.splitlines() if line.startswith("| rpt |"))
    cells = [c.strip() for c in rpt.strip("|").split("|")]
    # method, seeds, average, forgetting, backward, task-free average, routing accuracy (runs without route state),
    # final CB, COPA, RTE, tokens, trainable, stored, wall
    assert cells == ["rpt", "2", "50.0 ± 1.4", "0.0 ± 0.0", "0.0 ± 0.0", "—", "—", "71.0 ± 1.4", "61.0 ± 1.4",
                     "18.0 ± 1.4", "10", "3,000", "300", "105 ± 7"]
    assert "| pt | 2 | 42.0 ± 2.8 | 12.5 ± 0.0 | -12.5 ± 0.0 | — | — | 42.0 ± 2.8 |" in md


def test_control_rows_come_from_the_runs_once_per_seed(tmp_path):
    runs = []
    for method, seed, R, (majority, probe) in [("rpt", 0, [[70, None, None], [70, 60, None], [70, 60, 17]], (30, 60)),
                                              ("pt", 0, [[60, None, None], [50, 55, None], [40, 50, 30]], (30, 60)),
                                              ("rpt", 1, [[72, None, None], [72, 62, None], [72, 62, 19]], (32, 66)),
                                              ("pt", 1, [[64, None, None], [54, 57, None], [44, 52, 36]], (32, 66))]:
        controls = {t: {"majority": majority + i, "linear_probe": probe + i} for i, t in enumerate(TASKS)}  # as runs before the best constant stored them
        runs.append(write_run(tmp_path / f"{method}-{seed}", method, seed, R, controls=controls))
    table = compare(runs, tmp_path / "report").set_index("method")
    assert list(table.index) == ["rpt", "pt", "majority class (control)", "linear probe (control)"]
    probe = table.loc["linear probe (control)"]
    assert probe["seeds"] == 2  # seeds 0 and 1, each counted once though two runs scored it
    assert probe["average_score_mean"] == pytest.approx(64.0) and probe["final_RTE_mean"] == pytest.approx(65.0)
    assert math.isnan(probe["forgetting_mean"])
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "| linear probe (control) | 2 | 64.0 ± 4.2 | — | — | — | — | 63.0 ± 4.2 |" in md


def test_plots_are_valid_pngs(runs, tmp_path):
    out = tmp_path / "report"
    compare(runs, out)
    names = ["accuracy_matrix_rpt.png", "accuracy_matrix_pt.png", "score_along_stream.png", "final_scores.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    for name in names:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
            assert image.width >= 500 and image.height >= 400, name


def test_undefined_values_render_as_dash_and_one_seed_has_no_std(tmp_path):
    run = write_run(tmp_path / "one", "rpt", 0, [[70.0]], tokens=(10,), tasks=["CB"])
    table = compare([run], tmp_path / "report")
    assert math.isnan(table.loc[0, "forgetting_mean"]) and math.isnan(table.loc[0, "average_score_std"])
    row = next(line for line in (tmp_path / "report" / "comparison.md").read_text().splitlines() if line.startswith("| rpt"))
    assert row == "| rpt | 1 | 70.0 | — | — | — | — | 70.0 | 10 | 1,000 | 100 | 100 |"


def test_missing_metrics_json_names_the_folder(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ReportError, match="unfinished.*no metrics.json"):
        compare([*runs, unfinished], tmp_path / "report")


def test_other_tasks_or_stream_name_the_run(runs, tmp_path):
    other = write_run(tmp_path / "other-order", "rpt", 2, [[1, None, None], [1, 2, None], [1, 2, 3]], tasks=["COPA", "CB", "RTE"])
    with pytest.raises(ReportError, match="other-order.*differs from .*rpt-0"):
        compare([*runs, other], tmp_path / "report")
    elsewhere = write_run(tmp_path / "elsewhere", "rpt", 2, [[1, None, None], [1, 2, None], [1, 2, 3]], stream="big")
    with pytest.raises(ReportError, match="elsewhere.*stream 'big'"):
        compare([*runs, elsewhere], tmp_path / "report")


def test_the_same_seed_twice_is_refused(runs, tmp_path):
    again = write_run(tmp_path / "rpt-0-again", "rpt", 0, [[70, None, None], [70, 60, None], [70, 60, 17]])
    with pytest.raises(ReportError, match="rpt-0-again.*seed 0"):
        compare([*runs, again], tmp_path / "report")


def test_compare_subcommand_prints_the_table(runs, tmp_path, capsys):
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "| rpt | 2 | 50.0 ± 1.4 |" in printed
    assert (tmp_path / "report" / "comparison.csv").is_file()
