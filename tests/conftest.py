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
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide T5 with random weights (the WordPiece tokenizer stands in for SentencePiece)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)
    return _save_tiny(T5ForConditionalGeneration(config), tmp_path_factory.mktemp("tiny-t5"))


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
