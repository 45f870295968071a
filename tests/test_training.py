"""Backbones and the learner on tiny random models and the real embedded MiniLM, real data."""

import dataclasses
import json

import pytest
import torch

from continual_rpt.backbones import EMBEDDED, load_backbone
from continual_rpt.bank import Entry
from continual_rpt.cli import main
from continual_rpt.evaluation import length_batches, predict
from continual_rpt.learner import TrainConfig, build_prompt, make_optimizer, train_step, train_task
from continual_rpt.prompts import PromptConfig
from continual_rpt.strategies.base import measure_test
from continual_rpt.tasks import load_task_data

FAST = TrainConfig(epochs=1, batch_size=8, max_length=128, bf16=False)


def small(data, n_train=24, n_eval=8):
    return dataclasses.replace(data, train=data.train[:n_train], dev=data.dev[:n_eval], test=data.test[:n_eval])


def snapshot(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


@pytest.mark.parametrize("task", ["CB", "COPA"])
def test_entry_reloaded_from_disk_answers_as_the_trained_prompt_and_phi(tiny_bert, superglue_dir, tmp_path, task):
    data = small(load_task_data(task, superglue_dir))
    before = snapshot(tiny_bert)
    prompt = build_prompt(tiny_bert, PromptConfig(n_tokens=4, bottleneck=16, dropout=0.3), seed=0)
    head = tiny_bert.new_head(data.task)
    trainable = {**{f"prompt.{k}": p for k, p in prompt.named_parameters()}, **{f"head.{k}": p for k, p in head.named_parameters()}}
    initial = {k: p.detach().clone() for k, p in trainable.items()}
    optimizer = make_optimizer(prompt, [head], FAST)
    features = tiny_bert.featurize(data.train, 60)
    for start in range(0, len(features), 8):  # real steps: P, Φ (with dropout) and the head move
        applied, loss = train_step(tiny_bert, prompt, head, features[start:start + 8], optimizer, bf16=False)
        assert applied and loss is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())  # only P, Φ and the head
        assert all(p.grad is None and not p.requires_grad for p in tiny_bert.model.parameters())
    assert all(not torch.equal(initial[k], p) for k, p in trainable.items()), "a trainable tensor did not move"
    after = tiny_bert.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical

    Entry(prompt.collapse(), head.state_dict(), {"task": task}, {}, {}).save_pretrained(tmp_path / task)
    stored = Entry.from_pretrained(tmp_path / task)
    stored_head = tiny_bert.new_head(data.task)
    stored_head.load_state_dict(stored.head)
    batch = tiny_bert.collate(tiny_bert.featurize(data.dev, 60))
    prompt.eval()
    head.eval()
    with torch.no_grad():
        live = tiny_bert.scores(prompt(), head, batch)  # the trained (P, Φ), dropout off
        from_disk = tiny_bert.scores(stored.prompt, stored_head, batch)  # P′ as the bank stores it
        p_alone = tiny_bert.scores(prompt.prompt, head, batch)  # what a collapse that skipped Φ would store
    assert torch.equal(live, from_disk)
    assert (live - p_alone).abs().max() > 1e-3, "Φ changes nothing, so this test could not tell P′ from P"


def test_training_touches_only_prompt_phi_and_head(tiny_bert, superglue_dir):
    data = small(load_task_data("CB", superglue_dir))
    before = snapshot(tiny_bert)
    prompt = build_prompt(tiny_bert, PromptConfig(n_tokens=4, bottleneck=16), seed=0)
    head = tiny_bert.new_head(data.task)
    batch = tiny_bert.collate(tiny_bert.featurize(data.train[:8], 60))
    tiny_bert.loss(prompt(), head, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*prompt.parameters(), *head.parameters()])
    assert all(p.grad is None and not p.requires_grad for p in tiny_bert.model.parameters())
    train_task(tiny_bert, data, PromptConfig(n_tokens=4, bottleneck=16), FAST)
    after = tiny_bert.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_prompt_goes_after_cls_and_shifts_real_tokens(tiny_bert, superglue_dir):
    data = small(load_task_data("RTE", superglue_dir))
    batch = tiny_bert.collate(tiny_bert.featurize(data.dev[:2], 60))
    captured = {}
    handle = tiny_bert.model.embeddings.register_forward_hook(lambda m, args, kw, out: captured.update(kw), with_kwargs=True)
    prompt = torch.randn(3, tiny_bert.width)
    tiny_bert.encode(prompt, batch)
    handle.remove()
    embeds = captured["inputs_embeds"]
    assert embeds.shape[1] == batch["input_ids"].shape[1] + 3
    assert torch.equal(embeds[0, 1:4], prompt)
    assert torch.equal(embeds[0, 0], tiny_bert.embeddings(batch["input_ids"][0, :1])[0])


def test_learner_result_and_metrics(tiny_bert, superglue_dir):
    data = small(load_task_data("COPA", superglue_dir))
    prompt_cfg, cfg = PromptConfig(n_tokens=4, bottleneck=16), dataclasses.replace(FAST, epochs=2, head_lr=0.1)
    features = tiny_bert.collate(tiny_bert.featurize(data.train, cfg.max_length - 4))

    def train_loss(prompt, head) -> float:
        with torch.no_grad():
            return float(tiny_bert.loss(prompt, head, features))

    untrained = build_prompt(tiny_bert, prompt_cfg, cfg.seed).collapse()
    torch.manual_seed(cfg.seed)  # the learner's own seeding: the head it starts from
    before = train_loss(untrained, tiny_bert.new_head(data.task))
    result = train_task(tiny_bert, data, prompt_cfg, cfg)
    m = result.metrics
    assert result.prompt.shape == (4, tiny_bert.width) and not result.prompt.requires_grad
    assert m["stored_parameters"] == 4 * tiny_bert.width + tiny_bert.width + 1
    assert m["trainable_parameters"] > m["stored_parameters"]
    assert len(result.history) == 2 and m["dev_score"] == max(h["dev_score"] for h in result.history)
    head = tiny_bert.new_head(data.task)
    head.load_state_dict(result.head)
    # What it learned: the stored prompt and head fit the training rows better than the ones it started from
    # (measured 0.69306 -> 0.69248 on the random model; head_lr 0.1 so that six steps move it). Checked to fail
    # with train_step's optimizer.step() removed and with the loss's gradient ascended instead of descended.
    assert train_loss(result.prompt, head) < before - 1e-4
    # The learner never reads the test split: measure_test measures the stored state, once, with what the prompt adds.
    assert not {"test", "test_score", "test_without_prompt", "test_without_phi"} & set(m)
    untested = train_task(tiny_bert, dataclasses.replace(data, test=[]), prompt_cfg, cfg)
    assert torch.equal(untested.prompt, result.prompt) and untested.metrics["dev_score"] == m["dev_score"]
    measured = measure_test(tiny_bert, data, cfg, result)
    predictions = predict(tiny_bert, result.prompt, head, data.test, 128, bf16=False)
    assert measured.predictions == predictions  # what grids resample for confidence intervals
    assert measured.metrics["test"] == data.task.score(data.test, predictions)
    alone = predict(tiny_bert, None, head, data.test, 128, bf16=False)
    without_phi = predict(tiny_bert, result.uncollapsed, head, data.test, 128, bf16=False)
    assert measured.metrics["test_without_prompt"] == data.task.score(data.test, alone)["score"]
    assert measured.metrics["test_without_phi"] == data.task.score(data.test, without_phi)["score"]
    assert not torch.equal(result.uncollapsed, result.prompt)  # P before Φ, not P′


def test_head_only_control_has_no_prompt(tiny_bert, superglue_dir):
    data = small(load_task_data("CB", superglue_dir))
    result = train_task(tiny_bert, data, PromptConfig(method="head"), FAST)
    assert result.prompt is None and result.metrics["prompt_tokens"] == 0
    assert result.metrics["trainable_parameters"] == result.metrics["stored_parameters"] == 3 * (tiny_bert.width + 1)


@pytest.mark.parametrize("task", ["RTE", "COPA"])
def test_tiny_t5_trains_through_the_seq2seq_path(tiny_t5, superglue_dir, task):
    data = small(load_task_data(task, superglue_dir), n_train=16)
    before = snapshot(tiny_t5)
    cfg = dataclasses.replace(FAST, epochs=3, lr=0.3)
    result = train_task(tiny_t5, data, PromptConfig(n_tokens=4, bottleneck=16), cfg)
    assert result.head is None and result.prompt.shape == (4, tiny_t5.width)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    batch = tiny_t5.collate(tiny_t5.featurize(data.dev, 60))
    with torch.no_grad():
        scores = tiny_t5.scores(result.prompt, None, batch)
    assert scores.shape == (len(data.dev), len(data.dev[0].candidates)) and torch.isfinite(scores).all()
    assert all(torch.equal(before[k], v) for k, v in tiny_t5.model.state_dict().items())


def test_t5_rejects_head_only(tiny_t5, superglue_dir):
    with pytest.raises(ValueError, match="encoder backbone"):
        train_task(tiny_t5, small(load_task_data("CB", superglue_dir)), PromptConfig(method="head"), FAST)


def test_length_batches_cover_everything_once(tiny_bert, superglue_dir):
    features = tiny_bert.featurize(load_task_data("RTE", superglue_dir).train[:300], 120)
    batches = length_batches(features, 16, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(300))
    padded = sum(len(b) * max(features[i].length for i in b) for b in batches)
    assert sum(f.length for f in features) / padded > 0.9  # bucketing keeps padding small


def test_embedded_minilm_learns_real_cb(superglue_dir):
    backbone = load_backbone(EMBEDDED)
    data = load_task_data("CB", superglue_dir, max_train=96, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=16, max_length=128, patience=0)
    result = train_task(backbone, data, PromptConfig(n_tokens=10), cfg)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.9
    assert result.metrics["dev_score"] > 40  # majority class on the dev half is 50 acc / ~22 F1


def test_crpt_train_writes_the_entry(tiny_bert_dir, superglue_dir, tmp_path):
    out = tmp_path / "cb"
    argv = ["train", "--task", "CB", "--data-dir", str(superglue_dir), "--backbone", str(tiny_bert_dir), "--max-train", "16",
            "--epochs", "1", "--n-tokens", "3", "--bottleneck", "8", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "entry.json", "head.safetensors", "metrics.json", "prompt.safetensors", "route.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"dev_score", "test", "trainable_parameters", "stored_parameters", "wall_seconds", "train_examples_per_second"} <= metrics.keys()
    config = json.loads((out / "config.json").read_text())
    entry = json.loads((out / "entry.json").read_text())
    assert config["prompt"]["n_tokens"] == 3 and config["data"]["max_train"] == 16 and entry["task"] == "CB"
    assert entry["backbone"]["width"] == 32 and len(entry["backbone"]["fingerprint"]) == 64


def test_crpt_train_reports_bad_input(superglue_dir, tmp_path, capsys):
    assert main(["train", "--task", "BoolQ", "--data-dir", str(superglue_dir), "--out", str(tmp_path / "x")]) == 2
    assert "BoolQ/train.jsonl" in capsys.readouterr().err
    assert main(["train", "--task", "CB", "--data-dir", str(superglue_dir), "--method", "lora", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_separate_learning_rates_and_the_warmup_decay_schedule(tiny_bert):
    from continual_rpt.learner import make_schedule

    prompt = build_prompt(tiny_bert, PromptConfig(n_tokens=4, bottleneck=8), seed=0)
    head = torch.nn.Linear(tiny_bert.width, 3)
    cfg = TrainConfig(lr=0.3, phi_lr=0.01, head_lr=0.002, warmup=0.25, decay="linear")
    optimizer = make_optimizer(prompt, [head], cfg)
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
    phi = {id(p) for p in prompt.parameters()} - {id(prompt.prompt)}
    assert groups == [(0.3, {id(prompt.prompt)}), (0.01, phi), (0.002, {id(p) for p in head.parameters()})]
    assert [g["lr"] for g in make_optimizer(prompt, [head], TrainConfig(lr=0.3)).param_groups] == [0.3, 0.3, 1e-3]  # phi_lr 0: lr
    schedule = make_schedule(optimizer, cfg, total_steps=8)  # 2 warm-up steps, then down to 0 at step 8
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.3 * f for f in (1 / 3, 2 / 3, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])
    with pytest.raises(ValueError, match="warmup: must be a fraction"):
        TrainConfig(warmup=1.0)
    with pytest.raises(ValueError, match="decay: 'cosine' is not one of none, linear"):
        TrainConfig(decay="cosine")
