"""Mixed-task batches: one forward pass over rows of different tasks, each with its own P′ and head."""

import pytest
import torch
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import autocast, bank_option_scores, load_answerer, option_scores
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data

TASKS = ["CB", "COPA", "RTE"]


def mixed_bank(tmp, backbone_dir, superglue_dir, **extra):
    """A three-task bank, plus `CB-short`: CB's head with a 1-token prompt, so entries differ in n."""
    stream = load_stream(write_stream(tmp, backbone_dir, superglue_dir, TASKS, **extra))
    run_stream(stream, tmp / "run", progress=False)
    bank = PromptBank.open(tmp / "run" / "bank")
    cb = bank.get("CB")
    cb.prompt = cb.prompt[:1].clone()
    bank.add("CB-short", cb)
    return bank


def interleaved(superglue_dir, per_task=12):
    """Test examples of CB, COPA, RTE and CB again (for CB-short), dealt round-robin so no two neighbours share a task."""
    data = {name: load_task_data(name, superglue_dir, max_train=1, seed=0).test[:per_task] for name in TASKS}
    examples, tasks = [], []
    for i in range(per_task):
        for name, source in [("CB", "CB"), ("COPA", "COPA"), ("RTE", "RTE"), ("CB-short", "CB")]:
            examples.append(data[source][i])
            tasks.append(name)
    return examples, tasks


def per_task_scores(bank, examples, tasks, backbone, bf16):
    """The one-task path: every task's rows alone, its prompt shared by the whole batch."""
    out = [None] * len(examples)
    for name in dict.fromkeys(tasks):
        a = load_answerer(bank, name, backbone)
        mine = [i for i, t in enumerate(tasks) if t == name]
        max_length = a.entry.config["train"]["max_length"] - a.prompt.shape[0]
        for i, s in zip(mine, option_scores(backbone, a.prompt, a.head, backbone.featurize([examples[i] for i in mine], max_length), bf16=bf16)):
            out[i] = s
    return out


def finite(scores):
    return scores[torch.isfinite(scores)]


@pytest.fixture(scope="module")
def bert_bank(tmp_path_factory, tiny_bert_dir, superglue_dir):
    return mixed_bank(tmp_path_factory.mktemp("mixed-bert"), tiny_bert_dir, superglue_dir)


def test_mixed_batches_equal_the_one_task_path_in_fp32(bert_bank, tiny_bert_dir, superglue_dir):
    backbone = load_backbone(str(tiny_bert_dir), "auto", "cpu")
    examples, tasks = interleaved(superglue_dir)
    mixed = bank_option_scores(bert_bank, examples, tasks, backbone, batch_size=16)
    alone = per_task_scores(bert_bank, examples, tasks, backbone, bf16=False)
    # Not bit for bit: a row's fp32 sums depend on what else is in its batch (padding, batch size) on any path;
    # the one-task path itself moves by ~1e-7 between batch sizes 64 and 1. Same predictions, and ulp-sized gaps.
    for i, (m, a) in enumerate(zip(mixed, alone)):
        assert torch.allclose(finite(m), finite(a), atol=1e-6, rtol=0), f"row {i} ({tasks[i]})"
        assert int(m.argmax()) == int(a.argmax())
    # A classification row has as many scores as labels, a choice row as many as candidates: nothing leaks across tasks.
    assert all(finite(m).numel() == (2 if t == "COPA" else 3 if t.startswith("CB") else 2) for m, t in zip(mixed, tasks))
    # The short prompt is really in use: CB-short answers CB's rows differently from CB.
    assert any(not torch.equal(mixed[i], mixed[i + 3]) for i in range(0, len(tasks), 4))


def test_a_one_task_batch_through_the_mixed_path_is_bit_identical(bert_bank, tiny_bert_dir, superglue_dir):
    # What the bank's task-aware predictions (and every stored score) go through: unchanged to the bit.
    backbone = load_backbone(str(tiny_bert_dir), "auto", "cpu")
    examples, tasks = interleaved(superglue_dir)
    for name in ["CB", "COPA", "CB-short"]:
        mine = [ex for ex, t in zip(examples, tasks) if t == name]
        through_mixed = bank_option_scores(bert_bank, mine, [name] * len(mine), backbone)
        alone = per_task_scores(bert_bank, mine, [name] * len(mine), backbone, bf16=False)
        assert all(torch.equal(m, a) for m, a in zip(through_mixed, alone))


def test_mixed_batches_in_bf16_stay_within_rounding_of_the_one_task_path(bert_bank, tiny_bert_dir, superglue_dir):
    backbone = load_backbone(str(tiny_bert_dir), "auto", "cpu")
    examples, tasks = interleaved(superglue_dir)
    answerers = {name: load_answerer(bert_bank, name, backbone) for name in dict.fromkeys(tasks)}
    from continual_rpt.evaluation import mixed_option_scores

    names = list(answerers)
    features = []
    for ex, t in zip(examples, tasks):
        features += backbone.featurize([ex], answerers[t].entry.config["train"]["max_length"] - answerers[t].prompt.shape[0])
    mixed = mixed_option_scores(backbone, list(answerers.values()), [names.index(t) for t in tasks], features, batch_size=16, bf16=True)
    alone = per_task_scores(bert_bank, examples, tasks, backbone, bf16=True)
    for m, a in zip(mixed, alone):
        assert torch.allclose(finite(m), finite(a), atol=0.05, rtol=0.02)  # bf16 keeps 8 bits of mantissa


def test_mixed_batches_on_t5_equal_the_one_task_path(tmp_path, tiny_t5_dir, superglue_dir):
    bank = mixed_bank(tmp_path, tiny_t5_dir, superglue_dir)
    backbone = load_backbone(str(tiny_t5_dir), "auto", "cpu")
    examples, tasks = interleaved(superglue_dir, per_task=6)
    mixed = bank_option_scores(bank, examples, tasks, backbone, batch_size=8)
    alone = per_task_scores(bank, examples, tasks, backbone, bf16=False)
    for i, (m, a) in enumerate(zip(mixed, alone)):
        assert torch.allclose(finite(m), finite(a), atol=1e-5, rtol=1e-5), f"row {i} ({tasks[i]})"


def test_masked_prompt_slots_change_nothing_on_the_real_minilm(superglue_dir):
    # Positions renumbered around the masked slots: a 2-token prompt behind 6 masked slots reads as the 2-token prompt.
    from continual_rpt.backbones import RowPrompts

    backbone = load_backbone("embedded", "auto", "cpu")
    examples = load_task_data("RTE", superglue_dir, max_train=1, seed=0).test[:4]
    batch = backbone.collate(backbone.featurize(examples, 64))
    torch.manual_seed(0)
    short, long = torch.randn(2, backbone.width) * 0.5, torch.randn(8, backbone.width) * 0.5
    with torch.no_grad(), autocast(backbone, False):
        alone = backbone.encode(short, batch)
        rows = RowPrompts.stack([short, long, short, long], backbone.width, backbone.device)
        mixed = backbone.encode(rows, batch)
        assert torch.allclose(mixed[0::2], alone[0::2], atol=1e-5)
        assert torch.allclose(mixed[1::2], backbone.encode(long, batch)[1::2], atol=1e-5)
