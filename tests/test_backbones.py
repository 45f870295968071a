"""The backbone registry: supported families load, anything else is refused before its weights load."""

from pathlib import Path

import pytest
import transformers
from transformers import AutoConfig, AutoTokenizer

from continual_rpt.backbones import (
    EMBEDDED, FAMILIES, Backbone, EncoderBackbone, Seq2SeqBackbone, family_for, load_backbone, resolve_backbone,
)

INTERFACE = ("from_pretrained", "featurize", "collate", "loss", "scores", "input_features", "new_head", "max_positions")


def _save_with_tokenizer(model, folder: Path) -> Path:
    """A random model saved next to the embedded MiniLM tokenizer, as a downloaded checkpoint would be."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_backbone(EMBEDDED)).save_pretrained(folder)
    return folder


@pytest.fixture()
def no_weight_loading(monkeypatch):
    """Make any attempt to load model weights fail loudly, so a refusal provably comes first."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the family check")

    for auto in (transformers.AutoModel, transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


def _assert_refused(err: pytest.ExceptionInfo, model_type: str, architecture: str) -> None:
    """The refusal names the type and its architecture, and lists every family with its model types."""
    message = str(err.value)
    assert f"model type {model_type!r}" in message and architecture in message
    assert "supported families" in message
    for key, family in FAMILIES.items():
        assert f"{key} ({', '.join(family.model_types)})" in message


def test_an_unlisted_causal_lm_is_refused_naming_its_type(tmp_path, no_weight_loading):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           max_position_embeddings=64, vocab_size=30522)
    path = _save_with_tokenizer(GPTNeoXForCausalLM(config), tmp_path / "tiny-neox")
    with pytest.raises(ValueError) as err:
        load_backbone(str(path))
    _assert_refused(err, "gpt_neox", "GPTNeoXForCausalLM")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("model_type", ["falcon", "gpt_neox", "bart", "distilbert"])
def test_unlisted_model_types_are_refused(model_type):
    with pytest.raises(ValueError, match=f"model type '{model_type}' is not supported"):
        family_for("x", AutoConfig.for_model(model_type))


def test_a_listed_type_in_the_wrong_shape_is_refused():
    # An encoder-only T5 checkpoint would get a randomly initialised decoder; a decoder BERT a causal mask.
    with pytest.raises(ValueError, match=r"model type 't5' \(T5EncoderModel\)"):
        family_for("x", AutoConfig.for_model("t5", is_encoder_decoder=False, architectures=["T5EncoderModel"]))
    with pytest.raises(ValueError, match="model type 'bert'"):
        family_for("x", AutoConfig.for_model("bert", is_decoder=True))


def test_registry_picks_the_family_from_the_config(tiny_bert_dir, tiny_t5_dir):
    assert family_for("bert", AutoConfig.from_pretrained(tiny_bert_dir)) is EncoderBackbone
    assert family_for("t5", AutoConfig.from_pretrained(tiny_t5_dir)) is Seq2SeqBackbone
    assert family_for(EMBEDDED, AutoConfig.from_pretrained(resolve_backbone(EMBEDDED))) is EncoderBackbone
    bert, t5 = load_backbone(str(tiny_bert_dir)), load_backbone(str(tiny_t5_dir))
    assert isinstance(bert, EncoderBackbone) and bert.family == "encoder"
    assert isinstance(t5, Seq2SeqBackbone) and t5.family == "seq2seq"
    assert t5.tokenizer.tokenize("The premise")[0].startswith("▁")  # a real SentencePiece model, not a stand-in


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_every_family_implements_the_interface(key):
    cls = FAMILIES[key].backbone
    assert issubclass(cls, Backbone) and cls.family == key
    assert not cls.__abstractmethods__
    for name in INTERFACE:
        assert getattr(cls, name) is not getattr(Backbone, name), f"{cls.__name__} inherits {name} unimplemented"
    for model_type in FAMILIES[key].model_types:
        assert AutoConfig.for_model(model_type).model_type == model_type  # a real transformers type, no typo


def test_a_family_missing_a_method_cannot_be_built():
    class Partial(Backbone):
        family = "partial"

    with pytest.raises(TypeError, match="abstract"):
        Partial("x", None, None, "cpu")


def test_families_do_not_share_a_model_type():
    seen = [t for family in FAMILIES.values() for t in family.model_types]
    assert len(seen) == len(set(seen))
