"""Continual-learning strategies on a tiny BERT and real data: progressive, shared, multitask."""

import json

import pytest
import torch
from test_stream import write_stream

from continual_rpt.bank import PromptBank
from continual_rpt.cli import main
from continual_rpt.evaluation import load_answerer, predict
from continual_rpt.run import run_stream
from continual_rpt.strategies import with_method
from continual_rpt.streams import load_data, load_stream

TASKS = ["CB", "COPA", "RTE"]


def run(tmp_path, tiny_bert_dir, superglue_dir, method, tasks=TASKS, out="run"):
    stream = with_method(load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks)), method)
    return stream, run_stream(stream, tmp_path / out, progress=False)


@pytest.mark.parametrize("method", ["progressive", "progressive-pt"])
def test_progressive_prompts_grow_and_never_forget(tmp_path, tiny_bert, tiny_bert_dir, superglue_dir, method):
    stream, metrics = run(tmp_path, tiny_bert_dir, superglue_dir, method)
    assert metrics["method"] == method and metrics["strategy"] == "progressive"
    assert [metrics["per_task"][t]["prompt_tokens_in_context"] for t in TASKS] == [3, 6, 9]
    assert metrics["forgetting"] == 0.0 and metrics["backward_transfer"] == 0.0
    bank = PromptBank.open(tmp_path / "run" / "bank")
    assert bank.get("RTE").meta["context"] == ["COPA", "CB"]
    # The bank answers RTE with [P′_RTE; P′_COPA; P′_CB], exactly as it was trained and evaluated.
    own = [bank.get(t).prompt for t in ("RTE", "COPA", "CB")]
    task, prompt, head, _ = load_answerer(bank, "RTE", tiny_bert)
    assert torch.equal(prompt, torch.cat(own))
    rte = load_data(stream.tasks[2], stream.base_dir)
    assert task.score(rte.test, predict(tiny_bert, prompt, head, rte.test, 96, bf16=False)) == metrics["per_task"]["RTE"]["final_test"]


def test_shared_prompt_moves_and_the_bank_holds_its_final_state(tmp_path, tiny_bert_dir, superglue_dir):
    _, metrics = run(tmp_path, tiny_bert_dir, superglue_dir, "shared")
    assert metrics["method"] == "shared" and metrics["forgetting"] is not None
    bank = PromptBank.open(tmp_path / "run" / "bank")
    prompts = [bank.get(t).prompt for t in TASKS]
    assert all(torch.equal(prompts[0], p) for p in prompts[1:])  # one shared P′
    assert all(bank.get(t).meta["shared_prompt"] for t in TASKS)
    assert (tmp_path / "run" / "shared.safetensors").is_file()


def test_shared_resume_uses_the_checkpoint_instead_of_retraining(tmp_path, tiny_bert_dir, superglue_dir):
    _, first = run(tmp_path, tiny_bert_dir, superglue_dir, "shared", tasks=["CB", "COPA"])
    out = tmp_path / "run"
    # As if killed after COPA's checkpoint but before its row: drop the row, the results and the bank.
    state = json.loads((out / "state.json").read_text())
    state["rows"] = state["rows"][:1]
    (out / "state.json").write_text(json.dumps(state))
    for name in ("metrics.json", "accuracy_matrix.csv"):
        (out / name).unlink()
    bank = PromptBank.open(out / "bank")
    index = json.loads((out / "bank" / "bank.json").read_text())
    (out / "bank" / "bank.json").write_text(json.dumps({**index, "entries": []}))
    for t in bank.tasks():
        for f in (out / "bank" / t).iterdir():
            f.unlink()
        (out / "bank" / t).rmdir()
    path = out.parent / "tiny.yaml"
    assert main(["run", str(path), "--out", str(out), "--resume", "--method", "shared", "--no-progress"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == first["accuracy_matrix"]
    assert "learn COPA" in (out / "log.txt").read_text()


def test_multitask_is_evaluated_once_at_the_end(tmp_path, tiny_bert_dir, superglue_dir):
    _, metrics = run(tmp_path, tiny_bert_dir, superglue_dir, "multitask")
    R = metrics["accuracy_matrix"]
    assert R[0] == [None, None, None] and R[1] == [None, None, None] and None not in R[2]
    assert metrics["forgetting"] is None and metrics["backward_transfer"] is None
    assert metrics["average_score"] == pytest.approx(sum(R[2]) / 3)
    bank = PromptBank.open(tmp_path / "run" / "bank")
    assert bank.tasks() == TASKS and torch.equal(bank.get("CB").prompt, bank.get("RTE").prompt)


def test_shared_strategy_refuses_mixed_prompt_settings(tmp_path, tiny_bert_dir, superglue_dir):
    tasks = ["CB", {"task": "COPA", "prompt": {"n_tokens": 5}}]
    with pytest.raises(ValueError, match="same prompt settings"):
        run(tmp_path, tiny_bert_dir, superglue_dir, "shared", tasks=tasks)
