"""HTTP side of the serving benchmark (experiments/serving.py): servers on loopback, the load generator, the hot-add probe.

Every server binds 127.0.0.1 on a free port and is stopped when its `with` block ends; every load
is a fixed list of requests with a time limit, sent by an httpx.AsyncClient (asyncio, one
connection per concurrent worker, kept alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from continual_rpt.bank import PromptBank
from continual_rpt.serving.app import create_app
from continual_rpt.serving.limits import Limits
from continual_rpt.serving.state import ServedBank

SEED = 0  # the load's choice of routed requests
SETTING_SECONDS = 45  # a setting stops taking new requests after this


def load_average() -> float:
    """The 1-minute load average: how busy the machine's cores were while a number was taken."""
    return os.getloadavg()[0]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PerTaskBank(ServedBank):
    """The served bank answering each task's requests of a batch in a forward of their own: the per-task-batching control."""

    def answer(self, batch):
        """One `ServedBank.answer` (one-task batches) per task of `batch`; answers per request, in order."""
        groups: dict[str | None, list[int]] = {}
        for i, parsed in enumerate(batch):
            groups.setdefault(parsed.task, []).append(i)
        out: list = [None] * len(batch)
        for indexes in groups.values():
            for i, answers in zip(indexes, super().answer([batch[i] for i in indexes])):
                out[i] = answers
        return out


@contextlib.contextmanager
def free_server(bank: Path, log: Path, *options: str, variant: str | None = None, ready_s: float = 180):
    """`crpt serve BANK` (or a variant of its app: this file's __main__) on 127.0.0.1 in its own process,
    ready (GET /health 200) when entered, stopped when left; yields its URL."""
    port = free_port()
    command = [__file__, str(bank), str(port), variant] if variant else ["-m", "continual_rpt", "serve", str(bank), "--host", "127.0.0.1",
                                                                         "--port", str(port), *options]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_s
        while True:
            if process.poll() is not None:
                raise SystemExit(f"crpt serve exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.time() > deadline:
                raise SystemExit(f"crpt serve not ready after {ready_s} s: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request_plan(rows: list[tuple[str, dict]], size: int, n_rows: int) -> list[tuple[str, list[int]]]:
    """(task, indexes into that task's rows) of requests of `size` rows of one task, tasks interleaved, `n_rows` rows in all (cycled)."""
    counts: dict[str, int] = {}
    for task, _ in rows:
        counts[task] = counts.get(task, 0) + 1
    names, plan, taken = list(counts), [], dict.fromkeys(counts, 0)
    while len(plan) * size < n_rows:
        task = names[len(plan) % len(names)]
        plan.append((task, [(taken[task] + k) % counts[task] for k in range(size)]))
        taken[task] += size
    return plan


def requests_of(rows: list[tuple[str, dict]], size: int, n_rows: int) -> list[dict]:
    """The request bodies of `request_plan`: {"task": task, "rows": [raw rows]}."""
    by_task: dict[str, list[dict]] = {}
    for task, row in rows:
        by_task.setdefault(task, []).append(row)
    return [{"task": task, "rows": [by_task[task][i] for i in indexes]} for task, indexes in request_plan(rows, size, n_rows)]


async def _drive(url: str, requests: list, concurrency: int, seconds: float) -> tuple[list, float]:
    """Send every request (a dict as JSON, bytes as they are) from `concurrency` workers; (latency s, status, body) each."""
    replies: list = [None] * len(requests)
    queue = iter(range(len(requests)))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            for i in queue:
                if time.perf_counter() > deadline:
                    return
                body = requests[i]
                start = time.perf_counter()
                r = await (client.post("/v1/predict", json=body) if isinstance(body, dict) else
                           client.post("/v1/predict", content=body, headers={"content-type": "application/json"}))
                replies[i] = (time.perf_counter() - start, r.status_code, r.json() if r.status_code == 200 else r.text)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return replies, time.perf_counter() - start


def drive(url: str, requests: list, concurrency: int, seconds: float = SETTING_SECONDS) -> dict:
    """Rows/s, p50 / p99 latency (ms) and statuses of one setting; the load average around it."""
    before, batches = load_average(), batch_totals(url)
    replies, wall = asyncio.run(_drive(url, requests, concurrency, seconds))
    batches = [after - earlier for after, earlier in zip(batch_totals(url), batches)]
    done = [(r, q) for r, q in zip(replies, requests) if r is not None]
    latencies = sorted(r[0] for r, _ in done)
    rows = sum(len(q["rows"]) for r, q in done if r[1] == 200 and isinstance(q, dict))
    statuses = {}
    for r, _ in done:
        statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
    return {"requests": len(done), "requests_planned": len(requests), "rows": rows, "seconds": wall, "rows_per_s": rows / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99), "statuses": statuses,
            "load_average": [before, load_average()], "batches": batches[0], "rows_per_batch": batches[1] / max(1, batches[0]),
            "replies": replies}


def batch_totals(url: str) -> tuple[float, float]:
    """The server's forward batches so far and the rows they held (its /metrics: crpt_batch_rows' count and sum)."""
    totals = {sample.name: sample.value for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)
              if family.name == "crpt_batch_rows" for sample in family.samples}
    return totals.get("crpt_batch_rows_count", 0.0), totals.get("crpt_batch_rows_sum", 0.0)


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile by the nearest-rank method (NaN for no values)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, -(-len(sorted_values) * p // 100) - 1))]


MALFORMED = ("unknown task", "missing fields", "broken JSON", "too many rows", "rows not a list")


def load_test(url: str, rows: list[tuple[str, dict]], expected: dict, count: int, max_rows: int) -> dict:
    """`count` single-row requests at concurrency 32, 10% malformed, a quarter of the good ones routed; statuses and answers checked."""
    rng = random.Random(SEED)
    seen: dict[str, int] = {}
    position = []  # row k of the list -> its index among its task's rows (the reference's key)
    for task, _ in rows:
        position.append(seen.get(task, 0))
        seen[task] = position[-1] + 1
    plan, requests = [], []
    for i in range(count):
        k = i % len(rows)
        task, row = rows[k]
        if i % 10 == 9:
            kind = MALFORMED[(i // 10) % len(MALFORMED)]
            body = {"unknown task": {"task": "NoSuchTask", "rows": [row]}, "missing fields": {"task": task, "rows": [{"idx": row["idx"]}]},
                    "broken JSON": json.dumps({"task": task, "rows": [row]})[:-7].encode(),
                    "too many rows": {"task": task, "rows": [row] * (max_rows + 1)}, "rows not a list": {"task": task, "rows": "row"}}[kind]
        else:
            kind = "routed" if rng.random() < 0.25 else "given"
            body = {"task": None if kind == "routed" else task, "rows": [row]}
        plan.append((kind, k))
        requests.append(body)
    result = drive(url, requests, 32, seconds=max(60.0, 3 * count / 100))
    by_kind: dict = {}
    differing = []
    for (kind, k), reply in zip(plan, result.pop("replies")):
        if reply is None:
            continue
        counts = by_kind.setdefault(kind, {})
        counts[str(reply[1])] = counts.get(str(reply[1]), 0) + 1
        if kind in ("given", "routed") and reply[1] == 200:
            got = reply[2]["results"][0]
            want = expected["routed"][k] if kind == "routed" else (rows[k][0], *expected["given"][(rows[k][0], position[k])])
            if (got["task"], got["prediction"], got["index"]) != tuple(want):
                differing.append({"kind": kind, "row": k, "server": [got["task"], got["prediction"], got["index"]], "bank_predict": list(want)})
    fives = sum(n for counts in by_kind.values() for status, n in counts.items() if status.startswith("5"))
    return {**result, "by_kind": by_kind, "responses_5xx": fives, "answers_differing": len(differing), "differing": differing[:20]}


async def _first_answer(url: str, task: str, row: dict, seconds: float) -> tuple[float, dict] | None:
    """Poll for `task` every 10 ms; the wall-clock time of its first 200 and that answer (None after `seconds`)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        deadline = time.time() + seconds
        while time.time() < deadline:
            r = await client.post("/v1/predict", json={"task": task, "rows": [row]})
            if r.status_code == 200:
                return time.time(), r.json()["results"][0]
            await asyncio.sleep(0.01)
    return None


def hot_add(source: Path, work: Path, row: dict, names: list[str], copies: int) -> dict:
    """The bank without its last entry, served; the entry added (then copies under new names): seconds from landing to first answer."""
    bank_path = work / "hot" / "bank"
    shutil.rmtree(bank_path.parent, ignore_errors=True)
    src, bank = PromptBank.open(source), PromptBank.open(bank_path, create=True)
    newcomer = names[-1]
    for name in names[:-1]:
        bank.add(name, src.get(name))
    latencies, answers = [], []
    with free_server(bank_path, work / "hot-server.log") as url:
        for k in range(copies):
            name = newcomer if k == 0 else f"{newcomer}-{k + 1}"

            async def add_while_polling():
                poll = asyncio.create_task(_first_answer(url, name, row, 30))
                await asyncio.sleep(0.3)  # the poller is answered 404 before the entry lands
                await asyncio.to_thread(bank.add, name, src.get(newcomer))
                return os.stat(bank_path / "bank.json").st_mtime, await poll

            landed, first = asyncio.run(add_while_polling())
            latencies.append(None if first is None else first[0] - landed)
            answers.append(None if first is None else first[1]["prediction"])
    return {"entry": newcomer, "adds": copies, "seconds_to_first_answer": latencies, "answers": answers, "load_average": load_average()}




if __name__ == "__main__":  # python experiments/serving_http.py BANK PORT per-task: crpt serve's app on 127.0.0.1, batching each task
    import uvicorn  # separately: each task's rows of a collected batch (at most max_batch) in one forward

    bank, port, variant = sys.argv[1:4]
    if variant != "per-task":
        raise SystemExit(f"variant {variant!r}: the only variant is per-task (crpt serve itself runs the others)")
    served = PerTaskBank(bank, batch_size=Limits().max_batch)
    uvicorn.run(create_app(served), host="127.0.0.1", port=int(port))  # uvicorn's logging, as crpt serve's
