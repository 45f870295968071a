"""The served bank from the outside: `BankClient`, `crpt bank predict --server`, and a task learned by `crpt run` while serving.

One real `crpt serve` process on 127.0.0.1 (a free port) serves the bank of a real `crpt run` of
CB, COPA, RTE that was SIGKILLed after its second task; the last test resumes that run, so its
writer is `crpt run --resume` adding RTE to the bank being served.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import pytest
from crash import ENV, REPO, RUN_LIVES, SIGKILLED, Zygote
from test_stream import write_stream

from continual_rpt.cli import main
from continual_rpt.serving.client import BankClient, ServerError, ServerUnreachable
from continual_rpt.tasks import read_examples, task_from_meta
from continual_rpt.tasks.stored import read_rows


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def crpt_serve(bank, log_path, *options):
    """A `crpt serve BANK` process on 127.0.0.1 until the block ends (then SIGTERM, SIGKILL after 10 s); yields its URL at once."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "continual_rpt", "serve", str(bank), "--host", "127.0.0.1",
                                 "--port", url.rsplit(":", 1)[1], *options], env=ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_task(url, name, log_path, within_s=60):
    """Wait until the server at `url` is ready and serves `name` (polled every 0.1 s, at most `within_s` seconds)."""
    client, deadline = BankClient(url), time.monotonic() + within_s
    try:
        client.wait_until_ready(within_s)
        while name not in {task["name"] for task in client.tasks()}:
            assert time.monotonic() < deadline, f"{url} does not serve {name} after {within_s} s"
            time.sleep(0.1)
    except ServerUnreachable:
        pytest.fail(f"crpt serve did not become ready: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(request, tmp_path_factory, superglue_dir):
    """A run of CB, COPA, RTE killed after COPA (its bank holds CB and COPA), served; the zygote that resumes it."""
    tmp = tmp_path_factory.mktemp("served")
    run, log = tmp / "run", tmp / "serve.log"
    with ExitStack() as stack:
        zygote = Zygote(tmp, RUN_LIVES)  # imports the library in its own process while the tiny model is built here
        stack.callback(zygote.close)
        stream = write_stream(tmp, request.getfixturevalue("tiny_bert_dir"), superglue_dir, ["CB", "COPA", "RTE"], controls=False)
        zygote.send("run.task-done@2", ("run", ["run", stream, "--out", run, "--no-progress"]))
        deadline = time.monotonic() + 120  # crpt serve starts (imports, loads) beside the run, once the run has made its bank
        while not (run / "bank" / "bank.json").is_file():
            assert time.monotonic() < deadline and zygote.proc.poll() is None, "the run made no bank"
            time.sleep(0.05)
        url = stack.enter_context(crpt_serve(run / "bank", log))
        seen = []
        assert int(zygote.until("reaped", seen)[2]) == SIGKILLED, f"the run was not killed after COPA: {seen}"
        zygote.until("idle", seen)
        wait_for_task(url, "COPA", log)
        yield SimpleNamespace(stream=stream, run=run, bank=run / "bank", url=url, zygote=zygote, log=log)


def val_rows(superglue_dir, task, n):
    """The first `n` rows of the task's val.jsonl, as JSON objects."""
    return [json.loads(line) for line in (superglue_dir / task / "val.jsonl").read_text().splitlines()[:n]]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("text", ["text\nA fine day\n\nrain, again\n", "[{\"text\": \"A fine day\"}, {\"text\": \"rain\"}]",
                                  "{\"text\": \"A fine day\"}\n\n{\"text\": \"rain\"}\n"], ids=["tsv", "json", "jsonl"])
def test_the_rows_sent_to_a_server_are_the_rows_a_local_predict_parses(tmp_path, superglue_dir, text):
    # What --server sends and names uids by. Checked to fail with rows numbered by their index, not their line (uids differ).
    meta = {"custom": {"name": "Mood", "label_names": ["sad", "glad"], "text": "text", "hub": "unused/dataset"}}
    path = tmp_path / f"rows.{'tsv' if text.startswith('text') else 'json' if text.startswith('[') else 'jsonl'}"
    path.write_text(text)
    for meta, path in ((meta, path), ({"task": "CB"}, superglue_dir / "CB" / "val.jsonl")):
        task = task_from_meta(meta, "here")
        assert [ex for where, row in read_rows(meta, path) for ex in task.parse(row, where)] == read_examples(meta, path)


def test_predict_through_the_server_writes_what_the_local_predict_writes(served, superglue_dir, tmp_path):
    # Fails if the server answers from another entry, another precision or another row order than the local path,
    # or if the client names uids or lines otherwise (checked: with the server's uids, "CB/request/0", not "CB/val/0").
    bank = str(served.bank)
    mixed = write_rows(tmp_path / "mixed.jsonl", val_rows(superglue_dir, "COPA", 6) + val_rows(superglue_dir, "CB", 12))
    for args in (["--task", "CB", "--input", str(superglue_dir / "CB" / "val.jsonl")], ["--input", str(mixed)]):
        assert main(["bank", "predict", bank, *args, "--output", str(tmp_path / "local.jsonl")]) == 0
        assert main(["bank", "predict", bank, *args, "--server", served.url, "--output", str(tmp_path / "remote.jsonl")]) == 0
        local, remote = (tmp_path / "local.jsonl").read_text().splitlines(), (tmp_path / "remote.jsonl").read_text().splitlines()
        assert len(remote) == len(local) > 0
        for mine, theirs in zip(local, remote):
            assert json.loads(theirs) == json.loads(mine)
    assert {json.loads(line)["task"] for line in remote} == {"COPA", "CB"}


def test_client_errors_carry_the_status_and_the_servers_message(served, superglue_dir, tmp_path, capsys):
    # Checked to fail with the chunk's first row not added to the 422's row (row 1 of the 2nd chunk, not 3).
    client = BankClient(served.url, max_rows=2)
    with pytest.raises(ServerError) as unknown:
        client.predict(val_rows(superglue_dir, "CB", 1), task="NoSuchTask")
    assert unknown.value.status == 404 and "NoSuchTask" in unknown.value.message and "CB" in unknown.value.message
    with pytest.raises(ServerError) as missing:
        client.task("NoSuchTask")
    assert missing.value.status == 404
    rows = val_rows(superglue_dir, "CB", 5)
    del rows[3]["hypothesis"]
    with pytest.raises(ServerError) as bad_row:  # the 4th row is in the 2nd chunk of 2: its index is counted over all rows
        client.predict(rows, task="CB")
    assert bad_row.value.status == 422 and bad_row.value.row == 3 and "hypothesis" in bad_row.value.message
    assert "row 3 of all" in str(bad_row.value)
    # 300 rows in one request pass the server's default 256-row limit: the 413 is met by sending halves.
    many = BankClient(served.url, max_rows=1000).predict(val_rows(superglue_dir, "CB", 50) * 6, task="CB")
    assert [r["row"] for r in many] == list(range(300)) and [r["scores"] for r in many[:50]] == [r["scores"] for r in many[250:]]
    assert {t["name"] for t in client.tasks()} >= {"CB", "COPA"} and client.task("CB")["name"] == "CB"
    with pytest.raises(ServerUnreachable, match=r"127\.0\.0\.1:\d+/v1/tasks"):
        BankClient(f"http://127.0.0.1:{free_port()}", timeout=5).tasks()
    # Through the command: a row the server refuses is named by its file and line, one line on stderr, exit 2.
    path = write_rows(tmp_path / "rows.jsonl", val_rows(superglue_dir, "COPA", 2) + [{"premise": "only a premise"}])
    assert main(["bank", "predict", str(served.bank), "--input", str(path), "--server", served.url]) == 2
    assert f"{path}:3: " in capsys.readouterr().err


def test_a_task_learned_by_crpt_run_while_serving_is_answered_and_old_answers_never_change(served, superglue_dir):
    # Fails if the server restarts or reloads old entries on a change (scores differ, or requests fail meanwhile),
    # or never watches bank.json (RTE is not answered within 10 s). Checked to fail with crpt serve --watch-interval-s 1000
    # and with a refresh that flips the old entries' precision (COPA's scores -0.3496 bf16, not -0.3521 fp32).
    old = {"CB": val_rows(superglue_dir, "CB", 4), "COPA": val_rows(superglue_dir, "COPA", 4)}
    client = BankClient(served.url, timeout=30)
    before = {task: client.predict(rows, task) for task, rows in old.items()}
    with pytest.raises(ServerError, match="RTE") as not_yet:
        client.predict(val_rows(superglue_dir, "RTE", 2), "RTE")
    assert not_yet.value.status == 404
    answers, failures, stop = [], [], threading.Event()

    def keep_asking():  # bounded: at most 60 s and 3,000 requests
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 3000:
            for task, rows in old.items():
                try:
                    answers.append((task, client.predict(rows, task)))
                except (ServerError, ServerUnreachable) as err:
                    failures.append(f"{task}: {err}")
                time.sleep(0.01)  # leaves the run a share of the 2 cores

    landed, first_answer, rte = {}, {}, val_rows(superglue_dir, "RTE", 3)

    def wait_for_rte():  # polls every 20 ms, at most 90 s: when the index lists RTE, and RTE's first answer
        deadline, index = time.monotonic() + 90, served.bank / "bank.json"
        while not stop.is_set() and time.monotonic() < deadline:
            if not landed and "RTE" in index.read_text():
                landed["at"] = index.stat().st_mtime  # when the write listing RTE was made (bank.json is written once a task)
            try:
                first_answer["answers"] = client.predict(rte, "RTE")
                first_answer["at"] = time.time()
                landed.setdefault("at", index.stat().st_mtime)  # it landed after the look above, and was answered at once
                return
            except ServerError as err:
                if err.status != 404:  # unknown until it lands; anything else is a failure
                    return failures.append(f"RTE: {err}")
            time.sleep(0.02)

    threads = [threading.Thread(target=keep_asking), threading.Thread(target=wait_for_rte)]
    for thread in threads:
        thread.start()
    try:
        assert served.zygote.run(None, "run", served.stream, "--out", served.run, "--resume", "--no-progress") == 0
        threads[1].join(10)  # RTE answered at most 10 s after the run ended
        assert "at" in first_answer, f"RTE not answered 10 s after crpt run added it; server log: {served.log.read_text()[-2000:]}"
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    latency = first_answer["at"] - landed["at"]
    print(f"hot-add: RTE answered {latency:.2f} s after bank.json listed it ({len(answers)} old-task requests meanwhile)")
    assert latency <= 5
    assert [a["task"] for a in first_answer["answers"]] == ["RTE"] * 3
    after = {task: client.predict(rows, task) for task, rows in old.items()}
    assert not failures and len(answers) >= 10
    for task, result in answers + list(after.items()):
        assert result == before[task]  # bit-identical: predictions and every fp32 score
