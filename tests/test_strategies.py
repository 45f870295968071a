"""Continual-learning strategies on a tiny BERT and real data: progressive, shared, multitask."""

import dataclasses
import json

import pytest
import torch
from test_routing import without_routes
from test_stream import write_stream

from continual_rpt.bank import ROUTE_FILE, PromptBank
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
    # Route state made later (index-routes) equals the run's, on a bank whose entries answer with a context.
    old = without_routes(tmp_path / "run" / "bank", tmp_path / "old-bank", ("RTE",))
    assert main(["bank", "index-routes", str(old)]) == 0
    assert (old / "RTE" / ROUTE_FILE).read_bytes() == (tmp_path / "run" / "bank" / "RTE" / ROUTE_FILE).read_bytes()


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


def test_one_registry_serves_the_stream_parser_both_commands_and_the_labels(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    from continual_rpt.strategies import METHODS, REGISTRY, SINGLE_TASK_METHODS, method_label, strategy_class
    from continual_rpt.streams import STRATEGIES

    assert STRATEGIES == tuple(REGISTRY)
    for name in REGISTRY:  # every row names a class that implements the contract
        cls = strategy_class(name)
        assert all(callable(getattr(cls, step, None)) for step in ("learn", "predict", "finish", "context_tasks"))
    stream = load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"]))
    for method in METHODS:  # a method's stream is labelled with that method again
        assert method_label(with_method(stream, method)) == method
    assert SINGLE_TASK_METHODS == ("rpt", "pt", "pt-mlp", "head", "deep-rpt", "deep-pt")
    bad = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], name="bad.yaml", strategy="gem")
    with pytest.raises(ValueError, match="strategy: 'gem' is not one of bank, progressive"):
        load_stream(bad)
    assert main(["train", "--task", "CB", "--method", "progressive", "--out", str(tmp_path / "t")]) == 2
    assert "crpt run STREAM --method progressive" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_baseline_settings_are_stream_keys_with_the_old_values_as_defaults(tmp_path, tiny_bert_dir, superglue_dir):
    from continual_rpt.strategies.avalanche import strategy_options
    from continual_rpt.streams import BaselineConfig

    assert dataclasses.asdict(BaselineConfig()) == {"ewc_lambda": 1000.0, "lwf_alpha": 1.0, "lwf_temperature": 2.0, "replay_mem_size": 200,
                                                     "agem_patterns_per_exp": 100, "agem_sample_size": 64}
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], baseline={"ewc_lambda": 5, "replay_mem_size": 16})
    stream = load_stream(path)
    assert strategy_options("ewc", stream.baseline)[1] == {"ewc_lambda": 5.0}
    assert strategy_options("replay", stream.baseline)[1] == {"mem_size": 16}
    bad = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"], name="bad.yaml", baseline={"replay_mem_size": 0})
    with pytest.raises(ValueError, match=r"baseline\.replay_mem_size: must be at least 1"):
        load_stream(bad)


def test_a_run_folder_written_before_the_baseline_key_still_resumes(tmp_path, tiny_bert_dir, superglue_dir):
    path = write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"])
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    stored = json.loads((out / "stream.json").read_text())
    del stored["baseline"]  # as the previous release wrote it
    (out / "stream.json").write_text(json.dumps(stored))
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["run", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_skipped_rows_are_counted_in_the_runs_log_and_metrics(tmp_path, tiny_bert_dir, superglue_dir, shared_data):
    folder = shared_data / "cl_benchmark" / "NLI" / "MNLI"
    mnli = {"custom": {"name": "mnli", "label_names": ["neutral", "entailment", "contradiction"], "text": "sentence",
                       "train": str(folder / "train.json"), "validation": str(folder / "test.json"), "unknown_labels": "skip"},
            "data": {"max_eval": 40}}
    stream = load_stream(write_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", mnli]))
    metrics = run_stream(stream, tmp_path / "run", progress=False)
    assert metrics["per_task"]["mnli"]["skipped_rows"] == 131 and metrics["per_task"]["CB"]["skipped_rows"] == 0
    assert f"mnli: skipped 131 rows of {folder / 'test.json'} whose label names no class" in (tmp_path / "run" / "log.txt").read_text()
    assert PromptBank.open(tmp_path / "run" / "bank").get("mnli").meta["skipped_rows"] == {str(folder / "test.json"): 131}
