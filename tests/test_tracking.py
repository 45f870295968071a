"""Trackers through Accelerate: real TensorBoard event files from tiny runs, read back with TensorBoard's own reader."""

import importlib.util
import json

import pytest
from crash import killed
from test_stream import write_stream

from continual_rpt.bank import PromptBank
from continual_rpt.cli import main
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'continual-rpt[tracking]'")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard finds in `folder`, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_crpt_run_writes_losses_rates_scores_and_the_accuracy_matrix(tmp_path, tiny_bert_dir, superglue_dir):
    # Fails on main: run_stream had no report_to, and nothing wrote event files.
    stream = load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"]))
    metrics = run_stream(stream, tmp_path / "run", progress=False, report_to="tensorboard")
    logged = scalars(tmp_path / "run" / "tracking" / "tiny")
    bank = PromptBank.open(tmp_path / "run" / "bank")

    first = 0  # one step axis across the stream: COPA's steps follow CB's
    for name in ("CB", "COPA"):
        entry = bank.get(name)
        steps = [step for step, _ in logged[f"{name}/train_loss"]]
        assert steps == list(range(first + 1, first + entry.metrics["steps"] + 1))
        losses = [loss for _, loss in logged[f"{name}/train_loss"]]  # one epoch: its dev evaluation's mean loss
        assert sum(losses) / len(losses) == pytest.approx(entry.metrics["history"][0]["train_loss"], rel=1e-6)
        assert [v for _, v in logged[f"{name}/lr/prompt"]] == pytest.approx([stream.tasks[0].train.lr] * len(steps))
        assert [v for _, v in logged[f"{name}/lr/head"]] == pytest.approx([stream.tasks[0].train.head_lr] * len(steps))
        assert logged[f"{name}/dev_score"] == [(steps[-1], pytest.approx(entry.metrics["dev_score"]))]
        first = steps[-1]

    R = metrics["accuracy_matrix"]  # row i logged after task i: the whole matrix, each column one series
    assert [v for _, v in logged["accuracy_matrix/CB"]] == [pytest.approx(R[0][0]), pytest.approx(R[1][0])]
    assert [v for _, v in logged["accuracy_matrix/COPA"]] == [pytest.approx(R[1][1])]
    assert logged["average_score"] == [(first, pytest.approx(metrics["average_score"]))]
    assert logged["forgetting"] == [(first, pytest.approx(metrics["forgetting"]))]
    assert {name: v for name in ("CB", "COPA") for _, v in logged[f"final_score/{name}"]} == pytest.approx(metrics["final_scores"])


def test_a_killed_run_resumes_its_tracker_after_the_steps_it_kept(tmp_path, tiny_bert_dir, superglue_dir):
    # CB and COPA train 2 steps each; the 4th step is COPA's last: its first was logged, then a real SIGKILL.
    stream, run = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"]), tmp_path / "run"
    killed(["run", stream, "--out", run, "--report-to", "tensorboard", "--no-progress"], "train.step@4")
    run_stream(load_stream(stream), run, resume=True, progress=False, report_to="tensorboard")
    logged = scalars(run / "tracking" / "tiny")
    assert [step for step, _ in logged["CB/train_loss"]] == [1, 2]
    # COPA, trained again, continues after CB's steps, each step once: the killed process's step 3 is dropped.
    # Fails without state.json's tracked_steps (steps 1, 2 again) and without purge_step (step 3 twice).
    assert [step for step, _ in logged["COPA/train_loss"]] == [3, 4]
    losses = [loss for _, loss in logged["COPA/train_loss"]]
    assert sum(losses) / 2 == pytest.approx(PromptBank.open(run / "bank").get("COPA").metrics["history"][0]["train_loss"], rel=1e-6)
    assert [step for step, _ in logged["accuracy_matrix/CB"]] == [2, 4]


def test_crpt_train_reports_to_tensorboard(tmp_path, tiny_bert_dir, superglue_dir):
    out, logs = tmp_path / "entry", tmp_path / "logs"
    assert main(["train", "--task", "CB", "--backbone", str(tiny_bert_dir), "--data-dir", str(superglue_dir), "--max-train", "16",
                 "--epochs", "1", "--batch-size", "8", "--max-length", "96", "--n-tokens", "3", "--bottleneck", "8",
                 "--out", str(out), "--report-to", "tensorboard", "--logging-dir", str(logs), "--no-progress"]) == 0
    logged = scalars(logs / "CB")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(logged["CB/train_loss"]) == metrics["steps"]
    assert logged["CB/test/score"] == [(metrics["steps"], pytest.approx(metrics["test_score"]))]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_written(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    stream = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"])
    assert main(["run", str(stream), "--out", str(tmp_path / "run"), "--report-to", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install mlflow" in err
    assert not (tmp_path / "run").exists()
