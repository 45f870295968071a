"""Reliability: crash safety of the bank and of runs, clean refusal of bad input, no code from disk, divergence.

Every test here drives the real library (real files, real subprocesses, real SIGKILLs); nothing is mocked.
The crash tests kill at named points of the library (`CRPT_KILL_AT`, continual_rpt/faults.py), never on a timer.
"""

import json
import os
import pickle
import re
import shutil
import signal
import time
import zlib
from pathlib import Path

import pytest
import torch
from crash import RUN_LIVES, SIGKILLED, hidden, snapshot, stopped, temp_of, zygote_fixture
from test_stream import write_stream

from continual_rpt.bank import CONFIG_FILE, ENTRY_FILES, HEAD_FILE, META_FILE, METRICS_FILE, PROMPT_FILE, ROUTE_FILE, BankError, Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.learner import TrainConfig, TrainingDiverged, train_task
from continual_rpt.prompts import PromptConfig
from continual_rpt.run import run_stream
from continual_rpt.streams import load_stream
from continual_rpt.tasks import load_task_data

# --- 1. crash-safe bank ------------------------------------------------------------------------------

# A writer "life" is a process forked from the zygote (crash.Zygote) that opens the bank itself and
# adds <prefix>-0, <prefix>-1, … until its kill point SIGKILLs it: milliseconds a life, not an
# interpreter start. `say` (the zygote's) reports to the test.
BANK_LIVES = """
import os, time, zlib
import torch
from continual_rpt import faults
from continual_rpt.bank import Entry, PromptBank

def make(name):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    prompt = torch.randn(10, 32, generator=g)
    head = {"weight": torch.randn(3, 32, generator=g), "bias": torch.randn(3, generator=g)}
    route = {"mean": torch.randn(32, generator=g), "count": torch.tensor([16.0])}
    meta = {"name": name, "task": "CB", "backbone": {"name": "fake", "width": 32, "fingerprint": "0" * 64}}
    return Entry(prompt, head, meta, {"train": {"lr": 0.3, "name": name}}, {"dev_score": 50.0, "name": name}, route)

def life(bank, prefix, count, stop_at="", wait_for=""):
    bank = PromptBank.open(bank, create=True)
    say("opened")
    if stop_at:  # SIGSTOP itself there (faults.STOP_ENV), holding what it holds, until the test sends SIGCONT
        os.environ[faults.STOP_ENV] = stop_at
    while wait_for and not os.path.exists(wait_for):  # start adding only once the test says so
        time.sleep(0.001)
    for i in range(int(count)):
        name = f"{prefix}-{i}"
        say("adding", name)
        bank.add(name, make(name))
        say("done", name)
"""

zygote = zygote_fixture(RUN_LIVES + BANK_LIVES)

ENTRY_ORDER = [PROMPT_FILE, HEAD_FILE, ROUTE_FILE, META_FILE, CONFIG_FILE, METRICS_FILE]  # the order an entry's files are written in
# Life i adds w<i>-0, w<i>-1, … and dies at its kill point after finishing that many adds. Together the
# lives die at every write of an add, and while creating the bank.
BANK_KILLS = [
    ("replace:bank.json", 0),  # creating the bank: not even its empty index is in place
    *[(f"bank.entry:{name}@{k}", k - 1) for name, k in zip(ENTRY_ORDER, (1, 2, 3, 1, 2, 3))],  # after each file of an entry
    ("bank.entry-renamed", 0),  # the entry in place, not yet in the index
    ("bank.entry-renamed@2", 1),
    ("replace:bank.json@3", 2),  # the new index fsynced, not yet renamed over the old one
    ("replace:bank.json", 0),
]


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
        assert name != "bank.json"
        entry = bank.get(name)  # verifies every file's sha256 against the index
        assert {p.name for p in (path / name).iterdir()} == ENTRY_FILES == set(bank._index["entries"][names.index(name)]["files"])
        assert torch.equal(entry.prompt, expected_prompt(name))
        assert entry.meta["name"] == entry.config["train"]["name"] == entry.metrics["name"] == name
        assert set(entry.head) == {"weight", "bias"}
    return names


def check_leftovers(path: Path, point: str, partial: str) -> None:
    """What a writer killed at `point` while adding `partial` leaves, and nothing else: the next writer removed the rest."""
    leftovers = hidden(path)
    if point.startswith("bank.entry:"):  # a temporary folder holding the files written so far
        written = point.partition(":")[2].partition("@")[0]
        assert len(leftovers) == 1 and temp_of(partial, leftovers[0]), leftovers
        assert {p.name for p in (path / leftovers[0]).iterdir()} == set(ENTRY_ORDER[: ENTRY_ORDER.index(written) + 1])
        assert not (path / partial).exists()
        return
    # Killed after the rename: the complete entry is in place but unlisted, so nobody reads it.
    if point.startswith("replace:"):
        assert len(leftovers) == 1 and temp_of("bank.json", leftovers[0]), leftovers
    else:
        assert leftovers == [], leftovers
    assert partial not in PromptBank.open(path)
    assert torch.equal(Entry.from_pretrained(path / partial).prompt, expected_prompt(partial))


def test_bank_survives_sigkilled_writers_and_concurrent_writers(tmp_path, zygote):
    path = tmp_path / "bank"
    finished: set[str] = set()
    names: list[str] = []
    stored: dict[str, dict[str, bytes]] = {}  # entry -> its files when first listed
    for life, (point, adds) in enumerate(BANK_KILLS):
        code, seen = zygote.life(point, "life", path, f"w{life}", 4)
        assert code == SIGKILLED, f"writer not killed at {point}: {seen}"
        done = [words[1] for words in seen if words[0] == "done"]
        assert done == [f"w{life}-{i}" for i in range(adds)], f"{point}: {seen}"
        finished |= set(done)
        if life == 0:  # killed creating the bank: there is none yet, and the next writer makes it
            assert ["opened"] not in seen and len(hidden(path)) == 1 and temp_of("bank.json", hidden(path)[0])
            with pytest.raises(BankError, match="not a prompt bank"):
                PromptBank.open(path)
            continue
        before = names
        names = check_bank(path, finished, names)
        assert names == [*before, *done]  # exactly the finished adds, nothing partial
        check_leftovers(path, point, f"w{life}-{adds}")
        for name in names:
            files = snapshot(path / name)
            assert stored.setdefault(name, files) == files, f"{name}'s files changed after a later writer"
    assert len(finished) == sum(adds for _, adds in BANK_KILLS) and len(names) == len(finished)
    code, seen = zygote.life(None, "life", path, "last", 1)  # an unkilled writer cleans up after all of them
    assert code == 0, seen
    assert check_bank(path, finished, names) == [*names, "last-0"] and hidden(path) == []
    folders = {p.name for p in path.iterdir() if p.is_dir()}
    assert folders == set(names) | {"last-0"}, f"unlisted entry folders left by killed writers: {folders - set(names)}"
    print(f"{len(names)} entries after {len(BANK_KILLS)} kills")

    # Two writers at the same time, each adding its own names, made to overlap for certain: a stops itself in the
    # middle of its third add, holding the lock, and only then does b start adding. b must wait for a: while a is
    # stopped the index lists a's first two entries only, and b's first entry is listed after a's third. (Checked
    # that this fails: with the bank's flock made shared, LOCK_SH, b listed all twelve of its entries while a was
    # stopped.)
    path2 = tmp_path / "bank2"
    go = tmp_path / "go"
    seen = []
    zygote.send(None, ("life", [path2, "a", 12, f"bank.entry:{HEAD_FILE}@3"]), ("life", [path2, "b", 12, "", go]))
    a = int(zygote.until("child", seen)[1])
    stopped(a)
    assert PromptBank.open(path2).tasks() == ["a-0", "a-1"]
    go.touch()
    while ["adding", "b-0"] not in seen:
        zygote.until("adding", seen)
    time.sleep(1.0)  # b adds an entry in milliseconds when nothing holds it back
    assert PromptBank.open(path2).tasks() == ["a-0", "a-1"] and ["done", "b-0"] not in seen, "b wrote while a held the lock"
    os.kill(a, signal.SIGCONT)
    zygote.until("idle", seen)
    assert [w for w in seen if w[0] == "reaped"] and all(w[2] == "0" for w in seen if w[0] == "reaped"), seen
    both = {f"{p}-{i}" for p in "ab" for i in range(12)}
    listed = check_bank(path2, both, [])
    assert set(listed) == both and listed[:3] == ["a-0", "a-1", "a-2"], listed
    for prefix in "ab":  # each writer's entries keep its order
        mine = [n for n in listed if n.startswith(prefix + "-")]
        assert mine == [f"{prefix}-{i}" for i in range(12)]


# --- 2. runs survive crashes ----------------------------------------------------------------------

RUN_TASKS = ["CB", "COPA", {"task": "RTE", "train": {"epochs": 2, "patience": 0}, "data": {"max_train": 32}}]  # 2 + 2 + 8 steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_dir, superglue_dir):
    """The stream file of RUN_TASKS, and its run folder and metrics when nothing interrupts it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    stream = write_stream(root, tiny_bert_dir, superglue_dir, RUN_TASKS)
    return stream, root / "fresh", run_stream(load_stream(stream), root / "fresh", progress=False)


def check_killed_run(out: Path, stored: dict[str, dict[str, bytes]], tasks: list[str], rows: int) -> None:
    """After a kill: the bank opens with exactly `tasks`, each verifies and is byte-identical to when first seen."""
    bank = PromptBank.open(out / "bank")
    assert bank.tasks() == tasks
    for name in bank.tasks():
        bank.get(name)
        files = snapshot(out / "bank" / name)
        assert stored.setdefault(name, files) == files, f"{name}'s stored files changed after a resume"
    assert len(json.loads((out / "state.json").read_text())["rows"]) == rows
    assert not (out / "metrics.json").exists()


def check_resumed(out: Path, uninterrupted, stored: dict[str, dict[str, bytes]]) -> None:
    """A resumed run: the uninterrupted run's results, stored entries untouched, no temporary file left."""
    _, fresh_dir, fresh = uninterrupted
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == fresh["accuracy_matrix"]
    bank = PromptBank.open(out / "bank")
    assert bank.tasks() == ["CB", "COPA", "RTE"]
    for name, files in stored.items():
        assert snapshot(out / "bank" / name) == files, f"{name}'s stored files changed after a resume"
    for name in bank.tasks():  # same prompts as the uninterrupted run
        assert torch.equal(bank.get(name).prompt, PromptBank.open(fresh_dir / "bank").get(name).prompt)
    assert hidden(out) == []  # the resumed run replaced or removed every temporary copy the kills left


# One life per kill point: (the bank's tasks, state.json's rows) when it dies. CB trains 2 steps, COPA 2.
RUN_KILLS = {
    "train.step@3": (["CB"], 1),  # in the middle of COPA's training
    "bank.entry:head.safetensors@2": (["CB"], 1),  # writing COPA's entry
    "bank.entry-renamed@2": (["CB"], 1),  # COPA's entry in place, not in the index
    "replace:bank.json@3": (["CB"], 1),  # COPA's index update (@1 created the bank, @2 listed CB)
    "replace:state.json@2": (["CB", "COPA"], 1),  # COPA stored, its row of the accuracy matrix not saved
    "run.task-done@2": (["CB", "COPA"], 2),  # COPA's row saved, RTE not started
    "replace:metrics.json": (["CB", "COPA", "RTE"], 3),  # all learned, the final metrics not written
}


@pytest.mark.parametrize("point", list(RUN_KILLS))
def test_run_killed_at_each_write_resumes_to_the_uninterrupted_result(tmp_path, zygote, uninterrupted, point):
    out = tmp_path / "run"
    argv = ["run", uninterrupted[0], "--out", out, "--no-progress"]
    zygote.killed_run(point, *argv)
    stored: dict[str, dict[str, bytes]] = {}
    check_killed_run(out, stored, *RUN_KILLS[point])
    assert zygote.run(None, *argv, "--resume") == 0
    check_resumed(out, uninterrupted, stored)


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_run_killed_writing_its_first_file_starts_again(tmp_path, zygote, uninterrupted, again):
    out = tmp_path / "run"
    argv = ["run", uninterrupted[0], "--out", out, "--no-progress"]
    zygote.killed_run("replace:stream.json", *argv)
    assert len(hidden(out)) == 1 and temp_of("stream.json", hidden(out)[0]) and not (out / "stream.json").exists()
    assert zygote.run(None, *argv, *again) == 0  # nothing was run: a plain start and --resume both begin afresh
    check_resumed(out, uninterrupted, {})


def test_run_killed_three_times_resumes_to_the_uninterrupted_result(tmp_path, zygote, uninterrupted):
    out = tmp_path / "run"
    argv = ["run", uninterrupted[0], "--out", out, "--no-progress"]
    stored: dict[str, dict[str, bytes]] = {}  # entry -> its files when first seen finished
    lives = [  # each resumed life starts with the first unfinished task and dies later in the stream
        ("train.step@3", ["CB"], 1),  # COPA's first step
        ("bank.entry-renamed", ["CB"], 1),  # COPA trained again and renamed into place, not in the index
        ("train.step@4", ["CB", "COPA"], 2),  # COPA trained a third time (2 steps), then RTE's second step
    ]
    for life, (point, tasks, rows) in enumerate(lives):
        zygote.killed_run(point, *argv, *(["--resume"] if life else []))
        check_killed_run(out, stored, tasks, rows)
        log = (out / "log.txt").read_text()
        assert log.count(" learn ") == [2, 3, 5][life] and log.count("resume stream") == life
    assert zygote.run(None, *argv, "--resume") == 0
    check_resumed(out, uninterrupted, stored)


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
