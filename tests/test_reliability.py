"""Reliability: crash safety of the bank and of runs, clean refusal of bad input, no code from disk, divergence.

Every test here drives the real library (real files, real subprocesses, real SIGKILLs); nothing is mocked.
"""

import json
import os
import pickle
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from test_stream import write_stream

from continual_rpt.bank import ENTRY_FILES, BankError, Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.learner import TrainConfig, TrainingDiverged, train_task
from continual_rpt.prompts import PromptConfig
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path, skip=("log.txt",)) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


# --- 1. crash-safe bank ------------------------------------------------------------------------------

# A zygote: imports torch and the bank once, then forks a fresh writer process per "life", so that
# 15 SIGKILLed writers cost milliseconds each instead of an interpreter start each. Every writer is a
# separate process that opens the bank itself and is killed by the test with a real SIGKILL.
WRITER = textwrap.dedent(
    """
    import os, sys, time, traceback, zlib
    import torch
    from continual_rpt.bank import Entry, PromptBank

    BANK = sys.argv[1]

    def say(*words):  # one write(2) per line: atomic on a pipe, so parent and children never interleave
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())

    def make(name):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        prompt = torch.randn(10, 32, generator=g)
        head = {"weight": torch.randn(3, 32, generator=g), "bias": torch.randn(3, generator=g)}
        meta = {"name": name, "task": "CB", "backbone": {"name": "fake", "width": 32, "fingerprint": "0" * 64}}
        return Entry(prompt, head, meta, {"train": {"lr": 0.3, "name": name}}, {"dev_score": 50.0, "name": name})

    def life(prefix, count, start_at):
        try:
            bank = PromptBank.open(BANK, create=True)
            say("opened")
            while time.time() < start_at:
                time.sleep(0.001)
            for i in range(count):
                name = f"{prefix}-{i}"
                bank.add(name, make(name))
                say("done", name)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)

    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        prefixes, count = cmd[1:-1], int(cmd[-1])
        start_at = time.time() + (0.2 if len(prefixes) > 1 else 0.05)  # two writers start together
        pids = []
        for prefix in prefixes:
            pid = os.fork()
            if pid == 0:
                life(prefix, count, start_at)
            pids.append(pid)
        say("child", *pids)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            say("reaped", pid, os.waitstatus_to_exitcode(status))
        say("idle")
    """
)


class Writer:
    """The zygote process and a thread that queues its stdout lines."""

    def __init__(self, tmp_path: Path, bank: Path) -> None:
        script = tmp_path / "writer.py"
        script.write_text(WRITER)
        self.proc = subprocess.Popen([sys.executable, str(script), str(bank)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV, cwd=Path(__file__).resolve().parents[1])
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line.split()) for line in self.proc.stdout], daemon=True).start()

    def send(self, *words) -> None:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()

    def until(self, first: str, seen: list) -> list[str]:
        """Collect lines into `seen` until one starts with `first`; return that one."""
        deadline = time.time() + 60
        while True:
            try:
                words = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the writer process ended; last lines {seen[-5:]}"
                assert time.time() < deadline, f"writer said nothing for 60 s; last lines {seen[-5:]}"
                continue
            seen.append(words)
            if words and words[0] == first:
                return words

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def expected_prompt(name: str) -> torch.Tensor:
    return torch.randn(10, 32, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def check_bank(path: Path, finished: set[str], before: list[str]) -> list[str]:
    """The bank opens; every listed entry is complete and verifies; nothing finished is missing."""
    bank = PromptBank.open(path)
    names = bank.tasks()
    assert len(names) == len(set(names)), names
    assert names[: len(before)] == before, "the index lost or reordered entries"
    assert finished <= set(names), f"finished adds missing from the index: {finished - set(names)}"
    for name in names:
        assert not name.startswith("."), f"temporary folder {name!r} listed as an entry"
        assert name not in ("bank.json", ".bank.json.tmp")
        entry = bank.get(name)  # verifies every file's sha256 against the index
        assert {p.name for p in (path / name).iterdir()} == ENTRY_FILES == set(bank._index["entries"][names.index(name)]["files"])
        assert torch.equal(entry.prompt, expected_prompt(name))
        assert entry.meta["name"] == entry.config["train"]["name"] == entry.metrics["name"] == name
        assert set(entry.head) == {"weight", "bias"}
    return names


def test_bank_survives_sigkilled_writers_and_concurrent_writers(tmp_path):
    path = tmp_path / "bank"
    writer = Writer(tmp_path, path)
    rng = random.Random(20240611)
    finished: set[str] = set()
    names: list[str] = []
    opened = False
    lives_that_added = 0
    try:
        for life in range(15):
            seen: list = []
            writer.send("life", f"w{life}", 100000)
            pid = int(writer.until("child", seen)[1])
            time.sleep(0.05 + rng.uniform(0.0, 0.3))  # the writer starts adding 0.05 s after the fork
            os.kill(pid, signal.SIGKILL)
            reaped = writer.until("reaped", seen)
            assert reaped[2] == str(-signal.SIGKILL), f"writer died on its own: {seen}"
            writer.until("idle", seen)
            opened |= ["opened"] in seen
            done = {words[1] for words in seen if words[0] == "done"}
            finished |= done
            lives_that_added += bool(done)
            if opened:
                names = check_bank(path, finished, names)
        assert lives_that_added >= 5 and len(finished) >= 15, "the writers were killed before they could add entries"
        leftovers = [p.name for p in path.iterdir() if p.name.startswith(".") and p.name not in (".lock",)]
        print(f"{len(names)} entries after 15 kills; left-over temporary files: {leftovers}")

        # Two writers at the same time, each adding its own names: the lock keeps every entry of both.
        path2 = tmp_path / "bank2"
        writer.close()
        writer = Writer(tmp_path, path2)
        seen = []
        writer.send("pair", "a", "b", 12)
        writer.until("idle", seen)
        assert [w for w in seen if w[0] == "reaped"] and all(w[2] == "0" for w in seen if w[0] == "reaped"), seen
        both = {f"{p}-{i}" for p in "ab" for i in range(12)}
        listed = check_bank(path2, both, [])
        assert set(listed) == both
        for prefix in "ab":  # each writer's entries keep its order
            mine = [n for n in listed if n.startswith(prefix + "-")]
            assert mine == [f"{prefix}-{i}" for i in range(12)]
    finally:
        writer.proc.kill()
        writer.proc.wait()


# --- 2. runs survive crashes ----------------------------------------------------------------------


def _learn_lines(log: Path) -> int:
    return sum(" learn " in line for line in log.read_text().splitlines()) if log.exists() else 0


def test_run_killed_three_times_resumes_to_the_uninterrupted_result(tmp_path, tiny_bert_dir, superglue_dir):
    tasks = ["CB", "COPA", {"task": "RTE", "train": {"epochs": 20, "patience": 0}, "data": {"max_train": 64}}]
    stream = write_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks)
    fresh = run_stream(load_stream(stream), tmp_path / "fresh", progress=False)
    learning = sum(t["task_seconds"] for t in fresh["per_task"].values())  # learning and evaluating, no loading

    out, log = tmp_path / "run", tmp_path / "run" / "log.txt"
    command = [sys.executable, "-m", "continual_rpt", "run", str(stream), "--out", str(out), "--no-progress"]
    rng = random.Random(7)
    stored: dict[str, dict[str, bytes]] = {}  # entry -> its files when first seen finished
    kills = 0
    for life in range(3):
        learned = _learn_lines(log)
        proc = subprocess.Popen(command + (["--resume"] if life else []), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while _learn_lines(log) == learned and proc.poll() is None:  # wait until this life starts learning
            assert time.time() < deadline
            time.sleep(0.02)
        # Within a third of the uninterrupted learning time, so the run is still learning even when this
        # process happens to run up to 3x faster than the measured one (a busy machine varies that much).
        delay = rng.uniform(0.0, learning / 3)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        print(f"kill {kills}: {delay:.2f} s into learning; last log line: {log.read_text().splitlines()[-1]}")
        bank = PromptBank.open(out / "bank")
        for name in bank.tasks():
            bank.get(name)
            files = snapshot(out / "bank" / name)
            assert stored.setdefault(name, files) == files, f"{name}'s stored files changed after a resume"
    assert kills >= 2, "the run finished before it could be interrupted"

    done = subprocess.run(command + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == fresh["accuracy_matrix"]
    bank = PromptBank.open(out / "bank")
    assert bank.tasks() == ["CB", "COPA", "RTE"]
    for name, files in stored.items():
        assert snapshot(out / "bank" / name) == files, f"{name}'s stored files changed after a resume"
    for name in bank.tasks():  # same prompts as the uninterrupted run
        assert torch.equal(bank.get(name).prompt, PromptBank.open(tmp_path / "fresh" / "bank").get(name).prompt)


# --- 3. bad input through the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """A small CB data folder (real lines), a one-task stream over it, and its finished run folder."""
    root = tmp_path_factory.mktemp("stored")
    data = root / "data"
    (data / "CB").mkdir(parents=True)
    for split, n in (("train", 40), ("val", 20)):
        lines = (superglue_dir / "CB" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / "CB" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    stream = write_stream(root, tiny_bert_dir, data, ["CB"])
    run = root / "run"
    assert main(["run", str(stream), "--out", str(run), "--no-progress"]) == 0
    return {"root": root, "data": data, "stream": stream, "run": run, "bank": run / "bank"}


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0, f"crpt {' '.join(map(str, argv))} succeeded"
    assert err.strip(), "no message on stderr"
    return err


def _cb_row(stored, split="train", line=1) -> dict:
    return json.loads((stored["data"] / "CB" / f"{split}.jsonl").read_text().splitlines()[line - 1])


def _replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


DATA_CASES = {
    "malformed-json": ("train", 3, lambda row: '{"premise": "x", "hypothesis": ', [":3: malformed JSON"]),
    "missing-field": ("val", 2, lambda row: json.dumps({k: v for k, v in row.items() if k != "hypothesis"}), [":2: missing field 'hypothesis'"]),
    "unknown-label": ("train", 5, lambda row: json.dumps({**row, "label": "maybe"}), [":5: unknown value 'maybe'", "label"]),
    "empty-split": ("val", None, None, [" is empty"]),
    "deeply-nested-line": ("train", 4, lambda row: "[" * 100000, [":4: "]),
    "integer-too-long": ("train", 6, lambda row: '{"idx": ' + "7" * 5000 + "}", [":6: "]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file_is_refused_with_file_and_line_and_the_run_is_kept(stored, capsys, case):
    split, line, make, expected = DATA_CASES[case]
    path = stored["data"] / "CB" / f"{split}.jsonl"
    original = path.read_bytes()
    run_before = snapshot(stored["run"])
    try:
        if line is None:
            path.write_text("")
        else:
            _replace_line(path, line, make(_cb_row(stored, split, line)))
        err = _cli_error(capsys, ["run", stored["stream"], "--out", stored["run"], "--resume", "--no-progress"])
    finally:
        path.write_bytes(original)
    assert str(path) in err
    for text in expected:
        assert text in err, err
    assert snapshot(stored["run"]) == run_before


def test_missing_data_folder_is_refused_and_the_run_is_kept(stored, capsys):
    moved = stored["data"].with_name("data-away")
    run_before = snapshot(stored["run"])
    stored["data"].rename(moved)
    try:
        err = _cli_error(capsys, ["run", stored["stream"], "--out", stored["run"], "--resume", "--no-progress"])
    finally:
        moved.rename(stored["data"])
    assert f"data directory {stored['data']} does not exist" in err
    assert snapshot(stored["run"]) == run_before


def _train_argv(stored, tiny_bert_dir, out, *extra):
    return ["train", "--out", out, "--data-dir", stored["data"], "--backbone", tiny_bert_dir, "--max-train", "16", "--epochs", "1",
            "--n-tokens", "3", "--bottleneck", "8", "--max-length", "96", "--no-bf16", "--no-progress", *extra]


def test_unknown_task_and_too_large_k_are_refused_before_anything_is_written(stored, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    err = _cli_error(capsys, _train_argv(stored, tiny_bert_dir, out, "--task", "NoSuchTask"))
    assert "unknown task 'NoSuchTask'" in err and not out.exists()
    err = _cli_error(capsys, _train_argv(stored, tiny_bert_dir, out, "--task", "CB", "--k-per-class", "1000"))
    assert "k_per_class=1000" in err and "CB" in err and not out.exists()


def test_existing_out_folder_of_train_is_never_overwritten(stored, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(stored["bank"] / "CB", out)
    before = snapshot(out)
    err = _cli_error(capsys, _train_argv(stored, tiny_bert_dir, out, "--task", "CB"))
    assert str(out) in err and "already exists" in err
    assert snapshot(out) == before


def test_run_folder_without_resume_is_refused_and_kept(stored, capsys):
    before = snapshot(stored["run"], skip=())
    err = _cli_error(capsys, ["run", stored["stream"], "--out", stored["run"], "--no-progress"])
    assert str(stored["run"]) in err and "--resume" in err
    assert snapshot(stored["run"], skip=()) == before


STREAM_CASES = {
    "wrong-type": ({"train": {"epochs": "ten"}}, "tasks[0].train.epochs: expected int"),
    "unknown-key": ({"train": {"epoch": 3}}, "tasks[0].train.epoch: unknown key"),
    "unknown-task": ({"task": "NoSuchTask"}, "tasks[0].task"),
    "name-parent": ({"name": "../evil"}, "tasks[0].name"),
    "name-slash": ({"name": "a/evil"}, "tasks[0].name"),
    "name-backslash": ({"name": "a\\evil"}, "tasks[0].name"),
    "name-dotdot": ({"name": ".."}, "tasks[0].name"),
    "name-nested": ({"name": "x/../../evil"}, "tasks[0].name"),
    "name-absolute": ({"name": "/tmp/evil"}, "tasks[0].name"),
}


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_bad_stream_file_is_refused_naming_file_and_key(stored, tiny_bert_dir, tmp_path, capsys, case):
    overrides, message = STREAM_CASES[case]
    task = {"task": "CB", **overrides}
    bad = write_stream(tmp_path, tiny_bert_dir, stored["data"], [task], name="bad.yaml")
    run_before = snapshot(stored["run"], skip=())
    err = _cli_error(capsys, ["run", bad, "--out", stored["run"], "--resume", "--no-progress"])
    assert str(bad) in err and message in err, err
    new = tmp_path / "new"
    err = _cli_error(capsys, ["run", bad, "--out", new, "--no-progress"])
    assert message in err and not new.exists()
    assert snapshot(stored["run"], skip=()) == run_before
    assert not [p for p in Path("/tmp").glob("evil*")] and not list(tmp_path.rglob("*evil*"))


def test_deeply_nested_stream_file_is_refused_with_its_path(stored, tmp_path, capsys):
    bad = tmp_path / "deep.yaml"
    bad.write_text("name: x\ntasks: " + "[" * 5000 + "\n")
    err = _cli_error(capsys, ["run", bad, "--out", tmp_path / "new", "--no-progress"])
    assert str(bad) in err


def _other_bert(folder: Path, tiny_bert_dir: Path, hidden: int) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    for path in tiny_bert_dir.iterdir():
        if "token" in path.name or path.name == "vocab.txt":
            shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("hidden, message", [(32, "other weights"), (48, "entry has width 32")])
def test_bank_predict_on_another_backbone_is_refused(stored, tiny_bert_dir, tmp_path, capsys, hidden, message):
    other = _other_bert(tmp_path / "other", tiny_bert_dir, hidden)
    before = snapshot(stored["bank"])
    err = _cli_error(capsys, ["bank", "predict", stored["bank"], "CB", "--input", stored["data"] / "CB" / "val.jsonl",
                              "--backbone", other, "--output", tmp_path / "pred.jsonl"])
    assert message in err and str(stored["bank"] / "CB" / "entry.json") in err, err
    assert snapshot(stored["bank"]) == before


def _rehash(bank_dir: Path, name: str, filename: str) -> None:
    """Make the index agree with an edited file (a consistent hand edit), to reach the file's own checks."""
    import hashlib

    index = json.loads((bank_dir / "bank.json").read_text())
    for item in index["entries"]:
        if item["name"] == name:
            item["files"][filename] = hashlib.sha256((bank_dir / name / filename).read_bytes()).hexdigest()
    (bank_dir / "bank.json").write_text(json.dumps(index))


@pytest.mark.parametrize("rehash", [False, True], ids=["index-unchanged", "index-rehashed"])
@pytest.mark.parametrize("filename, damage, message", [
    ("prompt.safetensors", lambda b: b[: len(b) // 2], "prompt.safetensors"),
    ("entry.json", lambda b: b'{"task": "CB", "backbone": ', "entry.json"),
])
def test_damaged_entry_file_is_refused_naming_it(stored, tmp_path, capsys, rehash, filename, damage, message):
    bank = tmp_path / "bank"
    shutil.copytree(stored["bank"], bank)
    target = bank / "CB" / filename
    target.write_bytes(damage(target.read_bytes()))
    if rehash:
        _rehash(bank, "CB", filename)
    before = snapshot(bank)
    for argv in (["bank", "show", bank, "CB"],
                 ["bank", "predict", bank, "CB", "--input", stored["data"] / "CB" / "val.jsonl", "--output", tmp_path / "p.jsonl"]):
        err = _cli_error(capsys, argv)
        assert str(target) in err, err
    assert snapshot(bank) == before


def test_invalid_bank_index_is_refused_naming_it(stored, tmp_path, capsys):
    bank = tmp_path / "bank"
    shutil.copytree(stored["bank"], bank)
    (bank / "bank.json").write_text('{"format": "continual-rpt-bank/1", "entries": [')
    before = snapshot(bank)
    for sub in ("ls", "show"):
        err = _cli_error(capsys, ["bank", sub, bank, *(["CB"] if sub == "show" else [])])
        assert str(bank / "bank.json") in err
    assert snapshot(bank) == before


# --- 4. no code from disk ---------------------------------------------------------------------------


class _Touch:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_live(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Touch(marker)))
    assert marker.exists()  # so the absence of a marker below means "never unpickled"


def test_pickle_files_in_an_entry_are_refused_and_never_run(stored, tmp_path, tiny_bert_dir):
    bank_dir = tmp_path / "bank"
    shutil.copytree(stored["bank"], bank_dir)
    marker = tmp_path / "executed"
    (bank_dir / "CB" / "extra.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    torch.save({"prompt": _Touch(marker)}, bank_dir / "CB" / "prompt.pt")
    bank = PromptBank.open(bank_dir)
    try:
        with pytest.raises(BankError) as err:
            bank.get("CB")
    finally:
        assert not marker.exists(), "a pickle in the bank was executed"
    assert "extra.pkl" in str(err.value) or "prompt.pt" in str(err.value)


@pytest.mark.parametrize("rehash", [False, True], ids=["index-unchanged", "index-rehashed"])
def test_pickle_renamed_to_safetensors_is_refused_naming_it(stored, tmp_path, rehash):
    bank_dir = tmp_path / "bank"
    shutil.copytree(stored["bank"], bank_dir)
    marker = tmp_path / "executed"
    target = bank_dir / "CB" / "prompt.safetensors"
    torch.save({"prompt": _Touch(marker)}, target)
    if rehash:
        _rehash(bank_dir, "CB", "prompt.safetensors")
    try:
        with pytest.raises(BankError) as err:
            PromptBank.open(bank_dir).get("CB")
        with pytest.raises(BankError):
            Entry.from_pretrained(bank_dir / "CB")  # no checksums: the safetensors reader itself refuses it
    finally:
        assert not marker.exists(), "a pickle in the bank was executed"
    assert str(target) in str(err.value)


# --- 5. divergence -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cb16(superglue_dir):
    return load_task_data("CB", superglue_dir, max_train=16)


@pytest.mark.parametrize("method, lr", [("rpt", 1e30), ("pt", 1e30)])
def test_absurd_learning_rate_drops_nonfinite_steps_and_never_stores_nonfinite(tiny_bert, cb16, tmp_path, method, lr):
    cfg = TrainConfig(epochs=2, batch_size=8, max_length=96, bf16=False, lr=lr, patience=0)
    try:
        trained = train_task(tiny_bert, cb16, PromptConfig(method=method, n_tokens=3, bottleneck=8), cfg)
    except TrainingDiverged as err:  # a clear error, saying how many steps were dropped
        dropped = re.search(r"\((\d+) non-finite steps dropped\)", str(err))
        assert dropped and int(dropped.group(1)) > 0 and "lower --lr" in str(err)
        return
    assert trained.metrics["skipped_nonfinite_steps"] > 0, f"lr={lr:g} produced no non-finite loss"
    assert torch.isfinite(trained.prompt).all()
    bank = PromptBank.open(tmp_path / "bank", create=True)
    bank.add("CB", Entry(trained.prompt, trained.head, {"task": "CB"}, {}, trained.metrics))
    assert torch.isfinite(bank.get("CB").prompt).all()


@pytest.mark.parametrize("lr", [1e38, float("inf"), float("nan"), 0.0, -0.3])
def test_learning_rates_that_cannot_train_are_refused_up_front(lr):
    with pytest.raises(ValueError, match="lr: must be a finite number"):
        TrainConfig(lr=lr)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_bank_refuses_a_nonfinite_prompt_and_keeps_nothing_of_it(tmp_path, bad):
    prompt = torch.zeros(3, 32)
    prompt[1, 5] = bad
    entry = Entry(prompt, None, {"task": "CB"}, {}, {})
    with pytest.raises(BankError, match="non-finite"):
        entry.save_pretrained(tmp_path / "lone")
    assert not list(tmp_path.iterdir())
    bank = PromptBank.open(tmp_path / "bank", create=True)
    index = (tmp_path / "bank" / "bank.json").read_bytes()
    with pytest.raises(BankError, match="non-finite"):
        bank.add("CB", entry)
    assert (tmp_path / "bank" / "bank.json").read_bytes() == index
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == [".lock", "bank.json"]
