"""`crpt bank predict`: answer a file's rows with a bank entry (the task given, or the one each row is routed to), as JSONL.

Without a task every output line holds `line` (the input line), `uid` (the example's id as the task
it was routed to names it: `RTE/val/12`, as `crpt bank predict BANK RTE` would print it),
`input_id` (the row's own `id`, `idx` or `uid` field, the first of these it holds, else null: what
joins an answer back to the input), `task` (the entry routed to), `routing_score`, `prediction`
and `index`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from continual_rpt.backbones import Backbone
from continual_rpt.bank import Entry, PromptBank
from continual_rpt.evaluation import predict_from_bank
from continual_rpt.routing import routable, route
from continual_rpt.tasks import DataError, read_examples, task_from_meta
from continual_rpt.tasks.data import decode_json_line, read_lines

ID_FIELDS = ("id", "idx", "uid")  # a row's own id fields, passed through as `input_id` (the first one present)


def write_jsonl(lines: list[dict], output: Path | None) -> None:
    """One JSON object per line, to `output` or standard output."""
    out = open(output, "w") if output else sys.stdout
    try:
        for line in lines:
            out.write(json.dumps(line) + "\n")
    finally:
        if output:
            out.close()


def answer_text(task, example, index: int) -> str:
    """A predicted index as the task's answer: the label name, or the chosen candidate."""
    return task.label_names[index] if task.kind == "classification" else example.candidates[index]


def input_id(row: dict):
    """The row's own id: its `id`, `idx` or `uid` field (the first it holds, in that order), else None."""
    return next((row[field] for field in ID_FIELDS if field in row), None)


def chosen_task(args: argparse.Namespace) -> str | None:
    """The task named positionally or by --task (refused when they differ), or None: each row routed."""
    if args.task and args.task_option and args.task != args.task_option:
        raise ValueError(f"two tasks given ({args.task!r} and --task {args.task_option!r}); give one")
    return args.task or args.task_option


def predict_file(bank: PromptBank, args: argparse.Namespace, backbone_for: Callable[[Entry], Backbone]) -> int:
    """Predict every example of --input with a stored prompt (given by --task, or routed) and write one JSON line each."""
    args.task = chosen_task(args)
    if args.task is None:
        return predict_routed(bank, args, backbone_for)
    entry = bank.get(args.task)
    task = task_from_meta(entry.meta, args.bank / args.task)
    examples = read_examples(entry.meta, args.input)
    predictions = predict_from_bank(bank, args.task, examples, backbone_for(entry), bf16=args.bf16)
    write_jsonl([{"uid": ex.uid, "prediction": answer_text(task, ex, i), "index": i} for ex, i in zip(examples, predictions)], args.output)
    return 0


def predict_routed(bank: PromptBank, args: argparse.Namespace, backbone_for: Callable[[Entry], Backbone]) -> int:
    """Route every row of a jsonl file to the entry that should answer it, and answer it with that entry."""
    names, skipped = routable(bank)
    if skipped:
        print(f"crpt: {len(skipped)} entries hold no route state and are not routed to: {', '.join(skipped)} "
              "(made before routing existed; answer their rows with --task NAME, or add it: crpt bank index-routes BANK)", file=sys.stderr)
    tasks = {name: task_from_meta(bank.get(name).meta, bank.path / name) for name in names}
    _, lines = read_lines(args.input)
    rows: dict[int, tuple[dict, dict]] = {}  # line -> the row, and its examples as each entry that can read it parses them
    by_reader: dict[tuple[str, ...], list[tuple[int, int]]] = {}  # the entries that can read a row -> (line, example k of it)
    for number, line in lines:
        where = f"{args.input}:{number}"
        row = decode_json_line(line, where)
        # Offered to the entries whose task needs no field the row lacks and parses it, read without its label: a gold
        # label (which one task's parser would refuse for naming another's class) plays no part in routing.
        readers, parsed, errors = [name for name, task in tasks.items() if task.reads_row(row)], {}, []
        for name in readers:
            try:
                parsed[name] = tasks[name].parse_inputs(row, where)
            except DataError as err:
                errors.append(f"{name}: {err}")
        if not parsed:
            needs = "; ".join(f"{name} needs {', '.join(task.input_fields)}" for name, task in tasks.items() if name not in readers)
            raise DataError(f"{where}: no entry of {bank.path} can read this row ({'; '.join(errors + [needs] * bool(needs)) or 'no routable entries'})")
        rows[number] = (row, parsed)
        by_reader.setdefault(tuple(parsed), []).extend((number, k) for k in range(len(next(iter(parsed.values())))))
    backbone = backbone_for(bank.get(names[0]))
    out = []
    for readers, items in by_reader.items():
        readings = {name: [rows[number][1][name][k] for number, k in items] for name in readers}  # each task's own reading
        for (number, k), r in zip(items, route(bank, readings[readers[0]], backbone, args.router, list(readers), readings, args.bf16)):
            row, parsed = rows[number]
            ex = parsed[r.task][k]  # the row as the entry routed to reads it
            out.append(((number, k), {"line": number, "uid": ex.uid, "input_id": input_id(row), "task": r.task,
                                      "routing_score": r.routing_score, "prediction": answer_text(tasks[r.task], ex, r.index),
                                      "index": r.index}))
    write_jsonl([line for _, line in sorted(out, key=lambda item: item[0])], args.output)
    return 0
