"""The README's commands are the command line's: every `crpt …` line parses with the real parser, the cheap ones run.

Commands in shell code blocks (line continuations joined, `&&` / `;` chains split, `for` loop variables
expanded over their values, `python -m continual_rpt` and `accelerate launch … -m continual_rpt` too) are
parsed whole by `continual_rpt.cli.build_parser()`. Inline mentions in the prose (`crpt run --method`,
`crpt bank predict BANK RTE`) are fragments: their subcommands and every `--option` they name must exist.
Checked to fail, with the README line named, on a README whose `--data-dir` was misspelt `--data-dirs` in
the main job's command, on one whose `crpt bank ls` became `crpt bank list`, and on `--no-progres` inline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from continual_rpt.backbones.base import Backbone
from continual_rpt.bank import Entry, PromptBank
from continual_rpt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "experiments" / "README.md"]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
CHAIN = {"&&", "||", ";", "|", "&"}
LOOP_WORDS = {"do", "done", "then", "fi"}
ELLIPSIS = {"…", "..."}


@dataclass
class Command:
    """One `crpt` command found in a document: where, its arguments, and whether it is whole (a code block's)."""

    where: str
    argv: list[str]
    whole: bool


def _shell_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, text) of every logical line of the shell code blocks, continuations joined."""
    out, block, pending = [], None, None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block is None or block not in SHELL_BLOCKS:
            continue
        start, text = pending if pending else (number, "")
        text += line.rstrip()
        pending = (start, text[:-1] + " ") if text.endswith("\\") else None
        if pending is None:
            out.append((start, text))
    return out


def _segments(text: str) -> list[list[str]]:
    """The simple commands of a shell line: split at && || ; | &, loop keywords and leading VAR=value dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens, segments = list(lexer), [[]]
    for token in tokens:
        if token in CHAIN:
            segments.append([])
        else:
            segments[-1].append(token)
    cleaned = []
    for segment in segments:
        while segment and (segment[0] in LOOP_WORDS or re.fullmatch(r"\w+=\S*", segment[0])):
            segment = segment[1:]
        if segment:
            cleaned.append(segment)
    return cleaned


def _crpt_args(segment: list[str]) -> list[str] | None:
    """The arguments after `crpt` or `-m continual_rpt`, or None if the segment runs something else."""
    if segment[0] == "crpt":
        return segment[1:]
    for i in range(len(segment) - 1):
        if segment[i] == "-m" and segment[i + 1] == "continual_rpt":
            return segment[i + 2:]
    return None


def _expanded(argv: list[str], loops: dict[str, list[str]]) -> list[list[str]]:
    """`argv` once for every combination of the loop variables it uses ($m, ${m})."""
    used = sorted({name for arg in argv for name in re.findall(r"\$\{?(\w+)\}?", arg) if name in loops})
    combos = []
    for values in itertools.product(*(loops[name] for name in used)):
        bound = dict(zip(used, values))
        combos.append([re.sub(r"\$\{?(\w+)\}?", lambda m: bound.get(m.group(1), m.group(0)), arg) for arg in argv])
    return combos


def commands(path: Path) -> list[Command]:
    """Every `crpt` command of a markdown file: whole ones from shell code blocks, then inline mentions in the prose."""
    lines = path.read_text().splitlines()
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found, loops = [], {}
    for number, text in _shell_lines(lines):
        for segment in _segments(text):
            if segment[0] == "for" and len(segment) > 2 and segment[2] == "in":
                loops[segment[1]] = segment[3:]
            argv = _crpt_args(segment)
            if argv is not None:
                found += [Command(f"{label}:{number}", args, True) for args in _expanded(argv, loops)]
    prose, in_block = [], False
    for line in lines:  # code blocks blanked, so that line numbers stay
        in_block ^= line.lstrip().startswith("```")
        prose.append("" if in_block or line.lstrip().startswith("```") else line)
    text = "\n".join(prose)
    for match in re.finditer(r"`(crpt(?:\s[^`]*)?)`", text):
        number = text.count("\n", 0, match.start()) + 1
        argv = [t for t in match.group(1).split()[1:] if t not in ELLIPSIS]
        found.append(Command(f"{label}:{number}", argv, False))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def mention_problem(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Why an inline mention names no real command or option (None if it does)."""
    for token in argv:
        if token.startswith("-"):
            if token.split("=")[0] not in parser._option_string_actions:
                return f"{parser.prog} has no option {token}"
        elif _subparsers(parser):
            if token not in _subparsers(parser):
                return f"{parser.prog} has no command {token!r} (it has {', '.join(_subparsers(parser))})"
            parser = _subparsers(parser)[token]
    return None


def parse_problem(argv: list[str]) -> str | None:
    """The parser's own error for `argv` (None if it parses; --help counts as parsing)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:
            if stop.code:
                return err.getvalue().strip().splitlines()[-1]
    return None


ALL = [c for doc in DOCS for c in commands(doc)]


def test_the_docs_hold_the_commands_this_test_must_see():
    whole = [c.argv[:2] for c in ALL if c.whole]
    assert len(whole) >= 15 and sum(not c.whole for c in ALL) >= 20, len(ALL)
    assert ["run", "streams/superglue-cpu.yaml"] in whole and ["bank", "ls"] in whole  # `pip install … && crpt run …`; a bank query
    assert ["train", "--task"] in whole  # `accelerate launch … -m continual_rpt train …`, as well as `crpt train`
    loop = [c.argv for c in ALL if c.whole and "--method" in c.argv and c.argv[c.argv.index("--method") + 1] == "ewc"]
    assert loop and all("$" not in arg for arg in loop[0])  # the `for m in …` loop of "Compare runs", expanded


@pytest.mark.parametrize("command", [c for c in ALL if c.whole], ids=lambda c: c.where)
def test_every_command_of_a_code_block_parses(command):
    problem = parse_problem(command.argv)
    assert problem is None, f"{command.where}: `crpt {shlex.join(command.argv)}` does not parse: {problem}"


@pytest.mark.parametrize("command", [c for c in ALL if not c.whole], ids=lambda c: c.where)
def test_every_inline_mention_names_real_commands_and_options(command):
    problem = mention_problem(build_parser(), command.argv)
    assert problem is None, f"{command.where}: `crpt {' '.join(command.argv)}`: {problem}"


def test_a_broken_command_is_reported_with_its_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n```\npip install -e . && crpt run s.yaml --data-dirs d \\\n  --out r\n```\n\nthen `crpt bank list B`\n")
    found = commands(readme)
    assert [(c.where, c.whole) for c in found] == [("README.md:4", True), ("README.md:8", False)]
    assert "unrecognized arguments: --data-dirs" in parse_problem(found[0].argv)
    assert "has no command 'list'" in mention_problem(build_parser(), found[1].argv)


def test_the_help_commands_and_bank_queries_run(tmp_path, capsys):
    for argv in ([c.argv for c in ALL if c.argv and c.argv[-1] == "--help"] or [["--help"]]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0 and "usage: crpt" in capsys.readouterr().out
    bank = PromptBank.open(tmp_path / "bank", create=True)
    meta = {"task": "RTE", "method": "rpt", "prompt_tokens": 4, "backbone": {"name": "embedded"}}
    bank.add("RTE", Entry(torch.zeros(4, 8), None, meta, {}, {"test_score": 61.5}))
    queries = [c for c in ALL if c.whole and c.argv[:2] in (["bank", "ls"], ["bank", "show"])]
    assert {tuple(c.argv[:2]) for c in queries} == {("bank", "ls"), ("bank", "show")}
    for command in queries:  # the README's own line, on a bank made here
        argv = [*command.argv[:2], str(tmp_path / "bank"), *command.argv[3:]]
        assert main(argv) == 0, command.where
        assert "RTE" in capsys.readouterr().out


NUMBERS = {"six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11}


def test_the_readme_names_every_abstract_member_of_a_backbone():
    text = " ".join(DOCS[0].read_text().split())
    said = re.search(r"\*\*Add a backbone family\*\*: subclass `backbones\.base\.Backbone`, implement its (\w+) abstract members(.*?)add one row", text)
    assert said, "README.md: the 'Add a backbone family' sentence is gone or reworded"
    named = set(re.findall(r"`(\w+)`", said.group(2))) - {"test_readme"}
    assert named == set(Backbone.__abstractmethods__) and NUMBERS[said.group(1)] == len(named)
