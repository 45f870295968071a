"""Serving benchmark (issue 27): `crpt serve` on loopback against the in-process mixed-batch path and PEFT.

On a finished run's bank, the raw rows of its tasks' test halves (labels dropped) are sent in
requests of one task each, the tasks taking turns (an equal share of rows per task, cycled), and answered:
    in-process   the rows the 8-row settings send, in mixed batches of 64 (`mixed_option_scores`,
                 experiments/mixed_batches.py's method: the ceiling), forward passes alone and with
                 tokenisation; the rows the 1-row settings send, in the order sent, cut into batches
                 of 64 as a busy server collects them and answered as one mixed forward each, one
                 forward per task, or length-sorted mixed forwards of 8 (with the padded token
                 positions of each); and each of those rows alone (the single in-process forward)
    servers      a server in its own process, driven by an httpx.AsyncClient at concurrency 1, 8, 32
                 with requests of 1 row and of 8: `crpt serve --forward-batch 64` (mixed-task batches, one forward each);
                 its app answering each task of a collected batch in a forward of its own (per-task
                 batching); `crpt serve` as it comes, which cuts each collected batch into length-sorted mixed
                 forwards of 8 rows (its --forward-batch default); and `crpt serve --max-batch 1` at concurrency 1
    load         N requests to `crpt serve` at concurrency 32, 10% malformed (unknown task, missing
                 fields, broken JSON, too many rows, rows not a list), a quarter of the good ones
                 routed (task null): every status counted, every answer compared with `crpt bank
                 predict`'s on the same row; N is 20,000 or what --load-seconds allows at the time
                 per request measured just before
    hot-add      the bank without WSC served from a copy in --work; WSC (then copies of it under new
                 names) added by the library's writer (PromptBank.add, what `crpt run` calls) while a
                 client polls for it: seconds from bank.json's new mtime to the first answer
    peft         a tiny random GPT-2 (tests/conftest.py's) trained on the same five tasks, its entries
                 exported with `crpt bank export --format peft` and loaded into one PeftModel, answered
                 per-task batch by batch with `set_adapter` between them, beside the bank's decoder
                 path in process and `crpt serve` on that bank (experiments/serving_peft.py)
Every setting is bounded in requests and seconds; every server is stopped at its end.

    OMP_NUM_THREADS=1 python experiments/serving.py STREAM RUN_FOLDER --out experiments/results/serving [--data-dir DIR]

STREAM and --data-dir as given to `crpt run`. One torch thread per process (the servers inherit
it): on a 2-core machine the client needs the other core, and two OpenMP threads that another
process keeps descheduled stall each other at every barrier. Numbers depend on the machine and on what else runs
on it: the CPU, its bf16 flags and the load average at every setting are recorded beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402
from mixed_batches import padded_tokens  # noqa: E402
from routing import finished_run, run_parser  # noqa: E402
from serving_http import SEED, drive, free_server, hot_add, load_average, load_test, percentile, request_plan, requests_of  # noqa: E402
from serving_peft import decoder_bank, peft_vs_ours  # noqa: E402

import continual_rpt  # noqa: E402
from continual_rpt.backbones.base import BF16_CPU_FLAGS, cpu_flags  # noqa: E402
from continual_rpt.cli import main as crpt  # noqa: E402
from continual_rpt.evaluation import length_batches, load_answerer, mixed_option_scores  # noqa: E402
from continual_rpt.serving.limits import Limits  # noqa: E402

BATCH, REPEATS = 64, 3
CONCURRENCY, SIZES = (1, 8, 32), (1, 8)
ROWS_PER_SETTING = {1: 160, 8: 320}  # rows sent per setting, requests of 1 row and of 8 (sized for a busy 2-core CPU)
FORWARD_BATCH = 8  # the variant's forwards: a collected batch sorted by length and cut into forwards of this many rows
# "mixed": one forward per collected batch, crpt serve's default when this was measured (now --forward-batch 8, the variant).
SERVERS = {"mixed": {"options": ["--forward-batch", str(BATCH)]}, "per-task": {"variant": "per-task"},
           f"mixed, forwards of {FORWARD_BATCH}": {"options": []},  # crpt serve as it comes: --forward-batch 8 is its default
           "one at a time": {"options": ["--max-batch", "1"]}}
assert FORWARD_BATCH == Limits().forward_batch, "the 'forwards of 8' server is crpt serve's default"
PEFT_ROWS_PER_TASK, HOT_ADDS, MAX_ROWS = 60, 5, 256  # MAX_ROWS: crpt serve's default --max-rows


def machine() -> dict:
    """The CPU's model, cores and bf16 instructions (what bf16 autocast runs on)."""
    return {"machine": machine_description(), "bf16_flags": [f for f in BF16_CPU_FLAGS if f in cpu_flags()], "cores": os.cpu_count()}


def test_rows(data: dict, names: list[str], per_task: int | None = None) -> list[tuple[str, dict]]:
    """(task, raw row without its label) of every test example, tasks dealt round-robin; rows from the validation file."""
    by_task = {}
    for name in names:
        path = next(p for p in data[name].files if p.endswith("/val.jsonl"))
        raw = {str(row["idx"]): row for row in map(json.loads, Path(path).read_text().splitlines())}
        by_task[name] = [{k: v for k, v in raw[ex.uid.rsplit("/", 1)[1]].items() if k != "label"} for ex in data[name].test[:per_task]]
    longest = max(map(len, by_task.values()))
    return [(name, by_task[name][i]) for i in range(longest) for name in names if i < len(by_task[name])]


def featurized(backbone, answerers: list, items: list[tuple[int, object]], max_length: int) -> list:
    """Each task's rows of `items` ((task index, example)) tokenised together, as one request of it would be, in item order."""
    out = [None] * len(items)
    for t, a in enumerate(answerers):
        mine = [k for k, (owner, _) in enumerate(items) if owner == t]
        for k, f in [] if not mine else zip(mine, backbone.featurize([items[k][1] for k in mine], max_length - a.prompt.shape[-2])):
            out[k] = f
    return out


def in_process(bank, backbone, data, names: list[str], rows: list[tuple[str, dict]]) -> dict:
    """The ceiling on the rows the 8-row settings send; the 1-row settings' rows batched as a server collects them; each alone."""
    answerers = [load_answerer(bank, name, backbone) for name in names]
    train = answerers[0].entry.config.get("train", {})
    max_length, bf16 = train.get("max_length", 256), train.get("bf16", True)
    plan = {size: [(names.index(task), data[task].test[i]) for task, indexes in request_plan(rows, size, ROWS_PER_SETTING[size])
                   for i in indexes] for size in SIZES}
    items, owners = plan[8], [t for t, _ in plan[8]]
    mixed_option_scores(backbone, answerers, owners[:BATCH], featurized(backbone, answerers, items[:BATCH], max_length), BATCH, bf16)
    tokenise, forward = [], []  # the warm-up above; then mixed_batches.py's measure, tokenisation timed apart
    for _ in range(REPEATS):
        start = time.perf_counter()
        features = featurized(backbone, answerers, items, max_length)
        tokenise.append(time.perf_counter() - start)
        mixed_option_scores(backbone, answerers, owners, features, BATCH, bf16)
        forward.append(time.perf_counter() - start - tokenise[-1])
    arrival = plan[1]  # in the order sent: a busy server's batches hold BATCH consecutive ones
    features = featurized(backbone, answerers, arrival, max_length)
    chunks = [list(range(k, min(k + BATCH, len(arrival)))) for k in range(0, len(arrival), BATCH)]
    shaped = {"mixed": chunks,
              "per task": [mine for c in chunks for t in range(len(names)) for mine in [[k for k in c if arrival[k][0] == t]] if mine],
              f"mixed, forwards of {FORWARD_BATCH}": [[c[i] for i in b] for c in chunks
                                                      for b in length_batches([features[k] for k in c], FORWARD_BATCH)]}
    slots = max(a.prompt.shape[-2] for a in answerers)
    padded = {mode: padded_tokens(backbone, [[features[k] for k in b] for b in batches], [slots] * len(batches))
              for mode, batches in shaped.items()}
    seconds: dict = {mode: [] for mode in shaped}
    for _ in range(REPEATS):  # the modes take turns, so the machine's load falls on all alike
        for mode, batches in shaped.items():
            start = time.perf_counter()
            for b in batches:
                mixed_option_scores(backbone, answerers, [arrival[k][0] for k in b], [features[k] for k in b], BATCH, bf16)
            seconds[mode].append(time.perf_counter() - start)
    single = []
    for item in arrival:
        start = time.perf_counter()
        mixed_option_scores(backbone, answerers, [item[0]], featurized(backbone, answerers, [item], max_length), 1, bf16)
        single.append(time.perf_counter() - start)
    single.sort()
    return {"rows": len(items), "batch": BATCH, "bf16": bf16, "repeats": REPEATS,
            "forward_rows_per_s": len(items) / statistics.median(forward),
            "tokenised_rows_per_s": len(items) / statistics.median([f + t for f, t in zip(forward, tokenise)]),
            "batches_of_arrival": {"rows": len(arrival), "batch": BATCH, "padded_token_positions": padded,
                                   "real_token_positions": sum(f.length + slots for f in features),
                                   "rows_per_s": {mode: len(arrival) / statistics.median(v) for mode, v in seconds.items()}},
            "single_row_ms": {"rows": len(single), "p50": 1000 * percentile(single, 50), "p99": 1000 * percentile(single, 99)},
            "load_average": load_average()}


def reference(bank_path: Path, rows: list[tuple[str, dict]], work: Path) -> dict:
    """`crpt bank predict`'s answers for every row: by task given, (task, row index) -> (prediction, index); routed, row -> (task, prediction, index)."""
    out: dict = {"given": {}, "routed": []}
    for task in dict.fromkeys(t for t, _ in rows):
        mine = [row for t, row in rows if t == task]
        (work / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mine))
        if crpt(["bank", "predict", str(bank_path), task, "--input", str(work / "in.jsonl"), "--output", str(work / "out.jsonl")]) != 0:
            raise SystemExit(f"crpt bank predict {task} failed")
        answers = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
        out["given"].update({(task, k): (a["prediction"], a["index"]) for k, a in enumerate(answers)})
    (work / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for _, row in rows))
    if crpt(["bank", "predict", str(bank_path), "--input", str(work / "in.jsonl"), "--output", str(work / "out.jsonl")]) != 0:
        raise SystemExit("crpt bank predict (routed) failed")
    out["routed"] = [(a["task"], a["prediction"], a["index"]) for a in map(json.loads, (work / "out.jsonl").read_text().splitlines())]
    return out


def verdict(ok: bool) -> str:
    """A target's outcome as the tables print it."""
    return "met" if ok else "**not met**"


def targets(result: dict) -> list[str]:
    """Issue 27's targets, each beside what was measured (the rows of a table)."""
    settings, inside, lines = result["settings"], result.get("in_process"), []
    for mode, size in [(mode, size) for mode in ("mixed", f"mixed, forwards of {FORWARD_BATCH}") for size in SIZES]:
        mixed, per_task = settings.get(f"{mode}|{size}|32"), settings.get(f"per-task|{size}|32")
        if mixed and inside:
            ratio = mixed["rows_per_s"] / inside["forward_rows_per_s"]
            lines.append(f"| concurrency 32, {size}-row requests: server ({mode}) ≥ 0.8× in-process mixed rows/s | "
                         f"{mixed['rows_per_s']:.1f} / {inside['forward_rows_per_s']:.1f} = {ratio:.2f}× | {verdict(ratio >= 0.8)} |")
        if mixed and per_task:
            ratio = mixed["rows_per_s"] / per_task["rows_per_s"]
            lines.append(f"| concurrency 32, {size}-row requests: server ({mode}) ≥ 2× the per-task-batching server | "
                         f"{mixed['rows_per_s']:.1f} / {per_task['rows_per_s']:.1f} = {ratio:.2f}× | {verdict(ratio >= 2)} |")
    one = settings.get("mixed|1|1")
    if one and inside:
        ratio = one["p99_ms"] / inside["single_row_ms"]["p99"]
        lines.append(f"| concurrency 1: p99 ≤ 1.5× a single in-process forward of the same rows (p99) | "
                     f"{one['p99_ms']:.1f} / {inside['single_row_ms']['p99']:.1f} ms = {ratio:.2f}× | {verdict(ratio <= 1.5)} |")
    if "load" in result:
        load = result["load"]
        lines.append(f"| {load['requests_asked']:,}-request load, 10% malformed: 0 5xx, 0 answers differing from `crpt bank predict` | "
                     f"{load['requests']:,} requests run: {load['responses_5xx']} 5xx, {load['answers_differing']} differing | "
                     f"{verdict(load['responses_5xx'] == 0 and load['answers_differing'] == 0)}"
                     f"{'' if load['requests'] >= load['requests_asked'] else ' (on fewer requests)'} |")
    if "hot_add" in result:
        seconds = result["hot_add"]["seconds_to_first_answer"]
        worst = max((x for x in seconds if x is not None), default=float("inf"))
        lines.append(f"| new entry answered ≤ 2 s after it lands | worst of {len(seconds)}: {worst:.2f} s | "
                     f"{verdict(None not in seconds and worst <= 2)} |")
    return lines


def render(result: dict) -> str:
    """serving.md: every setting, the targets, the malformed load, hot-add and the PEFT anchor."""
    cpu, env = result["cpu"], result["environment"]
    lines = ["# Serving a prompt bank: `crpt serve` on loopback", "",
             f"Bank: {result['run']}/bank ({', '.join(result['tasks'])}), {result['rows']} test rows (labels dropped), tasks "
             f"interleaved. Machine: {cpu['machine']}, bf16 instructions: {', '.join(cpu['bf16_flags']) or 'none'}. "
             f"**A {cpu['cores']}-core CPU shared with other work**: the 1-minute load average was "
             f"{result['load_average_at_start']:.2f} at the start and is given for every setting; the client, the server and "
             "whatever else ran share these cores, so these numbers are this machine's under that load, not a serving "
             "machine's. " + f"{env['date']}; torch {env['torch']}, fastapi {env['fastapi']}, uvicorn {env['uvicorn']}, "
             f"httpx {env['httpx']}, peft {env['peft']}; {result['seconds']:.0f} s in all.", ""]
    inside = result.get("in_process")
    if inside:
        lines += [f"In process (the ceiling, `mixed_option_scores`, batches of {inside['batch']}, "
                  f"{'bf16' if inside['bf16'] else 'fp32'}, median of {inside['repeats']}): "
                  f"**{inside['forward_rows_per_s']:.1f} rows/s** forward passes only (experiments/mixed_batches.py's measure), "
                  f"{inside['tokenised_rows_per_s']:.1f} rows/s with tokenisation; one row alone, tokenised and forwarded: "
                  f"p50 {inside['single_row_ms']['p50']:.1f} ms, p99 {inside['single_row_ms']['p99']:.1f} ms "
                  f"({inside['single_row_ms']['rows']} rows; load average {inside['load_average']:.2f}).", ""]
        shaped = inside["batches_of_arrival"]
        lines += [f"The same batching in process, without HTTP: the {shaped['rows']} rows the 1-row settings send, in the order "
                  f"sent, cut into batches of {shaped['batch']} as a busy server collects them, answered as one mixed forward each, "
                  f"one forward per task in each, or sorted by length into mixed forwards of {FORWARD_BATCH} rows: " + ", ".join(f"{mode} {r:.1f} rows/s" for mode, r in shaped["rows_per_s"].items())
                  + f"; padded token positions " + ", ".join(f"{mode} {n:,}" for mode, n in shaped["padded_token_positions"].items())
                  + f" for {shaped['real_token_positions']:,} real ones (prompt slots included).", ""]
    lines += [f"Every setting sends {ROWS_PER_SETTING[1]} rows in 1-row requests or {ROWS_PER_SETTING[8]} in 8-row ones (at "
              "concurrency 32 that is about one round of 8-row requests: their p99 is nearly the slowest request); the servers "
              "run side by side and take turns at every setting. p50 / p99 by nearest rank. 'Batches collected' is from the "
              "server's /metrics (crpt_batch_rows); the per-task server then runs one forward per task of each.", "",
              "| server | rows per request | concurrency | rows/s | p50 ms | p99 ms | requests | statuses | batches collected (rows each) | load average |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = list(SERVERS)
    for key in sorted((k for k in result["settings"] if k.split("|")[0] in order),
                      key=lambda k: (order.index(k.split("|")[0]), *map(int, k.split("|")[1:]))):
        o, (mode, size, concurrency) = result["settings"][key], key.split("|")
        lines.append(f"| {mode} | {size} | {concurrency} | {o['rows_per_s']:.1f} | {o['p50_ms']:.1f} | {o['p99_ms']:.1f} | "
                     f"{o['requests']}/{o['requests_planned']} | {o['statuses']} | {o['batches']:.0f} ({o['rows_per_batch']:.1f}) | "
                     f"{o['load_average'][0]:.2f} |")
    lines += ["", "## Targets (issue 27)", "", "| target | measured | |", "|---|---|---|", *targets(result), ""]
    if "load" in result:
        load = result["load"]
        sized = (f"{load['requests_asked']:,} asked; at the measured {1000 * load['seconds_per_request_measured']:.1f} ms a request "
                 f"{'they fit' if load['requests'] >= load['requests_asked'] else 'the count was cut to fit'} "
                 f"{load['seconds_allowed']:.0f} s on this machine")
        lines += ["## Malformed load", "",
                  f"{load['requests']:,} single-row requests at concurrency 32 ({sized}), {load['seconds']:.1f} s: "
                  f"statuses by kind {json.dumps(load['by_kind'])}. "
                  f"Answers differing from `crpt bank predict` (task given, or routed): {load['answers_differing']}"
                  f"{': ' + json.dumps(load['differing']) if load['differing'] else ''}.", ""]
    if "hot_add" in result:
        hot = result["hot_add"]
        lines += ["## Hot-add", "", f"{hot['entry']} added {hot['adds']} times (then under new names) to a served copy of the "
                  "bank by `PromptBank.add`, a client polling every 10 ms: seconds from bank.json's new mtime to the first "
                  f"answer: {', '.join('none' if x is None else f'{x:.2f}' for x in hot['seconds_to_first_answer'])} "
                  f"(answers {hot['answers']}).", ""]
    if "peft" in result:
        peft = result["peft"]
        lines += ["## The PEFT anchor", "", f"{peft['model']}, {peft['rows']} rows, batches of {peft['batch']}, {peft['precision']}, "
                  f"{peft['prompt_tokens']} prompt tokens, median of {peft['repeats']} rounds in which the three in-process paths take "
                  f"turns. PEFT agrees with the bank on {100 * peft['peft_agrees_with_bank']:.1f}% of the answers (largest score "
                  f"difference {peft['largest_score_difference']:.2g}). PEFT runs every (row, candidate) sequence whole; the bank's "
                  "decoder path runs each row's context once and its candidates from the KV cache, so the two differ in work as "
                  "well as in batching. On a model this small the HTTP stack, not the forward, bounds the server.", "",
                  "| path | rows/s |", "|---|---:|", *(f"| {mode} | {r:.1f} |" for mode, r in peft["rows_per_s"].items()),
                  *(f"| `crpt serve`, concurrency 32, {size}-row requests | {o['rows_per_s']:.1f} |"
                    for key, o in result["settings"].items() if key.startswith("decoder") for size in [key.split("|")[1]]), ""]
    return "\n".join(lines + [f"Command: `{env['command']}`", ""])


def environment() -> dict:
    """Versions, threads, date and command of this measurement."""
    import fastapi
    import httpx
    import peft
    import transformers
    import uvicorn

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "httpx": httpx.__version__, "peft": peft.__version__,
            "continual_rpt": continual_rpt.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
            + "python experiments/serving.py " + " ".join(sys.argv[1:])}


def main() -> None:
    """Run the sections asked for, then write serving.json and serving.md to --out."""
    parser = run_parser(__doc__)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "crpt-serving-bench",
                        help="scratch folder for bank copies, the tiny decoder and server logs (never the run's bank)")
    parser.add_argument("--load-requests", type=int, default=20000, help="requests of the malformed-input load (scaled down to --load-seconds)")
    parser.add_argument("--load-seconds", type=float, default=100, help="time the load may take, from the measured time per request")
    parser.add_argument("--sections", default="inprocess,servers,load,hot,peft", help="comma-separated parts to run")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    metrics, stream, bank, backbone, data = finished_run(args.stream, args.run, args.data_dir)
    names = bank.tasks()
    rows = test_rows(data, names)
    result: dict = {"run": str(args.run), "tasks": names, "rows": len(rows), "cpu": machine(), "run_seed": metrics["seed"],
                    "load_seed": SEED, "load_average_at_start": load_average(), "environment": environment(), "settings": {}}

    def report(key: str, outcome: dict) -> None:
        outcome.pop("replies", None)
        result["settings"][key] = outcome
        print(f"{key:24}: {outcome['rows_per_s']:7.1f} rows/s, p50 {outcome['p50_ms']:7.1f} ms, p99 {outcome['p99_ms']:7.1f} ms, "
              f"{outcome['statuses']}, load {outcome['load_average'][0]:.2f}", flush=True)

    if "inprocess" in sections:
        result["in_process"] = in_process(bank, backbone, data, names, rows)
        print(f"in process: {result['in_process']}", flush=True)
    del backbone  # the servers load their own
    if "servers" in sections:
        with contextlib.ExitStack() as servers:  # all up at once (an idle one only stats bank.json), the modes taking
            urls = {mode: servers.enter_context(free_server(  # turns at every setting, so the machine's load falls on all alike
                bank.path, args.work / f"server-{k}.log", *options.get("options", []), variant=options.get("variant")))
                for k, (mode, options) in enumerate(SERVERS.items())}
            for url in urls.values():
                drive(url, requests_of(rows, 1, 40), 8)  # warm-up
            for size, concurrency in [(size, concurrency) for size in SIZES for concurrency in CONCURRENCY]:
                for mode, url in urls.items():
                    if mode != "one at a time" or size == concurrency == 1:
                        report(f"{mode}|{size}|{concurrency}", drive(url, requests_of(rows, size, ROWS_PER_SETTING[size]), concurrency))
    if "load" in sections:
        expected = reference(bank.path, rows, args.work)
        with free_server(bank.path, args.work / "load-server.log") as url:
            probe = drive(url, requests_of(rows, 1, ROWS_PER_SETTING[1]), 32)
            per_request = probe["seconds"] / max(1, probe["requests"])
            count = min(args.load_requests, int(args.load_seconds / per_request))
            result["load"] = {"requests_asked": args.load_requests, "seconds_per_request_measured": per_request,
                              "seconds_allowed": args.load_seconds, **load_test(url, rows, expected, count, MAX_ROWS)}
        print(f"load: {result['load']['requests']} requests, 5xx {result['load']['responses_5xx']}, "
              f"differing {result['load']['answers_differing']}, {result['load']['by_kind']}", flush=True)
    if "hot" in sections:
        newcomer_row = next(row for task, row in rows if task == names[-1])
        result["hot_add"] = hot_add(bank.path, args.work, newcomer_row, names, HOT_ADDS)
        print(f"hot-add: {result['hot_add']}", flush=True)
    if "peft" in sections:
        work = args.work / "decoder"
        decoder = decoder_bank(work, args.data_dir or stream.tasks[0].data.data_dir, names)
        result["peft"] = peft_vs_ours(decoder, work, data, names, PEFT_ROWS_PER_TASK, BATCH)
        print(f"peft: {result['peft']}", flush=True)
        decoder_rows = test_rows(data, names, PEFT_ROWS_PER_TASK)
        with free_server(decoder, args.work / "decoder-server.log") as url:
            drive(url, requests_of(decoder_rows, 1, 40), 8)  # warm-up
            for size in SIZES:
                report(f"decoder mixed|{size}|32", drive(url, requests_of(decoder_rows, size, ROWS_PER_SETTING[size]), 32))
    result["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
