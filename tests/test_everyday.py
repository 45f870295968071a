"""Everyday use (issue 28, item 7): a run's log without progress bars, custom tasks' published metrics,
plots a reader can trust, and `crpt bank ls` columns. Each test's comment says how it was checked to fail."""

import random
import subprocess
import sys

import pytest
import yaml
from crash import ENV, REPO
from sklearn.metrics import f1_score, matthews_corrcoef
from test_stream import write_stream

from continual_rpt.run import run_stream
from continual_rpt.strategies import with_method
from continual_rpt.streams import load_stream
from continual_rpt.tasks import metrics

LABELS = ("none", "against", "favor")


@pytest.mark.parametrize("seed", range(40))
def test_published_metrics_equal_scikit_learn(seed):
    # Checked to fail: with mean_f1 averaging over every class present (macro_f1's rule), and with mcc given
    # (predictions, golds) swapped into a hand-written formula that drops no-answer rows.
    rng = random.Random(seed)
    n, k = rng.randint(1, 60), rng.randint(3, 5)
    golds = [rng.randrange(k) for _ in range(n)]
    predictions = [rng.randrange(k) if rng.random() > 0.1 else None for _ in range(n)]
    as_sklearn = [-1 if p is None else p for p in predictions]  # no answer: wrong for every gold, no class's prediction
    names = [f"c{i}" for i in range(k)]
    chosen = metrics.classification_metrics("accuracy+macro_f1+mcc+f1:c1+f1_mean:c0, c2", names)
    assert list(chosen) == ["accuracy", "macro_f1", "mcc", "f1:c1", "f1_mean:c0,c2"]
    score = {name: metric(predictions, golds) for name, metric in chosen.items()}
    present = sorted(set(golds) | {p for p in predictions if p is not None})
    assert score["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predictions, golds)) / n)
    assert score["macro_f1"] == pytest.approx(f1_score(golds, as_sklearn, labels=present, average="macro", zero_division=0))
    assert score["mcc"] == pytest.approx(matthews_corrcoef(golds, as_sklearn))
    assert score["f1:c1"] == pytest.approx(f1_score(golds, as_sklearn, labels=[1], average="macro", zero_division=0))
    assert score["f1_mean:c0,c2"] == pytest.approx(f1_score(golds, as_sklearn, labels=[0, 2], average="macro", zero_division=0))


@pytest.mark.parametrize(("metric", "message"), [
    ("f1:favour", r"metric 'f1:favour': class 'favour' is not one of label_names \(none, against, favor\)"),
    ("f1", r"metric must be one of accuracy, macro_f1, mcc, f1:<class>"),
    ("f1:against,favor", r"metric must be one of"),  # one class for f1; several are f1_mean's
    ("accuracy+mcc:none", r"metric must be one of"),
])
def test_a_metric_typo_in_a_stream_file_names_the_file_and_key(tmp_path, metric, message):
    # Before this change "f1:favour" failed (the message named no class) and so did "f1" (the list lacked the new metrics);
    # the last two were refused then too, and must stay refused now that f1:<class> and f1_mean exist.
    task = {"custom": {"name": "stance", "label_names": list(LABELS), "text": "text", "train": "t.csv", "validation": "v.csv",
                       "metric": metric}}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "tasks": [task]}))
    with pytest.raises(ValueError, match=rf"^{path}: tasks\[0\]\.custom: {message}"):
        load_stream(path)


def test_a_run_without_progress_bars_logs_each_epoch_and_no_weight_loading_bar(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail before this change: log.txt held only the "start", "learn CB (bank, rpt, n=3)", "after CB" and "done" lines; stderr
    # held transformers' "Loading weights: 100%|…" bar. Running the same command with --progress prints that bar.
    stream = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"],
                          train={"epochs": 2, "batch_size": 8, "max_length": 96, "bf16": False, "patience": 0})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "continual_rpt", "run", str(stream), "--out", str(out), "--no-progress"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-2000:]
    log = (out / "log.txt").read_text()
    epochs = [line for line in log.splitlines() if " CB (rpt) epoch " in line]
    assert len(epochs) == 2, log  # 16 examples, batches of 8: two steps an epoch, one evaluation each
    for epoch, line in enumerate(epochs, 1):
        assert f"epoch {epoch} step {2 * epoch}: train loss " in line and ", dev " in line and " examples/s, " in line, line
    assert "CB: kept the state of step " in log and " of 4 (best mean dev score " in log, log
    assert "learn CB (bank, rpt, 3 prompt tokens)" in log


def test_a_linear_probe_run_logs_no_prompt_tokens(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail before this change: the line read "learn CB (probe, head, n=3)" (the stream's n_tokens) for a method with no prompt.
    stream = with_method(load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], controls=False)), "linear-probe")
    run_stream(stream, tmp_path / "run", progress=False)
    learn = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if " learn CB " in line]
    assert len(learn) == 1 and learn[0].endswith("learn CB (probe, head)"), learn


def _bank_runs(tmp_path, probe_equals_head: bool):
    """Two seeds of methods rpt and head, whose scores never change along the stream, with the runs' control scores;
    `probe_equals_head`: the linear probe control scored exactly what method head's runs did."""
    from test_report import TASKS, write_run

    runs = []
    for seed in (0, 1):
        finals = {"rpt": [70 + seed, 60, 17], "head": [50, 40 + seed, 30]}
        probe = finals["head"] if probe_equals_head else [55, 45, 35 + seed]
        controls = {t: {"best_constant_score": 33.0 + i, "linear_probe_score": probe[i]} for i, t in enumerate(TASKS)}
        for method, final in finals.items():
            R = [[final[j] if j <= i else None for j in range(3)] for i in range(3)]  # frozen entries: each column constant
            runs.append(write_run(tmp_path / f"{method}-{seed}", method, seed, R, controls=controls))
    return runs


def _legend_labels(fig) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


@pytest.mark.parametrize("probe_equals_head", [True, False])
def test_a_control_equal_to_a_method_is_drawn_once(tmp_path, probe_equals_head):
    # Checked to fail before this change: final_scores.png had bars and legend entries for both "head (n=2)" and
    # "linear probe (control) (n=2)", the same numbers twice.
    from continual_rpt.plots import plot_final_scores
    from continual_rpt.report import compare

    out = tmp_path / "report"
    table = compare(_bank_runs(tmp_path, probe_equals_head), out)
    labels = _legend_labels(plot_final_scores(table, ["CB", "COPA", "RTE"], out))
    probe_shown = any(label.startswith("linear probe (control)") for label in labels)
    assert probe_shown != probe_equals_head, labels
    assert len(labels) == len(set(labels)) == (4 if probe_shown else 3)
    note = "The linear probe (control) has exactly the scores of method head; it is shown once, as head."
    assert (note in (out / "comparison.md").read_text()) == probe_equals_head


def test_bank_methods_draw_no_flat_lines_and_the_report_says_so(tmp_path):
    # Checked to fail before this change: score_along_stream.png drew rpt's and head's flat lines, and comparison.md said nothing.
    from test_report import write_run

    from continual_rpt.plots import plot_along_stream
    from continual_rpt.report import compare, mean_matrices

    runs = _bank_runs(tmp_path, False)
    out = tmp_path / "report"
    compare(runs, out)
    assert not (out / "score_along_stream.png").exists()
    assert "score_along_stream.png is not drawn: no method's task scores change" in (out / "comparison.md").read_text()
    forgets = write_run(tmp_path / "pt-0", "pt", 0, [[60, None, None], [50, 55, None], [40, 50, 30]])
    compare([*runs, forgets], out)
    assert "score_along_stream.png leaves out rpt, head: no task's score changes" in (out / "comparison.md").read_text()
    fig = plot_along_stream({"rpt": mean_matrices([_metrics(runs[0])]), "pt": mean_matrices([_metrics(forgets)])}, ["CB", "COPA", "RTE"], out)
    assert _legend_labels(fig) == ["pt"]
    assert {line.get_label() for ax in fig.axes for line in ax.get_lines()} == {"pt"}


def _metrics(folder):
    import json

    return json.loads((folder / "metrics.json").read_text())


def test_the_final_scores_legend_fits_in_the_saved_figure(tmp_path):
    # Checked to fail before this change (one legend row, as before): the legend ran 700 px past both edges of the figure.
    from test_report import write_run

    from continual_rpt.plots import plot_final_scores
    from continual_rpt.report import compare

    runs = [write_run(tmp_path / f"{method}-0", method, 0, [[60, None, None], [50, 55 + k, None], [40, 50, 30 + k]])
            for k, method in enumerate(["rpt", "pt", "pt-mlp", "deep-rpt", "deep-pt"])]
    out = tmp_path / "report"
    table = compare(runs, out)
    table["method"] = [f"{m} with a long descriptive label" for m in table["method"]]
    fig = plot_final_scores(table, ["CB", "COPA", "RTE"], out)
    (legend,) = fig.legends
    box, inside = legend.get_window_extent(), fig.bbox
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (box, inside)
    assert len(_legend_labels(fig)) == 5


def test_bank_ls_aligns_long_task_and_method_names(tmp_path, capsys):
    # Checked to fail before this change: columns 16 and 8 wide, so "linear-probe" and a 20-letter task name pushed
    # their rows' later columns right of the header's.
    import torch

    from continual_rpt.bank import Entry, PromptBank
    from continual_rpt.cli import main

    bank = PromptBank.open(tmp_path / "bank", create=True)
    for name, method, tokens in [("CB", "rpt", 10), ("a_very_long_task_name", "linear-probe", 0), ("RTE", "deep-rpt", 100)]:
        meta = {"task": name, "method": method, "prompt_tokens": tokens, "backbone": {"name": "embedded"}}
        bank.add(name, Entry(torch.zeros(max(tokens, 1), 4), None, meta, {}, {"test_score": 50.0}))
    capsys.readouterr()
    assert main(["bank", "ls", str(tmp_path / "bank")]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3
    columns = {word: header.index(word) for word in ("method", "tokens", "test", "backbone")}
    for row, (name, method) in zip(rows, [("CB", "rpt"), ("a_very_long_task_name", "linear-probe"), ("RTE", "deep-rpt")]):
        assert row.startswith(name) and row[columns["method"]:].startswith(method + " "), (header, row)
        assert row[columns["backbone"]:] == "embedded", (header, row)
        assert row[columns["tokens"] + len("tokens") - 1] != " " and row[columns["test"] + len("test") - 1] == "0", (header, row)


@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_crpt_train_shows_the_weight_loading_bar_only_with_progress(tmp_path, tiny_bert_dir, superglue_dir, progress):
    # Checked to fail before this change: `crpt train --no-progress` printed transformers' "Loading weights: 100%|…" bar.
    # --progress is the control: the same command shows it, so its absence is the flag's doing.
    proc = subprocess.run([sys.executable, "-m", "continual_rpt", "train", "--task", "CB", "--data-dir", str(superglue_dir),
                           "--backbone", str(tiny_bert_dir), "--k-per-class", "2", "--epochs", "1", "--max-length", "96",
                           "--no-bf16", "--out", str(tmp_path / "cb"), progress],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("Loading weights" in proc.stderr) == (progress == "--progress"), proc.stderr[-2000:]
