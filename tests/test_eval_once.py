"""Each bank entry scored on test once, when learned; later stages verify it by checksum (issue 28, item 7).

Each test's comment says how it was checked to fail.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from crash import ENV, REPO, killed, stopped
from test_stream import write_stream

from continual_rpt.cli import main
from continual_rpt.faults import STOP_ENV
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream


def _read(out):
    return json.loads((out / "metrics.json").read_text()), (out / "log.txt").read_text()


def test_scoring_once_gives_the_full_rescoring_matrix_with_fewer_test_evaluations(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail: with `once` forced off in run._learn the default run counts 6 evaluations, not 3.
    tasks = ["CB", "COPA", {"task": "RTE", "prompt": {"method": "pt"}}]
    default = write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks, controls=False)
    every = write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks, name="every.yaml", controls=False, eval="every")
    once_out, every_out = tmp_path / "once", tmp_path / "every"
    # The default run in two lives: killed once CB's row is saved, resumed from state.json's records.
    killed(["run", default, "--out", once_out, "--no-progress"], "run.task-done@1")
    assert main(["run", str(default), "--out", str(once_out), "--resume", "--no-progress"]) == 0
    run_stream(load_stream(every), every_out, progress=False)
    (once, once_log), (full, full_log) = _read(once_out), _read(every_out)

    R = once["accuracy_matrix"]
    assert R == full["accuracy_matrix"]  # bit-identical: floats compared with ==
    assert R[1][0] == R[2][0] == R[0][0] and R[2][1] == R[1][1]  # earlier cells are the scores at learning time
    for key in ("task_free_accuracy_matrix", "routing_confusion", "final_scores"):
        assert once[key] == full[key], key
    assert (once_out / "bootstrap.json").read_bytes() == (every_out / "bootstrap.json").read_bytes()
    assert (once_out / "routing_matrix.csv").read_bytes() == (every_out / "routing_matrix.csv").read_bytes()

    assert once["evaluation"] == {"earlier_tasks": "verified by checksum", "test_evaluations": 3, "verified_by_checksum": 3}
    assert full["evaluation"] == {"earlier_tasks": "re-scored", "test_evaluations": 6, "verified_by_checksum": 0}
    assert "(evaluated on test: RTE; verified by checksum: CB, COPA)" in once_log
    assert "(evaluated on test: COPA; verified by checksum: CB)" in once_log  # the resumed life reused CB's record
    assert "(evaluated on test: CB, COPA, RTE)" in full_log
    assert "earlier tasks after each one: re-scored on test (eval: every, strategy bank)" in full_log


def test_an_entry_changed_between_stages_stops_the_run_naming_its_file(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail: without still_valid's bank.get (the index's listing compared, the files not hashed) CB's recorded
    # score is copied and the flipped byte is caught only later, by task-free routing, whose message says nothing of it.
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"], controls=False)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "continual_rpt", "run", str(path), "--out", str(out), "--no-progress"],
                            env={**ENV, STOP_ENV: "run.task-done"}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        stopped(proc.pid)  # CB learned, scored and recorded; COPA not begun
        prompt = out / "bank" / "CB" / "prompt.safetensors"
        data = bytearray(prompt.read_bytes())
        data[-1] ^= 1  # one bit of the last weight: the file still loads, only its checksum tells
        prompt.write_bytes(bytes(data))
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-2000:]
    assert f"{prompt}: changed since it was stored (checksum mismatch); the run cannot reuse the test score it recorded " \
           "for entry 'CB'" in err, err[-2000:]
    assert "after COPA" not in (out / "log.txt").read_text()


def test_an_entry_replaced_with_its_index_listing_is_refused_on_resume(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail: without still_valid's comparison of the index's listing with the recorded one, the resumed run
    # copies CB's recorded score for an entry that is no longer the one scored, and exits 0 (so did full re-scoring,
    # silently scoring the new bytes).
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"], controls=False)
    out = tmp_path / "run"
    killed(["run", path, "--out", out, "--no-progress"], "run.task-done@1")
    prompt, index_path = out / "bank" / "CB" / "prompt.safetensors", out / "bank" / "bank.json"
    data = bytearray(prompt.read_bytes())
    data[-1] ^= 1
    prompt.write_bytes(bytes(data))
    index = json.loads(index_path.read_text())  # the index made to agree: every file matches its listing again
    index["entries"][0]["files"]["prompt.safetensors"] = hashlib.sha256(data).hexdigest()
    index_path.write_text(json.dumps(index))
    proc = subprocess.run([sys.executable, "-m", "continual_rpt", "run", str(path), "--out", str(out), "--resume", "--no-progress"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{index_path}: entry 'CB' lists other files or checksums than when the run scored it" in proc.stderr, proc.stderr[-2000:]


def test_a_strategy_whose_model_moves_still_rescores_earlier_tasks(tmp_path, tiny_bert_dir, superglue_dir):
    # Checked to fail: with SharedStrategy.answers_fixed set True the run tries to record COPA's bank entry for reuse
    # and stops (a shared prompt reaches the bank only at the end). With CB first, CB's answers happen not to change
    # on this tiny model, hence COPA.
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["COPA", "RTE"], controls=False, strategy="shared")
    metrics = run_stream(load_stream(path), tmp_path / "run", progress=False)
    R = metrics["accuracy_matrix"]
    assert R[1][0] != R[0][0]  # RTE's training moved the shared prompt, and COPA's answers with it
    assert metrics["evaluation"] == {"earlier_tasks": "re-scored", "test_evaluations": 3, "verified_by_checksum": 0}
    assert "(evaluated on test: COPA, RTE)" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.parametrize("value", ["sometimes", True, None])
def test_a_bad_eval_value_names_the_file_and_key(tmp_path, value):
    # Checked to fail before the key existed: "eval: unknown key" for every value, "every" included.
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "eval": value, "tasks": ["CB"]}))
    with pytest.raises(ValueError, match=rf"^{path}: eval: expected one of once, every, got {value!r}$"):
        load_stream(path)
    path.write_text(yaml.safe_dump({"name": "s", "eval": "every", "tasks": ["CB"]}))
    assert load_stream(path).eval == "every" and load_stream(path).resolved()["eval"] == "every"
