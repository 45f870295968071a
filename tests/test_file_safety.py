"""No command touches what it did not write: banks, `crpt train --out`, temporary names and their clean-up.

Real files, real processes, real SIGKILL and SIGSTOP at the library's own points (continual_rpt/faults.py);
nothing is mocked. Each test says what it did on the code before this fix (issue 26, items 1-3).
"""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch
from crash import ENV, REPO, SIGKILLED, hidden, killed, snapshot, stopped, temp_of
from safetensors.torch import save_file

from continual_rpt.bank import ENTRY_FILES, BankError, Entry, PromptBank
from continual_rpt.cli import main
from continual_rpt.faults import ENV as KILL_AT
from continual_rpt.faults import STOP_ENV


def make_entry(name: str) -> Entry:
    """A small complete entry whose prompt is determined by `name`."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    meta = {"name": name, "task": "CB", "backbone": {"name": "fake", "width": 32, "fingerprint": "0" * 64}}
    return Entry(torch.randn(10, 32, generator=g), {"weight": torch.randn(3, 32, generator=g)}, meta, {}, {"name": name})


def users_files(folder):
    """What a user keeps in a folder: a git checkout, secrets, documents."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".env").write_text("TOKEN=secret\n")
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.md").write_text("# notes\n")
    return snapshot(folder, skip=())


def test_import_into_a_folder_that_is_not_a_bank_is_refused_and_nothing_is_touched(tmp_path, tiny_gpt2_dir, capsys):
    # Before: the folder became a bank and .git/, .env and docs/ were deleted (exit 0).
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                                             "num_virtual_tokens": 3, "base_model_name_or_path": str(tiny_gpt2_dir)}))
    save_file({"prompt_embeddings": torch.randn(3, 32)}, adapter / "adapter_model.safetensors")
    folder = tmp_path / "project"
    folder.mkdir()
    before = users_files(folder)
    assert main(["bank", "import", str(folder), str(adapter), "--task", "CB", "--name", "CB0"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "is not a prompt bank" in err and "nothing was changed" in err, err
    assert snapshot(folder, skip=()) == before and sorted(p.name for p in folder.iterdir()) == [".env", ".git", "docs"]
    assert main(["bank", "import", str(tmp_path / "new-bank"), str(adapter), "--task", "CB", "--name", "CB0"]) == 0  # a new folder is fine
    assert PromptBank.open(tmp_path / "new-bank").tasks() == ["CB0"]


def test_a_write_into_a_bank_keeps_what_a_user_keeps_there(tmp_path):
    # Before: the add deleted x/ (say `crpt bank export BANK A --out BANK/x`), .git/, .env and docs/.
    path = tmp_path / "bank"
    bank = PromptBank.open(path, create=True)
    bank.add("A", make_entry("A"))
    users_files(path)
    (path / "x").mkdir()
    (path / "x" / "adapter_config.json").write_text("{}")
    users = {k: v for k, v in snapshot(path, skip=()).items() if k.split("/")[0] in (".git", ".env", "docs", "x")}
    assert len(users) == 4
    bank.add("B", make_entry("B"))
    assert {k: v for k, v in snapshot(path, skip=()).items() if k in users} == users
    assert bank.tasks() == ["A", "B"] and torch.equal(bank.get("B").prompt, make_entry("B").prompt)
    with pytest.raises(BankError, match="does not list it"):  # a name a user's folder holds is refused, the folder kept
        bank.add("x", make_entry("x"))
    assert (path / "x" / "adapter_config.json").read_text() == "{}" and bank.tasks() == ["A", "B"]


def test_leftovers_of_a_live_writer_are_kept_and_of_a_dead_one_removed(tmp_path):
    # Before: every hidden name was removed, a live writer's temporary folder included.
    path = tmp_path / "bank"
    PromptBank.open(path, create=True).add("A", make_entry("A"))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    try:
        leftovers = {f".crpt-tmp-{live.pid}-0123abcd-B": True, f".crpt-tmp-{int(dead.stdout)}-89abcdef-C": False,
                     f".crpt-tmp-{int(dead.stdout)}-89abcdef-bank.json": False}
        for name in leftovers:
            (path / name).mkdir() if name.endswith(("B", "C")) else (path / name).write_text("{")
        PromptBank.open(path).add("D", make_entry("D"))
        assert {name for name in leftovers if (path / name).exists()} == {name for name, kept in leftovers.items() if kept}
    finally:
        live.kill()
        live.wait()
    PromptBank.open(path).add("E", make_entry("E"))  # its writer gone, the last one goes too
    assert hidden(path) == [] and PromptBank.open(path).tasks() == ["A", "D", "E"]


WRITER = """
import sys, time
from pathlib import Path
from continual_rpt.atomic import replace_json
target, me, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for i in range(1500):
    replace_json(target, {"writer": me, "i": i, "pad": "x" * 20000})
"""


def test_two_writers_of_one_file_never_fail_and_a_reader_never_sees_half_of_it(tmp_path):
    # Before: both writers used one temporary name, so one died of FileNotFoundError and reads saw torn JSON.
    target, go = tmp_path / "state.json", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), me, str(go)], env=ENV, cwd=REPO,
                                stderr=subprocess.PIPE, text=True) for me in "ab"]
    time.sleep(2.0)  # both imported and waiting
    go.touch()
    reads, torn, seen = 0, 0, set()
    deadline = time.time() + 120
    while any(w.poll() is None for w in writers) and time.time() < deadline:
        try:
            text = target.read_text()
        except FileNotFoundError:
            continue
        reads += 1
        try:
            seen.add(json.loads(text)["writer"])
        except ValueError:
            torn += 1
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert torn == 0, f"{torn} of {reads} reads saw a half-written file"
    assert seen == {"a", "b"} and reads > 0
    assert hidden(tmp_path) == []


def test_save_pretrained_over_an_existing_folder_killed_midway_loses_neither(tmp_path):
    # Before: the old folder was removed and then the new one renamed, with no point in between to kill at
    # (this test: "not killed at bank.entry-moved-aside"), and a crash there left neither.
    script = ("import sys; sys.path.insert(0, 'tests'); from test_file_safety import make_entry; "
              "make_entry('new').save_pretrained(sys.argv[1])")
    for point, kept in (("bank.entry-moved-aside", "old"), ("bank.entry-renamed", "new")):
        folder = tmp_path / point / "entry"
        make_entry("old").save_pretrained(folder)
        proc = subprocess.run([sys.executable, "-c", script, str(folder)], env={**ENV, KILL_AT: point}, cwd=REPO)
        assert proc.returncode == SIGKILLED, f"not killed at {point}"
        complete = {}  # every complete entry folder the kill left, by the name its prompt belongs to
        for path in folder.parent.iterdir():
            if {p.name for p in path.iterdir()} == ENTRY_FILES - {"route.safetensors"}:
                complete[Entry.from_pretrained(path).meta["name"]] = path.name
        assert set(complete) == {"old", "new"}, complete  # nothing lost: the old aside (or in place), the new in place (or aside)
        # The next writer into the same parent cleans up what the dead writer left: the old folder goes back if the new never landed.
        make_entry("other").save_pretrained(folder.parent / "other", overwrite=False)
        assert Entry.from_pretrained(folder).meta["name"] == kept
        assert sorted(p.name for p in folder.parent.iterdir()) == ["entry", "other"]


def _train(out, superglue_dir, tiny_bert_dir, seed, **env):
    argv = ["train", "--task", "CB", "--out", out, "--data-dir", superglue_dir, "--backbone", tiny_bert_dir, "--max-train", "16",
            "--epochs", "1", "--n-tokens", "3", "--bottleneck", "8", "--max-length", "64", "--no-bf16", "--no-progress", "--seed", seed]
    return subprocess.Popen([sys.executable, "-m", "continual_rpt", *map(str, argv)], env={**ENV, **env}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_trainings_into_one_out_folder_never_replace_each_other(tmp_path, superglue_dir, tiny_bert_dir):
    # Before: both passed the "already exists" check at start; the one that wrote last silently replaced the other (both exit 0).
    out = tmp_path / "out"
    first = _train(out, superglue_dir, tiny_bert_dir, 1, **{STOP_ENV: "bank.entry:prompt.safetensors"})
    stopped(first.pid)  # trained, writing --out (its first file written), and held there
    second = _train(out, superglue_dir, tiny_bert_dir, 2)
    second_err = second.communicate(timeout=300)[1]
    first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=300)[1]
    assert (first.returncode, second.returncode) == (0, 2), (first_err[-2000:], second_err[-2000:])
    assert str(out) in second_err and f"pid {first.pid}" in second_err, second_err
    assert Entry.from_pretrained(out).config["train"]["seed"] == 1  # the first one's, whole
    assert hidden(tmp_path) == []


def test_a_killed_training_leaves_nothing_behind_for_long(tmp_path, superglue_dir, tiny_bert_dir):
    # Before: a killed crpt train left its hidden .out.XXXX/ folder in --out's parent for good.
    argv = ["train", "--task", "CB", "--data-dir", superglue_dir, "--backbone", tiny_bert_dir, "--max-train", "16", "--epochs", "1",
            "--n-tokens", "3", "--bottleneck", "8", "--max-length", "64", "--no-bf16", "--no-progress"]
    killed([*argv, "--out", tmp_path / "out"], "bank.entry:head.safetensors")
    assert len(hidden(tmp_path)) >= 1 and all(temp_of("out", name) or name == ".crpt-lock-out" for name in hidden(tmp_path))
    assert not (tmp_path / "out").exists()
    assert main([*map(str, argv), "--out", str(tmp_path / "other")]) == 0  # the next writer here removes the dead one's
    assert hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other"]
