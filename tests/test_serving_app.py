"""`crpt serve`'s HTTP layer: real uvicorn servers on 127.0.0.1 (in a thread, or `crpt serve --workers 2` as a process),
real HTTP through httpx, over a CB + COPA bank learned once for the module on the tiny BERT.

Every server is started on a free loopback port and stopped at the end of its test; every request loop is bounded.
Each test was checked to fail with the piece it guards broken (a pytest plugin patching it): batches of one request
each (5 batches, not 1), no body limit (422, not 413), FastAPI's own validation handler (422 for malformed JSON),
no watcher (404 for the entry added), disconnects unnoticed (no 499); and there was no `crpt serve` before.
Responses are read as strict JSON (`strict_json`): Python's json alone would accept NaN and Infinity.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from test_serving_state import diverged, flip_a_byte
from test_stream import write_stream

from continual_rpt.bank import HEAD_FILE, Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.run import run_stream
from continual_rpt.serving.app import bank_loader, create_app
from continual_rpt.serving.state import ServedBank
from continual_rpt.streams import load_stream

TASKS = ["CB", "COPA"]  # different fields (premise/hypothesis; premise/choice1/choice2/question): routing tells them apart


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """A CB, COPA bank on the tiny BERT."""
    tmp = tmp_path_factory.mktemp("served")
    run_stream(load_stream(write_stream(tmp, tiny_bert_dir, superglue_dir, TASKS)), tmp / "run", progress=False)
    return tmp / "run" / "bank"


@pytest.fixture(scope="module")
def served(bank):
    """The bank loaded once, shared by the in-thread servers of this module."""
    return ServedBank(bank)


@pytest.fixture(scope="module")
def rows(superglue_dir):
    """Six validation rows of each task, labels dropped."""
    out = {}
    for name in TASKS:
        lines = (superglue_dir / name / "val.jsonl").read_text().splitlines()[:6]
        out[name] = [{k: v for k, v in json.loads(line).items() if k != "label"} for line in lines]
    return out


@contextlib.contextmanager
def running(app):
    """`app` on uvicorn in a thread, on a free 127.0.0.1 port; its base URL; stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), on loopback, for a server started as a process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def crpt_serve(*args: str) -> subprocess.Popen:
    """`crpt serve ARGS` as a process in a session of its own (`kill_all` ends its workers too), its stderr piped.

    Its stdout, uvicorn's access log (a line a request), is dropped: unread, it could fill the pipe and stall the server.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "continual_rpt", "serve", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_all(server: subprocess.Popen) -> str:
    """SIGKILL the server and its workers (which would hold its pipes open), and its stderr."""
    os.killpg(server.pid, signal.SIGKILL)
    return server.communicate()[1]


def strict_json(response: httpx.Response):
    """The body as any JSON parser reads it: NaN and ±Infinity (which Python's json alone accepts) refused."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in the body, which is then not JSON: {response.text[:300]}")

    return json.loads(response.text, parse_constant=refuse)


def wait_ready(client: httpx.Client, seconds: float = 30) -> dict:
    """/health once it answers 200 (polled, bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            answer = client.get("/health")
            if answer.status_code == 200:
                return answer.json()
        time.sleep(0.05)
    raise AssertionError("the server never became ready")


def metric(client: httpx.Client, name: str, **labels) -> float:
    """The sum of /metrics' samples called `name` with these labels."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        total += sum(s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    return total


def test_predict_answers_as_crpt_bank_predict_and_the_catalogue_endpoints(served, bank, rows, tmp_path):
    with running(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = wait_ready(client)
        assert health["ready"] and health["pid"] == os.getpid() and health["tasks"] == 2
        given = client.post("/v1/predict", json={"task": "CB", "rows": rows["CB"]})
        assert given.status_code == 200 and given.headers["x-worker-pid"] == str(os.getpid())
        results = given.json()["results"]
        assert [r["task"] for r in results] == ["CB"] * 6 and all(r["routing_score"] is None for r in results)
        assert all(r["prediction"] == r["options"][r["index"]] and len(r["scores"]) == 3 for r in results)
        mixed = [row for pair in zip(rows["CB"], rows["COPA"]) for row in pair]
        routed = client.post("/v1/predict", json={"rows": mixed}).json()["results"]
        # The same rows through `crpt bank predict`, given the task and routed: the same answers.
        for task, answers in [("CB", results), (None, routed)]:
            path = tmp_path / f"{task}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in (rows["CB"] if task else mixed)))
            assert main(["bank", "predict", str(bank), *([task] if task else []), "--input", str(path),
                         "--output", str(tmp_path / "out.jsonl")]) == 0
            local = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
            assert [(a["prediction"], a["index"]) for a in answers] == [(a["prediction"], a["index"]) for a in local]
            if task is None:
                assert [a["task"] for a in answers] == [a["task"] for a in local] and all(a["routing_score"] is not None for a in answers)
        catalogue = client.get("/v1/tasks").json()["tasks"]
        assert [t["name"] for t in catalogue] == TASKS and catalogue[0]["labels"] == ["entailment", "contradiction", "neutral"]
        assert client.get("/v1/tasks/COPA").json()["fields"] == catalogue[1]["fields"]
        missing = client.get("/v1/tasks/BoolQ")
        assert missing.status_code == 404 and "CB, COPA" in missing.json()["detail"]
        schema = client.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{name}", "/health", "/metrics"} <= set(schema["paths"])
        assert {"PredictRequest", "PredictResponse", "TaskInfo", "Problem"} <= set(schema["components"]["schemas"])
        assert metric(client, "crpt_predict_requests_total", task="CB", status="200") == 1
        assert metric(client, "crpt_predict_requests_total", task="(routed)", status="200") == 1
        assert metric(client, "crpt_predict_rows_total", task="COPA", status="200") == 6  # routed rows, under their entry
        assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=")  # the Prometheus text format
        assert metric(client, "crpt_predict_rows_total", status="200") == 18 and metric(client, "crpt_bank_entries") == 2
        assert metric(client, "crpt_request_latency_seconds_count") == 2 and metric(client, "crpt_queue_wait_seconds_count") == 2


def test_health_is_503_while_the_bank_holds_no_entry(bank, tmp_path):
    # Checked to fail: answering an empty bank's requests as a loaded one's (a 404 naming no task, not a 503).
    empty = PromptBank.open(tmp_path / "bank", create=True)
    with running(create_app(ServedBank(tmp_path / "bank"), watch_interval_s=0.05)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"ready": False, "pid": os.getpid(), "tasks": 0, "generation": 0}
        answer = client.post("/v1/predict", json={"task": "CB", "rows": [{"premise": "a", "hypothesis": "b"}]})
        assert answer.status_code == 503 and "holds no entry yet" in answer.json()["detail"]
        empty.add("CB", PromptBank.open(bank).get("CB"))
        assert wait_ready(client)["tasks"] == 1


def test_bad_input_is_a_4xx_naming_the_field_row_or_limit_never_a_5xx(served, rows):
    cb = rows["CB"][0]
    bad = [  # (body, headers, status, words the message must hold)
        (b'{"task": "CB", "rows": [', {}, 400, "not valid JSON"),
        (b"", {}, 400, "empty"),
        (b"\xff\xfe", {}, 400, ""),
        (b"[" * 4000, {}, 400, ""),  # nested past json's recursion limit
        ([], None, 422, "body"),
        ({"task": "CB", "rows": "premise"}, None, 422, "rows"),
        ({"task": "CB", "rows": [cb, 7]}, None, 422, "rows[1]"),
        ({"task": 5, "rows": [cb]}, None, 422, "task"),
        ({"task": "CB", "rows": [cb], "taks": "x"}, None, 422, "taks"),
        ({"task": "CB", "rows": []}, None, 422, "rows"),
        ({"task": "BoolQ", "rows": [cb]}, None, 404, "CB, COPA"),
        ({"task": "CB", "rows": [cb, {"premise": "only"}]}, None, 422, "row 1, field 'hypothesis'"),
        ({"task": "CB", "rows": [{"premise": ["a"], "hypothesis": {"b": 1}}]}, None, 422, "row 0"),
        ({"task": "CB", "rows": [{**cb, "label": "maybe"}]}, None, 422, "row 0"),
        ({"task": "COPA", "rows": [{**rows["COPA"][0], "question": "why"}]}, None, 422, "row 0"),
        ({"rows": [{"text": "no entry reads this"}]}, None, 422, "row 0"),
        ({"task": "CB", "rows": [cb] * 5}, None, 413, "at most 4 rows"),
        ({"task": "CB", "rows": [{"premise": "x" * 5000, "hypothesis": "y"}]}, None, 413, "at most 4096 bytes"),
    ]
    with running(create_app(served, max_rows=4, max_body_bytes=4096)) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        for body, headers, status, words in bad:
            if headers is None:
                answer = client.post("/v1/predict", json=body)
            else:
                answer = client.post("/v1/predict", content=body, headers={"content-type": "application/json", **headers})
            assert answer.status_code == status and words in answer.json()["detail"], (body if len(body) < 100 else body[:100], answer.text)
        chunked = client.post("/v1/predict", content=iter([b'{"task": "CB", "rows": [', b" " * 3000, b" " * 3000, b"]}"]))
        assert chunked.status_code == 413 and "4096" in chunked.json()["detail"]  # no Content-Length: the bytes read count
        assert client.post("/v1/predict", json={"task": "CB", "rows": [cb]}).status_code == 200  # still serving
        assert metric(client, "crpt_predict_requests_total") == len(bad) + 2
        assert metric(client, "crpt_predict_requests_total", status="500") == 0
        assert metric(client, "crpt_predict_requests_total", task="(invalid)", status="404") == 1  # a client's name is no label


class BrokenOnCOPA(ServedBank):
    """A served bank with a bug: any batch holding a COPA request fails."""

    def answer(self, batch):
        if any(parsed.task == "COPA" for parsed in batch):
            raise RuntimeError("a bug in the forward")
        return super().answer(batch)


def test_a_bug_is_still_a_500_and_the_server_goes_on(bank, rows):
    with running(create_app(BrokenOnCOPA(bank))) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        assert client.post("/v1/predict", json={"task": "COPA", "rows": rows["COPA"][:1]}).status_code == 500
        assert client.post("/v1/predict", json={"task": "CB", "rows": rows["CB"][:1]}).status_code == 200
        assert metric(client, "crpt_predict_requests_total", task="COPA", status="500") == 1


def test_an_entry_whose_scores_are_nan_fails_its_requests_and_the_rest_of_the_batch_is_answered(bank, served, rows, tmp_path, caplog):
    # A broken tenant (CB: a finite prompt of huge values, NaN in the model) beside a healthy one (COPA) in one batch.
    # Checked to fail on the previous commit: all four requests answered 500.
    broken = PromptBank.open(tmp_path / "bank", create=True)
    broken.add("COPA", Entry.from_pretrained(bank / "COPA"))
    broken.add("CB", diverged(Entry.from_pretrained(bank / "CB")))
    requests = [("CB", rows["CB"][:3]), ("COPA", rows["COPA"][:3]), (None, rows["COPA"][3:5]), ("CB", rows["CB"][3:4])]
    app = create_app(ServedBank(tmp_path / "bank"), max_batch=64, max_wait_ms=1500)
    with caplog.at_level(logging.ERROR, logger="continual_rpt.serving"), running(app) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: client.post("/v1/predict", json={"task": r[0], "rows": r[1]}), requests))
        assert [a.status_code for a in answers] == [500, 200, 200, 500]
        assert metric(client, "crpt_batch_rows_count") == 1 and metric(client, "crpt_batch_requests_sum") == len(requests)
        assert metric(client, "crpt_nan_scores_total", entry="CB") == 1  # one batch
        assert metric(client, "crpt_predict_requests_total", task="CB", status="500") == 2
        assert metric(client, "crpt_predict_requests_total", status="200") == 2
    for failed in (answers[0], answers[3]):
        problem = strict_json(failed)
        assert "entry 'CB' are NaN" in problem["detail"] and problem["entries"] == ["CB"]
    assert caplog.text.count("entry 'CB' scores NaN") == 1  # logged once for the batch
    for (task, batch), answer in zip(requests[1:3], answers[1:3]):  # as the healthy bank answers them alone
        alone = served.answer([served.parse(task, batch)])[0]
        results = strict_json(answer)["results"]
        assert [(r["task"], r["index"], r["prediction"]) for r in results] == [(a.task, a.index, a.prediction) for a in alone]
        assert [s for r in results for s in r["scores"]] == pytest.approx([s for a in alone for s in a.scores], abs=1e-5)
        assert [r["routing_score"] for r in results] == pytest.approx([a.routing_score for a in alone], abs=1e-5)


def test_a_choice_row_beside_more_options_is_answered_with_its_own_scores_never_the_padding(served, rows):
    # In a mixed forward a COPA row (2 choices) beside CB's 3 labels has a third score, -inf (evaluation.mixed_option_scores).
    # Checked to fail: answers holding every score of the padded row (COPA's third, null).
    mixed = [rows["CB"][0], rows["COPA"][0], rows["COPA"][1], rows["CB"][1]]
    with running(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        answer = client.post("/v1/predict", json={"rows": mixed})
        assert metric(client, "crpt_batch_rows_count") == 1  # one batch, of both tasks
    results = strict_json(answer)["results"]
    assert [(r["task"], len(r["options"]), len(r["scores"])) for r in results] == [("CB", 3, 3), ("COPA", 2, 2), ("COPA", 2, 2), ("CB", 3, 3)]
    assert all(isinstance(score, float) and math.isfinite(score) for r in results for score in [*r["scores"], r["routing_score"]])


def test_a_score_json_cannot_hold_is_null_in_the_answer_never_a_500(served, rows, monkeypatch):
    # An option's score that overflowed, a routing score of degenerate route state: what the model can still give.
    # Checked to fail: Result serialized with ser_json_inf_nan="constants" (-Infinity and NaN: a body that is not JSON).
    answer = served.answer

    def overflowing(batch):
        return [[dataclasses.replace(a, scores=[math.inf, -math.inf, *a.scores[2:]], routing_score=math.nan) for a in answers]
                for answers in answer(batch)]

    monkeypatch.setattr(served, "answer", overflowing)
    with running(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        given = client.post("/v1/predict", json={"task": "CB", "rows": rows["CB"][:2]})
        schema = strict_json(client.get("/openapi.json"))["components"]["schemas"]["Result"]["properties"]
    assert given.status_code == 200
    assert [(r["scores"][:2], r["routing_score"]) for r in strict_json(given)["results"]] == [([None, None], None)] * 2
    assert {"type": "null"} in schema["scores"]["items"]["anyOf"] and "null where it is not finite" in schema["scores"]["description"]


def test_concurrent_requests_of_different_tasks_share_one_forward_batch(served, rows):
    requests = [("CB", rows["CB"][:3]), ("COPA", rows["COPA"][:2]), (None, [rows["CB"][3], rows["COPA"][3]]),
                ("CB", rows["CB"][4:5]), ("COPA", rows["COPA"][4:6])]
    with running(create_app(served, max_batch=64, max_wait_ms=1500)) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: client.post("/v1/predict", json={"task": r[0], "rows": r[1]}), requests))
        assert [a.status_code for a in answers] == [200] * len(requests)
        assert metric(client, "crpt_batch_rows_count") == 1 and metric(client, "crpt_batch_rows_sum") == 10
        assert metric(client, "crpt_batch_requests_sum") == len(requests)
        merged = [r["index"] for a in answers for r in a.json()["results"]]
    with running(create_app(served, max_wait_ms=0)) as url, httpx.Client(base_url=url, timeout=30) as client:
        alone = [r["index"] for task, batch in requests for r in client.post("/v1/predict", json={"task": task, "rows": batch}).json()["results"]]
    assert merged == alone  # split back to the right requests, in order


def test_a_client_that_disconnects_mid_batch_leaves_the_rest_of_the_batch_answered(served, rows):
    body = json.dumps({"task": "COPA", "rows": rows["COPA"][:2]}).encode()
    with running(create_app(served, max_wait_ms=1500)) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        port = int(url.rsplit(":", 1)[1])
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            leaver = socket.create_connection(("127.0.0.1", port))
            leaver.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # its request is queued, the batch still collecting
            others = [pool.submit(client.post, "/v1/predict", json={"task": name, "rows": rows[name][:2]}) for name in TASKS]
            time.sleep(0.3)
            leaver.close()
            answers = [f.result() for f in others]
        assert [a.status_code for a in answers] == [200, 200] and [len(a.json()["results"]) for a in answers] == [2, 2]
        assert metric(client, "crpt_batch_requests_count") == 1 and metric(client, "crpt_batch_requests_sum") == 3  # one batch, all three
        assert metric(client, "crpt_predict_requests_total", status="499", task="COPA") == 1  # the leaver's answer, dropped
        assert client.post("/v1/predict", json={"task": "CB", "rows": rows["CB"][:1]}).status_code == 200


def test_an_entry_added_to_the_bank_is_served_without_restart(bank, rows, tmp_path):
    growing = PromptBank.open(tmp_path / "bank", create=True)
    growing.add("CB", PromptBank.open(bank).get("CB"))
    with running(create_app(ServedBank(tmp_path / "bank"), watch_interval_s=0.05)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        assert client.post("/v1/predict", json={"task": "COPA", "rows": rows["COPA"][:1]}).status_code == 404
        growing.add("COPA", PromptBank.open(bank).get("COPA"))
        deadline = time.monotonic() + 10
        while client.get("/v1/tasks/COPA").status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.post("/v1/predict", json={"task": "COPA", "rows": rows["COPA"][:1]})
        assert answer.status_code == 200 and answer.json()["results"][0]["task"] == "COPA"
        assert metric(client, "crpt_bank_entries") == 2 and metric(client, "crpt_bank_generation") == 2


def test_crpt_serve_with_two_workers_answers_from_both(bank, rows):
    port = free_port()
    server = crpt_serve(str(bank), "--port", str(port), "--workers", "2")
    try:
        fresh = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        pids, deadline = set(), time.monotonic() + 60  # a new connection a request: either worker may accept it
        while len(pids) < 2 and time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                health = fresh.get("/health")
                if health.status_code == 200:
                    pids.add(health.json()["pid"])
            time.sleep(0.02)
        assert len(pids) == 2 and server.pid not in pids, pids
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: fresh.post("/v1/predict", json={"rows": [rows[TASKS[i % 2]][i % 6]]}), range(40)))
        assert all(a.status_code == 200 for a in answers) and {int(a.headers["x-worker-pid"]) for a in answers} == pids
        assert [a.json()["results"][0]["task"] for a in answers[:2]] == TASKS
        fresh.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            log = server.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            log = kill_all(server)
    assert server.returncode == 0, log


def test_crpt_serve_with_two_workers_exits_with_the_error_one_worker_gives_when_they_cannot_load_the_bank(bank, tmp_path, capsys):
    # Checked to fail before: each worker stayed up answering 503 naming the error, and the command never exited.
    shutil.copytree(bank, tmp_path / "bank")
    for name in TASKS:  # none of its entries can be served
        flip_a_byte(tmp_path / "bank" / name / HEAD_FILE)
    assert main(["serve", str(tmp_path / "bank"), "--port", "0"]) == 2  # one worker: refused before listening
    alone = capsys.readouterr().err.strip().splitlines()[-1]
    assert alone.startswith("crpt: error: ") and f"{tmp_path / 'bank' / 'CB' / HEAD_FILE}: changed since it was stored" in alone
    server = crpt_serve(str(tmp_path / "bank"), "--port", str(free_port()), "--workers", "2")
    try:
        log = server.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        pytest.fail(f"crpt serve --workers 2 still running after 120 s: {kill_all(server)[-3000:]}")
    assert server.returncode == 2 and log.strip().splitlines()[-1] == alone, log[-3000:]
    assert "Child process" in log and "failed to start, stopping the parent process" in log  # uvicorn's supervisor stopped it


def test_crpt_serve_refuses_what_it_cannot_serve_before_listening(bank, tmp_path, capsys):
    # Each is crpt's one-line error and exit 2 (port 0: were one to start serving, it would hold no fixed port).
    for argv, words in [([str(tmp_path)], "not a prompt bank"), ([str(bank), "--max-rows", "0"], "--max-rows 0: must be positive"),
                        ([str(bank), "--workers", "0"], "--workers 0"), ([str(bank), "--backbone", str(tmp_path / "none")], "none of its entries")]:
        assert main(["serve", *argv, "--port", "0"]) == 2
        assert words in capsys.readouterr().err


def test_collected_rows_go_through_forwards_of_forward_batch_rows_not_max_batch(bank, served, rows):
    # One forward of a whole collected batch pads every row to the longest (5x slower on a 2-core CPU,
    # experiments/results/serving); the forward size is its own option. Fails if bank_loader hands max_batch on.
    load, limits = bank_loader({"bank": str(bank), "max_batch": 32, "forward_batch": 4})
    assert limits["max_batch"] == 32 and "forward_batch" not in limits
    small = load()
    assert small.batch_size == 4 and served.batch_size == 8  # ServedBank's own default is crpt serve's --forward-batch
    batch = [small.parse(name, rows[name]) for name in TASKS] + [small.parse(None, rows["CB"] + rows["COPA"])]
    ours = [[(a.task, a.index) for a in answers] for answers in small.answer(batch)]
    theirs = [[(a.task, a.index) for a in answers] for answers in served.answer([served.parse(p.task, list(p.rows)) for p in batch])]
    assert ours == theirs
