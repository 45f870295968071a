"""experiments/main_job.py: the README's single-run tables come from a run's own metrics."""

import json
import sys
from pathlib import Path

import pytest

from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from test_stream import write_stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import main_job  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, superglue_dir):
    tmp = tmp_path_factory.mktemp("main_job")
    stream = load_stream(write_stream(tmp, tiny_bert_dir, superglue_dir, ["COPA", "CB"]))  # not sorted: the table keeps stream order
    run_stream(stream, tmp / "run", progress=False)
    return tmp / "run"


def test_table_prints_each_tasks_final_score_and_interval_from_the_run(finished_run, capsys):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    main_job.main(["table", str(finished_run)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["COPA", "CB"]
    for name in ("CB", "COPA"):
        task = metrics["per_task"][name]
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{task['final_score']:.1f}" and cells[4] == "{:.1f}–{:.1f}".format(*task["final_test_ci"])
    assert f"Average {metrics['average_score']:.1f}, forgetting 0.0" in lines[-1]


def test_record_says_whether_runs_are_bit_identical_and_never_writes_into_an_existing_folder(finished_run, tmp_path):
    main_job.main(["record", str(finished_run), str(finished_run), "--out", str(tmp_path / "same")])
    assert "Bit-identical (accuracy matrix, task-free matrix, routing confusion): yes" in (tmp_path / "same" / "reproducibility.md").read_text()
    assert not (tmp_path / "same" / "run1" / "bank").exists()  # results only, never the bank

    moved = tmp_path / "moved"
    moved.mkdir()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    metrics["accuracy_matrix"][-1][0] += 0.5  # another run whose CB score moved by half a point
    metrics["final_scores"]["CB"] += 0.5
    (moved / "metrics.json").write_text(json.dumps(metrics))
    main_job.main(["record", str(finished_run), str(moved), "--out", str(tmp_path / "differ")])
    text = (tmp_path / "differ" / "reproducibility.md").read_text()
    assert "routing confusion): no" in text and "| 0.5000 |" in text

    with pytest.raises(SystemExit, match="exists"):
        main_job.main(["record", str(finished_run), "--out", str(tmp_path / "same")])


def test_rows_start_with_the_controls_and_give_each_run_its_scores_and_average(finished_run, capsys):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    main_job.main(["rows", str(finished_run), str(finished_run), "--labels", "first", "second"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["best constant answer", "linear probe", "first", "second"]
    scores = [metrics["final_scores"][t] for t in ("COPA", "CB")]
    assert lines[-1] == f"| second | {scores[0]:.1f} | {scores[1]:.1f} | {sum(scores) / 2:.1f} |"
    with pytest.raises(SystemExit, match="1 labels for 2 runs"):
        main_job.main(["rows", str(finished_run), str(finished_run), "--labels", "one"])
