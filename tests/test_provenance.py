"""Which training rows a few-shot sample took: recorded in the bank entry, enough to rebuild it without the Python API."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import torch
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.learner import TrainConfig, train_task
from continual_rpt.prompts import PromptConfig
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import TaskData, get_task, load_task_data


def _rows_by_idx(path):
    """CB's training rows as a user reads them: plain JSON lines keyed by their own idx, with their line numbers."""
    rows = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            row = json.loads(line)
            rows[row["idx"]] = (number, row)
    return rows


def _retrain(tiny_bert_dir, superglue_dir, entry, rows, path):
    """Train again from only `rows` (idx, row pairs) with the entry's stored settings; the collapsed prompt and head."""
    task = get_task("CB")
    train = [example for idx, (number, row) in rows for example in task.parse(row, f"{path}:{number}")]
    split = load_task_data("CB", superglue_dir)  # dev and test do not depend on the training sample
    data = TaskData(task, train, split.dev, split.test, split.files)
    prompt_cfg, train_cfg = PromptConfig(**entry.config["prompt"]), TrainConfig(**entry.config["train"])
    trained = train_task(load_backbone(str(tiny_bert_dir)), data, prompt_cfg, train_cfg)
    return trained, train


def _same(trained, entry) -> bool:
    # Other thread counts than the run's sum in another order: equal up to float rounding, not bit for bit.
    return torch.allclose(trained.prompt, entry.prompt, atol=1e-5) and all(
        torch.allclose(trained.head[k], entry.head[k], atol=1e-5) for k in entry.head)


def test_entry_records_the_rows_its_learner_trained_on(tmp_path, tiny_bert_dir, superglue_dir):
    """Fails on main: entry.json holds no train_rows (KeyError), so the sample can only be rebuilt through the Python API.

    Checked to discriminate: a sample with one row swapped for another of the same class trains a different
    prompt (the last assertion), so recording any other rows than the trained ones fails the retraining check."""
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], data={"data_dir": str(superglue_dir), "k_per_class": 4},
                        train={"epochs": 1, "batch_size": 4, "max_length": 64, "bf16": False, "seed": 3}, controls=False)
    run_stream(load_stream(path), tmp_path / "run", progress=False)
    bank = PromptBank.open(tmp_path / "run" / "bank")
    entry = bank.get("CB")
    recorded = json.loads((tmp_path / "run" / "bank" / "CB" / "entry.json").read_text())["train_rows"]
    assert recorded["count"] == len(recorded["ids"]) == len(recorded["sha256"]) == 12 == entry.metrics["train_examples"]

    # Rebuilt by hand from the data file the entry names: each id is "CB/train/<the row's own idx>".
    train_file = superglue_dir / "CB" / "train.jsonl"
    assert str(train_file) in entry.meta["data_files"]
    by_idx = _rows_by_idx(train_file)
    chosen = [(int(uid.rsplit("/", 1)[1]), by_idx[int(uid.rsplit("/", 1)[1])]) for uid in recorded["ids"]]
    assert Counter(row["label"] for _, (_, row) in chosen) == {"entailment": 4, "contradiction": 4, "neutral": 4}
    trained, examples = _retrain(tiny_bert_dir, superglue_dir, entry, chosen, train_file)
    # Each sha256 is of the parsed example's fields as compact JSON, as the README documents.
    canonical = [json.dumps(dataclasses.astuple(ex), ensure_ascii=False, separators=(",", ":")) for ex in examples]
    assert [hashlib.sha256(text.encode()).hexdigest() for text in canonical] == recorded["sha256"]
    assert _same(trained, entry)  # the recorded rows alone give back the stored prompt and head: they are what it trained on

    first_label = chosen[0][1][1]["label"]
    other = next(idx for idx, (_, row) in by_idx.items() if row["label"] == first_label and idx not in dict(chosen))
    swapped, _ = _retrain(tiny_bert_dir, superglue_dir, entry, [(other, by_idx[other]), *chosen[1:]], train_file)
    assert not _same(swapped, entry)


def test_bank_show_prints_the_count_and_where_not_every_id(tmp_path, tiny_bert_dir, superglue_dir):
    """Fails on main: `crpt bank show` has no train_rows to show."""
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], data={"data_dir": str(superglue_dir), "k_per_class": 16},
                        train={"epochs": 1, "batch_size": 8, "max_length": 64, "bf16": False}, controls=False)
    run_stream(load_stream(path), tmp_path / "run", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shown = subprocess.run([sys.executable, "-m", "continual_rpt", "bank", "show", str(tmp_path / "run" / "bank"), "CB"],
                           capture_output=True, text=True, env=env, check=True).stdout
    rows = json.loads(shown)["entry"]["train_rows"]
    ids = PromptBank.open(tmp_path / "run" / "bank").get("CB").meta["train_rows"]["ids"]
    assert rows.startswith(f"48 rows: {ids[0]}, {ids[1]}, {ids[2]}, … 45 more") and "entry.json" in rows
    assert ids[3] not in shown and len(shown.splitlines()) < 150

