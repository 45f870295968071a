"""Deep prompts (deep-rpt, deep-pt): a collapsed prompt at every layer, on all three families."""

import pytest
import torch
from test_stream import write_stream

from continual_rpt.backbones import RowPrompts, load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import autocast, bank_option_scores, load_answerer, option_scores, predict_from_bank
from continual_rpt.learner import build_prompt
from continual_rpt.prompts import PromptConfig
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data


@pytest.fixture(params=["bert", "t5", "gpt2"])
def backbone(request, tiny_bert_dir, tiny_t5_dir, tiny_gpt2_dir):
    return load_backbone(str({"bert": tiny_bert_dir, "t5": tiny_t5_dir, "gpt2": tiny_gpt2_dir}[request.param]), "auto", "cpu")


def scored(backbone, prompt, examples, head=None):
    with torch.no_grad(), autocast(backbone, False):
        return backbone.scores(prompt, head, backbone.collate(backbone.featurize(examples, 64)))


def test_a_deep_prompt_has_one_slice_per_layer_through_one_shared_phi(backbone):
    deep = build_prompt(backbone, PromptConfig(method="deep-rpt", n_tokens=3, bottleneck=8), seed=0)
    shallow = build_prompt(backbone, PromptConfig(method="rpt", n_tokens=3, bottleneck=8), seed=0)
    assert deep().shape == (backbone.depth, 3, backbone.width) == deep.collapse().shape
    assert deep.trainable_parameters() - shallow.trainable_parameters() == (backbone.depth - 1) * 3 * backbone.width
    assert deep.stored_parameters() == backbone.depth * 3 * backbone.width  # Φ is shared: it does not grow with the layers


def test_per_layer_phi_and_layer_embedding_options(tiny_bert):
    base = dict(method="deep-rpt", n_tokens=3, bottleneck=8)
    shared = build_prompt(tiny_bert, PromptConfig(**base), seed=0)
    per_layer = build_prompt(tiny_bert, PromptConfig(**base, per_layer=True), seed=0)
    phi = shared.trainable_parameters() - shared.prompt.numel()
    assert per_layer.trainable_parameters() - per_layer.prompt.numel() == tiny_bert.depth * phi
    with torch.no_grad():  # layer l goes through network l alone: change network 1, and only layer 1 moves
        before = per_layer.collapse()
        per_layer.blocks[0].w2[1] += torch.randn_like(per_layer.blocks[0].w2[1])  # not constant: the LayerNorm would remove it
        after = per_layer.collapse()
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])

    embedded = build_prompt(tiny_bert, PromptConfig(**base, layer_embedding=True), seed=0)
    assert embedded.trainable_parameters() == shared.trainable_parameters() + tiny_bert.depth * tiny_bert.width
    assert torch.equal(embedded.collapse(), shared.collapse())  # zero at the start: the shared Φ's prompt exactly
    with torch.no_grad():
        embedded.layer_embedding[1] += 0.5
    expected = shared.blocks[0](shared.prompt[1] + 0.5)
    assert torch.allclose(embedded.collapse()[1], expected) and torch.equal(embedded.collapse()[0], shared.collapse()[0])
    with pytest.raises(ValueError, match="per_layer: applies to deep-rpt"):
        PromptConfig(method="rpt", per_layer=True)
    with pytest.raises(ValueError, match="layer_embedding: applies to deep-rpt"):
        PromptConfig(method="deep-pt", layer_embedding=True)


def test_later_layers_read_the_deep_prompt_and_the_hooks_go_away(backbone, superglue_dir):
    examples = load_task_data("RTE", superglue_dir, max_train=1, seed=0).test[:3]
    head = backbone.new_head(load_task_data("RTE", superglue_dir, max_train=1, seed=0).task)
    torch.manual_seed(0)
    deep = torch.randn(backbone.depth, 3, backbone.width)
    before = scored(backbone, deep[0], examples, head)
    with_deep = scored(backbone, deep, examples, head)
    assert not torch.allclose(before, with_deep)  # layers ≥ 1 see P′[l], not what the layer before wrote
    assert torch.equal(scored(backbone, deep[0], examples, head), before)  # no hook left behind
    changed = deep.clone()
    changed[-1] = torch.randn(3, backbone.width)  # not a constant shift: a pre-LN layer's LayerNorm would remove it
    assert not torch.allclose(scored(backbone, changed, examples, head), with_deep)  # the last layer's slice is read too


def test_a_mixed_batch_of_deep_and_shallow_rows_equals_each_alone(backbone, superglue_dir):
    data = load_task_data("RTE", superglue_dir, max_train=1, seed=0)
    examples, head = data.test[:4], backbone.new_head(data.task)
    torch.manual_seed(0)
    deep, shallow = torch.randn(backbone.depth, 2, backbone.width), torch.randn(4, backbone.width)
    batch = backbone.collate(backbone.featurize(examples, 64))
    heads = None if head is None else [head] * 4
    with torch.no_grad(), autocast(backbone, False):
        mixed = backbone.scores(RowPrompts.stack([deep, shallow, deep, shallow], backbone.width, backbone.device), heads, batch)
        assert torch.allclose(mixed[0::2], backbone.scores(deep, head, batch)[0::2], atol=1e-5)
        assert torch.allclose(mixed[1::2], backbone.scores(shallow, head, batch)[1::2], atol=1e-5)


def test_deep_training_moves_only_the_prompt_phi_and_head(tiny_bert_dir, superglue_dir):
    backbone = load_backbone(str(tiny_bert_dir))
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    data = load_task_data("CB", superglue_dir, max_train=8, seed=0)
    prompt = build_prompt(backbone, PromptConfig(method="deep-rpt", n_tokens=3, bottleneck=8), seed=0)
    head = backbone.new_head(data.task)
    loss = backbone.loss(prompt(), head, backbone.collate(backbone.featurize(data.train, 64)))
    loss.backward()
    assert prompt.prompt.grad is not None and prompt.prompt.grad[1:].abs().sum() > 0  # later layers learn
    assert all(p.grad is not None for p in prompt.parameters()) and all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_deep_stream_collapses_into_the_bank_and_answers_from_it(family, tmp_path, tiny_bert_dir, tiny_gpt2_dir, superglue_dir):
    backbone_dir = tiny_bert_dir if family == "bert" else tiny_gpt2_dir
    stream = load_stream(write_stream(tmp_path, backbone_dir, superglue_dir,
                                      ["CB", {"task": "COPA", "prompt": {"method": "deep-pt"}}], prompt={"method": "deep-rpt",
                                                                                                        "n_tokens": 3, "bottleneck": 8},
                                      controls=False))
    metrics = run_stream(stream, tmp_path / "run", progress=False)
    assert metrics["forgetting"] == 0.0
    bank = PromptBank.open(tmp_path / "run" / "bank")
    backbone = load_backbone(str(backbone_dir))
    entry = bank.get("CB")
    assert entry.prompt.shape == (backbone.depth, 3, backbone.width) and entry.meta["prompt_shape"] == [backbone.depth, 3, backbone.width]
    assert entry.metrics["stored_parameters"] == backbone.depth * 3 * backbone.width + (0 if entry.head is None else
                                                                                       sum(v.numel() for v in entry.head.values()))
    # The collapsed P′ answers as (P, Φ) did: the stored test score is reproduced from the bank.
    data = load_task_data("CB", superglue_dir, max_train=16, seed=0)
    a = load_answerer(bank, "CB", backbone)
    with torch.no_grad():
        aware = [int(s.argmax()) for s in option_scores(backbone, a.prompt, a.head, backbone.featurize(data.test, 96 - 3), bf16=False)]
    assert data.task.score(data.test, aware)["score"] == pytest.approx(metrics["accuracy_matrix"][1][0])
    copa = load_task_data("COPA", superglue_dir, max_train=1, seed=0).test[:3]
    mixed = bank_option_scores(bank, data.test[:3] + copa, ["CB"] * 3 + ["COPA"] * 3, backbone)  # one deep-rpt, one deep-pt entry
    assert [int(s.argmax()) for s in mixed] == aware[:3] + predict_from_bank(bank, "COPA", copa, backbone)
