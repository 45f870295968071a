"""`crpt bank predict BANK --server URL --input FILE`: a file answered by a running `crpt serve`, written as the local path writes it.

The server answers each row with the model's part of an output line (`task`, `prediction`, `index`,
`routing_score`); the file's part (`line`, `uid`, `input_id`) is computed here, from the rows and
the task definitions in BANK's entries (their metadata only: no model loads on this side), so every
line is the one `crpt bank predict` without `--server` writes. BANK is the bank the server serves
(the same folder, or a copy); an entry the server added after this command read BANK is read again.
The backbone, device and router are the server's. Rows are checked here before anything is sent,
so a bad row is named by its file and line, as locally; a row the server refuses is named so too.
"""

from __future__ import annotations

import argparse

from continual_rpt.bank import PromptBank
from continual_rpt.bank_predict import chosen_task, input_id, write_jsonl
from continual_rpt.serving.client import BankClient, ServerError
from continual_rpt.tasks import DataError, Task, task_from_meta
from continual_rpt.tasks.data import decode_json_line, read_lines
from continual_rpt.tasks.stored import read_rows

SERVER_TIMEOUT_S = 600  # one chunk of a few hundred rows on a large backbone on a CPU server


def predict_file_remote(bank: PromptBank, args: argparse.Namespace) -> int:
    """Send --input's rows to the server at --server (task given, or each row routed there) and write one JSON line each."""
    client = BankClient(args.server, timeout=SERVER_TIMEOUT_S)
    task_name = chosen_task(args)
    if task_name is None:
        return _predict_routed(bank, args, client)
    entry = bank.get(task_name)
    task = task_from_meta(entry.meta, bank.path / task_name)
    rows = read_rows(entry.meta, args.input)
    examples = [ex for where, row in rows for ex in task.parse(row, where)]  # a bad row named by file and line, as locally
    results = _answers(client, rows, task_name)
    write_jsonl([{"uid": ex.uid, "prediction": r["prediction"], "index": r["index"]} for ex, r in zip(examples, results)], args.output)
    return 0


def _predict_routed(bank: PromptBank, args: argparse.Namespace, client: BankClient) -> int:
    """Every row of a jsonl file routed by the server; uids named as the entry each example went to names them."""
    _, lines = read_lines(args.input)
    rows = [(f"{args.input}:{number}", decode_json_line(line, f"{args.input}:{number}")) for number, line in lines]
    tasks: dict[str, Task] = {}
    results = _answers(client, rows, None)
    out, k = [], 0
    for i, result in enumerate(results):
        where, row = rows[result["row"]]
        k = k + 1 if i and results[i - 1]["row"] == result["row"] else 0  # which of the row's examples this one is
        name = result["task"]
        if name not in tasks:  # read when first answered with: the server may have loaded it after this command began
            tasks[name] = task_from_meta(PromptBank.open(bank.path).get(name).meta, bank.path / name)
        out.append({"line": lines[result["row"]][0], "uid": tasks[name].parse_inputs(row, where)[k].uid, "input_id": input_id(row),
                    "task": name, "routing_score": result["routing_score"], "prediction": result["prediction"], "index": result["index"]})
    write_jsonl(out, args.output)
    return 0


def _answers(client: BankClient, rows: list[tuple[str, dict]], task: str | None) -> list[dict]:
    """The server's result for each example of the rows, in order; a row it refuses is named by its file and line."""
    try:
        return client.predict([row for _, row in rows], task)
    except ServerError as err:
        if err.row is None or not 0 <= err.row < len(rows):
            raise
        raise DataError(f"{rows[err.row][0]}: refused by the server at {client.url} (HTTP {err.status}): {err.message}") from None
