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
    # Checked to fail before this change: every one of these (but "f1") was accepted or failed later, with no file named.
    task = {"custom": {"name": "stance", "label_names": list(LABELS), "text": "text", "train": "t.csv", "validation": "v.csv",
                       "metric": metric}}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "tasks": [task]}))
    with pytest.raises(ValueError, match=rf"^{path}: tasks\[0\]\.custom: {message}"):
        load_stream(path)


def test_a_run_without_progress_bars_logs_each_epoch_and_no_weight_loading_bar(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail before this change: log.txt held only "start", "learn CB (bank, rpt, n=3)" and "after CB"; stderr
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
    # Checked to fail before this change: the line read "learn CB (probe, head, n=10)" for a method with no prompt.
    stream = with_method(load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], controls=False)), "linear-probe")
    run_stream(stream, tmp_path / "run", progress=False)
    learn = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if " learn CB " in line]
    assert len(learn) == 1 and learn[0].endswith("learn CB (probe, head)"), learn
