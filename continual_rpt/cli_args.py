"""The config dataclasses as command-line options, built by transformers' HfArgumentParser.

HfArgumentParser turns each field's type hint and metadata (its help, and any other argparse keyword
the metadata holds, such as choices) into an option, so the dataclass stays the one place a setting
is defined. Three conventions of `crpt` go on top: options are spelled with dashes only (`--head-lr`,
where HfArgumentParser also registers `--head_lr`), every boolean is `--flag/--no-flag`, and an
option not given stays out of the parsed namespace (default SUPPRESS), so that the backbone's recipe
and the dataclass default fill it, in that order; the field's default is shown in its help.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


class _CrptOption:
    """Receives the add_argument calls HfArgumentParser makes for one field and adds the option as `crpt` spells it."""

    def __init__(self, group: argparse._ArgumentGroup, field: dataclasses.Field, fallback: str) -> None:
        self.group, self.field, self.fallback = group, field, fallback

    def add_argument(self, *names: str, **kwargs) -> None:
        """Add the field's option: dashed name, unset unless given, the dataclass default named in its help."""
        if kwargs.get("action") == "store_false":
            return  # HfArgumentParser's --no_flag complement: BooleanOptionalAction below makes --no-flag itself
        kwargs.pop("default", None)
        if "(default:" not in kwargs.get("help", ""):  # a help that names its default itself says it better
            default = "unset" if self.field.default is None else repr(self.field.default)
            kwargs["help"] = f"{kwargs.get('help', '')} (default: {default}{self.fallback})"
        if kwargs.get("type") is string_to_bool:  # HfArgumentParser's marker of a boolean field
            kwargs = {"action": argparse.BooleanOptionalAction, "help": kwargs["help"]}
        self.group.add_argument("--" + self.field.name.replace("_", "-"), dest=self.field.name, default=argparse.SUPPRESS, **kwargs)


def add_config_options(parser: argparse.ArgumentParser, cls: type, title: str, recipe: bool = True) -> None:
    """One option per field of the dataclass `cls`, in the help's section `title`; an option not given stays unset.

    `recipe`: whether a backbone's row of `recipes.RECIPES` may set these fields (the help says so).
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            field = copy.copy(field)  # HfArgumentParser resolves field.type in place: the dataclass's own field stays as it is
            field.type = hints[field.name]
            HfArgumentParser._parse_dataclass_field(_CrptOption(group, field, ", or the backbone's recipe" * recipe), field)


def config_from_args(cls: type, args: argparse.Namespace, base: dict | None = None):
    """`cls` from the options given, on top of `base` (a recipe section), on top of the dataclass defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**(base or {}), **given})


def train_configs(args: argparse.Namespace):
    """`crpt train`'s BackboneConfig and TaskSpec: the options given, over the backbone's recipe, over the dataclass defaults."""
    from continual_rpt.backbones import BackboneConfig
    from continual_rpt.learner import TrainConfig
    from continual_rpt.prompts import PromptConfig
    from continual_rpt.recipes import recipe_for
    from continual_rpt.streams import DataConfig, TaskSpec
    from continual_rpt.tasks import get_task

    task = get_task(args.task).name
    backbone_cfg = config_from_args(BackboneConfig, args)
    recipe = recipe_for(backbone_cfg.backbone)
    spec = TaskSpec(task, task, None, config_from_args(DataConfig, args, recipe.get("data")),
                    config_from_args(PromptConfig, args, recipe.get("prompt")), config_from_args(TrainConfig, args, recipe.get("train")))
    return backbone_cfg, spec
