"""The command line on HfArgumentParser, and the everyday bank steps: `crpt bank add`, `predict --no-bf16`, stored backbone paths.

The help is read as a person reads it (the text `crpt … --help` prints); the configs `crpt train`
resolves are checked without training; `bank add` takes a real `crpt train --out` folder of a
tiny model from tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch

from continual_rpt.backbones import BackboneConfig
from continual_rpt.cli import build_parser, main
from continual_rpt.learner import TrainConfig
from continual_rpt.prompts import PromptConfig
from continual_rpt.recipes import RECIPES
from continual_rpt.streams import DataConfig

CONFIGS = (DataConfig, BackboneConfig, PromptConfig, TrainConfig)


def help_entries(argv: list[str], capsys) -> dict[tuple[str, ...], str]:
    """The option entries of `crpt ARGV --help`: each entry's option strings -> its help text, whitespace joined."""
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    body = text[text.index("\n\n"):]  # past the usage lines, which name every option again
    entries, current = [], None
    for line in body.splitlines():
        head = re.match(r"  (-[^ ].*?)(?:  +(.*))?$", line)
        if head:
            options = tuple(re.findall(r"(?:^|, )(--?[\w-]+)", head.group(1)))
            current = [options, head.group(2) or ""]
            entries.append(current)
        elif current and line.startswith("    "):
            current[1] += " " + line.strip()
        else:
            current = None
    return {options: help_text for options, help_text in entries}


def commands(parser=None, prefix=()):
    """Every command path of the parser: (), ("train",), ("bank", "ls"), …"""
    import argparse

    parser = parser or build_parser()
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))


def test_every_help_lists_each_option_once(capsys):
    paths = list(commands())
    assert ("bank", "add") in paths and ("train",) in paths
    for path in paths:
        entries = help_entries(list(path), capsys)
        strings = [s for options in entries for s in options]
        assert len(strings) == len(set(strings)), f"crpt {' '.join(path)} --help lists an option twice: {strings}"
        assert all(entries.values()), f"crpt {' '.join(path)} --help has an option without help: {entries}"


def test_train_help_lists_every_config_field_once_with_its_help(capsys):
    # Checked to fail with HfArgumentParser's own options (--bf16 and --no_bf16 as two entries, --head_lr as well
    # as --head-lr) and when a dataclass's options are left out of `crpt train`.
    entries = help_entries(["train"], capsys)
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            mine = [(options, text) for options, text in entries.items()
                    if any(o.removeprefix("--").removeprefix("no-").replace("_", "-") == flag[2:] for o in options)]
            assert len(mine) == 1, f"{cls.__name__}.{field.name}: {len(mine)} entries in crpt train --help: {mine}"
            options, text = mine[0]
            assert options == ((flag, "--no-" + flag[2:]) if bool in (typing.get_args(hints[field.name]) or (hints[field.name],)) else (flag,)), options
            assert " ".join(field.metadata["help"].split()) in text, (field.name, text)
            assert "(default:" in text


def test_an_option_not_given_leaves_the_recipe_and_the_defaults(superglue_dir):
    # Checked to fail with options that default to the dataclass's value (an unset --head-lr would read 1e-3 and
    # hide the embedded recipe's 1e-2), and with a given option losing to the recipe.
    from continual_rpt.cli_args import train_configs

    recipe = RECIPES["embedded"]["train"]
    parser = build_parser()
    args = parser.parse_args(["train", "--task", "cb", "--out", "x"])
    for cls in CONFIGS:
        assert not any(hasattr(args, f.name) for f in dataclasses.fields(cls))  # unset, not the default
    backbone, spec = train_configs(args)
    assert backbone == BackboneConfig() and spec.task == "CB"
    assert spec.train == TrainConfig(**recipe) and spec.prompt == PromptConfig() and spec.data == DataConfig()

    args = parser.parse_args(["train", "--task", "CB", "--out", "x", "--head-lr", "0.05", "--no-layer-norm", "--per-token",
                              "--epochs", "2", "--data-dir", str(superglue_dir)])
    _, spec = train_configs(args)
    assert spec.train == TrainConfig(**{**recipe, "head_lr": 0.05, "epochs": 2})  # given over the recipe; phi_lr the recipe's
    assert spec.prompt == PromptConfig(layer_norm=False, per_token=True)
    assert spec.data == DataConfig(data_dir=str(superglue_dir))
    _, spec = train_configs(parser.parse_args(["train", "--task", "CB", "--out", "x", "--no-per-token", "--bf16"]))
    assert spec.prompt.per_token is False and spec.train.bf16 is True

    from continual_rpt.cli_args import config_from_args
    from continual_rpt.serving.limits import Limits

    assert config_from_args(Limits, parser.parse_args(["serve", "b", "--max-batch", "8"])) == Limits(max_batch=8)  # crpt serve's too


def test_a_bad_option_value_is_one_line_exit_2(capsys):
    # Passes on main too: guards that the type HfArgumentParser reads from the hint reaches argparse (checked to fail
    # with the `type` keyword dropped in cli_args, where 'fast' reached TrainConfig as a string).
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "CB", "--out", "x", "--head-lr", "fast"])
    assert stop.value.code == 2 and "--head-lr: invalid float value: 'fast'" in capsys.readouterr().err


def train_entry(out, backbone: str, superglue_dir, *extra: str) -> None:
    """A real `crpt train --out` of CB on a tiny model: a few rows, one epoch."""
    assert main(["train", "--task", "CB", "--out", str(out), "--backbone", backbone, "--data-dir", str(superglue_dir),
                 "--max-train", "8", "--max-eval", "16", "--epochs", "1", "--n-tokens", "2", "--bottleneck", "4",
                 "--max-length", "64", "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """A `crpt train --out` folder, trained in bf16 from another working directory with a relative --backbone."""
    out = tmp_path_factory.mktemp("trained") / "cb"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_bert_dir.parent)
        train_entry(out, tiny_bert_dir.name, superglue_dir, "--bf16")
    return out


def test_a_relative_backbone_is_stored_absolute_and_loads_from_anywhere(trained, tiny_bert_dir, superglue_dir, tmp_path,
                                                                         monkeypatch, capsys):
    # Fails on main: entry.json and config.json recorded "tiny-bert0", which no other working directory can load.
    from continual_rpt.bank import Entry

    entry = Entry.from_pretrained(trained)
    assert entry.meta["backbone"]["name"] == entry.config["backbone"]["backbone"] == str(tiny_bert_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["bank", "add", "bank", str(trained)]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(line + "\n" for line in (superglue_dir / "CB" / "val.jsonl").read_text().splitlines()[:4]))
    capsys.readouterr()
    assert main(["bank", "predict", "bank", "CB", "--input", str(rows)]) == 0
    assert sum(line.startswith('{"uid": "CB/rows/') for line in capsys.readouterr().out.splitlines()) == 4
    from continual_rpt.backbones import BackboneConfig
    assert BackboneConfig(backbone="embedded").backbone == "embedded" and BackboneConfig(backbone="no/such-id").backbone == "no/such-id"


def test_bank_add_stores_a_trained_folder_and_refuses_what_import_refuses(trained, tmp_path, capsys):
    # Fails on main: no `crpt bank add` (exit 2, invalid choice).
    from continual_rpt.bank import Entry, PromptBank

    bank = tmp_path / "bank"
    assert main(["bank", "add", str(bank), str(trained)]) == 0
    assert "added CB to" in capsys.readouterr().out
    stored, source = PromptBank.open(bank).get("CB"), Entry.from_pretrained(trained)
    assert torch.equal(stored.prompt, source.prompt) and stored.config == source.config and stored.metrics == source.metrics
    assert all(torch.equal(stored.head[k], source.head[k]) for k in source.head) and stored.route is not None
    listing = (bank / "bank.json").read_bytes()

    assert main(["bank", "add", str(bank), str(trained)]) == 2  # the same name again
    assert "already has an entry for 'CB'; entries are never overwritten" in capsys.readouterr().err
    assert (bank / "bank.json").read_bytes() == listing
    assert main(["bank", "add", str(bank), str(trained), "--name", "CB-again"]) == 0
    assert PromptBank.open(bank).tasks() == ["CB", "CB-again"] and PromptBank.open(bank).get("CB-again").meta["name"] == "CB-again"

    other = tmp_path / "notes"  # a folder that is not a bank
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["bank", "add", str(other), str(trained)]) == 2
    assert "is not a prompt bank (no bank.json) and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]
    assert main(["bank", "add", str(tmp_path / "new"), str(other)]) == 2  # not an entry folder
    assert "is not a bank entry" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_predict_no_bf16_scores_in_fp32(trained, tiny_bert_dir, superglue_dir, tmp_path, capsys):
    # Fails on main: no --no-bf16 (exit 2); with the option ignored, routing_score (the confidence router's, from the
    # answer scores) would come out identical.
    import json

    from continual_rpt.backbones import load_backbone
    from continual_rpt.bank import PromptBank
    from continual_rpt.evaluation import bank_option_scores, predict_from_bank
    from continual_rpt.tasks import load_task_data

    bank = tmp_path / "bank"
    assert main(["bank", "add", str(bank), str(trained)]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(line + "\n" for line in (superglue_dir / "CB" / "val.jsonl").read_text().splitlines()[:12]))
    answers = {}
    for precision in ("--bf16", "--no-bf16"):
        capsys.readouterr()
        assert main(["bank", "predict", str(bank), "--input", str(rows), "--router", "confidence", precision]) == 0
        answers[precision] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["prediction"] for a in answers["--bf16"]] == [a["prediction"] for a in answers["--no-bf16"]]
    assert [a["routing_score"] for a in answers["--bf16"]] != [a["routing_score"] for a in answers["--no-bf16"]]

    opened, backbone = PromptBank.open(bank), load_backbone(str(tiny_bert_dir))
    examples = load_task_data("CB", superglue_dir, max_train=1, seed=0).test[:12]
    half, full = (torch.stack(bank_option_scores(opened, examples, ["CB"] * 12, backbone, bf16=b)) for b in (True, False))
    assert not torch.equal(half, full) and torch.allclose(half, full, atol=0.05)  # bf16 rounding, nothing more
    assert predict_from_bank(opened, "CB", examples, backbone, bf16=False) == full.argmax(1).tolist() == half.argmax(1).tolist()
    assert main(["bank", "predict", str(bank), "CB", "--input", str(rows), "--no-bf16", "--server", "http://127.0.0.1:9"]) == 2


def test_an_entry_imported_from_peft_is_scored_in_fp32(tiny_gpt2_dir, superglue_dir, tmp_path):
    # Fails on main: the imported entry's config said nothing of bf16, so it was scored (and its route state built) in bf16.
    import json

    from safetensors.torch import save_file

    from continual_rpt.backbones import load_backbone
    from continual_rpt.bank import PromptBank
    from continual_rpt.evaluation import bank_option_scores, option_scores
    from continual_rpt.tasks import load_task_data

    adapter = tmp_path / "adapter"  # a PEFT prompt-tuning adapter as PeftModel.save_pretrained writes it
    adapter.mkdir()
    torch.manual_seed(0)
    save_file({"prompt_embeddings": torch.randn(3, 32)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 32,
        "base_model_name_or_path": str(tiny_gpt2_dir)}))
    assert main(["bank", "import", str(tmp_path / "bank"), str(adapter), "--task", "CB", "--data-dir", str(superglue_dir),
                 "--max-length", "96"]) == 0
    bank = PromptBank.open(tmp_path / "bank")
    entry = bank.get("CB")
    assert entry.config["train"]["bf16"] is False and float(entry.route["bf16"]) == 0.0
    backbone = load_backbone(str(tiny_gpt2_dir))
    examples = load_task_data("CB", superglue_dir, max_train=1, seed=0).test[:6]
    features = backbone.featurize(examples, 96 - 3)
    stored = torch.stack(bank_option_scores(bank, examples, ["CB"] * 6, backbone))  # as the bank and the server score it
    fp32, bf16 = (torch.stack(option_scores(backbone, entry.prompt, None, features, bf16=b)) for b in (False, True))
    assert torch.equal(stored, fp32) and not torch.equal(stored, bf16)
