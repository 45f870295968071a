"""Bank entries as PEFT prompt-tuning adapters: exported adapters answer as the entry does under PEFT itself; imports back."""

import json

import pytest
import torch
from test_stream import write_stream

from continual_rpt.backbones import load_backbone
from continual_rpt.bank import BankError, PromptBank
from continual_rpt.cli import main
from continual_rpt.evaluation import autocast, predict_from_bank
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data

peft = pytest.importorskip("peft")  # the `test` extra installs it; the library itself never needs it


def one_task_bank(tmp, backbone_dir, superglue_dir, task="CB"):
    tmp.mkdir(parents=True, exist_ok=True)
    stream = load_stream(write_stream(tmp, backbone_dir, superglue_dir, [task], controls=False))
    run_stream(stream, tmp / "run", progress=False)
    return tmp / "run" / "bank"


@pytest.fixture(scope="module")
def gpt2_bank(tmp_path_factory, tiny_gpt2_dir, superglue_dir):
    return one_task_bank(tmp_path_factory.mktemp("peft-gpt2"), tiny_gpt2_dir, superglue_dir)


def candidate_logp(logits, start, cand):
    """Summed log-probability of the candidate tokens `cand`, the first predicted at position `start - 1` of `logits`."""
    logp = logits.float().log_softmax(-1)
    return sum(float(logp[start - 1 + i, t]) for i, t in enumerate(cand))


def exported(bank, task, backbone_dir, auto, tmp_path, task_type, superglue_dir):
    """Export `task`'s entry, load it with PEFT on a fresh copy of the base; our scores of 4 test examples beside it."""
    assert main(["bank", "export", str(bank), task, "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == task_type
    assert config["num_virtual_tokens"] == 3 and config["token_dim"] == 32 and config["num_transformer_submodules"] == 1
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(backbone_dir), tmp_path / "adapter").eval()
    backbone = load_backbone(str(backbone_dir))
    examples = load_task_data(task, superglue_dir, max_train=1, seed=0).test[:4]
    with torch.no_grad(), autocast(backbone, False):
        ours = backbone.scores(PromptBank.open(bank).get(task).prompt, None, backbone.collate(backbone.featurize(examples, 90)))
    return model, backbone, examples, ours


def test_an_exported_decoder_entry_answers_under_peft_as_in_the_bank(gpt2_bank, tiny_gpt2_dir, tmp_path, superglue_dir):
    from transformers import AutoModelForCausalLM

    model, backbone, examples, ours = exported(gpt2_bank, "CB", tiny_gpt2_dir, AutoModelForCausalLM, tmp_path, "CAUSAL_LM", superglue_dir)
    with torch.no_grad():
        for ex, row in zip(examples, ours):
            context = backbone.tokenizer(ex.source, truncation=True, max_length=90)["input_ids"]
            for j, c in enumerate(ex.candidates):
                cand = backbone.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([context + cand])).logits[0]  # PEFT returns the virtual tokens' positions too
                theirs = candidate_logp(logits, 3 + len(context), cand)
                assert float(row[j]) == pytest.approx(theirs, rel=1e-6, abs=1e-5)  # sums over the candidate's tokens, fp32


def test_an_exported_seq2seq_entry_answers_under_peft_as_in_the_bank(tmp_path, tiny_t5_dir, superglue_dir):
    from transformers import AutoModelForSeq2SeqLM

    bank = one_task_bank(tmp_path, tiny_t5_dir, superglue_dir, "COPA")
    model, backbone, examples, ours = exported(bank, "COPA", tiny_t5_dir, AutoModelForSeq2SeqLM, tmp_path, "SEQ_2_SEQ_LM", superglue_dir)
    with torch.no_grad():
        for ex, row in zip(examples, ours):
            source = backbone.tokenizer(ex.source, truncation=True, max_length=90)["input_ids"]
            for j, c in enumerate(ex.candidates):
                target = backbone.tokenizer(c, truncation=True, max_length=90)["input_ids"]
                logits = model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).logits[0]
                assert float(row[j]) == pytest.approx(candidate_logp(logits, 1, target), rel=1e-6, abs=1e-5)


def test_entries_peft_would_answer_differently_are_refused(tmp_path, tiny_bert_dir, tiny_llama_dir, superglue_dir):
    bert = one_task_bank(tmp_path / "bert", tiny_bert_dir, superglue_dir)
    assert main(["bank", "export", str(bert), "CB", "--out", str(tmp_path / "a")]) == 2
    llama = one_task_bank(tmp_path / "llama", tiny_llama_dir, superglue_dir)
    with pytest.raises(BankError, match="starts every text with BOS"):
        from continual_rpt.peft_format import export_peft

        export_peft(PromptBank.open(llama).get("CB"), "llama/CB", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_adapter_imports_into_a_bank_and_answers_as_before(gpt2_bank, tiny_gpt2_dir, tmp_path, superglue_dir, capsys):
    assert main(["bank", "export", str(gpt2_bank), "CB", "--out", str(tmp_path / "adapter")]) == 0
    assert main(["bank", "import", str(tmp_path / "bank"), str(tmp_path / "adapter"), "--task", "CB", "--name", "CB-peft",
                 "--data-dir", str(superglue_dir), "--max-length", "96"]) == 0
    # The adapter, not the user, chose the model: named before loading (no warning on main).
    assert f"warning: loading backbone {str(tiny_gpt2_dir)!r}, named by the adapter's base_model_name_or_path" in capsys.readouterr().err
    imported, original = PromptBank.open(tmp_path / "bank").get("CB-peft"), PromptBank.open(gpt2_bank).get("CB")
    assert torch.equal(imported.prompt, original.prompt) and imported.route is not None
    assert imported.meta["backbone"]["fingerprint"] == original.meta["backbone"]["fingerprint"]
    backbone = load_backbone(str(tiny_gpt2_dir))
    examples = load_task_data("CB", superglue_dir, max_train=1, seed=0).test[:8]
    assert predict_from_bank(PromptBank.open(tmp_path / "bank"), "CB-peft", examples, backbone) == \
        predict_from_bank(PromptBank.open(gpt2_bank), "CB", examples, backbone)


def test_other_adapters_and_other_bases_are_refused(tmp_path, tiny_gpt2_dir, tiny_t5_dir, gpt2_bank, capsys):
    from transformers import AutoModelForCausalLM

    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
                               peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    lora.save_pretrained(tmp_path / "lora")
    assert main(["bank", "import", str(tmp_path / "bank"), str(tmp_path / "lora"), "--task", "CB"]) == 2
    assert "peft_type 'LORA' is not a prompt-tuning adapter" in capsys.readouterr().err
    assert main(["bank", "export", str(gpt2_bank), "CB", "--out", str(tmp_path / "adapter")]) == 0
    assert main(["bank", "import", str(tmp_path / "bank"), str(tmp_path / "adapter"), "--task", "CB", "--backbone", str(tiny_t5_dir)]) == 2
    assert "a CAUSAL_LM adapter, but backbone" in capsys.readouterr().err
    torch.manual_seed(1)  # the same architecture and tokenizer, other weights
    other = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).config)
    other.save_pretrained(tmp_path / "other-gpt2")
    load_backbone(str(tiny_gpt2_dir)).tokenizer.save_pretrained(tmp_path / "other-gpt2")
    assert main(["bank", "import", str(tmp_path / "bank"), str(tmp_path / "adapter"), "--task", "CB", "--backbone", str(tmp_path / "other-gpt2")]) == 2
    assert "trained on other weights" in capsys.readouterr().err
    assert not (tmp_path / "bank").exists() or PromptBank.open(tmp_path / "bank").tasks() == []
