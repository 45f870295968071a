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


def test_a_bad_option_value_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "CB", "--out", "x", "--head-lr", "fast"])
    assert stop.value.code == 2 and "--head-lr: invalid float value: 'fast'" in capsys.readouterr().err
