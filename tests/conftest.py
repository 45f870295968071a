"""Shared fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark data folder (shared/data next to the repo, or $CRPT_SHARED_DATA)."""
    path = Path(os.environ.get("CRPT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared benchmark data not found at {path}; set CRPT_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def superglue_dir(shared_data) -> Path:
    """The official SuperGLUE jsonl folder."""
    return shared_data / "superglue"


def _save_tiny(model, folder: Path) -> Path:
    """A randomly initialised model saved next to the embedded MiniLM's real WordPiece tokenizer."""
    from transformers import AutoTokenizer

    from continual_rpt.backbones import EMBEDDED, resolve_backbone

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_backbone(EMBEDDED)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return _save_tiny(BertModel(config), tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, superglue_dir) -> Path:
    """A 2-layer, 32-wide T5 with random weights and a SentencePiece unigram tokenizer (1,000 pieces + 100 sentinels)
    trained here on SuperGLUE text, loaded by transformers' T5Tokenizer as a real T5 checkpoint's would be."""
    import io

    import sentencepiece
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    folder = tmp_path_factory.mktemp("tiny-t5")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_superglue_texts(superglue_dir)), model_writer=model,
                                             vocab_size=1000, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             character_coverage=1.0, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_bert(tiny_bert_dir):
    """A fresh frozen tiny BERT backbone."""
    from continual_rpt.backbones import load_backbone

    return load_backbone(str(tiny_bert_dir))


@pytest.fixture()
def tiny_t5(tiny_t5_dir):
    """A fresh frozen tiny T5 backbone."""
    from continual_rpt.backbones import load_backbone

    return load_backbone(str(tiny_t5_dir))


def _superglue_texts(superglue_dir: Path) -> list[str]:
    """The text fields of 400 training rows each of CB, RTE, COPA and WiC: what the test tokenizers are trained on."""
    import json

    texts = []
    for task in ("CB", "RTE", "COPA", "WiC"):
        for line in (superglue_dir / task / "train.jsonl").read_text().splitlines()[:400]:
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def _bpe_tokenizer(superglue_dir: Path, bos: bool):
    """A byte-level BPE (vocabulary 1,000) trained here on SuperGLUE text: GPT-2's kind, and with `bos` Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _superglue_texts(superglue_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    extra = {"bos_token": "<s>"} if bos else {"bos_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra)


def _tiny_decoder(tmp_path_factory, superglue_dir, kind: str) -> Path:
    """A 2-layer, 32-wide decoder of `kind` with random weights and a byte-level BPE trained offline.

    GPT-2, Qwen and OLMo tokenizers add no BOS; Llama, Mistral, Gemma and Phi-3 ones start every text with <s>.
    GPT-2's has no pad token (the backbone assigns one with a note).
    """
    import torch
    import transformers as hf

    small = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=0)
    models = {  # grouped KV heads, RoPE, and each family's own twist: Mistral's sliding window, Gemma's scaled embeddings
        "gpt2": (hf.GPT2LMHeadModel, hf.GPT2Config(vocab_size=1000, n_positions=512, n_embd=32, n_layer=2, n_head=2), False),
        "llama": (hf.LlamaForCausalLM, hf.LlamaConfig(**small), True),
        "qwen2": (hf.Qwen2ForCausalLM, hf.Qwen2Config(**small), False),
        "mistral": (hf.MistralForCausalLM, hf.MistralConfig(**small, sliding_window=256), True),
        "gemma": (hf.GemmaForCausalLM, hf.GemmaConfig(**small, head_dim=8), True),
        "qwen3": (hf.Qwen3ForCausalLM, hf.Qwen3Config(**small, head_dim=8), False),  # q/k norms
        "gemma2": (hf.Gemma2ForCausalLM, hf.Gemma2Config(**small, head_dim=8, sliding_window=256), True),  # soft-capped logits
        "gemma3_text": (hf.Gemma3ForCausalLM, hf.Gemma3TextConfig(**small, head_dim=8, sliding_window=256), True),
        "phi3": (hf.Phi3ForCausalLM, hf.Phi3Config(**small, pad_token_id=0), True),  # fused qkv projection
        "olmo2": (hf.Olmo2ForCausalLM, hf.Olmo2Config(**small, pad_token_id=0), False),
    }
    cls, config, bos = models[kind]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    cls(config).save_pretrained(folder)
    _bpe_tokenizer(superglue_dir, bos=bos).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory, superglue_dir):
    """`tiny_decoder_dir(kind)`: the folder of a tiny random decoder of that kind, built once per session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = _tiny_decoder(tmp_path_factory, superglue_dir, kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_decoder_dir) -> Path:
    """A tiny random GPT-2 (no pad token, no BOS added)."""
    return tiny_decoder_dir("gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_decoder_dir) -> Path:
    """A tiny random Llama (RoPE, grouped KV heads) whose tokenizer starts every text with BOS."""
    return tiny_decoder_dir("llama")
