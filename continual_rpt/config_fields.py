"""Settings of the config dataclasses: default and help in one call, allowed range in the type, one range check.

Every config dataclass (BackboneConfig, DataConfig, BaselineConfig, PromptConfig, TrainConfig, serving's Limits)
declares its settings with `setting(default, help)`; cli_args makes each one a `crpt` option whose help is
metadata["help"]. A numeric setting whose values are limited says so in its type, `Annotated[float, Range(...)]`,
and its class's __post_init__ calls `check_ranges(self)`, which refuses the first value outside its range in the
range's own words. Stream files and cli_args read the plain type: typing.get_type_hints drops the annotation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated


@dataclass(frozen=True, kw_only=True)
class Range:
    """The numbers a setting accepts, and the words its error gives for them ("at least 1")."""

    words: str
    low: float
    high: float = math.inf
    low_open: bool = False  # low itself refused
    high_open: bool = False  # high itself refused; with high = inf, only finite numbers pass

    def admits(self, value: float) -> bool:
        """Whether `value` lies in the range (NaN never does)."""
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below


AT_LEAST_1 = Range(low=1, words="at least 1")
Count = Annotated[int, AT_LEAST_1]  # a number of things (epochs, tokens, examples kept) that cannot be none


def setting(default: object, help_text: str) -> typing.Any:
    """A config dataclass field: its default, and the help its `crpt` option shows (metadata["help"], read by cli_args)."""
    return field(default=default, metadata={"help": help_text})


@functools.cache
def _ranges(cls: type) -> tuple[tuple[str, Range], ...]:
    """Each field of the dataclass `cls` whose type carries a Range, in field order, with that Range."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, extra) for f in dataclasses.fields(cls)
                 for extra in getattr(hints[f.name], "__metadata__", ()) if isinstance(extra, Range))


def check_ranges(config: object, message: str = "{name}: must be {words}, got {value}") -> None:
    """Raise ValueError for the first setting of `config` outside its type's Range; `message` may use name, option, words, value."""
    for name, allowed in _ranges(type(config)):
        value = getattr(config, name)
        if not allowed.admits(value):
            raise ValueError(message.format(name=name, option="--" + name.replace("_", "-"), words=allowed.words, value=value))
