"""The decoder-only family on tiny random GPT-2, Llama, Qwen2, Mistral and Gemma models with byte-level BPE tokenizers trained offline."""

import logging

import pytest
import torch
from test_stream import write_stream

from continual_rpt.backbones import DecoderBackbone, RowPrompts, load_backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import autocast
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data


@pytest.fixture(params=["gpt2", "llama", "qwen2", "mistral", "gemma"])
def decoder(request, tiny_decoder_dir):
    return load_backbone(str(tiny_decoder_dir(request.param)), "auto", "cpu")


def brute_force_scores(backbone, prompt, examples, max_tokens):
    """Each candidate scored by its own full forward over [BOS] P context candidate, no cache, no padding."""
    out = []
    for ex in examples:
        context = backbone.tokenizer(ex.source, truncation=True, max_length=max_tokens)["input_ids"]
        scores = []
        for c in ex.candidates:
            cand = backbone.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            embeds = backbone.embeddings(torch.tensor([context + cand]))
            k = 1 if backbone.bos else 0
            if prompt is not None:
                embeds = torch.cat([embeds[:, :k], prompt.unsqueeze(0), embeds[:, k:]], dim=1)
            logp = backbone.model(inputs_embeds=embeds).logits[0].log_softmax(-1)
            start = embeds.shape[1] - len(cand)
            scores.append(sum(float(logp[start - 1 + i, t]) for i, t in enumerate(cand)))
        out.append(scores)
    return out


def test_decoders_load_as_their_family_and_get_a_pad_token_with_a_note(tiny_gpt2_dir, tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING):
        gpt2 = load_backbone(str(tiny_gpt2_dir))
    assert isinstance(gpt2, DecoderBackbone) and gpt2.family == "decoder" and gpt2.new_head(None) is None
    assert "no pad token" in caplog.text and gpt2.tokenizer.pad_token == "<|endoftext|>"
    assert not gpt2.bos and load_backbone(str(tiny_llama_dir)).bos  # the Llama-style tokenizer starts texts with <s>
    assert gpt2.max_positions == 512


@pytest.mark.parametrize("task", ["CB", "COPA"])
def test_cached_candidate_ranking_equals_one_full_forward_per_candidate(decoder, task, superglue_dir):
    examples = load_task_data(task, superglue_dir, max_train=1, seed=0).test[:6]
    torch.manual_seed(0)
    prompt = torch.randn(4, decoder.width) * 0.1
    expected = brute_force_scores(decoder, prompt, examples, 64)
    with torch.no_grad(), autocast(decoder, False):
        got = decoder.scores(prompt, None, decoder.collate(decoder.featurize(examples, 64)))  # right-padded, one batch
    for row, want in zip(got, expected):
        assert torch.allclose(row[: len(want)], torch.tensor(want), atol=1e-4), (row, want)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral", "gemma", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_every_registered_decoder_type_ranks_from_the_cache_under_the_eager_kernel_too(kind, tiny_decoder_dir, superglue_dir):
    backbone = load_backbone(str(tiny_decoder_dir(kind)), "auto", "cpu", attention="eager")
    assert backbone.model.config.model_type == kind and backbone.model.config._attn_implementation == "eager"
    examples = load_task_data("COPA", superglue_dir, max_train=1, seed=0).test[:4]
    torch.manual_seed(0)
    prompt = torch.randn(4, backbone.width) * 0.1
    expected = brute_force_scores(backbone, prompt, examples, 48)
    with torch.no_grad(), autocast(backbone, False):
        got = backbone.scores(prompt, None, backbone.collate(backbone.featurize(examples, 48)))
    for row, want in zip(got, expected):
        assert torch.allclose(row[: len(want)], torch.tensor(want), atol=1e-4), (kind, row, want)


def test_a_sliding_window_caps_the_input_and_is_never_cut(tiny_decoder_dir, superglue_dir):
    mistral = load_backbone(str(tiny_decoder_dir("mistral")), "auto", "cpu")
    assert mistral.sliding_window == 256 and mistral.max_positions == 256
    assert load_backbone(str(tiny_decoder_dir("qwen2")), "auto", "cpu").sliding_window is None  # named, not used
    mistral.model.config.sliding_window = 24
    examples = load_task_data("COPA", superglue_dir, max_train=1, seed=0).test[:2]
    batch = mistral.collate(mistral.featurize(examples, 20))
    with pytest.raises(ValueError, match="exceed its sliding attention window of 24"), torch.no_grad():
        mistral.scores(torch.zeros(4, mistral.width), None, batch)


def test_a_mixed_batch_gives_each_row_its_own_prompt(decoder, superglue_dir):
    examples = load_task_data("RTE", superglue_dir, max_train=1, seed=0).test[:4]
    batch = decoder.collate(decoder.featurize(examples, 64))
    torch.manual_seed(0)
    short, long = torch.randn(2, decoder.width) * 0.1, torch.randn(5, decoder.width) * 0.1
    with torch.no_grad(), autocast(decoder, False):
        mixed = decoder.scores(RowPrompts.stack([short, long, short, long], decoder.width, decoder.device), None, batch)
        assert torch.allclose(mixed[0::2], decoder.scores(short, None, batch)[0::2], atol=1e-5)
        assert torch.allclose(mixed[1::2], decoder.scores(long, None, batch)[1::2], atol=1e-5)


def test_the_loss_is_the_gold_candidates_token_cross_entropy(decoder, superglue_dir):
    examples = load_task_data("CB", superglue_dir, max_train=1, seed=0).test[:3]
    batch = decoder.collate(decoder.featurize(examples, 64))
    with torch.no_grad(), autocast(decoder, False):
        loss = decoder.loss(None, None, batch)
    gold = [decoder.tokenizer(" " + ex.candidates[ex.label], add_special_tokens=False)["input_ids"] for ex in examples]
    totals = brute_force_scores(decoder, None, examples, 64)
    expected = -sum(t[ex.label] for t, ex in zip(totals, examples)) / sum(map(len, gold))
    assert float(loss) == pytest.approx(expected, abs=1e-4)


def test_a_verbalizer_word_that_tokenizes_to_nothing_is_named(decoder, superglue_dir):
    from tokenizers import normalizers

    ex = load_task_data("CB", superglue_dir, max_train=1, seed=0).test[0]
    decoder.tokenizer.backend_tokenizer.normalizer = normalizers.Strip()  # as SentencePiece tokenizers drop a bare space
    with pytest.raises(ValueError, match=rf"example {ex.uid!r}: candidate '' tokenizes to nothing"):
        decoder.featurize([type(ex)(ex.uid, ex.pairs, ex.source, ("", "no"), 0)], 64)


def test_a_stream_learns_into_a_bank_on_a_decoder(tmp_path, tiny_gpt2_dir, superglue_dir):
    stream = load_stream(write_stream(tmp_path, tiny_gpt2_dir, superglue_dir, ["CB", "COPA"], controls=False))
    metrics = run_stream(stream, tmp_path / "run", progress=False)
    assert metrics["forgetting"] == 0.0 and len(metrics["accuracy_matrix"]) == 2
    bank = PromptBank.open(tmp_path / "run" / "bank")
    entry = bank.get("CB")
    assert entry.head is None and entry.prompt.shape == (3, 32) and entry.meta["backbone"]["family"] == "decoder"
    assert entry.route["mean"].shape == (65,)  # mean hidden state, first tokens (32 each), log length
    assert "task_free_average" in metrics
